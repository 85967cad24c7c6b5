"""The λ sweep of flexible realignment on the task suite: judge accuracy and response length vs λ, InRa and TrRa.

    python -m ramjax.experiments.realign_sweep configs/realign_sweep.yaml [key=value ...]
    python -m ramjax.experiments.realign_sweep configs/realign_sweep.yaml default_run=/tmp/full1 run_dir=runs/sweep

After the embedded default (``python train.py`` → ``runs/default``), with ``base`` = the warmed-up P_M and
``aligned`` = its SFT model:

* **InRa**: train one adapter on the base model with the SFT objective on the alignment set S (or reuse
  ``inra.adapter``), then sample the held-out prompts with ``mode="inra"`` at every λ of ``inra.lams``.
* **TrRa**: for every λ of ``trra.lams`` train a student (from the base) toward the fused teacher
  ``softmax(λ·h_aligned + (1−λ)·h_base)`` for ``trra.steps`` steps, then sample it alone.
* ``references``: the aligned (SFT) model alone, plotted at λ = 1 (InRa λ = 0 is the base model exactly).

Every (series, λ, decoding) is a *cell*: sampled greedy and at T = 1 (no top-p/top-k/penalty, as in
``ramjax.evaluate``), judged by the task suite's strict judge (accuracy with a percentile-bootstrap 95% interval)
and measured (mean response length in tokens, EOS rate). A cell is done iff ``cells/<name>.json`` exists (written
atomically), so an interrupted sweep resumes where it stopped; trained adapters/students are reused likewise.
Outputs in ``run_dir``: ``table.md``, ``results.json`` (one row per cell), ``plots/realign_<decoding>.png``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from ramjax import config as config_lib
from ramjax import stats
from ramjax.config import ConfigError
from ramjax.experiments import tasks
from ramjax.sampling_params import PRESETS

log = logging.getLogger(__name__)

INRA, TRRA, ALIGNED = "InRa", "TrRa", "SFT (aligned)"


class SweepError(ValueError):
    """Bad sweep input: a missing model/data file, or a run directory holding a sweep with other settings."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_lams(lams: Sequence[float], name: str) -> None:
    _check(all(math.isfinite(x) for x in lams), f"{name}={list(lams)}: every λ must be finite")
    _check(len(set(lams)) == len(lams), f"{name}={list(lams)} repeats a value")


@dataclasses.dataclass(frozen=True)
class InraSweepConfig:
    """InRa series: ``adapter`` (an ``adapter.safetensors``) to reuse, or null to train one (SFT on S, ``steps``
    steps at ``lr``) in ``run_dir/inra``; then sample at every λ of ``lams``."""

    enabled: bool = True
    lams: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
    adapter: str | None = None
    steps: int = 150
    lr: float = 1e-3

    def validate(self) -> None:
        _check_lams(self.lams, "inra.lams")
        _check(self.steps >= 1, f"inra.steps={self.steps} must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrraSweepConfig:
    """TrRa series: one student per λ of ``lams``, trained ``steps`` steps at ``lr`` in ``run_dir/trra/lam_<λ>``."""

    enabled: bool = True
    lams: tuple[float, ...] = (0.5, 1.0, 2.0)
    steps: int = 40
    lr: float = 3e-4
    direction: Literal["forward", "reverse"] = "forward"

    def validate(self) -> None:
        _check_lams(self.lams, "trra.lams")
        _check(self.steps >= 1, f"trra.steps={self.steps} must be >= 1")


@dataclasses.dataclass(frozen=True)
class RealignSweepConfig:
    """``python -m ramjax.experiments.realign_sweep``: the InRa and TrRa λ sweeps on the task suite.

    default_run: a finished default pipeline run; ``base``, ``aligned``, ``align_file`` and ``eval_file`` left
                 null are its ``warmup/model``, ``sft/model``, ``data/align.jsonl`` and ``data/eval.jsonl``.
    max_examples: evaluate the first N held-out prompts (0 = all).
    train_batch_size / max_len: the adapter's and the students' training batches (packed, as the default run).
    """

    run_dir: str = "runs/realign_sweep"
    default_run: str = "runs/default"
    base: str | None = None
    aligned: str | None = None
    align_file: str | None = None
    eval_file: str | None = None
    seed: int = 0
    max_examples: int = 0
    decodings: tuple[Literal["greedy", "sampled"], ...] = ("greedy", "sampled")
    max_new_tokens: int = 24
    stop: tuple[str, ...] = ("\n\nHuman:",)
    batch_size: int = 64
    n_boot: int = 1000
    references: bool = True
    train_batch_size: int = 32
    max_len: int = 80
    inra: InraSweepConfig = dataclasses.field(default_factory=InraSweepConfig)
    trra: TrraSweepConfig = dataclasses.field(default_factory=TrraSweepConfig)

    def validate(self) -> None:
        _check(self.max_examples >= 0, f"max_examples={self.max_examples} must be >= 0 (0 = all)")
        _check(bool(self.decodings), "decodings is empty; use [greedy, sampled]")
        _check(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1")
        _check(self.batch_size >= 1 and self.train_batch_size >= 1, "batch sizes must be >= 1")
        _check(self.max_len >= 4, f"max_len={self.max_len} must be >= 4")

    def path(self, name: str) -> str:
        """``base``/``aligned``/``align_file``/``eval_file``: the given path or the default run's."""
        default = {"base": "warmup/model", "aligned": "sft/model", "align_file": "data/align.jsonl",
                   "eval_file": "data/eval.jsonl"}[name]
        return getattr(self, name) or os.path.join(self.default_run, default)


# Keys whose change adds or removes cells without changing any finished one (everything else must match to resume).
_CELL_SET_KEYS = ("decodings", "references", "inra.lams", "trra.lams", "inra.enabled", "trra.enabled", "n_boot")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the sweep: a series (``InRa``, ``TrRa``, the aligned reference), a λ and a decoding."""

    series: str
    lam: float
    decoding: str

    @property
    def name(self) -> str:
        s = {INRA: "inra", TRRA: "trra", ALIGNED: "aligned"}.get(self.series, self.series)
        return f"{s}_lam{self.lam:g}_{self.decoding}"


def sweep_cells(cfg: RealignSweepConfig) -> list[Cell]:
    """Every cell of ``cfg`` in run order (InRa, TrRa by λ, then the reference), each decoding per λ."""
    cells = []
    if cfg.inra.enabled:
        cells += [Cell(INRA, float(l), d) for l in cfg.inra.lams for d in cfg.decodings]
    if cfg.trra.enabled:
        cells += [Cell(TRRA, float(l), d) for l in cfg.trra.lams for d in cfg.decodings]
    if cfg.references:
        cells += [Cell(ALIGNED, 1.0, d) for d in cfg.decodings]
    return cells


# ----------------------------------------------------------------------------------------------------------------
# Training the adapter and the students


def _train_cfg(cfg: RealignSweepConfig, run_dir: str, stage: str, steps: int, lr: float, extra: dict) -> Any:
    d: dict[str, Any] = {
        "stage": stage, "run_dir": run_dir, "seed": cfg.seed, "steps": steps,
        "model": {"init": cfg.path("base")},
        "data": {"train_files": [cfg.path("align_file")], "template": "plain", "max_len": cfg.max_len,
                 "max_prompt_len": cfg.max_len // 2, "packing": True, "batch_size": cfg.train_batch_size},
        "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 0.0, "clip_norm": 1.0},
        "schedule": {"warmup_ratio": 0.05, "decay": "cosine", "final_lr_ratio": 0.1},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "checkpoint": {"every": 0, "keep": 1, "resume": True, "export_hf": False},
        "logging": {"every": 10, "tensorboard": False, "progress": False},
        **extra,
    }
    return config_lib.config_from_dict(config_lib.TrainConfig, d)


def train_inra_adapter(cfg: RealignSweepConfig) -> str:
    """The InRa adapter file: ``inra.adapter`` if given, else trained (SFT on S, only the adapter) in
    ``run_dir/inra`` unless ``run_dir/inra/adapter.safetensors`` already exists."""
    if cfg.inra.adapter:
        if not os.path.isfile(cfg.inra.adapter):
            raise SweepError(f"inra.adapter={cfg.inra.adapter!r} does not exist; give an adapter.safetensors or null "
                             f"to train one")
        return cfg.inra.adapter
    out = os.path.join(cfg.run_dir, "inra")
    path = os.path.join(out, "adapter.safetensors")
    if not os.path.isfile(path):
        from ramjax import train_lib

        log.info("training the InRa adapter (%d steps) in %s", cfg.inra.steps, out)
        train_lib.train(_train_cfg(cfg, out, "sft", cfg.inra.steps, cfg.inra.lr, {"inra": {"enabled": True}}))
    return path


def trra_student_dir(cfg: RealignSweepConfig, lam: float) -> str:
    """``run_dir/trra/lam_<λ>``: the training run of the TrRa student for λ (its model in ``model/``)."""
    return os.path.join(cfg.run_dir, "trra", f"lam_{lam:g}")


def train_trra_student(cfg: RealignSweepConfig, lam: float) -> str:
    """The model directory of the TrRa student for λ (trained from the base unless it exists)."""
    out = trra_student_dir(cfg, lam)
    model_dir = os.path.join(out, "model")
    if not os.path.isdir(model_dir):
        from ramjax import train_lib

        log.info("training the TrRa student for lambda=%g (%d steps) in %s", lam, cfg.trra.steps, out)
        train_lib.train(_train_cfg(cfg, out, "trra", cfg.trra.steps, cfg.trra.lr, {"trra": {
            "lam": lam, "direction": cfg.trra.direction, "reference": cfg.path("base"),
            "aligned": cfg.path("aligned")}}))
    return model_dir


# ----------------------------------------------------------------------------------------------------------------
# Cells


@dataclasses.dataclass
class SweepContext:
    """What a cell function needs: the config, the held-out records, and lazily loaded models."""

    cfg: RealignSweepConfig
    records: list[dict[str, Any]]
    _models: dict[str, Any] = dataclasses.field(default_factory=dict)

    def model(self, key: str, load: Callable[[], Any]) -> Any:
        """The model cached under ``key`` (loaded once with ``load()``)."""
        if key not in self._models:
            self._models[key] = load()
        return self._models[key]


CellFn = Callable[[Cell, SweepContext], Mapping[str, Any]]


def summarise(records: Sequence[Mapping[str, Any]], results: Sequence[Any], *, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Judge one cell's responses: ``results[i]`` (a ``SampleResult``) answers ``records[i]["prompt"]``.

    Returns strict accuracy ``{"mean", "low", "high"}`` (percentile bootstrap, 95%), ``mean_length`` (generated
    tokens, EOS included), ``eos_rate``, ``n`` and the responses (``texts``, ``token_ids``).
    """
    if len(records) != len(results):
        raise SweepError(f"{len(records)} records but {len(results)} responses")
    strict = [tasks.judge(r["prompt"], s.text or "")["strict"] for r, s in zip(records, results)]
    ci = stats.bootstrap_ci(strict, n_boot=n_boot, seed=seed)
    return {"n": len(records), "accuracy": {"mean": ci.mean, "low": ci.low, "high": ci.high},
            "mean_length": float(np.mean([s.length for s in results])),
            "eos_rate": float(np.mean([s.finish_reason == "eos" for s in results])),
            "texts": [s.text for s in results], "token_ids": [list(map(int, s.token_ids)) for s in results]}


def sample_cell(model: Any, records: Sequence[Mapping[str, Any]], cfg: RealignSweepConfig, decoding: str, *,
                mode: str = "proposal", lam: float = 1.0) -> list[Any]:
    """One response per record from ``model`` (``mode`` proposal, or inra at ``lam``), ``SampleResult`` each."""
    from ramjax import sampler

    # Every cell samples plainly from the distribution: the ``sampled`` / ``greedy`` presets.
    params = PRESETS[decoding].replace(mode=mode, max_new_tokens=cfg.max_new_tokens, stop=tuple(cfg.stop),
                                       inra_lambda=float(lam))
    out = sampler.sample(model, None, [r["prompt"] for r in records], params, seed=cfg.seed,
                         batch_size=min(cfg.batch_size, len(records)))
    return [per[0] for per in out]


def default_cell(cell: Cell, ctx: SweepContext) -> dict[str, Any]:
    """Samples and judges one cell: InRa at λ, the TrRa student for λ (trained if needed), or the aligned model."""
    from ramjax import api, inra

    cfg = ctx.cfg
    if cell.series == INRA:
        model = ctx.model("inra", lambda: inra.load_inra_model(cfg.path("base"), train_inra_adapter(cfg)))
        results = sample_cell(model, ctx.records, cfg, cell.decoding, mode="inra", lam=cell.lam)
    elif cell.series == TRRA:
        path = train_trra_student(cfg, cell.lam)
        model = ctx.model(f"trra{cell.lam:g}", lambda: api.load_model(path))
        results = sample_cell(model, ctx.records, cfg, cell.decoding)
    elif cell.series == ALIGNED:
        model = ctx.model("aligned", lambda: api.load_model(cfg.path("aligned")))
        results = sample_cell(model, ctx.records, cfg, cell.decoding)
    else:
        raise SweepError(f"unknown series {cell.series!r}")
    return summarise(ctx.records, results, n_boot=cfg.n_boot, seed=cfg.seed)


# ----------------------------------------------------------------------------------------------------------------
# The sweep


def _fmt_ci(a: Any) -> str:
    if isinstance(a, Mapping):
        return f"{a['mean']:.3f} [{a['low']:.3f}, {a['high']:.3f}]"
    return f"{float(a):.3f}"


def sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table, one line per cell: series, decoding, λ, strict accuracy [95% CI], mean length, EOS rate."""
    lines = ["| Series | Decoding | λ | Strict accuracy [95% CI] | Mean length (tokens) | EOS rate | n |",
             "|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        eos = r.get("eos_rate")
        lines.append(f"| {r['series']} | {r['decoding']} | {r['lam']:g} | {_fmt_ci(r['accuracy'])} | "
                     f"{r['mean_length']:.2f} | {'' if eos is None else f'{eos:.2f}'} | {r.get('n', '')} |")
    return "\n".join(lines)


def _check_resume(cfg: RealignSweepConfig) -> None:
    """Refuses a run directory holding a sweep made with settings that change finished cells."""
    saved = os.path.join(cfg.run_dir, "sweep_config.yaml")
    if os.path.exists(saved):
        old = config_lib.config_to_dict(config_lib.load_config(RealignSweepConfig, saved))
        new = config_lib.config_to_dict(cfg)
        for key in _CELL_SET_KEYS:
            *parents, leaf = key.split(".")
            for d in (old, new):
                for p in parents:
                    d = d[p]
                d.pop(leaf, None)
        if old != new:
            diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            raise SweepError(f"{cfg.run_dir} holds a sweep made with other settings (differs in {diff}); pass a new "
                             f"run_dir=... or delete it (only {', '.join(_CELL_SET_KEYS)} may change on a resume)")
    os.makedirs(cfg.run_dir, exist_ok=True)
    config_lib.save_config(cfg, saved)


def run_sweep(cfg: RealignSweepConfig, cell_fn: CellFn | None = None,
              on_cell: Callable[[Cell, str, float | None], None] | None = None) -> dict[str, Any]:
    """Runs (or resumes) every cell of ``cfg``; returns ``{"rows", "table", "plots", "computed"}``.

    cell_fn(cell, ctx) -> {"accuracy": {"mean","low","high"} | float, "mean_length", ...} (``default_cell``
    unless replaced); its result is written to ``run_dir/cells/<cell.name>.json`` and never recomputed.
    on_cell(cell, "start" | "done" | "skip", seconds). ``computed`` lists the cells run by this call.
    """
    from ramjax import evaluate
    from ramjax.experiments import plots

    cell_fn = cell_fn or default_cell
    notify = on_cell or (lambda *a: None)
    _check_resume(cfg)
    eval_file = cfg.path("eval_file")
    if not os.path.isfile(eval_file):
        raise SweepError(f"eval_file {eval_file!r} does not exist; run the default pipeline (python train.py) or set "
                         f"default_run=/ eval_file=")
    records = tasks.read_jsonl(eval_file)
    if cfg.max_examples:
        records = records[: cfg.max_examples]
    ctx = SweepContext(cfg, records)
    rows, computed = [], []
    for cell in sweep_cells(cfg):
        path = os.path.join(cfg.run_dir, "cells", cell.name + ".json")
        if os.path.exists(path):
            notify(cell, "skip", None)
            row = _read_json(path)
        else:
            notify(cell, "start", None)
            t0 = time.time()
            res = dict(cell_fn(cell, ctx))
            row = {"series": cell.series, "lam": cell.lam, "decoding": cell.decoding, **res,
                   "seconds": time.time() - t0}
            evaluate.write_json_atomic(path, row, indent=None)
            computed.append(cell.name)
            notify(cell, "done", row["seconds"])
            log.info("cell %s: accuracy %s, mean length %.2f", cell.name, _fmt_ci(row["accuracy"]),
                     row["mean_length"])
        rows.append(row)
    # table and JSON grouped by series and decoding, λ ascending (the run order interleaves the decodings)
    order = {INRA: 0, TRRA: 1, ALIGNED: 2}
    dec_order = {d: i for i, d in enumerate(cfg.decodings)}
    rows.sort(key=lambda r: (order.get(r["series"], 3), r["series"], dec_order.get(r["decoding"], 9), r["lam"]))
    summary = [{k: v for k, v in r.items() if k not in ("texts", "token_ids")} for r in rows]
    table = sweep_table(summary)
    with open(os.path.join(cfg.run_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    evaluate.write_json_atomic(os.path.join(cfg.run_dir, "results.json"), {"rows": summary})
    pngs = []
    for dec in cfg.decodings:
        pts = [{"lam": r["lam"], "accuracy": r["accuracy"], "length": r["mean_length"], "series": r["series"]}
               for r in summary if r["decoding"] == dec]
        if pts:
            pngs.append(plots.plot_realign_sweep(pts, os.path.join(cfg.run_dir, "plots", f"realign_{dec}.png"),
                                                 title=f"Realignment on the task suite ({dec}): accuracy and "
                                                       f"length vs λ"))
    return {"rows": summary, "table": table, "plots": pngs, "computed": computed}


def _read_json(path: str) -> dict[str, Any]:
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ramjax.experiments.realign_sweep [CONFIG.yaml] [key=value ...]``: prints the config, progress,
    the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        path, overrides = config_lib.split_cli_args(argv)
        cfg = config_lib.load_config(RealignSweepConfig, path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(config_lib.format_config(cfg), flush=True)

    def on_cell(cell: Cell, event: str, seconds: float | None) -> None:
        print(f"[sweep] {cell.name}: {event}" + (f" ({seconds:.1f} s)" if seconds is not None else ""), flush=True)

    try:
        out = run_sweep(cfg, on_cell=on_cell)
    except ValueError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(out["table"])
    print(f"\nwrote {cfg.run_dir}/table.md, results.json and {', '.join(out['plots'])}")
    return 0


__all__ = ["SweepError", "InraSweepConfig", "TrraSweepConfig", "RealignSweepConfig", "Cell", "sweep_cells",
           "train_inra_adapter", "train_trra_student", "trra_student_dir", "SweepContext", "summarise",
           "sample_cell", "default_cell", "sweep_table", "run_sweep", "main"]

if __name__ == "__main__":
    from ramjax.cli import sweep_main

    raise SystemExit(sweep_main())  # --help, and named errors as one line with exit status 2
