"""The λ sweep runner (ramjax.experiments.realign_sweep) on a tiny default-run layout: table/JSON/plots, per-cell
resume, and InRa at λ = 0 (λ = 1) giving exactly the base (adapted) model's outputs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ramjax import checkpoint as ckpt_lib
from ramjax import inra as inra_lib
from ramjax import model as model_lib
from ramjax.config import ConfigError, config_from_dict, load_config
from ramjax.experiments import realign_sweep as rs
from ramjax.experiments import tasks


def _random_params(cfg, seed):
    """numpy-drawn params (flax init compiles for seconds on CPU): norm scales 1 + N(0, 0.1²), weights N(0, 0.1²)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        norm = "norm" in jax.tree_util.keystr(path)
        return jnp.asarray((1.0 if norm else 0.0) + rng.normal(0, 0.1, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, model_lib.param_shapes(cfg))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A default-run layout: data/{align,eval}.jsonl, tokenizer, warmup/model (base), sft/model (aligned), and an
    InRa adapter whose residual projections are random (so λ changes the outputs)."""
    from ramjax import tokenizer as tok_lib

    root = str(tmp_path_factory.mktemp("tiny_run"))
    align = tasks.alignment_set(48, seed=0)
    tasks.write_jsonl(f"{root}/data/align.jsonl", align)
    tasks.write_jsonl(f"{root}/data/eval.jsonl", tasks.eval_prompts(6, seed=0))
    texts = [tasks.format_prompt(r["prompt"]) + r["response"] for r in tasks.alignment_set(300, seed=1)]
    tok = tok_lib.train_sentencepiece(texts, 360, f"{root}/tokenizer")
    cfg = model_lib.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128,
                                eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                                pad_token_id=tok.pad_id)
    base = _random_params(cfg, 1)
    ckpt_lib.save_model_dir(f"{root}/warmup/model", cfg, base, tokenizer=f"{root}/tokenizer")
    ckpt_lib.save_model_dir(f"{root}/sft/model", cfg, _random_params(cfg, 2), tokenizer=f"{root}/tokenizer")
    adapter = inra_lib.build_adapter(cfg, base)
    rng = np.random.default_rng(3)
    for k in ("wo", "w_down"):
        adapter[k] = jnp.asarray(rng.normal(0, 0.3, adapter[k].shape), adapter[k].dtype)
    inra_lib.save_adapter(f"{root}/adapter.safetensors", adapter, cfg)
    return root, cfg, base, adapter


def _cfg(root, run_dir, **over):
    d = {"default_run": root, "run_dir": str(run_dir), "max_new_tokens": 6, "batch_size": 8, "n_boot": 50,
         "decodings": ["greedy"], "inra": {"lams": [0.0, 1.0]}, "trra": {"lams": [1.0]}, **over}
    return config_from_dict(rs.RealignSweepConfig, d)


class _Stub:
    """A replaceable cell function: counts calls; accuracy and length are simple functions of λ."""

    def __init__(self):
        self.calls = []

    def __call__(self, cell, ctx):
        self.calls.append(cell.name)
        n = len(ctx.records)
        return {"n": n, "accuracy": {"mean": 0.5, "low": 0.4, "high": 0.6}, "mean_length": 10.0 - cell.lam,
                "eos_rate": 1.0}


def test_sweep_writes_table_json_plots_and_resumes_per_cell(tiny_run, tmp_path):
    root = tiny_run[0]
    cfg = _cfg(root, tmp_path / "sweep")
    stub = _Stub()
    out = rs.run_sweep(cfg, cell_fn=stub)
    names = ["inra_lam0_greedy", "inra_lam1_greedy", "trra_lam1_greedy", "aligned_lam1_greedy"]
    assert stub.calls == names and out["computed"] == names
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert [(r["series"], r["lam"], r["decoding"]) for r in rows] == [
        ("InRa", 0.0, "greedy"), ("InRa", 1.0, "greedy"), ("TrRa", 1.0, "greedy"), ("SFT (aligned)", 1.0, "greedy")]
    assert [r["mean_length"] for r in rows] == [10.0, 9.0, 9.0, 9.0] and rows[0]["n"] == 6
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "| InRa | greedy | 0 | 0.500 [0.400, 0.600] | 10.00 | 1.00 | 6 |" in table
    assert out["plots"] == [str(tmp_path / "sweep" / "plots" / "realign_greedy.png")]
    assert os.path.getsize(out["plots"][0]) > 1000

    # a rerun recomputes nothing; a removed cell file is recomputed alone; a new λ adds only its cell
    again = _Stub()
    assert rs.run_sweep(cfg, cell_fn=again)["computed"] == [] and again.calls == []
    os.unlink(tmp_path / "sweep" / "cells" / "trra_lam1_greedy.json")
    assert rs.run_sweep(cfg, cell_fn=again)["computed"] == ["trra_lam1_greedy"]
    more = _cfg(root, tmp_path / "sweep", inra={"lams": [0.0, 0.5, 1.0]}, decodings=["greedy", "sampled"])
    third = _Stub()
    assert [(r["series"], r["decoding"], r["lam"]) for r in rs.run_sweep(more, cell_fn=third)["rows"][:6]] == [
        ("InRa", "greedy", 0.0), ("InRa", "greedy", 0.5), ("InRa", "greedy", 1.0), ("InRa", "sampled", 0.0),
        ("InRa", "sampled", 0.5), ("InRa", "sampled", 1.0)]  # grouped by decoding, λ ascending
    assert third.calls == ["inra_lam0_sampled", "inra_lam0.5_greedy", "inra_lam0.5_sampled", "inra_lam1_sampled",
                           "trra_lam1_sampled", "aligned_lam1_sampled"]
    # settings that change finished cells are refused
    with pytest.raises(rs.SweepError, match=r"other settings.*max_new_tokens"):
        rs.run_sweep(_cfg(root, tmp_path / "sweep", max_new_tokens=7), cell_fn=_Stub())


def test_inra_lambda0_is_the_base_model_and_lambda1_the_adapted_model(tiny_run, tmp_path):
    from ramjax import api, sampler

    root, cfg_m, base, adapter = tiny_run
    cfg = _cfg(root, tmp_path / "sweep", decodings=["greedy", "sampled"], references=False,
               trra={"enabled": False}, inra={"lams": [0.0, 1.0], "adapter": f"{root}/adapter.safetensors"})
    out = rs.run_sweep(cfg)
    cells = {c: json.loads((tmp_path / "sweep" / "cells" / f"{c}.json").read_text()) for c in out["computed"]}
    assert sorted(cells) == ["inra_lam0_greedy", "inra_lam0_sampled", "inra_lam1_greedy", "inra_lam1_sampled"]
    records = tasks.read_jsonl(f"{root}/data/eval.jsonl")
    base_model = api.load_model(f"{root}/warmup/model")
    adapter = inra_lib.load_adapter(f"{root}/adapter.safetensors")
    cfg1, merged = inra_lib.merge_adapter(cfg_m, base_model.params, adapter)
    adapted = api.Model(config=cfg1, params=merged, tokenizer=base_model.tokenizer,
                        vocab_limit=base_model.vocab_limit)
    for dec in ("greedy", "sampled"):
        for lam, model in ((0, base_model), (1, adapted)):
            want = rs.sample_cell(model, records, cfg, dec)  # plain decoding of the base / the L+1-layer model
            got = cells[f"inra_lam{lam}_{dec}"]
            assert got["token_ids"] == [list(r.token_ids) for r in want], (dec, lam)
            assert got["mean_length"] == pytest.approx(np.mean([r.length for r in want]))
            strict = [tasks.judge(r["prompt"], w.text)["strict"] for r, w in zip(records, want)]
            assert got["accuracy"]["mean"] == pytest.approx(np.mean(strict))
    # the adapter matters at λ = 1: otherwise the λ = 0 check above would be vacuous
    assert cells["inra_lam0_greedy"]["token_ids"] != cells["inra_lam1_greedy"]["token_ids"]
    # and sample_cell's InRa path is the sampler's mode=inra
    inra = inra_lib.inra_model(base_model, inra_lib.load_adapter(f"{root}/adapter.safetensors"))
    direct = sampler.sample(inra, None, [r["prompt"] for r in records], mode="inra", inra_lambda=0.0,
                            max_new_tokens=6, proposal_temperature=0.0, proposal_top_p=1.0, repetition_penalty=1.0,
                            kl_threshold=None, stop=["\n\nHuman:"])
    assert [list(p[0].token_ids) for p in direct] == cells["inra_lam0_greedy"]["token_ids"]


def test_config_validation_and_shipped_yaml():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(rs.RealignSweepConfig, os.path.join(repo, "configs", "realign_sweep.yaml"))
    assert cfg.path("base") == "runs/default/warmup/model" and cfg.path("aligned") == "runs/default/sft/model"
    assert [c.name for c in rs.sweep_cells(cfg)][:2] == ["inra_lam0_greedy", "inra_lam0_sampled"]
    assert len(rs.sweep_cells(cfg)) == 2 * (len(cfg.inra.lams) + len(cfg.trra.lams) + 1)
    for bad, match in [(["inra.lams=[0, .inf]"], "must be finite"), (["trra.lams=[1, 1]"], "repeats"),
                       (["decodings=[]"], "decodings is empty"), (["inra.stpes=3"], "did you mean 'inra.steps'")]:
        with pytest.raises(ConfigError, match=match):
            load_config(rs.RealignSweepConfig, None, bad)


@pytest.mark.slow
def test_cli_trains_adapter_and_students_on_a_tiny_run(tiny_run, tmp_path, capsys):
    root = tiny_run[0]
    rc = rs.main([f"default_run={root}", f"run_dir={tmp_path}/sweep", "max_new_tokens=4", "batch_size=8",
                  "n_boot=20", "decodings=[greedy]", "inra.lams=[0, 1]", "inra.steps=2", "trra.lams=[2]",
                  "trra.steps=2", "train_batch_size=8", "max_len=48", "references=false"])
    assert rc == 0
    assert os.path.isfile(f"{tmp_path}/sweep/inra/adapter.safetensors")
    assert os.path.isdir(f"{tmp_path}/sweep/trra/lam_2/model")
    rows = json.loads(open(f"{tmp_path}/sweep/results.json").read())["rows"]
    assert [(r["series"], r["lam"]) for r in rows] == [("InRa", 0.0), ("InRa", 1.0), ("TrRa", 2.0)]
    assert "| TrRa | greedy | 2 |" in capsys.readouterr().out
