"""The README's results table comes from a run's results_table.md (scripts/readme_table.py) and staleness is
detected: a reference conversion, the check failing on a changed figure, and the README's own block in the
script's format (and equal to runs/default's table when that run exists here)."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("readme_table", os.path.join(ROOT, "scripts", "readme_table.py"))
rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rt)

RESULTS = """| System | Decoding | Strict acc. [95% CI] | Lenient | Win vs P_M (warmed up) | Len (tok) |
|---|---|---|---|---|---|
| P_M (warmed up) | sampled | 0.287 [0.237, 0.340] | 0.300 | – | 9.1 |
| P_M (warmed up) | greedy | 0.393 [0.337, 0.450] | 0.400 | – | 8.0 |
| P_M + RAM (product) | sampled | 0.587 [0.530, 0.643] | 0.600 | 0.66 [0.63, 0.69] | 7.7 |
| P_M + RAM (product) | greedy | 0.617 [0.570, 0.670] | 0.630 | 0.61 [0.58, 0.64] | 7.5 |
| My system | sampled | 0.100 [0.050, 0.150] | 0.100 | – | 3.0 |
"""

WANT = """| System | sampled (T=1) | greedy |
|---|---|---|
| P_M, warmed up (the baseline) | 0.287 [0.237, 0.340] | 0.393 [0.337, 0.450] |
| P_M + RAM (`product`) | 0.587 [0.530, 0.643] | 0.617 [0.570, 0.670] |
| My system | 0.100 [0.050, 0.150] | – |"""


def test_readme_table_from_results_table():
    assert rt.readme_table(rt.parse_results_table(RESULTS)) == WANT


def test_check_detects_a_stale_readme_and_update_fixes_it(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results_table.md").write_text(RESULTS)
    readme = tmp_path / "README.md"
    stale = WANT.replace("0.587 [0.530, 0.643]", "0.610 [0.557, 0.667]")
    readme.write_text(f"# x\n\n{rt.BEGIN}\n{stale}\n{rt.END}\n\ntext after\n")
    assert rt.main([str(run), "--check", f"--readme={readme}"]) == 1
    err = capsys.readouterr().err
    assert "stale" in err and "0.610 [0.557, 0.667]" in err and "0.587 [0.530, 0.643]" in err
    assert rt.main([str(run), f"--readme={readme}"]) == 0
    assert readme.read_text() == f"# x\n\n{rt.BEGIN}\n{WANT}\n{rt.END}\n\ntext after\n"
    assert rt.main([str(run), "--check", f"--readme={readme}"]) == 0


def test_a_named_table_has_its_own_markers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results_table.md").write_text(RESULTS)
    readme = tmp_path / "README.md"
    begin, end = rt.markers("wordlist")
    readme.write_text(f"{rt.BEGIN}\nmain\n{rt.END}\n{begin}\nold\n{end}\n")
    assert rt.main([str(run), "--table=wordlist", "--check", f"--readme={readme}"]) == 1
    assert rt.main([str(run), "--table=wordlist", f"--readme={readme}"]) == 0
    assert readme.read_text() == f"{rt.BEGIN}\nmain\n{rt.END}\n{begin}\n{WANT}\n{end}\n"  # the main table kept
    assert rt.main([str(run), "--table=wordlist", "--check", f"--readme={readme}"]) == 0
    assert rt.main([str(run), "--check", f"--readme={readme}"]) == 1  # the main table is still the stale one


def test_the_readme_holds_one_block_per_held_out_family_and_the_script_fills_the_lexicon_one(tmp_path):
    """Each held-out family's table (quiz, wordlist, lexicon) has exactly one marker pair in README.md; the script
    writes the lexicon family's table into a copy of the README and changes nothing outside that block."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for name in ("quiz", "wordlist", "lexicon"):
        rt._split(text, *rt.markers(name))
    run = tmp_path / "run"
    run.mkdir()
    (run / "results_table.md").write_text(RESULTS)
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert rt.main([str(run), "--table=lexicon", f"--readme={readme}"]) == 0
    head, body, tail = rt._split(readme.read_text(), *rt.markers("lexicon"))
    assert body.strip() == WANT
    assert (head, tail) == rt._split(text, *rt.markers("lexicon"))[::2]
    assert rt.main([str(run), "--table=lexicon", "--check", f"--readme={readme}"]) == 0


def test_readme_block_is_the_scripts_format():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        _, body, _ = rt._split(f.read())
    lines = body.strip().splitlines()
    assert lines[:2] == ["| System | sampled (T=1) | greedy |", "|---|---|---|"]
    labels = [line.split("|")[1].strip() for line in lines[2:]]
    assert labels and set(labels) <= set(rt.LABELS.values())
    run = os.path.join(ROOT, "runs", "default")
    if not os.path.exists(os.path.join(run, "results_table.md")):
        pytest.skip("no runs/default here to compare the figures with")
    with open(os.path.join(run, "results_table.md"), encoding="utf-8") as f:
        rt.check(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
                 rt.readme_table(rt.parse_results_table(f.read())))
