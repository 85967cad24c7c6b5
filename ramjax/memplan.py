"""Plan by numbers: per-device memory of a run's compiled programs on a mesh, from abstract shapes only.

``train.py CONFIG --dry-run`` (``train_lib.dry_run``) compiles the train step on ``jax.ShapeDtypeStruct`` inputs
(nothing is allocated: model directories need only their ``config.json``) and reports, per device:

* parameters, optimizer state and frozen models (teachers) — the shard sizes of their shardings;
* the compiled step's arguments, outputs and temporaries (``compiled.memory_analysis()``; the temporaries are the
  activations kept for the backward pass plus the logits and workspace) and their peak;
* for the RAM stage with ``proposal=`` set, the proposal sampler that draws the one-time samples: P_M's parameters,
  its KV cache for ``data.batch_size`` prompts of ``data.max_prompt_len`` tokens + ``data.max_len −
  data.max_prompt_len`` new ones, and the compiled prefill.

The figures are XLA's for the backend the dry run compiles on (CPU here, with simulated devices): parameter,
optimizer and cache bytes are exact on any backend; temporaries depend on the backend's fusion and layout, so treat
them as an estimate for TPU/GPU.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ramjax import model as model_lib
from ramjax import sharding as shd

__all__ = ["MiB", "format_report", "sampler_memory", "tree_bytes_per_device"]

MiB = 2 ** 20


def tree_bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of ``ShapeDtypeStruct``s (or arrays) with shardings: the sum of each leaf's
    shard size (the largest device's; shards are equal whenever dimensions divide)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        sh = getattr(x, "sharding", None)
        shape = sh.shard_shape(x.shape) if sh is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
    return total


def compiled_memory(compiled: Any) -> dict[str, int]:
    """``memory_analysis()`` of a compiled program as ints (arguments, outputs, temporaries, aliases, peak)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    out = {k: int(getattr(ma, k + "_size_in_bytes", 0) or 0) for k in ("argument", "output", "temp", "alias")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def sampler_memory(cfg: model_lib.ModelConfig, mesh: Mesh, rules: Any, *, batch: int, prompt_len: int,
                   max_new: int) -> dict[str, Any]:
    """Per-device memory of sampling ``cfg`` on ``mesh`` (as ``ramjax.sampler`` lays it out: parameters by their
    logical axes, the KV cache ``[layers, batch, prompt_len + max_new, kv_heads, head_dim]`` over the batch axes and
    ``tensor``): parameter and cache bytes, and the compiled prefill of ``batch`` prompts into that cache (the
    largest program of a decode; each later step holds one token's activations)."""
    div = shd.batch_divisor(mesh, rules)
    batch = -(-batch // div) * div  # the sampler pads the batch to the mesh's batch shards
    total = prompt_len + max_new
    p_abs = jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                                   model_lib.param_shapes(cfg), model_lib.param_shardings(cfg, mesh, rules))
    c_sh = model_lib.cache_shardings(mesh, cfg, batch, total, rules)
    c_abs = jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                                   jax.eval_shape(lambda: model_lib.init_cache(cfg, batch, total)), c_sh)
    tok_sh = shd.batch_sharding(mesh, 2, rules)
    tok = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=tok_sh)

    def prefill(params, tokens, positions, segs, cache):
        logits, cache = model_lib.forward(cfg, params, tokens, positions, segs, cache, last_only=True, mesh=mesh,
                                          rules=rules)
        return logits, cache

    fn = jax.jit(prefill, out_shardings=(shd.batch_sharding(mesh, 3, rules), c_sh), donate_argnums=(4,))
    compiled = fn.lower(p_abs, tok, tok, tok, c_abs).compile()
    return {"batch": batch, "cache_len": total, "params": tree_bytes_per_device(p_abs),
            "kv_cache": tree_bytes_per_device(c_abs), "compiled_prefill": compiled_memory(compiled)}


def format_report(plan: dict[str, Any]) -> str:
    """The per-device memory table ``train.py --dry-run`` prints (MiB)."""
    lines = [f"per-device memory on mesh {plan['mesh']} ({plan['devices']} devices), MiB:"]
    tr = plan["train"]
    rows = [("trained parameters", tr["params"]), ("optimizer state", tr["optimizer"])]
    if tr.get("frozen"):
        rows.append(("frozen models (teachers/base)", tr["frozen"]))
    c = tr["compiled"]
    rows += [("train step: arguments", c.get("argument", 0)), ("train step: outputs", c.get("output", 0)),
             ("train step: temporaries (activations, logits)", c.get("temp", 0)),
             ("train step: peak", c.get("peak", 0))]
    for name, s in plan.get("samplers", {}).items():
        rows += [(f"{name} sampler: parameters", s["params"]),
                 (f"{name} sampler: KV cache ({s['batch']} rows x {s['cache_len']} tokens)", s["kv_cache"]),
                 (f"{name} sampler: prefill peak", s["compiled_prefill"].get("peak", 0))]
    width = max(len(r[0]) for r in rows)
    lines += [f"  {name:<{width}}  {v / MiB:12.1f}" for name, v in rows]
    return "\n".join(lines)
