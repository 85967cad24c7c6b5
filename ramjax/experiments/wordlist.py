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
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ramjax.experiments import quiz
from ramjax.files import atomic_write_jsonl

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
_QUALITIES = ("concise_correct", "wrong", "verbose_correct")
_PROPORTIONS = (0.15, 0.45, 0.40)


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


def _kinds(n: int, rng: np.random.Generator) -> list[str]:
    return [KINDS[i % len(KINDS)] for i in rng.permutation(n)]


def _chatter(answer: str, rng: np.random.Generator) -> str:
    return _CHATTER[int(rng.integers(len(_CHATTER)))].format(a=answer)


def _records(seed: int, n_corpus: int, n_align: int, n_pref: int, n_eval: int) -> dict[str, list[dict[str, Any]]]:
    rng = np.random.default_rng([int(seed), 7])
    counts = np.floor(np.asarray(_PROPORTIONS) * n_corpus).astype(int)
    counts[0] += n_corpus - counts.sum()
    quals = [q for q, c in zip(_QUALITIES, counts) for _ in range(c)]
    quals = [quals[i] for i in rng.permutation(n_corpus)]
    corpus = []
    for kind, q in zip(_kinds(n_corpus, rng), quals):
        a, prompt, answer = _item(kind, rng)
        if q == "concise_correct":
            resp = answer
        elif q == "wrong":
            resp = str(rng.choice(mistakes(kind, a)))
        else:
            resp = _chatter(answer, rng)
        corpus.append({"prompt": prompt, "response": resp, "family": kind})
    align = []
    for kind in _kinds(n_align, rng):
        _, prompt, answer = _item(kind, rng)
        align.append({"prompt": prompt, "response": answer, "family": kind})
    prefs = []
    for kind in _kinds(n_pref, rng):
        a, prompt, answer = _item(kind, rng)
        bad = _chatter(answer, rng) if rng.random() < 1 / 3 else str(rng.choice(mistakes(kind, a)))
        prefs.append({"prompt": prompt, "chosen": answer, "rejected": bad, "family": kind})
    seen: set[tuple[str, tuple[str, ...]]] = set()
    evals = []
    for kind in _kinds(n_eval, rng):
        for _ in range(100_000):
            a, prompt, answer = _item(kind, rng, held_out=True)
            if (kind, a) not in seen:
                break
        else:
            raise RuntimeError(f"ran out of distinct held-out {kind!r} questions; ask for fewer than {n_eval}")
        seen.add((kind, a))
        evals.append({"prompt": prompt, "answer": answer, "family": kind})
    return {"corpus": corpus, "align": align, "prefs": prefs, "eval": evals}


def write_wordlist_data(out_dir: str | os.PathLike, *, n_corpus: int = 20_000, n_align: int = 2_000,
                        n_pref: int = 2_000, n_eval: int = 400, seed: int = 0) -> dict[str, str]:
    """Writes corpus.jsonl (D), align.jsonl (S), prefs.jsonl and eval.jsonl under out_dir; returns their paths."""
    d = os.fspath(out_dir)
    recs = _records(seed, n_corpus, n_align, n_pref, n_eval)
    return {name: atomic_write_jsonl(os.path.join(d, f"{name}.jsonl"), rows) for name, rows in recs.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ramjax.experiments.wordlist DIR [n_corpus n_align n_pref n_eval [seed]]``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    keys = ("n_corpus", "n_align", "n_pref", "n_eval", "seed")
    paths = write_wordlist_data(argv[0], **dict(zip(keys, (int(x) for x in argv[1:]))))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
