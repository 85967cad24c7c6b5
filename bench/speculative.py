"""Speculative RAM decoding benchmark: tokens/s of ``num_speculative_tokens=k`` against token-level decoding in the
same mode and against proposal-only decoding, with the measured acceptance.

    python bench/speculative.py [--configs default,smol] [--run-dir runs/default] [--batches 1,8] [--ks 2,4,8]
                                [--modes product] [--new 64] [--reps 2] [--no-eos] [--no-kl] [--preset sampled]

Configurations:

* ``default``: the default run's warmed-up P_M (``<run-dir>/warmup/model``) and its RAM-trained aligner
  (``<run-dir>/ram/model``), prompts from the run's held-out ``data/eval.jsonl`` (plain template); EOS ends rows.
* ``smol``: a SmolLM2-135M-shaped P_M (Llama, 30 layers, hidden 576, MLP 1536, 9 / 3 heads, vocabulary 49152,
  tied embeddings) and a quarter-depth aligner (8 layers, same width), random weights; 16-token random prompts, no
  EOS. Random weights give near-uniform distributions, so its acceptance says nothing about trained models: it
  measures the cost side (a 3.75x deeper verifier) at a given acceptance.

Sampling settings: the sampler's defaults, i.e. the released settings (T 0.5 / 0.5, top-p 0.95 / 0.9, penalty
1.05, KL monitor at 0.1), or a named preset (``--preset sampled``: T 1, no nucleus, no penalty, no KL monitor, as
the evaluation samples; ``--preset greedy``). Every configuration is compiled and warmed up first, then timed
``--reps`` times round-robin; the best wall time counts, and the best process CPU time (on a shared machine much
less affected by other jobs than the wall time; the jitted loop runs on this process's threads). Every case
decodes the same ``--prompts`` prompts (or ``batch`` when larger): batch 1 as one call per prompt, batch 8 as
calls of 8 rows. tokens/s = generated tokens (EOS included) / time; since the methods sample the same
distribution, their expected lengths agree. Prints a table, the load (``uptime``), and writes
``bench/results/speculative-<time>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMOL_P = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
              num_kv_heads=3, head_dim=64, tie_word_embeddings=True, max_position_embeddings=2048)
SMOL_Q = dict(SMOL_P, num_layers=8)


def load_default(run_dir: str, n_prompts: int):
    from ramjax import api

    p = api.load_model(os.path.join(run_dir, "warmup", "model"))
    q = api.load_model(os.path.join(run_dir, "ram", "model"))
    prompts = []
    with open(os.path.join(run_dir, "data", "eval.jsonl"), encoding="utf-8") as f:
        for line in f:
            prompts.append(json.loads(line)["prompt"])
            if len(prompts) == n_prompts:
                break
    return p, q, prompts, None


def build_smol():
    import jax

    from ramjax import model as model_lib
    from ramjax.api import Model

    models = []
    for i, shape in enumerate((SMOL_P, SMOL_Q)):
        cfg = model_lib.ModelConfig(**shape)
        models.append(Model(config=cfg, params=model_lib.init_params(cfg, jax.random.key(i))))
    rng = np.random.default_rng(0)
    return models[0], models[1], rng.integers(3, SMOL_P["vocab_size"], (64, 16)).tolist(), []


class Case:
    def __init__(self, name, p, q, prompts, eos_ids, batch, new, n_prompts=8, preset=None, **kw):
        from ramjax import sampler

        self.sample, self.name, self.batch = sampler.sample, name, batch
        self.p, self.q, self.preset = p, q, preset
        # at least 8 prompts (batch 1: 8 calls of one row, one compile), so short responses average out
        self.prompts = prompts[:max(batch, n_prompts)]
        self.kw = dict(max_new_tokens=new, seed=0, batch_size=batch, **kw)
        if eos_ids is not None:
            self.kw["eos_ids"] = eos_ids
        self.times: list[float] = []
        self.cpus: list[float] = []

    def run(self, record: bool = True):
        t, c = time.perf_counter(), time.process_time()
        out = self.sample(self.p, self.q, self.prompts, self.preset, **self.kw)
        if record:
            self.times.append(time.perf_counter() - t)
            self.cpus.append(time.process_time() - c)
        self.out = out
        return out

    def result(self) -> dict:
        rows = [r[0] for r in self.out]
        tokens = sum(r.length for r in rows)
        best = min(self.times)
        d = dict(name=self.name, batch=self.batch, tokens=tokens, best_s=best, times=self.times, cpus=self.cpus,
                 tokens_per_s=tokens / best, tokens_per_cpu_s=tokens / min(self.cpus),
                 k=self.kw.get("num_speculative_tokens", 0))
        if rows[0].acceptance_rate is not None:
            d.update(acceptance=float(np.mean([r.acceptance_rate for r in rows])),
                     tokens_per_call=float(np.mean([r.tokens_per_call for r in rows])))
        return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="default,smol")
    ap.add_argument("--run-dir", default="runs/default")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--modes", default="product")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--smol-new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8, help="prompts decoded per case (batch 1: one call each)")
    ap.add_argument("--no-eos", action="store_true",
                    help="default config: ignore EOS, so every row decodes --new tokens (steady-state decode speed)")
    ap.add_argument("--no-kl", action="store_true", help="KL monitor off (kl_threshold None) in every case")
    ap.add_argument("--preset", default=None, help="a sampling preset (sampled, greedy) instead of the defaults")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    modes = args.modes.split(",")
    results = dict(time=datetime.datetime.now(datetime.timezone.utc).isoformat(), host=platform.node(), args=vars(args),
                   uptime_before=os.popen("uptime").read().strip(), configs={})
    for config in args.configs.split(","):
        if config == "default":
            if not os.path.isdir(os.path.join(args.run_dir, "ram", "model")):
                print(f"no trained run under {args.run_dir} (ram/model): run `python train.py` first or pass "
                      f"--run-dir", file=sys.stderr)
                return 2
            p, q, prompts, eos = load_default(args.run_dir, max(args.prompts, *batches))
            if args.no_eos:
                eos = []
            new = args.new
        elif config == "smol":
            p, q, prompts, eos = build_smol()
            new = args.smol_new
        else:
            print(f"unknown config {config!r}; expected default or smol", file=sys.stderr)
            return 2
        cases = []
        extra = dict(kl_threshold=None) if args.no_kl else {}
        extra["preset"] = args.preset
        for b in batches:
            cases.append(Case("proposal", p, None, prompts, eos, b, new, args.prompts, mode="proposal", **extra))
            for mode in modes:
                cases.append(Case(mode, p, q, prompts, eos, b, new, args.prompts, mode=mode, **extra))
                for k in ks:
                    cases.append(Case(f"{mode} k={k}", p, q, prompts, eos, b, new, args.prompts, mode=mode,
                                      num_speculative_tokens=k, **extra))
        t0 = time.perf_counter()
        for c in cases:  # compile + warm up
            c.run(record=False)
        compile_s = time.perf_counter() - t0
        for _ in range(args.reps):
            for c in cases:
                c.run()
        rows = [c.result() for c in cases]
        for r in rows:
            base = next(x for x in rows if x["batch"] == r["batch"] and x["name"] == r["name"].split(" ")[0])
            prop = next(x for x in rows if x["batch"] == r["batch"] and x["name"] == "proposal")
            r["vs_token_level"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["vs_proposal"] = r["tokens_per_s"] / prop["tokens_per_s"]
            r["cpu_vs_token_level"] = r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
            r["cpu_vs_proposal"] = r["tokens_per_cpu_s"] / prop["tokens_per_cpu_s"]
        results["configs"][config] = dict(rows=rows, compile_and_warmup_s=compile_s, new_tokens=new,
                                          proposal_params=sum(x.size for x in __import__("jax").tree_util
                                                              .tree_leaves(p.params)),
                                          aligner_params=sum(x.size for x in __import__("jax").tree_util
                                                             .tree_leaves(q.params)))
        print(f"\n== {config}: P_M {results['configs'][config]['proposal_params'] / 1e6:.2f}M params, aligner "
              f"{results['configs'][config]['aligner_params'] / 1e6:.2f}M, {new} new tokens")
        print(f"{'batch':>5} {'method':<14} {'tok/s':>9} {'vs same mode':>12} {'vs proposal':>11} {'tok/CPU-s':>10} "
              f"{'(vs mode':>8} {'vs prop)':>8} {'accept':>7} {'tok/P_M call':>12}")
        for r in rows:
            acc = f"{r['acceptance']:.2f}" if "acceptance" in r else "-"
            tpc = f"{r['tokens_per_call']:.2f}" if "tokens_per_call" in r else "-"
            print(f"{r['batch']:>5} {r['name']:<14} {r['tokens_per_s']:>9.1f} {r['vs_token_level']:>11.2f}x "
                  f"{r['vs_proposal']:>10.2f}x {r['tokens_per_cpu_s']:>10.1f} {r['cpu_vs_token_level']:>7.2f}x "
                  f"{r['cpu_vs_proposal']:>7.2f}x {acc:>7} {tpc:>12}")
    results["uptime_after"] = os.popen("uptime").read().strip()
    print(f"\nload: before {results['uptime_before']}\n      after  {results['uptime_after']}")
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"speculative-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
