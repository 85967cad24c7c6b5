"""A procedurally generated task suite with a ground-truth judge: the embedded default's data.

Every instruction is short and single-turn, of one of several *kinds*, and its correct answer is a pure
function of the prompt text, so the judge needs nothing but the prompt string and the response::

    add      "Add 23 and 8"           -> "31"
    reverse  "Reverse: c a t e"       -> "e t a c"
    sort     "Sort: 4 1 3 1"          -> "1 1 3 4"
    count    "Count b in: a b b c b"  -> "3"
    upper    "Upper: c a t"           -> "C A T"
    max      "Max: 3 9 4"             -> "9"
    copy     "Copy: red fox cup"      -> "red fox cup"

Letters and digits are space-separated so that a tokenizer of a few hundred pieces keeps one symbol per
token: a ~1M-parameter model can then learn the character-level skills in minutes on a CPU.

For each prompt there are three qualities of response:

* ``concise_correct`` — the canonical answer alone (the target; strict score 1);
* ``wrong`` — a plausible mistake in the concise format (off by one, a partial reversal, an unsorted list…;
  strict and lenient score 0);
* ``verbose_correct`` — the correct answer wrapped in chatter ("Sure! The answer is 31."; strict 0, lenient 1).

The generators (:func:`general_corpus`, :func:`alignment_set`, :func:`preference_pairs`, :func:`eval_prompts`,
:func:`pretrain_text`) are deterministic in their seed and write the JSONL records the trainer reads. The
prompt space is split by a stable hash (:func:`is_eval_prompt`): training generators only draw prompts from
the training side and :func:`eval_prompts` only from the held-out side, so no evaluation prompt is ever seen
in training, whatever the seeds and sizes.

:func:`task_verifier` is the judge as a ``ramjax.verify`` verifier for ``ramjax.evaluate``. The statistics
(``ramjax.stats``) and verifiers (``ramjax.verify``) live in the library and are
re-exported here for the experiment drivers.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ramjax import files
from ramjax.stats import CI, accuracy_by_kind, bootstrap_ci, win_rate, win_values
from ramjax.verify import VerifierError, make_verifier, score_records

logger = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "QUALITIES",
    "DEFAULT_PROPORTIONS",
    "TEMPLATE",
    "PROMPT_TEMPLATE",
    "EVAL_FRACTION",
    "TaskError",
    "TaskParseError",
    "TaskConfigError",
    "VerifierError",
    "TaskInstance",
    "CI",
    "sample_instance",
    "parse_prompt",
    "canonical_answer",
    "wrong_responses",
    "verbose_response",
    "make_response",
    "normalize",
    "strict_score",
    "lenient_score",
    "score",
    "judge",
    "judge_all",
    "is_eval_prompt",
    "format_prompt",
    "general_corpus",
    "alignment_set",
    "preference_pairs",
    "eval_prompts",
    "pretrain_text",
    "write_jsonl",
    "read_jsonl",
    "generate_task_data",
    "write_user_layout",
    "accuracy_by_kind",
    "bootstrap_ci",
    "win_values",
    "win_rate",
    "make_verifier",
    "score_records",
    "task_verifier",
]

# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


class TaskError(ValueError):
    """Base class of the task suite's errors."""


class TaskParseError(TaskError):
    """A prompt matches none of the task kinds' formats."""


class TaskConfigError(TaskError):
    """Bad generator settings: unknown kinds, bad proportions, impossible sizes."""


# ---------------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------------

QUALITIES: tuple[str, ...] = ("concise_correct", "wrong", "verbose_correct")
DEFAULT_PROPORTIONS: dict[str, float] = {"concise_correct": 0.15, "wrong": 0.45, "verbose_correct": 0.40}

# The plain dialogue template of the paper's data (Anthropic HH style). The response follows after one space.
PROMPT_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant:"
TEMPLATE = PROMPT_TEMPLATE + " {response}"

# Share of the prompt space held out for evaluation (by a stable hash of the prompt text).
EVAL_FRACTION = 0.1
_HASH_BUCKETS = 10_000

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_COUNT_LETTERS = "abcdef"  # a small alphabet so that counts are usually > 1
_WORDS = (
    "red", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "car", "book", "milk",
    "rain", "star", "hat", "box", "cup", "pen", "egg", "map", "key", "bag", "bed", "door",
)  # fmt: skip
_ADD_MAX = 49  # operands 0..49: 2,500 prompts, 250 of them held out

# Chatter around a correct answer. Each keeps the answer intact and delimited, so the lenient judge finds it.
_VERBOSE_TEMPLATES = (
    "Sure! The answer is {a}.",
    "The answer is {a}. Hope this helps!",
    "Let me think. The answer is {a}.",
    "Here you go: {a}",
    "{a}. Let me know if you need more help.",
    "Of course. {a}",
    "Answer: {a}",
    'Sure, it is "{a}".',
)

# ---------------------------------------------------------------------------------------------------------
# Task kinds
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskInstance:
    """One instruction: its kind, prompt text, arguments and canonical (concise, correct) answer."""

    kind: str
    prompt: str
    args: tuple
    answer: str


def _spaced(symbols: Iterable[Any]) -> str:
    return " ".join(str(s) for s in symbols)


def _swap_adjacent(seq: list, rng: np.random.Generator) -> list:
    """seq with one random adjacent pair swapped (unchanged if shorter than 2)."""
    if len(seq) < 2:
        return list(seq)
    i = int(rng.integers(len(seq) - 1))
    return seq[:i] + [seq[i + 1], seq[i]] + seq[i + 2 :]


def _perturb_symbol(seq: list[str], rng: np.random.Generator, alphabet: str) -> list[str]:
    """Returns seq with one symbol replaced by a different one from alphabet (always differs from seq)."""
    out = list(seq)
    i = int(rng.integers(len(out)))
    choices = [c for c in alphabet if c != out[i]]
    out[i] = choices[int(rng.integers(len(choices)))]
    return out


class _Kind:
    """A task kind: sampling, rendering and parsing prompts, solving them, and plausible mistakes."""

    name: str
    pattern: re.Pattern

    def sample(self, rng: np.random.Generator) -> tuple:
        raise NotImplementedError

    def render(self, args: tuple) -> str:
        raise NotImplementedError

    def parse(self, m: re.Match) -> tuple:
        raise NotImplementedError

    def solve(self, args: tuple) -> str:
        raise NotImplementedError

    def mistakes(self, args: tuple, rng: np.random.Generator) -> list[str]:
        """Candidate wrong answers (may include the right one; callers filter)."""
        raise NotImplementedError

    def fallback_mistake(self, args: tuple, rng: np.random.Generator) -> str:
        raise NotImplementedError


class _ListKind(_Kind):
    """A kind whose argument is a list of symbols written space-separated after ``"<Name>: "``: the sampling,
    rendering and parsing are the same for all of them (reverse, sort, upper, max, copy); a subclass names its
    alphabet, list lengths and symbol pattern (or inherits them from ``_Letters`` / ``_Digits``) and says how to
    solve and what mistakes to make."""

    alphabet: Sequence[str]
    lengths: tuple[int, int] = (3, 6)  # [low, high) symbols
    symbol: str  # the regex of one symbol
    numeric = False  # symbols are digits, kept as ints in ``args``

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:  # a kind, not one of the shared bases below
            cls.label = cls.name.capitalize()
            cls.pattern = re.compile(rf"{cls.label}: ({cls.symbol}(?: {cls.symbol})*)\.?")

    def _value(self, text: str) -> Any:
        return int(text) if self.numeric else text

    def sample(self, rng):
        n = int(rng.integers(*self.lengths))
        return tuple(self._value(self.alphabet[int(i)]) for i in rng.integers(len(self.alphabet), size=n))

    def render(self, args):
        return f"{self.label}: {_spaced(args)}"

    def parse(self, m):
        return tuple(self._value(t) for t in m.group(1).split())


class _Letters(_ListKind):
    alphabet = _LETTERS
    symbol = "[a-z]"


class _Digits(_ListKind):
    alphabet = "0123456789"
    symbol = r"\d"
    numeric = True


class _Add(_Kind):
    name = "add"
    pattern = re.compile(r"Add (\d+) and (\d+)\.?")

    def sample(self, rng):
        return (int(rng.integers(_ADD_MAX + 1)), int(rng.integers(_ADD_MAX + 1)))

    def render(self, args):
        return f"Add {args[0]} and {args[1]}"

    def parse(self, m):
        return (int(m.group(1)), int(m.group(2)))

    def solve(self, args):
        return str(args[0] + args[1])

    def mistakes(self, args, rng):
        a, b = args
        s = a + b
        return [str(v) for v in (s + 1, s - 1, s + 10, s - 10, abs(a - b), max(a, b)) if v >= 0]

    def fallback_mistake(self, args, rng):
        return str(args[0] + args[1] + 1)


class _Reverse(_Letters):
    name = "reverse"

    def solve(self, args):
        return _spaced(reversed(args))

    def mistakes(self, args, rng):
        rev = list(reversed(args))
        swapped = _swap_adjacent(rev, rng)
        j = int(rng.integers(len(rev)))
        half = len(args) // 2
        partial = list(reversed(args[:half])) + list(args[half:])  # only the first half reversed
        return [
            _spaced(args),  # copied instead of reversed
            _spaced(swapped),
            _spaced(rev[:j] + rev[j + 1 :]),  # a letter dropped
            _spaced(partial),
            _spaced(rev[1:] + rev[:1]),  # rotated
        ]

    def fallback_mistake(self, args, rng):
        return _spaced(_perturb_symbol(list(reversed(args)), rng, _LETTERS))


class _Sort(_Digits):
    name = "sort"

    def solve(self, args):
        return _spaced(sorted(args))

    def mistakes(self, args, rng):
        srt = sorted(args)
        swapped = _swap_adjacent(srt, rng)
        j = int(rng.integers(len(srt)))
        return [
            _spaced(args),  # left unsorted
            _spaced(sorted(args, reverse=True)),
            _spaced(swapped),
            _spaced(srt[:j] + srt[j + 1 :]),  # a digit dropped
            _spaced(sorted(set(args))),  # duplicates merged
        ]

    def fallback_mistake(self, args, rng):
        return _spaced(_perturb_symbol([str(d) for d in sorted(args)], rng, "0123456789"))


class _Count(_Kind):
    name = "count"
    pattern = re.compile(r"Count ([a-z]) in: ([a-z](?: [a-z])*)\.?")

    def sample(self, rng):
        n = int(rng.integers(4, 9))
        letters = tuple(_COUNT_LETTERS[int(i)] for i in rng.integers(len(_COUNT_LETTERS), size=n))
        # Ask mostly about letters that occur, sometimes about any letter of the alphabet (count 0 is valid).
        if rng.random() < 0.8:
            target = letters[int(rng.integers(n))]
        else:
            target = _COUNT_LETTERS[int(rng.integers(len(_COUNT_LETTERS)))]
        return (target, letters)

    def render(self, args):
        return f"Count {args[0]} in: {_spaced(args[1])}"

    def parse(self, m):
        return (m.group(1), tuple(m.group(2).split()))

    def solve(self, args):
        return str(args[1].count(args[0]))

    def mistakes(self, args, rng):
        target, letters = args
        c = letters.count(target)
        others = sorted({letters.count(x) for x in letters if x != target})
        return [str(v) for v in (c + 1, c - 1, len(letters), *others) if v >= 0]

    def fallback_mistake(self, args, rng):
        return str(args[1].count(args[0]) + 1)


class _Upper(_Letters):
    name = "upper"

    def solve(self, args):
        return _spaced(c.upper() for c in args)

    def mistakes(self, args, rng):
        up = [c.upper() for c in args]
        i = int(rng.integers(len(args)))
        return [
            _spaced(args),  # left lower case
            _spaced(up[:1] + list(args[1:])),  # only the first letter
            _spaced(up[:-1] + list(args[-1:])),  # all but the last
            _spaced(up[:i] + up[i + 1 :]),  # a letter dropped
            _spaced(reversed(up)),
        ]

    def fallback_mistake(self, args, rng):
        return _spaced(_perturb_symbol([c.upper() for c in args], rng, _LETTERS.upper()))


class _Max(_Digits):
    name = "max"

    def solve(self, args):
        return str(max(args))

    def mistakes(self, args, rng):
        uniq = sorted(set(args))
        second = uniq[-2] if len(uniq) > 1 else uniq[0] - 1
        return [str(v) for v in (min(args), second, args[0], args[-1], max(args) + 1) if v >= 0]

    def fallback_mistake(self, args, rng):
        return str(max(args) + 1)


class _Copy(_ListKind):
    name = "copy"
    alphabet = _WORDS
    lengths = (2, 5)
    symbol = "[a-z]+"

    def solve(self, args):
        return _spaced(args)

    def mistakes(self, args, rng):
        w = list(args)
        swapped = _swap_adjacent(w, rng)
        j = int(rng.integers(len(w)))
        replaced = list(w)
        replaced[j] = _WORDS[(_WORDS.index(w[j]) + 1 + int(rng.integers(len(_WORDS) - 1))) % len(_WORDS)]
        return [
            _spaced(swapped),
            _spaced(w[:j] + w[j + 1 :]),  # a word dropped
            _spaced(replaced),
            _spaced(reversed(w)),
        ]

    def fallback_mistake(self, args, rng):
        w = list(args)
        w[0] = _WORDS[(_WORDS.index(w[0]) + 1) % len(_WORDS)] if w[0] in _WORDS else w[0] + "s"
        return _spaced(w)


_KIND_OBJS: dict[str, _Kind] = {k.name: k for k in (_Add(), _Reverse(), _Sort(), _Count(), _Upper(), _Max(), _Copy())}
KINDS: tuple[str, ...] = tuple(_KIND_OBJS)

# ---------------------------------------------------------------------------------------------------------
# Instances, parsing and scoring
# ---------------------------------------------------------------------------------------------------------


def _check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = tuple(kinds)
    if not kinds:
        raise TaskConfigError(f"kinds is empty; choose one or more of {list(KINDS)}")
    for k in kinds:
        if k not in _KIND_OBJS:
            close = difflib.get_close_matches(k, KINDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TaskConfigError(f"unknown task kind {k!r}{hint}; known kinds: {list(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise TaskConfigError(f"kinds has duplicates: {list(kinds)}")
    return kinds


def sample_instance(kind: str, rng: np.random.Generator) -> TaskInstance:
    """Draws one instruction of the given kind from rng (either side of the train/eval split)."""
    obj = _KIND_OBJS[_check_kinds([kind])[0]]
    args = obj.sample(rng)
    return TaskInstance(kind, obj.render(args), args, obj.solve(args))


_HUMAN_RE = re.compile(r"Human:\s*(.*?)\s*(?:Assistant:.*)?$", re.S)


def parse_prompt(prompt: str) -> TaskInstance:
    """Recovers the kind, arguments and canonical answer from a prompt's text alone.

    Accepts the bare instruction ("Add 2 and 3") or the templated form ("\\n\\nHuman: Add 2 and 3\\n\\nAssistant:"),
    with any spacing and an optional final period.
    Raises TaskParseError if the text matches no kind's format.
    """
    if not isinstance(prompt, str):
        raise TaskParseError(f"prompt must be a str, got {type(prompt).__name__}")
    text = prompt.strip()
    if "Human:" in text:
        m = _HUMAN_RE.search(text)
        text = m.group(1) if m else text
    text = " ".join(text.split())
    for obj in _KIND_OBJS.values():
        m = obj.pattern.fullmatch(text)
        if m:
            args = obj.parse(m)
            # Re-render so the instance's prompt is canonical whatever the spacing of the input.
            return TaskInstance(obj.name, obj.render(args), args, obj.solve(args))
    raise TaskParseError(
        f"prompt {prompt[:80]!r} matches no task kind; expected e.g. 'Add 2 and 3', 'Reverse: a b c', "
        f"'Sort: 3 1 2', 'Count a in: a b a', 'Upper: a b c', 'Max: 3 1 2', 'Copy: red cat'"
    )


def canonical_answer(prompt: str) -> str:
    """The concise correct response to a task prompt (the only response with strict score 1)."""
    return parse_prompt(prompt).answer


def normalize(text: str) -> str:
    """Strips the ends and collapses runs of whitespace to one space (what the strict judge compares)."""
    return " ".join(text.split())


def _answer_regex(answer: str) -> re.Pattern:
    # The answer must stand alone: no letter or digit directly before or after it ("31" is not in "131").
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(answer) + r"(?![A-Za-z0-9])")


def strict_score(answer: str, response: str) -> float:
    """1.0 if the response, whitespace-normalised, is exactly the answer, else 0.0."""
    return 1.0 if normalize(response) == answer else 0.0


_SYMBOL_SEQ = re.compile(r"[A-Za-z0-9](?: [A-Za-z0-9])+")
_EDGE_SYMBOL = re.compile(r"(?:^|[^A-Za-z0-9])[A-Za-z0-9]$")


def _contains_answer(answer: str, text: str) -> bool:
    """Whether answer occurs in text as a delimited span (see lenient_score)."""
    seq = _SYMBOL_SEQ.fullmatch(answer) is not None
    for m in _answer_regex(answer).finditer(text):
        if not seq:
            return True
        # A spaced symbol sequence must not continue into a neighbouring lone symbol: "x e t a c" is a longer
        # (wrong) sequence, not "e t a c" with chatter.
        before, after = text[: m.start()], text[m.end() :]
        if before.endswith(" ") and _EDGE_SYMBOL.search(before[:-1]):
            continue
        if after.startswith(" ") and _EDGE_SYMBOL.search(after[1:][::-1]):
            continue
        return True
    return False


def lenient_score(answer: str, response: str) -> float:
    """1.0 if the answer appears anywhere in the whitespace-normalised response as a delimited span, else 0.0.

    Delimited: no letter or digit directly before or after ("31" is not in "131"), and for spaced symbol
    sequences ("e t a c") no lone symbol continuing the sequence ("x e t a c" does not count).
    """
    return 1.0 if _contains_answer(answer, normalize(response)) else 0.0


def score(prompt: str, response: str, *, kind: str | None = None, lenient: bool = False) -> float:
    """Scores a response to a task prompt: strict (default) or lenient accuracy, in {0.0, 1.0}.

    kind, if given, is checked against the kind parsed from the prompt (TaskParseError on mismatch).
    """
    inst = parse_prompt(prompt)
    if kind is not None and kind != inst.kind:
        raise TaskParseError(f"prompt {prompt[:80]!r} is of kind {inst.kind!r}, not {kind!r}")
    return (lenient_score if lenient else strict_score)(inst.answer, response)


def judge(prompt: str, response: str) -> dict[str, Any]:
    """Judges one response: {"kind": str, "strict": float, "lenient": float, "reference": str}."""
    inst = parse_prompt(prompt)
    return {
        "kind": inst.kind,
        "strict": strict_score(inst.answer, response),
        "lenient": lenient_score(inst.answer, response),
        "reference": inst.answer,
    }


def judge_all(prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, Any]]:
    """judge() over paired lists of prompts and responses (equal lengths), in order."""
    if len(prompts) != len(responses):
        raise TaskError(f"{len(prompts)} prompts but {len(responses)} responses; they must pair up")
    return [judge(p, r) for p, r in zip(prompts, responses)]


def wrong_responses(inst: TaskInstance, rng: np.random.Generator) -> list[str]:
    """Plausible wrong answers to an instance, in the concise format; each scores 0 strict and 0 lenient.

    Never empty: falls back to the canonical answer with one symbol changed.
    """
    obj = _KIND_OBJS[inst.kind]
    out: list[str] = []
    for cand in obj.mistakes(inst.args, rng):
        cand = normalize(cand)
        # A mistake must not contain the answer (e.g. reversed + an extra letter), else the lenient judge passes it.
        if cand and cand != inst.answer and not _contains_answer(inst.answer, cand) and cand not in out:
            out.append(cand)
    if not out:
        out.append(obj.fallback_mistake(inst.args, rng))
    return out


def verbose_response(inst: TaskInstance, rng: np.random.Generator) -> str:
    """The correct answer wrapped in chatter (strict 0, lenient 1)."""
    t = _VERBOSE_TEMPLATES[int(rng.integers(len(_VERBOSE_TEMPLATES)))]
    return t.format(a=inst.answer)


def make_response(inst: TaskInstance, quality: str, rng: np.random.Generator) -> str:
    """A response of the given quality ("concise_correct", "wrong" or "verbose_correct")."""
    if quality == "concise_correct":
        return inst.answer
    if quality == "wrong":
        cands = wrong_responses(inst, rng)
        return cands[int(rng.integers(len(cands)))]
    if quality == "verbose_correct":
        return verbose_response(inst, rng)
    raise TaskConfigError(f"unknown quality {quality!r}; expected one of {list(QUALITIES)}")


# ---------------------------------------------------------------------------------------------------------
# The train/eval split and the generators
# ---------------------------------------------------------------------------------------------------------


def is_eval_prompt(prompt: str) -> bool:
    """Whether a prompt lies on the held-out side of the split: a stable hash of its canonical text.

    Uses blake2b (not Python's salted hash()), so the split is the same in every process and version.
    Task prompts are canonicalised first, so spacing variants fall on the same side.
    """
    try:
        text = parse_prompt(prompt).prompt
    except TaskParseError:
        text = normalize(prompt)
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return (h % _HASH_BUCKETS) < int(round(EVAL_FRACTION * _HASH_BUCKETS))


def format_prompt(prompt: str) -> str:
    """The prompt in the plain dialogue template, up to and including "Assistant:" (no trailing space)."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


# Independent random streams per generator, so that e.g. S's prompts are not D's first prompts.
_STREAMS = {"corpus": 0, "align": 1, "pref": 2, "eval": 3}


def _rng(seed: int, stream: str) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise TaskConfigError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng([int(seed), _STREAMS[stream]])


def _check_n(n: int, name: str = "n") -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise TaskConfigError(f"{name} must be a non-negative int, got {n!r}")
    return int(n)


def _balanced(labels: Sequence[str], weights: Sequence[float], n: int, rng: np.random.Generator) -> list[str]:
    """n labels in exactly the given proportions (largest-remainder rounding), shuffled by rng."""
    w = np.asarray(weights, dtype=np.float64)
    raw = w / w.sum() * n
    counts = np.floor(raw).astype(int)
    # Hand the remaining units to the largest remainders (ties: earlier label first), so sum(counts) == n.
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    out = [lab for lab, c in zip(labels, counts) for _ in range(c)]
    return [out[i] for i in rng.permutation(n)]


def _train_instance(kind: str, rng: np.random.Generator, max_tries: int = 10_000) -> TaskInstance:
    for _ in range(max_tries):
        inst = sample_instance(kind, rng)
        if not is_eval_prompt(inst.prompt):
            return inst
    raise TaskConfigError(f"could not draw a training prompt of kind {kind!r} in {max_tries} tries")


def _check_proportions(proportions: Mapping[str, float] | None) -> dict[str, float]:
    if proportions is None:
        return dict(DEFAULT_PROPORTIONS)
    props = dict(proportions)
    unknown = set(props) - set(QUALITIES)
    if unknown:
        bad = sorted(unknown)[0]
        close = difflib.get_close_matches(bad, QUALITIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TaskConfigError(f"unknown quality {bad!r} in proportions{hint}; expected keys {list(QUALITIES)}")
    props = {q: float(props.get(q, 0.0)) for q in QUALITIES}
    if any(not np.isfinite(v) or v < 0 for v in props.values()):
        raise TaskConfigError(f"proportions must be finite and non-negative, got {props}")
    total = sum(props.values())
    if abs(total - 1.0) > 1e-6:
        raise TaskConfigError(f"proportions must sum to 1, got {total:.6g} from {props}")
    return props


def general_corpus(
    n: int,
    seed: int = 0,
    proportions: Mapping[str, float] | None = None,
    kinds: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """The general corpus D for pretraining the proposal: responses of mixed quality.

    Returns n records {"prompt", "response", "quality"}, kinds balanced (counts differ by at most one) and
    qualities in exactly the given proportions (largest-remainder rounding), both shuffled. Default
    proportions: 15% concise_correct, 45% wrong, 40% verbose_correct. Prompts come from the training side of
    the split only; a prompt may repeat (with different responses).
    """
    n = _check_n(n)
    kinds = _check_kinds(kinds)
    props = _check_proportions(proportions)
    rng = _rng(seed, "corpus")
    kind_seq = _balanced(kinds, [1.0] * len(kinds), n, rng)
    qual_seq = _balanced(QUALITIES, [props[q] for q in QUALITIES], n, rng)
    out = []
    for kind, quality in zip(kind_seq, qual_seq):
        inst = _train_instance(kind, rng)
        out.append({"prompt": inst.prompt, "response": make_response(inst, quality, rng), "quality": quality})
    return out


def alignment_set(n: int, seed: int = 0, kinds: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The alignment set S (the paper's biased subset of D): n records {"prompt", "response"}, every response
    the concise correct answer. Training-side prompts, kinds balanced."""
    n = _check_n(n)
    kinds = _check_kinds(kinds)
    rng = _rng(seed, "align")
    out = []
    for kind in _balanced(kinds, [1.0] * len(kinds), n, rng):
        inst = _train_instance(kind, rng)
        out.append({"prompt": inst.prompt, "response": inst.answer})
    return out


def preference_pairs(
    n: int,
    seed: int = 0,
    kinds: Sequence[str] | None = None,
    rejected: str = "wrong",
) -> list[dict[str, str]]:
    """Preference pairs for DPO and for RAM with rejected responses: n records {"prompt", "chosen", "rejected"}.

    chosen is the concise correct answer; rejected is a wrong answer ("wrong", default) or a verbose correct one
    ("verbose_correct"). Training-side prompts, kinds balanced.
    """
    n = _check_n(n)
    kinds = _check_kinds(kinds)
    if rejected not in ("wrong", "verbose_correct"):
        raise TaskConfigError(f"rejected must be 'wrong' or 'verbose_correct', got {rejected!r}")
    rng = _rng(seed, "pref")
    out = []
    for kind in _balanced(kinds, [1.0] * len(kinds), n, rng):
        inst = _train_instance(kind, rng)
        out.append({"prompt": inst.prompt, "chosen": inst.answer, "rejected": make_response(inst, rejected, rng)})
    return out


def eval_prompts(n: int, seed: int = 0, kinds: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Held-out evaluation prompts: n distinct records {"prompt", "kind", "reference"}.

    Drawn only from the held-out side of the hash split, so disjoint from every training generator's prompts
    for any seeds. Kinds balanced. reference is the canonical answer (so the exact-match verifier works too).
    Raises TaskConfigError if a kind's held-out space is too small for its share of n.
    """
    n = _check_n(n)
    kinds = _check_kinds(kinds)
    rng = _rng(seed, "eval")
    seen: set[str] = set()
    out = []
    for kind in _balanced(kinds, [1.0] * len(kinds), n, rng):
        # Rejection sampling: 1 in 10 draws lands on the held-out side; repeats are skipped.
        for _ in range(50_000):
            inst = sample_instance(kind, rng)
            if inst.prompt not in seen and is_eval_prompt(inst.prompt):
                break
        else:
            raise TaskConfigError(
                f"ran out of distinct held-out prompts of kind {kind!r} after {len(seen)} prompts; ask for fewer "
                f"evaluation prompts (n={n}) or add kinds"
            )
        seen.add(inst.prompt)
        out.append({"prompt": inst.prompt, "kind": kind, "reference": inst.answer})
    return out


def pretrain_text(records: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Plain-text pretraining records {"text": "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"} from records
    with "prompt" and "response" fields."""
    out = []
    for i, r in enumerate(records):
        if "prompt" not in r or "response" not in r:
            raise TaskConfigError(f"record {i} lacks 'prompt' or 'response' (keys: {sorted(r)})")
        out.append({"text": TEMPLATE.format(prompt=r["prompt"], response=r["response"])})
    return out


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> str:
    """Writes records one JSON object per line (UTF-8), atomically, creating parent folders; returns the path."""
    return files.atomic_write_jsonl(path, records)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a JSONL file (blank lines skipped); a bad line raises TaskError naming the file and line."""
    return files.read_jsonl(path, error=TaskError)


def _suite(n_corpus: int, n_align: int, n_pref: int, n_eval: int, seed: int,
           proportions: Mapping[str, float] | None, kinds: Sequence[str] | None) -> dict[str, list[dict[str, Any]]]:
    """The suite's record lists (corpus D, alignment set S, preference pairs, held-out eval prompts) from one seed;
    each generator draws from its own seeded stream, so the lists do not depend on one another."""
    kinds = _check_kinds(kinds)
    return {"corpus": general_corpus(n_corpus, seed, proportions, kinds), "align": alignment_set(n_align, seed, kinds),
            "pref": preference_pairs(n_pref, seed, kinds), "eval": eval_prompts(n_eval, seed, kinds)}


def generate_task_data(
    out_dir: str | os.PathLike,
    *,
    n_corpus: int = 20_000,
    n_align: int = 2_000,
    n_pref: int = 2_000,
    n_eval: int = 500,
    seed: int = 0,
    proportions: Mapping[str, float] | None = None,
    kinds: Sequence[str] | None = None,
) -> dict[str, str]:
    """Generates the whole suite and writes it as JSONL under out_dir.

    Returns the paths {"corpus", "pretrain", "align", "pref", "eval"}: corpus.jsonl (D with quality labels),
    pretrain.jsonl (D as {"text"}), align.jsonl (S), pref.jsonl (chosen/rejected), eval.jsonl (held out).
    """
    suite = _suite(n_corpus, n_align, n_pref, n_eval, seed, proportions, kinds)
    suite["pretrain"] = pretrain_text(suite["corpus"])
    paths = {name: write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), suite[name])
             for name in ("corpus", "pretrain", "align", "pref", "eval")}
    logger.info("wrote task data to %s: %s", os.fspath(out_dir), {k: os.path.basename(v) for k, v in paths.items()})
    return paths


def write_user_layout(
    out_dir: str | os.PathLike,
    *,
    n_corpus: int = 20_000,
    n_align: int = 2_000,
    n_pref: int = 2_000,
    n_eval: int = 500,
    seed: int = 0,
    proportions: Mapping[str, float] | None = None,
    kinds: Sequence[str] | None = None,
) -> dict[str, str]:
    """The suite in the layout ``pipeline.data_dir`` reads: corpus.jsonl (D: prompt, response, quality),
    align.jsonl (S), prefs.jsonl (prompt, chosen, rejected) and eval.jsonl (prompt, kind, answer). Returns the
    paths by name (corpus, align, prefs, eval)."""
    suite = _suite(n_corpus, n_align, n_pref, n_eval, seed, proportions, kinds)
    suite["prefs"] = suite.pop("pref")
    suite["eval"] = [{"prompt": r["prompt"], "kind": r["kind"], "answer": r["reference"]} for r in suite["eval"]]
    paths = {name: write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), suite[name])
             for name in ("corpus", "align", "prefs", "eval")}
    logger.info("wrote the task suite to %s", os.fspath(out_dir))
    return paths


# ---------------------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------------------


def task_verifier(record: Mapping[str, Any], response: str) -> dict[str, Any]:
    """The suite's judge as a ``ramjax.verify`` verifier: {"strict", "lenient", "group"} from record["prompt"]."""
    if "prompt" not in record:
        raise VerifierError(f"record has no 'prompt' for the task judge (keys: {sorted(record)})")
    j = judge(record["prompt"], response)
    return {"strict": j["strict"], "lenient": j["lenient"], "group": j["kind"]}
