"""Produce the README's α × aligner-size table from an ablation run and detect a stale README.

    python scripts/readme_ablation.py runs/ablate            # rewrite the table in README.md, copy the plot to docs/
    python scripts/readme_ablation.py runs/ablate --check    # exit 1 (naming the rows) if README.md is stale

The table lives in README.md between ``<!-- ablation-table:begin -->`` and ``<!-- ablation-table:end -->``; it is
nothing but the run's ``ablation.json`` (``python -m ramjax.experiments.ablate``): the plotted metric's mean per
aligner size, decoding and α (seeds pooled), and the proposal alone, so a README figure can only come from a run's
own output. Writing also copies the run's sampled plot to ``docs/ablation_sampled.png`` (``--check`` compares the
table only: a PNG's bytes depend on the matplotlib version).
"""
from __future__ import annotations

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import readme_table as _block  # noqa: E402  (the README block mechanics, shared with the results table)

BEGIN, END = _block.markers("ablation")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT = os.path.join("docs", "ablation_sampled.png")


StaleReadmeError = _block.StaleReadmeError  # one error for both README tables


def _params(n: int | None) -> str:
    return f" ({n / 1000:.0f}k params)" if n else ""


def _alpha(a: float) -> str:
    """1e-05 -> '1e-5', 0.1 -> '1e-1'."""
    m, e = f"{a:.0e}".split("e")
    return f"{m}e{int(e)}" if float(f"{m}e{e}") == a else f"{a:g}"


def readme_table(ablation: dict) -> str:
    """The README's markdown: one row per (aligner size, decoding) with the metric's mean at each α, then the
    proposal alone at each decoding. ``ablation``: the run's ``ablation.json``."""
    rows, metric = ablation["rows"], ablation.get("metric", "accuracy")
    if not rows:
        raise ValueError("ablation.json holds no rows (no cell finished)")
    alphas = sorted({r["alpha"] for r in rows})
    mode = rows[0]["mode"]
    lines = ["| Aligner | decoding | " + " | ".join(f"α = {_alpha(a)}" for a in alphas) + " |",
             "|---|---|" + "---|" * len(alphas)]
    sel = [r for r in rows if r["mode"] == mode]
    keys = [(size, dec) for size in dict.fromkeys(r["size"] for r in sel)
            for dec in dict.fromkeys(r["decoding"] for r in sel)]
    for size, dec in keys:
        by_alpha = {r["alpha"]: r for r in rows if (r["size"], r["decoding"], r["mode"]) == (size, dec, mode)}
        params = next((r.get("params") for r in by_alpha.values() if r.get("params")), None)
        vals = [by_alpha[a][metric]["mean"] if a in by_alpha and by_alpha[a].get(metric) else None for a in alphas]
        lines.append(f"| {size}{_params(params)} | {dec} | "
                     + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    base = ablation.get("baseline") or {}
    parts = [f"{(base[d].get(metric) or {}).get('mean'):.3f} {d}" for d in dict.fromkeys(k[1] for k in keys)
             if isinstance((base.get(d) or {}).get(metric), dict)]
    seeds = sorted({s for r in rows for s in r.get("seeds", [])})
    lines += ["", f"Rule `{mode}`, {metric}, " + (f"seed {seeds[0]}" if len(seeds) == 1 else
                                                    f"seeds {', '.join(map(str, seeds))} pooled")
                  + (f"; P_M alone: {', '.join(parts)}." if parts else ".")]
    return "\n".join(lines)


def _split(readme: str) -> tuple[str, str, str]:
    return _block._split(readme, BEGIN, END)


def update(readme: str, table: str) -> str:
    """``readme`` with the ablation block replaced by ``table``."""
    return _block.update(readme, table, BEGIN, END)


def check(readme: str, table: str) -> None:
    """Raises ``StaleReadmeError`` naming the differing lines when the README's block is not ``table``."""
    _block.check(readme, table, BEGIN, END, what="ablation table", script="readme_ablation.py")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    run_dir = argv[0]
    readme_path = os.path.join(ROOT, "README.md")
    for a in argv[1:]:
        if a.startswith("--readme="):
            readme_path = a.split("=", 1)[1]
    try:
        with open(os.path.join(run_dir, "ablation.json"), encoding="utf-8") as f:
            table = readme_table(json.load(f))
        with open(readme_path, encoding="utf-8") as f:
            readme = f.read()
        if "--check" in argv:
            check(readme, table)
            print(f"{readme_path}: the ablation table matches {run_dir}")
            return 0
        new = update(readme, table)
        plots = os.path.join(run_dir, "plots")
        png = next((os.path.join(plots, p) for p in sorted(os.listdir(plots)) if p.endswith("_sampled.png")), None) \
            if os.path.isdir(plots) else None
    except (ValueError, OSError, KeyError, TypeError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1 if isinstance(e, StaleReadmeError) else 2
    from ramjax import files

    files.atomic_write(readme_path, new)
    if png is not None:
        shutil.copyfile(png, os.path.join(os.path.dirname(os.path.abspath(readme_path)), PLOT))
    print(f"{readme_path}: ablation table written from {run_dir}" + (f"; {PLOT} from {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
