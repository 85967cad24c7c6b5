"""What every small held-out task family shares (``wordlist``, ``lexicon``): the four data files built like the
suite from a family's own questions, mistakes and chatter, and the module's command line.

A family supplies ``item(kind, rng, held_out=False) -> (args, prompt, answer)`` (a question drawn from the training
or the held-out side of its content hash), ``mistakes(kind, args) -> [str]`` and its chatter templates (``{a}`` is
the answer). The draws come from one generator seeded ``[seed, salt]`` in a fixed order, so a family's files are the
same bytes for the same seed.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ramjax.files import atomic_write_jsonl

__all__ = ["QUALITIES", "PROPORTIONS", "records", "write_data", "main"]

QUALITIES = ("concise_correct", "wrong", "verbose_correct")
PROPORTIONS = (0.15, 0.45, 0.40)  # of D: the concise answer, a plausible mistake, the answer in chatter

Item = Callable[..., tuple[tuple, str, str]]


def records(*, kinds: Sequence[str], item: Item, mistakes: Callable[[str, tuple], list[str]],
            chatter: Sequence[str], salt: int, seed: int, n_corpus: int, n_align: int, n_pref: int,
            n_eval: int) -> dict[str, list[dict[str, Any]]]:
    """The family's rows: ``corpus`` (D: ``PROPORTIONS`` of the three qualities, shuffled), ``align`` (S: concise
    answers), ``prefs`` (chosen = the concise answer, rejected = chatter one time in three, else a mistake) and
    ``eval`` (distinct held-out questions with their ``answer``); every row carries its ``family`` (the kind)."""
    rng = np.random.default_rng([int(seed), int(salt)])

    def kinds_of(n: int) -> list[str]:
        return [kinds[i % len(kinds)] for i in rng.permutation(n)]

    def chat(answer: str) -> str:
        return chatter[int(rng.integers(len(chatter)))].format(a=answer)

    counts = np.floor(np.asarray(PROPORTIONS) * n_corpus).astype(int)
    counts[0] += n_corpus - counts.sum()
    quals = [q for q, c in zip(QUALITIES, counts) for _ in range(c)]
    quals = [quals[i] for i in rng.permutation(n_corpus)]
    corpus = []
    for kind, q in zip(kinds_of(n_corpus), quals):
        a, prompt, answer = item(kind, rng)
        if q == "concise_correct":
            resp = answer
        elif q == "wrong":
            resp = str(rng.choice(mistakes(kind, a)))
        else:
            resp = chat(answer)
        corpus.append({"prompt": prompt, "response": resp, "family": kind})
    align = []
    for kind in kinds_of(n_align):
        _, prompt, answer = item(kind, rng)
        align.append({"prompt": prompt, "response": answer, "family": kind})
    prefs = []
    for kind in kinds_of(n_pref):
        a, prompt, answer = item(kind, rng)
        bad = chat(answer) if rng.random() < 1 / 3 else str(rng.choice(mistakes(kind, a)))
        prefs.append({"prompt": prompt, "chosen": answer, "rejected": bad, "family": kind})
    seen: set[tuple[str, tuple]] = set()
    evals = []
    for kind in kinds_of(n_eval):
        for _ in range(100_000):
            a, prompt, answer = item(kind, rng, held_out=True)
            if (kind, a) not in seen:
                break
        else:
            raise RuntimeError(f"ran out of distinct held-out {kind!r} questions; ask for fewer than {n_eval}")
        seen.add((kind, a))
        evals.append({"prompt": prompt, "answer": answer, "family": kind})
    return {"corpus": corpus, "align": align, "prefs": prefs, "eval": evals}


def write_data(out_dir: str | os.PathLike, recs: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Writes each list of ``recs`` to ``out_dir/<name>.jsonl``; returns their paths."""
    d = os.fspath(out_dir)
    return {name: atomic_write_jsonl(os.path.join(d, f"{name}.jsonl"), rows) for name, rows in recs.items()}


def main(write: Callable[..., dict[str, str]], usage: str, argv: Sequence[str] | None = None) -> int:
    """A family module's command line: ``DIR [n_corpus n_align n_pref n_eval [seed]]`` → ``write(DIR, ...)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    keys = ("n_corpus", "n_align", "n_pref", "n_eval", "seed")
    paths = write(argv[0], **dict(zip(keys, (int(x) for x in argv[1:]))))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0
