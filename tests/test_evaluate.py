"""Evaluation: aggregation over stub systems (accuracy, CI, win rate, length, diagnostics), the report files, the
held-out product log-likelihood against numpy, the corrector's prompt and data, users' files."""
import json
import os

import jax
import numpy as np
import pytest

from ramjax import evaluate as ev
from ramjax.api import Model
from ramjax.experiments import tasks
from ramjax.model import ModelConfig, param_shapes

# ---------------------------------------------------------------------------------------------------------------
# Stub systems


def _records(n=28):
    return tasks.eval_prompts(n, seed=0)


def _canned(answers_by_decoding, kl=None, ess=None):
    """A generate_fn that returns answers_by_decoding[decoding][i] for prompt i (and records its calls)."""
    calls = []

    def fn(prompts, *, decoding, settings, seed, max_new_tokens, stop):
        calls.append({"decoding": decoding, "settings": settings, "n": len(prompts)})
        out = []
        for i, _ in enumerate(prompts):
            text = answers_by_decoding[decoding][i]
            out.append({"text": text, "token_ids": list(range(len(text.split()) + 1)), "finish_reason": "eos",
                        "kl_fallback_rate": None if kl is None else kl[i], "ess_mean": None if ess is None else ess[i]})
        return out

    fn.calls = calls
    return fn


@pytest.fixture(scope="module")
def stub_results():
    recs = _records()
    n = len(recs)
    right = [tasks.canonical_answer(r["prompt"]) for r in recs]
    wrong = [tasks.wrong_responses(tasks.parse_prompt(r["prompt"]), np.random.default_rng(i))[0]
             for i, r in enumerate(recs)]
    verbose = [f"Sure! The answer is {a}." for a in right]
    # baseline: right on even prompts when sampled, on every third when greedy
    base = {"sampled": [right[i] if i % 2 == 0 else wrong[i] for i in range(n)],
            "greedy": [right[i] if i % 3 == 0 else wrong[i] for i in range(n)]}
    good = {"sampled": [right[i] if i % 4 != 3 else wrong[i] for i in range(n)], "greedy": list(right)}
    chatty = {"sampled": verbose, "greedy": verbose}
    kl = np.linspace(0.0, 0.5, n)
    ess = np.linspace(1.0, 8.0, n)
    systems = [
        ev.System("base", generate_fn=_canned(base)),
        ev.System("good", mode="product", generate_fn=_canned(good, kl=kl, ess=ess)),
        ev.System("chatty", generate_fn=_canned(chatty), train_cost=ev.training_cost(12.0, params=1000, tokens=500)),
    ]
    res = ev.evaluate_systems(systems, recs, baseline_name="base", seed=0, n_boot=300, batch_size=8, warmup=True,
                              verifier=tasks.task_verifier)
    return dict(res=res, recs=recs, base=base, good=good, chatty=chatty, right=right, kl=kl, ess=ess,
                systems=systems)


def test_accuracy_and_ci(stub_results):
    res, right = stub_results["res"], stub_results["right"]
    n = len(right)
    for name, answers in (("base", stub_results["base"]), ("good", stub_results["good"])):
        for dec in ("sampled", "greedy"):
            s = res["systems"][name]["decodings"][dec]
            expect = np.mean([a == r for a, r in zip(answers[dec], right)])
            assert s["n"] == n
            assert s["accuracy"]["mean"] == pytest.approx(expect)
            assert s["accuracy"]["low"] <= expect <= s["accuracy"]["high"]
            # a 95% interval of a proportion from 28 prompts is wide unless the proportion is 0 or 1
            if 0 < expect < 1:
                assert s["accuracy"]["high"] - s["accuracy"]["low"] > 0.1
    chatty = res["systems"]["chatty"]["decodings"]["sampled"]
    assert chatty["accuracy"]["mean"] == 0.0 and chatty["lenient"]["mean"] == 1.0
    # per kind: the counts add up and the accuracy of "all" is the overall one
    bk = res["systems"]["good"]["decodings"]["sampled"]["by_kind"]
    assert sum(v["n"] for k, v in bk.items() if k != "all") == n
    assert bk["all"]["strict"] == pytest.approx(res["systems"]["good"]["decodings"]["sampled"]["accuracy"]["mean"])


def test_win_rate_hand_computed(stub_results):
    res, right = stub_results["res"], stub_results["right"]
    for dec in ("sampled", "greedy"):
        a = [float(x == r) for x, r in zip(stub_results["good"][dec], right)]
        b = [float(x == r) for x, r in zip(stub_results["base"][dec], right)]
        wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)
        w = res["systems"]["good"]["decodings"][dec]["win_rate"]
        assert w["mean"] == pytest.approx(wins)
        assert w["low"] <= wins <= w["high"]
        assert res["systems"]["base"]["decodings"][dec]["win_rate"]["mean"] == 0.5  # itself: all ties


def test_lengths_diagnostics_and_settings(stub_results):
    res = stub_results["res"]
    s = res["systems"]["good"]["decodings"]["sampled"]
    lens = np.array([len(t.split()) + 1 for t in stub_results["good"]["sampled"]], float)
    assert s["mean_length"] == pytest.approx(lens.mean())
    # token-weighted means of the per-response rates
    assert s["kl_fallback_rate"] == pytest.approx(np.dot(stub_results["kl"], lens) / lens.sum())
    assert s["ess_mean"] == pytest.approx(np.dot(stub_results["ess"], lens) / lens.sum())
    assert s["finish_reasons"] == {"eos": len(lens)}
    assert s["tokens_per_s"] > 0
    assert res["systems"]["base"]["decodings"]["sampled"]["kl_fallback_rate"] is None
    # the decodings set the temperatures on top of the defaults; the system's settings stay the same
    calls = stub_results["systems"][0].generate_fn.calls
    # with warmup, one untimed run on the first batch (8 prompts) before the first decoding only
    assert [(c["decoding"], c["n"]) for c in calls] == [("sampled", 8), ("sampled", 28), ("greedy", 28)]
    assert s["warmup_seconds"] is not None and res["systems"]["good"]["decodings"]["greedy"]["warmup_seconds"] is None
    assert calls[1]["settings"]["proposal_temperature"] == 1.0 and calls[2]["settings"]["aligner_temperature"] == 0.0
    assert calls[0]["settings"]["proposal_top_p"] == 1.0 and calls[0]["settings"]["kl_threshold"] is None
    # outputs keep the judged responses in prompt order
    out = res["outputs"]["good"]["greedy"]
    assert [o["response"] for o in out] == stub_results["good"]["greedy"]
    assert all(o["strict"] == 1.0 for o in out)


def test_report_files(stub_results, tmp_path):
    res = stub_results["res"]
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "curves.png").write_bytes(b"png")
    table = ev.write_report(tmp_path, res, stage_times={"pretrain": 10.0, "ram": 2.5},
                            plots=["plots/acc.png", str(tmp_path / "plots" / "curves.png")])
    data = json.loads((tmp_path / "results.json").read_text())
    assert "outputs" not in data and data["stage_times"] == {"pretrain": 10.0, "ram": 2.5}
    assert data["systems"]["good"]["decodings"]["greedy"]["accuracy"]["mean"] == 1.0
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| System")]
    assert len(rows) == 3 * 2
    assert rows[0].startswith("| base | sampled | 0.500 [")
    md = (tmp_path / "report.md").read_text()
    assert table in md and "## Stage times" in md and "| **total** | 12.5 |" in md
    assert "## Training cost" in md
    assert "| chatty | 12.0 | 1,000 | 500 | 3.00e+06 |" in md  # 6 · 1000 params · 500 tokens
    assert "## Strict accuracy per group" in md and "![acc.png](plots/acc.png)" in md
    assert "![curves.png](plots/curves.png)" in md
    # judged outputs and AlpacaEval files
    rows_out = tasks.read_jsonl(tmp_path / "outputs" / "good.greedy.jsonl")
    assert len(rows_out) == len(stub_results["recs"])
    alpaca = json.loads((tmp_path / "outputs" / "good.greedy.alpaca_eval.json").read_text())
    assert alpaca[0] == {"instruction": stub_results["recs"][0]["prompt"], "output": stub_results["right"][0],
                         "generator": "good (greedy)"}


def test_bad_inputs():
    recs = _records(7)
    s = ev.System("a", generate_fn=lambda prompts, **kw: ["x"] * len(prompts))
    with pytest.raises(ev.EvalError, match="unique"):
        ev.evaluate_systems([s, s], recs)
    with pytest.raises(ev.EvalError, match="baseline 'zz'"):
        ev.evaluate_systems([s], recs, baseline_name="zz")
    with pytest.raises(ev.EvalError, match="unknown decoding 'beam'"):
        ev.evaluate_systems([s], recs, decoding=("beam",))
    with pytest.raises(ev.EvalError, match="needs a aligner model"):
        ev.System("b", proposal=object(), mode="product")
    with pytest.raises(ev.EvalError, match="unknown mode"):
        ev.System("b", proposal=object(), mode="beam")
    short = ev.System("c", generate_fn=lambda prompts, **kw: ["x"])
    with pytest.raises(ev.EvalError, match="returned 1 responses for 7 prompts"):
        ev.evaluate_systems([short], recs)


# ---------------------------------------------------------------------------------------------------------------
# Corrector


def test_corrector_prompt_and_records():
    p = ev.corrector_prompt("Add 2 and 3", " 6 \n")
    assert p == "Add 2 and 3\n\nDraft: 6"
    # rendered by the plain template, the corrector sees the rewrite dialogue
    from ramjax.tokenizer import PLAIN_TEMPLATE

    assert PLAIN_TEMPLATE.replace("{prompt}", p) == "\n\nHuman: Add 2 and 3\n\nDraft: 6\n\nAssistant: "
    recs = [{"prompt": "Add 2 and 3", "response": "5"}, {"prompt": "Max: 1 9", "chosen": "9", "rejected": "1"}]
    out = ev.corrector_training_records(recs, ["6", "Sure, 9"])
    assert out == [{"prompt": "Add 2 and 3\n\nDraft: 6", "response": "5"},
                   {"prompt": "Max: 1 9\n\nDraft: Sure, 9", "response": "9"}]
    with pytest.raises(ev.EvalError, match="2 records but 1 drafts"):
        ev.corrector_training_records(recs, ["6"])


def test_corrector_system_runs_draft_then_rewrite(monkeypatch):
    calls = []

    def fake_sampler(proposal, aligner, prompts, mode, settings, **kw):
        calls.append((proposal, list(prompts), mode, kw["seed"]))
        if proposal == "PM":
            return [ev.Generation(text=f"draft{i}", num_tokens=2) for i in range(len(prompts))], [1.0, 1.0]
        return ([ev.Generation(text=tasks.canonical_answer(p.split("\n\nDraft:")[0]), num_tokens=3) for p in prompts],
                [2.0, 0.5])

    monkeypatch.setattr(ev, "_run_sampler", fake_sampler)
    recs = _records(7)
    res = ev.evaluate_systems([ev.System("corr", proposal="PM", corrector="C", mode="corrector")], recs,
                              decoding=("greedy",), seed=5, batch_size=4)
    assert [c[0] for c in calls] == ["PM", "C"]
    assert calls[1][1][0] == f"{recs[0]['prompt']}\n\nDraft: draft0"
    assert calls[0][3] != calls[1][3]  # the rewrite draws with its own seed
    s = res["systems"]["corr"]["decodings"]["greedy"]
    assert s["accuracy"]["mean"] == 1.0 and s["mean_length"] == 3.0
    # batch times of draft and rewrite add up; the first (compiling) batch is left out of tokens/s
    assert s["first_batch_excluded"] and s["first_batch_seconds"] == 3.0
    assert s["tokens_per_s"] == pytest.approx(3 * 3 / 1.5)  # prompts 4..6 (3 tokens each) in 0.5 + 1.0 s
    assert res["systems"]["corr"]["loglik"] is None


# ---------------------------------------------------------------------------------------------------------------
# Held-out log-likelihood


def _tiny_model(seed, vocab_rows, vocab_limit, hidden=32):
    """A tiny random decoder. Params drawn with numpy from the shapes (init_params compiles slowly on a busy CPU);
    norm scales near 1 and weights of std 0.3, so the logits are far from uniform."""
    cfg = ModelConfig(vocab_size=vocab_rows, hidden_size=hidden, intermediate_size=48, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_position_embeddings=128)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        is_norm = any(getattr(k, "key", None) == "scale" for k in path)
        return (1.0 + 0.1 * rng.standard_normal(x.shape) if is_norm else 0.3 * rng.standard_normal(x.shape)
                ).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))
    return Model(config=cfg, params=params, vocab_limit=vocab_limit)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_product_loglik_matches_numpy():
    V = 40
    pm = _tiny_model(0, 40, V)
    q = _tiny_model(1, 48, V, hidden=16)  # padded embedding rows beyond the shared vocabulary
    rng = np.random.default_rng(0)
    seqs = []
    for L in (5, 9, 3, 12, 7):
        toks = rng.integers(V, size=L)
        tgt = np.zeros(L, bool)
        tgt[L // 2:] = True  # the "response" half
        seqs.append((toks, tgt))
    got = {k: ev.sequence_logliks(seqs, kind=k, proposal=pm, aligner=q, batch_size=2) for k in
           ("proposal", "aligner", "product")}
    # Reference logits: every sequence in one batch, right-filled with random tokens (not padding) — causal
    # attention makes the logits of a prefix independent of what follows it.
    from ramjax.model import forward

    T = max(len(t) for t, _ in seqs)
    batch = rng.integers(V, size=(len(seqs), T))
    for i, (toks, _) in enumerate(seqs):
        batch[i, : len(toks)] = toks
    ref_p = np.asarray(jax.jit(lambda p, x: forward(pm.config, p, x)[0])(pm.params, batch), np.float64)
    ref_q = np.asarray(jax.jit(lambda p, x: forward(q.config, p, x)[0])(q.params, batch), np.float64)
    for i, (toks, tgt) in enumerate(seqs):
        lp, lq = ref_p[i, :, :V], ref_q[i, :, :V]
        ref = {"proposal": _np_log_softmax(lp), "aligner": _np_log_softmax(lq),
               "product": _np_log_softmax(_np_log_softmax(lp) + _np_log_softmax(lq))}
        for k, table in ref.items():
            want = sum(table[j - 1, toks[j]] for j in range(1, len(toks)) if tgt[j])
            np.testing.assert_allclose(got[k][0][i], want, rtol=1e-4, atol=1e-4)
            assert got[k][1][i] == tgt[1:].sum()
    # the product is a different distribution from either factor
    assert abs(got["product"][0].sum() - got["proposal"][0].sum()) > 0.1


def test_heldout_loglik_uniform_aligner_is_proposal(tmp_path):
    from tokenizer_fixtures import make_sentencepiece

    from ramjax.tokenizer import load_tokenizer

    make_sentencepiece(tmp_path / "tok", chat_template=False)
    tok = load_tokenizer(tmp_path / "tok")
    V = tok.vocab_size
    pm = _tiny_model(0, V, V)
    pm.tokenizer = tok
    flat = _tiny_model(1, V, V)
    flat.params = jax.tree_util.tree_map(np.zeros_like, flat.params)  # all-zero weights: uniform logits
    recs = [{"prompt": "Add 2 and 3", "response": "5"}, {"prompt": "Copy: red cat", "response": "red cat"}]
    a = ev.heldout_loglik(recs, kind="proposal", proposal=pm)
    b = ev.heldout_loglik(recs, kind="product", proposal=pm, aligner=flat)
    u = ev.heldout_loglik(recs, kind="aligner", aligner=flat, tokenizer=tok)
    assert a["sequences"] == 2 and a["tokens"] == b["tokens"] > 2
    assert b["per_token"] == pytest.approx(a["per_token"], abs=1e-5)
    assert u["per_token"] == pytest.approx(-np.log(V), abs=1e-5)
    # evaluate_systems reports it per system, for the right kind (generation stubbed; the models are real)
    stub = lambda p, **kw: ["5"] * len(p)  # noqa: E731
    systems = [ev.System("pm", proposal=pm, generate_fn=stub),
               ev.System("ram", proposal=pm, aligner=flat, mode="product", generate_fn=stub),
               ev.System("corr", proposal=pm, corrector=flat, mode="corrector", generate_fn=stub)]
    res = ev.evaluate_systems(systems, _records(7), decoding=("greedy",), align_records=recs, n_boot=50)
    assert res["systems"]["pm"]["loglik"] == {"kind": "proposal", **a}
    assert res["systems"]["ram"]["loglik"]["kind"] == "product"
    assert res["systems"]["ram"]["loglik"]["per_token"] == pytest.approx(b["per_token"])
    assert res["systems"]["corr"]["loglik"] is None


# ---------------------------------------------------------------------------------------------------------------
# Users' files


def test_evaluate_file_exact_and_regex(tmp_path):
    recs = [{"prompt": "q1", "reference": "Paris", "pattern": "(?i)paris", "response": "Paris"},
            {"prompt": "q2", "reference": ["4", "four"], "pattern": r"\d+", "response": "four"},
            {"prompt": "q3", "reference": "blue", "pattern": "blue", "response": "It is blue"}]
    path = tasks.write_jsonl(tmp_path / "mine.jsonl", recs)
    ex = ev.evaluate_file(path, verifier="exact", n_boot=100)
    assert ex["scores"] == [1.0, 1.0, 0.0] and ex["lenient"] is None
    rx = ev.evaluate_file(path, verifier="regex", n_boot=100)
    assert rx["scores"] == [1.0, 0.0, 0.0]
    rx2 = ev.evaluate_file(path, verifier="regex", full_match=False, n_boot=100)
    assert rx2["scores"] == [1.0, 0.0, 1.0]
    # responses from a second file (e.g. sample.py output)
    resp = tasks.write_jsonl(tmp_path / "resp.jsonl", [{"response": "paris"}, {"response": "4"}, {"response": "blue"}])
    ex2 = ev.evaluate_file(path, responses_path=resp, verifier="exact", case_sensitive=False, n_boot=100)
    assert ex2["scores"] == [1.0, 1.0, 1.0]
    bad = tasks.write_jsonl(tmp_path / "bad.jsonl", [{"response": "x"}])
    with pytest.raises(ev.EvalError, match="pair up line by line"):
        ev.evaluate_file(path, responses_path=bad)


def test_evaluate_file_task_judge_and_config(tmp_path):
    recs = _records(14)
    rows = [{**r, "response": tasks.canonical_answer(r["prompt"]) if i % 2 else "nope"} for i, r in enumerate(recs)]
    path = tasks.write_jsonl(tmp_path / "judged.jsonl", rows)
    res = ev.evaluate_file(path, verifier="task", n_boot=100)
    assert res["accuracy"]["mean"] == pytest.approx(0.5) and res["lenient"]["mean"] == pytest.approx(0.5)
    # the same through the config entry point (judge-only: no systems)
    from ramjax.config import load_config

    cfg = load_config(ev.EvalConfig, None, [f"eval_file={path}", f"run_dir={tmp_path / 'run'}", "n_boot=100",
                                            "verifier=task"])
    out, table = ev.evaluate_from_config(cfg)
    assert out["accuracy"]["mean"] == pytest.approx(0.5) and "strict accuracy 0.500" in table
    assert json.loads((tmp_path / "run" / "results.json").read_text())["n"] == 14


def test_write_alpacaeval(tmp_path):
    recs = [{"prompt": "a"}, {"instruction": "b", "dataset": "mine"}]
    p = ev.write_alpacaeval(tmp_path / "o.json", recs, ["x", ev.Generation("y", 1)], generator="g")
    assert json.loads(open(p).read()) == [{"instruction": "a", "output": "x", "generator": "g"},
                                          {"instruction": "b", "output": "y", "generator": "g", "dataset": "mine"}]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def test_plots(stub_results, tmp_path):
    from ramjax.experiments import plots

    assert _is_png(plots.plot_accuracy(stub_results["res"], tmp_path / "p" / "acc.png"))
    assert _is_png(plots.plot_accuracy(stub_results["res"], tmp_path / "win.png", metric="win_rate"))
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps({"step": s, "loss": 3.0 / (1 + s)}) for s in range(0, 50, 5)) + "\n{partial")
    assert len(plots.read_metrics(m)) == 10  # a half-written last line is skipped
    assert _is_png(plots.plot_training_curves({"sft": m, "dpo": tmp_path / "missing.jsonl"}, tmp_path / "c.png"))
    with pytest.raises(plots.PlotError, match="no training metrics"):
        plots.plot_training_curves({"dpo": tmp_path / "missing.jsonl"}, tmp_path / "none.png")
    rows = [{"lam": lam, "accuracy": {"mean": 0.5, "low": 0.4, "high": 0.6}, "length": 10 / lam}
            for lam in (0.5, 1.0, 2.0)]
    assert _is_png(plots.plot_realign_sweep(rows, tmp_path / "lam.png"))
    with pytest.raises(plots.PlotError, match="several points at the same lam"):
        plots.plot_realign_sweep(rows + rows[:1], tmp_path / "dup.png")


def test_with_the_real_sampler(tmp_path):
    """Plumbing into ramjax.sampler: the responses are the sampler's, lengths count EOS, diagnostics pass through."""
    sampler = pytest.importorskip("ramjax.sampler")
    from tokenizer_fixtures import make_sentencepiece

    from ramjax.tokenizer import load_tokenizer

    make_sentencepiece(tmp_path / "tok", chat_template=False)
    tok = load_tokenizer(tmp_path / "tok")
    V = tok.vocab_size
    pm, q = _tiny_model(0, V, V), _tiny_model(1, V, V, hidden=16)
    pm.tokenizer = q.tokenizer = tok
    recs = _records(7)
    sysm = ev.System("ram", proposal=pm, aligner=q, mode="product", sampling={"kl_threshold": 0.5})
    # batches of 4 (the last one filled up with a copy) against one direct call with all 7 prompts
    res = ev.evaluate_systems([sysm], recs, max_new_tokens=6, batch_size=4, n_boot=50, seed=3)
    direct = sampler.sample(pm, q, [r["prompt"] for r in recs], mode="product", max_new_tokens=6, seed=3,
                            batch_size=8, **{**ev.SAMPLING_DEFAULTS, "kl_threshold": 0.5, "n": 1},
                            **ev.DECODINGS["greedy"])
    out = res["outputs"]["ram"]["greedy"]
    assert [o["response"] for o in out] == [d[0].text for d in direct]
    assert [o["num_tokens"] for o in out] == [d[0].length for d in direct]
    s = res["systems"]["ram"]["decodings"]["sampled"]
    assert s["kl_fallback_rate"] is not None and 0.0 <= s["kl_fallback_rate"] <= 1.0
    assert sum(s["finish_reasons"].values()) == 7 and s["tokens_per_s"] > 0 and s["first_batch_excluded"]
    # sampled: the same random stream per prompt whatever the batching (example_offset)
    direct_s = sampler.sample(pm, q, [r["prompt"] for r in recs], mode="product", max_new_tokens=6, seed=3,
                              batch_size=8, **{**ev.SAMPLING_DEFAULTS, "kl_threshold": 0.5, "n": 1},
                              **ev.DECODINGS["sampled"])
    assert [o["response"] for o in res["outputs"]["ram"]["sampled"]] == [d[0].text for d in direct_s]


def test_shipped_eval_config():
    from ramjax.config import ConfigError, load_config

    cfg = load_config(ev.EvalConfig, "configs/eval.yaml")
    modes = {s.mode for s in cfg.systems}
    assert {"proposal", "par", "product", "corrector"} <= modes and cfg.decodings == ("sampled", "greedy")
    assert load_config(ev.EvalConfig, "configs/eval.yaml", ["systems=[]"]).systems == ()
    with pytest.raises(ConfigError, match="baseline 'nope' is not among the systems"):
        load_config(ev.EvalConfig, "configs/eval.yaml", ["baseline=nope"])
