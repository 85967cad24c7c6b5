"""Training objectives: SFT/pretrain, RAM, DPO/RPO and TrRa. Every loss returns *sums* and *counts*, never means.

The train step normalises once per global batch: it computes each objective's normalisers (token or example
counts, which depend on the data only) over the whole global batch before it scans over micro-batches, then adds
up ``sum / global_count`` contributions. Gradient accumulation and data parallelism therefore give exactly the
gradient of the full-batch mean, whatever the micro-batch split or the number of examples per shard.

Batch layout (see ``ramjax.data``): ``tokens``, ``targets``, ``loss_mask``, ``segment_ids``, ``positions``, all
``[B, T]``; ``targets[t]`` is the token that follows ``tokens[t]``; ``loss_mask`` is 1 on response tokens (EOS
included) and 0 on prompt and padding; ``segment_ids`` is 0 on padding and numbers the packed examples of a row
``1, 2, ...``.

Packed rows (several examples per row) are handled as follows:

* SFT / pretrain: a token mean, so packing changes nothing.
* RAM: the batch loss ``(1/N) Σ_i [−log Q(y_i|x_i) + α log Q(y'_i|x_i)]`` splits into
  ``−(Σ_tokens log Q over all data responses) / N + α (Σ_tokens log Q over all negative responses) / N`` where N
  is the number of examples, so packed rows need only a per-row example count (``count_examples``), not a pairing
  between the data and negative segments.
* DPO is non-linear in each example's chosen and rejected log-probs and therefore needs them paired per example:
  it uses one example per row (padding mode); the trainer rejects packing for ``stage=dpo``. ``sequence_logprobs``
  with ``max_segments`` gives per-segment sums for callers that do keep the pairing.
* TrRa: a token mean of the KL to the teacher, so packing changes nothing (except with a precomputed top-k teacher,
  which is looked up per example: one example per row).

Each stage's objective is an ``Objective`` record (``lm_objective``, ``ram_objective``, ``dpo_objective``,
``trra_objective``): its global-batch normalisers and its micro-batch loss, a pure function of the *logits* of the
trained model (``LogitsFn``: an LM batch → ``[B, T, V]``) and the batch. The trainer (``ramjax.train_lib``) supplies
the logits function (the model, or the model with an InRa adapter) and never looks at which objective it runs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Batch = Mapping[str, jax.Array]
LogitsFn = Callable[[Batch], jax.Array]
"""The trained model as a function of an LM batch ``{tokens, positions, segment_ids}`` (each ``[B, T]``) to its
logits ``[B, T, V]`` (the parameters are closed over, so the objective is differentiated through it)."""

LM_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
PAIR_KEYS = tuple("chosen_" + k for k in LM_KEYS) + tuple("rejected_" + k for k in LM_KEYS)
TOPK_KEYS = ("trra_top_indices", "trra_top_logprobs", "trra_rest_logprob")


class LossConfigError(ValueError):
    """An objective's hyper-parameter is out of its valid range."""


class RealignError(ValueError):
    """Bad input to a realignment function: the TrRa teacher or loss (shapes, direction, λ) or an InRa adapter."""


def token_logprobs(logits_btv: jax.Array, targets_bt: jax.Array, vocab_limit: int | None = None) -> jax.Array:
    """``log softmax(logits)[target]`` per position, float32 ``[B, T]``.

    vocab_limit: if given, logits of ids ``>= vocab_limit`` (padded embedding rows) are excluded from the
    normaliser, so the log-probs are those of a distribution over the real vocabulary.
    """
    logits = logits_btv.astype(jnp.float32)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        ids = jnp.arange(logits.shape[-1])
        logits = jnp.where(ids < vocab_limit, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse


def sequence_logprobs(logits_btv: jax.Array, targets_bt: jax.Array, loss_mask_bt: jax.Array,
                      segment_ids_bt: jax.Array | None = None, *, max_segments: int | None = None,
                      vocab_limit: int | None = None) -> jax.Array:
    """Summed log-probs of the masked (response) tokens.

    Without ``max_segments``: float32 ``[B]``, the sum over each row — one example per row (padding mode).
    With ``max_segments=S``: float32 ``[B, S]``, column ``s-1`` holding the sum over segment id ``s`` of each row
    (packed rows; segments with ids above ``S`` are dropped, so pass ``S >=`` the largest id).
    Padding (segment id 0) never contributes, whatever the mask says.
    """
    lp = token_logprobs(logits_btv, targets_bt, vocab_limit)
    mask = loss_mask_bt.astype(jnp.float32)
    if segment_ids_bt is not None:
        mask = mask * (segment_ids_bt > 0)
    if max_segments is None:
        return jnp.sum(lp * mask, axis=-1)
    onehot = jax.nn.one_hot(segment_ids_bt - 1, max_segments, dtype=jnp.float32)  # id 0 -> all zeros
    return jnp.einsum("bt,bts->bs", lp * mask, onehot)


def count_examples(loss_mask_bt: jax.Array, segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """Number of examples with at least one masked token, float32 scalar.

    With ``segment_ids`` each distinct non-zero segment of a row is one example (packed rows); without, each row
    with a masked token is one example.
    """
    mask = loss_mask_bt > 0
    if segment_ids_bt is None:
        return jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.float32)
    T = mask.shape[-1]
    seg = jnp.clip(segment_ids_bt.astype(jnp.int32), 0, T)
    per_seg = jax.vmap(lambda m, s: jax.ops.segment_sum(m.astype(jnp.int32), s, num_segments=T + 1))(mask, seg)
    return jnp.sum(per_seg[:, 1:] > 0).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------------------
# Chunked LM head: never hold [B, T, V] logits


def chunked_sums(fn: Any, seq_arrays: Any, chunk: int) -> Any:
    """``Σ_c fn(chunk c of seq_arrays)`` over blocks of ``chunk`` sequence positions, one block at a time.

    seq_arrays: a pytree of ``[B, T, ...]`` arrays (hidden states of the models involved, targets, masks, segment
    ids...). fn: maps the same pytree with ``[B, C, ...]`` leaves to a pytree of *sums over positions* (every
    objective here is one: token log-prob sums, per-row or per-segment sums, KL and metric sums), typically by
    applying the LM head (``model.logits_from_hidden``) to the block and calling the unchunked loss on it.
    Each block runs under ``jax.checkpoint`` inside a ``lax.scan``: the forward holds one ``[B, C, V]`` block of
    logits at a time and the backward recomputes it instead of storing it, so peak logits memory is
    ``B·C·V`` floats instead of ``B·T·V``. ``T`` is padded up to a multiple of ``C`` with zeros, so fn must give
    nothing for positions whose loss mask (and segment id) is 0 — every loss in this module does.
    The result equals ``fn(seq_arrays)`` up to float32 summation order.
    """
    leaves = jax.tree_util.tree_leaves(seq_arrays)
    T = leaves[0].shape[1]
    C = max(1, min(int(chunk), T))
    n = -(-T // C)

    def split(x):
        pad = n * C - T
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(x.shape[0], n, C, *x.shape[2:]).swapaxes(0, 1)  # [n, B, C, ...]

    blocks = jax.tree_util.tree_map(split, seq_arrays)
    body_fn = jax.checkpoint(fn)
    first = jax.tree_util.tree_map(lambda x: x[0], blocks)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))

    def body(acc, blk):
        out = body_fn(blk)
        return jax.tree_util.tree_map(jnp.add, acc, out), None

    total, _ = jax.lax.scan(body, zeros, blocks)
    return total


# ------------------------------------------------------------------------------------------------------------
# SFT / pretraining: token-level negative log-likelihood


def sft_loss(logits_btv: jax.Array, targets_bt: jax.Array, loss_mask_bt: jax.Array,
             segment_ids_bt: jax.Array | None = None, vocab_limit: int | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """``(Σ −log p(target) over masked tokens, number of masked tokens)``; the loss is their ratio.

    Used for ``sft`` (mask = response tokens) and ``pretrain`` (mask = every real token).
    """
    lp = token_logprobs(logits_btv, targets_bt, vocab_limit)
    mask = loss_mask_bt.astype(jnp.float32)
    if segment_ids_bt is not None:
        mask = mask * (segment_ids_bt > 0)
    return -jnp.sum(lp * mask), jnp.sum(mask)


pretrain_loss = sft_loss


# ------------------------------------------------------------------------------------------------------------
# RAM: the residual aligner's sequence-level loss


def validate_alpha(alpha: float) -> float:
    """Checks the RAM weight α (finite, ≥ 0) and returns it as a float."""
    a = float(alpha)
    if not (a >= 0.0) or a != a or a == float("inf"):
        raise LossConfigError(f"ram.alpha={alpha!r} must be >= 0 and finite (it weighs +log Q(y_neg|x), "
                              f"which pushes the negatives' likelihood down; the paper uses 1e-4, ablated over "
                              f"1e-5 … 1e-1)")
    return a


def ram_sums(logits_data: jax.Array, targets_data: jax.Array, mask_data: jax.Array, seg_data: jax.Array | None,
             logits_neg: jax.Array, targets_neg: jax.Array, mask_neg: jax.Array, seg_neg: jax.Array | None,
             vocab_limit: int | None = None) -> dict[str, jax.Array]:
    """The sums the RAM loss is built from, float32 scalars.

    nll_data_sum: ``Σ_i −log Q(y_data,i | x_i)`` (all masked response tokens of the data responses)
    logq_neg_sum: ``Σ_i log Q(y_neg,i | x_i)`` (all masked tokens of the negative responses)
    Works for padded and packed rows alike (see the module docstring).
    """
    lp_d = token_logprobs(logits_data, targets_data, vocab_limit)
    lp_n = token_logprobs(logits_neg, targets_neg, vocab_limit)
    m_d = mask_data.astype(jnp.float32) * (1.0 if seg_data is None else (seg_data > 0))
    m_n = mask_neg.astype(jnp.float32) * (1.0 if seg_neg is None else (seg_neg > 0))
    return {"nll_data_sum": -jnp.sum(lp_d * m_d), "logq_neg_sum": jnp.sum(lp_n * m_n)}


def ram_loss(sums: dict[str, jax.Array], num_examples: jax.Array, alpha: float) -> dict[str, jax.Array]:
    """Combines ``ram_sums`` into ``L = (1/N) Σ_i [−log Q(y_data,i|x_i) + α·log Q(y_neg,i|x_i)]``.

    num_examples: N, the number of examples in the *global* batch (``count_examples`` over the data responses).
    Returns ``loss``, ``nll_data`` (mean −log Q of the data responses) and ``logq_neg`` (mean log Q of the
    negatives), float32 scalars. Because everything is linear in the sums, the contributions of micro-batches
    add up to the full-batch loss when each is divided by the global N.
    """
    n = jnp.maximum(num_examples, 1.0)
    nll = sums["nll_data_sum"] / n
    neg = sums["logq_neg_sum"] / n
    return {"loss": nll + alpha * neg, "nll_data": nll, "logq_neg": neg}


# ------------------------------------------------------------------------------------------------------------
# DPO


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, beta: float, label_smoothing: float = 0.0,
             valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Sigmoid DPO loss (with conservative-DPO label smoothing) over ``[N]`` per-example summed log-probs.

    Per example, with ``h = (π_c − π_r) − (ref_c − ref_r)``:
    ``loss = −(1 − ε)·log σ(β h) − ε·log σ(−β h)``.
    valid: optional ``[N]`` 0/1 weights (padding rows of a batch get 0).
    Returns ``(Σ loss, Σ valid, metric sums)`` where the metric sums use TRL's names — ``rewards/chosen``
    (Σ β(π_c − ref_c)), ``rewards/rejected``, ``rewards/accuracies`` (Σ [reward_c > reward_r]),
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` — each to be divided by the same count.
    """
    if valid is None:
        valid = jnp.ones_like(policy_chosen)
    valid = valid.astype(jnp.float32)
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    r_c = beta * jax.lax.stop_gradient(policy_chosen - ref_chosen)
    r_r = beta * jax.lax.stop_gradient(policy_rejected - ref_rejected)
    metrics = {
        "rewards/chosen": jnp.sum(r_c * valid),
        "rewards/rejected": jnp.sum(r_r * valid),
        "rewards/accuracies": jnp.sum((r_c > r_r).astype(jnp.float32) * valid),
        "rewards/margins": jnp.sum((r_c - r_r) * valid),
        "logps/chosen": jnp.sum(jax.lax.stop_gradient(policy_chosen) * valid),
        "logps/rejected": jnp.sum(jax.lax.stop_gradient(policy_rejected) * valid),
    }
    return jnp.sum(losses * valid), jnp.sum(valid), metrics


def validate_dpo(beta: float, label_smoothing: float, rpo_alpha: float = 0.0) -> None:
    """Checks DPO's β > 0, 0 ≤ label_smoothing < 0.5 and rpo_alpha ≥ 0."""
    if not float(beta) > 0:
        raise LossConfigError(f"dpo.beta={beta!r} must be > 0 (TRL's default is 0.1)")
    if not 0.0 <= float(label_smoothing) < 0.5:
        raise LossConfigError(f"dpo.label_smoothing={label_smoothing!r} must be in [0, 0.5)")
    if not float(rpo_alpha) >= 0:
        raise LossConfigError(f"dpo.rpo_alpha={rpo_alpha!r} must be >= 0 (0 = plain DPO, RPO uses 1)")


# ------------------------------------------------------------------------------------------------------------
# TrRa (training-time realignment, arXiv 2506.12704): a frozen reference model (logits ``h_ref``) and a frozen
# aligned model (``h_align``) define at every response position the teacher
# ``softmax_vocab((λ·h_align + (1−λ)·h_ref) / T)``; λ > 1 extrapolates past the aligned model, λ < 0 away from it.
# The student is trained to match it by KL on response tokens.


def lam_per_row(lam: Any, batch: int) -> jax.Array:
    """λ as float32 ``[B, 1, 1]`` (a scalar is broadcast to every row)."""
    lam = jnp.asarray(lam, jnp.float32)
    if lam.ndim == 0:
        lam = jnp.broadcast_to(lam, (batch,))
    if lam.shape != (batch,):
        raise RealignError(f"lam has shape {lam.shape}; give a scalar or one value per row, shape ({batch},)")
    return lam[:, None, None]


def _slice_vocab(x: jax.Array, vocab_limit: int | None) -> jax.Array:
    # Padded embedding rows (ids >= vocab_limit) are not tokens: drop them so every softmax is over real tokens.
    if vocab_limit is not None and vocab_limit < x.shape[-1]:
        return x[..., :vocab_limit]
    return x


def trra_teacher_logits(h_ref: jax.Array, h_align: jax.Array, lam: Any, temperature: float = 1.0,
                        vocab_limit: int | None = None) -> jax.Array:
    """The teacher's fused logits ``(λ·h_align + (1−λ)·h_ref) / T``, float32 ``[B, T, V]``.

    h_ref, h_align: ``[B, T, V]`` logits of the frozen reference and aligned models on the same tokens.
    lam: scalar or ``[B]`` (one λ per row). Any real λ is allowed (λ > 1 extrapolates).
    vocab_limit: keep only the first ``vocab_limit`` ids (drops padded embedding rows).
    """
    if h_ref.shape != h_align.shape or h_ref.ndim != 3:
        raise RealignError(f"h_ref {h_ref.shape} and h_align {h_align.shape} must both be [B, T, V] logits of the "
                           f"same tokens (the two models must share the vocabulary)")
    if not temperature > 0:
        raise RealignError(f"temperature={temperature} must be positive")
    l = lam_per_row(lam, h_ref.shape[0])
    h_ref = _slice_vocab(h_ref.astype(jnp.float32), vocab_limit)
    h_align = _slice_vocab(h_align.astype(jnp.float32), vocab_limit)
    # h_ref + λ(h_align − h_ref): the form of the paper, and exact for λ = 0 and λ = 1.
    return (h_ref + l * (h_align - h_ref)) / temperature


def trra_teacher_logprobs(h_ref: jax.Array, h_align: jax.Array, lam: Any, temperature: float = 1.0,
                          vocab_limit: int | None = None) -> jax.Array:
    """``log_softmax_vocab((λ·h_align + (1−λ)·h_ref) / T)``, float32 ``[B, T, V]`` (see ``trra_teacher_logits``)."""
    return jax.nn.log_softmax(trra_teacher_logits(h_ref, h_align, lam, temperature, vocab_limit), axis=-1)


@flax.struct.dataclass
class TopKTeacher:
    """A teacher distribution stored as its k most likely tokens plus one bucket for the remaining mass.

    indices:       int32 ``[B, T, k]`` token ids
    logprobs:      float32 ``[B, T, k]`` their teacher log-probs
    rest_logprob:  float32 ``[B, T]`` log of the teacher mass on all other tokens (``-inf`` if none)
    The KL against it is the exact KL between the two distributions coarsened to these k+1 outcomes, which is a
    lower bound on the full KL (data processing) and equal to it when the teacher's mass outside the top k is 0.
    """

    indices: jax.Array
    logprobs: jax.Array
    rest_logprob: jax.Array


def trra_topk_teacher(h_ref: jax.Array, h_align: jax.Array, lam: Any, k: int, temperature: float = 1.0,
                      vocab_limit: int | None = None) -> TopKTeacher:
    """The TrRa teacher compressed to its top ``k`` tokens per position plus a residual-mass bucket.

    Memory per position drops from V floats to 2k+1 numbers; use it to precompute teachers offline or to keep the
    two teacher models off the training devices.
    """
    logits = trra_teacher_logits(h_ref, h_align, lam, temperature, vocab_limit)
    if not 1 <= k <= logits.shape[-1]:
        raise RealignError(f"k={k} must be in [1, vocabulary size {logits.shape[-1]}]")
    lse = jax.nn.logsumexp(logits, axis=-1)
    top, idx = jax.lax.top_k(logits, k)
    rest = _logsumexp_excluding(logits, idx) - lse
    return TopKTeacher(indices=idx.astype(jnp.int32), logprobs=top - lse[..., None], rest_logprob=rest)


def _logsumexp_excluding(logits_btv: jax.Array, idx_btk: jax.Array) -> jax.Array:
    """``log Σ_{v ∉ idx} exp(logits_v)`` ``[B, T]``, computed directly (stable even when that mass is tiny)."""
    hit = jnp.sum(jax.nn.one_hot(idx_btk, logits_btv.shape[-1], dtype=jnp.int32), axis=-2) > 0
    left = ~jnp.all(hit, axis=-1)
    # Where no id is left (k = V) run the logsumexp on finite values and select -inf afterwards, so the backward
    # pass sees no exp(-inf - -inf) = NaN.
    excl = jnp.where(hit & left[..., None], -jnp.inf, logits_btv)
    return jnp.where(left, jax.nn.logsumexp(excl, axis=-1), -jnp.inf)


def _plogp_diff(lp: jax.Array, lq: jax.Array) -> jax.Array:
    """``exp(lp)·(lp − lq)`` with the convention ``0·log 0 = 0`` (also when ``lp = -inf``)."""
    finite = lp > -jnp.inf
    lp_safe = jnp.where(finite, lp, 0.0)
    return jnp.where(finite, jnp.exp(lp_safe) * (lp_safe - lq), 0.0)


def _entropy(lp: jax.Array) -> jax.Array:
    return -jnp.sum(_plogp_diff(lp, jnp.zeros_like(lp)), axis=-1)


TeacherSpec = jax.Array | TopKTeacher | tuple


def trra_loss(student_logits: jax.Array, teacher: TeacherSpec, loss_mask: jax.Array, *,
              targets: jax.Array | None = None, segment_ids: jax.Array | None = None,
              direction: str = "forward", temperature: float = 1.0, vocab_limit: int | None = None
              ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The TrRa distillation loss as ``(Σ_tokens KL, number of response tokens, metric sums)``.

    student_logits: ``[B, T, V]`` logits of the student (the model being trained).
    teacher: one of
      * teacher log-probs ``[B, T, V]`` (from ``trra_teacher_logprobs``),
      * a tuple ``(h_ref, h_align, lam)`` of raw teacher logits, fused here with ``temperature``,
      * a ``TopKTeacher`` (KL over the top-k tokens plus the residual bucket).
      The teacher is put under ``stop_gradient``: gradients reach only the student.
    loss_mask: ``[B, T]``, 1 on response tokens (prompt and padding 0); ``segment_ids`` (0 = padding) also masks.
    targets: ``[B, T]`` data tokens, only for the accuracy metrics.
    direction: ``forward`` = KL(teacher ‖ student) (the default, mass-covering), ``reverse`` = KL(student ‖ teacher).
    The loss is ``kl_sum / count`` with count taken over the *global* batch (every token of every row counts the
    same), so micro-batch contributions ``kl_sum_i / count_global`` add up exactly. Masked positions contribute
    nothing, whatever their logits (NaN included). Metric sums (divide each by ``count``): ``trra/kl``,
    ``trra/teacher_entropy``, ``trra/student_entropy`` and, with targets, ``trra/accuracy`` (student argmax ==
    target) and ``trra/teacher_accuracy``.
    """
    if direction not in ("forward", "reverse"):
        raise RealignError(f"direction={direction!r}; use 'forward' (KL(teacher‖student)) or 'reverse'")
    if student_logits.ndim != 3:
        raise RealignError(f"student_logits must be [B, T, V], got shape {student_logits.shape}")
    mask = loss_mask.astype(jnp.float32)
    if segment_ids is not None:
        mask = mask * (segment_ids > 0)
    on = mask[..., None] > 0
    s = _slice_vocab(student_logits.astype(jnp.float32), vocab_limit)
    # Masked rows are replaced by zeros before any arithmetic so that garbage there (padding logits, NaN) can
    # reach neither the loss nor, through 0·NaN in the backward pass, the gradient.
    s = jnp.where(on, s, 0.0)
    lq = jax.nn.log_softmax(s, axis=-1)
    metrics: dict[str, jax.Array] = {}

    if isinstance(teacher, TopKTeacher):
        k = teacher.indices.shape[-1]
        idx = jnp.where(on, teacher.indices, jnp.arange(k))
        # masked positions get a uniform (finite) teacher over the k+1 outcomes; their KL is multiplied by 0
        uniform = -jnp.log(float(k + 1))
        lp_top = jax.lax.stop_gradient(jnp.where(on, teacher.logprobs, uniform))
        lp_rest = jax.lax.stop_gradient(jnp.where(mask > 0, teacher.rest_logprob, uniform))
        lq_top = jnp.take_along_axis(lq, idx, axis=-1)
        lq_rest = _logsumexp_excluding(s, idx) - jax.nn.logsumexp(s, axis=-1)
        # the coarsened (k+1)-outcome distributions
        lp_c = jnp.concatenate([lp_top, lp_rest[..., None]], axis=-1)
        lq_c = jnp.concatenate([lq_top, lq_rest[..., None]], axis=-1)
        teacher_argmax = jnp.take_along_axis(idx, jnp.argmax(lp_top, axis=-1)[..., None], axis=-1)[..., 0]
    else:
        if isinstance(teacher, tuple):
            if len(teacher) != 3:
                raise RealignError("a raw teacher is the tuple (h_ref, h_align, lam)")
            lp = trra_teacher_logprobs(*teacher, temperature=temperature, vocab_limit=vocab_limit)
        else:
            lp = _slice_vocab(jnp.asarray(teacher, jnp.float32), vocab_limit)
            if vocab_limit is not None:  # renormalise over the kept ids (a no-op when already normalised there)
                lp = jax.nn.log_softmax(lp, axis=-1)
        if lp.shape != s.shape:
            raise RealignError(f"teacher log-probs {lp.shape} and student logits {s.shape} differ in shape; the "
                               f"teacher and the student must share the vocabulary (pass vocab_limit to drop padded "
                               f"rows)")
        lp = jax.lax.stop_gradient(jnp.where(on, lp, -jnp.log(float(lp.shape[-1]))))
        lp_c, lq_c = lp, lq
        teacher_argmax = jnp.argmax(lp, axis=-1)

    if direction == "forward":
        kl = jnp.sum(_plogp_diff(lp_c, lq_c), axis=-1)
    else:
        kl = jnp.sum(_plogp_diff(lq_c, lp_c), axis=-1)
    kl_sum = jnp.sum(kl * mask)
    metrics["trra/kl"] = jax.lax.stop_gradient(kl_sum)
    metrics["trra/teacher_entropy"] = jnp.sum(_entropy(lp_c) * mask)
    metrics["trra/student_entropy"] = jax.lax.stop_gradient(jnp.sum(_entropy(lq) * mask))
    if targets is not None:
        tgt = targets.astype(jnp.int32)
        metrics["trra/accuracy"] = jnp.sum((jnp.argmax(s, axis=-1) == tgt) * mask)
        metrics["trra/teacher_accuracy"] = jnp.sum((teacher_argmax == tgt) * mask)
    return kl_sum, jnp.sum(mask), metrics


# ------------------------------------------------------------------------------------------------------------
# Objectives: one record per stage, pure functions of the trained model's logits and the batch


@dataclasses.dataclass(frozen=True)
class Objective:
    """One stage's training objective.

    normalizers(batch) -> dict of float32 scalars computed from the *global* batch (data only: token / example
        counts); passed to every micro-batch.
    loss(logits_fn, micro_batch, norms, frozen) -> (loss, metrics): the micro-batch's contribution, already
        divided by the global normalisers, so contributions add up to the global-batch loss; ``metrics`` values
        add up the same way. ``logits_fn`` is the trained model (see ``LogitsFn``); ``frozen`` holds the inputs
        that do not train (the DPO reference table, the TrRa teacher models).
    batch_keys: the batch entries the objective reads (the others are dropped before sharding).
    tokens_key: the loss mask whose non-zero entries are reported as ``tokens``.
    extra_dims: trailing dimensions of batch entries beyond ``[B, T]`` (the precomputed top-k teacher's k).
    """

    name: str
    normalizers: Callable[[Batch], dict[str, jax.Array]]
    loss: Callable[[LogitsFn, Batch, dict[str, jax.Array], Any], tuple[jax.Array, dict[str, jax.Array]]]
    batch_keys: tuple[str, ...]
    tokens_key: str = "loss_mask"
    extra_dims: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """A logits function cut at its LM head, so an objective can run the head over blocks of positions.

    hidden: LM batch → a pytree of ``[B, T, D]`` last hidden states (the models' decoders, run once);
    head:   that pytree for a block of positions (``[B, C, D]`` leaves) → the logits of the block (the pytree the
            uncut function returns, ``[B, C, V]``); chunk: positions per block (``model.loss_chunk_size``)."""

    hidden: Callable[[Batch], Any]
    head: Callable[[Any], Any]
    chunk: int = 0


class SplitLogits:
    """A ``LogitsFn`` (LM batch → logits) that may also carry its ``HeadSplit`` (``split``; None = uncut)."""

    def __init__(self, fn: Callable[[Batch], Any], split: HeadSplit | None = None):
        self.fn, self.split = fn, split

    def __call__(self, lm: Batch) -> Any:
        return self.fn(lm)


def head_sums(sources: Sequence[Callable[[Batch], Any]], lm: Batch, fn: Callable[..., Any],
              arrays: Mapping[str, jax.Array]) -> Any:
    """``fn(*(source(lm) for source in sources), arrays)`` — a pytree of *sums over positions* — where ``arrays``
    are ``[B, T, ...]`` batch entries (targets, masks...).

    When the first source (the trained model) carries a ``HeadSplit`` with ``chunk > 0`` and every other source
    carries one too (the TrRa teachers), the decoders run once to their hidden states and the heads + ``fn`` run
    over blocks of ``chunk`` positions (``chunked_sums``): no ``[B, T, V]`` logits exist for the whole sequence in
    either pass. Otherwise the full logits are computed, as before."""
    splits = [getattr(src, "split", None) for src in sources]
    if splits[0] is None or not splits[0].chunk or any(sp is None for sp in splits):
        return fn(*[src(lm) for src in sources], dict(arrays))
    hidden = [sp.hidden(lm) for sp in splits]

    def block(x):
        return fn(*[sp.head(h) for sp, h in zip(splits, x["hidden"])], x["arrays"])

    return chunked_sums(block, {"hidden": hidden, "arrays": dict(arrays)}, splits[0].chunk)


def _lm_arrays(b: Batch, *extra: str) -> dict[str, jax.Array]:
    return {k: b[k] for k in ("targets", "loss_mask", "segment_ids", *extra)}


def lm_inputs(batch: Batch, prefix: str = "") -> dict[str, jax.Array]:
    """The model inputs ``{tokens, positions, segment_ids}`` of the ``prefix`` rows of a batch."""
    return {k: batch[prefix + k] for k in ("tokens", "positions", "segment_ids")}


def _both(b: Batch) -> dict[str, jax.Array]:
    """The chosen rows followed by the rejected rows, as one LM batch ``[2B, T]`` (one forward, bigger matmuls)."""
    return {k: jnp.concatenate([b["chosen_" + k], b["rejected_" + k]], axis=0) for k in LM_KEYS}


def _response_tokens(b: Batch) -> jax.Array:
    return jnp.sum((b["loss_mask"] > 0) & (b["segment_ids"] > 0)).astype(jnp.float32)


def lm_objective(name: str = "sft", *, vocab_limit: int | None = None) -> Objective:
    """Token-mean NLL over masked tokens (``sft``: response tokens; ``pretrain``: every real token)."""

    def normalizers(b):
        return {"tokens": _response_tokens(b)}

    def loss(logits_fn, b, norms, frozen):
        s, _ = head_sums([logits_fn], lm_inputs(b), lambda lg, x: sft_loss(
            lg, x["targets"], x["loss_mask"], x["segment_ids"], vocab_limit), _lm_arrays(b))
        l = s / jnp.maximum(norms["tokens"], 1.0)
        return l, {"loss": l}

    return Objective(name, normalizers, loss, LM_KEYS)


def ram_objective(alpha: float, *, vocab_limit: int | None = None) -> Objective:
    """The RAM aligner loss (``ram_sums``/``ram_loss``), an example mean over the global batch, on ``chosen_*``
    (data) and ``rejected_*`` (negative: the proposal's sample or the dataset's rejected response) entries."""
    alpha = validate_alpha(alpha)

    def normalizers(b):
        return {"examples": count_examples(b["chosen_loss_mask"], b["chosen_segment_ids"])}

    def loss(logits_fn, b, norms, frozen):
        # One forward over data and negative rows together (bigger matmuls) when their shapes agree.
        n = b["chosen_tokens"].shape[0]
        if b["chosen_tokens"].shape == b["rejected_tokens"].shape:
            both = _both(b)

            def fn(lg, x):
                return ram_sums(lg[:n], x["targets"][:n], x["loss_mask"][:n], x["segment_ids"][:n],
                                lg[n:], x["targets"][n:], x["loss_mask"][n:], x["segment_ids"][n:], vocab_limit)
            sums = head_sums([logits_fn], lm_inputs(both), fn, _lm_arrays(both))
        else:  # the data and negative sums are separate terms: one pass each
            def half(prefix, key):
                part = {k: b[prefix + k] for k in LM_KEYS}
                return head_sums([logits_fn], lm_inputs(part), lambda lg, x: {key: ram_sums(
                    lg, x["targets"], x["loss_mask"], x["segment_ids"], lg, x["targets"], x["loss_mask"],
                    x["segment_ids"], vocab_limit)[key]}, _lm_arrays(part))
            sums = {**half("chosen_", "nll_data_sum"), **half("rejected_", "logq_neg_sum")}
        out = ram_loss(sums, norms["examples"], alpha)
        return out["loss"], out

    return Objective("ram", normalizers, loss, PAIR_KEYS, tokens_key="chosen_loss_mask")


def pair_logprobs(logits_fn: LogitsFn, batch: Batch, vocab_limit: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed response log-probs ``([B] chosen, [B] rejected)`` of a pair batch (one example per row)."""
    both = _both(batch)
    lp = head_sums([logits_fn], lm_inputs(both), lambda lg, x: sequence_logprobs(
        lg, x["targets"], x["loss_mask"], x["segment_ids"], vocab_limit=vocab_limit), _lm_arrays(both))
    n = batch["chosen_tokens"].shape[0]
    return lp[:n], lp[n:]


def dpo_objective(beta: float, label_smoothing: float = 0.0, *, rpo_alpha: float = 0.0,
                  vocab_limit: int | None = None) -> Objective:
    """Sigmoid DPO with one example per row, an example mean over the global batch. ``frozen["ref_logps"]`` is a
    ``[N, 2]`` table of the reference model's summed (chosen, rejected) log-probs for every training example
    (``ramjax.stages`` precomputes it); the batch carries ``example_index`` ``[B]`` (−1 on padding rows).

    rpo_alpha > 0 adds ``rpo_alpha ·`` the token-mean NLL of the chosen responses over the global batch (TRL's
    ``rpo_alpha``), reported as ``nll``."""
    validate_dpo(beta, label_smoothing, rpo_alpha)

    def normalizers(b):
        valid = (b["example_index"] >= 0)[:, None]
        chosen = (b["chosen_loss_mask"] > 0) & (b["chosen_segment_ids"] > 0) & valid
        return {"examples": jnp.sum(b["example_index"] >= 0).astype(jnp.float32),
                "chosen_tokens": jnp.sum(chosen).astype(jnp.float32)}

    def loss(logits_fn, b, norms, frozen):
        lp_c, lp_r = pair_logprobs(logits_fn, b, vocab_limit)
        idx = b["example_index"]
        valid = idx >= 0
        ref = jax.lax.stop_gradient(frozen["ref_logps"][jnp.maximum(idx, 0)])
        s, _, m = dpo_loss(lp_c, lp_r, ref[:, 0], ref[:, 1], beta, label_smoothing, valid)
        denom = jnp.maximum(norms["examples"], 1.0)
        l = s / denom
        metrics = {k: v / denom for k, v in m.items()}
        metrics["dpo_loss"] = l
        if rpo_alpha:
            nll = -jnp.sum(jnp.where(valid, lp_c, 0.0)) / jnp.maximum(norms["chosen_tokens"], 1.0)
            metrics["nll"] = nll
            l = l + rpo_alpha * nll
        metrics["loss"] = l
        return l, metrics

    return Objective("dpo", normalizers, loss, PAIR_KEYS + ("example_index",), tokens_key="chosen_loss_mask")


TeacherLogitsFn = Callable[[Batch, Any], tuple[jax.Array, jax.Array]]
"""``(LM batch, frozen) -> (h_ref, h_align)``: the two frozen TrRa teachers' logits ``[B, T, V]``."""


def trra_objective(lam: float, *, direction: str = "forward", temperature: float = 1.0,
                   vocab_limit: int | None = None, teacher_logits: TeacherLogitsFn | None = None,
                   topk: int = 0) -> Objective:
    """TrRa (``trra_loss``): the student matches softmax((λ·h_aligned + (1−λ)·h_ref)/T) on response tokens, a
    token mean over the global batch.

    teacher_logits: the frozen teachers' logits per micro-batch (so the full teacher never exists for the whole
        batch at once); held under stop_gradient.
    topk > 0: the teacher comes precomputed with the batch instead, as ``trra_top_indices`` /
        ``trra_top_logprobs`` ``[B, T, k]`` and ``trra_rest_logprob`` ``[B, T]`` (``trra_topk_teacher``), and the
        loss is the KL between the (k+1)-outcome coarsenings; no teacher model runs in the step.
    vocab_limit: the softmax runs over ids ``< vocab_limit`` (the teachers may pad their embeddings differently
        from the student).
    """
    if not topk and teacher_logits is None:
        raise LossConfigError("trra_objective needs teacher_logits (the frozen teachers) or topk > 0 (a "
                              "precomputed teacher in the batch)")

    def normalizers(b):
        return {"tokens": _response_tokens(b)}

    def loss(logits_fn, b, norms, frozen):
        def kl_sums(logits, *rest):
            *teachers, x = rest
            if topk:
                teacher = TopKTeacher(indices=x["trra_top_indices"], logprobs=x["trra_top_logprobs"],
                                      rest_logprob=x["trra_rest_logprob"])
            else:
                h_ref, h_al = jax.lax.stop_gradient(teachers[0])
                teacher = (h_ref[..., :vocab_limit], h_al[..., :vocab_limit], lam)
            return trra_loss(logits, teacher, x["loss_mask"], targets=x["targets"], segment_ids=x["segment_ids"],
                             direction=direction, temperature=temperature, vocab_limit=vocab_limit)

        sources = [logits_fn]
        if not topk:  # the teachers' logits per micro-batch (and per block of positions when chunked)
            split = getattr(teacher_logits, "head_split", None)
            sources.append(SplitLogits(lambda lm: teacher_logits(lm, frozen), split(frozen) if split else None))
        kl, _, m = head_sums(sources, lm_inputs(b), kl_sums, _lm_arrays(b, *(TOPK_KEYS if topk else ())))
        denom = jnp.maximum(norms["tokens"], 1.0)
        metrics = {k: v / denom for k, v in m.items()}
        metrics["loss"] = kl / denom
        return kl / denom, metrics

    extra = {"trra_top_indices": (topk,), "trra_top_logprobs": (topk,)} if topk else {}
    return Objective("trra", normalizers, loss, LM_KEYS + (TOPK_KEYS if topk else ()), extra_dims=extra)


__all__ = ["LossConfigError", "RealignError", "Batch", "LogitsFn", "LM_KEYS", "PAIR_KEYS", "TOPK_KEYS",
           "chunked_sums", "token_logprobs", "sequence_logprobs", "count_examples", "sft_loss", "pretrain_loss",
           "validate_alpha",
           "ram_sums", "ram_loss", "dpo_loss", "validate_dpo", "lam_per_row", "trra_teacher_logits",
           "trra_teacher_logprobs", "TopKTeacher", "trra_topk_teacher", "trra_loss", "Objective", "HeadSplit",
           "SplitLogits", "head_sums", "lm_inputs",
           "lm_objective", "ram_objective", "pair_logprobs", "dpo_objective", "trra_objective"]
