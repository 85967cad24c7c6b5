"""The README's α × aligner-size table comes from an ablation run's ablation.json (scripts/readme_ablation.py) and
staleness is detected: a hand-computed conversion of a run made by the real runner (with fake cells), the check
failing on a changed figure, and the README's own block in the script's format."""
import importlib.util
import os

from ramjax.experiments import ablate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("readme_ablation", os.path.join(ROOT, "scripts", "readme_ablation.py"))
ra = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ra)

# per (size, α, decoding): 4 prompts' 0/1 scores, whose mean the table must show
SCORES = {("small", 1e-5, "sampled"): [1, 0, 0, 0], ("small", 1e-5, "greedy"): [1, 1, 0, 0],
          ("small", 1e-1, "sampled"): [0, 0, 0, 0], ("small", 1e-1, "greedy"): [1, 0, 0, 0],
          ("big", 1e-5, "sampled"): [1, 1, 1, 0], ("big", 1e-5, "greedy"): [1, 1, 1, 1],
          ("big", 1e-1, "sampled"): [1, 1, 0, 0], ("big", 1e-1, "greedy"): [1, 1, 1, 0]}

WANT = """| Aligner | decoding | α = 1e-5 | α = 1e-1 |
|---|---|---|---|
| small (46k params) | sampled | 0.250 | 0.000 |
| small (46k params) | greedy | 0.500 | 0.250 |
| big (179k params) | sampled | 0.750 | 0.500 |
| big (179k params) | greedy | 1.000 | 0.750 |

Rule `product`, accuracy, seed 0; P_M alone: 0.500 sampled, 0.250 greedy."""


def _cell(cfg, cell, cell_dir):
    metrics = {"product": {dec: {"accuracy": {"mean": 0.0}, "scores": [float(x) for x in SCORES[cell.size.name,
                                                                                                 cell.alpha, dec]]}
                           for dec in cfg.decodings}}
    return {"metrics": metrics, "train": {"params": 46_000 if cell.size.name == "small" else 179_000}}


def _baseline(cfg, out_dir):
    return {"metrics": {"proposal": {"sampled": {"accuracy": {"mean": 0.5}, "scores": [1.0, 1.0, 0.0, 0.0]},
                                     "greedy": {"accuracy": {"mean": 0.25}, "scores": [1.0, 0.0, 0.0, 0.0]}}}}


def _run(tmp_path):
    cfg = ablate.AblateConfig(run_dir=str(tmp_path / "abl"), alphas=(1e-5, 1e-1), seeds=(0,), modes=("product",),
                              sizes=(ablate.AlignerSize("small"), ablate.AlignerSize("big")),
                              decodings=("sampled", "greedy"), n_boot=50)
    ablate.run_ablation(cfg, cell_fn=_cell, baseline_fn=_baseline)
    return cfg.run_dir


def test_readme_table_from_a_runs_ablation_json(tmp_path):
    import json

    with open(os.path.join(_run(tmp_path), "ablation.json"), encoding="utf-8") as f:
        assert ra.readme_table(json.load(f)) == WANT


def test_check_detects_a_stale_readme_and_update_fixes_it(tmp_path, capsys):
    run = _run(tmp_path)
    readme = tmp_path / "README.md"
    (tmp_path / "docs").mkdir()
    stale = WANT.replace("| big (179k params) | sampled | 0.750 |", "| big (179k params) | sampled | 0.700 |")
    readme.write_text(f"# x\n\n{ra.BEGIN}\n{stale}\n{ra.END}\n\ntext after\n")
    assert ra.main([run, "--check", f"--readme={readme}"]) == 1
    err = capsys.readouterr().err
    assert "stale" in err and "0.700" in err and "0.750" in err
    assert ra.main([run, f"--readme={readme}"]) == 0
    assert readme.read_text() == f"# x\n\n{ra.BEGIN}\n{WANT}\n{ra.END}\n\ntext after\n"
    assert ra.main([run, "--check", f"--readme={readme}"]) == 0
    # the run's sampled plot is copied next to the README
    with open(os.path.join(run, "plots", "ablation_accuracy_product_sampled.png"), "rb") as f:
        assert (tmp_path / "docs" / "ablation_sampled.png").read_bytes() == f.read()


def test_readme_block_is_the_scripts_format():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        _, body, _ = ra._split(f.read())
    lines = body.strip().splitlines()
    assert lines[0].startswith("| Aligner | decoding | α = ") and lines[1].startswith("|---|---|")
    assert lines[-1].startswith("Rule `product`, accuracy, seed")
