"""The README's Layout section and docs/architecture.md name every module of the library, and no library module
(``ramjax/*.py``) grows past the size a reader can hold (issue 12: one idea per module, none over ~700 lines)."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 750  # "~700": a module this long is split along a real seam, not trimmed to a number


def _modules() -> list[str]:
    out = []
    for sub in ("ramjax", os.path.join("ramjax", "experiments")):
        for f in sorted(os.listdir(os.path.join(ROOT, sub))):
            if f.endswith(".py") and f != "__init__.py":
                out.append(os.path.join(sub, f))
    return out


def _layout_section() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^## Layout\n(.*?)^## ", text, re.S | re.M)
    assert m, "README.md has no '## Layout' section"
    return m.group(1)


def test_readme_layout_and_architecture_name_every_module():
    layout = _layout_section()
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        arch = f.read()
    names = [os.path.basename(p) for p in _modules()]
    assert len(names) > 20
    missing_readme = [n for n in names if f"`{n}`" not in layout and not re.search(rf"\b{re.escape(n)}\b", layout)]
    missing_arch = [n for n in names if not re.search(rf"\b{re.escape(n[:-3])}\b", arch)]
    assert not missing_readme, f"README Layout does not name {missing_readme}"
    assert not missing_arch, f"docs/architecture.md does not name {missing_arch}"


def test_no_library_module_is_too_long():
    long = {}
    for p in _modules():
        if os.path.dirname(p) != "ramjax":  # the experiment drivers are programs, not the library
            continue
        with open(os.path.join(ROOT, p), encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long[p] = n
    assert not long, f"modules over {MAX_LINES} lines (split them along a seam): {long}"
