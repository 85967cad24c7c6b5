"""InRa decode throughput: tokens/s of the two-stream adapter model at λ ∈ {0, 0.5, 1} (and mixed per-row λ)
against the plain model, on the mission's proposal shapes (Llama, 512 wide, 8 layers, MLP 1408, 8 heads / 2 KV
heads, 8k vocabulary, float32), batch 8, 64 new tokens, greedy.

Two measurements:

* ``loop``: each system is one jitted call — prefill, then a ``lax.fori_loop`` of single-token cached greedy
  steps — so the figures measure the models, not the sampler;
* ``sampler``: ``ramjax.sample`` with the released settings (T 0.5, top-p 0.95, repetition penalty 1.05),
  ``mode="inra"`` with ``inra_lambda`` vs ``mode="proposal"`` on the base model.

The two streams share one doubled-batch pass through the L layers plus one extra layer, so InRa should cost a
little over 2× the plain model; λ does not change the cost (it is a traced array). Timing: compile once, then
all systems round-robin ``--repeats`` times; the best run is reported (and the median). Usage::

    python bench/inra.py [--batch 8] [--new 64] [--prompt 16] [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ramjax import inra as inra_lib  # noqa: E402
from ramjax import model as model_lib  # noqa: E402

PROPOSAL = model_lib.ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8,
                                 num_heads=8, num_kv_heads=2, head_dim=64)


def _greedy(forward, init_cache, new: int):
    """Greedy decoding of ``new`` tokens in one ``fori_loop``: ``forward(tokens, positions, segment_ids, cache)
    -> (logits, cache)`` (positions None for the prompt), ``init_cache(batch, max_len)``."""

    def gen(prompt):
        B, P = prompt.shape
        logits, cache = forward(prompt, None, None, init_cache(B, P + new))
        out = jnp.zeros((B, new), jnp.int32)

        def body(t, carry):
            logits, cache, out = carry
            tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
            out = out.at[:, t].set(tok)
            pos = jnp.full((B, 1), P + t, jnp.int32)
            logits, cache = forward(tok[:, None], pos, jnp.ones((B, 1), jnp.int32), cache)
            return logits, cache, out

        return jax.lax.fori_loop(0, new, body, (logits, cache, out))[2]

    return gen


def _plain_generate(cfg, new):
    def gen(params, prompt):
        def fwd(tokens, pos, seg, cache):
            return model_lib.forward(cfg, params, tokens, pos, seg, cache, last_only=True)

        return _greedy(fwd, lambda b, n: model_lib.init_cache(cfg, b, n), new)(prompt)

    return jax.jit(gen)


def _inra_generate(cfg, new):
    def gen(params, adapter, prompt, lam):
        def fwd(tokens, pos, seg, cache):
            return inra_lib.inra_forward(cfg, params, adapter, tokens, pos, seg, cache, lam, last_only=True)

        return _greedy(fwd, lambda b, n: inra_lib.init_inra_cache(cfg, b, n), new)(prompt)

    return jax.jit(gen)


def _measure(systems: dict, repeats: int) -> dict[str, dict]:
    """Compiles each system, then times them round-robin ``repeats`` times (so load from other processes hits
    all systems alike); reports the fastest and the median run."""
    out = {}
    for name, (fn, args) in systems.items():
        t0 = time.perf_counter()
        res = np.asarray(jax.block_until_ready(fn(*args)))
        out[name] = {"compile_s": time.perf_counter() - t0, "times": [], "tokens": res}
    for _ in range(repeats):
        for name, (fn, args) in systems.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out[name]["times"].append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = PROPOSAL
    kp, ka, kt = jax.random.split(jax.random.key(0), 3)
    params = jax.jit(model_lib.init_params, static_argnums=0)(cfg, kp)
    adapter = inra_lib.build_adapter(cfg, params)
    # a trained-looking adapter (non-zero output projections) so the λ rows really differ
    leaves, tree = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(ka, len(leaves))
    adapter = jax.tree_util.tree_unflatten(
        tree, [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    prompt = jax.random.randint(kt, (args.batch, args.prompt), 0, cfg.vocab_size)
    ntok = args.batch * args.new

    inra = _inra_generate(cfg, args.new)
    systems = {"plain": (_plain_generate(cfg, args.new), (params, prompt))}
    lams = {"0": jnp.zeros(args.batch), "0.5": jnp.full(args.batch, 0.5), "1": jnp.ones(args.batch),
            "mixed 0/0.5/1": jnp.asarray(np.resize([0.0, 0.5, 1.0], args.batch), jnp.float32)}
    for name, lam in lams.items():
        systems[name] = (inra, (params, adapter, prompt, lam))
    from ramjax import api, sampler

    base_model = api.Model(config=cfg, params=params)
    inra_model = inra_lib.inra_model(base_model, adapter)
    ps = np.asarray(prompt).tolist()
    kw = dict(max_new_tokens=args.new, eos_ids=[], seed=0, batch_size=args.batch, proposal_temperature=0.5,
              proposal_top_p=0.95, repetition_penalty=1.05)

    def run_sampler(model, mode, **extra):
        out = sampler.sample(model, None, ps, mode=mode, **kw, **extra)
        return np.asarray([r[0].token_ids for r in out])

    systems["sampler plain"] = (lambda: run_sampler(base_model, "proposal"), ())
    for name in ("0", "0.5", "1"):
        systems[f"sampler {name}"] = (lambda lam=float(name): run_sampler(inra_model, "inra", inra_lambda=lam), ())
    res = _measure(systems, args.repeats)
    rows = []
    for name, r in res.items():
        best, med = min(r["times"]), float(np.median(r["times"]))
        bench_kind = "sampler" if name.startswith("sampler") else "loop"
        lam_name = name.split(" ", 1)[1] if bench_kind == "sampler" else name
        plain = lam_name == "plain"
        row = {"bench": bench_kind, "system": "plain" if plain else "inra", "lambda": None if plain else lam_name,
               "best_s": best, "median_s": med, "compile_s": r["compile_s"], "tokens_per_s": ntok / best,
               "tokens_per_s_median": ntok / med}
        if name in ("0", "sampler 0"):  # λ = 0 is the base model: same tokens as the plain model
            plain_name = "plain" if name == "0" else "sampler plain"
            row["same_tokens_as_plain"] = bool(np.array_equal(r["tokens"], res[plain_name]["tokens"]))
        rows.append(row)
    for kind in ("loop", "sampler"):
        base = next(r["tokens_per_s"] for r in rows if r["bench"] == kind and r["system"] == "plain")
        for r in rows:
            if r["bench"] == kind:
                r["cost_vs_plain"] = base / r["tokens_per_s"]
    info = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "batch": args.batch,
            "new_tokens": args.new, "prompt_len": args.prompt, "params": model_lib.count_params(params),
            "adapter_params": model_lib.count_params(adapter), "rows": rows}
    print(f"{'bench':8} {'system':8} {'lambda':>14} {'tokens/s':>10} {'(median)':>9} {'cost x':>7} {'compile s':>9}")
    for r in rows:
        print(f"{r['bench']:8} {r['system']:8} {str(r['lambda']):>14} {r['tokens_per_s']:10.1f} "
              f"{r['tokens_per_s_median']:9.1f} "
              f"{r['cost_vs_plain']:7.2f} "
              f"{r['compile_s']:9.1f}" + (f"  same tokens as plain: {r['same_tokens_as_plain']}"
                                          if "same_tokens_as_plain" in r else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
