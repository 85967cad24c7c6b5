"""Ablations of the RAM aligner: α × aligner size (× seeds), reusing one proposal and its one-time samples.

    python -m ramjax.experiments.ablate configs/ablate.yaml [key=value ...]
    python -m ramjax.experiments.ablate configs/ablate.yaml 'alphas=[1e-4,1e-2]' 'seeds=[0,1]'

For every cell (aligner size, α, seed) the runner trains an aligner with the RAM stage of ``train_lib.train`` (a
``TrainConfig`` built from ``base_config`` + ``base_overrides`` + the size's overrides + α and seed), evaluates
P_M · Q_θ (``modes``: par / sparse / product) on the held-out prompts under each decoding (sampled and greedy), and
writes ``cells/<name>/result.json``. The proposal alone is evaluated once (``baseline/result.json``) as the
reference line and for win rates. At the end: ``ablation.md`` and ``ablation.json`` (one row per size × α × mode ×
decoding, seeds aggregated) and ``plots/ablation_<metric>_<mode>_<decoding>.png`` (metric vs α on a log axis, one
line per size, with 95% intervals).

Resuming. A cell is done iff its ``result.json`` exists; it is written atomically (temp file + rename) after the
cell finished, so rerunning the same command after an interruption redoes only unfinished cells (and an
interrupted training run inside a cell resumes from its own checkpoints). A reused cell whose settings fingerprint
(data, evaluation and training overrides) differs from the current config's is logged as a warning. Sizes with
``pretrain: true`` first pretrain a base model of that size on the corpus (``bases/<size>/``, once per size and
seed-independent; the paper's aligners are small pretrained models of the proposal's family) and train every α from
it.

The cell runner is a plain function ``cell_fn(cfg, cell, cell_dir) -> dict`` (default :func:`run_cell`), so tests
and users can swap in their own. Its result holds ``{"metrics": {mode: {decoding: {"accuracy": {mean, low,
high}, "mean_length", ..., "scores": [per-prompt strict scores]}}}, "loglik": {mode: float}, "train": {...}}``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from ramjax import stats
from ramjax.experiments import tasks
from ramjax.report import jsonable, write_json_atomic
from ramjax.sampling_params import PRESETS

logger = logging.getLogger(__name__)

__all__ = [
    "AblationError",
    "AlignerSize",
    "AblateConfig",
    "Cell",
    "cells",
    "cell_train_config",
    "base_train_config",
    "ensure_base",
    "run_cell",
    "run_baseline",
    "run_ablation",
    "aggregate",
    "ablation_table",
    "main",
]

CellFn = Callable[["AblateConfig", "Cell", str], Mapping[str, Any]]
BaselineFn = Callable[["AblateConfig", str], Mapping[str, Any]]

RESULT_FILE = "result.json"
_METRIC_KEYS = ("accuracy", "lenient", "win_rate", "mean_length", "kl_fallback_rate", "ess_mean", "tokens_per_s")


class AblationError(ValueError):
    """Bad ablation settings or a cell result of the wrong shape."""


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AlignerSize:
    """One aligner size: a label and the ``TrainConfig`` overrides that make it (``model.arch.*``, or
    ``model.init=DIR`` for a ready pretrained model). ``pretrain``: first pretrain a base of this architecture on
    ``AblateConfig.pretrain_file`` and start every cell of this size from it."""

    name: str
    overrides: tuple[str, ...] = ()
    pretrain: bool = False

    def validate(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"aligner size name {self.name!r} must be non-empty, without slashes or spaces")
        for ov in self.overrides:
            if "=" not in ov:
                raise ValueError(f"size {self.name!r}: override {ov!r} is not key=value")


def _size(name: str, hidden: int, layers: int, heads: int, kv: int, mlp: int) -> AlignerSize:
    return AlignerSize(name, (f"model.arch.hidden_size={hidden}", f"model.arch.num_layers={layers}",
                              f"model.arch.num_heads={heads}", f"model.arch.num_kv_heads={kv}",
                              f"model.arch.head_dim={hidden // heads}", f"model.arch.intermediate_size={mlp}"),
                       pretrain=True)


@dataclasses.dataclass(frozen=True)
class AblateConfig:
    """The sweep. Paths default to the embedded default run (``python train.py`` → ``runs/default``).

    base_config / base_overrides: the RAM-stage ``TrainConfig`` every cell starts from (lr, steps, batch, ...).
    proposal:      P_M's model directory (frozen, shared by all cells); its tokenizer is the cells' tokenizer
                   unless ``tokenizer`` is set.
    samples_file:  the one-time proposal samples (``{"prompt", "response", "proposal"}``): the RAM training data.
    eval_file:     held-out prompts (task suite records, judged by the task judge); ``max_eval`` > 0 keeps the
                   first N.
    align_file:    S as ``{"prompt", "response"}``, for the held-out log-likelihood of each cell (null: skip).
    alphas, sizes, seeds: the grid. modes: RAM sampling rules to evaluate. decodings: sampled (T=1) and/or greedy.
    pretrain_config / pretrain_overrides / pretrain_file: how sizes with ``pretrain: true`` get their base model.
    metric:        plotted metric (accuracy, lenient, win_rate, mean_length, kl_fallback_rate, ess_mean).
    keep_checkpoints: keep each cell's training checkpoints (default: deleted once the cell's model is exported).
    """

    program: Literal["ablate"] = "ablate"  # what train.py runs this config with
    run_dir: str = "runs/ablate"
    base_config: str = "configs/ram.yaml"
    base_overrides: tuple[str, ...] = ()
    proposal: str = "runs/default/warmup/model"
    tokenizer: str | None = None
    samples_file: str = "runs/default/data/align_samples.jsonl"
    eval_file: str = "runs/default/data/eval.jsonl"
    align_file: str | None = None
    alphas: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    sizes: tuple[AlignerSize, ...] = (
        _size("h32", 32, 2, 2, 1, 88),
        _size("h64", 64, 3, 4, 1, 176),
        _size("h96", 96, 3, 4, 2, 256),
    )
    seeds: tuple[int, ...] = (0,)
    modes: tuple[Literal["par", "sparse", "product"], ...] = ("product",)
    decodings: tuple[Literal["sampled", "greedy"], ...] = ("sampled", "greedy")
    n: int = 16
    kl_threshold: float | None = PRESETS["sampled"].kl_threshold
    max_new_tokens: int = 24
    max_eval: int = 0
    eval_batch_size: int = 64
    eval_seed: int = 0
    stop: tuple[str, ...] = ()
    baseline: bool = True
    pretrain_config: str = "configs/recipe/aligner_base.yaml"
    pretrain_overrides: tuple[str, ...] = ()
    pretrain_file: str = "runs/default/data/pretrain.jsonl"
    metric: str = "accuracy"
    n_boot: int = 1000
    keep_checkpoints: bool = False

    def validate(self) -> None:
        if not self.alphas or not self.sizes or not self.seeds:
            raise ValueError("alphas, sizes and seeds must each hold at least one value")
        for a in self.alphas:
            if not (a > 0 and math.isfinite(a)):
                raise ValueError(f"alphas: {a} must be finite and > 0 (the plot's α axis is logarithmic)")
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"alphas has duplicates: {list(self.alphas)}")
        names = [s.name for s in self.sizes]
        if len(set(names)) != len(names):
            raise ValueError(f"aligner size names must be unique, got {names}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds has duplicates: {list(self.seeds)}")
        if not self.modes or not self.decodings:
            raise ValueError("modes and decodings must be non-empty")
        if self.metric not in _METRIC_KEYS:
            raise ValueError(f"metric={self.metric!r}; expected one of {_METRIC_KEYS}")
        if self.n < 1 or self.max_new_tokens < 1 or self.eval_batch_size < 1 or self.max_eval < 0:
            raise ValueError("n, max_new_tokens and eval_batch_size must be >= 1 and max_eval >= 0")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    size: AlignerSize
    alpha: float
    seed: int

    @property
    def name(self) -> str:
        """Directory name, e.g. ``h64-a0.0001-s0``."""
        return f"{self.size.name}-a{self.alpha:g}-s{self.seed}"

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size.name, "alpha": self.alpha, "seed": self.seed}


def cells(cfg: AblateConfig) -> list[Cell]:
    """The grid in run order: seed, then size, then α (a partial sweep covers whole α lines first)."""
    return [Cell(size, float(a), int(s)) for s in cfg.seeds for size in cfg.sizes for a in cfg.alphas]


# ---------------------------------------------------------------------------------------------------------
# The default cell runner: train with the RAM stage, evaluate
# ---------------------------------------------------------------------------------------------------------

_MODEL_CACHE: dict[str, Any] = {}


def _load_cached(path: str) -> Any:
    """The proposal is loaded once per process and shared by every cell."""
    from ramjax.api import load_model

    key = os.path.abspath(path)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(path)
    return _MODEL_CACHE[key]


def _tokenizer_path(cfg: AblateConfig) -> str:
    return cfg.tokenizer or cfg.proposal


def _eval_records(cfg: AblateConfig) -> list[dict[str, Any]]:
    recs = tasks.read_jsonl(cfg.eval_file)
    return recs[: cfg.max_eval] if cfg.max_eval else recs


def _base_dir(cfg: AblateConfig, size: AlignerSize) -> str:
    return os.path.join(cfg.run_dir, "bases", size.name)


def base_train_config(cfg: AblateConfig, size: AlignerSize):
    """The pretraining ``TrainConfig`` of a size's base: pretrain config + overrides + the size's architecture."""
    from ramjax import config as config_lib

    return config_lib.load_config(config_lib.TrainConfig, cfg.pretrain_config, [
        *cfg.pretrain_overrides, *size.overrides, "stage=pretrain", f"run_dir={_base_dir(cfg, size)}",
        f"tokenizer={_tokenizer_path(cfg)}", f"data.train_files={cfg.pretrain_file}", "model.init=scratch"])


def ensure_base(cfg: AblateConfig, size: AlignerSize) -> str:
    """The pretrained base model directory of a size with ``pretrain: true`` (trained on first use)."""
    from ramjax import train_lib

    out = _base_dir(cfg, size)
    model_dir = os.path.join(out, "model")
    if os.path.exists(os.path.join(model_dir, "ramjax_model.json")):
        return model_dir
    tcfg = base_train_config(cfg, size)
    logger.info("pretraining the %s aligner base in %s", size.name, out)
    res = train_lib.train(tcfg)
    if res.interrupted or res.model_dir is None:
        raise AblationError(f"pretraining the {size.name} base was interrupted; rerun to resume it")
    if not cfg.keep_checkpoints:
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    return res.model_dir


def cell_train_config(cfg: AblateConfig, cell: Cell, cell_dir: str, init: str | None = None):
    """The RAM-stage ``TrainConfig`` of a cell: base config + base overrides + size overrides + α, seed, paths."""
    from ramjax import config as config_lib

    overrides = [*cfg.base_overrides, *cell.size.overrides, "stage=ram", f"ram.alpha={cell.alpha!r}",
                 f"seed={cell.seed}", f"run_dir={os.path.join(cell_dir, 'train')}", f"proposal={cfg.proposal}",
                 f"tokenizer={_tokenizer_path(cfg)}", f"data.train_files={cfg.samples_file}"]
    if init is not None:
        overrides.append(f"model.init={init}")
    return config_lib.load_config(config_lib.TrainConfig, cfg.base_config, overrides)


def _compact(summary: Mapping[str, Any], scores: Sequence[float]) -> dict[str, Any]:
    out = {k: summary.get(k) for k in _METRIC_KEYS if k != "win_rate"}
    out["by_kind"] = {k: v["strict"] for k, v in summary.get("by_kind", {}).items()}
    out["scores"] = [float(s) for s in scores]
    return out


def _evaluate(cfg: AblateConfig, systems: list) -> dict[str, Any]:
    from ramjax import evaluate as ev

    align = tasks.read_jsonl(cfg.align_file) if cfg.align_file else None
    res = ev.evaluate_systems(systems, _eval_records(cfg), verifier=tasks.task_verifier, decoding=cfg.decodings,
                              seed=cfg.eval_seed,
                              max_new_tokens=cfg.max_new_tokens, stop=cfg.stop, align_records=align,
                              batch_size=cfg.eval_batch_size, n_boot=cfg.n_boot)
    metrics, loglik = {}, {}
    for s in systems:
        entry = res["systems"][s.name]
        metrics[s.mode] = {dec: _compact(summ, [o["strict"] for o in res["outputs"][s.name][dec]])
                           for dec, summ in entry["decodings"].items()}
        loglik[s.mode] = entry["loglik"]["per_token"] if entry.get("loglik") else None
    return {"metrics": metrics, "loglik": loglik}


def run_cell(cfg: AblateConfig, cell: Cell, cell_dir: str) -> dict[str, Any]:
    """Trains the cell's aligner (RAM stage) and evaluates P_M · Q_θ in every mode and decoding."""
    from ramjax import evaluate as ev
    from ramjax import train_lib
    from ramjax.api import load_model

    init = ensure_base(cfg, cell.size) if cell.size.pretrain else None
    tcfg = cell_train_config(cfg, cell, cell_dir, init=init)
    t0 = time.perf_counter()
    res = train_lib.train(tcfg)
    seconds = time.perf_counter() - t0
    if res.interrupted or res.model_dir is None:
        raise AblationError(f"cell {cell.name}: training was interrupted at step {res.step}; rerun to resume")
    if not cfg.keep_checkpoints:
        shutil.rmtree(os.path.join(tcfg.run_dir, "checkpoints"), ignore_errors=True)
    tokens = _train_tokens(tcfg.run_dir, res.total_steps, tcfg.data.batch_size)
    pm = _load_cached(cfg.proposal)
    q = load_model(res.model_dir)
    systems = [ev.System(f"RAM ({m})", proposal=pm, aligner=q, mode=m,
                         sampling={"n": cfg.n, "kl_threshold": cfg.kl_threshold}) for m in cfg.modes]
    out = _evaluate(cfg, systems)
    out["train"] = {**ev.training_cost(seconds, params=res.num_params, tokens=tokens), "steps": res.step,
                    "final_metrics": res.metrics, "model_dir": res.model_dir, "init": init or "scratch"}
    return out


def _train_tokens(run_dir: str, steps: int, batch_size: int) -> int | None:
    """Tokens the run trained on ≈ steps × batch × mean tokens per example (from the run's meta.json)."""
    try:
        with open(os.path.join(run_dir, "meta.json"), encoding="utf-8") as f:
            data = json.load(f)["data"]
        per_example = data["tokens"] / max(data["kept"], 1)
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return int(round(steps * batch_size * per_example))


def run_baseline(cfg: AblateConfig, out_dir: str) -> dict[str, Any]:
    """Evaluates the proposal alone (the reference line and the win-rate baseline)."""
    from ramjax import evaluate as ev

    pm = _load_cached(cfg.proposal)
    return _evaluate(cfg, [ev.System("proposal", proposal=pm, mode="proposal")])


# ---------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------


# Settings that change what a cell's result means; a reused cell made under others is reported (not redone).
_FINGERPRINT_KEYS = ("base_config", "base_overrides", "proposal", "samples_file", "eval_file", "max_eval", "modes",
                     "decodings", "n", "kl_threshold", "max_new_tokens", "stop", "eval_seed", "pretrain_config",
                     "pretrain_overrides", "pretrain_file")


def _fingerprint(cfg: AblateConfig, cell: Cell) -> str:
    import hashlib

    d = {k: getattr(cfg, k) for k in _FINGERPRINT_KEYS}
    d["size"] = dataclasses.asdict(cell.size)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_result(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_result(res: Any, what: str) -> dict[str, Any]:
    if not isinstance(res, Mapping) or not isinstance(res.get("metrics"), Mapping):
        raise AblationError(f"{what} must return a dict with 'metrics': {{mode: {{decoding: {{metric: value}}}}}}; "
                            f"got {type(res).__name__}")
    return dict(res)


def run_ablation(cfg: AblateConfig, *, cell_fn: CellFn = run_cell, baseline_fn: BaselineFn | None = run_baseline,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the sweep and writes the table, the JSON and the plots.

    Cells whose ``result.json`` exists are read, not rerun. An exception in a cell stops the sweep (finished
    cells stay done). Returns {"rows", "table", "plots", "cells": {name: result}, "baseline", "ran", "reused"}.
    """
    from ramjax import config as config_lib

    config_lib.validate_config(cfg)
    os.makedirs(cfg.run_dir, exist_ok=True)
    config_lib.save_config(cfg, os.path.join(cfg.run_dir, "ablate_config.yaml"))
    say = progress or (lambda msg: None)

    baseline = None
    if cfg.baseline and baseline_fn is not None:
        bdir = os.path.join(cfg.run_dir, "baseline")
        bpath = os.path.join(bdir, RESULT_FILE)
        if os.path.exists(bpath):
            baseline = _read_result(bpath)
        else:
            say("baseline: the proposal alone")
            os.makedirs(bdir, exist_ok=True)
            baseline = _check_result(baseline_fn(cfg, bdir), "baseline_fn")
            write_json_atomic(bpath, jsonable(baseline))

    results: dict[str, dict[str, Any]] = {}
    ran, reused = [], []
    grid = cells(cfg)
    for i, cell in enumerate(grid):
        cdir = os.path.join(cfg.run_dir, "cells", cell.name)
        path = os.path.join(cdir, RESULT_FILE)
        if os.path.exists(path):
            results[cell.name] = _read_result(path)
            reused.append(cell.name)
            logger.info("cell %s is done (%s); skipped", cell.name, path)
            if results[cell.name].get("fingerprint") not in (None, _fingerprint(cfg, cell)):
                logger.warning("cell %s was run with other settings (data, evaluation or training overrides) than "
                               "this config; its result is reused as is. Delete %s to redo it", cell.name, cdir)
            continue
        say(f"cell {i + 1}/{len(grid)}: {cell.name}")
        os.makedirs(cdir, exist_ok=True)
        t0 = time.perf_counter()
        res = _check_result(cell_fn(cfg, cell, cdir), "cell_fn")
        res["cell"] = cell.info()
        res["seconds"] = time.perf_counter() - t0
        res["fingerprint"] = _fingerprint(cfg, cell)
        write_json_atomic(path, jsonable(res))  # last: the cell counts as done only once this file exists
        results[cell.name] = _read_result(path)
        ran.append(cell.name)
        logger.info("cell %s done in %.1fs", cell.name, res["seconds"])

    rows = aggregate(cfg, results, baseline)
    table = ablation_table(rows, cfg)
    write_json_atomic(os.path.join(cfg.run_dir, "ablation.json"),
                      jsonable({"rows": rows, "baseline": _baseline_metrics(baseline), "metric": cfg.metric}))
    plots = _plot(cfg, rows, baseline)
    with open(os.path.join(cfg.run_dir, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(_report(cfg, table, rows, plots))
    return {"rows": rows, "table": table, "plots": plots, "cells": results, "baseline": baseline, "ran": ran,
            "reused": reused}


# ---------------------------------------------------------------------------------------------------------
# Aggregation, table, plots
# ---------------------------------------------------------------------------------------------------------


def _iv(v: Any) -> tuple[float, float, float] | None:
    if v is None:
        return None
    if isinstance(v, Mapping):
        if v.get("mean") is None:
            return None
        m, lo, hi = float(v["mean"]), v.get("low"), v.get("high")
        return m, float(lo) if lo is not None else m, float(hi) if hi is not None else m
    return float(v), float(v), float(v)


def _baseline_metrics(baseline: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """{decoding: metrics} of the proposal alone (the baseline's only mode)."""
    if not baseline:
        return None
    per_mode = baseline.get("metrics", {})
    return next(iter(per_mode.values()), None) if per_mode else None


def aggregate(cfg: AblateConfig, results: Mapping[str, Mapping[str, Any]],
              baseline: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (size, α, mode, decoding), seeds pooled, in config order.

    Each metric becomes {mean, low, high}: with per-prompt ``scores`` (accuracy) the interval is a percentile
    bootstrap over all (seed, prompt) scores; otherwise the mean of the seeds' interval ends. With a baseline
    holding scores, ``win_rate`` against it is computed per prompt (ties 0.5), pooled over seeds. ``seed_sd`` is
    the standard deviation of the per-seed means (None for one seed).
    """
    base = _baseline_metrics(baseline)
    rows = []
    for mode in cfg.modes:
        for dec in cfg.decodings:
            for size in cfg.sizes:
                for alpha in cfg.alphas:
                    got = []
                    for seed in cfg.seeds:
                        r = results.get(Cell(size, float(alpha), int(seed)).name)
                        m = (r or {}).get("metrics", {}).get(mode, {}).get(dec)
                        if m is not None:
                            got.append((seed, r, m))
                    if not got:
                        continue
                    row: dict[str, Any] = {"size": size.name, "alpha": float(alpha), "mode": mode, "decoding": dec,
                                           "seeds": [g[0] for g in got]}
                    for key in _METRIC_KEYS:
                        row[key] = _pool(key, [g[2] for g in got], cfg)
                    base_scores = (base or {}).get(dec, {}).get("scores") if base else None
                    if base_scores is not None and all(g[2].get("scores") is not None for g in got):
                        wins = np.concatenate([stats.win_values(g[2]["scores"], base_scores) for g in got])
                        row["win_rate"] = _ci(stats.bootstrap_ci(wins, n_boot=cfg.n_boot, seed=0))
                    means = [_iv(g[2].get(cfg.metric))[0] for g in got if _iv(g[2].get(cfg.metric)) is not None]
                    row["seed_sd"] = float(np.std(means, ddof=1)) if len(means) > 1 else None
                    lls = [g[1].get("loglik", {}).get(mode) for g in got]
                    lls = [v for v in lls if v is not None]
                    row["loglik"] = float(np.mean(lls)) if lls else None
                    trains = [g[1].get("train", {}) for g in got]
                    row["params"] = next((t.get("params") for t in trains if t.get("params")), None)
                    secs = [t.get("seconds") for t in trains if t.get("seconds") is not None]
                    row["train_seconds"] = float(np.mean(secs)) if secs else None
                    rows.append(row)
    return rows


def _ci(ci: stats.CI) -> dict[str, float]:
    return {"mean": ci.mean, "low": ci.low, "high": ci.high}


def _pool(key: str, ms: Sequence[Mapping[str, Any]], cfg: AblateConfig) -> dict[str, float] | None:
    if key == "accuracy" and all(m.get("scores") is not None for m in ms):
        return _ci(stats.bootstrap_ci(np.concatenate([np.asarray(m["scores"], float) for m in ms]),
                                      n_boot=cfg.n_boot, seed=0))
    ivs = [_iv(m.get(key)) for m in ms]
    ivs = [v for v in ivs if v is not None]
    if not ivs:
        return None
    a = np.asarray(ivs, float)
    return {"mean": float(a[:, 0].mean()), "low": float(a[:, 1].mean()), "high": float(a[:, 2].mean())}


def _f(v: Any, digits: int = 3) -> str:
    iv = _iv(v)
    if iv is None:
        return "–"
    if isinstance(v, Mapping) and (iv[1] != iv[0] or iv[2] != iv[0]):
        return f"{iv[0]:.{digits}f} [{iv[1]:.{digits}f}, {iv[2]:.{digits}f}]"
    return f"{iv[0]:.{digits}f}"


def ablation_table(rows: Sequence[Mapping[str, Any]], cfg: AblateConfig | None = None) -> str:
    """Markdown: one line per aggregated row."""
    header = ["Size", "Params", "α", "Mode", "Decoding", "Strict acc. [95% CI]", "Win vs P_M", "Len", "KL fallback",
              "ESS", "S loglik/tok", "Seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        params = r.get("params")
        cells_ = [r["size"], f"{params:,}" if params else "–", f"{r['alpha']:g}", r["mode"], r["decoding"],
                  _f(r.get("accuracy")), _f(r.get("win_rate")), _f(r.get("mean_length"), 1),
                  _f(r.get("kl_fallback_rate")), _f(r.get("ess_mean"), 2), _f(r.get("loglik")),
                  str(len(r.get("seeds", [])))]
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def _plot(cfg: AblateConfig, rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any] | None) -> list[str]:
    from ramjax.experiments import plots

    base = _baseline_metrics(baseline) or {}
    out = []
    for mode in cfg.modes:
        for dec in cfg.decodings:
            sel = [r for r in rows if r["mode"] == mode and r["decoding"] == dec and r.get(cfg.metric) is not None]
            if not sel:
                continue
            ref = base.get(dec, {}).get(cfg.metric) if cfg.metric != "win_rate" else None
            path = os.path.join(cfg.run_dir, "plots", f"ablation_{cfg.metric}_{mode}_{dec}.png")
            out.append(plots.plot_ablation(sel, path, metric=cfg.metric, baseline=ref,
                                           title=f"RAM ({mode}, {dec}): {cfg.metric.replace('_', ' ')} vs α"))
    return out


def _report(cfg: AblateConfig, table: str, rows: Sequence[Mapping[str, Any]], plots_: Sequence[str]) -> str:
    parts = ["# RAM ablation: α × aligner size", "",
             f"Proposal `{cfg.proposal}`; RAM training data `{cfg.samples_file}`; evaluated on `{cfg.eval_file}`"
             f"{f' (first {cfg.max_eval})' if cfg.max_eval else ''}. Modes: {', '.join(cfg.modes)}; decodings: "
             f"{', '.join(cfg.decodings)} (sampled = temperature 1, greedy = temperature 0). Seeds: "
             f"{', '.join(map(str, cfg.seeds))}. Intervals: 95% bootstrap over prompts (and seeds). Win rate: against "
             f"the proposal alone at the same decoding, ties 0.5.", "", table, ""]
    if plots_:
        parts += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, cfg.run_dir)})" for p in plots_]
        parts.append("")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ramjax.experiments.ablate [CONFIG.yaml] [key=value ...]``: runs or resumes the sweep, prints the
    table."""
    from ramjax import config as config_lib

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path, overrides = config_lib.split_cli_args(argv)
    cfg = config_lib.load_config(AblateConfig, path, overrides)
    print(config_lib.format_config(cfg))
    t0 = time.perf_counter()
    out = run_ablation(cfg, progress=lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True))
    print(out["table"])
    md = os.path.join(cfg.run_dir, "ablation.md")
    print(f"\n{len(out['ran'])} cells run, {len(out['reused'])} reused; wrote {md}"
          f" and {len(out['plots'])} plot(s) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    from ramjax.cli import ablate_main

    raise SystemExit(ablate_main())  # --help, and named errors as one line with exit status 2
