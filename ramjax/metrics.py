"""Run metrics: ``run_dir/metrics.jsonl`` (one JSON object per logged step) and TensorBoard events (``run_dir/tb``).

Only process 0 writes; on other processes the writer is a no-op, so callers need no ``if`` of their own. On
resume, ``truncate_after(step)`` drops lines logged after the restored checkpoint (a killed run may have logged
steps that the resumed run repeats), so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

import numpy as np

from ramjax import files

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _plain(v: Any) -> Any:
    """JSON-safe scalar: numpy/JAX scalars to Python numbers; NaN/inf kept as strings JSON can hold."""
    if hasattr(v, "item") and np.ndim(v) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics file: ``path`` is a run directory (its ``metrics.jsonl``) or the file itself.

    Empty list if there is no such file. Blank and malformed lines (a torn last line of a killed run, or one a
    running process is writing) are skipped.
    """
    path = os.fspath(path)
    p = files.epath_of(path)
    if p.is_dir():
        path, p = os.path.join(path, METRICS_FILE), p / METRICS_FILE
    if not p.is_file():
        return []
    return files.read_jsonl(path, objects=True, skip_invalid=True)


class MetricsWriter:
    """Appends ``{"step": n, "time": unix seconds, **metrics}`` lines and TensorBoard scalars.

    enabled:     False on processes other than 0 (nothing is written).
    tensorboard: also write ``tb/`` events with tensorboardX (skipped with a warning if it is not installed).
    A remote ``run_dir`` (``gs://...``; object stores cannot append) keeps the records in memory and rewrites
    ``metrics.jsonl`` as one object on every ``write``; TensorBoard events then go to a local temporary directory
    named in the log.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = os.fspath(run_dir)
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._path = os.path.join(self.run_dir, METRICS_FILE)
        self._remote = files.is_remote(self.run_dir)
        self._records: list[dict[str, Any]] = read_metrics(self._path) if self._remote else []
        self._file = None if self._remote else open(self._path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard events (metrics.jsonl is still written)")
            else:
                tb_dir = os.path.join(self.run_dir, TB_DIR)
                if self._remote:
                    import tempfile

                    tb_dir = tempfile.mkdtemp(prefix="ramjax_tb_")
                    log.info("TensorBoard events of %s go to %s (a remote run directory)", self.run_dir, tb_dir)
                self._tb = SummaryWriter(tb_dir)

    def truncate_after(self, step: int) -> None:
        """Drops records with ``step > step`` (used when resuming from the checkpoint at ``step``)."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
        records = read_metrics(self.run_dir)
        kept = [r for r in records if int(r.get("step", 0)) <= step]
        if len(kept) != len(records):
            files.atomic_write_jsonl(self._path, kept, ensure_ascii=True)
            log.info("metrics: dropped %d records logged after step %d by the interrupted run",
                     len(records) - len(kept), step)
        if self._remote:
            self._records = kept
        else:
            self._file = open(self._path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs scalars for ``step``; non-numeric values go to the JSONL file only."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        if self._remote:
            self._records.append(record)
            files.atomic_write_jsonl(self._path, self._records, ensure_ascii=True)
        else:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k in ("step", "time") or isinstance(v, (str, bool)) or v is None:
                    continue
                self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Throughput:
    """Tokens per second and seconds per step between two ``update`` calls (host wall clock)."""

    def __init__(self):
        self._t = time.perf_counter()
        self._tokens = 0.0
        self._steps = 0

    def add(self, tokens: float, steps: int = 1) -> None:
        self._tokens += float(tokens)
        self._steps += steps

    def update(self) -> dict[str, float]:
        """``{"tokens_per_s", "step_time_s"}`` since the previous call; resets the window."""
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        out = {"tokens_per_s": self._tokens / dt, "step_time_s": dt / max(self._steps, 1)}
        self._t, self._tokens, self._steps = now, 0.0, 0
        return out
