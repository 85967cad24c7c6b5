"""Training cost: the RAM aligner vs fully fine-tuning the proposal, per optimizer step on the same data.

Systems (one process, same batch of examples, each step one jitted ``train_lib`` step with donated state):

* ``proposal SFT``    full fine-tune of the proposal P_M (AdamW), token NLL on the data responses (1 sequence per
                      example);
* ``proposal DPO``    full DPO of P_M (AdamW): chosen and rejected sequences per example; the reference
                      log-probs are precomputed, and the cost of that reference forward pass over the same batch is
                      measured separately and added in the ``+ref`` column;
* ``aligner RAM 1/k``  the residual aligner Q_θ at ~1/4 and ~1/8 of P_M's parameters with the RAM loss (RMSprop,
                      as in the paper): data and negative sequences per example (2 sequences), P_M not involved.

Shapes: the mission's proposal (Llama, 512 wide, 8 layers, MLP 1408, 8 heads / 2 KV heads, 8k vocabulary) and
aligners of 256 wide × 4 layers (~1/4.4) and 176 wide × 3 layers (~1/8). All systems are compiled first, then
timed round-robin (one step of each in turn, ``--repeats`` rounds) so load drift on a shared machine hits them
alike. Reported: compile seconds, median step seconds, examples/s, input tokens/s, the compiled per-device memory
estimate, and the cost ratios (proposal step time / aligner step time). The paper reports RAM training 4× (vs SFT)
to 13× (vs DPO) cheaper.

    python bench/train_step.py [--batch 8] [--seq 128] [--repeats 3] [--dtype float32] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ramjax import loss as loss_lib  # noqa: E402
from ramjax import model as model_lib  # noqa: E402
from ramjax import sharding as shd  # noqa: E402
from ramjax import (
    stages,  # noqa: E402
    train_lib,  # noqa: E402
)

V = 8192
PROPOSAL = dict(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64)
ALIGNERS = {
    "1/4": dict(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=1, head_dim=64),
    "1/8": dict(hidden_size=176, intermediate_size=480, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=44),
}
_LM = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def make_batch(B: int, T: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Chosen/data and rejected/negative rows: a prompt of T/4 tokens (masked), then a response of random length
    filling 50-100% of the rest (trained), then padding."""
    rng = np.random.default_rng(seed)
    out = {}
    P = T // 4
    for name in ("chosen", "rejected"):
        tok = rng.integers(3, V, size=(B, T + 1)).astype(np.int32)
        length = P + rng.integers((T - P) // 2, T - P + 1, size=B)
        idx = np.arange(T)[None]
        seg = (idx < length[:, None]).astype(np.int32)
        out[f"{name}_tokens"] = tok[:, :T] * seg
        out[f"{name}_targets"] = tok[:, 1:] * seg
        out[f"{name}_loss_mask"] = ((idx >= P - 1) & (idx < length[:, None] - 1)).astype(np.float32)
        out[f"{name}_segment_ids"] = seg
        out[f"{name}_positions"] = (idx * seg).astype(np.int32)
    out["example_index"] = np.arange(B, dtype=np.int32)
    for k in _LM:  # SFT reads the data responses under the plain names
        out[k] = out["chosen_" + k]
    return out


def _random_params(cfg: model_lib.ModelConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype),
                                  model_lib.param_shapes(cfg))


class System:
    """One compiled train step with its state and batch; ``run()`` times one step."""

    def __init__(self, name: str, cfg: model_lib.ModelConfig, objective, opt_name: str, batch, mesh,
                 frozen=None):
        self.name, self.cfg, self.opt_name, self.frozen = name, cfg, opt_name, frozen
        sched = train_lib.make_schedule(1e-5, 1000)
        optimizer = train_lib.make_optimizer(opt_name, sched, clip_norm=10.0)
        p_sh = model_lib.param_shardings(cfg, mesh)
        params = shd.shard_tree(_random_params(cfg, 0), p_sh)
        shapes = jax.eval_shape(lambda p: train_lib.init_state(p, optimizer, jax.random.key(0)), params)
        st_sh = train_lib.state_shardings(shapes, p_sh, mesh)
        self.state = jax.jit(lambda p: train_lib.init_state(p, optimizer, jax.random.key(0)),
                             out_shardings=st_sh)(params)
        b = {k: batch[k] for k in objective.batch_keys}
        b_sh = train_lib.batch_shardings(b, mesh)
        self.batch = {k: jax.device_put(v, b_sh[k]) for k, v in b.items()}
        f_sh = None if frozen is None else {k: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                                           for k in frozen}
        step_fn = train_lib.make_train_step(objective, optimizer, forward=stages.model_forward(cfg, mesh),
                                            schedule=sched, mesh=mesh)
        step = train_lib.jit_train_step(step_fn, st_sh, b_sh, f_sh, mesh)
        t0 = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch, frozen).compile()
        self.compile_s = time.perf_counter() - t0
        self.mem = train_lib.memory_report(self.compiled)
        self.times: list[float] = []
        self.run(record=False)  # warm-up

    def run(self, record: bool = True) -> None:
        t0 = time.perf_counter()
        self.state, self.metrics = self.compiled(self.state, self.batch, self.frozen)
        jax.block_until_ready(self.metrics)
        if record:
            self.times.append(time.perf_counter() - t0)

    def row(self, n_examples: int) -> dict:
        step_s = float(np.median(self.times))
        tokens = float(self.metrics["input_tokens"])
        n = model_lib.count_params(model_lib.param_shapes(self.cfg))
        matmul_params = n - self.cfg.vocab_size * self.cfg.hidden_size  # the embedding lookup is a gather
        return {"system": self.name, "params": n, "gflop_per_step": 6.0 * matmul_params * tokens / 1e9,
                "optimizer": self.opt_name, "compile_s": self.compile_s, "step_s": step_s,
                "step_s_all": self.times, "examples_per_s": n_examples / step_s, "input_tokens_per_step": tokens,
                "tokens_per_s": tokens / step_s, "peak_mib": self.mem.get("peak_estimate_bytes", 0) / 2**20,
                "loss": float(self.metrics["loss"])}


def bench_reference_pass(cfg: model_lib.ModelConfig, batch, mesh, repeats: int) -> float:
    """Seconds of the DPO reference forward pass (chosen + rejected) over one batch."""
    p_sh = model_lib.param_shardings(cfg, mesh)
    params = shd.shard_tree(_random_params(cfg, 1), p_sh)

    def ref(params, b):
        both = {k: jnp.concatenate([b["chosen_" + k], b["rejected_" + k]], axis=0) for k in _LM}
        logits, _ = model_lib.forward(cfg, params, both["tokens"], both["positions"], both["segment_ids"], mesh=mesh)
        return loss_lib.sequence_logprobs(logits, both["targets"], both["loss_mask"], both["segment_ids"])

    b = {k: v for k, v in batch.items() if k.startswith(("chosen_", "rejected_"))}
    f = jax.jit(ref)
    jax.block_until_ready(f(params, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(params, b))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    batch = make_batch(args.batch, args.seq)
    common = dict(vocab_size=V, dtype=args.dtype, max_position_embeddings=max(2048, args.seq))
    p_cfg = model_lib.ModelConfig(**PROPOSAL, **common)
    ref_table = {"ref_logps": jnp.zeros((args.batch, 2), jnp.float32)}
    systems = [System("proposal SFT", p_cfg, loss_lib.lm_objective(), "adamw", batch, mesh),
               System("proposal DPO", p_cfg, loss_lib.dpo_objective(0.1), "adamw", batch, mesh,
                      frozen=ref_table)]
    for ratio, shape in ALIGNERS.items():
        a_cfg = model_lib.ModelConfig(**shape, **common)
        systems.append(System(f"aligner RAM {ratio}", a_cfg, loss_lib.ram_objective(1e-4),
                              "rmsprop", batch, mesh))
    # Round-robin timing: on a shared machine the load drifts, and interleaving gives every system the same drift.
    for _ in range(args.repeats):
        for s in systems:
            s.run()
    rows = [s.row(args.batch) for s in systems]
    ref_s = bench_reference_pass(p_cfg, batch, mesh, args.repeats)
    rows[1]["reference_pass_s"] = ref_s

    sft, dpo = rows[0], rows[1]
    print(f"\ntrain step, batch {args.batch} x {args.seq} tokens, {args.dtype}, {jax.device_count()} "
          f"{jax.default_backend()} device(s), median of {args.repeats}\n")
    hdr = (f"{'system':<18}{'params':>12}{'size':>8}{'compile s':>11}{'step s':>9}{'ex/s':>8}{'tok/s':>9}"
           f"{'GFLOP':>8}{'peak MiB':>10}{'SFT/x':>8}{'(FLOP)':>8}{'DPO/x':>8}{'DPO+ref/x':>11}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        size = sft["params"] / r["params"]
        r["size_ratio"] = size
        r["cost_ratio_vs_sft"] = sft["step_s"] / r["step_s"]
        r["cost_ratio_vs_dpo"] = dpo["step_s"] / r["step_s"]
        r["cost_ratio_vs_dpo_with_ref"] = (dpo["step_s"] + ref_s) / r["step_s"]
        r["flop_ratio_vs_sft"] = sft["gflop_per_step"] / r["gflop_per_step"]
        print(f"{r['system']:<18}{r['params']:>12,}{'1/' + format(size, '.1f'):>8}{r['compile_s']:>11.1f}"
              f"{r['step_s']:>9.3f}{r['examples_per_s']:>8.1f}{r['tokens_per_s']:>9.0f}{r['gflop_per_step']:>8.1f}"
              f"{r['peak_mib']:>10.0f}{r['cost_ratio_vs_sft']:>8.2f}{r['flop_ratio_vs_sft']:>8.2f}"
              f"{r['cost_ratio_vs_dpo']:>8.2f}{r['cost_ratio_vs_dpo_with_ref']:>11.2f}")
    print(f"\nDPO reference forward pass over the batch: {ref_s:.3f} s (done once per example before training)")
    print("SFT/x, DPO/x: proposal step time divided by this system's (how many times cheaper the system is); "
          "(FLOP): the same ratio from 6 x matmul params x input tokens (RAM reads 2 sequences per example, SFT 1).")
    out = {"batch": args.batch, "seq": args.seq, "dtype": args.dtype, "repeats": args.repeats,
           "backend": jax.default_backend(), "devices": jax.device_count(), "jax": jax.__version__,
           "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
