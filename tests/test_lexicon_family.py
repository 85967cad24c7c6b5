"""The third held-out task family (``ramjax.experiments.lexicon``): answers checked by hand and by independent rules,
at least four distinct mistakes per question, the concise correct answer strictly the single most likely response
(exactly, and counted in a written corpus), held-out questions kept apart in every phrasing, the written files read
by ramjax's own readers and judged by the pipeline's verifier; must-fail controls for the tie check and the
cross-phrasing leak check. The slow test is the acceptance run: the default recipe, unchanged, on this family."""
import collections
import itertools
import os

import numpy as np
import pytest

from ramjax import data as D
from ramjax import verify
from ramjax.experiments import lexicon as lx
from ramjax.files import atomic_write_jsonl, read_jsonl

HAND = {
    "before": [(("otter", "plum", "cedar", "otter", "yak"), "cedar"), (("yak", "owl", "yak"), "owl"),
               (("mango", "bean", "crab", "plum", "moth", "mango"), "moth")],
    "first": [(("walnut", "crab", "mango"), "crab"), (("cactus", "cedar", "crab"), "cactus"),
              (("umbrella", "tulip", "squirrel", "parrot"), "parrot")],
    "longest": [(("fig", "lantern", "moth"), "lantern"), (("squirrel", "owl", "bean", "tulip"), "squirrel"),
                (("plum", "yak", "otter"), "otter")],
    "drop": [(("owl", "bean", "owl", "tulip"), "bean tulip"), (("bean", "bean", "owl", "tulip"), "owl tulip"),
             (("tulip", "bean", "owl", "crab", "tulip"), "bean owl crab")],
    "shift": [(("c", "f", "k"), "d g l"), (("b", "x"), "c y"), (("m", "m", "n", "o"), "n n o p")],
}
# Six words with two of the same length (owl, fig), so "longest" also meets lists without a unique longest word.
SIX = ("owl", "fig", "bean", "tulip", "walnut", "mushroom")


def _questions(kind):
    """Every question of ``kind`` over SIX (every ordered list of each length the family draws, every target) or,
    for shift, over the letters b c m w x (every tuple of each length, repeats included)."""
    if kind == "shift":
        for n in (2, 3, 4):
            yield from itertools.product("bcmwx", repeat=n)
        return
    lengths = {"before": (3, 4, 5), "first": (3, 4), "longest": (3, 4), "drop": (3, 4)}[kind]
    for n in lengths:
        for w in itertools.permutations(SIX, n):
            if kind == "before":
                yield from ((t, *w) for t in w[1:])
            elif kind == "drop":
                yield from ((t, *w) for t in w)
            elif kind == "longest":
                if sorted(map(len, w))[-1] > sorted(map(len, w))[-2]:
                    yield w
            else:
                yield w


def _rule(kind, a):
    """An independent statement of each kind's answer."""
    if kind == "before":
        t, w = a[0], list(a[1:])
        return [x for x, y in zip(w, w[1:]) if y == t][0]
    if kind == "first":
        return sorted(a)[0]
    if kind == "longest":
        return sorted(a, key=lambda x: -len(x))[0]
    if kind == "drop":
        return " ".join(a[1:][: a[1:].index(a[0])] + a[1:][a[1:].index(a[0]) + 1:])
    return " ".join("abcdefghijklmnopqrstuvwxyz"["abcdefghijklmnopqrstuvwxyz".index(c) + 1] for c in a)


def _key(kind, a):
    return (kind, tuple(a))


@pytest.mark.parametrize("kind", lx.KINDS)
def test_each_kind_answers_hand_made_questions(kind):
    for args, want in HAND[kind]:
        assert lx.solve(kind, args) == want, (args, want)
        for p in range(3):  # every phrasing renders the question and parses back to it
            assert lx.parse(kind, lx.render(kind, args, p)) == args
    with pytest.raises(ValueError, match="unknown lexicon kind"):
        lx.solve("reverse", ("a", "b"))


@pytest.mark.parametrize("kind", lx.KINDS)
def test_every_question_has_four_distinct_mistakes_never_the_answer(kind):
    """On every question over a small vocabulary (all orders, lengths and targets) and on 1000 drawn questions: the
    answer equals the independent rule, and there are >= 4 distinct mistakes, none of them the answer."""
    rng = np.random.default_rng(5)
    drawn = [lx._args(kind, rng) for _ in range(1000)]
    n = 0
    for a in itertools.chain(_questions(kind), drawn):
        want = _rule(kind, a)
        assert lx.solve(kind, a) == want, a
        m = lx.mistakes(kind, a)
        assert len(m) >= 4 and want not in m and len(set(m)) == len(m) and all(m), (a, m)
        n += 1
    assert n > 1000


def _mode_violations(rows):
    """Rows of a written D whose question's response distribution (``lexicon.response_distribution``) does not have
    the concise answer strictly above every other response, or whose response is outside that distribution."""
    bad = []
    for r in rows:
        a = lx.parse(r["family"], r["prompt"])
        dist = lx.response_distribution(r["family"], a)
        answer = lx.solve(r["family"], a)
        rivals = [p for resp, p in dist.items() if resp != answer]
        if r["response"] not in dist or not dist[answer] > max(rivals) or abs(sum(dist.values()) - 1) > 1e-9:
            bad.append(r)
    return bad


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    d = tmp_path_factory.mktemp("lexicon")
    return lx.write_lexicon_data(d, n_corpus=2000, n_align=200, n_pref=100, n_eval=100, seed=3)


def test_concise_answer_is_strictly_the_single_most_likely_response(written):
    corpus = read_jsonl(written["corpus"])
    assert not _mode_violations(corpus)
    # D's quality mix: exactly 15% the concise answer; the rest are the question's mistakes or its chatter
    n_concise = sum(r["response"] == lx.solve(r["family"], lx.parse(r["family"], r["prompt"])) for r in corpus)
    n_wrong = sum(r["response"] in lx.mistakes(r["family"], lx.parse(r["family"], r["prompt"])) for r in corpus)
    assert n_concise == 300 and n_wrong == 900
    assert collections.Counter(r["family"] for r in corpus) == {k: 400 for k in lx.KINDS}


def test_concise_answer_is_the_mode_when_counted_over_one_question(monkeypatch, tmp_path):
    """Counted, not computed: D written with every row asking the same question per kind (the question with the
    fewest mistakes, four) has the concise answer as its most frequent response by a clear margin."""
    fixed = {"before": ("yak", "owl", "yak", "fig"), "first": ("owl", "fig", "bean"),
             "longest": ("owl", "fig", "tulip"), "drop": ("fig", "owl", "fig", "bean"), "shift": ("c", "f")}
    for k, a in fixed.items():
        assert not lx.is_eval_item(k, a) and len(lx.mistakes(k, a)) >= 4
    monkeypatch.setattr(lx, "_args", lambda kind, rng: fixed[kind])
    path = lx.write_lexicon_data(tmp_path, n_corpus=10_000, n_align=0, n_pref=0, n_eval=0)["corpus"]
    by_kind = collections.defaultdict(collections.Counter)
    for r in read_jsonl(path):
        by_kind[r["family"]][r["response"]] += 1
    for k, counts in by_kind.items():
        (top, n1), (_, n2) = counts.most_common(2)
        assert top == lx.solve(k, fixed[k]) and n1 > 1.2 * n2, (k, counts.most_common(3))


def test_a_question_with_three_mistakes_is_caught_as_a_tie(monkeypatch, written):
    """Must-fail control of the mode check: with only three mistakes a question's mistakes are each as likely (15%)
    as the concise answer, and the check flags every row."""
    rows = read_jsonl(written["corpus"])[:50]
    real = lx.mistakes
    monkeypatch.setattr(lx, "mistakes", lambda kind, args: real(kind, args)[:3])
    assert len(_mode_violations(rows)) == 50


def _leaks(paths):
    """Held-out questions (parsed content, any phrasing) that also appear in D, S or the pairs."""
    held = {_key(r["family"], lx.parse(r["family"], r["prompt"])) for r in read_jsonl(paths["eval"])}
    train = {_key(r["family"], lx.parse(r["family"], r["prompt"]))
             for name in ("corpus", "align", "prefs") for r in read_jsonl(paths[name])}
    return held & train


def test_held_out_questions_are_apart_in_every_phrasing(written, tmp_path):
    evals = read_jsonl(written["eval"])
    assert not _leaks(written)
    keys = [_key(r["family"], lx.parse(r["family"], r["prompt"])) for r in evals]
    assert len(set(keys)) == len(keys) == 100 and all(lx.is_eval_item(*k) for k in keys)
    assert collections.Counter(r["family"] for r in evals) == {k: 20 for k in lx.KINDS}
    for name in ("corpus", "align", "prefs"):
        assert not any(lx.is_eval_item(r["family"], lx.parse(r["family"], r["prompt"]))
                       for r in read_jsonl(written[name])), name
    # must-fail control: one held-out question put into D in ANOTHER phrasing (its prompt text differs) is caught
    e = evals[0]
    a = lx.parse(e["family"], e["prompt"])
    other = next(lx.render(e["family"], a, p) for p in range(3) if lx.render(e["family"], a, p) != e["prompt"])
    leaky = dict(written, corpus=str(tmp_path / "corpus.jsonl"))
    atomic_write_jsonl(leaky["corpus"], read_jsonl(written["corpus"]) + [{"prompt": other, "response": e["answer"],
                                                                          "family": e["family"]}])
    assert other not in {r["prompt"] for r in evals}
    assert _leaks(leaky) == {_key(e["family"], a)}


def test_each_kind_has_thousands_of_distinct_questions():
    rng = np.random.default_rng(0)
    for kind in lx.KINDS:
        keys = {lx._args(kind, rng) for _ in range(3000)}
        assert len(keys) > 2000, (kind, len(keys))
        assert 150 < sum(lx.is_eval_item(kind, k) for k in keys) < 450, kind  # ~10% held out


def test_written_files_read_with_ramjax_readers_and_the_verifier(written, tmp_path):
    for name in ("corpus", "align"):
        for rec, raw in zip(D.read_jsonl(written[name]), read_jsonl(written[name])):
            assert D.prompt_response(rec) == (raw["prompt"], raw["response"])
    prefs = D.read_jsonl(written["prefs"])
    assert len(prefs) == 100 and all(r.format == "preference" for r in prefs)
    assert all(r["chosen"] != r["rejected"] for r in read_jsonl(written["prefs"]))
    align = read_jsonl(written["align"])
    assert all(r["response"] == lx.solve(r["family"], lx.parse(r["family"], r["prompt"])) for r in align)
    evals = read_jsonl(written["eval"])
    ver = verify.make_eval_verifier("auto", evals)
    for r in evals:
        a = lx.parse(r["family"], r["prompt"])
        assert r["answer"] == lx.solve(r["family"], a)
        assert ver(r, r["answer"]) == 1.0 and ver(r, f" {r['answer']} ") == 1.0
        assert all(ver(r, m) == 0.0 for m in lx.mistakes(r["family"], a))
    # same seed, same bytes; the CLI writes the same layout
    again = lx.write_lexicon_data(tmp_path / "again", n_corpus=2000, n_align=200, n_pref=100, n_eval=100, seed=3)
    for k in written:
        assert open(written[k], "rb").read() == open(again[k], "rb").read(), k
    assert lx.main([str(tmp_path / "cli"), "50", "10", "10", "10"]) == 0
    assert sorted(os.listdir(tmp_path / "cli")) == ["align.jsonl", "corpus.jsonl", "eval.jsonl", "prefs.jsonl"]


def test_parse_rejects_other_prompts():
    with pytest.raises(ValueError, match="not a 'drop' question"):
        lx.parse("drop", "Reverse the word order: maple jacket violin")


@pytest.mark.slow
def test_heldout_lexicon_family_with_the_default_recipe(tmp_path):
    """Acceptance on the third held-out family (ramjax.experiments.lexicon: 20k mixed-quality rows of D, 2k concise
    S, 2k pairs, 400 held-out questions), written after the recipe was fixed and run with it unchanged through the
    one command: the product beats Q alone and the warmed-up P_M by at least 30 points, under both decodings."""
    from test_user_data import _check_acceptance, _run_family

    _check_acceptance(_run_family(tmp_path, lx.write_lexicon_data))
