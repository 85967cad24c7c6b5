"""Verifiers: functions that judge a response against a held-out record.

A verifier is ``verify(record, response) -> float`` (strict score in [0, 1]) or a mapping
``{"strict": float, "lenient": float | None, "group": str | None}``. ``ramjax.evaluate`` takes one as an argument
and knows nothing of any task; the built-in ones judge users' records by their reference fields:

* exact: ``record["answer"]`` (a string or a list of accepted strings) equals the response after stripping and
  collapsing whitespace (optionally ignoring case);
* regex: ``record["regex"]`` (a pattern or a list; any may match) matches the whole response (or anywhere);
* references (:func:`reference_verifier`): per record, exact on ``answer`` if present, else regex on ``regex``.

Older field names are accepted as fall-backs: ``reference`` for ``answer``, ``pattern`` for ``regex``. Records may
carry a group field (``family``, ``category`` or ``kind``, first present wins, :func:`group_of`) for a per-group
breakdown. ``resolve_verifier("module:function")`` loads any other verifier by name (e.g. the generated task
suite's judge, ``ramjax.experiments.tasks:task_verifier``).
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["EvalError", "VerifierError", "Verifier", "ANSWER_FIELDS", "REGEX_FIELDS", "GROUP_FIELDS", "make_verifier",
           "reference_verifier", "has_references", "group_of", "resolve_verifier", "score_records",
           "default_verifier", "VERIFIER_ALIASES", "make_eval_verifier", "judge_responses"]


class EvalError(ValueError):
    """Bad evaluation input (``ramjax.evaluate``, its judging, log-likelihood and report): unknown mode or decoding,
    duplicate system names, mismatched lengths, a missing baseline or model."""


Verifier = Callable[[Mapping[str, Any], str], Any]

ANSWER_FIELDS: tuple[str, ...] = ("answer", "reference")
REGEX_FIELDS: tuple[str, ...] = ("regex", "pattern")
GROUP_FIELDS: tuple[str, ...] = ("family", "category", "kind")


class VerifierError(ValueError):
    """A verifier was built with bad settings or given a record without the field it needs."""


def group_of(record: Mapping[str, Any], default: str = "all") -> str:
    """The record's group for per-group accuracy: its ``family``, ``category`` or ``kind`` field, else default."""
    for k in GROUP_FIELDS:
        v = record.get(k)
        if v is not None and str(v) != "":
            return str(v)
    return default


def _first_field(record: Mapping[str, Any], names: Sequence[str]) -> str | None:
    return next((k for k in names if k in record), None)


def _values(record: Mapping[str, Any], key: str) -> list[str]:
    v = record[key]
    vals = [v] if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else None
    if vals is None or not all(isinstance(s, str) for s in vals):
        raise VerifierError(f"field {key!r} must be a string or a list of strings, got {v!r}")
    return vals


def make_verifier(
    kind: str = "exact",
    *,
    field: str | None = None,
    strip: bool = True,
    collapse_whitespace: bool = True,
    case_sensitive: bool = True,
    full_match: bool = True,
) -> Callable[[Mapping[str, Any], str], float]:
    """A verifier for JSONL records: verify(record, response) -> 1.0 or 0.0.

    kind="exact": the response equals record[field] (default: ``answer``, else ``reference``; a str, or a list of
      accepted strs), after stripping and collapsing whitespace (by default) and optionally ignoring case.
    kind="regex": record[field] (default ``regex``, else ``pattern``; a regex or a list, any may match) matches the
      response, the whole of it if full_match (default) else anywhere (re.search).
    kind="references": exact where the record has an answer field, else regex (see :func:`reference_verifier`).
    """

    def norm(s: str) -> str:
        if collapse_whitespace:
            s = " ".join(s.split())
        elif strip:
            s = s.strip()
        return s if case_sensitive else s.casefold()

    def key_of(record: Mapping[str, Any], names: Sequence[str], what: str) -> str:
        key = field if field is not None else _first_field(record, names)
        if key is None or key not in record:
            want = repr(field) if field is not None else " or ".join(repr(n) for n in names)
            raise VerifierError(f"record lacks the {want} field the {what} verifier reads (keys: {sorted(record)})")
        return key

    flags = 0 if case_sensitive else re.IGNORECASE
    cache: dict[str, re.Pattern] = {}

    def compile_(p: str, key: str) -> re.Pattern:
        if p not in cache:
            try:
                cache[p] = re.compile(p, flags)
            except re.error as e:
                raise VerifierError(f"bad regex {p!r} in field {key!r}: {e}") from None
        return cache[p]

    def exact(record: Mapping[str, Any], response: str) -> float:
        r = norm(response)
        return 1.0 if any(norm(ref) == r for ref in _values(record, key_of(record, ANSWER_FIELDS, "exact"))) else 0.0

    def regex(record: Mapping[str, Any], response: str) -> float:
        key = key_of(record, REGEX_FIELDS, "regex")
        r = response.strip() if strip else response
        match = (lambda rx: rx.fullmatch(r)) if full_match else (lambda rx: rx.search(r))
        return 1.0 if any(match(compile_(p, key)) for p in _values(record, key)) else 0.0

    def references(record: Mapping[str, Any], response: str) -> float:
        if field is None and _first_field(record, ANSWER_FIELDS) is None and _first_field(record, REGEX_FIELDS):
            return regex(record, response)
        return exact(record, response)

    fns = {"exact": exact, "regex": regex, "references": references}
    if kind not in fns:
        raise VerifierError(f"unknown verifier kind {kind!r}; expected one of {sorted(fns)} "
                            f"(or 'module:function' through resolve_verifier)")
    return fns[kind]


def has_references(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every record carries an answer or regex field (then :func:`reference_verifier` can judge them).

    Raises VerifierError when only some records do: a held-out file is judged entirely or not at all.
    """
    flags = [_first_field(r, ANSWER_FIELDS + REGEX_FIELDS) is not None for r in records]
    if any(flags) and not all(flags):
        i = flags.index(False)
        raise VerifierError(f"eval record {i} has no 'answer' or 'regex' field but {sum(flags)} of {len(flags)} "
                            f"records do; give every record a reference, or none (then only the likelihood metrics "
                            f"and the AlpacaEval files are written)")
    return bool(flags) and all(flags)


def reference_verifier(**kw: Any) -> Callable[[Mapping[str, Any], str], float]:
    """Exact match on ``answer`` where a record has one, else a full regex match on ``regex`` (kw: see
    :func:`make_verifier`)."""
    return make_verifier("references", **kw)


def resolve_verifier(spec: str | Verifier | None, **kw: Any) -> Verifier | None:
    """A verifier from a name: None/"none" -> None; "exact", "regex", "references" -> :func:`make_verifier`;
    "package.module:function" -> that function (a verifier). A callable is returned as is."""
    if spec is None or callable(spec):
        return spec
    if spec == "none":
        return None
    if spec in ("exact", "regex", "references"):
        return make_verifier(spec, **kw)
    if ":" not in spec:
        raise VerifierError(f"unknown verifier {spec!r}; expected exact, regex, references, none or "
                            f"'module:function' (e.g. ramjax.experiments.tasks:task_verifier)")
    mod, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise VerifierError(f"cannot load verifier {spec!r}: {e}") from None
    if not callable(fn):
        raise VerifierError(f"verifier {spec!r} is not a function")
    return fn


def score_records(records: Sequence[Mapping[str, Any]], responses: Sequence[str], verifier: Verifier) -> np.ndarray:
    """Strict scores of responses[i] against records[i] under a verifier; shape [n] float64."""
    if len(records) != len(responses):
        raise VerifierError(f"{len(records)} records but {len(responses)} responses; they must pair up")
    out = []
    for r, s in zip(records, responses):
        v = verifier(r, s)
        out.append(float(v["strict"]) if isinstance(v, Mapping) else float(v))
    return np.asarray(out, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------
# Judging a list of responses (what ramjax.evaluate calls)


def default_verifier(records: Sequence[Mapping[str, Any]]) -> Verifier | None:
    """The verifier for records that name none: exact match on ``answer`` / full regex match on ``regex`` when
    every record carries one (``ramjax.reference_verifier``), else None (nothing to judge against)."""
    return reference_verifier() if has_references(records) else None


# Short names for verifiers that live outside the library (resolved lazily, so the library imports none of them).
VERIFIER_ALIASES: dict[str, str] = {"task": "ramjax.experiments.tasks:task_verifier"}


def make_eval_verifier(spec: str, records: Sequence[Mapping[str, Any]], **kw: Any) -> Verifier | None:
    """A verifier by name for these records: "auto" = :func:`default_verifier`; "none" = no judging; "exact",
    "regex", "references" (kw: field, case_sensitive, full_match); "task" (the generated suite's judge) or any
    "module:function"."""
    if spec == "auto":
        return reference_verifier(**kw) if has_references(records) else None
    return resolve_verifier(VERIFIER_ALIASES.get(spec, spec), **kw)


def judge_responses(records: Sequence[Mapping[str, Any]], responses: Sequence[str],
                    verifier: Verifier | None = None) -> list[dict[str, Any]]:
    """Judges responses[i] against records[i]: ``[{"kind", "strict", "lenient"?}]`` (kind = the record's group).

    verifier: ``verify(record, response)`` returning a float (strict) or {"strict", "lenient"?, "group"?} (see
    above); None = :func:`default_verifier` of the records (an EvalError if they have no references).
    The group is the verifier's "group", else the record's ``family``/``category``/``kind``, else "data".
    """
    if len(records) != len(responses):
        raise EvalError(f"{len(records)} records but {len(responses)} responses; they must pair up")
    if verifier is None:
        verifier = default_verifier(records)
        if verifier is None:
            raise EvalError("the records carry no 'answer' or 'regex' field to judge against; pass a verifier")
    out = []
    for r, s in zip(records, responses):
        v = verifier(r, s)
        if isinstance(v, Mapping):
            j = {"kind": str(v.get("group") or group_of(r, "data")), "strict": float(v["strict"])}
            if v.get("lenient") is not None:
                j["lenient"] = float(v["lenient"])
        else:
            j = {"kind": group_of(r, "data"), "strict": float(v)}
        out.append(j)
    return out
