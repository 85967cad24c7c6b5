"""The KV caches of ``ramjax.model``, in its two layouts, with their initial values and shardings.

``KVCache`` is stacked on a leading ``layers`` axis like the weights (``model.forward`` scans over both: prefill,
training-time evaluation, InRa). ``LayerKVCache`` holds one K and one V buffer per layer, the layout of
``model.decode_forward`` that the sampler decodes with (see the note above ``LayerKVCache``). Both advance one
``index`` (a scalar, or one per row for speculative decoding's per-row rollback).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ramjax import sharding as shd

if TYPE_CHECKING:
    from ramjax.model import ModelConfig

Rules = Sequence[tuple[str, Any]]

__all__ = ["KVCache", "CACHE_LOGICAL_AXES", "init_cache", "cache_shardings", "LayerKVCache", "init_layer_cache",
           "layer_cache_shardings"]


@flax.struct.dataclass
class KVCache:
    """Key/value cache for both prefill and single-token decode.

    k, v:        ``[layers, batch, max_len, kv_heads, head_dim]``
    segment_ids: ``[batch, max_len]`` segment of each written slot (0 = padding or not yet written)
    index:       scalar int32, the next slot to write (all rows advance in lockstep; prompts are left-padded), or
                 int32 ``[batch]``, one next slot per row: each row writes its chunk at its own offset, and slots
                 beyond a row's index are stale (never attended: a query sees only slots up to its own). Speculative
                 decoding rolls a row back by lowering its index.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


CACHE_LOGICAL_AXES = KVCache(
    k=("cache_layers", "cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim"),
    v=("cache_layers", "cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim"),
    segment_ids=("cache_batch", "cache_seq"),
    index=(),
)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated)."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


def cache_shardings(mesh: Mesh, cfg: ModelConfig, batch: int, max_len: int, rules: Rules = shd.DEFAULT_RULES):
    """Shardings of a ``KVCache`` (batch over data/fsdp, kv heads over tensor)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
    return shd.tree_shardings(mesh, CACHE_LOGICAL_AXES, shapes, rules)


# Decoding with one buffer per layer
#
# ``forward`` scans over the stacked layers. In a decode step that costs, on XLA's CPU backend, a copy of every
# layer's weights (the scan slices them out of the stack) and of its KV cache (sliced out, then stacked back as the
# scan's output) per step: at SmolLM2-135M's shape the step ran at ~40% of the memory floor at batch 1 and spent
# more time on the cache than on the weights at batch 8. The sampler therefore decodes with the layers unrolled
# over per-layer buffers: ``unstack_layers`` splits the weights once, and ``LayerKVCache`` keeps one K and one V
# buffer per layer, written in place (``dynamic_update_slice`` on a donated while-loop carry) and attended over
# directly. Same ``Block``, same numerics as ``forward`` (tested); the price is a compile time that grows with
# depth. On one CPU device the per-layer weights are zero-copy views of the stacked buffers
# (``decode_loop._layer_views``; slicing the stack inside the jitted step instead made XLA's CPU backend copy every
# slice, ~12x slower in a 30-layer test); on a mesh or with a ``decode_dtype`` cast the sampler holds a copy.


@flax.struct.dataclass
class LayerKVCache:
    """The KV cache of ``decode_forward``: one buffer per layer.

    k, v:        tuples of ``num_layers`` arrays ``[batch, max_len, kv_heads, head_dim]``
    segment_ids: ``[batch, max_len]`` segment of each written slot (0 = padding or not yet written)
    index:       scalar int32, the next slot to write, or int32 ``[batch]`` one per row (as ``KVCache.index``)
    """

    k: tuple
    v: tuple
    segment_ids: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def init_layer_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> LayerKVCache:
    """An empty per-layer cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated)."""
    dtype = dtype or cfg.compute_dtype
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return LayerKVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                        segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


def layer_cache_shardings(mesh: Mesh, cfg: ModelConfig, batch: int, max_len: int,
                          rules: Rules = shd.DEFAULT_RULES) -> LayerKVCache:
    """Shardings of a ``LayerKVCache`` (batch over data/fsdp, kv heads over tensor), as ``cache_shardings``."""
    shapes = jax.eval_shape(lambda: init_layer_cache(cfg, batch, max_len))
    per_layer = CACHE_LOGICAL_AXES.k[1:]
    axes = LayerKVCache(k=(per_layer,) * cfg.num_layers, v=(per_layer,) * cfg.num_layers,
                        segment_ids=CACHE_LOGICAL_AXES.segment_ids, index=())
    return shd.tree_shardings(mesh, axes, shapes, rules)
