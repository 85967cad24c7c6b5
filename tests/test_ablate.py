"""The ablation runner: a 2×2 grid with a fake cell function, interrupted and resumed; seed pooling; configs."""
import json
import os

import numpy as np
import pytest

from ramjax import config as config_lib
from ramjax.config import ConfigError, load_config
from ramjax.experiments import ablate

N_PROMPTS = 20


def _cfg(tmp_path, **kw):
    base = dict(run_dir=str(tmp_path / "abl"), alphas=(1e-4, 1e-2),
                sizes=(ablate.AlignerSize("small"), ablate.AlignerSize("big")), seeds=(0,), modes=("product",),
                decodings=("greedy",), n_boot=200)
    base.update(kw)
    return ablate.AblateConfig(**base)


def _scores(cell, dec="greedy"):
    """Deterministic per-prompt 0/1 scores: bigger aligners and smaller α score higher."""
    rng = np.random.default_rng([int(cell.alpha * 1e6), cell.seed, len(cell.size.name), len(dec)])
    p = 0.5 + (0.3 if cell.size.name == "big" else 0.1) - cell.alpha
    return (rng.random(N_PROMPTS) < p).astype(float).tolist()


class FakeCell:
    """Records calls; raises in the call numbered fail_at (1-based) to simulate an interruption."""

    def __init__(self, fail_at=None):
        self.calls = []
        self.fail_at = fail_at

    def __call__(self, cfg, cell, cell_dir):
        self.calls.append(cell.name)
        assert os.path.isdir(cell_dir) and cell_dir.endswith(cell.name)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("killed mid-cell")
        metrics = {}
        for mode in cfg.modes:
            metrics[mode] = {}
            for dec in cfg.decodings:
                s = _scores(cell, dec)
                m = float(np.mean(s))
                metrics[mode][dec] = {"accuracy": {"mean": m, "low": m - 0.1, "high": m + 0.1}, "scores": s,
                                      "mean_length": 3.0 + cell.alpha, "kl_fallback_rate": None, "ess_mean": None}
        return {"metrics": metrics, "loglik": {m: -1.0 - cell.alpha for m in cfg.modes},
                "train": {"seconds": 1.0, "params": 1000 if cell.size.name == "small" else 4000}}


def fake_baseline(cfg, out_dir):
    return {"metrics": {"proposal": {dec: {"accuracy": {"mean": 0.4, "low": 0.3, "high": 0.5},
                                           "scores": [float(i % 5 < 2) for i in range(N_PROMPTS)]}
                                     for dec in cfg.decodings}}}


def test_interrupted_sweep_resumes_without_redoing_cells(tmp_path):
    cfg = _cfg(tmp_path)
    first = FakeCell(fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        ablate.run_ablation(cfg, cell_fn=first, baseline_fn=fake_baseline)
    assert first.calls == ["small-a0.0001-s0", "small-a0.01-s0"]
    cells_dir = tmp_path / "abl" / "cells"
    assert (cells_dir / "small-a0.0001-s0" / "result.json").exists()
    assert not (cells_dir / "small-a0.01-s0" / "result.json").exists()  # the interrupted cell is not done
    assert not [f for d in cells_dir.iterdir() for f in os.listdir(d) if f.startswith(".tmp")]
    done_before = (cells_dir / "small-a0.0001-s0" / "result.json").read_text()

    second = FakeCell()
    out = ablate.run_ablation(cfg, cell_fn=second, baseline_fn=lambda *a: pytest.fail("baseline recomputed"))
    assert second.calls == ["small-a0.01-s0", "big-a0.0001-s0", "big-a0.01-s0"]  # the first cell is not rerun
    assert out["reused"] == ["small-a0.0001-s0"] and len(out["ran"]) == 3
    assert (cells_dir / "small-a0.0001-s0" / "result.json").read_text() == done_before

    rows = [ln for ln in out["table"].splitlines()[2:] if ln.startswith("| ")]
    assert len(rows) == 4
    assert rows[0].startswith("| small | 1,000 | 0.0001 | product | greedy |")
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert len(saved["rows"]) == 4 and saved["baseline"]["greedy"]["accuracy"]["mean"] == 0.4
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert out["table"] in md and "ablation_accuracy_product_greedy.png" in md
    assert len(out["plots"]) == 1
    with open(out["plots"][0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # a third run with everything done runs nothing and gives the same table
    third = FakeCell()
    again = ablate.run_ablation(cfg, cell_fn=third, baseline_fn=fake_baseline)
    assert third.calls == [] and again["table"] == out["table"]


def test_aggregate_pools_seeds_and_computes_win_rate(tmp_path):
    cfg = _cfg(tmp_path, seeds=(0, 1, 2), sizes=(ablate.AlignerSize("big"),), alphas=(1e-3,),
               decodings=("sampled", "greedy"))
    fake = FakeCell()
    out = ablate.run_ablation(cfg, cell_fn=fake, baseline_fn=fake_baseline)
    assert len(fake.calls) == 3 and len(out["rows"]) == 2
    row = next(r for r in out["rows"] if r["decoding"] == "greedy")
    cells_ = [ablate.Cell(cfg.sizes[0], 1e-3, s) for s in (0, 1, 2)]
    pooled = np.concatenate([_scores(c) for c in cells_])
    assert row["seeds"] == [0, 1, 2]
    assert row["accuracy"]["mean"] == pytest.approx(pooled.mean())
    assert row["accuracy"]["low"] < pooled.mean() < row["accuracy"]["high"]
    assert row["seed_sd"] == pytest.approx(np.std([np.mean(_scores(c)) for c in cells_], ddof=1))
    base = np.array([float(i % 5 < 2) for i in range(N_PROMPTS)])
    wins = np.concatenate([np.where(np.array(_scores(c)) > base, 1.0, np.where(np.array(_scores(c)) == base, 0.5,
                                                                                 0.0)) for c in cells_])
    assert row["win_rate"]["mean"] == pytest.approx(wins.mean())
    assert row["loglik"] == pytest.approx(-1.001) and row["params"] == 4000
    assert {os.path.basename(p) for p in out["plots"]} == {"ablation_accuracy_product_sampled.png",
                                                           "ablation_accuracy_product_greedy.png"}


def test_bad_cell_result_and_config(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ablate.AblationError, match="'metrics'"):
        ablate.run_ablation(cfg, cell_fn=lambda *a: {"acc": 1.0}, baseline_fn=None)
    with pytest.raises(ConfigError, match="alphas: 0.0 must be finite and > 0"):
        load_config(ablate.AblateConfig, None, ["alphas=[0.0, 1e-3]"])
    with pytest.raises(ConfigError, match="size names must be unique"):
        load_config(ablate.AblateConfig, None, ["sizes=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="did you mean 'alphas'"):
        load_config(ablate.AblateConfig, None, ["alpha=[1e-3]"])


def test_shipped_config_and_cell_train_config(tmp_path):
    cfg = load_config(ablate.AblateConfig, "configs/ablate.yaml", ["seeds=[0,1]"])
    grid = ablate.cells(cfg)
    assert len(cfg.alphas) == 5 and len(cfg.sizes) >= 3 and len(grid) == 5 * len(cfg.sizes) * 2
    assert len({c.name for c in grid}) == len(grid)
    cell = grid[1]
    tcfg = ablate.cell_train_config(cfg, cell, str(tmp_path / "c"), init="/bases/h32/model")
    assert tcfg.stage == "ram" and tcfg.ram.alpha == cell.alpha == 1e-4 and tcfg.seed == cell.seed
    assert tcfg.run_dir == str(tmp_path / "c" / "train")
    assert tcfg.data.train_files == (cfg.samples_file,) and tcfg.proposal == cfg.proposal
    # the cells train with the recipe's RAM stage (configs/ram.yaml includes configs/recipe/ram.yaml), not a copy
    ram = load_config(config_lib.TrainConfig, "configs/ram.yaml")
    assert tcfg.model.init == "/bases/h32/model"
    assert (tcfg.steps, tcfg.optimizer, tcfg.schedule, tcfg.data.batch_size, tcfg.data.max_len) == (
        ram.steps, ram.optimizer, ram.schedule, ram.data.batch_size, ram.data.max_len)
    # every size's cell config and (where pretrained) its base config validate; sizes really differ
    hidden = set()
    for size in cfg.sizes:
        ablate.cell_train_config(cfg, ablate.Cell(size, 1e-4, 0), str(tmp_path / size.name))
        if size.pretrain:
            b = ablate.base_train_config(cfg, size)
            assert b.stage == "pretrain" and b.data.train_files == (cfg.pretrain_file,)
            base = load_config(config_lib.TrainConfig, "configs/recipe/aligner_base.yaml", ["tokenizer=/tok"])
            assert (b.epochs, b.optimizer.lr) == (base.epochs, base.optimizer.lr)  # the recipe's aligner base
            hidden.add(b.model.arch.hidden_size)
    assert len(hidden) >= 2


@pytest.mark.slow
def test_real_cells_end_to_end(tmp_path):
    """The default runner with ramjax.train_lib and the sampler on tiny models: 2 sizes (one from a pretrained
    base) × 1 α, then a rerun that reuses everything."""
    pytest.importorskip("ramjax.sampler")
    from test_evaluate import _tiny_model
    from tokenizer_fixtures import make_sentencepiece

    from ramjax import checkpoint
    from ramjax.experiments import tasks
    from ramjax.tokenizer import load_tokenizer

    make_sentencepiece(tmp_path / "tok", chat_template=False)
    V = load_tokenizer(tmp_path / "tok").vocab_size
    pm = _tiny_model(0, V, V)
    checkpoint.save_model_dir(tmp_path / "pm", pm.config, pm.params, tokenizer=str(tmp_path / "tok"))
    S = tasks.alignment_set(24)
    tasks.write_jsonl(tmp_path / "samples.jsonl", [{**r, "proposal": "x y"} for r in S])
    tasks.write_jsonl(tmp_path / "eval.jsonl", tasks.eval_prompts(8))
    tasks.write_jsonl(tmp_path / "pretrain.jsonl", tasks.pretrain_text(tasks.general_corpus(24)))
    arch = ("model.arch.num_layers=1", "model.arch.num_heads=2", "model.arch.num_kv_heads=1", "model.arch.head_dim=16",
            "model.arch.intermediate_size=32", "model.arch.max_position_embeddings=128")
    common = ("steps=2", "data.batch_size=8", "data.max_len=64", "data.max_prompt_len=32", "checkpoint.every=0",
              "logging.tensorboard=false", "logging.progress=false", "checkpoint.export_hf=false")
    cfg = ablate.AblateConfig(
        run_dir=str(tmp_path / "abl"), proposal=str(tmp_path / "pm"), samples_file=str(tmp_path / "samples.jsonl"),
        eval_file=str(tmp_path / "eval.jsonl"), align_file=str(tmp_path / "samples.jsonl"),
        pretrain_file=str(tmp_path / "pretrain.jsonl"), base_overrides=common, pretrain_overrides=common,
        alphas=(1e-2,), sizes=(ablate.AlignerSize("s", ("model.arch.hidden_size=16", *arch)),
                               ablate.AlignerSize("p", ("model.arch.hidden_size=32", *arch), pretrain=True)),
        decodings=("greedy",), max_new_tokens=4, eval_batch_size=8, n_boot=50)
    out = ablate.run_ablation(cfg)
    assert out["ran"] == ["s-a0.01-s0", "p-a0.01-s0"] and len(out["rows"]) == 2
    res = out["cells"]["p-a0.01-s0"]
    assert res["train"]["init"].endswith("bases/p/model") and res["train"]["steps"] == 2
    assert res["loglik"]["product"] < 0 and len(res["metrics"]["product"]["greedy"]["scores"]) == 8
    assert not (tmp_path / "abl" / "cells" / "s-a0.01-s0" / "train" / "checkpoints").exists()
    again = ablate.run_ablation(cfg)
    assert again["ran"] == [] and again["table"] == out["table"]


def test_reused_cell_with_other_settings_is_reported(tmp_path, caplog):
    cfg = _cfg(tmp_path, alphas=(1e-3,), sizes=(ablate.AlignerSize("small"),))
    ablate.run_ablation(cfg, cell_fn=FakeCell(), baseline_fn=None)
    fake = FakeCell()
    with caplog.at_level("WARNING", logger="ramjax.experiments.ablate"):
        ablate.run_ablation(cfg, cell_fn=fake, baseline_fn=None)
        assert not caplog.records
        changed = _cfg(tmp_path, alphas=(1e-3,), sizes=(ablate.AlignerSize("small"),), max_new_tokens=99)
        ablate.run_ablation(changed, cell_fn=fake, baseline_fn=None)
    assert fake.calls == [] and "small-a0.001-s0 was run with other settings" in caplog.text
