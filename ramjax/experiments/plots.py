"""PNG plots of a run: training curves, judge accuracy per system, realignment sweeps and ablations.

Drawn with matplotlib's object API on the Agg canvas (``matplotlib.figure.Figure``; pyplot is never imported), so
plotting works headless, touches no global state and is safe in threads. Every function writes one PNG and
returns its path. Values with intervals are given as ``{"mean", "low", "high"}`` dicts (what
``ramjax.evaluate`` and ``ramjax.experiments.ablate`` produce) or as plain floats (no interval).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ramjax.metrics import read_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "PlotError",
    "read_metrics",
    "plot_training_curves",
    "plot_accuracy",
    "plot_realign_sweep",
    "plot_ablation",
]

_DPI = 120
_DECODING_COLORS = {"sampled": "#4C72B0", "greedy": "#DD8452"}


class PlotError(ValueError):
    """Bad plot input: no data, a missing metric, duplicate points on one line."""


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    logger.info("wrote plot %s", path)
    return path


def _interval(v: Any) -> tuple[float, float, float] | None:
    """(mean, low, high) from a {"mean","low","high"} dict or a float (low = high = mean); None if missing."""
    if v is None:
        return None
    if isinstance(v, Mapping):
        if v.get("mean") is None:
            return None
        m = float(v["mean"])
        lo = float(v["low"]) if v.get("low") is not None else m
        hi = float(v["high"]) if v.get("high") is not None else m
        return m, lo, hi
    m = float(v)
    return (m, m, m) if math.isfinite(m) else None


# ---------------------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------------------


def _series(records: Sequence[Mapping[str, Any]], key: str, step_key: str = "step") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(records):
        y = r.get(key)
        if isinstance(y, (int, float)) and not isinstance(y, bool) and math.isfinite(y):
            x = r.get(step_key, i)
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def plot_training_curves(metrics_files: Mapping[str, str | os.PathLike], out_path: str | os.PathLike, *,
                         keys: Sequence[str] = ("train/loss", "eval/loss", "loss", "eval_loss"),
                         step_key: str = "step",
                         title: str = "Training curves") -> str:
    """Loss vs step, one panel per stage: ``metrics_files`` maps a stage name to its ``metrics.jsonl``.

    Each panel draws every key of ``keys`` the file has (the first solid, others dashed; ``train/loss`` is what
    ``ramjax.metrics.MetricsWriter`` logs). Stages whose file is
    missing or has none of the keys are skipped with a log line; PlotError if no stage has data.
    """
    panels = []
    for stage, path in metrics_files.items():
        if not os.path.exists(path):
            logger.warning("no metrics file for stage %s at %s; skipped in the training-curve plot", stage, path)
            continue
        recs = read_metrics(path)
        lines = [(k, *_series(recs, k, step_key)) for k in keys]
        lines = [ln for ln in lines if ln[1]]
        if lines:
            panels.append((stage, lines))
        else:
            logger.warning("metrics file %s has none of the keys %s; skipped", path, list(keys))
    if not panels:
        raise PlotError(f"no training metrics to plot: none of {list(metrics_files.values())} has any of {list(keys)}")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(4.0 * ncols, 3.0 * nrows, ncols=ncols, nrows=nrows)
    for ax, (stage, lines) in zip(axes, panels):
        for j, (k, xs, ys) in enumerate(lines):
            ax.plot(xs, ys, linestyle="-" if j == 0 else "--", marker="." if len(xs) < 30 else None, label=k)
        ax.set_title(stage)
        ax.set_xlabel(step_key)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, out_path)


# ---------------------------------------------------------------------------------------------------------
# Accuracy per system
# ---------------------------------------------------------------------------------------------------------


def plot_accuracy(results: Mapping[str, Any], out_path: str | os.PathLike, *, metric: str = "accuracy",
                  title: str | None = None, ylabel: str = "strict judge accuracy") -> str:
    """Bars of ``metric`` per system, the decodings (sampled, greedy) side by side, with 95% CI error bars.

    results: ``ramjax.evaluate.evaluate_systems`` output (``results["systems"][name]["decodings"][dec][metric]``).
    """
    systems = list(results.get("systems", {}))
    if not systems:
        raise PlotError("results have no systems to plot")
    decodings: list[str] = []
    for name in systems:
        decodings += [d for d in results["systems"][name]["decodings"] if d not in decodings]
    width = 0.8 / max(len(decodings), 1)
    fig, (ax,) = _figure(max(6.0, 0.9 * len(systems) + 2.0), 4.2)
    for j, dec in enumerate(decodings):
        xs, ms, lo, hi = [], [], [], []
        for i, name in enumerate(systems):
            iv = _interval(results["systems"][name]["decodings"].get(dec, {}).get(metric))
            if iv is None:
                continue
            xs.append(i + (j - (len(decodings) - 1) / 2) * width)
            ms.append(iv[0])
            lo.append(iv[0] - iv[1])
            hi.append(iv[2] - iv[0])
        ax.bar(xs, ms, width=width * 0.95, yerr=[lo, hi], capsize=3, label=dec,
               color=_DECODING_COLORS.get(dec), edgecolor="black", linewidth=0.4, error_kw={"linewidth": 0.8})
        for x, m in zip(xs, ms):
            ax.annotate(f"{m:.2f}", (x, m), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7)
    ax.set_xticks(range(len(systems)))
    ax.set_xticklabels(systems, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if metric in ("accuracy", "lenient", "win_rate"):
        ax.set_ylim(0, 1.08)
    if metric == "win_rate":
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="decoding", fontsize=8)
    n = results.get("n_prompts")
    ax.set_title(title or f"Judge {metric} per system ({n} held-out prompts, 95% bootstrap CI)", fontsize=10)
    return _save(fig, out_path)


# ---------------------------------------------------------------------------------------------------------
# Lines with intervals: the realignment sweep and the ablation
# ---------------------------------------------------------------------------------------------------------


def _lines(rows: Sequence[Mapping[str, Any]], x: str, y: str, group: str | None) -> dict[str, list[tuple]]:
    """{group label: [(x, mean, low, high), ...] sorted by x}; PlotError on duplicates or no data."""
    out: dict[str, list[tuple]] = {}
    for i, r in enumerate(rows):
        if x not in r:
            raise PlotError(f"row {i} has no {x!r} (keys: {sorted(r)})")
        iv = _interval(r.get(y))
        if iv is None:
            continue
        label = str(r[group]) if group is not None and group in r else ""
        out.setdefault(label, []).append((float(r[x]), *iv))
    if not out:
        raise PlotError(f"no row has a value for {y!r}")
    for label, pts in out.items():
        xs = [p[0] for p in pts]
        if len(set(xs)) != len(xs):
            raise PlotError(f"line {label or y!r} has several points at the same {x}; aggregate seeds first "
                            f"(ramjax.experiments.ablate.aggregate)")
        pts.sort()
    return out


def _draw_lines(ax, lines: Mapping[str, list[tuple]], *, legend_title: str | None) -> None:
    for label, pts in lines.items():
        xs = [p[0] for p in pts]
        ms = [p[1] for p in pts]
        (ln,) = ax.plot(xs, ms, marker="o", markersize=4, label=label or None)
        if any(p[2] != p[1] or p[3] != p[1] for p in pts):
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=ln.get_color(), alpha=0.15,
                            linewidth=0)
    if any(lines):
        ax.legend(title=legend_title, fontsize=8, title_fontsize=8)
    ax.grid(alpha=0.3)


def plot_realign_sweep(rows: Sequence[Mapping[str, Any]], out_path: str | os.PathLike, *, x: str = "lam",
                       accuracy_key: str = "accuracy", length_key: str = "length", group: str | None = "series",
                       title: str = "Realignment: accuracy and length vs λ") -> str:
    """Two panels vs λ: judge accuracy (with intervals when given) and mean response length.

    rows: ``[{"lam": 0.5, "accuracy": {"mean", "low", "high"} | float, "length": float, "series": "TrRa"}, ...]``;
    ``group`` names the key whose values become separate lines (optional).
    """
    fig, (ax_a, ax_l) = _figure(10.0, 3.8, ncols=2)
    _draw_lines(ax_a, _lines(rows, x, accuracy_key, group), legend_title=group)
    ax_a.set_xlabel("λ")
    ax_a.set_ylabel("strict judge accuracy")
    ax_a.set_ylim(0, 1.05)
    _draw_lines(ax_l, _lines(rows, x, length_key, group), legend_title=group)
    ax_l.set_xlabel("λ")
    ax_l.set_ylabel("mean response length (tokens)")
    for ax in (ax_a, ax_l):
        ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)  # λ = 1: the aligned model itself
    fig.suptitle(title)
    return _save(fig, out_path)


def plot_ablation(rows: Sequence[Mapping[str, Any]], out_path: str | os.PathLike, *, metric: str = "accuracy",
                  x: str = "alpha", group: str = "size", baseline: Any = None, ylabel: str | None = None,
                  title: str | None = None) -> str:
    """``metric`` vs α on a log axis, one line per aligner size, with shaded intervals.

    rows: one per (size, α): ``{"alpha": 1e-4, "size": "h64", "accuracy": {"mean", "low", "high"} | float}``
    (aggregate seeds first). baseline: a value or interval drawn as a horizontal reference (e.g. P_M alone).
    """
    lines = _lines(rows, x, metric, group)
    if any(p[0] <= 0 for pts in lines.values() for p in pts):
        raise PlotError(f"{x} must be > 0 on a log axis")
    fig, (ax,) = _figure(6.4, 4.2)
    _draw_lines(ax, lines, legend_title=group)
    ax.set_xscale("log")
    ax.set_xlabel("α" if x == "alpha" else x)
    ax.set_ylabel(ylabel or metric.replace("_", " "))
    if metric in ("accuracy", "lenient", "win_rate"):
        ax.set_ylim(0, 1.05)
    iv = _interval(baseline)
    if iv is not None:
        ax.axhline(iv[0], color="black", linestyle="--", linewidth=1, label="proposal alone")
        if iv[1] != iv[2]:
            ax.axhspan(iv[1], iv[2], color="gray", alpha=0.12, linewidth=0)
        ax.legend(title=group, fontsize=8, title_fontsize=8)
    ax.set_title(title or f"{metric.replace('_', ' ')} vs α per aligner size", fontsize=10)
    return _save(fig, out_path)
