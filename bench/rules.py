"""The per-token rule alone, every mode, this tree against another checkout's, interleaved in one process.

    python bench/rules.py --before OLD_CHECKOUT [--batch 8] [--vocab 49152] [--reps 5]

Each mode's ``decode_rules.choose`` is jitted with every input a traced argument, on random ``[batch, vocab]``
logits (scale 0.5: flat rows like a random-weight model's, so top-p takes its bisection path) with SmolLM2-135M's
bench settings (T 1, top-p 0.95 / 0.9, penalty 1.05; KL threshold 0.1 for ``sparse+kl``, where every row fires on
these logits). Both trees must draw the same tokens (checked), unless ``--other-tokens``: for a change that
draws from the same distributions by other means (then the share of rows whose token differs is printed).
The trees are timed round-robin, best of ``--reps``
rounds of 20 calls, in wall and process CPU time (on a shared machine the CPU time is the steadier of the two).

``--forward``: also times, in the same process, the jitted single-token decode step (CPU time) of random-weight
models of SmolLM2-135M's shape and of ``bench/sample.py``'s ¼-compute aligner at ``--batch`` (vocabulary
``--vocab``), and prints each rule's share of the models' forward (P_M + Q_θ; P_M alone for proposal, Q_θ alone
for aligner): issue 13's "rule <= 10% of the forward" without ``bench/sample.py``'s whole-call runs.

Prints a table and writes ``bench/results/rules-<time>.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = [("proposal", 1, False), ("aligner", 1, False), ("par", 8, False), ("sparse", 1, False),
         ("product", 1, False), ("sparse", 1, True)]


def load_rules(tree: str):
    """The other tree's ``decode_rules``, with its own ``ramjax.nucleus`` where it has one (split out of
    decode_rules in session 7): that module is swapped into ``sys.modules`` while the rules import it."""
    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    nucleus_path = os.path.join(tree, "ramjax", "nucleus.py")
    if not os.path.exists(nucleus_path):
        return load("before_rules", os.path.join(tree, "ramjax", "decode_rules.py"))
    import ramjax.nucleus  # noqa: F401  (this tree's, restored below)

    ours = sys.modules["ramjax.nucleus"]
    sys.modules["ramjax.nucleus"] = load("before_nucleus", nucleus_path)
    try:
        return load("before_rules", os.path.join(tree, "ramjax", "decode_rules.py"))
    finally:
        sys.modules["ramjax.nucleus"] = ours


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="a checkout (or export) of the older tree")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--forward", action="store_true",
                    help="also time the SmolLM2-135M-shaped P_M and the 1/4 aligner decode steps; print shares")
    ap.add_argument("--other-tokens", action="store_true",
                    help="time trees that draw different tokens (a change of draw algorithm; tested elsewhere)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ramjax import decode_rules as after

    before = load_rules(args.before)
    B, V, calls = args.batch, args.vocab, 20
    zp = jax.random.normal(jax.random.key(1), (B, V)) * 0.5
    zq = jax.random.normal(jax.random.key(2), (B, V)) * 0.5
    seen = jnp.zeros((B, V), bool).at[:, :16].set(True)

    def row_params(R, kl: bool):
        f = lambda v: jnp.full((B,), v, jnp.float32)  # noqa: E731
        return R.RowParams(f(1.0), f(1.0), f(0.95), f(0.9), jnp.zeros((B,), jnp.int32), f(1.05),
                           f(0.1 if kl else jnp.inf), jnp.zeros((B,), bool))

    fns = {}
    for mode, n, kl in CASES:
        name = mode + ("8" if mode == "par" else "") + ("+kl" if kl else "")
        toks = []
        for tag, R in (("before", before), ("after", after)):
            u = jax.random.uniform(jax.random.key(3), (B, R.num_uniforms(mode, n)))
            fn = jax.jit(lambda a, b, s, u, r, R=R, mode=mode, kl=kl: R.choose(mode, a, b, s, u, r,
                                                                             kl_monitor=kl).token)
            fargs = (zp, zq, seen, u, row_params(R, kl))
            toks.append(np.asarray(fn(*fargs)))
            fns[(name, tag)] = (fn, fargs)
        if args.other_tokens:
            print(f"{name}: {float((toks[0] != toks[1]).mean()):.0%} of rows draw another token")
        elif not (toks[0] == toks[1]).all():
            raise SystemExit(f"{name}: the trees draw different tokens ({toks[0]} vs {toks[1]})")
    times = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, (fn, fargs) in fns.items():
            t, c = time.perf_counter(), time.process_time()
            for _ in range(calls):
                out = fn(*fargs)
            out.block_until_ready()
            times[k].append(((time.perf_counter() - t) / calls, (time.process_time() - c) / calls))
    load = os.getloadavg()
    forward = forward_cpu_s(B, V, args.reps) if args.forward else None
    rows = []
    same = "tokens not compared (--other-tokens)" if args.other_tokens else "same tokens in both trees"
    print(f"rule alone, B={B}, V={V}, best of {args.reps} x {calls} calls; {same}; load {load}")
    print("| rule | before wall (ms) | after wall (ms) | before CPU (ms) | after CPU (ms) | CPU speed-up |"
          + (" forward CPU (ms) | share before | share after |" if forward else ""))
    print("|---|---|---|---|---|---|" + ("---|---|---|" if forward else ""))
    for name in dict.fromkeys(k[0] for k in fns):
        bw, bc = (min(x[i] for x in times[(name, "before")]) for i in (0, 1))
        aw, ac = (min(x[i] for x in times[(name, "after")]) for i in (0, 1))
        rows.append(dict(rule=name, before_s=bw, after_s=aw, before_cpu_s=bc, after_cpu_s=ac))
        extra = ""
        if forward:
            f = forward["Q"] if name == "aligner" else forward["P"] + (0.0 if name == "proposal" else forward["Q"])
            rows[-1].update(forward_cpu_s=f, share_before=bc / f, share_after=ac / f)
            extra = f" {f * 1e3:.1f} | {bc / f:.1%} | {ac / f:.1%} |"
        print(f"| {name} | {bw * 1e3:.2f} | {aw * 1e3:.2f} | {bc * 1e3:.2f} | {ac * 1e3:.2f} | {bc / ac:.1f}x |"
              + extra)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"rules-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(dict(batch=B, vocab=V, load=load, load_after=os.getloadavg(), forward_cpu_s=forward,
                       same_tokens=not args.other_tokens,
                       before=os.path.abspath(args.before), rows=rows), f, indent=1)
    print(f"wrote {path}")
    return 0


def forward_cpu_s(batch: int, vocab: int, reps: int, shapes: dict | None = None) -> dict:
    """Best process-CPU time of the jitted decode step of random-weight P_M (SmolLM2-135M's shape) and Q_θ (the
    ¼-compute aligner of ``bench/sample.py``), ``{"P": s, "Q": s}``, as ``bench/sample.py`` times them."""
    import jax

    from ramjax import model as model_lib

    spec = importlib.util.spec_from_file_location("bench_sample", os.path.join(os.path.dirname(__file__), "sample.py"))
    sample = importlib.util.module_from_spec(spec)  # bench/sample.py (the repository root has a sample.py too)
    spec.loader.exec_module(sample)

    class M:  # what forward_step_s reads
        def __init__(self, shape, seed):
            self.config = model_lib.ModelConfig(vocab_size=vocab, num_layers=shape["num_hidden_layers"],
                                                hidden_size=shape["hidden_size"],
                                                intermediate_size=shape["intermediate_size"],
                                                num_heads=shape["num_attention_heads"],
                                                num_kv_heads=shape["num_key_value_heads"], head_dim=64,
                                                tie_word_embeddings=True)
            self.params = model_lib.init_params(self.config, jax.random.key(seed))

    sh = sample.SHAPES["smollm2-135m"]
    shapes = shapes or {"P": sh["proposal"], "Q": sh["aligners"]["1/4"]}
    out = {}
    for name, seed in (("P", 0), ("Q", 1)):
        shape = shapes[name]
        out[name] = sample.forward_step_s(M(shape, seed), batch, reps * 3, cpu=True)[1]
        print(f"forward step {name} B={batch}: {out[name] * 1e3:.1f} ms CPU", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
