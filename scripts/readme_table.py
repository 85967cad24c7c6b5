"""Produce the README's results table from a run's ``results_table.md`` and detect a stale README.

    python scripts/readme_table.py runs/default            # rewrite the table in README.md from the run
    python scripts/readme_table.py runs/default --check    # exit 1 (naming the rows) if README.md is stale
    python scripts/readme_table.py runs/wordlist --table=wordlist [--check]   # a held-out family's table
    python scripts/readme_table.py runs/lexicon --table=lexicon [--check]     # (tables: quiz, wordlist, lexicon)

The table lives in README.md between ``<!-- results-table:begin -->`` and ``<!-- results-table:end -->`` (with
``--table=NAME``, between ``<!-- NAME-table:begin -->`` and ``<!-- NAME-table:end -->``); it is
nothing but the run's strict accuracy (with its 95% interval) per system, sampled and greedy, so a README figure
can only come from a run's own output. The labels below name the pipeline's systems for readers.
"""
from __future__ import annotations

import os
import sys


def markers(name: str = "results") -> tuple[str, str]:
    """The README's begin/end comments around the table called ``name``."""
    return f"<!-- {name}-table:begin -->", f"<!-- {name}-table:end -->"


BEGIN, END = markers()

# pipeline system name -> README label (systems not listed keep their name)
LABELS = {
    "P_M (pretrained)": "P_M, pretrained only",
    "P_M (warmed up)": "P_M, warmed up (the baseline)",
    "Q alone": "Q_θ alone",
    "P_M + RAM (par)": "P_M + RAM (`par`, n=16)",
    "P_M + RAM (sparse)": "P_M + RAM (`sparse`)",
    "P_M + RAM (product)": "P_M + RAM (`product`)",
    "SFT": "SFT of P_M",
    "SFT + RAM (par)": "SFT + RAM (`par`)",
    "DPO": "DPO of P_M (RPO, `dpo.rpo_alpha=1`)",
    "DPO + RAM (par)": "DPO + RAM (`par`)",
    "Corrector": "Sequence-level corrector",
}
# README row order (systems not listed follow in the run's order)
ORDER = ["P_M (pretrained)", "P_M (warmed up)", "Q alone", "P_M + RAM (par)", "P_M + RAM (sparse)",
         "P_M + RAM (product)", "SFT", "SFT + RAM (par)", "DPO", "DPO + RAM (par)", "Corrector"]


class StaleReadmeError(ValueError):
    """README.md's table differs from the run's, or has no table markers."""


def parse_results_table(text: str) -> dict[str, dict[str, str]]:
    """``{system: {decoding: "0.587 [0.530, 0.643]"}}`` from ``results_table.md`` (columns System, Decoding,
    Strict acc. [95% CI], ...)."""
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(rows) < 3:
        raise ValueError("results_table.md holds no table rows")
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    try:
        i_sys, i_dec = header.index("System"), header.index("Decoding")
        i_acc = next(i for i, h in enumerate(header) if h.startswith("Strict acc"))
    except (ValueError, StopIteration):
        raise ValueError(f"results_table.md has no System/Decoding/Strict acc. columns (header {header})") from None
    out: dict[str, dict[str, str]] = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out.setdefault(cells[i_sys], {})[cells[i_dec]] = cells[i_acc]
    return out


def readme_table(results: dict[str, dict[str, str]]) -> str:
    """The README's markdown table: one row per system, strict accuracy sampled (T=1) and greedy."""
    names = [n for n in ORDER if n in results] + [n for n in results if n not in ORDER]
    lines = ["| System | sampled (T=1) | greedy |", "|---|---|---|"]
    for n in names:
        d = results[n]
        lines.append(f"| {LABELS.get(n, n)} | {d.get('sampled', '–')} | {d.get('greedy', '–')} |")
    return "\n".join(lines)


def _split(readme: str, begin: str = BEGIN, end: str = END) -> tuple[str, str, str]:
    if readme.count(begin) != 1 or readme.count(end) != 1 or readme.index(begin) > readme.index(end):
        raise StaleReadmeError(f"README.md must hold exactly one {begin} ... {end} block")
    head, rest = readme.split(begin)
    body, tail = rest.split(end)
    return head, body, tail


def update(readme: str, table: str, begin: str = BEGIN, end: str = END) -> str:
    """``readme`` with the block between ``begin`` and ``end`` replaced by ``table``."""
    head, _, tail = _split(readme, begin, end)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def check(readme: str, table: str, begin: str = BEGIN, end: str = END, what: str = "results table",
          script: str = "readme_table.py") -> None:
    """Raises ``StaleReadmeError`` naming the differing rows when the README's block is not ``table``."""
    _, body, _ = _split(readme, begin, end)
    have, want = body.strip().splitlines(), table.strip().splitlines()
    if have != want:
        diff = [f"README: {h!r} vs run: {w!r}" for h, w in zip(have, want) if h != w]
        diff += [f"only in the run: {w!r}" for w in want[len(have):]] + [f"only in README: {h!r}"
                                                                            for h in have[len(want):]]
        raise StaleReadmeError(f"README.md's {what} is stale (regenerate it with python scripts/{script} RUN_DIR): "
                               + "; ".join(diff[:6]))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    run_dir = argv[0]
    readme_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    name = "results"
    for a in argv[1:]:
        if a.startswith("--readme="):
            readme_path = a.split("=", 1)[1]
        elif a.startswith("--table="):
            name = a.split("=", 1)[1]
    begin, end = markers(name)
    try:
        with open(os.path.join(run_dir, "results_table.md"), encoding="utf-8") as f:
            table = readme_table(parse_results_table(f.read()))
        with open(readme_path, encoding="utf-8") as f:
            readme = f.read()
        if "--check" in argv:
            check(readme, table, begin, end, what=f"{name} table")
            print(f"{readme_path}: the {name} table matches {run_dir}")
            return 0
        new = update(readme, table, begin, end)
    except (ValueError, OSError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1 if isinstance(e, StaleReadmeError) else 2
    from ramjax import files

    files.atomic_write(readme_path, new)
    print(f"{readme_path}: {name} table written from {run_dir}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
