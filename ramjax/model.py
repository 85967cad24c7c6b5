"""The decoder-only transformer shared by the proposal P_M and the aligner Q_θ (Llama and Qwen2 families).

One Flax Linen module, used purely functionally: ``init_params`` gives a plain pytree of arrays and ``forward``
is a pure function of ``(params, tokens, positions, segment_ids, cache)``. Layers are stacked on a leading
``layers`` axis and run under ``nn.scan`` so compile time does not grow with depth; the KV cache is stacked the
same way. Every weight is declared once with its logical axes, from which shardings derive (see ``sharding.py``).

Attention masking uses segment ids only: a query attends to a key iff both carry the same segment id and the key's
slot is not after the query's. Packed sequences therefore get block-diagonal causal attention, and padding (segment
id 0) only ever attends to padding, so it never leaks into real tokens and never produces an all-masked row.
Rotary embeddings use Hugging Face's half-split layout, so checkpoint conversion is transpose/reshape only.
The KV caches (stacked, and one buffer per layer for ``decode_forward``) are in ``ramjax.kv_cache``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Protocol, Sequence, get_args

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ramjax import sharding as shd

# the caches live in kv_cache.py; ``X as X`` re-exports them, so model.KVCache, model.init_cache... keep working
from ramjax.kv_cache import CACHE_LOGICAL_AXES as CACHE_LOGICAL_AXES
from ramjax.kv_cache import KVCache as KVCache
from ramjax.kv_cache import LayerKVCache as LayerKVCache
from ramjax.kv_cache import cache_shardings as cache_shardings
from ramjax.kv_cache import init_cache as init_cache
from ramjax.kv_cache import init_layer_cache as init_layer_cache
from ramjax.kv_cache import layer_cache_shardings as layer_cache_shardings

Rules = Sequence[tuple[str, Any]]
Architecture = Literal["llama", "qwen2"]
DType = Literal["float32", "bfloat16", "float16"]
AttentionImpl = Literal["xla", "dot_product", "cudnn", "chunked", "splash"]
ARCHITECTURES = get_args(Architecture)
# How training/prefill attention is computed (single-token decode always uses the plain einsum path):
#   xla          scores [batch, kv_heads, group, q, kv] in float32 by einsum (the reference numerics)
#   dot_product  jax.nn.dot_product_attention(implementation="xla") with the segment/causal mask
#   cudnn        jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention (NVIDIA GPUs only)
#   chunked      the xla numerics one block of ``attention_chunk`` queries at a time, rematerialised in the
#                backward pass: peak score memory [batch, heads, chunk, kv] instead of [batch, heads, q, kv]
#   splash       Pallas splash attention (TPU only; segment ids and the causal mask inside the kernel)
ATTENTION_IMPLS = get_args(AttentionImpl)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling. ``rope_type`` is ``"llama3"`` (Llama-3.1 style) or ``"linear"``."""

    rope_type: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder. Frozen and hashable so it can be a static argument of ``jax.jit``.

    ``vocab_size`` is the number of embedding rows, which may exceed the tokenizer's vocabulary (padded rows).
    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype; logits and softmax are always float32.
    ``attention_impl`` / ``attention_chunk`` choose how training and prefill attention is computed (see
    ``ATTENTION_IMPLS``); ``loss_chunk_size`` > 0 has the training objectives apply the LM head to that many
    positions at a time (``loss.chunked_sums``). They change memory and speed, not the function computed.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    architecture: Architecture = "llama"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    remat: bool = False
    attention_impl: AttentionImpl = "xla"
    attention_chunk: int = 512
    loss_chunk_size: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            if getattr(self, name) < (0 if name == "vocab_size" else 1):
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; supported: {ARCHITECTURES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.attention_chunk < 1:
            raise ValueError(f"attention_chunk={self.attention_chunk} must be >= 1")
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size} must be >= 0 (0 = off)")

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # --- the ``DecoderSpec`` protocol (what the sampler needs of a model; ``inra.InraSpec`` is the other one)
    takes_lambda = False  # a class attribute, not a field: ``forward`` ignores λ

    def param_shapes(self) -> dict:
        return param_shapes(self)

    def param_shardings(self, mesh: Mesh, rules: Rules = shd.DEFAULT_RULES) -> dict:
        return param_shardings(self, mesh, rules)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> "KVCache":
        return init_cache(self, batch, max_len, dtype)

    def cache_shardings(self, mesh: Mesh, batch: int, max_len: int, rules: Rules = shd.DEFAULT_RULES) -> Any:
        return cache_shardings(mesh, self, batch, max_len, rules)

    def forward(self, params: dict, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                cache: "KVCache | None", lam: Any = None, *, last_only: bool = False, mesh: Mesh | None = None,
                rules: Rules = shd.DEFAULT_RULES) -> tuple[jax.Array, "KVCache | None"]:
        """``forward`` of this config (``lam`` is ignored: one model, nothing to mix)."""
        return forward(self, params, tokens, positions, segment_ids, cache, last_only=last_only, mesh=mesh,
                       rules=rules)


class DecoderSpec(Protocol):
    """What the sampler needs of a model's ``config``: a ``ModelConfig`` (one decoder) or an ``inra.InraSpec``
    (a base model plus an InRa adapter, two streams mixed per row by λ). Hashable (a static argument of jit)."""

    takes_lambda: bool
    vocab_size: int
    eos_token_id: int | tuple[int, ...] | None
    max_position_embeddings: int

    def param_shapes(self) -> Any: ...

    def param_shardings(self, mesh: Mesh, rules: Rules = ...) -> Any: ...

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Any: ...

    def cache_shardings(self, mesh: Mesh, batch: int, max_len: int, rules: Rules = ...) -> Any: ...

    def forward(self, params: Any, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: Any,
                lam: Any = None, *, last_only: bool = False, mesh: Mesh | None = None,
                rules: Rules = ...) -> tuple[jax.Array, Any]: ...



# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse rotary frequencies ``[head_dim // 2]``, with Llama-3 or linear scaling when configured."""
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    if rs.rope_type == "linear":
        return (inv / rs.factor).astype(np.float32)
    if rs.rope_type != "llama3":
        raise ValueError(f"rope_scaling type {rs.rope_type!r} is not supported (supported: llama3, linear)")
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_sin_cos(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin, cos tables ``[batch, seq, head_dim]`` for integer ``positions`` ``[batch, seq]`` (HF half-split)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.sin(emb), jnp.cos(emb)


def apply_rope(x_bthd: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates ``[batch, seq, heads, head_dim]`` by the half-split rule ``x*cos + rotate_half(x)*sin``."""
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    x32 = x_bthd.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x_bthd.dtype)


def attention_mask(q_seg: jax.Array, kv_seg: jax.Array, q_slot: jax.Array, kv_slot: jax.Array) -> jax.Array:
    """Boolean ``[batch, q_len, kv_len]``: same segment and key slot not after the query slot."""
    same = q_seg[:, :, None] == kv_seg[:, None, :]
    causal = kv_slot[None, None, :] <= q_slot[..., None]  # q_slot [q_len], or [batch, q_len] (per-row index)
    return same & causal


@flax.struct.dataclass
class AttnMask:
    """What the attention mask is made of, kept small so no ``[batch, q, kv]`` array need exist:
    a query attends to a key iff ``q_seg == kv_seg`` and ``kv_slot <= q_slot``.

    q_seg ``[batch, q_len]``, kv_seg ``[batch, kv_len]`` (int segment ids, 0 = padding), q_slot ``[q_len]``
    (or ``[batch, q_len]`` with a per-row cache index), kv_slot ``[kv_len]`` (int cache slots).
    ``self_attention`` (static): queries and keys are the same tokens (``q_slot == kv_slot == arange``; no cache),
    which block-sparse kernels (splash) need.
    """

    q_seg: jax.Array
    kv_seg: jax.Array
    q_slot: jax.Array
    kv_slot: jax.Array
    self_attention: bool = flax.struct.field(pytree_node=False, default=False)

    def dense(self) -> jax.Array:
        """The boolean ``[batch, q_len, kv_len]`` mask."""
        return attention_mask(self.q_seg, self.kv_seg, self.q_slot, self.kv_slot)


class AttentionImplError(ValueError):
    """The configured ``attention_impl`` cannot run here (e.g. cuDNN without an NVIDIA GPU, splash off TPU)."""


def _attend_einsum(q, k, v, mask_bts):
    """The reference: float32 scores and softmax, probabilities cast back to the compute dtype.

    q ``[B, T, H, Dh]``, k/v ``[B, S, K, Dh]``, mask ``[B, T, S]`` bool → ``[B, T, H, Dh]``."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(Dh)
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H, Dh)


def _attend_chunked(q, k, v, m: AttnMask, chunk: int):
    """``_attend_einsum`` over blocks of ``chunk`` queries (``lax.map``), each block's scores recomputed in the
    backward pass (``jax.checkpoint``) so neither pass holds more than ``[B, H, chunk, S]`` scores."""
    B, T, H, Dh = q.shape
    C = min(chunk, T)
    n = -(-T // C)
    pad = n * C - T
    q_seg, q_slot = m.q_seg, m.q_slot
    if pad:  # padded queries get segment -1: they attend to nothing real and are dropped below
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_seg = jnp.pad(q_seg, ((0, 0), (0, pad)), constant_values=-1)
        q_slot = jnp.pad(q_slot, (0, pad))
    q_c = q.reshape(B, n, C, H, Dh).swapaxes(0, 1)
    seg_c = q_seg.reshape(B, n, C).swapaxes(0, 1)
    slot_c = q_slot.reshape(n, C)

    @jax.checkpoint
    def block(xs):
        qb, segb, slotb = xs
        return _attend_einsum(qb, k, v, attention_mask(segb, m.kv_seg, slotb, m.kv_slot))

    out = jax.lax.map(block, (q_c, seg_c, slot_c))  # [n, B, C, H, Dh]
    return out.swapaxes(0, 1).reshape(B, n * C, H, Dh)[:, :T]


def _attend_dot_product(q, k, v, m: AttnMask, implementation: str):
    try:
        return jax.nn.dot_product_attention(q, k, v, mask=m.dense()[:, None], implementation=implementation)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        if implementation == "cudnn":
            raise AttentionImplError(
                f"attention_impl=cudnn failed on backend {jax.default_backend()!r} ({e}); cuDNN flash attention "
                f"needs an NVIDIA GPU with cuDNN >= 8.9 and float16/bfloat16 compute (model.dtype=bfloat16). Use "
                f"model.attention_impl=chunked (any backend) or dot_product instead") from e
        raise


def _attend_splash(q, k, v, m: AttnMask, block: int, mesh: Mesh | None, rules: Rules):
    """Pallas splash attention (TPU): causal + segment-id masking inside the kernel, GQA as one MQA kernel per kv
    head. Under a mesh it runs per shard (``shard_map``: batch over the batch axes, kv heads over ``tensor``)."""
    if not m.self_attention:  # prefill into a cache: keys are cache slots, not this block's tokens
        return _attend_chunked(q, k, v, m, block)
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    _, T, H, Dh = q.shape
    G = H // k.shape[2]
    interpret = jax.default_backend() != "tpu"
    if interpret and not _SPLASH_INTERPRET_OK:
        raise AttentionImplError(f"attention_impl=splash runs on TPUs only (backend is {jax.default_backend()!r}); "
                                 f"use model.attention_impl=chunked (any backend) or cudnn (NVIDIA GPUs)")
    bq = min(block, T)
    if T % bq or bq % 128 and bq != T:
        raise AttentionImplError(f"attention_impl=splash needs the sequence length ({T}) to be a multiple of the block "
                                 f"({bq}, model.attention_chunk; a multiple of 128 on TPU)")
    sizes = sk.BlockSizes(block_q=bq, block_kv=bq, block_kv_compute=bq, block_q_dkv=bq, block_kv_dkv=bq,
                          block_kv_dkv_compute=bq, block_q_dq=bq, block_kv_dq=bq)
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(G)])
    kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    scale = 1.0 / math.sqrt(Dh)

    def local(q, k, v, seg):
        qg = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(q.shape[0], T, k.shape[2], G, Dh)
        qg = qg.transpose(0, 2, 3, 1, 4)                     # [b, K, G, T, Dh]
        kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, K, T, Dh]

        def one(qh, kh, vh, s):
            return kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=s, kv=s))
        per_kv = jax.vmap(one, in_axes=(0, 0, 0, None))                   # over kv heads
        out = jax.vmap(per_kv, in_axes=(0, 0, 0, 0))(qg, kk, vv, seg)    # over batch: [b, K, G, T, Dh]
        return out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)

    if mesh is None:
        return local(q, k, v, m.q_seg)
    from jax.sharding import PartitionSpec as P

    batch = shd.logical_to_pspec(("act_batch",), rules)[0]
    heads = shd.logical_to_pspec(("act_kv_heads",), rules)[0]
    spec = P(batch, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec,
                         check_vma=False)(q, k, v, m.q_seg)


# Tests set this to run the splash kernel in the Pallas interpreter on CPU.
_SPLASH_INTERPRET_OK = False


def attend(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, m: AttnMask, mesh: Mesh | None = None,
           rules: Rules = shd.DEFAULT_RULES) -> jax.Array:
    """Masked multi-head attention with grouped KV heads by ``cfg.attention_impl``.

    q ``[batch, q_len, heads, head_dim]``, k/v ``[batch, kv_len, kv_heads, head_dim]`` → ``[batch, q_len, heads,
    head_dim]`` in q's dtype. Every implementation computes the same function (float tolerance); single-token
    decode steps always take the einsum path.
    """
    impl = cfg.attention_impl
    if impl == "xla" or q.shape[1] == 1 or m.q_slot.ndim == 2:  # per-row slots: short verify chunks
        return _attend_einsum(q, k, v, m.dense())
    if impl == "chunked":
        return _attend_chunked(q, k, v, m, cfg.attention_chunk)
    if impl in ("dot_product", "cudnn"):
        return _attend_dot_product(q, k, v, m, "xla" if impl == "dot_product" else "cudnn")
    return _attend_splash(q, k, v, m, cfg.attention_chunk, mesh, rules)


def _write_slots(buf: jax.Array, x: jax.Array, index: jax.Array) -> jax.Array:
    """Writes ``x`` ``[batch, T, ...]`` into ``buf`` ``[batch, max_len, ...]`` at slot ``index`` (a scalar: every
    row at the same offset; ``[batch]``: each row at its own)."""
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice_in_dim(buf, x, index, axis=1)
    if index.shape[0] == 1:  # one row: the plain in-place update (vmap batches the update into a scatter)
        return jax.lax.dynamic_update_slice_in_dim(buf, x, index[0], axis=1)
    return jax.vmap(lambda b, r, i: jax.lax.dynamic_update_slice_in_dim(b, r, i, axis=0))(buf, x, index)


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _param(module: nn.Module, name: str, shape, axes, init=None, dtype=None):
    init = init or nn.initializers.normal(0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Block(nn.Module):
    """One pre-norm decoder layer: GQA attention with rotary embeddings, then a SwiGLU MLP."""

    cfg: ModelConfig
    mesh: Mesh | None = None
    rules: Rules = shd.DEFAULT_RULES

    def _c(self, x, axes):
        return shd.constrain(x, axes, self.mesh, self.rules)

    @nn.compact
    def __call__(self, x_btd, kv, sin, cos, mask: AttnMask, cache_index):
        cfg, pd, cd = self.cfg, self.cfg.weight_dtype, self.cfg.compute_dtype
        D, H, K, Dh, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        zeros = nn.initializers.zeros

        h = RMSNorm(cfg.rms_norm_eps, pd, name="attn_norm")(x_btd)
        wq = _param(self, "wq", (D, H, Dh), ("embed", "heads", "head_dim"), dtype=pd)
        wk = _param(self, "wk", (D, K, Dh), ("embed", "kv_heads", "head_dim"), dtype=pd)
        wv = _param(self, "wv", (D, K, Dh), ("embed", "kv_heads", "head_dim"), dtype=pd)
        wo = _param(self, "wo", (H, Dh, D), ("heads", "head_dim", "embed"), dtype=pd)
        q = jnp.einsum("btd,dhk->bthk", h, wq.astype(cd))
        k = jnp.einsum("btd,dhk->bthk", h, wk.astype(cd))
        v = jnp.einsum("btd,dhk->bthk", h, wv.astype(cd))
        if cfg.qkv_bias:
            q = q + _param(self, "bq", (H, Dh), ("heads", "head_dim"), zeros, pd).astype(cd)
            k = k + _param(self, "bk", (K, Dh), ("kv_heads", "head_dim"), zeros, pd).astype(cd)
            v = v + _param(self, "bv", (K, Dh), ("kv_heads", "head_dim"), zeros, pd).astype(cd)
        q = self._c(apply_rope(q, sin, cos), ("act_batch", "act_seq", "act_heads", None))
        k = self._c(apply_rope(k, sin, cos), ("act_batch", "act_seq", "act_kv_heads", None))
        v = self._c(v, ("act_batch", "act_seq", "act_kv_heads", None))

        if kv is not None:  # write this chunk into the cache at [index, index + T) and attend over the cache
            k_cache, v_cache = kv
            k_cache = _write_slots(k_cache, k.astype(k_cache.dtype), cache_index)
            v_cache = _write_slots(v_cache, v.astype(v_cache.dtype), cache_index)
            k_all, v_all, new_kv = k_cache.astype(cd), v_cache.astype(cd), (k_cache, v_cache)
        else:
            k_all, v_all, new_kv = k, v, None

        attn = attend(cfg, q, k_all, v_all, mask, self.mesh, self.rules)
        out = jnp.einsum("bthk,hkd->btd", attn, wo.astype(cd))
        if cfg.o_bias:
            out = out + _param(self, "bo", (D,), ("embed",), zeros, pd).astype(cd)
        x_btd = self._c(x_btd + out, ("act_batch", "act_seq", "act_embed"))

        h = RMSNorm(cfg.rms_norm_eps, pd, name="mlp_norm")(x_btd)
        w_gate = _param(self, "w_gate", (D, F), ("embed", "mlp"), dtype=pd)
        w_up = _param(self, "w_up", (D, F), ("embed", "mlp"), dtype=pd)
        w_down = _param(self, "w_down", (F, D), ("mlp", "embed"), dtype=pd)
        gate = jnp.einsum("btd,df->btf", h, w_gate.astype(cd))
        up = jnp.einsum("btd,df->btf", h, w_up.astype(cd))
        if cfg.mlp_bias:
            gate = gate + _param(self, "b_gate", (F,), ("mlp",), zeros, pd).astype(cd)
            up = up + _param(self, "b_up", (F,), ("mlp",), zeros, pd).astype(cd)
        act = self._c(jax.nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
        down = jnp.einsum("btf,fd->btd", act, w_down.astype(cd))
        if cfg.mlp_bias:
            down = down + _param(self, "b_down", (D,), ("embed",), zeros, pd).astype(cd)
        x_btd = self._c(x_btd + down, ("act_batch", "act_seq", "act_embed"))
        return x_btd, new_kv


class Decoder(nn.Module):
    """Embedding, ``num_layers`` scanned ``Block``s, final norm and LM head."""

    cfg: ModelConfig
    mesh: Mesh | None = None
    rules: Rules = shd.DEFAULT_RULES

    def setup(self):
        cfg, pd = self.cfg, self.cfg.weight_dtype
        self.embed = self.param("embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                                (cfg.vocab_size, cfg.hidden_size), pd)
        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        self.layers = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})(cfg, self.mesh, self.rules)
        self.final_norm = RMSNorm(cfg.rms_norm_eps, pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param("lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                               ("embed", "vocab")),
                                      (cfg.hidden_size, cfg.vocab_size), pd)

    def embed_tokens(self, tokens_bt: jax.Array) -> jax.Array:
        x = shd.vocab_parallel_take(self.embed, tokens_bt, self.mesh, self.rules).astype(self.cfg.compute_dtype)
        return shd.constrain(x, ("act_batch", "act_seq", "act_embed"), self.mesh, self.rules)

    def run_layers(self, x_btd, positions, segment_ids, cache: KVCache | None):
        """Runs the stacked layers; returns ``(hidden [batch, seq, embed], updated cache or None)``."""
        sin, cos = rope_sin_cos(self.cfg, positions)
        T = x_btd.shape[1]
        if cache is None:
            slots = jnp.arange(T)
            mask = AttnMask(segment_ids, segment_ids, slots, slots, self_attention=True)
            x_btd, _ = self.layers(x_btd, None, sin, cos, mask, 0)
            return x_btd, None
        kv_seg = _write_slots(cache.segment_ids, segment_ids.astype(jnp.int32), cache.index)
        mask = AttnMask(segment_ids, kv_seg, cache.index[..., None] + jnp.arange(T), jnp.arange(cache.max_len))
        x_btd, (k, v) = self.layers(x_btd, (cache.k, cache.v), sin, cos, mask, cache.index)
        return x_btd, KVCache(k=k, v=v, segment_ids=kv_seg, index=cache.index + T)

    def head(self, x_btd: jax.Array, w_dv: jax.Array | None = None) -> jax.Array:
        """Final norm and LM head: float32 logits ``[batch, seq, vocab_size]``. ``w_dv`` ``[embed, vocab]``, when
        given, is the output projection instead of the model's own: a tied model's embedding transposed, which
        ``decode_loop`` holds on CPU, where XLA multiplies by a ``[vocab, embed]`` matrix contracted on its minor
        axis 1.3-2x slower (same logits up to float rounding: the sums run in another order)."""
        h = self.final_norm(x_btd)
        cd = self.cfg.compute_dtype
        if w_dv is None and self.cfg.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", h, self.embed.astype(cd), preferred_element_type=jnp.float32)
        else:
            w = self.lm_head if w_dv is None else w_dv
            logits = jnp.einsum("btd,dv->btv", h, w.astype(cd), preferred_element_type=jnp.float32)
        return shd.constrain(logits, ("act_batch", "act_seq", "act_vocab"), self.mesh, self.rules)

    def __call__(self, tokens_bt, positions_bt, segment_ids_bt, cache: KVCache | None = None,
                 last_only: bool = False):
        x = self.embed_tokens(tokens_bt)
        x, cache = self.run_layers(x, positions_bt, segment_ids_bt, cache)
        if last_only:
            x = x[:, -1:, :]
        return self.head(x), cache


# ----------------------------------------------------------------------------------------------------------------
# Pure functional API


def _dummy_inputs():
    t = jnp.zeros((1, 1), jnp.int32)
    return t, t, jnp.ones((1, 1), jnp.int32)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random parameters (plain pytree of arrays, no logical-axis boxes)."""
    return nn.unbox(Decoder(cfg).init(key, *_dummy_inputs())["params"])


def param_shapes(cfg: ModelConfig) -> dict:
    """``ShapeDtypeStruct`` pytree of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def param_logical_axes(cfg: ModelConfig) -> dict:
    """Pytree (same structure as the params) of logical-axis tuples, e.g. ``("layers", "embed", "heads", ...)``."""
    boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), *_dummy_inputs())["params"])
    return jax.tree_util.tree_map(lambda b: tuple(b.names), boxed,
                                  is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = shd.DEFAULT_RULES) -> dict:
    """``NamedSharding`` pytree of the parameters on ``mesh``; errors name any parameter that does not divide."""
    return shd.tree_shardings(mesh, param_logical_axes(cfg), param_shapes(cfg), rules)


def init_params_sharded(cfg: ModelConfig, key: jax.Array, mesh: Mesh, rules: Rules = shd.DEFAULT_RULES) -> dict:
    """Random parameters created directly in their shards (no host ever holds the full tree)."""
    return jax.jit(lambda k: init_params(cfg, k), out_shardings=param_shardings(cfg, mesh, rules))(key)


def count_params(params_or_shapes: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params_or_shapes)))


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, cache: KVCache | None = None, *, last_only: bool = False,
            mesh: Mesh | None = None, rules: Rules = shd.DEFAULT_RULES) -> tuple[jax.Array, KVCache | None]:
    """Logits for ``tokens`` ``[batch, seq]``.

    positions:   ``[batch, seq]`` rotary positions (default ``0..seq-1``; reset per segment when packing).
    segment_ids: ``[batch, seq]`` int, 0 for padding (default all ones).
    cache:       if given, the tokens are written at ``cache.index`` and attend to everything cached before them.
    Returns float32 logits ``[batch, seq (1 if last_only), vocab_size]`` and the updated cache (or None).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    return Decoder(cfg, mesh, rules).apply({"params": params}, tokens, positions, segment_ids, cache,
                                           last_only=last_only)


def hidden_states(cfg: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None, *, mesh: Mesh | None = None,
                  rules: Rules = shd.DEFAULT_RULES) -> jax.Array:
    """The last layer's output ``[batch, seq, hidden]`` (compute dtype; before the final norm), so that callers can
    apply the LM head to a few positions at a time (``logits_from_hidden``; see ``loss.chunked_sums``)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)

    def run(mdl, t, p, s):
        return mdl.run_layers(mdl.embed_tokens(t), p, s, None)[0]

    return Decoder(cfg, mesh, rules).apply({"params": params}, tokens, positions, segment_ids, method=run)


def logits_from_hidden(cfg: ModelConfig, params: dict, hidden_btd: jax.Array, *, mesh: Mesh | None = None,
                       rules: Rules = shd.DEFAULT_RULES) -> jax.Array:
    """Final norm and LM head on ``hidden_states``' output: float32 logits ``[batch, seq, vocab_size]``;
    ``forward(...)[0] == logits_from_hidden(hidden_states(...))``."""
    return Decoder(cfg, mesh, rules).apply({"params": params}, hidden_btd, method=Decoder.head)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Rotary positions ``[batch, seq]`` that restart at 0 at the start of each segment (padding gets 0)."""
    seg = jnp.asarray(segment_ids)
    idx = jnp.arange(seg.shape[1])
    start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(start, idx[None, :], 0), axis=1)
    return jnp.where(seg > 0, idx[None, :] - start_idx, 0).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# Decoding with one buffer per layer (``kv_cache.LayerKVCache``): the sampler's decode layout


def unstack_layers(params: dict) -> dict:
    """The same weights with ``params["layers"]`` (stacked ``[num_layers, ...]``) split into a tuple of per-layer
    trees: the parameter layout of ``decode_forward`` (a copy of the layer weights)."""
    layers = params["layers"]
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    per = tuple(jax.tree_util.tree_map(lambda x, i=i: x[i], layers) for i in range(n))
    return {**{k: v for k, v in params.items() if k != "layers"}, "layers": per}


def unstacked_param_shapes(cfg: ModelConfig) -> dict:
    """``ShapeDtypeStruct`` pytree of ``unstack_layers(params)``."""
    return jax.eval_shape(unstack_layers, param_shapes(cfg))


def unstacked_param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = shd.DEFAULT_RULES) -> dict:
    """``NamedSharding`` pytree of ``unstack_layers(params)``: each layer sharded as its slice of the stack."""
    axes = param_logical_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
    layer_axes = jax.tree_util.tree_map(lambda t: t[1:], axes["layers"], is_leaf=is_axes)
    axes_u = {**{k: v for k, v in axes.items() if k != "layers"}, "layers": (layer_axes,) * cfg.num_layers}
    return shd.tree_shardings(mesh, axes_u, unstacked_param_shapes(cfg), rules)


def with_transposed_head(cfg: ModelConfig, params: dict) -> dict:
    """``params`` (either layout) plus ``head_t``, a ``[embed, vocab]`` copy of a tied model's embedding, for
    ``decode_forward``'s LM head; unchanged for an untied model (its ``lm_head`` is ``[embed, vocab]`` already).
    Worth its memory (vocab × embed more) on XLA's CPU backend only: there a single-token head step over the
    ``[vocab, embed]`` embedding, contracted on its minor axis, ran 1.3-2x slower than over the copy (measured at
    V = 49152, D = 384 / 576, batch 1 and 8)."""
    if not cfg.tie_word_embeddings or "head_t" in params:
        return params
    return {**params, "head_t": jnp.transpose(params["embed"])}


def decode_forward(cfg: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array,
                   segment_ids: jax.Array, cache: LayerKVCache, *, last_only: bool = True, mesh: Mesh | None = None,
                   rules: Rules = shd.DEFAULT_RULES) -> tuple[jax.Array, LayerKVCache]:
    """``forward`` with a cache, over ``unstack_layers(params)`` and a ``LayerKVCache``: the tokens ``[batch,
    seq]`` are written at ``cache.index`` and attend to everything cached before them. Returns float32 logits
    ``[batch, seq (1 if last_only), vocab_size]`` and the updated cache. ``params`` may also hold ``head_t``
    ``[embed, vocab]``, a tied model's embedding transposed (``with_transposed_head``): the LM head then multiplies
    by it instead of by the embedding (same logits up to float rounding)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    top = {"params": {k: v for k, v in params.items() if k not in ("layers", "head_t")}}
    dec = Decoder(cfg, mesh, rules)
    x = dec.apply(top, tokens, method=Decoder.embed_tokens)
    sin, cos = rope_sin_cos(cfg, positions)
    T = tokens.shape[1]
    kv_seg = _write_slots(cache.segment_ids, segment_ids.astype(jnp.int32), cache.index)
    mask = AttnMask(segment_ids, kv_seg, cache.index[..., None] + jnp.arange(T), jnp.arange(cache.max_len))
    block = Block(cfg, mesh, rules)
    ks, vs = [], []
    for lp, k, v in zip(params["layers"], cache.k, cache.v):
        x, (k, v) = block.apply({"params": lp}, x, (k, v), sin, cos, mask, cache.index)
        ks.append(k)
        vs.append(v)
    if last_only:
        x = x[:, -1:, :]
    # head_t: a tied head held transposed, [embed, vocab] (decode_loop._decode_weights, CPU); None otherwise
    logits = dec.apply(top, x, params.get("head_t"), method=Decoder.head)
    return logits, LayerKVCache(k=tuple(ks), v=tuple(vs), segment_ids=kv_seg, index=cache.index + T)
