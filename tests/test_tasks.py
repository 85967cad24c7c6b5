"""Tests of the task suite: verifiers per kind, generators (determinism, proportions, the held-out split), the
judge as a ``ramjax.verify`` verifier. The library statistics and verifiers are tested in test_verify.py."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramjax.experiments import tasks as T

# Hand-written cases: (prompt, canonical answer, some wrong answers).
KNOWN = [
    ("Add 23 and 8", "31", ["32", "30", "131", "3 1", "23", "41"]),
    ("Add 0 and 0", "0", ["1", "00", "10"]),
    ("Reverse: c a t e", "e t a c", ["c a t e", "e t c a", "e t a", "e t a c x", "E T A C"]),
    ("Sort: 4 1 3 1", "1 1 3 4", ["4 1 3 1", "4 3 1 1", "1 3 4", "1 1 4 3"]),
    ("Count b in: a b b c b", "3", ["2", "4", "5", "13"]),
    ("Count f in: a b c", "0", ["1", "3"]),
    ("Upper: c a t", "C A T", ["c a t", "C a t", "CAT", "T A C"]),
    ("Max: 3 9 4", "9", ["4", "3", "10", "99"]),
    ("Copy: red fox cup", "red fox cup", ["red cup fox", "red fox", "fox cup red", "red fox cup cup"]),
]


@pytest.mark.parametrize("prompt,answer,wrongs", KNOWN)
def test_known_answers(prompt, answer, wrongs):
    assert T.canonical_answer(prompt) == answer
    assert T.score(prompt, answer) == 1.0
    assert T.score(prompt, f"  {answer} \n") == 1.0  # whitespace at the ends is not a format error
    assert T.score(prompt, f"Sure! The answer is {answer}.") == 0.0
    assert T.score(prompt, f"Sure! The answer is {answer}.", lenient=True) == 1.0
    for w in wrongs:
        assert T.score(prompt, w) == 0.0, w
    j = T.judge(prompt, "nonsense")
    assert j["strict"] == 0.0 and j["lenient"] == 0.0 and j["reference"] == answer


def test_lenient_needs_a_delimited_answer():
    assert T.score("Add 23 and 8.", "I get 131.", lenient=True) == 0.0
    assert T.score("Add 23 and 8.", "I get 31!", lenient=True) == 1.0
    assert T.score("Reverse: c a t e", "x e t a c", lenient=True) == 0.0
    assert T.score("Copy: red cat", "red catfish", lenient=True) == 0.0


def test_parse_templated_prompt_and_kinds():
    templated = T.format_prompt("Max: 1 7 2")
    assert templated == "\n\nHuman: Max: 1 7 2\n\nAssistant:"
    assert T.parse_prompt(templated).kind == "max"
    assert T.score(templated + " 7", "7") == 1.0
    assert T.parse_prompt("  Reverse:   a  b c ").prompt == "Reverse: a b c"  # canonicalised
    kinds = {T.parse_prompt(p).kind for p, _, _ in KNOWN}
    assert kinds == set(T.KINDS)


def test_parse_errors():
    with pytest.raises(T.TaskParseError, match="matches no task kind"):
        T.parse_prompt("What is the capital of France?")
    with pytest.raises(ValueError):  # the named error is a ValueError
        T.score("Add two and three.", "5")
    with pytest.raises(T.TaskParseError, match="not 'sort'"):
        T.score("Max: 1 2", "2", kind="sort")
    assert T.score("Max: 1 2", "2", kind="max") == 1.0


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(T.KINDS))
def test_generated_responses_score_as_labelled(seed, kind):
    rng = np.random.default_rng(seed)
    inst = T.sample_instance(kind, rng)
    assert T.parse_prompt(inst.prompt) == inst  # the prompt text alone recovers the instance
    assert T.judge(inst.prompt, inst.answer) == {"kind": kind, "strict": 1.0, "lenient": 1.0, "reference": inst.answer}
    wrongs = T.wrong_responses(inst, rng)
    assert wrongs
    for w in wrongs:
        assert T.score(inst.prompt, w) == 0.0 and T.score(inst.prompt, w, lenient=True) == 0.0, w
    v = T.verbose_response(inst, rng)
    assert T.score(inst.prompt, v) == 0.0 and T.score(inst.prompt, v, lenient=True) == 1.0, v


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(["reverse", "upper"]),
    letters=st.lists(st.sampled_from("abcdefghijklmnopqrstuvwxyz"), min_size=1, max_size=8),
)
def test_wrong_responses_on_any_user_prompt(kind, letters):
    # Prompts outside the generated sizes (even one letter, palindromes) still get a genuinely wrong answer.
    prompt = f"{'Reverse' if kind == 'reverse' else 'Upper'}: {' '.join(letters)}"
    inst = T.parse_prompt(prompt)
    expected = " ".join(reversed(letters)) if kind == "reverse" else " ".join(c.upper() for c in letters)
    assert inst.answer == expected
    for w in T.wrong_responses(inst, np.random.default_rng(0)):
        assert T.score(prompt, w, lenient=True) == 0.0


def test_texts_are_short():
    texts = [r["text"] for r in T.pretrain_text(T.general_corpus(3000, seed=0))]
    # Tiny models have a context of ~96 tokens; with one symbol per token these stay far below it.
    assert max(len(t) for t in texts) <= 110
    assert max(len(t.split()) for t in texts) <= 24


GENERATORS = {
    "corpus": lambda n, seed: T.general_corpus(n, seed),
    "align": lambda n, seed: T.alignment_set(n, seed),
    "pref": lambda n, seed: T.preference_pairs(n, seed),
    "eval": lambda n, seed: T.eval_prompts(n, seed),
}


@pytest.mark.parametrize("name", list(GENERATORS))
def test_generators_deterministic_in_seed(name):
    gen = GENERATORS[name]
    a, b, c = gen(200, 7), gen(200, 7), gen(200, 8)
    assert a == b
    assert a != c
    assert len({r["prompt"] for r in a} ^ {r["prompt"] for r in c}) > 100


def test_generator_record_formats():
    assert set(T.general_corpus(5, 0)[0]) == {"prompt", "response", "quality"}
    assert set(T.alignment_set(5, 0)[0]) == {"prompt", "response"}
    assert set(T.preference_pairs(5, 0)[0]) == {"prompt", "chosen", "rejected"}
    assert set(T.eval_prompts(5, 0)[0]) == {"prompt", "kind", "reference"}
    assert T.pretrain_text([{"prompt": "Max: 1 2", "response": "2"}]) == [
        {"text": "\n\nHuman: Max: 1 2\n\nAssistant: 2"}
    ]
    with pytest.raises(T.TaskConfigError, match="lacks"):
        T.pretrain_text([{"prompt": "Max: 1 2"}])


@pytest.mark.parametrize(
    "props",
    [None, {"concise_correct": 0.5, "wrong": 0.25, "verbose_correct": 0.25}, {"concise_correct": 1.0}],
)
def test_corpus_proportions_and_labels(props):
    n = 2001
    recs = T.general_corpus(n, seed=3, proportions=props)
    expected = T.DEFAULT_PROPORTIONS if props is None else {q: props.get(q, 0.0) for q in T.QUALITIES}
    counts = {q: sum(r["quality"] == q for r in recs) for q in T.QUALITIES}
    for q in T.QUALITIES:
        assert abs(counts[q] - expected[q] * n) <= 1, (q, counts)
    kind_counts = [sum(T.parse_prompt(r["prompt"]).kind == k for r in recs) for k in T.KINDS]
    assert max(kind_counts) - min(kind_counts) <= 1
    # Every record is what its label says, by the judge.
    for r in recs:
        j = T.judge(r["prompt"], r["response"])
        want = {"concise_correct": (1.0, 1.0), "wrong": (0.0, 0.0), "verbose_correct": (0.0, 1.0)}[r["quality"]]
        assert (j["strict"], j["lenient"]) == want, r
    # Qualities are shuffled, not in blocks.
    first = [r["quality"] for r in recs[:200]]
    assert len(set(first)) == len({q for q in T.QUALITIES if expected[q] > 0})


def test_align_and_pref_are_correct_and_wrong():
    for r in T.alignment_set(300, 1):
        assert T.score(r["prompt"], r["response"]) == 1.0
    for r in T.preference_pairs(300, 1):
        assert T.score(r["prompt"], r["chosen"]) == 1.0
        assert T.score(r["prompt"], r["rejected"], lenient=True) == 0.0
    for r in T.preference_pairs(50, 1, rejected="verbose_correct"):
        assert T.judge(r["prompt"], r["rejected"])["lenient"] == 1.0
        assert T.score(r["prompt"], r["rejected"]) == 0.0


def test_bad_generator_settings():
    with pytest.raises(T.TaskConfigError, match="sum to 1"):
        T.general_corpus(10, 0, {"concise_correct": 0.5, "wrong": 0.2, "verbose_correct": 0.2})
    with pytest.raises(T.TaskConfigError, match="did you mean 'verbose_correct'"):
        T.general_corpus(10, 0, {"concise_correct": 0.5, "verbose_corect": 0.5})
    with pytest.raises(T.TaskConfigError, match="non-negative"):
        T.general_corpus(10, 0, {"concise_correct": 1.5, "wrong": -0.5})
    with pytest.raises(T.TaskConfigError, match="did you mean 'reverse'"):
        T.alignment_set(10, 0, kinds=["revers"])
    with pytest.raises(T.TaskConfigError, match="seed"):
        T.eval_prompts(10, -1)
    with pytest.raises(T.TaskConfigError, match="n must be"):
        T.eval_prompts(-1, 0)
    with pytest.raises(T.TaskConfigError, match="rejected"):
        T.preference_pairs(3, 0, rejected="concise_correct")


def test_eval_prompts_held_out():
    train = set()
    for seed in (0, 1):
        train |= {r["prompt"] for r in T.general_corpus(3000, seed)}
        train |= {r["prompt"] for r in T.alignment_set(1000, seed)}
        train |= {r["prompt"] for r in T.preference_pairs(1000, seed)}
    evals = T.eval_prompts(700, 0) + T.eval_prompts(700, 1)
    eval_set = {r["prompt"] for r in evals}
    assert not (train & eval_set)
    assert all(T.is_eval_prompt(p) for p in eval_set)
    assert not any(T.is_eval_prompt(p) for p in train)
    # Distinct within one call, balanced by kind, references correct.
    first = T.eval_prompts(700, 0)
    assert len({r["prompt"] for r in first}) == 700
    kc = [sum(r["kind"] == k for r in first) for k in T.KINDS]
    assert max(kc) - min(kc) <= 1
    assert all(T.judge(r["prompt"], r["reference"])["strict"] == 1.0 for r in first)
    # The split holds out about EVAL_FRACTION of the prompt space (binomial sd ~0.002 at n=20000).
    rng = np.random.default_rng(0)
    draws = [T.sample_instance(T.KINDS[i % len(T.KINDS)], rng).prompt for i in range(20000)]
    frac = np.mean([T.is_eval_prompt(p) for p in draws])
    assert abs(frac - T.EVAL_FRACTION) < 0.01
    # The split ignores spacing: the same prompt with other whitespace lands on the same side.
    p = next(iter(eval_set))
    assert T.is_eval_prompt("  " + p.replace(" ", "   ") + " ")


def test_eval_prompts_exhausted_is_a_clear_error():
    # add has 50*50 prompts, ~250 held out: 300 distinct ones cannot exist.
    with pytest.raises(T.TaskConfigError, match="ran out of distinct held-out prompts of kind 'add'"):
        T.eval_prompts(300, 0, kinds=["add"])


def test_generate_task_data_and_jsonl(tmp_path):
    paths = T.generate_task_data(tmp_path / "data", n_corpus=120, n_align=30, n_pref=20, n_eval=14, seed=5)
    assert set(paths) == {"corpus", "pretrain", "align", "pref", "eval"}
    sizes = {"corpus": 120, "pretrain": 120, "align": 30, "pref": 20, "eval": 14}
    for k, p in paths.items():
        with open(p, encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert len(lines) == sizes[k]
        assert all(isinstance(json.loads(line), dict) for line in lines)
    assert T.read_jsonl(paths["corpus"]) == T.general_corpus(120, 5)
    assert T.read_jsonl(paths["eval"]) == T.eval_prompts(14, 5)
    assert T.read_jsonl(paths["pretrain"]) == T.pretrain_text(T.general_corpus(120, 5))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        T.read_jsonl(bad)


def test_score_records_on_eval_file_matches_judge():
    recs = T.eval_prompts(70, 2)
    rng = np.random.default_rng(0)
    responses = [r["reference"] if rng.random() < 0.5 else "nope" for r in recs]
    by_exact = T.score_records(recs, responses, T.make_verifier("exact"))
    by_judge = np.array([T.judge(r["prompt"], s)["strict"] for r, s in zip(recs, responses)])
    np.testing.assert_array_equal(by_exact, by_judge)
    assert 0 < by_exact.mean() < 1
    with pytest.raises(T.VerifierError, match="pair up"):
        T.score_records(recs, responses[:-1], T.make_verifier("exact"))
    # the judge as a verifier for ramjax.evaluate: strict, lenient and the kind as the group
    assert T.task_verifier({"prompt": "Add 2 and 3."}, "5") == {"strict": 1.0, "lenient": 1.0, "group": "add"}
    assert T.task_verifier({"prompt": "Max: 1 5"}, "It is 5!")["strict"] == 0.0


def test_final_period_and_spacing_are_tolerated_in_prompts():
    assert T.parse_prompt("Add 23 and 8.").prompt == "Add 23 and 8"
    assert T.score(" Add  23 and 8. ", "31") == 1.0


def test_judge_all_feeds_accuracy_by_kind():
    res = T.judge_all(["Add 1 and 2", "Max: 1 5", "Max: 7 2"], ["3", "Sure! The answer is 5.", "2"])
    acc = T.accuracy_by_kind(res)
    assert acc["add"]["strict"] == 1.0 and acc["max"] == {"n": 2, "strict": 0.0, "lenient": 0.5}
    assert acc["all"]["strict"] == pytest.approx(1 / 3)
    with pytest.raises(T.TaskError, match="pair up"):
        T.judge_all(["Add 1 and 2"], [])
