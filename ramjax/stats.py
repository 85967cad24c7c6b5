"""Statistics for judged evaluations: bootstrap confidence intervals, paired win rates, per-group accuracy.

Pure numpy; shared by ``ramjax.evaluate`` and the experiment drivers (``ramjax.experiments``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["StatsError", "CI", "accuracy_by_group", "accuracy_by_kind", "bootstrap_ci", "win_values", "win_rate"]


class StatsError(ValueError):
    """Bad input to a statistic: empty or non-finite values, unpaired scores, bad settings."""


class CI(NamedTuple):
    """A point estimate with a confidence interval [low, high]."""

    mean: float
    low: float
    high: float


def accuracy_by_group(results: Iterable[Mapping[str, Any]], key: str = "kind") -> dict[str, dict[str, float]]:
    """Mean scores per group from judged results (dicts with ``key`` and "strict", optionally "lenient").

    Returns {group: {"n", "strict", "lenient"?}, ..., "all": {...}}, groups sorted; "lenient" only where every
    result of that group has one.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    allr = []
    for i, r in enumerate(results):
        if key not in r or "strict" not in r:
            raise StatsError(f"result {i} lacks {key!r} or 'strict' (keys: {sorted(r)}); pass judged results")
        groups.setdefault(str(r[key]), []).append(r)
        allr.append(r)

    def summary(rs: list[Mapping[str, Any]]) -> dict[str, float]:
        s: dict[str, float] = {"n": len(rs), "strict": float(np.mean([r["strict"] for r in rs])) if rs else 0.0}
        if rs and all(r.get("lenient") is not None for r in rs):
            s["lenient"] = float(np.mean([r["lenient"] for r in rs]))
        return s

    out = {k: summary(groups[k]) for k in sorted(groups)}
    out["all"] = summary(allr)
    return out


def accuracy_by_kind(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``accuracy_by_group`` over the "kind" field (the group field of judged results)."""
    return accuracy_by_group(results, "kind")


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> CI:
    """Percentile-bootstrap confidence interval of the mean of values (shape [n]).

    Resamples n values with replacement n_boot times (numpy Generator seeded with seed) and takes the
    (1-level)/2 and (1+level)/2 quantiles of the resampled means; the interval is widened if needed so that it
    always contains the sample mean.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise StatsError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise StatsError("bootstrap_ci got non-finite values")
    if not (0.0 < level < 1.0):
        raise StatsError(f"level must be in (0, 1), got {level}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise StatsError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    rng = np.random.default_rng(seed)
    mean = float(x.mean())
    # Draw in chunks to bound memory at ~8M indices whatever n.
    chunk = max(1, 8_000_000 // x.size)
    means = np.concatenate(
        [x[rng.integers(x.size, size=(min(chunk, n_boot - s), x.size))].mean(axis=1) for s in range(0, n_boot, chunk)]
    )
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return CI(mean, float(min(lo, mean)), float(max(hi, mean)))


def win_values(scores_a: Sequence[float], scores_b: Sequence[float]) -> np.ndarray:
    """Per-example outcome of a against b: 1.0 win, 0.5 tie, 0.0 loss. Shape [n]."""
    a = np.asarray(scores_a, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise StatsError(f"win rate needs paired scores of equal length, got {a.size} and {b.size}")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Pairwise win rate of system a over b on the same prompts, ties counted 0.5 (0.5 = no difference)."""
    v = win_values(scores_a, scores_b)
    if v.size == 0:
        raise StatsError("win_rate needs at least one pair of scores")
    return float(v.mean())
