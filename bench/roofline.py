"""This machine's roofline: memory bandwidth and float32 matmul rate as JAX sees them, and the floor of a decode step.

    python bench/roofline.py [--shape smollm2-135m] [--batches 1,8]

* bandwidth: the best of several jitted kernels that read a 512 MiB float32 array once (a full reduction, a row
  reduction, a matrix-vector product like a decode step's), best of ``--reps`` each (bytes read / time);
* matmul rate: the best of several jitted float32 matmuls, one large square (2048³) and one decode-shaped
  (``[batch, 576] × [576, 1536]``-like: the model's MLP at the given batch), FLOPs / time.

The floor of one decode step of a model is ``max(weight bytes / bandwidth, 2 · matmul params · batch / rate)``: a
step reads every weight once (memory-bound at small batch) and does two FLOPs per weight and row (compute-bound
once the batch is large enough). ``bench/sample.py`` prints every mode's step time as a share of this floor.

Prints a table and writes ``bench/results/roofline-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _best(fn, reps: int) -> float:
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bandwidth_methods(mib: int = 512, reps: int = 7) -> dict:
    """Bytes per second read from a float32 array of ``mib`` MiB (far larger than any cache), by several jitted
    kernels, best of ``reps`` each: a full reduction (``sum``), a row reduction (``sum(axis=1)``, contiguous rows),
    and a matrix-vector product (``[n/1024, 1024] @ [1024]``: a decode step's access pattern, weights times one
    activation, run by XLA's multi-threaded matmul). The column reduction (``sum(axis=0)``) that this bench used
    before is reported as ``col_sum`` for comparison but not counted: it under-read (12.5 GB/s on an idle machine
    that issue 13 measured at ~29)."""
    import jax
    import jax.numpy as jnp

    n = mib * (1 << 20) // 4
    x = jax.block_until_ready(jnp.ones((n // 1024, 1024), jnp.float32))
    v = jnp.ones((1024,), jnp.float32)
    kernels = {
        "sum": jax.jit(lambda x: jnp.sum(x)),
        "row_sum": jax.jit(lambda x: jnp.sum(x, axis=1)),
        "matvec": jax.jit(lambda x, v: x @ v),
        "col_sum": jax.jit(lambda x: jnp.sum(x, axis=0)),  # the earlier measurement, for comparison only
    }
    out = {}
    for name, f in kernels.items():
        args = (x, v) if name == "matvec" else (x,)
        out[name] = x.size * 4 / _best(lambda: jax.block_until_ready(f(*args)), reps)
    return out


def bandwidth(mib: int = 512, reps: int = 7) -> float:
    """This machine's read bandwidth in bytes/s: the best of ``bandwidth_methods``."""
    return max(v for k, v in bandwidth_methods(mib, reps).items() if k != "col_sum")


def matmul_rate(m: int, k: int, n: int, reps: int = 7, dtype: str = "float32") -> float:
    """FLOP/s of a jitted ``[m, k] × [k, n]`` matmul."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    return 2.0 * m * k * n / _best(lambda: f(a, b).block_until_ready(), reps)


def measure(hidden: int = 576, mlp: int = 1536, batches=(1, 8), reps: int = 7) -> dict:
    """Bandwidth and matmul rates: ``{"bandwidth": B/s, "matmul_square": FLOP/s, "matmul_decode": {batch: FLOP/s}}``
    (the decode-shaped rate is that of ``[batch, hidden] × [hidden, 16 · mlp]``, a layer's worth of weights)."""
    bw = bandwidth_methods(reps=reps)
    return {"bandwidth": max(v for k, v in bw.items() if k != "col_sum"), "bandwidth_by_kernel": bw,
            "matmul_square": matmul_rate(2048, 2048, 2048, reps=reps),
            "matmul_decode": {b: matmul_rate(b, hidden, 16 * mlp, reps=reps) for b in batches}}


def step_floor(weight_bytes: float, matmul_params: float, batch: int, roof: dict) -> dict:
    """The floor of one decode step: memory (weight bytes / bandwidth) and compute (2 · params · batch / the
    decode-shaped matmul rate at this batch, else the square rate); the larger binds."""
    rate = roof["matmul_decode"].get(batch) or roof["matmul_square"]
    mem = weight_bytes / roof["bandwidth"]
    comp = 2.0 * matmul_params * batch / rate
    return {"memory_s": mem, "compute_s": comp, "floor_s": max(mem, comp), "bound": "memory" if mem >= comp
            else "compute"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(","))
    import jax

    roof = measure(batches=batches, reps=args.reps)
    load = os.getloadavg()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, load {load}")
    by = roof["bandwidth_by_kernel"]
    print("bandwidth by kernel: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in by.items()))
    print(f"bandwidth {roof['bandwidth'] / 1e9:.1f} GB/s; float32 matmul 2048³ {roof['matmul_square'] / 1e9:.1f} "
          f"GFLOP/s; decode-shaped " + ", ".join(f"batch {b}: {r / 1e9:.1f} GFLOP/s"
                                                 for b, r in roof["matmul_decode"].items()))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"roofline-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"load": load, **roof}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
