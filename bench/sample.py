"""Sampler benchmark on the mission's shapes: tokens/s and first-token latency of every decoding mode.

    python bench/sample.py [--batches 1,8,32] [--modes proposal,sparse,par8,par32,product] [--reps 3] [--quick]
    python bench/sample.py --shape smollm2-135m [--decode-dtype bfloat16] [--tree OTHER_CHECKOUT]

``--shape smollm2-135m``: a Llama of SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads,
head dim 64, vocabulary 49152, tied embeddings; random weights, float32, T = 1, top-p 0.95, penalty 1.05) with a
≈¼-compute aligner (hidden 384, 6 layers, MLP 1024, 6 / 2 heads, same vocabulary); adds the roofline
(``bench/roofline.py``: each mode's step time as a share of the floor), the models' jitted forward step alone (so
each mode's per-token rule overhead is reported as a share of the forward), ``sparse`` with the KL monitor on, the
first token of a 512-token prompt, and the authors' design running their ``sparse`` rule. ``--decode-dtype
bfloat16`` also runs every mode with bf16 decode weights. ``--tree DIR`` imports ramjax from another checkout (an
older commit), so before/after tables come from the same script.

Models (random weights, float32, 8192-token vocabulary, built with transformers and loaded through ``ramjax.hf``
so that the torch baselines run the very same weights):

* proposal P_M: Llama 512 wide, 8 layers, MLP 1408, 8 heads / 2 KV heads (≈31M parameters);
* aligner "1/4": 256 wide, 4 layers, MLP 704, 4 heads / 1 KV head (≈7M, the authors' benchmark aligner);
* aligner "1/8": 192 wide, 2 layers, MLP 528, 3 heads / 1 KV head (≈3.9M).

Measured (each configuration compiled and warmed up first, then the best of ``--reps`` runs taken round-robin
across modes; 16-token prompts, 64 new tokens, no EOS):

1. tokens/s (``rows × 64 / wall time`` of ``ramjax.sample``) and first-token latency (``ramjax.stream``: time to
   the first token, i.e. one prefill and one step) for each mode and batch size; compile time separately;
2. each RAM mode's throughput relative to proposal-only at the same batch (target ≥ 0.8× when Q ≤ 1/4 P_M);
3. proposal-only vs ``transformers`` ``generate`` (torch CPU, same weights and sampling settings; target ≥ 2× at
   batch 8) and vs a batch-1 Python loop of transformers forward calls doing par (n=8) with the KL monitor, the
   authors' decoder design (their reported 90–100 tok/s; target ≥ 10× at batch 8);
4. first-token latency of RAM (par) vs a sequence-level corrector (P_M drafts the whole response, then Q_θ
   starts its rewrite) at 64 and 256 new tokens, batch 1.

Prints a table and writes ``bench/results/sample-<time>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--tree" in sys.argv:  # import ramjax from another checkout (the "before" of a before/after table)
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index("--tree") + 1]))

VOCAB = 8192
TIED = False
PROMPT_LEN = 16
NEW = 64
PROPOSAL = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1408, num_attention_heads=8,
                num_key_value_heads=2)
ALIGNERS = {
    "1/4": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704, num_attention_heads=4,
                num_key_value_heads=1),
    "1/8": dict(hidden_size=192, num_hidden_layers=2, intermediate_size=528, num_attention_heads=3,
                num_key_value_heads=1),
}
MODES = {"proposal": dict(mode="proposal"), "sparse": dict(mode="sparse"), "par8": dict(mode="par", n=8),
         "par32": dict(mode="par", n=32), "product": dict(mode="product")}
# The released settings (ramjax defaults): proposal T 0.5 / top-p 0.95, aligner T 0.5 / top-p 0.9, penalty 1.05,
# KL monitor at 0.1.
SETTINGS = dict(proposal_temperature=0.5, aligner_temperature=0.5, proposal_top_p=0.95, aligner_top_p=0.9,
                repetition_penalty=1.05, kl_threshold=0.1)

SHAPES = {
    "smollm2-135m": dict(
        vocab=49152, tied=True,
        proposal=dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3),
        aligners={"1/4": dict(hidden_size=384, num_hidden_layers=6, intermediate_size=1024, num_attention_heads=6,
                              num_key_value_heads=2)},
        modes={"proposal": dict(mode="proposal"), "aligner": dict(mode="aligner"), "par8": dict(mode="par", n=8),
               "sparse": dict(mode="sparse"), "product": dict(mode="product"),
               "sparse+kl": dict(mode="sparse", kl_threshold=0.1)},
        settings=dict(proposal_temperature=1.0, aligner_temperature=1.0, proposal_top_p=0.95, aligner_top_p=0.9,
                      repetition_penalty=1.05, kl_threshold=None)),
}


def use_shape(name: str) -> None:
    """Switches the module's model shapes, modes and settings to ``SHAPES[name]``."""
    global VOCAB, TIED, PROPOSAL, ALIGNERS, MODES, SETTINGS
    sh = SHAPES[name]
    VOCAB, TIED, PROPOSAL, ALIGNERS = sh["vocab"], sh["tied"], sh["proposal"], sh["aligners"]
    MODES, SETTINGS = sh["modes"], sh["settings"]


def build_hf(directory: str, shape: dict, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, head_dim=64,
                                   tie_word_embeddings=TIED, bos_token_id=1, eos_token_id=2, **shape)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def prompts(batch: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, VOCAB, (batch, PROMPT_LEN)).tolist()


def best_time(fn, reps: int, cpu: bool = False) -> float | tuple[float, float]:
    """Best wall time of ``reps`` calls (and, with ``cpu``, the best process CPU time: on a shared machine it is
    much less affected by other processes than the wall time)."""
    times, cpus = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return (min(times), min(cpus)) if cpu else min(times)


class ModeBench:
    """One (mode, aligner, batch) configuration: ``run`` decodes the batch with ``sample``; ``first`` times the
    first token of ``stream`` (one prefill + one step)."""

    def __init__(self, sampler, proposal, aligner, mode_kw: dict, batch: int, new: int = NEW,
                 with_first: bool = True):
        self.with_first = with_first
        self.sampler, self.proposal, self.batch, self.new = sampler, proposal, batch, new
        self.aligner = aligner if mode_kw["mode"] != "proposal" else None
        self.prompts = prompts(batch)
        self.kw = dict(SETTINGS, max_new_tokens=new, eos_ids=[], seed=0, batch_size=batch, **mode_kw)
        self.skw = {k: v for k, v in self.kw.items() if k != "batch_size"}
        self.runs: list[float] = []
        self.cpus: list[float] = []
        self.firsts: list[float] = []

    def run(self):
        t, c = time.perf_counter(), time.process_time()
        out = self.sampler.sample(self.proposal, self.aligner, self.prompts, **self.kw)
        self.runs.append(time.perf_counter() - t)
        self.cpus.append(time.process_time() - c)
        return out

    def first(self):
        t = time.perf_counter()
        it = self.sampler.stream(self.proposal, self.aligner, self.prompts, **self.skw)
        next(it)
        self.firsts.append(time.perf_counter() - t)
        it.close()

    def compile(self) -> None:
        out = self.run()
        assert all(len(r[0].token_ids) == self.new for r in out)
        self.out = out
        if self.with_first:
            self.first()
        self.compile_run = self.runs.pop()
        self.compile_first = self.firsts.pop() if self.with_first else float("nan")
        self.cpus.pop()

    def result(self) -> dict:
        run, cpu = min(self.runs), min(self.cpus)
        ftl = min(self.firsts) if self.firsts else float("nan")
        out = self.out
        return dict(batch=self.batch, tokens_per_s=self.batch * self.new / run, run_s=run,
                    tokens_per_cpu_s=self.batch * self.new / cpu, cpu_s=cpu,
                    run_s_all=self.runs, first_token_s=ftl, first_token_s_all=self.firsts,
                    compile_s=max(self.compile_run - run, 0.0), stream_compile_s=max(self.compile_first - ftl, 0.0),
                    kl_fallback_rate=float(np.mean([r[0].kl_fallback_rate or 0.0 for r in out])),
                    ess_mean=(float(np.mean([r[0].ess_mean for r in out])) if out[0][0].ess_mean is not None
                              else None))


def bench_hf_generate(model, batch: int, reps: int) -> dict:
    import torch

    ids = torch.tensor(prompts(batch))
    kw = dict(do_sample=True, temperature=SETTINGS["proposal_temperature"], top_p=SETTINGS["proposal_top_p"],
              top_k=0, repetition_penalty=SETTINGS["repetition_penalty"], max_new_tokens=NEW, min_new_tokens=NEW,
              pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up
        run, cpu = best_time(lambda: model.generate(ids, **kw), reps, cpu=True)
    return dict(batch=batch, tokens_per_s=batch * NEW / run, run_s=run, tokens_per_cpu_s=batch * NEW / cpu)


def _torch_decode_loop(p_model, q_model, choose, reps: int) -> dict:
    """The authors' decoder design: batch 1, a Python loop of transformers forward calls with two KV caches;
    ``choose(zp, zq, seen)`` draws the next token ``[1]`` from the last logits of P_M and Q_θ (``seen``: the prompt
    and generated ids so far). Best of ``reps`` runs after a warm-up run; the first token's time is measured too."""
    import torch

    ids = torch.tensor(prompts(1))

    def run_once():
        with torch.no_grad():
            seen = ids[0].clone()
            out_p = p_model(ids, use_cache=True)
            out_q = q_model(ids, use_cache=True)
            past_p, past_q = out_p.past_key_values, out_q.past_key_values
            zp, zq = out_p.logits[0, -1], out_q.logits[0, -1]
            first = None
            for _ in range(NEW):
                tok = choose(zp, zq, seen)
                seen = torch.cat([seen, tok])
                if first is None:
                    first = time.perf_counter()
                out_p = p_model(tok[None], past_key_values=past_p, use_cache=True)
                out_q = q_model(tok[None], past_key_values=past_q, use_cache=True)
                past_p, past_q = out_p.past_key_values, out_q.past_key_values
                zp, zq = out_p.logits[0, -1], out_q.logits[0, -1]
        return first

    run_once()
    times, firsts, cpus = [], [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        first = run_once()
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        firsts.append(first - t)
    return dict(batch=1, tokens_per_s=NEW / min(times), run_s=min(times), first_token_s=min(firsts),
                tokens_per_cpu_s=NEW / min(cpus))


def bench_torch_par_loop(p_model, q_model, reps: int, n: int = 8) -> dict:
    """The authors' decoder design (``_torch_decode_loop``) with par: n candidates from P_M's top-p nucleus,
    weights from Q_θ, and the KL monitor."""
    import torch

    g = torch.Generator().manual_seed(0)
    t_m, t_q, top_p = SETTINGS["proposal_temperature"], SETTINGS["aligner_temperature"], SETTINGS["proposal_top_p"]

    def choose(zp, zq, seen):
        lp, lq = torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)
        kl = torch.sum(lp.exp() * (lp - lq))
        probs = torch.softmax(zp / t_m, -1)
        sp, si = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sp, -1) - sp) < top_p
        nucleus = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        if kl > SETTINGS["kl_threshold"]:
            return torch.multinomial(nucleus, 1, generator=g)
        cand = torch.multinomial(nucleus, n, replacement=True, generator=g)
        w = torch.softmax(zq[cand] / t_q, -1)
        return cand[torch.multinomial(w, 1, generator=g)]

    return _torch_decode_loop(p_model, q_model, choose, reps)


def forward_step_s(model, batch: int, reps: int, cache_len: int = PROMPT_LEN + NEW, dtype: str | None = None,
                   cpu: bool = False) -> float | tuple[float, float]:
    """Best time of the model's jitted single-token decode step with a KV cache (``cache_len`` slots, donated),
    the way the sampler runs it in this checkout (per-layer ``decode_forward`` when it exists, else ``forward``);
    with ``cpu``, ``(wall, process CPU)``."""
    import jax
    import jax.numpy as jnp

    from ramjax import model as model_lib

    cfg, params = model.config, model.params
    tok = jnp.ones((batch, 1), jnp.int32)
    pos = jnp.full((batch, 1), PROMPT_LEN, jnp.int32)
    seg = jnp.ones((batch, 1), jnp.int32)
    if hasattr(model_lib, "decode_forward"):
        try:  # the sampler's own decode weights (per-layer views, a decode dtype, a tied model's transposed head)
            from ramjax.decode_loop import _decode_weights

            cfg, params = _decode_weights(model, None, (), dtype)
        except ImportError:  # an older tree
            if dtype is not None:
                cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
                params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
            params = jax.jit(model_lib.unstack_layers)(params)
        cache = model_lib.init_layer_cache(cfg, batch, cache_len)
        fwd = jax.jit(lambda p, c: model_lib.decode_forward(cfg, p, tok, pos, seg, c), donate_argnums=(1,))
    else:
        cache = model_lib.init_cache(cfg, batch, cache_len)
        fwd = jax.jit(lambda p, c: model_lib.forward(cfg, p, tok, pos, seg, c, last_only=True), donate_argnums=(1,))
    state = {"c": cache}

    def step():
        logits, c = fwd(params, state["c"])
        state["c"] = c.replace(index=jnp.int32(PROMPT_LEN))
        logits.block_until_ready()

    return best_time(step, reps, cpu=cpu)


def rule_s(mode_kw: dict, batch: int, reps: int, cpu: bool = False) -> float | tuple[float, float]:
    """Best time of the per-token rule alone (``decode_rules.choose``, jitted, every input a traced argument) on
    random ``[batch, VOCAB]`` logits with SETTINGS, KL monitor as the mode sets it."""
    import jax
    import jax.numpy as jnp

    from ramjax import decode_rules as R

    kw = dict(SETTINGS, **mode_kw)
    mode, n = kw["mode"], kw.get("n", 1)
    kl = kw.get("kl_threshold")
    B, V = batch, VOCAB
    zp = jax.random.normal(jax.random.key(1), (B, V)) * 0.5
    zq = jax.random.normal(jax.random.key(2), (B, V)) * 0.5
    seen = jnp.zeros((B, V), bool).at[:, :PROMPT_LEN].set(True)
    f32 = lambda v: jnp.full((B,), v, jnp.float32)  # noqa: E731
    rp = R.RowParams(proposal_temperature=f32(kw["proposal_temperature"]),
                     aligner_temperature=f32(kw["aligner_temperature"]), proposal_top_p=f32(kw["proposal_top_p"]),
                     aligner_top_p=f32(kw["aligner_top_p"]), top_k=jnp.zeros((B,), jnp.int32),
                     repetition_penalty=f32(kw["repetition_penalty"]), kl_threshold=f32(kl if kl else jnp.inf),
                     greedy=jnp.zeros((B,), bool))
    u = jax.random.uniform(jax.random.key(3), (B, R.num_uniforms(mode, n)))
    fn = jax.jit(lambda zp, zq, seen, u, rp: R.choose(mode, zp, zq, seen, u, rp, kl_monitor=kl is not None).token)
    return best_time(lambda: fn(zp, zq, seen, u, rp).block_until_ready(), reps, cpu=cpu)


def bench_torch_sparse_loop(p_model, q_model, reps: int) -> dict:
    """The authors' decoder design (``_torch_decode_loop``) running their released rule: ``sparse`` =
    softmax(z_Q / T_Q) restricted to P_M's top-p nucleus, then the aligner-side top-p, repetition penalty on the
    aligner's logits."""
    import torch

    g = torch.Generator().manual_seed(0)
    t_m, t_q = SETTINGS["proposal_temperature"], SETTINGS["aligner_temperature"]
    top_p_m, top_p_q, pen = SETTINGS["proposal_top_p"], SETTINGS["aligner_top_p"], SETTINGS["repetition_penalty"]

    def top_p_mask(probs, top_p):
        sp, si = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sp, -1) - sp) < top_p
        return torch.zeros_like(probs, dtype=torch.bool).scatter(0, si[keep], True)

    def choose(zp, zq, seen):
        nucleus = top_p_mask(torch.softmax(zp / t_m, -1), top_p_m)
        zq = zq.clone()
        sel = zq[seen]
        zq[seen] = torch.where(sel < 0, sel * pen, sel / pen)
        probs = torch.softmax(torch.where(nucleus, zq / t_q, torch.tensor(-float("inf"))), -1)
        probs = torch.where(top_p_mask(probs, top_p_q), probs, torch.tensor(0.0))
        return torch.multinomial(probs, 1, generator=g)

    return _torch_decode_loop(p_model, q_model, choose, reps)


def first_token_long_prompt_s(sampler, proposal, length: int, reps: int) -> float:
    """First-token latency of ``stream`` (prefill + first draw) for one ``length``-token prompt, proposal-only."""
    ps = [list(np.random.default_rng(1).integers(3, VOCAB, length))]
    kw = dict(SETTINGS, eos_ids=[], seed=0, max_new_tokens=NEW, mode="proposal")

    def first():
        it = sampler.stream(proposal, None, ps, **kw)
        next(it)
        it.close()

    return best_time(first, reps)


def bench_corrector(ramjax, proposal, aligner, new: int, reps: int) -> dict:
    """First-token latency at batch 1: RAM (par, token level) vs a sequence-level corrector, which drafts the whole
    response with P_M and only then starts the rewrite with Q_θ (prefill over prompt + draft, one step)."""
    ps = prompts(1)
    kw = dict(SETTINGS, eos_ids=[], seed=0)

    def ram_first():
        it = ramjax.stream(proposal, aligner, ps, mode="par", n=8, max_new_tokens=new, **kw)
        next(it)
        it.close()

    def corrector_first():
        draft = ramjax.sample(proposal, None, ps, mode="proposal", max_new_tokens=new, **kw)[0][0].token_ids
        it = ramjax.stream(aligner, None, [ps[0] + draft], mode="proposal", max_new_tokens=new, **kw)
        next(it)
        it.close()

    ram_first(), corrector_first()  # compile
    return dict(new_tokens=new, ram_first_token_s=best_time(ram_first, reps),
                corrector_first_token_s=best_time(corrector_first, reps))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="mission", choices=["mission", *SHAPES])
    ap.add_argument("--batches", default=None, help="default 1,8,32 (mission) / 1,8 (smollm2-135m)")
    ap.add_argument("--modes", default=None, help="default: every mode of the shape")
    ap.add_argument("--aligners", default=None, help="default 1/4,1/8 (mission) / 1/4 (smollm2-135m)")
    ap.add_argument("--decode-dtype", default=None, choices=["bfloat16"],
                    help="also time the forward step, and the --dtype-modes whole calls, with this decode dtype "
                         "(SamplingParams.decode_dtype)")
    ap.add_argument("--dtype-modes", default="proposal,sparse",
                    help="modes whose whole call also runs with --decode-dtype ('' = the forward step only)")
    ap.add_argument("--tree", default=None, help="import ramjax from this checkout instead (before/after runs)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="batch 8 only, 2 reps, no 256-token corrector run")
    ap.add_argument("--no-baselines", action="store_true",
                    help="ramjax only: skip HF generate, the torch loops of the authors' design, the corrector and "
                         "the long-prompt first tokens (for rule shares and mode ratios on a busy machine)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    smol = args.shape != "mission"
    if smol:
        use_shape(args.shape)
    args.batches = args.batches or ("1,8" if smol else "1,8,32")
    args.modes = args.modes or ",".join(MODES)
    args.aligners = args.aligners or ",".join(ALIGNERS)
    if args.quick:
        args.batches, args.reps = "8", 2
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    aligner_names = args.aligners.split(",")
    if args.decode_dtype:
        for m in [m for m in modes if m in args.dtype_modes.split(",")]:
            MODES[f"{m}@bf16"] = dict(MODES[m], decode_dtype=args.decode_dtype)
            modes.append(f"{m}@bf16")

    import jax
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import ramjax
    from ramjax import model as model_lib
    from ramjax import sampler

    tmp = tempfile.mkdtemp(prefix="ramjax-bench-")
    hf_p = build_hf(os.path.join(tmp, "p"), PROPOSAL, 0)
    proposal = ramjax.load_model(os.path.join(tmp, "p"))
    hf_q, aligners = {}, {}
    for i, name in enumerate(aligner_names):
        hf_q[name] = build_hf(os.path.join(tmp, f"q{i}"), ALIGNERS[name], i + 1)
        aligners[name] = ramjax.load_model(os.path.join(tmp, f"q{i}"))
    n_p = model_lib.count_params(proposal.params)
    sizes = {name: model_lib.count_params(m.params) for name, m in aligners.items()}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"proposal {n_p / 1e6:.1f}M params; aligners " + ", ".join(
        f"{k}: {v / 1e6:.1f}M ({v / n_p:.2f}×)" for k, v in sizes.items()) + f"; jax {jax.__version__} on "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cores, load {load})", flush=True)

    results: dict = dict(meta=dict(time=datetime.datetime.now().isoformat(timespec="seconds"),
                                   machine=platform.machine(), cpus=os.cpu_count(), load_before=load,
                                   jax=jax.__version__, device=str(jax.devices()[0]), proposal_params=n_p,
                                   aligner_params=sizes, prompt_len=PROMPT_LEN, new_tokens=NEW, settings=SETTINGS),
                         modes=[], hf_generate=[], torch_par_loop=None, corrector=[])
    results["meta"].update(shape=args.shape, tree=args.tree or ".", ramjax_file=ramjax.__file__,
                           glibc_tunables=os.environ.get("GLIBC_TUNABLES"))
    fwd: dict = {}
    fwd_cpu: dict = {}
    rule_wall: dict = {}
    rule_cpu: dict = {}
    if smol:  # roofline, the forward step alone, the rule alone
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import roofline

        roof = roofline.measure(hidden=PROPOSAL["hidden_size"], mlp=PROPOSAL["intermediate_size"],
                                batches=tuple(batches))
        results["roofline"] = roof
        print(f"roofline: {roof['bandwidth'] / 1e9:.1f} GB/s, f32 matmul {roof['matmul_square'] / 1e9:.1f} GFLOP/s",
              flush=True)
        dts = [None] + ([args.decode_dtype] if args.decode_dtype else [])
        for b in batches:
            for dt in dts:
                for name, m in [("P", proposal)] + [(f"Q{k}", a) for k, a in aligners.items()]:
                    try:
                        fwd[(name, b, dt)], fwd_cpu[(name, b, dt)] = forward_step_s(m, b, args.reps * 3, dtype=dt,
                                                                                    cpu=True)
                    except Exception as e:  # noqa: BLE001 - an older tree has no decode dtype
                        print(f"  forward {name} B={b} {dt}: {e}")
                print(f"  forward step B={b} {dt or 'f32'}: " + ", ".join(
                    f"{k[0]} {v * 1e3:.1f} ms wall, {fwd_cpu[k] * 1e3:.1f} ms CPU" for k, v in fwd.items()
                    if k[1] == b and k[2] == dt), flush=True)
        results["forward_step_s"] = {f"{k[0]}|{k[1]}|{k[2] or 'model'}": v for k, v in fwd.items()}
        results["forward_step_cpu_s"] = {f"{k[0]}|{k[1]}|{k[2] or 'model'}": v for k, v in fwd_cpu.items()}
        results["rule_s"], results["rule_cpu_s"] = {}, {}
        for b in batches:
            for mode in [m for m in MODES if "@" not in m]:  # every mode: the rule alone compiles fast
                r, c = rule_s(MODES[mode], b, args.reps * 3, cpu=True)
                results["rule_s"][f"{mode}|{b}"], results["rule_cpu_s"][f"{mode}|{b}"] = r, c
                rule_wall[(mode, b)], rule_cpu[(mode, b)] = r, c
                print(f"  rule alone {mode:9s} B={b}: {r * 1e3:.2f} ms wall, {c * 1e3:.2f} ms CPU", flush=True)
    rows = []
    for batch in batches:
        # Compile every configuration of this batch size, then time them round-robin (best of --reps), so that
        # load changes on a shared machine hit all modes alike and the ratios stay meaningful.
        benches = []
        for mode in modes:
            for name in ([None] if mode == "proposal" else aligner_names):
                # smollm2: the stream's first token (its own compiles) only where the targets need it
                with_first = not args.no_baselines and (not smol or (batch == 1 and mode in ("proposal", "sparse")))
                mb = ModeBench(sampler, proposal, aligners[name] if name else None, MODES[mode], batch,
                               with_first=with_first)
                mb.compile()
                benches.append((mode, name, mb))
        for _ in range(args.reps):
            for _, _, mb in benches:
                mb.run()
                if mb.with_first:
                    mb.first()
        for mode, name, mb in benches:
            r = mb.result()
            r.update(mode=mode, aligner=name)
            results["modes"].append(r)
            rows.append(r)
            print(f"  {mode:9s} Q={name or '-':4s} B={batch:3d}: {r['tokens_per_s']:8.1f} tok/s, "
                  f"{r['tokens_per_cpu_s']:8.1f} tok per CPU-s, first token "
                  f"{r['first_token_s'] * 1e3:7.1f} ms, compile {r['compile_s']:5.1f}s", flush=True)
    for b in [] if args.no_baselines else (sorted({1, 8} & set(batches)) or [batches[0]]):
        r = bench_hf_generate(hf_p, b, args.reps)
        results["hf_generate"].append(r)
        print(f"  transformers generate B={b}: {r['tokens_per_s']:.1f} tok/s", flush=True)
    if aligner_names and not smol and not args.no_baselines:
        results["torch_par_loop"] = bench_torch_par_loop(hf_p, hf_q[aligner_names[0]], args.reps)
        print(f"  torch par loop (authors' design) B=1: {results['torch_par_loop']['tokens_per_s']:.1f} tok/s",
              flush=True)
        for new in ([64] if args.quick else [64, 256]):
            r = bench_corrector(sampler, proposal, aligners[aligner_names[0]], new, args.reps)
            results["corrector"].append(r)
            print(f"  first token, {new} new: RAM {r['ram_first_token_s'] * 1e3:.1f} ms vs corrector "
                  f"{r['corrector_first_token_s'] * 1e3:.1f} ms", flush=True)

    # Ratios and table
    prop = {r["batch"]: r for r in rows if r["mode"] == "proposal"}
    for r in rows:
        base = prop.get(r["batch"])
        r["vs_proposal"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["vs_proposal_cpu"] = r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"] if base else None
    if smol:
        n_q = sizes[aligner_names[0]]
        emb_p = VOCAB * PROPOSAL["hidden_size"]
        emb_q = VOCAB * ALIGNERS[aligner_names[0]]["hidden_size"]
        for r in rows:
            base_mode = r["mode"].split("@")[0]
            dt = MODES[r["mode"]].get("decode_dtype")
            nbytes = 2 if dt == "bfloat16" else 4
            use_p = base_mode != "aligner"
            use_q = base_mode != "proposal"
            # tied embeddings: the table is read once (the LM head); the lookup touches B rows only
            wbytes = nbytes * ((n_p if use_p else 0) + (n_q if use_q else 0))
            mparams = ((n_p if use_p else 0) + (n_q if use_q else 0)) if TIED else (
                (n_p - emb_p if use_p else 0) + (n_q - emb_q if use_q else 0))
            fl = roofline.step_floor(wbytes, mparams, r["batch"], results["roofline"])
            step = r["run_s"] / NEW
            qname = f"Q{aligner_names[0]}"
            f = (fwd.get(("P", r["batch"], dt), 0.0) if use_p else 0.0) + (
                fwd.get((qname, r["batch"], dt), 0.0) if use_q else 0.0)
            fc = (fwd_cpu.get(("P", r["batch"], dt), 0.0) if use_p else 0.0) + (
                fwd_cpu.get((qname, r["batch"], dt), 0.0) if use_q else 0.0)
            rw, rc = rule_wall.get((base_mode, r["batch"])), rule_cpu.get((base_mode, r["batch"]))
            step_cpu = r["cpu_s"] / NEW
            # The rule's share of the models' forward (P_M + Q_θ; Q_θ alone in aligner mode, P_M alone in proposal
            # mode), and the whole call (prefill included) against forward + rule per token, in wall time and in
            # process CPU time (the latter much less sensitive to other processes on a shared machine).
            r.update(step_s=step, floor_s=fl["floor_s"], bound=fl["bound"], floor_share=fl["floor_s"] / step,
                     forward_s=f or None, overhead_vs_forward=(step - f) / f if f else None,
                     step_cpu_s=step_cpu, forward_cpu_s=fc or None, rule_s=rw, rule_cpu_s=rc,
                     rule_share=rw / f if f and rw else None, rule_share_cpu=rc / fc if fc and rc else None,
                     whole_vs_forward_rule=step / (f + rw) if f and rw else None,
                     whole_vs_forward_rule_cpu=step_cpu / (fc + rc) if fc and rc else None)
    if smol and not args.no_baselines:
        results["torch_sparse_loop"] = bench_torch_sparse_loop(hf_p, hf_q[aligner_names[0]], args.reps)
        print(f"  torch sparse loop (authors' design) B=1: {results['torch_sparse_loop']['tokens_per_s']:.1f} tok/s, "
              f"first token {results['torch_sparse_loop']['first_token_s'] * 1e3:.1f} ms", flush=True)
        results["first_token_512_s"] = first_token_long_prompt_s(sampler, proposal, 512, args.reps)
        results["first_token_17_s"] = first_token_long_prompt_s(sampler, proposal, 17, args.reps)
    if smol:
        from ramjax.decode_loop import bucket_length

        # a prompt is padded to its bucket, prefilled by both models and attended over by every step
        results["prompt_bucket"] = {n: bucket_length(n, fine=True) for n in (16, 17, 24, 25, 512)}
        print(f"  prompt buckets (positions paid per prompt length): {results['prompt_bucket']}", flush=True)
        if "first_token_512_s" in results:
            print(f"  first token, 512-token prompt: {results['first_token_512_s'] * 1e3:.1f} ms; 17-token: "
                  f"{results['first_token_17_s'] * 1e3:.1f} ms", flush=True)
        results["forward_floor_share"] = {}
        for b in batches:
            for dt in [None] + ([args.decode_dtype] if args.decode_dtype else []):
                fp = fwd.get(("P", b, dt))
                if fp:
                    nb = 2 if dt == "bfloat16" else 4
                    fl = roofline.step_floor(nb * n_p, n_p if TIED else n_p - emb_p, b, results["roofline"])
                    results["forward_floor_share"][f"P|{b}|{dt or 'float32'}"] = fl["floor_s"] / fp
                    print(f"  P forward step alone B={b} {dt or 'float32'}: {fp * 1e3:.1f} ms = "
                          f"{fl['floor_s'] / fp:.0%} of its floor ({fl['bound']}-bound, {fl['floor_s'] * 1e3:.1f} ms)")
    hf = {r["batch"]: r for r in results["hf_generate"]}
    loop = results["torch_par_loop"]
    par8_b8 = next((r for r in rows if r["mode"] == "par8" and r["batch"] == 8), None)
    sparse = {r["batch"]: r for r in rows if r["mode"] == "sparse"}
    sl = results.get("torch_sparse_loop")
    results["summary"] = dict(
        proposal_vs_hf_generate={b: prop[b]["tokens_per_s"] / hf[b]["tokens_per_s"] for b in hf if b in prop},
        proposal_vs_hf_generate_cpu={b: prop[b]["tokens_per_cpu_s"] / hf[b]["tokens_per_cpu_s"]
                                     for b in hf if b in prop},
        proposal_b8_vs_authors_95=(prop[8]["tokens_per_s"] / 95.0) if 8 in prop else None,
        par8_b8_vs_torch_par_loop=(par8_b8["tokens_per_s"] / loop["tokens_per_s"]) if par8_b8 and loop else None,
        par8_b8_vs_torch_par_loop_cpu=(par8_b8["tokens_per_cpu_s"] / loop["tokens_per_cpu_s"]) if par8_b8 and loop
        else None,
        sparse_vs_authors_sparse_loop={b: sparse[b]["tokens_per_s"] / sl["tokens_per_s"] for b in sparse} if sl
        else None,
        sparse_first_token_vs_authors=(sparse[1]["first_token_s"] / sl["first_token_s"]) if sl and 1 in sparse
        else None,
        load_after=os.getloadavg() if hasattr(os, "getloadavg") else None)
    print("\n| mode | Q | batch | tok/s (wall) | × proposal | tok per CPU-s | × proposal (CPU) | first token (ms) "
          "| compile (s) |" + (" ms/step | floor share | rule+loop over forward | rule / forward (wall, CPU) | "
                              "whole / (forward + rule) (wall, CPU) |" if smol else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|---|" if smol else ""))
    for r in rows:
        ratio = f"{r['vs_proposal']:.2f}" if r["vs_proposal"] is not None else "-"
        ratio_cpu = f"{r['vs_proposal_cpu']:.2f}" if r["vs_proposal_cpu"] is not None else "-"
        extra = ""
        if smol:
            ov = f"{r['overhead_vs_forward']:+.0%}" if r.get("overhead_vs_forward") is not None else "-"
            pct = lambda x: f"{x:.0%}" if x is not None else "-"  # noqa: E731
            rat = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
            extra = (f" {r['step_s'] * 1e3:.1f} | {r['floor_share']:.0%} ({r['bound'][:3]}) | {ov} | "
                     f"{pct(r.get('rule_share'))}, {pct(r.get('rule_share_cpu'))} | "
                     f"{rat(r.get('whole_vs_forward_rule'))}, {rat(r.get('whole_vs_forward_rule_cpu'))} |")
        print(f"| {r['mode']} | {r['aligner'] or '-'} | {r['batch']} | {r['tokens_per_s']:.1f} | {ratio} | "
              f"{r['tokens_per_cpu_s']:.1f} | {ratio_cpu} | {r['first_token_s'] * 1e3:.1f} | {r['compile_s']:.1f} |"
              + extra)
    print(json.dumps(results["summary"], indent=1))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sample-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
