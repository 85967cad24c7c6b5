"""Where a speculative round's time goes: a round and its pieces timed *inside* a jitted loop, next to a token-level
step, in process CPU time (on a shared machine much less disturbed by other jobs than wall time).

    python bench/speculative_round.py [--run-dir runs/default] [--ks 2,4] [--batch 1] [--preset sampled]

On the default run's warmed-up P_M (``<run-dir>/warmup/model``) and RAM aligner (``<run-dir>/ram/model``), mode
``product`` with the sampler's defaults (the released settings, KL monitor 0.1) or a named preset. Each piece runs
as the body of a jitted ``fori_loop`` of 4 and of 12 iterations, and its cost is the difference / 8: what one more
iteration costs inside the decode loop, without the per-call dispatch of the weights and state (~100 buffers), which
a standalone call would add and the ``while_loop`` does not pay; the fastest of ``--best-of`` timings counts.
Pieces: a token-level step (``decode_loop._step``), a speculative round (``speculative._round``) per k, the
forwards of each alone, chained as in the loop (a step's: P_M and the aligner over 1 token; a round's: k + 1
aligner steps and P_M over k + 1 tokens), so that step − forwards and round − forwards are what the rules and the
bookkeeping cost in context; then one aligner forward (1 token), P_M forwards over 1 and k+1 tokens, the aligner's
rule and draw (one draft), token-level ``choose``, and the target rule at k+1 positions, each alone. Prints a table
with the load, writes ``bench/results/speculative_round-<time>.json``.
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
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--preset", default=None, help="a sampling preset (sampled, greedy) instead of the defaults")
    ap.add_argument("--calls", type=int, default=40, help="calls per timing")
    ap.add_argument("--best-of", type=int, default=5, help="timings per piece; the fastest counts")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from ramjax import api
    from ramjax import decode_loop as D
    from ramjax import decode_rules as R
    from ramjax import model as M
    from ramjax import sampler as S
    from ramjax import speculative as SP

    B, run = args.batch, args.run_dir
    ks = [int(k) for k in args.ks.split(",")]
    p, q = api.load_model(f"{run}/warmup/model"), api.load_model(f"{run}/ram/model")
    with open(f"{run}/data/eval.jsonl", encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f][:B]
    params = S.sp_lib.resolve(args.preset, dict(mode="product", max_new_tokens=64))
    # EOS off: the timed rows never finish, so every iteration does a full step / round
    plan = S._plan(p, q, prompts, params, num_samples=1, seed=0, batch_size=B, eos_ids=[], example_offset=0,
                   rules=(), draft=True)
    st, batch, rowp = S._chunk_inputs(plan, [(i, 0) for i in range(len(prompts))])
    rowp = jax.tree_util.tree_map(jnp.asarray, rowp)
    tables = jax.tree_util.tree_map(jnp.asarray, plan.tables)
    pp, qp = plan.params_p, plan.params_q
    V = st.vocab
    rows: dict[str, float] = {}

    def cpu_per_call(f, x):
        jax.block_until_ready(f(x))
        best = float("inf")
        for _ in range(args.best_of):
            t = time.process_time()
            for _ in range(args.calls):
                out = f(x)
            jax.block_until_ready(out)
            best = min(best, (time.process_time() - t) / args.calls)
        return best

    def per_iteration(name, body, init):
        def looped(n):
            return jax.jit(lambda x: jax.lax.fori_loop(0, n, body, x))
        cost = (cpu_per_call(looped(12), init) - cpu_per_call(looped(4), init)) / 8
        rows[name] = cost
        print(f"{name:<44} {cost * 1e6:8.1f} us", flush=True)

    seed = jax.random.key(0)
    s0 = jax.jit(functools.partial(D._prefill, st))(pp, qp, batch, seed, rowp)
    per_iteration("token-level step", lambda i, s: D._step(st, pp, qp, s, tables, rowp, np.int32(64)), s0)
    states = {}
    for K in ks:
        sp = SP._Spec(base=st, k=K)
        states[K] = jax.jit(functools.partial(SP._prefill, sp))(pp, qp, batch, seed, rowp)
        per_iteration(f"speculative round k={K}",
                      lambda i, s, sp=sp: SP._round(sp, pp, qp, s, tables, rowp, np.int32(64)), states[K])

    def forward(cfg, prm, T):
        def body(i, carry):
            cache, tok = carry
            z, cache = M.decode_forward(cfg, prm, jnp.broadcast_to(tok, (B, T)), (10 + i + jnp.arange(T))[None, :],
                                        jnp.ones((B, T), jnp.int32), cache, last_only=T == 1)
            # the index stays put (the cache never fills); the next token depends on the logits (no hoisting)
            return cache.replace(index=cache.index - T), jnp.argmax(z[:, -1, :V], -1)[:, None].astype(jnp.int32)
        return body

    s = states[ks[0]]
    tok0 = jnp.zeros((B, 1), jnp.int32)

    def forwards(K):
        """A round's forwards alone, chained as in the round: K + 1 aligner steps, each fed the argmax of the one
        before, then P_M over the K + 1 fed tokens (K = 0: a token-level step's two forwards)."""
        def body(i, carry):
            cache_q, cache_p, tok = carry
            fed = []
            for j in range(K + 1):
                fed.append(tok)
                z, cache_q = M.decode_forward(st.cfg_q, qp, tok, jnp.full((B, 1), 10 + j, jnp.int32),
                                              jnp.ones((B, 1), jnp.int32), cache_q, last_only=True)
                tok = R.argmax(z[:, -1, :V])[:, None]
            chunk = jnp.concatenate(fed, axis=1)
            z, cache_p = M.decode_forward(st.cfg_p, pp, chunk, jnp.broadcast_to(10 + jnp.arange(K + 1), (B, K + 1)),
                                          jnp.ones((B, K + 1), jnp.int32), cache_p, last_only=K == 0)
            tok = R.argmax(z[:, -1, :V] + z[:, 0, :V])[:, None]
            return (cache_q.replace(index=cache_q.index - (K + 1)), cache_p.replace(index=cache_p.index - (K + 1)),
                    tok)
        return body

    per_iteration("step's forwards (P_M + aligner, 1 token)", forwards(0), (s.cache_q, s.cache_p, tok0))
    for K in ks:
        per_iteration(f"round's forwards k={K} ({K + 1} aligner + P_M over {K + 1})", forwards(K),
                      (s.cache_q, s.cache_p, tok0))
    per_iteration("aligner forward, 1 token", forward(st.cfg_q, qp, 1), (s.cache_q, tok0))
    per_iteration("P_M forward, 1 token", forward(st.cfg_p, pp, 1), (s.cache_p, tok0))
    for K in ks:
        per_iteration(f"P_M forward, {K + 1} tokens", forward(st.cfg_p, pp, K + 1), (s.cache_p, tok0))
    z0 = jax.random.normal(jax.random.key(1), (B, V)) * 3
    seen = jnp.zeros((B, V), bool)

    def draft_rule(i, z):
        d = R.draw(jnp.full((B,), 0.3), R.target_logits("aligner", None, z, seen, rowp).logits, rowp.greedy)
        return z.at[:, 0].add(d.astype(jnp.float32) * 1e-6)

    def choose(i, z):
        u = jnp.full((B, R.num_uniforms("product", 1)), 0.3)  # as many uniforms as the rule takes (6 since 830f2ed)
        ch = R.choose("product", z, z * 0.5, seen, u, rowp, kl_monitor=st.kl_monitor)
        return z.at[:, 0].add(ch.token.astype(jnp.float32) * 1e-6)

    per_iteration("aligner rule + draw (one draft)", draft_rule, z0)
    per_iteration("token-level choose (product)", choose, z0)
    for K in ks:
        rep = jax.tree_util.tree_map(lambda x, K=K: jnp.repeat(x, K + 1, axis=0), rowp)

        def target(i, z, rep=rep, K=K):
            t = R.target_logits("product", z, z * 0.5, jnp.tile(seen, (K + 1, 1)), rep,
                                kl_monitor=st.kl_monitor).logits
            return z.at[:, 0].add(jnp.where(jnp.isfinite(t[:, 1]), t[:, 1], 0.0) * 1e-6)

        per_iteration(f"product target at {K + 1} positions", target, jnp.tile(z0, (K + 1, 1)))
    load = os.popen("uptime").read().strip()
    step = rows["token-level step"]
    step_rest = step - rows["step's forwards (P_M + aligner, 1 token)"]
    print(f"token-level step: forwards {(step - step_rest) * 1e6:.0f} us, "
          f"rule and bookkeeping {step_rest * 1e6:.0f} us")
    for K in ks:
        rnd = rows[f"speculative round k={K}"]
        fw = rows[f"round's forwards k={K} ({K + 1} aligner + P_M over {K + 1})"]
        print(f"round k={K} = {rnd / step:.2f} token-level steps (at most {K + 1} tokens per round): forwards "
              f"{fw / step:.2f} steps, rules and bookkeeping {(rnd - fw) / step:.2f} steps")
    print(f"load: {load}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"speculative_round-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(args=vars(args), load=load, cpu_seconds_per_iteration=rows), f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
