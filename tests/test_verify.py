"""The library's statistics (ramjax.stats) and verifiers (ramjax.verify): hand-computed accuracies, the bootstrap
interval against the normal approximation, win rates with ties, exact/regex/reference verifiers and groups."""
import math

import numpy as np
import pytest

from ramjax import evaluate as ev
from ramjax import stats, verify
from ramjax.stats import StatsError


def test_accuracy_by_kind_hand_computed():
    res = [
        {"kind": "add", "strict": 1.0, "lenient": 1.0},
        {"kind": "add", "strict": 0.0, "lenient": 1.0},
        {"kind": "max", "strict": 0.0, "lenient": 0.0},
        {"kind": "add", "strict": 1.0, "lenient": 1.0},
    ]
    acc = stats.accuracy_by_kind(res)
    assert acc["add"] == {"n": 3, "strict": pytest.approx(2 / 3), "lenient": 1.0}
    assert acc["max"] == {"n": 1, "strict": 0.0, "lenient": 0.0}
    assert acc["all"] == {"n": 4, "strict": 0.5, "lenient": 0.75}
    with pytest.raises(StatsError, match="lacks"):
        stats.accuracy_by_kind([{"strict": 1.0}])


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    small = (rng.random(50) < 0.3).astype(float)
    big = (rng.random(5000) < 0.3).astype(float)
    ci_s, ci_b = stats.bootstrap_ci(small), stats.bootstrap_ci(big)
    for x, ci in ((small, ci_s), (big, ci_b)):
        assert ci.mean == pytest.approx(x.mean())
        assert ci.low <= ci.mean <= ci.high
    assert (ci_b.high - ci_b.low) < (ci_s.high - ci_s.low) / 5  # width ~ 1/sqrt(n): ratio 10 expected
    # Against the normal approximation: half-width 1.96 * sqrt(p (1 - p) / n).
    half = 1.96 * math.sqrt(big.mean() * (1 - big.mean()) / big.size)
    assert (ci_b.high - ci_b.low) / 2 == pytest.approx(half, rel=0.15)
    assert stats.bootstrap_ci(big, seed=3) == stats.bootstrap_ci(big, seed=3)
    assert stats.bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(StatsError, match="at least one"):
        stats.bootstrap_ci([])


def test_win_rate_with_ties():
    assert stats.win_rate([1, 1, 1, 0], [0, 1, 0, 0]) == 0.75  # win, tie, win, tie
    assert stats.win_rate([0, 1, 0.5], [1, 0, 0.5]) == 0.5
    assert stats.win_values([0.2, 0.7], [0.5, 0.7]).tolist() == [0.0, 0.5]
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, 100), rng.integers(0, 2, 100)
    assert stats.win_rate(a, b) + stats.win_rate(b, a) == pytest.approx(1.0)
    with pytest.raises(StatsError, match="equal length"):
        stats.win_rate([1, 0], [1])


def test_exact_and_regex_verifiers():
    exact = verify.make_verifier("exact")
    assert exact({"reference": "42"}, " 42\n") == 1.0
    assert exact({"reference": "42"}, "42.") == 0.0
    assert exact({"reference": ["forty two", "42"]}, "forty  two") == 1.0
    assert exact({"reference": "Paris"}, "paris") == 0.0
    assert verify.make_verifier("exact", case_sensitive=False)({"reference": "Paris"}, "PARIS") == 1.0
    assert verify.make_verifier("exact", field="answer")({"answer": "x"}, "x") == 1.0

    rx = verify.make_verifier("regex")
    assert rx({"pattern": r"\d+"}, " 123 ") == 1.0
    assert rx({"pattern": r"\d+"}, "It is 123") == 0.0  # full match by default
    assert verify.make_verifier("regex", full_match=False)({"pattern": r"\b123\b"}, "It is 123") == 1.0
    assert rx({"pattern": [r"yes", r"y"]}, "y") == 1.0
    assert verify.make_verifier("regex", case_sensitive=False)({"pattern": "yes"}, "YES") == 1.0

    with pytest.raises(verify.VerifierError, match="lacks the 'answer' or 'reference' field"):
        exact({"pattern": "x"}, "x")
    with pytest.raises(verify.VerifierError, match="bad regex"):
        rx({"pattern": "("}, "x")
    with pytest.raises(verify.VerifierError, match="list of strings"):
        exact({"reference": 42}, "42")
    with pytest.raises(verify.VerifierError, match="unknown verifier kind"):
        verify.make_verifier("fuzzy")




def test_reference_verifier_answer_regex_and_groups():
    v = verify.reference_verifier()
    assert v({"answer": "Paris"}, " Paris ") == 1.0 and v({"answer": "Paris"}, "paris") == 0.0
    assert v({"regex": r"\d+ km"}, "12 km") == 1.0 and v({"regex": r"\d+ km"}, "about 12 km") == 0.0
    assert v({"answer": "x", "regex": "y"}, "x") == 1.0  # the answer wins where both are given
    assert verify.group_of({"family": "geo", "kind": "k"}) == "geo"
    assert verify.group_of({"category": "c"}) == "c" and verify.group_of({}, "data") == "data"
    assert verify.has_references([{"answer": "a"}, {"regex": "b"}])
    assert not verify.has_references([{"prompt": "a"}])
    with pytest.raises(verify.VerifierError, match="record 1 has no 'answer' or 'regex'"):
        verify.has_references([{"answer": "a"}, {"prompt": "b"}])
    assert verify.resolve_verifier("none") is None
    assert verify.resolve_verifier("ramjax.experiments.tasks:task_verifier")({"prompt": "Max: 1 5"}, "5")["strict"] == 1
    with pytest.raises(verify.VerifierError, match="cannot load verifier"):
        verify.resolve_verifier("ramjax.nope:f")


def test_judge_responses_groups_and_no_reference_evaluation(tmp_path):
    recs = [{"prompt": "a", "answer": "1", "family": "f1"}, {"prompt": "b", "answer": "2", "family": "f2"},
            {"prompt": "c", "regex": "x+", "category": "f2"}]
    judged = ev.judge_responses(recs, ["1", "3", "xx"])
    assert [j["kind"] for j in judged] == ["f1", "f2", "f2"] and [j["strict"] for j in judged] == [1.0, 0.0, 1.0]
    by = stats.accuracy_by_group(judged, "kind")
    assert by["f2"] == {"n": 2, "strict": 0.5} and by["all"]["strict"] == pytest.approx(2 / 3)

    def gen(prompts, **kw):
        return [ev.Generation(text="1", num_tokens=1) for _ in prompts]

    sys_ = ev.System("stub", generate_fn=gen, loglik=False)
    res = ev.evaluate_systems([sys_], recs, n_boot=20)
    assert res["judged"] and res["systems"]["stub"]["decodings"]["greedy"]["accuracy"]["mean"] == pytest.approx(1 / 3)
    # without references: nothing judged, the responses and AlpacaEval files still written
    bare = [{"prompt": r["prompt"]} for r in recs]
    res = ev.evaluate_systems([sys_], bare, n_boot=20)
    d = res["systems"]["stub"]["decodings"]["sampled"]
    assert not res["judged"] and d["accuracy"] is None and d["win_rate"] is None and d["mean_length"] == 1.0
    ev.write_report(tmp_path, res)
    assert (tmp_path / "outputs" / "stub.sampled.alpaca_eval.json").exists()
    assert "not judged" in (tmp_path / "report.md").read_text()
