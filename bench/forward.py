"""Forward speed: the jitted ramjax decoder vs transformers (torch CPU) on the same weights.

For each model size a random ``LlamaForCausalLM`` is built with torch (seeded), saved with ``save_pretrained`` and
loaded with ``ramjax.hf.load_hf``, so both sides run identical float32 weights. Measured, per batch size:

* ``prefill``     a ``prompt_len``-token forward that fills the KV cache and returns the last position's logits
                  (ramjax: ``forward(..., cache, last_only=True)``; transformers: ``model(..., use_cache=True,
                  logits_to_keep=1)``);
* ``decode``      per-token time of the ``new_tokens - 1`` greedy steps after that prefill (whose argmax is the
                  first new token). ramjax twice: ``jax step``
                  (one jitted single-token forward per Python iteration, cache donated) and ``jax loop`` (all steps
                  in one jitted ``lax.scan``, as the sampler runs); transformers: its ``DynamicCache`` forward in a
                  Python loop under ``torch.inference_mode``.

Compile time (lower + compile of each jitted function) is reported separately and never enters the timings.
Cases run round-robin (one warm-up round, then ``--repeats`` rounds of every case in turn) so that the varying load
of a shared machine falls on both sides alike; tables show medians, the JSON also has minima. transformers runs at
each ``--torch-threads`` count and the fastest is kept per phase (on a loaded 2-core machine torch's spinning
thread pool was 10-40x slower with 2 threads than with 1). Correctness guards: max |Δ logit| of the prefill logits
and the fraction of greedy tokens on which both sides agree. Speed-ups are transformers time / ramjax time.

Sizes: the mission's proposal (31M: 512 wide, 8 layers, MLP 1408, 8 heads / 2 KV heads, 8k vocabulary) and aligner
(7M: 256 wide, 4 layers, MLP 704, 4 heads / 1 KV head).

    python bench/forward.py [--sizes proposal-31M,aligner-7M] [--batches 1,8] [--prompt-len 128]
                            [--new-tokens 32] [--repeats 5] [--out bench/results/forward.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ramjax import hf  # noqa: E402
from ramjax import model as model_lib  # noqa: E402

VOCAB = 8192
SIZES = {
    "proposal-31M": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2),
    "aligner-7M": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=1),
    "tiny-1M": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1),
}


def build_hf(directory: str, size: dict, seed: int):
    """A random float32 LlamaForCausalLM with O(1) logits, saved to ``directory``; returns the torch model."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, rope_theta=10000.0,
                                   attn_implementation="eager", dtype="float32", **size)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[-1]))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def compile_timed(jitted, *args):
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t


def jax_cases(cfg, params, prompt: np.ndarray, new_tokens: int) -> tuple[dict, dict, dict]:
    """Measurement closures for ramjax (each returns ``(seconds, greedy tokens or None)``), compile seconds, and
    the prefill's last logits."""
    B, P = prompt.shape
    max_len = P + new_tokens + 1
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))

    def prefill(params, tokens):
        cache = model_lib.init_cache(cfg, B, max_len)
        logits, cache = model_lib.forward(cfg, params, tokens, pos, cache=cache, last_only=True)
        return logits[:, -1], cache

    def step(params, cache, tok):
        p = jnp.broadcast_to(cache.index, (B, 1)).astype(jnp.int32)
        logits, cache = model_lib.forward(cfg, params, tok, p, cache=cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], cache

    def loop(params, cache, tok):
        def body(carry, _):
            tok, cache = carry
            tok, cache = step(params, cache, tok)
            return (tok, cache), tok[:, 0]
        (_, cache), toks = jax.lax.scan(body, (tok, cache), None, length=new_tokens - 1)
        return toks.T, cache

    tokens = jnp.asarray(prompt)
    prefill_c, t_prefill = compile_timed(jax.jit(prefill), params, tokens)
    last, cache0 = prefill_c(params, tokens)
    tok0 = jnp.argmax(last, -1).astype(jnp.int32)[:, None]
    step_c, t_step = compile_timed(jax.jit(step, donate_argnums=1), params, cache0, tok0)
    loop_c, t_loop = compile_timed(jax.jit(loop, donate_argnums=1), params, cache0, tok0)

    def run_prefill():
        t = time.perf_counter()
        jax.block_until_ready(prefill_c(params, tokens))
        return time.perf_counter() - t, None

    def run_steps():  # the first token comes from the prefill; new_tokens - 1 timed steps
        last, cache = jax.block_until_ready(prefill_c(params, tokens))
        tok = jnp.argmax(last, -1).astype(jnp.int32)[:, None]
        out = [tok]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok, cache = step_c(params, cache, tok)
            out.append(tok)
        jax.block_until_ready(tok)
        return (time.perf_counter() - t) / (new_tokens - 1), np.concatenate([np.asarray(x) for x in out], 1)

    def run_loop():
        last, cache = jax.block_until_ready(prefill_c(params, tokens))
        tok = jnp.argmax(last, -1).astype(jnp.int32)[:, None]
        t = time.perf_counter()
        toks, _ = loop_c(params, cache, tok)
        toks = np.asarray(toks)
        return (time.perf_counter() - t) / (new_tokens - 1), np.concatenate([np.asarray(tok), toks], 1)

    return (dict(jax_prefill=run_prefill, jax_step=run_steps, jax_loop=run_loop),
            dict(prefill=t_prefill, step=t_step, loop=t_loop), np.asarray(last))


def hf_cases(model, prompt: np.ndarray, new_tokens: int, threads: list[int]) -> tuple[dict, np.ndarray]:
    """Measurement closures for transformers at each torch thread count, and the prefill's last logits."""
    import torch

    ids = torch.as_tensor(prompt.astype(np.int64))

    def prefill():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)

    def with_threads(n, fn):
        def run():
            old = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                with torch.inference_mode():
                    return fn()
            finally:
                torch.set_num_threads(old)
        return run

    def run_prefill():
        t = time.perf_counter()
        prefill()
        return time.perf_counter() - t, None

    def run_decode():
        out = prefill()
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [tok]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok)
        return (time.perf_counter() - t) / (new_tokens - 1), torch.cat(toks, 1).numpy()

    cases = {}
    for n in threads:
        cases[f"hf_prefill_t{n}"] = with_threads(n, run_prefill)
        cases[f"hf_decode_t{n}"] = with_threads(n, run_decode)
    with torch.inference_mode():
        last = prefill().logits[:, -1].float().numpy()
    return cases, last


_PAUSE_S = 0.3


def round_robin(cases: dict, repeats: int) -> tuple[dict, dict]:
    """Runs every case once to warm up, then ``repeats`` rounds of all cases in turn, so that the load of a shared
    machine falls on every case alike. Returns ``{case: [seconds...]}`` and ``{case: tokens of the last run}``."""
    times = {k: [] for k in cases}
    toks = {}
    for k, fn in cases.items():
        fn()
    for _ in range(repeats):
        for k, fn in cases.items():
            time.sleep(_PAUSE_S)
            dt, tk = fn()
            times[k].append(dt)
            toks[k] = tk
    return times, toks


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="proposal-31M,aligner-7M", help=f"comma list of {sorted(SIZES)}")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", default=f"1,{os.cpu_count()}",
                    help="torch thread counts to try; the fastest is reported per phase")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "forward.json"))
    args = ap.parse_args(argv)
    import torch
    import transformers

    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        ap.error(f"unknown sizes {unknown}; choose from {sorted(SIZES)}")
    rows = []
    load_start = os.getloadavg()
    for name in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as d:
            ref = build_hf(d, SIZES[name], args.seed)
            cfg, params = hf.load_hf(d)
        n_params = model_lib.count_params(params)
        for B in (int(b) for b in args.batches.split(",")):
            prompt = np.random.default_rng(args.seed + B).integers(0, VOCAB, (B, args.prompt_len)).astype(np.int32)
            threads = sorted({int(t) for t in args.torch_threads.split(",")})
            jcases, compile_s, j_last = jax_cases(cfg, params, prompt, args.new_tokens)
            hcases, h_last = hf_cases(ref, prompt, args.new_tokens, threads)
            times, toks = round_robin({**jcases, **hcases}, args.repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            mins = {k: min(v) for k, v in times.items()}
            assert (toks["jax_step"] == toks["jax_loop"]).all(), "jitted steps and the scanned loop must agree"
            tp = min(threads, key=lambda n: med[f"hf_prefill_t{n}"])
            td = min(threads, key=lambda n: med[f"hf_decode_t{n}"])
            hp, hd = f"hf_prefill_t{tp}", f"hf_decode_t{td}"
            ms = lambda d, k: round(1e3 * d[k], 3)  # noqa: E731
            row = dict(size=name, params=n_params, batch=B, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       prefill_ms=dict(jax=ms(med, "jax_prefill"), hf=ms(med, hp)),
                       decode_ms_per_token=dict(jax_step=ms(med, "jax_step"), jax_loop=ms(med, "jax_loop"),
                                                hf=ms(med, hd)),
                       speedup=dict(prefill=med[hp] / med["jax_prefill"], decode_step=med[hd] / med["jax_step"],
                                    decode_loop=med[hd] / med["jax_loop"]),
                       speedup_of_min_times=dict(prefill=mins[hp] / mins["jax_prefill"],
                                                 decode_step=mins[hd] / mins["jax_step"],
                                                 decode_loop=mins[hd] / mins["jax_loop"]),
                       decode_tokens_per_s=dict(jax_loop=B / med["jax_loop"], hf=B / med[hd]),
                       compile_s=compile_s, hf_threads=dict(prefill=tp, decode=td),
                       median_ms={k: ms(med, k) for k in med}, min_ms={k: ms(mins, k) for k in mins},
                       max_abs_logit_diff=float(np.abs(j_last - h_last).max()),
                       greedy_agreement=float((toks["jax_loop"] == toks[hd]).mean()))
            rows.append(row)
            print(f"{name} B={B}: prefill jax {row['prefill_ms']['jax']:.1f} ms, hf {row['prefill_ms']['hf']:.1f} ms;"
                  f" decode/token jax step {row['decode_ms_per_token']['jax_step']:.2f} ms, loop "
                  f"{row['decode_ms_per_token']['jax_loop']:.2f} ms, hf {row['decode_ms_per_token']['hf']:.2f} ms",
                  file=sys.stderr, flush=True)
    result = dict(
        bench="forward", argv=sys.argv[1:] if argv is None else list(argv),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg_at_start=load_start,
                     load_avg_at_end=os.getloadavg(), jax_devices=[str(d) for d in jax.devices()]),
        versions=dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__),
        dtype="float32", rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)

    hdr = (f"{'size':<13}{'B':>3} | {'prefill ms':>21} {'x':>6} | {'decode ms/token':>28} {'x step':>7} "
           f"{'x loop':>7} | {'compile s':>16} | {'|Δlogit|':>8} {'agree':>6}")
    print(hdr)
    print(f"{'':<16} | {'jax':>10} {'hf':>10} {'':>6} | {'jax step':>9} {'jax loop':>9} {'hf':>8} {'':>15} | "
          f"{'pre step loop':>16} |")
    for r in rows:
        p, d, s, c = r["prefill_ms"], r["decode_ms_per_token"], r["speedup"], r["compile_s"]
        print(f"{r['size']:<13}{r['batch']:>3} | {p['jax']:>10.2f} {p['hf']:>10.2f} {s['prefill']:>6.2f} | "
              f"{d['jax_step']:>9.3f} {d['jax_loop']:>9.3f} {d['hf']:>8.3f} {s['decode_step']:>7.2f} "
              f"{s['decode_loop']:>7.2f} | {c['prefill']:>4.1f} {c['step']:>5.1f} {c['loop']:>5.1f} | "
              f"{r['max_abs_logit_diff']:>8.1e} {r['greedy_agreement']:>6.2f}")
    print(f"(x = transformers time / ramjax time; JSON: {args.out})")
    return result


if __name__ == "__main__":
    main()
