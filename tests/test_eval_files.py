"""``data.eval_files``: the trainer logs the held-out loss every ``logging.eval_every`` steps and at the end, and
it equals the objective computed directly, one unpadded example at a time, on those rows with the run's params."""
from __future__ import annotations

import json
import os
import random

import jax
import numpy as np
import pytest
import tokenizer_fixtures

import ramjax
from ramjax import checkpoint as ckpt_lib
from ramjax import config as config_lib
from ramjax import data as data_lib
from ramjax import metrics as metrics_lib
from ramjax import model as model_lib
from ramjax import train_lib

MODEL = model_lib.ModelConfig(vocab_size=640, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, max_position_embeddings=64)
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "alignment", "residual", "model", "proposal",
         "aligner", "token"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evalfx"))
    tokenizer_fixtures.make_hf_tokenizer(os.path.join(root, "tok"), kind="llama")
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype),
                                    model_lib.param_shapes(MODEL))
    ckpt_lib.save_model_dir(os.path.join(root, "init"), MODEL, params, tokenizer=os.path.join(root, "tok"))
    r = random.Random(0)

    def sent(lo, hi):
        return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))

    rows = {"sft": lambda: {"prompt": sent(3, 5), "response": sent(2, 6)},
            "ram": lambda: {"prompt": sent(3, 5), "response": sent(2, 6), "proposal": sent(2, 6)},
            "pref": lambda: {"prompt": sent(3, 5), "chosen": sent(2, 6), "rejected": sent(2, 6)}}
    for name, make in rows.items():
        for split, n in (("train", 16), ("eval", 7)):  # 7: the last eval batch is completed with empty rows
            with open(os.path.join(root, f"{name}_{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(make()) + "\n" for _ in range(n))
    return root


def _run(fx, tmp_path, stage, data, *extra):
    run_dir = str(tmp_path / stage)
    cfg = config_lib.load_config(config_lib.TrainConfig, None, [
        f"run_dir={run_dir}", f"stage={stage}", f"model.init={fx}/init", f"data.train_files=[{fx}/{data}_train.jsonl]",
        f"data.eval_files=[{fx}/{data}_eval.jsonl]", "data.max_len=24", "data.max_prompt_len=12",
        "data.batch_size=8", "steps=3", "optimizer.lr=1e-2", "checkpoint.export_hf=false", "logging.every=1",
        "logging.eval_every=2", "logging.tensorboard=false", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *extra])
    result = train_lib.train(cfg)
    recs = metrics_lib.read_metrics(run_dir)
    evals = {r["step"]: r for r in recs if any(k.startswith("eval/") for k in r)}
    model = ramjax.load_model(result.model_dir)
    data = data_lib.load_data(cfg, model.tokenizer, split="eval")
    assert len(data) == 7
    return cfg, evals, model, data


def _logp(model, seq) -> tuple[float, int]:
    """Summed log-prob of ``seq``'s target tokens and their number: one unpadded sequence, no masks or batching."""
    logits = np.asarray(ramjax.logits(model, [seq.tokens.tolist()])[0], np.float64)
    top = logits.max(-1, keepdims=True)
    lp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    pos = np.nonzero(seq.target[1:])[0]
    return float(lp[pos, seq.tokens[pos + 1]].sum()), len(pos)


def test_sft_eval_loss_every_eval_every_steps_equals_the_direct_nll(fx, tmp_path):
    _, evals, model, data = _run(fx, tmp_path, "sft", "sft")
    assert sorted(evals) == [2, 3]  # every 2 steps and at the end
    lps = [_logp(model, s) for s in data.examples]
    tokens = sum(n for _, n in lps)
    nll = -sum(lp for lp, _ in lps) / tokens
    last = evals[3]
    assert last["eval/loss"] == pytest.approx(nll, rel=2e-5)
    assert last["eval/tokens"] == tokens
    assert evals[2]["eval/loss"] != pytest.approx(last["eval/loss"], rel=1e-6)  # measured at different params


def test_ram_eval_loss_and_nll_data_equal_the_direct_objective(fx, tmp_path):
    _, evals, model, data = _run(fx, tmp_path, "ram", "ram", "ram.alpha=0.1")
    pairs = [(_logp(model, a), _logp(model, b)) for a, b in data.examples]
    n = len(pairs)
    nll_data = -sum(a[0] for a, _ in pairs) / n  # per example, as the RAM loss is
    logq_neg = sum(b[0] for _, b in pairs) / n
    last = evals[3]
    assert last["eval/nll_data"] == pytest.approx(nll_data, rel=2e-5)
    assert last["eval/loss"] == pytest.approx(nll_data + 0.1 * logq_neg, rel=2e-5)
    assert last["eval/tokens"] == sum(a[1] for a, _ in pairs)


def test_dpo_eval_loss_and_reward_accuracy_equal_the_direct_objective(fx, tmp_path):
    beta = 0.5
    _, evals, model, data = _run(fx, tmp_path, "dpo", "pref", f"dpo.beta={beta}", "data.packing=false")
    ref = ramjax.load_model(f"{fx}/init")  # the reference is the initial model
    margins = []
    for c, r in data.examples:
        pc, pr = _logp(model, c)[0], _logp(model, r)[0]
        rc, rr = _logp(ref, c)[0], _logp(ref, r)[0]
        margins.append(beta * ((pc - rc) - (pr - rr)))
    margins = np.asarray(margins)
    loss = float(np.mean(np.log1p(np.exp(-margins))))  # -log sigmoid(margin)
    last = evals[3]
    assert last["eval/loss"] == pytest.approx(loss, rel=2e-5)
    assert last["eval/rewards/accuracies"] == pytest.approx(float(np.mean(margins > 0)), abs=1e-6)
