"""The train step (gradient accumulation, sharding, schedules) and the training loop (resume, signals, errors)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ramjax import loss as loss_lib
from ramjax import model as model_lib
from ramjax import sharding as shd
from ramjax import stages, train_lib

CFG = model_lib.ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8)


def random_params(cfg, seed=0):
    """Random N(0, 0.02²) parameters of ``cfg``'s shapes (jitting flax's init is slow to compile on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype),
                                  model_lib.param_shapes(cfg))


def _ram_batch(B=8, T=12, seed=0):
    """A random RAM batch: right-padded rows with prompt (masked) and response (trained) tokens."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("chosen", "rejected"):
        tok = rng.integers(3, CFG.vocab_size, size=(B, T + 1)).astype(np.int32)
        lengths = rng.integers(5, T + 1, size=B)
        prompt = rng.integers(1, 4, size=B)
        idx = np.arange(T)[None]
        seg = (idx < lengths[:, None]).astype(np.int32)
        mask = ((idx >= prompt[:, None]) & (idx < lengths[:, None])).astype(np.float32)
        out[f"{name}_tokens"] = tok[:, :T] * seg
        out[f"{name}_targets"] = tok[:, 1:] * seg
        out[f"{name}_loss_mask"] = mask
        out[f"{name}_segment_ids"] = seg
        out[f"{name}_positions"] = (idx * seg).astype(np.int32)
    return out


@functools.lru_cache(maxsize=None)
def _params0():
    return jax.device_get(random_params(CFG))


def _setup(mesh, grad_accum=1, opt="sgd", lr=0.1):
    sched = train_lib.make_schedule(lr, 10)
    optimizer = train_lib.make_optimizer(opt, sched, clip_norm=None, momentum=0.9)
    obj = loss_lib.ram_objective(0.1)
    p_sh = model_lib.param_shardings(CFG, mesh)
    params = shd.shard_tree(_params0(), p_sh)
    shapes = jax.eval_shape(lambda p: train_lib.init_state(p, optimizer, jax.random.key(1)), params)
    st_sh = train_lib.state_shardings(shapes, p_sh, mesh)
    state = jax.jit(lambda p: train_lib.init_state(p, optimizer, jax.random.key(1)), out_shardings=st_sh)(params)
    batch = _ram_batch()
    b_sh = train_lib.batch_shardings(batch, mesh)
    step = train_lib.jit_train_step(train_lib.make_train_step(obj, optimizer, forward=stages.model_forward(CFG, mesh),
                                                              grad_accum=grad_accum, schedule=sched, mesh=mesh),
                                    st_sh, b_sh, None, mesh)
    return state, step, {k: jax.device_put(v, b_sh[k]) for k, v in batch.items()}


def _run(mesh, grad_accum=1, steps=2, opt="sgd"):
    state, step, batch = _setup(mesh, grad_accum, opt)
    losses = []
    for _ in range(steps):
        state, m = step(state, batch, None)
        losses.append(float(m["loss"]))
    return jax.device_get(state.params), losses, {k: float(v) for k, v in m.items()}


def _assert_trees_close(a, b, atol):
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=str(p))


@pytest.fixture(scope="module")
def one_device_run():
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return _run(mesh, opt="sgd")


def test_grad_accumulation_equals_one_batch(one_device_run):
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    params, losses, m = _run(mesh, grad_accum=4, opt="sgd")
    p1, l1, m1 = one_device_run
    np.testing.assert_allclose(losses, l1, rtol=1e-6)
    for key in ("nll_data", "logq_neg", "grad_norm", "tokens", "lr"):
        np.testing.assert_allclose(m[key], m1[key], rtol=1e-5, err_msg=key)
    _assert_trees_close(params, p1, 1e-6)


@pytest.mark.parametrize("axes", [
    {"data": 2, "fsdp": 2, "tensor": 2},
    pytest.param({"data": 1, "fsdp": 8, "tensor": 1}, marks=pytest.mark.slow),
    pytest.param({"data": 8, "fsdp": 1, "tensor": 1}, marks=pytest.mark.slow)])
def test_sharded_step_equals_one_device(one_device_run, axes):
    # Tolerance: reductions are split across devices, so float32 sums differ in the last bits (~1e-6 relative).
    # SGD with momentum keeps parameter differences at lr x gradient differences (Adam would amplify the noise of
    # near-zero gradient entries to lr-sized steps).
    mesh = shd.make_mesh(axes)
    state, step, batch = _setup(mesh, grad_accum=2, opt="sgd")
    old = state.params["embed"]
    losses = []
    for _ in range(2):
        state, m = step(state, batch, None)
        losses.append(float(m["loss"]))
    assert old.is_deleted()  # the state is donated
    spec = model_lib.param_shardings(CFG, mesh)["embed"].spec
    assert state.params["embed"].sharding.spec == spec
    assert state.opt_state[-1][0].trace["embed"].sharding.spec == spec  # momentum sharded like its params
    p1, l1, _ = one_device_run
    np.testing.assert_allclose(losses, l1, rtol=2e-6)
    _assert_trees_close(jax.device_get(state.params), p1, 1e-5)


def test_schedule_shapes():
    s = train_lib.make_schedule(1.0, 10, warmup_steps=2, decay="linear", end_lr_ratio=0.0)
    np.testing.assert_allclose([float(s(i)) for i in range(11)],
                               [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0], atol=1e-6)
    c = train_lib.make_schedule(1.0, 10, warmup_steps=0, decay="cosine", end_lr_ratio=0.1)
    assert float(c(0)) == pytest.approx(1.0) and float(c(10)) == pytest.approx(0.1)
    assert float(c(5)) == pytest.approx(0.55, abs=1e-6)
    k = train_lib.make_schedule(2.0, 10, warmup_steps=4, decay="constant")
    assert [float(k(i)) for i in (0, 3, 9)] == pytest.approx([0.5, 2.0, 2.0])


def test_rmsprop_matches_torch_rule():
    # torch.optim.RMSprop: v = a v + (1 - a) g^2 ; p -= lr g / (sqrt(v) + eps)
    opt = train_lib.make_optimizer("rmsprop", lambda n: 0.01, rmsprop_decay=0.99, eps=1e-8, clip_norm=None)
    p = {"w": jnp.array([1.0, -2.0])}
    st = opt.init(p)
    v = np.zeros(2)
    want = np.array([1.0, -2.0])
    for g in ([0.5, -1.0], [0.1, 0.3]):
        g = np.array(g)
        up, st = opt.update({"w": jnp.asarray(g, jnp.float32)}, st, p)
        p = optax.apply_updates(p, up)
        v = 0.99 * v + 0.01 * g * g
        want = want - 0.01 * g / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(np.asarray(p["w"]), want, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# The training loop (train_lib.train): resume, signals, stages, bad inputs

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from ramjax import checkpoint as ckpt_lib  # noqa: E402
from ramjax import config as config_lib  # noqa: E402
from ramjax import metrics as metrics_lib  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import tokenizer_fixtures  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIGNER = model_lib.ModelConfig(vocab_size=640, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, max_position_embeddings=64)
_WORDS = "the quick brown fox jumps over lazy dog alignment residual model proposal aligner token".split()


def make_fixture(root):
    """A tokenizer, an initial aligner model directory and JSONL data for every stage under ``root``."""
    import random

    os.makedirs(root, exist_ok=True)
    tokenizer_fixtures.make_hf_tokenizer(os.path.join(root, "tok"), kind="llama")
    ckpt_lib.save_model_dir(os.path.join(root, "aligner0"), ALIGNER, random_params(ALIGNER, 1),
                            tokenizer=os.path.join(root, "tok"))
    rng = random.Random(0)

    def sent(lo, hi):
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    rows = {"ram": lambda: {"prompt": sent(3, 5), "response": sent(2, 6), "proposal": sent(2, 6)},
            "pref": lambda: {"prompt": sent(3, 5), "chosen": sent(2, 6), "rejected": sent(2, 6)},
            "sft": lambda: {"prompt": sent(3, 5), "response": sent(2, 6)}}
    for name, make in rows.items():
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            for _ in range(48):
                f.write(json.dumps(make()) + "\n")
    return root


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixture(str(tmp_path_factory.mktemp("fx")))


def ram_overrides(fx, run_dir, *extra):
    return [f"run_dir={run_dir}", "stage=ram", f"model.init={fx}/aligner0", f"data.train_files=[{fx}/ram.jsonl]",
            "data.max_len=24", "data.max_prompt_len=12", "data.batch_size=8", "steps=6", "optimizer.name=adamw",
            "optimizer.lr=3e-3", "optimizer.grad_accum=2", "ram.alpha=0.01", "checkpoint.every=3",
            "checkpoint.export_hf=false", "logging.every=1", "logging.tensorboard=false", "mesh.data=2",
            "mesh.fsdp=2", "mesh.tensor=2", *extra]


def _cfg(overrides):
    return config_lib.load_config(config_lib.TrainConfig, None, overrides)


def _losses(run_dir):
    return [(r["step"], r["train/loss"], r["data/crc32"]) for r in metrics_lib.read_metrics(run_dir)]


@pytest.fixture(scope="module")
def straight_run(fx, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("straight") / "run")
    result = train_lib.train(_cfg(ram_overrides(fx, run_dir)))
    return run_dir, result


def test_ram_run_writes_everything(straight_run):
    run_dir, result = straight_run
    assert result.step == 6 and not result.interrupted
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "model/ramjax_model.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    meta = json.load(open(os.path.join(run_dir, "meta.json")))
    assert meta["jax_version"] == jax.__version__ and meta["device_count"] == 8 and meta["process_count"] == 1
    assert meta["final_step"] == 6 and meta["compiled_memory"]
    recs = metrics_lib.read_metrics(run_dir)
    assert [r["step"] for r in recs] == list(range(1, 7))
    for k in ("train/loss", "train/nll_data", "train/logq_neg", "train/grad_norm", "train/lr", "perf/tokens_per_s"):
        assert np.isfinite(recs[-1][k]), k
    r = recs[0]
    assert r["train/loss"] == pytest.approx(r["train/nll_data"] + 0.01 * r["train/logq_neg"], rel=1e-6)
    assert sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints"))) == [3, 6]
    cfg = config_lib.load_config(config_lib.TrainConfig, os.path.join(run_dir, "config.yaml"))
    assert cfg.ram.alpha == 0.01


def test_sigterm_checkpoints_and_resume_is_exact(fx, straight_run, tmp_path):
    """SIGTERM at step 2 -> checkpoint at 2, interrupted; resuming runs 3..6 with the same losses, data order
    and final parameters as the uninterrupted run (float32, 1e-6)."""
    run_dir = str(tmp_path / "run")
    cfg = _cfg(ram_overrides(fx, run_dir))

    def progress(event):
        if event["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    r1 = train_lib.train(cfg, progress=progress)
    assert r1.interrupted and r1.step == 2 and r1.model_dir is None
    assert sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints"))) == [2]
    r2 = train_lib.train(cfg)
    assert r2.step == 6 and not r2.interrupted
    _assert_same_run(run_dir, straight_run[0])


def _assert_same_run(run_dir, ref_dir):
    got, want = _losses(run_dir), _losses(ref_dir)
    assert [s for s, _, _ in got] == [s for s, _, _ in want]
    assert [c for _, _, c in got] == [c for _, _, c in want]  # same data order
    np.testing.assert_allclose([l for _, l, _ in got], [l for _, l, _ in want], rtol=1e-6, atol=1e-6)
    _, p_got = ckpt_lib.load_model_dir(os.path.join(run_dir, "model"))
    _, p_want = ckpt_lib.load_model_dir(os.path.join(ref_dir, "model"))
    _assert_trees_close(p_got, p_want, 1e-6)


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from ramjax import config, train_lib
cfg = config.load_config(config.TrainConfig, None, {overrides!r})
def progress(event):
    if event["step"] == 4:  # the checkpoint of step 3 is committed; die without any cleanup
        os.kill(os.getpid(), signal.SIGKILL)
train_lib.train(cfg, progress=progress)
"""


def _env(devices=8):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT
    return env


def test_sigkill_then_resume_is_exact(fx, straight_run, tmp_path):
    run_dir = str(tmp_path / "run")
    overrides = ram_overrides(fx, run_dir)
    p = subprocess.run([sys.executable, "-c", _KILL_SCRIPT.format(root=ROOT, overrides=overrides)], env=_env(),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert [r["step"] for r in metrics_lib.read_metrics(run_dir)] == [1, 2, 3, 4]
    r = train_lib.train(_cfg(overrides))  # resumes from step 3; the logged step 4 of the dead run is replaced
    assert r.step == 6
    _assert_same_run(run_dir, straight_run[0])


@pytest.mark.slow
def test_train_py_sigterm_exits_zero_and_resumes(fx, tmp_path):
    run_dir = str(tmp_path / "run")
    # from scratch here (the fast tests start from a saved model directory, which compiles faster)
    overrides = ram_overrides(fx, run_dir, "steps=400", "checkpoint.every=1000", "logging.every=1",
                              "model.init=scratch", f"tokenizer={fx}/tok", "model.arch.vocab_size=640",
                              "model.arch.hidden_size=32", "model.arch.head_dim=8", "model.arch.intermediate_size=64")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *overrides], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import time

    deadline = time.time() + 300
    while time.time() < deadline and len(metrics_lib.read_metrics(run_dir)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "interrupted; checkpoint saved at step" in out
    steps = ckpt_lib.CheckpointManager(os.path.join(run_dir, "checkpoints")).all_steps()
    assert len(steps) == 1 and 3 <= steps[0] < 400
    def stop_soon(event):  # resume with the same settings (other steps would be refused), stop 2 steps later
        if event["step"] == steps[0] + 2:
            os.kill(os.getpid(), signal.SIGTERM)

    r = train_lib.train(_cfg(overrides), progress=stop_soon)
    assert r.step == steps[0] + 2 and r.interrupted


def test_dpo_reference_and_trl_metrics(fx, tmp_path):
    run_dir = str(tmp_path / "run")
    over = [f"run_dir={run_dir}", "stage=dpo", f"model.init={fx}/aligner0", f"data.train_files=[{fx}/pref.jsonl]",
            "data.max_len=24", "data.max_prompt_len=12", "data.batch_size=8", "steps=2", "optimizer.lr=1e-2",
            "dpo.beta=0.5", "checkpoint.export_hf=false", "logging.every=1", "mesh.data=8", "mesh.fsdp=1"]
    r = train_lib.train(_cfg(over))
    recs = metrics_lib.read_metrics(run_dir)
    # step 1 is evaluated at the initial params, which are the reference: every reward is 0 and the loss log 2
    first = recs[0]
    assert first["train/loss"] == pytest.approx(np.log(2.0), abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[f"train/{k}"] == pytest.approx(0.0, abs=1e-5)
    assert "train/rewards/accuracies" in first and "train/logps/chosen" in first and "train/logps/rejected" in first
    table = np.load(os.path.join(run_dir, "ref_logps.npy"))
    assert table.shape == (48, 2) and np.all(table < 0)
    assert recs[1]["train/loss"] < np.log(2.0)
    assert r.model_dir and ckpt_lib.read_model_config(r.model_dir).vocab_size == 640
    meta = json.load(open(os.path.join(run_dir, "meta.json")))
    assert meta["row_len"] == 24 and meta["data"]["truncated_responses"] == 0  # no pair reaches 24 tokens
    # rows only as long as the longest pair (rounded up to 8) train exactly as rows of max_len: padding is masked
    run_dir2 = str(tmp_path / "run2")
    train_lib.train(_cfg([f"run_dir={run_dir2}", "data.max_len=64", "data.padding=longest"] + over[1:]))
    meta2 = json.load(open(os.path.join(run_dir2, "meta.json")))
    assert meta2["row_len"] <= 24 and meta2["row_len"] % 8 == 0
    for a, b in zip(recs, metrics_lib.read_metrics(run_dir2)):
        for k in ("train/loss", "train/logps/chosen", "train/rewards/margins", "train/grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_dry_run_writes_nothing(fx, tmp_path):
    run_dir = str(tmp_path / "run")
    info = train_lib.dry_run(_cfg(ram_overrides(fx, run_dir, "model.init=scratch", f"tokenizer={fx}/tok",
                                                "model.arch.vocab_size=640", "model.arch.hidden_size=32",
                                                "model.arch.head_dim=8", "model.arch.intermediate_size=64")))
    assert info["num_params"] == model_lib.count_params(model_lib.param_shapes(ALIGNER.replace(
        max_position_embeddings=2048)))
    assert info["total_steps"] == 6 and info["memory"]["temp_size_in_bytes"] > 0
    assert not os.path.exists(run_dir)


def _snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            if f == ".lock":  # the run-directory lock records its latest holder
                continue
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = os.path.getmtime(p)
    return out


def test_bad_inputs_are_named_errors_and_write_nothing(fx, straight_run, tmp_path):
    from ramjax import data as data_lib
    from ramjax import loss as loss_lib
    from ramjax import tokenizer as tok_lib

    run_dir = str(tmp_path / "run")
    with pytest.raises(config_lib.ConfigError, match="ram.alpha"):
        _cfg(ram_overrides(fx, run_dir, "ram.alpha=-1e-4"))
    cfg = _cfg(ram_overrides(fx, run_dir))
    import dataclasses

    with pytest.raises((config_lib.ConfigError, loss_lib.LossConfigError), match="alpha"):  # config built in code
        train_lib.train(dataclasses.replace(cfg, ram=dataclasses.replace(cfg.ram, alpha=-1.0)))
    with pytest.raises(config_lib.ConfigError, match="did you mean 'optimizer.lr'"):
        _cfg(ram_overrides(fx, run_dir, "optimizer.lrr=1"))
    with pytest.raises(config_lib.ConfigError, match="optimizer.lr"):
        _cfg(ram_overrides(fx, run_dir, "optimizer.lr=fast"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b", "proposal": "c"}\n{"prompt": "a", "response": \n')
    with pytest.raises(data_lib.DataError, match="bad.jsonl:2"):
        train_lib.train(_cfg(ram_overrides(fx, run_dir, f"data.train_files=[{bad}]")))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a", "response": "b", "proposal": "c"}\n{"prompt": "a", "proposal": "c"}\n')
    with pytest.raises(data_lib.DataError, match="missing.jsonl:2"):
        train_lib.train(_cfg(ram_overrides(fx, run_dir, f"data.train_files=[{missing}]")))
    other_tok = tmp_path / "proposal"
    tokenizer_fixtures.make_hf_tokenizer(other_tok, kind="qwen")
    with pytest.raises(tok_lib.VocabMismatchError):
        train_lib.train(_cfg(ram_overrides(fx, run_dir, f"proposal={other_tok}")))
    assert not os.path.exists(run_dir)
    # a run directory holding a checkpoint of another shape: named error, the directory untouched
    import shutil

    other = str(tmp_path / "other")
    shutil.copytree(straight_run[0], other)
    os.remove(os.path.join(other, "fingerprint.json"))  # as written before fingerprints (else that check fires first)
    before = _snapshot(other)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="layers/w_up"):
        train_lib.train(_cfg(ram_overrides(fx, other, "model.init=scratch", f"tokenizer={fx}/tok",
                                           "model.arch.vocab_size=640", "model.arch.hidden_size=32",
                                           "model.arch.head_dim=8", "model.arch.intermediate_size=96")))
    assert _snapshot(other) == before


def test_sft_from_hf_exports_hf_and_model_dir(fx, tmp_path):
    """model.init is a Hugging Face directory (with embedding rows beyond the tokenizer): the run exports a ramjax
    model directory and HF safetensors holding the same trained weights."""
    import hf_fixtures

    from ramjax import hf

    hf_fixtures.make_hf_model(tmp_path / "hf_in", hf_fixtures.HFSpec(arch="qwen2", tokenizer="llama",
                                                                     extra_vocab_rows=9))
    run_dir = str(tmp_path / "run")
    r = train_lib.train(_cfg([f"run_dir={run_dir}", "stage=sft", f"model.init={tmp_path}/hf_in",
                              f"data.train_files=[{fx}/sft.jsonl]", "data.max_len=24", "data.max_prompt_len=12",
                              "data.packing=true", "data.batch_size=8", "steps=2", "optimizer.lr=1e-2",
                              "checkpoint.export_hf=false", "logging.every=1", "mesh.data=8", "mesh.fsdp=1"]))
    assert r.hf_dir is not None  # exported because the model came from HF, although export_hf is off
    cfg_m, p_m = ckpt_lib.load_model_dir(r.model_dir)
    cfg_h, p_h = hf.load_hf(r.hf_dir)
    assert cfg_m.vocab_size == cfg_h.vocab_size == 640 and cfg_m.qkv_bias
    _assert_trees_close(p_h, p_m, 0.0)
    _, p0 = hf.load_hf(tmp_path / "hf_in")
    assert not np.allclose(np.asarray(p0["embed"]), np.asarray(p_m["embed"]))  # it trained


def test_alpha_term_domination_warns(caplog):
    with caplog.at_level("WARNING", logger="ramjax.stages"):
        assert stages.warn_alpha({"train/nll_data": 10.0, "train/logq_neg": -50.0}, 0.1, 0) == 0
        assert not caplog.records
        assert stages.warn_alpha({"train/nll_data": 10.0, "train/logq_neg": -50.0}, 0.5, 0) == 1
    assert "alpha term dominates" in caplog.text


def test_dpo_rpo_alpha_adds_token_mean_nll_of_chosen():
    """rpo_alpha (TRL's RPO): the DPO loss plus rpo_alpha x the token-mean NLL of the chosen responses, the same
    number the SFT objective computes on the chosen rows alone; padding rows (example_index -1) count nowhere."""
    params = _params0()
    b = _ram_batch(seed=3)
    b["example_index"] = np.array([0, 1, 2, 3, 4, 5, -1, -1], np.int32)
    frozen = {"ref_logps": jnp.asarray(np.random.default_rng(0).normal(-20, 3, (6, 2)), jnp.float32)}

    fwd = stages.model_forward(CFG)

    def run(obj, batch, frozen):
        return obj.loss(lambda lm: fwd(params, None, lm), batch, obj.normalizers(batch), frozen)

    plain, m0 = run(loss_lib.dpo_objective(0.3), b, frozen)
    rpo, m1 = run(loss_lib.dpo_objective(0.3, rpo_alpha=0.7), b, frozen)
    chosen = {k[len("chosen_"):]: v[:6] for k, v in b.items() if k.startswith("chosen_")}
    nll, _ = run(loss_lib.lm_objective(), chosen, None)
    assert float(m1["dpo_loss"]) == pytest.approx(float(plain), rel=1e-6)
    assert float(m1["nll"]) == pytest.approx(float(nll), rel=1e-5)
    assert float(rpo) == pytest.approx(float(plain) + 0.7 * float(nll), rel=1e-5)
    assert "nll" not in m0
    with pytest.raises(Exception, match="rpo_alpha"):
        loss_lib.dpo_objective(0.3, rpo_alpha=-1.0)


def test_stage_length_in_steps_tokens_or_epochs():
    """steps wins; else tokens / (rows x row length) steps, rounded up; else epochs x batches per epoch. The row
    length is the data's (``data.max_len``, or shorter with ``data.padding=longest``)."""
    from types import SimpleNamespace

    from ramjax import train_lib
    from ramjax.config import TrainConfig, load_config

    class It:
        def __init__(self, row_len):
            self.data = SimpleNamespace(max_len=row_len)

        def batches_per_epoch(self, epoch):
            return 37

    def total(*ov, row_len=10):
        cfg = load_config(TrainConfig, None, ["tokenizer=t", "data.batch_size=4", "data.max_len=10",
                                              "data.max_prompt_len=5", *ov])
        return train_lib._total_steps(cfg, It(row_len))

    assert total("steps=5", "tokens=1000", "epochs=3") == 5
    assert total("tokens=1000", "epochs=3") == 25 and total("tokens=1001") == 26
    assert total("tokens=1000", row_len=8) == 32  # rows of 8 tokens: ceil(1000 / 32)
    assert total("epochs=2.5") == 93  # ceil(2.5 * 37)
