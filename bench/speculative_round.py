"""Where a speculative round's time goes: the jitted pieces of one round timed alone, next to a token-level step.

    python bench/speculative_round.py [--run-dir runs/default] [--k 4] [--batch 1]

On the default run's warmed-up P_M (``<run-dir>/warmup/model``) and RAM aligner (``<run-dir>/ram/model``), mode
``product`` with the released settings (KL monitor 0.1): a token-level step (``decode_loop._step``), a speculative
round (``speculative._round``), one aligner forward, P_M forwards over 1 and k+1 tokens, the aligner's rule and
draw, the product target at k+1 positions, and token-level ``choose``; each the best of 5 timings of many calls.
Prints a table and the load, writes ``bench/results/speculative_round-<time>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/default")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from ramjax import api
    from ramjax import decode_loop as D
    from ramjax import decode_rules as R
    from ramjax import model as M
    from ramjax import sampler as S
    from ramjax import speculative as SP

    K, B, run = args.k, args.batch, args.run_dir
    p, q = api.load_model(f"{run}/warmup/model"), api.load_model(f"{run}/ram/model")
    with open(f"{run}/data/eval.jsonl", encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f][:B]
    params = S.SamplingParams(mode="product", max_new_tokens=64)
    plan = S._plan(p, q, prompts, params, num_samples=1, seed=0, batch_size=B, eos_ids=[], example_offset=0,
                   rules=(), draft=True)
    st, batch, rowp = S._chunk_inputs(plan, [(i, 0) for i in range(len(prompts))])
    pp, qp = plan.params_p, plan.params_q
    rows = {}

    def timeit(name, f, *a):
        jax.block_until_ready(f(*a))
        best = float("inf")
        n = max(args.calls // 5, 1)
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                out = f(*a)
            jax.block_until_ready(out)
            best = min(best, (time.perf_counter() - t) / n)
        rows[name] = best
        print(f"{name:<42} {best * 1e6:9.1f} us", flush=True)

    seed = jax.random.key(0)
    s0 = jax.jit(functools.partial(D._prefill, st))(pp, qp, batch, seed, rowp)
    timeit("token-level step (product, KL on)", jax.jit(functools.partial(D._step, st)), pp, qp, s0, plan.tables,
           rowp, np.int32(64))
    sp = SP._Spec(base=st, k=K)
    ss = jax.jit(functools.partial(SP._prefill, sp))(pp, qp, batch, seed, rowp)
    timeit(f"speculative round k={K}", jax.jit(functools.partial(SP._round, sp)), pp, qp, ss, plan.tables, rowp,
           np.int32(64))
    pos = jnp.full((B, 1), 20)
    fq = jax.jit(lambda prm, t, c: M.decode_forward(st.cfg_q, prm, t, pos, jnp.ones_like(t), c)[0])
    fp = jax.jit(lambda prm, t, c: M.decode_forward(st.cfg_p, prm, t, pos + jnp.arange(t.shape[1]),
                                                    jnp.ones_like(t), c)[0])
    timeit("aligner forward, 1 token", fq, qp, jnp.zeros((B, 1), jnp.int32), ss.cache_q)
    timeit("P_M forward, 1 token", fp, pp, jnp.zeros((B, 1), jnp.int32), ss.cache_p)
    timeit(f"P_M forward, {K + 1} tokens", fp, pp, jnp.zeros((B, K + 1), jnp.int32), ss.cache_p)
    V = st.vocab
    z = jax.random.normal(jax.random.key(1), (B, V)) * 3
    seen = jnp.zeros((B, V), bool)
    timeit("aligner rule + draw (one draft)",
           jax.jit(lambda z, s, u: R.draw(u, R.target_logits("aligner", None, z, s, rowp).logits, rowp.greedy)),
           z, seen, jnp.full((B,), 0.5))
    rep = jax.tree_util.tree_map(lambda x: jnp.repeat(x, K + 1, axis=0), rowp)
    timeit(f"product target at {K + 1} positions (KL on)",
           jax.jit(lambda a, b, s: R.target_logits("product", a, b, s, rep, kl_monitor=True).logits),
           jnp.tile(z, (K + 1, 1)), jnp.tile(z, (K + 1, 1)) * 0.5, jnp.tile(seen, (K + 1, 1)))
    timeit("token-level choose (product, KL on)",
           jax.jit(lambda a, b, s, u: R.choose("product", a, b, s, u, rowp, kl_monitor=True).token),
           z, z * 0.5, seen, jnp.full((B, 2), 0.5))
    load = os.popen("uptime").read().strip()
    print(f"round = {rows[f'speculative round k={K}'] / rows['token-level step (product, KL on)']:.2f} token-level "
          f"steps\nload: {load}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"speculative_round-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(args=vars(args), load=load, seconds=rows), f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
