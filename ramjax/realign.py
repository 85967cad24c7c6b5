"""Flexible Realignment (arXiv 2506.12704): training-time realignment (TrRa) and the InRa layer adapter.

**TrRa.** A frozen reference model (logits ``h_ref``) and a frozen aligned model (``h_align``) define, at every
response position, the teacher ``softmax_vocab((λ·h_align + (1−λ)·h_ref) / T)``; λ > 1 extrapolates past the
aligned model, λ < 0 away from it. A student (initialised from the reference) is trained to match the teacher by
KL on response tokens. ``trra_teacher_logprobs`` builds the teacher, ``trra_loss`` returns ``(kl_sum, count,
metric sums)`` like every objective in ``ramjax.loss``; ``trra_topk_teacher`` stores the teacher as its top-k
log-probs plus one bucket holding the rest of the mass, for when a full ``[B, T, V]`` teacher does not fit.

**InRa.** ``build_adapter`` copies the bottom decoder layer and zeroes its attention-output and MLP-down
projections (weights and biases), so inserted below layer 0 it is the identity (each sub-block is residual:
``x + 0``). Only the adapter trains (``adapter_forward`` is the L+1-layer model as a function of the adapter, with
the base params frozen). At inference ``inra_forward`` runs two streams through the shared layers — embedding →
adapter → L layers, and embedding → L layers — and mixes the logits per row: ``(1−λ_b)·h_bypass + λ_b·h_adapter``.
The two streams share one stacked KV cache of ``2B`` rows (row ``2b`` = adapter stream of example b, ``2b+1`` =
bypass stream), so the L layers run once over a doubled batch and a row's two streams stay on the same device
under batch sharding; the adapter layer has its own one-layer cache.

Export: ``merge_adapter`` gives the plain ``L+1``-layer params (adapter as layer 0), ``export_inra_hf`` writes them
as a Hugging Face checkpoint, ``save_adapter``/``load_adapter`` the adapter alone (one small safetensors file).

Where it plugs in: ``train.py`` stage ``trra`` (``trra.iterations`` for iterated TrRa) and ``inra.enabled=true``
(train only the adapter, with any stage's objective); ``ramjax.sample(..., mode="inra", inra_lambda=...)`` with the
proposal slot holding ``inra_model(base, adapter)`` / ``load_inra_model(base_dir, adapter_file)`` (an ``InraSpec``
config); ``sample.py mode=inra adapter=FILE lambda=...``; ``inra_sweep`` / ``lambda_sweep`` for λ sweeps.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ramjax import model as model_lib
from ramjax import sharding as shd
from ramjax.model import KVCache, ModelConfig

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, Any]]
ADAPTER_FORMAT = "ramjax-inra-adapter-v1"
# Projections that write into the residual stream; zeroed so the fresh adapter layer is the identity.
_ZEROED = ("wo", "bo", "w_down", "b_down")


class RealignError(ValueError):
    """Bad input to a realignment function (shapes, direction, adapter file, λ)."""


# ================================================================================================================
# TrRa: training-time realignment


def _as_lam(lam: Any, batch: int) -> jax.Array:
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
    l = _as_lam(lam, h_ref.shape[0])
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


# ================================================================================================================
# InRa: the identity-initialised layer adapter


def _decoder(cfg: ModelConfig, mesh: Mesh | None, rules: Rules) -> model_lib.Decoder:
    return model_lib.Decoder(cfg, mesh, rules)


def _with_layers(params: dict, layers: dict) -> dict:
    return {**params, "layers": layers}


def _stack1(adapter: dict) -> dict:
    return jax.tree_util.tree_map(lambda x: x[None], adapter)


def build_adapter(cfg: ModelConfig, params: dict) -> dict:
    """The fresh InRa adapter: layer 0 of ``params["layers"]`` with ``wo``, ``w_down`` (and ``bo``, ``b_down``) zeroed.

    Returns one layer's params (the leaves of ``params["layers"]`` without the leading layers axis). Inserted
    below layer 0 it is the identity, because both of its sub-blocks add zero to the residual stream; the copied
    norms and q/k/v/gate/up projections give the gradients a non-degenerate starting point.
    """
    layers = params["layers"]
    lead = {x.shape[0] for x in jax.tree_util.tree_leaves(layers)}
    if lead != {cfg.num_layers}:
        raise RealignError(f"params['layers'] has leading sizes {sorted(lead)}, expected cfg.num_layers="
                           f"{cfg.num_layers}; pass the params that belong to cfg")

    def take(path, x):
        name = getattr(path[-1], "key", None)
        x0 = x[0]
        return jnp.zeros_like(x0) if name in _ZEROED else jnp.array(x0, copy=True)

    return jax.tree_util.tree_map_with_path(take, layers)


def adapter_logical_axes(cfg: ModelConfig) -> dict:
    """Logical axes of the adapter (those of one layer: the params' ``layers`` axes without ``"layers"``)."""
    return jax.tree_util.tree_map(lambda a: tuple(a[1:]), model_lib.param_logical_axes(cfg)["layers"],
                                  is_leaf=lambda x: isinstance(x, tuple))


def adapter_shapes(cfg: ModelConfig) -> dict:
    """``ShapeDtypeStruct`` pytree of the adapter (one layer of ``cfg``), without allocating it."""
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype),
                                  model_lib.param_shapes(cfg)["layers"])


def adapter_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = shd.DEFAULT_RULES) -> dict:
    """``NamedSharding`` pytree of the adapter on ``mesh`` (same rules as the base layers)."""
    return shd.tree_shardings(mesh, adapter_logical_axes(cfg), adapter_shapes(cfg), rules)


def merge_adapter(cfg: ModelConfig, params: dict, adapter: dict) -> tuple[ModelConfig, dict]:
    """The adapted model as plain params: ``(cfg with num_layers = L+1, params with the adapter as layer 0)``."""
    layers = jax.tree_util.tree_map(lambda a, l: jnp.concatenate([a[None].astype(l.dtype), l], axis=0),
                                    adapter, params["layers"])
    return cfg.replace(num_layers=cfg.num_layers + 1), _with_layers(params, layers)


def _run_adapter(cfg, params, adapter, x, positions, segment_ids, cache, mesh, rules):
    cfg1 = cfg.replace(num_layers=1)
    return _decoder(cfg1, mesh, rules).apply({"params": _with_layers(params, _stack1(adapter))}, x, positions,
                                             segment_ids, cache, method="run_layers")


def _defaults(tokens, positions, segment_ids):
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    return tokens, positions, segment_ids


def adapter_forward(cfg: ModelConfig, params: dict, adapter: dict, tokens: jax.Array,
                    positions: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
                    mesh: Mesh | None = None, rules: Rules = shd.DEFAULT_RULES) -> jax.Array:
    """Logits ``[B, T, V]`` of the adapted (L+1-layer) model: embedding → adapter → L layers → head.

    The training forward of InRa: differentiate with respect to ``adapter`` only (the base ``params`` are held
    under ``stop_gradient``), so an optimizer built on the adapter pytree keeps state for the adapter alone.
    Equals ``model.forward`` of ``merge_adapter(cfg, params, adapter)`` without copying the stacked weights.
    """
    tokens, positions, segment_ids = _defaults(tokens, positions, segment_ids)
    params = jax.lax.stop_gradient(params)
    dec = _decoder(cfg, mesh, rules)
    x = dec.apply({"params": params}, tokens, method="embed_tokens")
    x, _ = _run_adapter(cfg, params, adapter, x, positions, segment_ids, None, mesh, rules)
    x, _ = dec.apply({"params": params}, x, positions, segment_ids, None, method="run_layers")
    return dec.apply({"params": params}, x, method="head")


@flax.struct.dataclass
class InraCache:
    """KV caches of the two-stream InRa model.

    adapter: one-layer ``KVCache`` of the adapter layer, batch B.
    streams: ``KVCache`` of the L shared layers, batch 2B: row ``2b`` is example b's adapter stream, ``2b+1`` its
             bypass stream (interleaved so that both streams of a row live on the same device under batch sharding).
    """

    adapter: KVCache
    streams: KVCache

    @property
    def index(self) -> jax.Array:
        return self.adapter.index

    @property
    def max_len(self) -> int:
        return self.adapter.max_len


def init_inra_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> InraCache:
    """Empty caches for ``batch`` rows of up to ``max_len`` tokens."""
    return InraCache(adapter=model_lib.init_cache(cfg.replace(num_layers=1), batch, max_len, dtype),
                     streams=model_lib.init_cache(cfg, 2 * batch, max_len, dtype))


INRA_CACHE_LOGICAL_AXES = InraCache(adapter=model_lib.CACHE_LOGICAL_AXES, streams=model_lib.CACHE_LOGICAL_AXES)


def inra_cache_shardings(mesh: Mesh, cfg: ModelConfig, batch: int, max_len: int,
                         rules: Rules = shd.DEFAULT_RULES) -> InraCache:
    """Shardings of an ``InraCache`` (batch rows over data/fsdp, kv heads over tensor)."""
    shapes = jax.eval_shape(lambda: init_inra_cache(cfg, batch, max_len))
    return shd.tree_shardings(mesh, INRA_CACHE_LOGICAL_AXES, shapes, rules)


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """``[B, ...]`` × 2 → ``[2B, ...]`` with rows a0, b0, a1, b1, ..."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def inra_stream_logits(cfg: ModelConfig, params: dict, adapter: dict, tokens: jax.Array,
                       positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                       cache: InraCache | None = None, *, last_only: bool = False, mesh: Mesh | None = None,
                       rules: Rules = shd.DEFAULT_RULES) -> tuple[jax.Array, jax.Array, InraCache | None]:
    """Both streams' logits: ``(h_adapter [B, T', V], h_bypass [B, T', V], updated cache or None)``.

    T' is 1 with ``last_only`` (decode steps and prefill), else T. With ``cache``, the tokens are written at
    ``cache.index`` and attend to everything cached before them (as ``model.forward``).
    """
    tokens, positions, segment_ids = _defaults(tokens, positions, segment_ids)
    dec = _decoder(cfg, mesh, rules)
    p = {"params": params}
    x = dec.apply(p, tokens, method="embed_tokens")
    xa, ad_cache = _run_adapter(cfg, params, adapter, x, positions, segment_ids,
                                None if cache is None else cache.adapter, mesh, rules)
    # One pass of the L shared layers over both streams (a doubled batch) instead of two passes.
    x2 = shd.constrain(_interleave(xa, x), ("act_batch", "act_seq", "act_embed"), mesh, rules)
    h2, st_cache = dec.apply(p, x2, _interleave(positions, positions), _interleave(segment_ids, segment_ids),
                             None if cache is None else cache.streams, method="run_layers")
    if last_only:
        h2 = h2[:, -1:, :]
    logits2 = dec.apply(p, h2, method="head")
    B = tokens.shape[0]
    logits2 = logits2.reshape((B, 2) + logits2.shape[1:])
    new_cache = None if cache is None else InraCache(adapter=ad_cache, streams=st_cache)
    return logits2[:, 0], logits2[:, 1], new_cache


def mix_logits(h_adapter: jax.Array, h_bypass: jax.Array, lam: Any) -> jax.Array:
    """``(1−λ_b)·h_bypass + λ_b·h_adapter`` per row b, float32 ``[B, T, V]``; lam is a scalar or ``[B]``."""
    l = _as_lam(lam, h_adapter.shape[0])
    h_a, h_b = h_adapter.astype(jnp.float32), h_bypass.astype(jnp.float32)
    return h_b + l * (h_a - h_b)  # exact at λ = 0 (the base model) and λ = 1 (the adapted model)


def inra_forward(cfg: ModelConfig, params: dict, adapter: dict, tokens: jax.Array,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 caches: InraCache | None = None, lam: Any = 1.0, *, last_only: bool = False,
                 mesh: Mesh | None = None, rules: Rules = shd.DEFAULT_RULES) -> tuple[jax.Array, InraCache | None]:
    """InRa logits ``(1−λ_b)·h_bypass + λ_b·h_adapter``, float32 ``[B, T (1 if last_only), V]``, and the caches.

    tokens/positions/segment_ids: ``[B, T]`` as in ``model.forward``; caches: an ``InraCache`` (``init_inra_cache``)
    or None for a cache-free full forward. lam: scalar or ``[B]``, one λ per row (a traced array: changing it
    does not recompile). λ = 0 is the base model, λ = 1 the adapted model, other values interpolate/extrapolate.
    """
    h_a, h_b, caches = inra_stream_logits(cfg, params, adapter, tokens, positions, segment_ids, caches,
                                          last_only=last_only, mesh=mesh, rules=rules)
    return mix_logits(h_a, h_b, lam), caches


# ------------------------------------------------------------------------------------------------------------
# The InRa model as one sampler slot


@dataclasses.dataclass(frozen=True)
class InraSpec:
    """Stands in for a ``ModelConfig`` where a decoder holds one model: the base architecture plus an adapter.

    Hashable (a static argument of ``jax.jit``); attribute reads it does not define (``vocab_size``,
    ``max_position_embeddings``, ``eos_token_id`` ...) are the base config's. Its params are
    ``{"base": base params, "adapter": adapter}`` and its cache an ``InraCache``; ``forward`` takes λ per row.
    """

    base: ModelConfig

    def __getattr__(self, name: str) -> Any:
        if name == "base":  # not yet set (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.base, name)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> InraCache:
        return init_inra_cache(self.base, batch, max_len, dtype)

    def cache_shardings(self, mesh: Mesh, batch: int, max_len: int, rules: Rules = shd.DEFAULT_RULES) -> InraCache:
        return inra_cache_shardings(mesh, self.base, batch, max_len, rules)

    def param_shapes(self) -> dict:
        return {"base": model_lib.param_shapes(self.base), "adapter": adapter_shapes(self.base)}

    def param_shardings(self, mesh: Mesh, rules: Rules = shd.DEFAULT_RULES) -> dict:
        return {"base": model_lib.param_shardings(self.base, mesh, rules),
                "adapter": adapter_shardings(self.base, mesh, rules)}

    def forward(self, params: dict, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                cache: InraCache | None, lam: Any, *, last_only: bool = False, mesh: Mesh | None = None,
                rules: Rules = shd.DEFAULT_RULES) -> tuple[jax.Array, InraCache | None]:
        """``inra_forward`` with this spec's base config and ``params = {"base", "adapter"}``."""
        return inra_forward(self.base, params["base"], params["adapter"], tokens, positions, segment_ids, cache,
                            lam, last_only=last_only, mesh=mesh, rules=rules)


def inra_model(model: Any, adapter: dict) -> Any:
    """An ``api.Model`` whose config is an ``InraSpec`` and params ``{"base", "adapter"}``: the base ``model`` (an
    ``api.Model``) with ``adapter``, for ``sampler.sample(..., mode="inra")``. On a mesh the adapter is placed with
    the base layers' shardings."""
    from ramjax import api

    if not isinstance(model.config, ModelConfig):
        raise RealignError("inra_model needs a plain base model (its config a ModelConfig)")
    if model.mesh is not None:
        adapter = jax.device_put(adapter, adapter_shardings(model.config, model.mesh))
    return api.Model(config=InraSpec(model.config), params={"base": model.params, "adapter": adapter},
                     tokenizer=model.tokenizer, vocab_limit=model.vocab_limit, mesh=model.mesh, source=model.source)


def load_inra_model(base_path: str | os.PathLike, adapter_path: str | os.PathLike, *, mesh: Mesh | None = None,
                    rules: Rules = shd.DEFAULT_RULES) -> Any:
    """Loads a base model directory (Hugging Face or ramjax) and an adapter file (``save_adapter``) as one InRa
    ``api.Model`` (see ``inra_model``); the adapter is checked against the base architecture."""
    from ramjax import api

    base = api.load_model(base_path, mesh=mesh, rules=rules)
    return inra_model(base, load_adapter(adapter_path, base.config))


# ------------------------------------------------------------------------------------------------------------
# Adapter files


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _adapter_shapes(cfg: ModelConfig) -> dict:
    return jax.tree_util.tree_map(lambda s: (tuple(s.shape[1:]), s.dtype), model_lib.param_shapes(cfg)["layers"])


def save_adapter(path: str | os.PathLike, adapter: dict, cfg: ModelConfig | None = None) -> None:
    """Writes the adapter to one safetensors file (names like ``wq``, ``attn_norm.scale``).

    With ``cfg``, the base model's architecture is stored in the file's metadata and checked by ``load_adapter``.
    """
    from safetensors.numpy import save_file

    flat = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in _flatten(adapter).items()}
    meta = {"format": ADAPTER_FORMAT}
    if cfg is not None:
        meta["base_config"] = json.dumps({k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "architecture", "qkv_bias", "o_bias", "mlp_bias")})
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(flat, path, metadata=meta)
    log.info("saved InRa adapter (%d tensors, %d parameters) to %s", len(flat),
             sum(int(np.prod(v.shape)) for v in flat.values()), path)


def load_adapter(path: str | os.PathLike, cfg: ModelConfig | None = None) -> dict:
    """Reads an adapter written by ``save_adapter``; with ``cfg`` checks every name and shape against the model.

    Raises ``RealignError`` naming the mismatch (missing/extra tensors, wrong shapes, different base model).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RealignError(f"adapter file {path!r} does not exist; write one with ramjax.realign.save_adapter")
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        flat = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != ADAPTER_FORMAT:
        raise RealignError(f"{path!r} is not an InRa adapter file (metadata format {meta.get('format')!r}, expected "
                           f"{ADAPTER_FORMAT!r})")
    adapter = _unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    if cfg is not None:
        want = _flatten(_adapter_shapes(cfg))
        missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
        if missing or extra:
            raise RealignError(f"adapter {path!r} does not fit the model: missing {missing}, unexpected {extra} "
                               f"(was it built for a model with other bias settings?)")
        for k, (shape, _) in want.items():
            if tuple(flat[k].shape) != shape:
                raise RealignError(f"adapter {path!r}: tensor {k!r} has shape {tuple(flat[k].shape)}, the model "
                                   f"needs {shape} (different hidden/head sizes)")
        if "base_config" in meta:
            base = json.loads(meta["base_config"])
            diff = {k: (v, getattr(cfg, k)) for k, v in base.items() if k != "num_layers" and getattr(cfg, k) != v}
            if diff:
                raise RealignError(f"adapter {path!r} was built for another architecture: (file, model) = {diff}")
        adapter = jax.tree_util.tree_map(lambda x, s: x.astype(s[1]), adapter, _adapter_shapes(cfg),
                                         is_leaf=lambda x: isinstance(x, jax.Array))
    return adapter


def export_inra_hf(path: str | os.PathLike, cfg: ModelConfig, params: dict, adapter: dict,
                   tokenizer_dir: str | os.PathLike | None = None) -> ModelConfig:
    """Writes the adapted model (L+1 layers, the adapter as layer 0) as a Hugging Face checkpoint.

    The result is an ordinary Llama/Qwen2 directory that ``transformers`` loads; its logits equal InRa's at λ = 1.
    Returns the exported model's config.
    """
    from ramjax import hf

    cfg1, merged = merge_adapter(cfg, params, adapter)
    hf.save_hf(path, cfg1, merged, tokenizer_dir=tokenizer_dir)
    return cfg1


# ------------------------------------------------------------------------------------------------------------
# λ sweeps


def lambda_sweep(lams: Iterable[float], run: Callable[[float], Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Calls ``run(λ)`` for each λ and returns the rows ``{"lambda": λ, **run(λ)}`` (e.g. accuracy, length).

    ``run`` typically samples with InRa at that λ (see ``inra_sweep``) or trains/loads a TrRa student for it and
    scores the outputs; keeping the loop here gives the evaluation one table format for InRa and TrRa sweeps.
    """
    rows = []
    for lam in lams:
        row = {"lambda": float(lam)}
        row.update(run(float(lam)))
        log.info("lambda sweep: %s", {k: v for k, v in row.items() if k != "results"})
        rows.append(row)
    return rows


def inra_sweep(model: Any, prompts: Sequence[Any], lams: Iterable[float],
               score: Callable[[int, Any], float] | None = None, **sample_kwargs: Any) -> list[dict[str, Any]]:
    """Samples ``prompts`` with the InRa ``model`` (``inra_model``/``load_inra_model``) at every λ.

    Every λ uses the same seed, so prompt i gets the same random numbers at each λ (common random numbers: the
    differences between rows come from λ, not from sampling noise); λ is a traced array, so the decode loop
    compiles once for the whole sweep. Returns one row per λ: ``mean_length`` (generated tokens), ``eos_rate``
    and, with ``score(prompt_index, SampleResult) -> float`` (e.g. a task judge), ``mean_score``; ``results`` holds
    the ``SampleResult`` lists.
    """
    from ramjax import sampler

    def run(lam: float) -> dict[str, Any]:
        results = sampler.sample(model, None, prompts, mode="inra", inra_lambda=lam, **sample_kwargs)
        flat = [(i, r) for i, per in enumerate(results) for r in per]
        row: dict[str, Any] = {"mean_length": float(np.mean([r.length for _, r in flat])),
                               "eos_rate": float(np.mean([r.finish_reason == "eos" for _, r in flat]))}
        if score is not None:
            row["mean_score"] = float(np.mean([score(i, r) for i, r in flat]))
        row["results"] = results
        return row

    return lambda_sweep(lams, run)


__all__ = ["RealignError", "trra_teacher_logits", "trra_teacher_logprobs", "TopKTeacher", "trra_topk_teacher",
           "trra_loss", "build_adapter", "adapter_shapes", "adapter_logical_axes", "adapter_shardings",
           "merge_adapter", "adapter_forward", "InraCache", "init_inra_cache", "inra_cache_shardings",
           "inra_stream_logits", "mix_logits", "inra_forward", "InraSpec", "inra_model", "load_inra_model",
           "save_adapter", "load_adapter", "export_inra_hf", "lambda_sweep", "inra_sweep"]
