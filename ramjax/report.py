"""Evaluation output files: ``results.json``, the markdown ``report.md`` (system × decoding table, per-group
accuracy, training cost, stage times, plots), the judged responses per system and AlpacaEval-ready JSON (the one
AlpacaEval writer; ``sample.py`` uses it too). Pure Python over the results mapping of
``ramjax.evaluate.evaluate_systems``.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ramjax import files
from ramjax.verify import EvalError

__all__ = ["write_json_atomic", "write_alpacaeval", "write_outputs", "results_table", "write_report", "md_table",
           "jsonable", "fmt", "fmt_ci", "safe_name", "get_field"]


def get_field(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` for a mapping, else ``obj.key``; ``default`` when absent."""
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> str:
    """Writes JSON (NaN refused: strict JSON for other tools) to path atomically (``ramjax.files``)."""
    return files.atomic_write_json(path, obj, indent=indent, allow_nan=False)


def write_alpacaeval(path: str | os.PathLike, records: Sequence[Mapping[str, Any]], outputs: Sequence[Any],
                     generator: str, dataset: str | None = None) -> str:
    """Writes AlpacaEval-ready JSON: a list of {"instruction", "output", "generator"(, "dataset")}.

    records[i]["prompt"] (or "instruction") is the instruction; outputs[i] is a response string (or a Generation /
    dict with "text" / "response"). Pass it to ``alpaca_eval --model_outputs PATH``.
    """
    if len(records) != len(outputs):
        raise EvalError(f"{len(records)} records but {len(outputs)} outputs; they must pair up")
    rows = []
    for i, (r, o) in enumerate(zip(records, outputs)):
        inst = r.get("instruction", r.get("prompt"))
        if not isinstance(inst, str):
            raise EvalError(f"record {i} has no 'prompt' or 'instruction' string (keys: {sorted(r)})")
        text = o if isinstance(o, str) else get_field(o, "text", get_field(o, "response"))
        if not isinstance(text, str):
            raise EvalError(f"output {i} is not a string nor has a 'text'/'response' string")
        row = {"instruction": inst, "output": text, "generator": generator}
        if dataset is not None or "dataset" in r:
            row["dataset"] = dataset if dataset is not None else r["dataset"]
        rows.append(row)
    return write_json_atomic(path, rows)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "system"


def write_outputs(run_dir: str | os.PathLike, results: Mapping[str, Any], *, alpaca: bool = True) -> list[str]:
    """Writes each system's judged responses to ``outputs/<system>.<decoding>.jsonl`` (and, with ``alpaca``,
    ``outputs/<system>.<decoding>.alpaca_eval.json``). Returns the paths written."""
    paths = []
    out_dir = os.path.join(os.fspath(run_dir), "outputs")
    for name, per_dec in results.get("outputs", {}).items():
        for dec, rows in per_dec.items():
            stem = os.path.join(out_dir, f"{safe_name(name)}.{dec}")
            paths.append(files.atomic_write_jsonl(stem + ".jsonl", rows))
            if alpaca:
                paths.append(write_alpacaeval(stem + ".alpaca_eval.json", rows, [r["response"] for r in rows],
                                              generator=f"{name} ({dec})"))
    return paths


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}"


def fmt_ci(ci: Mapping[str, float] | None, digits: int = 3) -> str:
    if not ci:
        return "–"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"


def fmt_big(x: float | None) -> str:
    if x is None:
        return "–"
    if abs(x) < 1e6 and float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(results: Mapping[str, Any]) -> str:
    """The main markdown table: one row per system × decoding."""
    base = results.get("baseline", "")
    header = ["System", "Decoding", "Strict acc. [95% CI]", "Lenient", f"Win vs {base}", "Len (tok)",
              "KL fallback", "ESS", "tok/s", "S loglik/tok"]
    rows = []
    for name, entry in results["systems"].items():
        ll = entry.get("loglik")
        for dec, s in entry["decodings"].items():
            rows.append([name, dec, fmt_ci(s["accuracy"]), fmt((s.get("lenient") or {}).get("mean")),
                         fmt_ci(s.get("win_rate")), fmt(s.get("mean_length"), 1), fmt(s.get("kl_fallback_rate")),
                         fmt(s.get("ess_mean"), 2), fmt(s.get("tokens_per_s"), 0),
                         fmt(ll["per_token"]) if ll else "–"])
    return md_table(header, rows)


def _kind_table(results: Mapping[str, Any]) -> str:
    kinds: list[str] = []
    for entry in results["systems"].values():
        for s in entry["decodings"].values():
            kinds += [k for k in s["by_kind"] if k != "all" and k not in kinds]
    header = ["System", "Decoding", *kinds, "all"]
    rows = []
    for name, entry in results["systems"].items():
        for dec, s in entry["decodings"].items():
            bk = s["by_kind"]
            rows.append([name, dec, *[fmt(bk[k]["strict"], 2) if k in bk else "–" for k in kinds],
                         fmt(bk["all"]["strict"], 2) if "all" in bk else "–"])
    return md_table(header, rows)


def _cost_table(results: Mapping[str, Any], cost_reference: str | None) -> str | None:
    costs = {n: e["train_cost"] for n, e in results["systems"].items() if e.get("train_cost")}
    if not costs:
        return None
    flops = {n: c.get("flops") for n, c in costs.items() if c.get("flops")}
    ref = cost_reference if cost_reference in flops else (max(flops, key=flops.get) if flops else None)
    header = ["System", "Train time (s)", "Trained params", "Train tokens", "FLOPs (6·N·D)"]
    if ref:
        header.append(f"× cheaper than {ref}")
    rows = []
    for n, c in costs.items():
        row = [n, fmt(c.get("seconds"), 1), fmt_big(c.get("params")), fmt_big(c.get("tokens")),
               fmt_big(c.get("flops"))]
        if ref:
            row.append(fmt(flops[ref] / c["flops"], 1) if c.get("flops") else "–")
        rows.append(row)
    return md_table(header, rows)


def write_report(run_dir: str | os.PathLike, results: Mapping[str, Any], stage_times: Mapping[str, float] | None = None,
                 *, title: str = "ramjax evaluation", notes: str | None = None, plots: Sequence[str] = (),
                 cost_reference: str | None = None, outputs: bool = True) -> str:
    """Writes ``results.json`` (everything but the responses), ``report.md`` and (with ``outputs``) the judged
    responses under ``outputs/``; returns the main markdown table (system × decoding) for the CLI to print.

    stage_times: seconds per pipeline stage (a table in the report). plots: image paths to link (existing paths are
    made relative to run_dir; others are taken as relative to it already). cost_reference: the system the
    training-cost ratios are against (default: the costliest).
    """
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    slim = {k: v for k, v in results.items() if k != "outputs"}
    if stage_times is not None:
        slim["stage_times"] = {k: float(v) for k, v in stage_times.items()}
    write_json_atomic(os.path.join(run_dir, "results.json"), jsonable(slim))
    if outputs and results.get("outputs"):
        write_outputs(run_dir, results)
    table = results_table(results)
    parts = [f"# {title}", "",
             f"{results.get('n_prompts', '?')} held-out prompts; decodings: {', '.join(results.get('decodings', []))}"
             f" (sampled = temperature 1, greedy = temperature 0, the same for every system); win rate against "
             f"**{results.get('baseline')}** at the same decoding, ties 0.5. Intervals: 95% percentile bootstrap "
             f"over prompts (paired for win rates). Length in tokens (EOS included); tok/s = generated tokens / "
             f"wall seconds of sampling in batches of one shape, the first (compiling) batch left out when there "
             f"are several. "
             f"S loglik/tok: held-out log-likelihood of the alignment set per response token (RAM: the per-token "
             f"normalised product softmax(log p_M + log q)).", "", table, ""]
    if notes:
        parts += [notes, ""]
    if results.get("judged", True):
        parts += ["## Strict accuracy per group", "", _kind_table(results), ""]
    else:
        parts += ["The held-out records carry no reference (`answer`/`regex`): responses are not judged; see "
                  "`outputs/*.alpaca_eval.json` for an external judge.", ""]
    cost = _cost_table(results, cost_reference)
    if cost:
        parts += ["## Training cost", "", cost, ""]
    if stage_times:
        total = sum(float(v) for v in stage_times.values())
        rows = [[k, fmt(float(v), 1)] for k, v in stage_times.items()] + [["**total**", fmt(total, 1)]]
        parts += ["## Stage times", "", md_table(["Stage", "Seconds"], rows), ""]
    if plots:
        parts += ["## Plots", ""]
        for p in plots:
            # a path that exists (absolute, or relative to the cwd) is linked relative to report.md; any other is
            # taken as already relative to run_dir
            rel = os.path.relpath(os.path.abspath(p), os.path.abspath(run_dir)) if os.path.exists(p) else p
            parts.append(f"![{os.path.basename(p)}]({rel.replace(os.sep, '/')})")
        parts.append("")
    files.atomic_write(os.path.join(run_dir, "report.md"), "\n".join(parts))
    return table


def jsonable(x: Any) -> Any:
    """Plain JSON data: numpy scalars to Python, non-finite floats to None, tuples to lists."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    return x
