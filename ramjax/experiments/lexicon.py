"""A third held-out task family, written after the recipe was fixed and never used to tune it: small lexical skills.

The recipe (``configs/recipe/``) was tuned on the seven kinds of ``ramjax.experiments.tasks`` and, last, on the
word-list family (``ramjax.experiments.wordlist``); the quiz family (``ramjax.experiments.quiz``) was an unseen
check of it. This family is a second unseen check, written after the recipe was fixed and run once with it
unchanged. It shares no kind, word, phrasing or chatter with the suite, the quiz or the word-list family::

    before   "Which word comes just before otter in: plum cedar otter yak?" / ...      -> "cedar"
    first    "Which comes first in the alphabet: walnut crab mango?" / ...            -> "crab"
    longest  "Which word is longest: fig lantern moth?" / "Pick the longest of: ..."  -> "lantern"
    drop     "Remove owl from: bean owl tulip" / "Delete 'owl' from the list ..."     -> "bean tulip"
    shift    "The letter after each of: c f k" / "Advance every letter by one: ..."  -> "d g l"

Every question is answerable from its prompt (a skill over the words or letters shown, not a fact never shown).
It is built like the suite: a general corpus D of mixed quality (15% the concise correct answer, 45% a plausible
mistake, 40% the correct answer in chatter; every question has at least four distinct mistakes and seven chatter
templates, so with the 45% spread evenly over the mistakes each is at most 11.25% and the concise correct answer
is strictly the single most likely response to every question: ``response_distribution``), a concise alignment set
S, preference pairs (chosen = concise correct, rejected = a mistake, or chatter one time in three) and 400 held-out
prompts with an exact ``answer`` and their ``family``. Held-out questions are split off by a stable hash of the
question's content (kind and arguments, whatever the phrasing), so no held-out question is seen in training in any
phrasing; ``parse`` reads a rendered prompt back to its content, so the split can be checked on written files.

    python -m ramjax.experiments.lexicon data/lexicon
    python train.py configs/default.yaml pipeline.data_dir=data/lexicon run_dir=runs/lexicon
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from ramjax.experiments import family, quiz

__all__ = ["KINDS", "solve", "mistakes", "response_distribution", "is_eval_item", "render", "parse",
           "write_lexicon_data", "main"]

# Four words of each length 3..8, none of them in the suite's, the quiz's or the word-list family's vocabularies.
_WORDS = (
    "owl", "fig", "elk", "yak", "bean", "crab", "plum", "moth", "tulip", "otter", "mango", "cedar",
    "walnut", "parrot", "cactus", "anchor", "pumpkin", "lobster", "giraffe", "lantern", "mushroom", "squirrel",
    "dinosaur", "umbrella",
)  # fmt: skip
# Letters whose predecessor and the letter two after both exist (b..x), so every shift mistake is a letter.
_LETTERS = "bcdefghijklmnopqrstuvwx"
_CHATTER = ("My answer: {a}", "That's {a}, I think.", "{a} -- hope that helps", "Easy one: {a}",
            "Looks like {a} to me.", "So... {a}.", "Got it: {a}!")
# {t}: the target word (before, drop); {w}: the words or letters, space-separated.
_PHRASINGS = {
    "before": ("Which word comes just before {t} in: {w}?", "In '{w}', what precedes {t}?",
               "Word preceding {t} in: {w}"),
    "first": ("Which comes first in the alphabet: {w}?", "Alphabetically earliest word: {w}",
              "Of '{w}', which would a dictionary list first?"),
    "longest": ("Which word is longest: {w}?", "Pick the longest of: {w}", "Longest word in '{w}'?"),
    "drop": ("Remove {t} from: {w}", "Delete '{t}' from the list {w}", "What is left of '{w}' without {t}?"),
    "shift": ("The letter after each of: {w}", "Advance every letter by one: {w}",
              "Shift '{w}' one step along the alphabet."),
}
KINDS: tuple[str, ...] = tuple(_PHRASINGS)
_TARGETED = ("before", "drop")  # args = (target, *words); the others: args = words (or letters)
_PROPORTIONS = family.PROPORTIONS


def _args(kind: str, rng: np.random.Generator) -> tuple[str, ...]:
    # Every kind's draws are made on every call, so the stream of draws has one layout whatever the kind.
    while True:
        sizes = {"before": int(rng.integers(3, 6)), "first": int(rng.integers(3, 5)),
                 "longest": int(rng.integers(3, 5)), "drop": int(rng.integers(3, 5)), "shift": int(rng.integers(2, 5))}
        n = sizes[kind]
        words = tuple(str(w) for w in rng.choice(_WORDS, size=n, replace=False))
        letters = tuple(_LETTERS[int(i)] for i in rng.integers(len(_LETTERS), size=n))
        u = int(rng.integers(1 << 30))
        if kind == "before":  # the target is never the first word, so it has a predecessor
            return (words[1 + u % (n - 1)], *words)
        if kind == "drop":
            return (words[u % n], *words)
        if kind == "shift":
            return letters
        lengths = sorted(len(w) for w in words)
        if kind != "longest" or lengths[-1] > lengths[-2]:  # exactly one longest word; redraw otherwise
            return words


def _split(kind: str, args: Sequence[str]) -> tuple[str | None, tuple[str, ...]]:
    a = tuple(args)
    return (a[0], a[1:]) if kind in _TARGETED else (None, a)


def solve(kind: str, args: Sequence[str]) -> str:
    """The canonical (concise, correct) answer to a question of ``kind``; ``args`` is ``(target, *words)`` for
    "before" and "drop", the words (or letters, for "shift") otherwise."""
    t, w = _split(kind, args)
    if kind == "before":
        return w[w.index(t) - 1]
    if kind == "first":
        return min(w)
    if kind == "longest":
        return max(w, key=len)
    if kind == "drop":
        return " ".join(x for x in w if x != t)
    if kind == "shift":
        return " ".join(chr(ord(c) + 1) for c in w)
    raise ValueError(f"unknown lexicon kind {kind!r}; choose from {list(KINDS)}")


def mistakes(kind: str, args: Sequence[str]) -> list[str]:
    """Plausible wrong answers, a function of the question alone (never the right one, no repeats, at least four for
    every question the family draws): a neighbour, the opposite extreme, half a job, the right word in capitals."""
    t, w = _split(kind, args)
    right = solve(kind, args)
    if kind == "before":
        i = w.index(t)
        cands = [t, *(w[i + 1:i + 2]), w[0], w[-1], f"{right} {t}", right.upper()]
    elif kind == "first":
        s = sorted(w)
        cands = [s[-1], s[1], w[0], w[-1], " ".join(s), right.upper()]
    elif kind == "longest":
        s = sorted(w, key=len)
        cands = [s[0], s[-2], w[0], w[-1], str(len(right)), right.upper()]
    elif kind == "drop":
        j = w.index(t)
        rest = [x for x in w if x != t]
        other = w[(j + 1) % len(w)]
        cands = [" ".join(w), t, " ".join(x for x in w if x != other), " ".join(rest[::-1]), " ".join(rest[:-1])]
    elif kind == "shift":
        up = [chr(ord(c) + 1) for c in w]
        cands = [" ".join(w), " ".join(chr(ord(c) - 1) for c in w), " ".join(chr(ord(c) + 2) for c in w),
                 right.upper(), " ".join(up[:-1] + [chr(ord(up[-1]) + 1)])]
    else:
        raise ValueError(f"unknown lexicon kind {kind!r}; choose from {list(KINDS)}")
    return list(dict.fromkeys(c for c in cands if c and c != right))


def response_distribution(kind: str, args: Sequence[str]) -> dict[str, float]:
    """The exact distribution of D's response to one question (any phrasing): 15% the answer, 45% spread evenly over
    ``mistakes``, 40% over the chatter templates around the answer. {response: probability}, summing to 1."""
    right, wrong = solve(kind, args), mistakes(kind, args)
    p: dict[str, float] = {right: _PROPORTIONS[0]}
    for m in wrong:
        p[m] = p.get(m, 0.0) + _PROPORTIONS[1] / len(wrong)
    for c in _CHATTER:
        r = c.format(a=right)
        p[r] = p.get(r, 0.0) + _PROPORTIONS[2] / len(_CHATTER)
    return p


def is_eval_item(kind: str, args: Sequence[str]) -> bool:
    """Whether a question (its content, any phrasing) is on the held-out side (10%): the quiz family's stable hash of
    ``kind`` and ``args``."""
    return quiz.is_eval_item(kind, tuple(args))


def render(kind: str, args: Sequence[str], phrasing: int) -> str:
    """The prompt of a question in phrasing ``phrasing`` (0..2)."""
    t, w = _split(kind, args)
    return _PHRASINGS[kind][phrasing].format(t=t, w=" ".join(w))


def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{t\}", r"(?P<t>[a-z]+)").replace(r"\{w\}", r"(?P<w>[a-z]+(?: [a-z]+)*)")
    return re.compile(body)


_PATTERNS = {k: tuple(_pattern(t) for t in ts) for k, ts in _PHRASINGS.items()}


def parse(kind: str, prompt: str) -> tuple[str, ...]:
    """The arguments of a rendered prompt of ``kind`` (the inverse of ``render``, whatever the phrasing); raises
    ``ValueError`` on a prompt that is none of the kind's phrasings."""
    for pat in _PATTERNS[kind]:
        m = pat.fullmatch(prompt)
        if m:
            w = tuple(m.group("w").split())
            return (m.group("t"), *w) if kind in _TARGETED else w
    raise ValueError(f"{prompt!r} is not a {kind!r} question of the lexicon family")


def _item(kind: str, rng: np.random.Generator, held_out: bool = False) -> tuple[tuple[str, ...], str, str]:
    while True:
        a = _args(kind, rng)
        if is_eval_item(kind, a) == held_out:
            return a, render(kind, a, int(rng.integers(len(_PHRASINGS[kind])))), solve(kind, a)


def write_lexicon_data(out_dir: str | os.PathLike, *, n_corpus: int = 20_000, n_align: int = 2_000,
                       n_pref: int = 2_000, n_eval: int = 400, seed: int = 0) -> dict[str, str]:
    """Writes corpus.jsonl (D), align.jsonl (S), prefs.jsonl and eval.jsonl under out_dir; returns their paths."""
    recs = family.records(kinds=KINDS, item=_item, mistakes=mistakes, chatter=_CHATTER, salt=11, seed=seed,
                          n_corpus=n_corpus, n_align=n_align, n_pref=n_pref, n_eval=n_eval)
    return family.write_data(out_dir, recs)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ramjax.experiments.lexicon DIR [n_corpus n_align n_pref n_eval [seed]]``"""
    return family.main(write_lexicon_data, main.__doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
