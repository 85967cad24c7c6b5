"""Training objectives. Every objective returns *sums* and *counts*, never means.

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
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


class LossConfigError(ValueError):
    """An objective's hyper-parameter is out of its valid range."""


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
        raise LossConfigError(f"ram.alpha={alpha!r}: α must be a finite number >= 0 (the paper uses 1e-4; a "
                              f"negative α would reward the proposal's samples instead of pushing them down)")
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


def validate_dpo(beta: float, label_smoothing: float) -> None:
    """Checks DPO's β > 0 and 0 ≤ label_smoothing < 0.5."""
    if not float(beta) > 0:
        raise LossConfigError(f"dpo.beta={beta!r} must be > 0 (TRL's default is 0.1)")
    if not 0.0 <= float(label_smoothing) < 0.5:
        raise LossConfigError(f"dpo.label_smoothing={label_smoothing!r} must be in [0, 0.5)")


# ------------------------------------------------------------------------------------------------------------
# TrRa (training-time realignment). Implemented in ``ramjax.realign`` next to the teacher it distils and the InRa
# adapter; re-exported so every objective is reachable from this module. ``trra_loss`` returns
# ``(Σ KL over response tokens, token count, metric sums)`` like the objectives above.

from ramjax.realign import TopKTeacher, trra_loss, trra_teacher_logprobs, trra_topk_teacher  # noqa: E402

__all__: list[Any] = ["LossConfigError", "chunked_sums", "token_logprobs", "sequence_logprobs", "count_examples", "sft_loss",
                      "pretrain_loss", "validate_alpha", "ram_sums", "ram_loss", "dpo_loss", "validate_dpo",
                      "trra_loss", "trra_teacher_logprobs", "trra_topk_teacher", "TopKTeacher"]
