"""A second generated task family, held out from the recipe's tuning: short-answer quiz questions.

The recipe (``configs/recipe/``) was tuned on the seven kinds of ``ramjax.experiments.tasks``; this family checks
that it carries over to data it was not tuned on. It shares nothing with the suite: other kinds, several
phrasings per kind, other words, other answer formats, other chatter::

    minus     "What is 47 minus 12?" / "Subtract 12 from 47." / "Compute 47 - 12."          -> "35"
    next      "Continue the sequence: 3 7 11" / "What number comes next: 3, 7, 11?" / ...  -> "15"
    last      "Which word is last: river stone cloud?" / "Give the final word of: ..." / ... -> "cloud"
    initials  "Initials of: river stone cloud" / "First letters of: ..." / ...             -> "r-s-c"

It is built like the suite: a general corpus D of mixed quality (by default 15% the concise correct answer, 45% a
plausible mistake, 40% the correct answer wrapped in chatter) in which the concise correct answer is still the
most likely response (the mistakes and the chatter are spread over several variants each; on three-word "last" and
"twice" questions there are only three distinct mistakes, each as frequent as the concise answer), a concise
alignment set S, preference pairs (chosen = concise correct, rejected = a mistake or chatter) and held-out prompts
with an exact ``answer`` and their ``family``. Held-out questions are split off by a stable hash of the question's
content (kind and arguments, whatever the phrasing), so no evaluation question is seen in training in any
phrasing.

``write_quiz_data(DIR)`` writes ``DIR/corpus.jsonl``, ``align.jsonl``, ``prefs.jsonl`` and ``eval.jsonl`` in the
layout ``pipeline.data_dir=DIR`` reads::

    python -m ramjax.experiments.quiz data/quiz
    python train.py configs/default.yaml pipeline.data_dir=data/quiz run_dir=runs/quiz
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ramjax.files import atomic_write_jsonl as write_jsonl

__all__ = ["KINDS", "QuizItem", "sample_item", "general_corpus", "alignment_set", "preference_pairs",
           "eval_prompts", "write_quiz_data", "main"]

KINDS: tuple[str, ...] = ("last", "initials", "twice", "odd")
# Arithmetic on held-out operands: no system learns these at the recipe's model sizes and CPU budget (SFT of P_M
# scored <= 0.2 on subtraction), so they measure capacity rather than alignment; opt in with ``kinds=ALL_KINDS``.
ARITHMETIC_KINDS: tuple[str, ...] = ("minus", "next")
ALL_KINDS: tuple[str, ...] = KINDS + ARITHMETIC_KINDS
EVAL_FRACTION = 0.1
_WORDS = (
    "river", "stone", "cloud", "apple", "lamp", "chair", "wolf", "snow", "glass", "paper", "horse", "salt",
    "train", "ring", "leaf", "bell", "coat", "drum", "ship", "yard", "nest", "corn", "fork", "kite",
)  # fmt: skip
_CHATTER = (
    "Well, that would be {a}.",
    "I believe it is {a}!",
    "{a}, if I am not mistaken.",
    "Good question. It is {a}.",
    "Result: {a}. Anything else?",
    "Let me see... {a}",
)
_PHRASINGS = {
    "minus": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."),
    "next": ("Continue the sequence: {s}", "What number comes next: {c}?", "Next term after {s}?"),
    "last": ("Which word is last: {w}?", "Give the final word of: {w}", "Last word in '{w}'?"),
    "initials": ("Initials of: {w}", "First letters of: {w}", "Abbreviate '{w}' by first letters."),
    "twice": ("Which word appears twice: {w}?", "Find the repeated word in: {w}", "Name the duplicate: {w}"),
    "odd": ("Which item is not a number: {w}?", "Spot the word among the numbers: {w}", "Odd one out: {w}"),
}


class QuizItem(tuple):
    """(kind, args, prompt, answer)."""

    kind = property(lambda self: self[0])
    args = property(lambda self: self[1])
    prompt = property(lambda self: self[2])
    answer = property(lambda self: self[3])


def _args(kind: str, rng: np.random.Generator) -> tuple:
    if kind == "minus":
        a = int(rng.integers(0, 60))
        return (a, int(rng.integers(0, a + 1)))
    if kind == "next":
        return (int(rng.integers(0, 41)), int(rng.integers(1, 13)), int(rng.integers(3, 6)))
    n = int(rng.integers(3, 6))
    if kind == "twice":  # n distinct words, one of them written a second time at another place
        words = [str(w) for w in rng.choice(_WORDS, size=n, replace=False)]
        words.insert(int(rng.integers(0, n + 1)), words[int(rng.integers(n))])
        while any(a == b for a, b in zip(words, words[1:])):  # never side by side: that would be too easy
            words = [words[i] for i in rng.permutation(len(words))]
        return tuple(words)
    if kind == "odd":  # n numbers and one word, the word at a random place
        items = [str(int(v)) for v in rng.integers(0, 100, size=n)]
        items.insert(int(rng.integers(0, n + 1)), str(rng.choice(_WORDS)))
        return tuple(items)
    return tuple(str(w) for w in rng.choice(_WORDS, size=n, replace=False))


def _solve(kind: str, args: tuple) -> str:
    if kind == "minus":
        return str(args[0] - args[1])
    if kind == "next":
        start, step, n = args
        return str(start + n * step)
    if kind == "last":
        return args[-1]
    if kind == "twice":
        return next(w for w in args if args.count(w) > 1)
    if kind == "odd":
        return next(w for w in args if not w.isdigit())
    return "-".join(w[0] for w in args)


def _render(kind: str, args: tuple, phrasing: int) -> str:
    t = _PHRASINGS[kind][phrasing]
    if kind == "minus":
        return t.format(a=args[0], b=args[1])
    if kind == "next":
        start, step, n = args
        terms = [str(start + i * step) for i in range(n)]
        return t.format(s=" ".join(terms), c=", ".join(terms))
    return t.format(w=" ".join(args))


def _mistakes(kind: str, args: tuple, rng: np.random.Generator) -> list[str]:
    right = _solve(kind, args)
    if kind == "minus":
        a, b = args
        cands = [str(v) for v in (a - b + 1, a - b - 1, a + b, a - b + 10, b - a if b > a else a - b - 10) if v >= 0]
    elif kind == "next":
        start, step, n = args
        last = start + (n - 1) * step
        cands = [str(v) for v in (last, last + step + 1, last + step - 1, last + 2 * step, last + 1)]
    elif kind == "last":
        others = [w for w in _WORDS if w not in args]
        cands = [args[0], args[-2], args[1], str(rng.choice(others))]
    elif kind == "twice":  # another word of the list, or one that is not in it
        others = [w for w in _WORDS if w not in args]
        cands = [w for w in dict.fromkeys(args) if w != right][:3] + [str(rng.choice(others))]
    elif kind == "odd":  # one of the numbers, or another word
        others = [w for w in _WORDS if w not in args]
        cands = [w for w in args if w.isdigit()][:3] + [str(rng.choice(others))]
    else:
        letters = [w[0] for w in args]
        cands = ["-".join(letters[:-1]), "-".join(w[-1] for w in args), "-".join(letters[::-1]),
                 "".join(letters), "-".join(letters[1:])]
    out = []
    for c in cands:
        if c != right and c and c not in out:
            out.append(c)
    return out


def _key(kind: str, args: tuple) -> str:
    return f"{kind}:{','.join(map(str, args))}"


def is_eval_item(kind: str, args: tuple) -> bool:
    """Whether a question (its content, any phrasing) is on the held-out side: a stable blake2b hash."""
    h = int.from_bytes(hashlib.blake2b(_key(kind, args).encode(), digest_size=8).digest(), "little")
    return (h % 10_000) < int(round(EVAL_FRACTION * 10_000))


def sample_item(kind: str, rng: np.random.Generator, *, held_out: bool = False) -> QuizItem:
    """A question of ``kind`` from the training side (or the held-out side) of the split, in a random phrasing."""
    for _ in range(100_000):
        args = _args(kind, rng)
        if is_eval_item(kind, args) == held_out:
            phrasing = int(rng.integers(len(_PHRASINGS[kind])))
            return QuizItem((kind, args, _render(kind, args, phrasing), _solve(kind, args)))
    raise RuntimeError(f"no {'held-out' if held_out else 'training'} question of kind {kind!r} found")


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 1000 + stream])


def _kinds(n: int, rng: np.random.Generator, kinds: Sequence[str] = KINDS) -> list[str]:
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown quiz kinds {bad or kinds}; choose from {list(ALL_KINDS)}")
    return [kinds[i % len(kinds)] for i in rng.permutation(n)]


def _response(item: QuizItem, quality: str, rng: np.random.Generator) -> str:
    if quality == "concise_correct":
        return item.answer
    if quality == "wrong":
        cands = _mistakes(item.kind, item.args, rng)
        return cands[int(rng.integers(len(cands)))]
    return _CHATTER[int(rng.integers(len(_CHATTER)))].format(a=item.answer)


def general_corpus(n: int, seed: int = 0, proportions: Sequence[float] = (0.15, 0.45, 0.40),
                   kinds: Sequence[str] = KINDS) -> list[dict[str, Any]]:
    """D: n records {"prompt", "response", "quality", "family"}; qualities (concise_correct, wrong,
    verbose_correct) in the given proportions, kinds balanced, training-side questions only."""
    rng = _rng(seed, 0)
    counts = np.floor(np.asarray(proportions) * n).astype(int)
    counts[0] += n - counts.sum()
    quals = [q for q, c in zip(("concise_correct", "wrong", "verbose_correct"), counts) for _ in range(c)]
    quals = [quals[i] for i in rng.permutation(n)]
    out = []
    for kind, q in zip(_kinds(n, rng, kinds), quals):
        item = sample_item(kind, rng)
        out.append({"prompt": item.prompt, "response": _response(item, q, rng), "quality": q, "family": kind})
    return out


def alignment_set(n: int, seed: int = 0, kinds: Sequence[str] = KINDS) -> list[dict[str, Any]]:
    """S: n records {"prompt", "response" (the concise correct answer), "family"}."""
    rng = _rng(seed, 1)
    return [{"prompt": it.prompt, "response": it.answer, "family": it.kind}
            for it in (sample_item(k, rng) for k in _kinds(n, rng, kinds))]


def preference_pairs(n: int, seed: int = 0, kinds: Sequence[str] = KINDS) -> list[dict[str, Any]]:
    """n pairs {"prompt", "chosen" (concise correct), "rejected" (a mistake, or chatter one time in three)}."""
    rng = _rng(seed, 2)
    out = []
    for kind in _kinds(n, rng, kinds):
        it = sample_item(kind, rng)
        bad = _response(it, "verbose_correct" if rng.random() < 1 / 3 else "wrong", rng)
        out.append({"prompt": it.prompt, "chosen": it.answer, "rejected": bad, "family": kind})
    return out


def eval_prompts(n: int, seed: int = 0, kinds: Sequence[str] = KINDS) -> list[dict[str, Any]]:
    """n distinct held-out questions {"prompt", "answer", "family"}, kinds balanced."""
    rng = _rng(seed, 3)
    seen: set[str] = set()
    out = []
    for kind in _kinds(n, rng, kinds):
        for _ in range(10_000):
            it = sample_item(kind, rng, held_out=True)
            if _key(kind, it.args) not in seen:
                break
        else:
            raise RuntimeError(f"ran out of distinct held-out {kind!r} questions; ask for fewer than {n}")
        seen.add(_key(kind, it.args))
        out.append({"prompt": it.prompt, "answer": it.answer, "family": kind})
    return out


def write_quiz_data(out_dir: str | os.PathLike, *, n_corpus: int = 20_000, n_align: int = 2_000,
                    n_pref: int = 2_000, n_eval: int = 400, seed: int = 0,
                    kinds: Sequence[str] = KINDS) -> dict[str, str]:
    """Writes corpus.jsonl, align.jsonl, prefs.jsonl and eval.jsonl under out_dir; returns their paths."""
    d = os.fspath(out_dir)
    return {"corpus": write_jsonl(os.path.join(d, "corpus.jsonl"), general_corpus(n_corpus, seed, kinds=kinds)),
            "align": write_jsonl(os.path.join(d, "align.jsonl"), alignment_set(n_align, seed, kinds)),
            "prefs": write_jsonl(os.path.join(d, "prefs.jsonl"), preference_pairs(n_pref, seed, kinds)),
            "eval": write_jsonl(os.path.join(d, "eval.jsonl"), eval_prompts(n_eval, seed, kinds))}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ramjax.experiments.quiz DIR [n_corpus n_align n_pref n_eval [seed]] [--kinds=a,b,...]``
    (default kinds: last, initials, twice, odd; the arithmetic ones: minus, next)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kinds = KINDS
    for a in [a for a in argv if a.startswith("--kinds=")]:
        kinds = tuple(k for k in a.split("=", 1)[1].split(",") if k)
        argv.remove(a)
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    nums = [int(x) for x in argv[1:]]
    keys = ("n_corpus", "n_align", "n_pref", "n_eval", "seed")
    paths = write_quiz_data(argv[0], **dict(zip(keys, nums)), kinds=kinds)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
