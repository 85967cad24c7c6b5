"""A second held-out task family, never used to tune the recipe: word-list transformations.

The recipe (``configs/recipe/``) was tuned on the seven kinds of ``ramjax.experiments.tasks``; the quiz family
(``ramjax.experiments.quiz``) was the first check that it carries over. This family is a second check, written after
the recipe was fixed and run once with it unchanged. It shares no kind, word, phrasing or chatter with either::

    swap     "Reverse the word order: maple jacket violin" / "Say '...' backwards, word by word." -> "violin jacket
             maple"
    middle   "Middle word of: forest window planet" / "Which word is in the centre: ...?"      -> "window"
    join     "Join with dashes: tiger lemon" / "Hyphenate the list: ..." / ...                -> "tiger-lemon"
    second   "Second word of: silver castle rocket" / "Item number two in '...'?" / ...       -> "castle"
    capital  "Capitalise: ocean piano" / "Title-case the words: ..." / ...                    -> "Ocean Piano"

It is built like the suite: a general corpus D of mixed quality (15% the concise correct answer, 45% a plausible
mistake, 40% the correct answer in chatter; every question has at least four distinct mistakes and seven chatter
templates, so the concise correct answer is the single most likely response to every question), a concise alignment
set S, preference pairs (chosen = concise correct, rejected = a mistake, or chatter one time in three) and 400
held-out prompts with an exact ``answer`` and their ``family``. Held-out questions are split off by a stable hash of
the question's content.

    python -m ramjax.experiments.wordlist data/wordlist
    python train.py configs/default.yaml pipeline.data_dir=data/wordlist run_dir=runs/wordlist
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ramjax.experiments import family, quiz

__all__ = ["KINDS", "solve", "mistakes", "is_eval_item", "write_wordlist_data", "main"]

_WORDS = (
    "tiger", "maple", "ocean", "piano", "candle", "robot", "silver", "garden", "pencil", "rocket", "window",
    "button", "forest", "planet", "violin", "marble", "jacket", "bridge", "castle", "dragon", "island", "lemon",
    "mirror", "tunnel",
)  # fmt: skip
_CHATTER = ("Okay: {a}", "Sure thing, {a}.", "{a} (final answer)", "I'd say {a}.", "Answer -> {a}",
            "Hmm, {a}? Yes.", "The result would be {a}.")
_PHRASINGS = {
    "swap": ("Reverse the word order: {w}", "Say '{w}' backwards, word by word.", "Words in reverse order: {w}"),
    "middle": ("Middle word of: {w}", "Which word is in the centre: {w}?", "Centre item in '{w}'?"),
    "join": ("Join with dashes: {w}", "Hyphenate the list: {w}", "Connect '{w}' using '-'."),
    "second": ("Second word of: {w}", "What comes after the first word in: {w}?", "Item number two in '{w}'?"),
    "capital": ("Capitalise: {w}", "Title-case the words: {w}", "Make each word start uppercase: {w}"),
}
KINDS: tuple[str, ...] = tuple(_PHRASINGS)


def _args(kind: str, rng: np.random.Generator) -> tuple[str, ...]:
    # Every kind's list length is drawn on every call, so the stream of draws has one layout whatever the kind.
    sizes = {"swap": int(rng.integers(2, 4)), "middle": int(rng.choice([3, 5])), "join": int(rng.integers(2, 5)),
             "second": int(rng.integers(3, 6)), "capital": int(rng.integers(1, 4))}
    return tuple(str(w) for w in rng.choice(_WORDS, size=sizes[kind], replace=False))


def solve(kind: str, args: Sequence[str]) -> str:
    """The canonical (concise, correct) answer to a question of ``kind`` over the word list ``args``."""
    a = tuple(args)
    if kind == "swap":
        return " ".join(a[::-1])
    if kind == "middle":
        return a[len(a) // 2]
    if kind == "join":
        return "-".join(a)
    if kind == "second":
        return a[1]
    if kind == "capital":
        return " ".join(w.capitalize() for w in a)
    raise ValueError(f"unknown word-list kind {kind!r}; choose from {list(KINDS)}")


def mistakes(kind: str, args: Sequence[str]) -> list[str]:
    """Plausible wrong answers (never the right one, no repeats, at least four for every list length, so with 45%
    of D wrong each is rarer than the 15% concise correct answer): the list unchanged, a neighbour, half a job."""
    a = tuple(args)
    mid = len(a) // 2
    cands = {
        "swap": lambda: [" ".join(a), "-".join(a[::-1]), a[-1], a[0], " ".join(a[1:] + a[:1])],
        "middle": lambda: [a[0], a[-1], a[mid - 1], a[mid + 1], " ".join(a[mid - 1:mid + 2]), a[mid].upper()],
        "join": lambda: [" ".join(a), "-".join(a[::-1]), "+".join(a), "-".join(a[:-1]), "".join(a)],
        "second": lambda: [a[0], a[2], a[-1], "-".join(a[:2]), a[1].upper()],
        "capital": lambda: [" ".join(a), " ".join(w.upper() for w in a),
                            a[0].capitalize() + (" " + " ".join(a[1:]) if len(a) > 1 else "!"),
                            " ".join(w.capitalize() for w in a[::-1]), " ".join(w[:-1] + w[-1].upper() for w in a)],
    }[kind]()
    right = solve(kind, a)
    return list(dict.fromkeys(c for c in cands if c != right))


def is_eval_item(kind: str, args: Sequence[str]) -> bool:
    """Whether a question (its content, any phrasing) is on the held-out side (10%): the quiz family's stable hash."""
    return quiz.is_eval_item(kind, tuple(args))


def _item(kind: str, rng: np.random.Generator, held_out: bool = False) -> tuple[tuple[str, ...], str, str]:
    while True:
        a = _args(kind, rng)
        if is_eval_item(kind, a) == held_out:
            return a, _PHRASINGS[kind][int(rng.integers(3))].format(w=" ".join(a)), solve(kind, a)


def write_wordlist_data(out_dir: str | os.PathLike, *, n_corpus: int = 20_000, n_align: int = 2_000,
                        n_pref: int = 2_000, n_eval: int = 400, seed: int = 0) -> dict[str, str]:
    """Writes corpus.jsonl (D), align.jsonl (S), prefs.jsonl and eval.jsonl under out_dir; returns their paths."""
    recs = family.records(kinds=KINDS, item=_item, mistakes=mistakes, chatter=_CHATTER, salt=7, seed=seed,
                          n_corpus=n_corpus, n_align=n_align, n_pref=n_pref, n_eval=n_eval)
    return family.write_data(out_dir, recs)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ramjax.experiments.wordlist DIR [n_corpus n_align n_pref n_eval [seed]]``"""
    return family.main(write_wordlist_data, main.__doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
