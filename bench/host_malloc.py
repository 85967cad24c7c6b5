"""Host allocator settings (``ramjax.hostmem``) on CPU: train steps and a decode call of the default recipe's shapes.

XLA:CPU gives each execution of a compiled program one block for its temporaries and frees it afterwards; from a
worker thread glibc ``mmap``s a block above 64 MB and unmaps it again, so every step pays the kernel to zero-fill
it page by page. Each setting runs in a fresh process (glibc reads ``GLIBC_TUNABLES`` at start):

* ``glibc default``  no tunables (what a process gets without the command lines' re-exec);
* ``ramjax``         ``ramjax.hostmem.TUNABLES`` (what ``python train.py`` / ``sample.py`` run with: 2 MB pages for
                     mmap-ed chunks, a few hundred faults per block instead of ~50k);
* ``one arena``      keep the block mapped (``arena_max=1``, no mmap, no trim): no faults either, but XLA's
                     multi-threaded compiler contends on the one arena.

Measured per setting: P_M's SFT step (128 wide, 4 layers, 565-token vocabulary, 32 x 80 tokens) and the aligner's
RAM step (64 wide, 3 layers, 16 pairs x 80), median seconds, page faults and kernel seconds per step; then one
``ramjax.sample`` call in ``product`` mode (64 prompts of 16 tokens, 24 new tokens) twice: the first includes the
compile, the second is the decode alone. The settings alternate ``--rounds`` times (load drift hits all alike).

    python bench/host_malloc.py [--steps 20] [--rounds 2] [--json bench/results/host_malloc.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from ramjax import hostmem  # noqa: E402

SETTINGS = {"glibc default": "", "ramjax": ":".join(f"{k}={v}" for k, v in hostmem.TUNABLES),
            "one arena": "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"}
V = 565
PROPOSAL = dict(hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32)
ALIGNER = dict(hidden_size=64, intermediate_size=176, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=16)


def _timed_steps(system, steps: int) -> dict:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        system.run(record=False)
        times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    times.sort()
    return {"step_s": times[len(times) // 2], "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / steps}


def child(steps: int) -> dict:
    import jax
    from train_step import System, _random_params, make_batch

    from ramjax import api, sampler
    from ramjax import loss as loss_lib
    from ramjax import model as model_lib
    from ramjax import sharding as shd

    mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    p_cfg = model_lib.ModelConfig(vocab_size=V, max_position_embeddings=256, **PROPOSAL)
    q_cfg = model_lib.ModelConfig(vocab_size=V, max_position_embeddings=256, **ALIGNER)
    out = {"P_M SFT step": _timed_steps(System("sft", p_cfg, loss_lib.lm_objective(), "adamw", make_batch(32, 80),
                                               mesh), steps),
           "aligner RAM step": _timed_steps(System("ram", q_cfg, loss_lib.ram_objective(1e-4), "adamw",
                                                   make_batch(16, 80), mesh), steps)}
    p = api.Model(p_cfg, jax.device_put(_random_params(p_cfg, 0)))
    q = api.Model(q_cfg, jax.device_put(_random_params(q_cfg, 1)))
    prompts = [[(7 * i + j) % V for j in range(16)] for i in range(64)]
    for name in ("decode, first call", "decode, second call"):
        t0 = time.perf_counter()
        sampler.sample(p, q, prompts, "sampled", mode="product", max_new_tokens=24, batch_size=64, eos_ids=[])
        out[name] = {"step_s": time.perf_counter() - t0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(REPO, "bench", "results", "host_malloc.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.steps)))
        return

    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, tunables in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            if tunables:
                env["GLIBC_TUNABLES"] = tunables
            res = subprocess.run([sys.executable, __file__, "--child", f"--steps={args.steps}"], env=env,
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(res.stdout.split("RESULT ", 1)[1]))
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"\nhost allocator settings, median over {args.rounds} round(s) of {args.steps} steps; load {load}\n")
    work = list(runs["ramjax"][0])
    hdr = f"{'':<22}" + "".join(f"{n:>26}" for n in SETTINGS)
    print(hdr + "\n" + "-" * len(hdr))
    table = {}
    for w in work:
        cells = []
        for name in SETTINGS:
            vals = sorted(r[w]["step_s"] for r in runs[name])
            med = vals[len(vals) // 2]
            faults = sorted(r[w].get("faults_per_step", float("nan")) for r in runs[name])[len(vals) // 2]
            table.setdefault(w, {})[name] = {"seconds": med, "faults_per_step": faults,
                                             "all": [r[w] for r in runs[name]]}
            extra = "" if faults != faults else f" ({faults / 1e3:.1f}k flt)"
            cells.append(f"{med * 1e3:.0f} ms{extra}" if med < 1 else f"{med:.2f} s")
        print(f"{w:<22}" + "".join(f"{c:>26}" for c in cells))
    base = table["P_M SFT step"]["glibc default"]["seconds"]
    print(f"\nP_M step, glibc default / ramjax: {base / table['P_M SFT step']['ramjax']['seconds']:.2f}x")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"load": load, "steps": args.steps, "rounds": args.rounds, "settings": SETTINGS,
                   "table": table}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
