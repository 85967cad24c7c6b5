"""InRa, inference-time realignment (Flexible Realignment, arXiv 2506.12704): the identity-initialised layer adapter.

``build_adapter`` copies the bottom decoder layer and zeroes its attention-output and MLP-down projections (weights
and biases), so inserted below layer 0 it is the identity (each sub-block is residual: ``x + 0``). Only the adapter
trains (``adapter_forward`` is the L+1-layer model as a function of the adapter, with the base params frozen). At
inference ``inra_forward`` runs two streams through the shared layers — embedding → adapter → L layers, and
embedding → L layers — and mixes the logits per row: ``(1−λ_b)·h_bypass + λ_b·h_adapter``. The two streams share
one stacked KV cache of ``2B`` rows (row ``2b`` = adapter stream of example b, ``2b+1`` = bypass stream), so the L
layers run once over a doubled batch and a row's two streams stay on the same device under batch sharding; the
adapter layer has its own one-layer cache.

Export: ``merge_adapter`` gives the plain ``L+1``-layer params (adapter as layer 0), ``export_inra_hf`` writes them
as a Hugging Face checkpoint, ``save_adapter``/``load_adapter`` the adapter alone (one small safetensors file).

Where it plugs in: ``train.py`` with ``inra.enabled=true`` (train only the adapter, with any stage's objective; set
up in ``ramjax.stages``); ``ramjax.sample(..., mode="inra", inra_lambda=...)`` with the proposal slot holding
``inra_model(base, adapter)`` / ``load_inra_model(base_dir, adapter_file)`` (an ``InraSpec`` config);
``sample.py mode=inra adapter=FILE lambda=...``; ``inra_sweep`` / ``lambda_sweep`` for λ sweeps. TrRa, the
training-time half of the paper, is an objective in ``ramjax.loss`` (``trra_objective``).
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
from ramjax.loss import RealignError, lam_per_row
from ramjax.model import KVCache, ModelConfig

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, Any]]
ADAPTER_FORMAT = "ramjax-inra-adapter-v1"
# Projections that write into the residual stream; zeroed so the fresh adapter layer is the identity.
_ZEROED = ("wo", "bo", "w_down", "b_down")


# ------------------------------------------------------------------------------------------------------------
# The identity-initialised layer adapter


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
    l = lam_per_row(lam, h_adapter.shape[0])
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
    """The base architecture plus an adapter, as a ``model.DecoderSpec`` (what the sampler needs of a model).

    Hashable (a static argument of ``jax.jit``). Its vocabulary, token ids and context length are the base
    config's; its params are ``{"base": base params, "adapter": adapter}`` and its cache an ``InraCache``;
    ``forward`` takes λ per row.
    """

    base: ModelConfig
    takes_lambda = True  # a class attribute, not a field

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def eos_token_id(self) -> int | tuple[int, ...] | None:
        return self.base.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.base.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.base.pad_token_id

    @property
    def max_position_embeddings(self) -> int:
        return self.base.max_position_embeddings

    @property
    def compute_dtype(self) -> Any:
        return self.base.compute_dtype

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
        raise RealignError(f"adapter file {path!r} does not exist; write one with ramjax.inra.save_adapter")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own SafetensorError (and OSError) for bad files
        raise RealignError(f"adapter file {path!r} is not a readable safetensors file ({type(e).__name__}: {e}); "
                           f"pass the adapter.safetensors written by an inra.enabled training run (it may be "
                           f"truncated: rerun that run to write it again)") from None
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


__all__ = ["RealignError", "build_adapter", "adapter_shapes", "adapter_logical_axes", "adapter_shardings",
           "merge_adapter", "adapter_forward", "InraCache", "init_inra_cache", "inra_cache_shardings",
           "inra_stream_logits", "mix_logits", "inra_forward", "InraSpec", "inra_model", "load_inra_model",
           "save_adapter", "load_adapter", "export_inra_hf", "lambda_sweep", "inra_sweep"]
