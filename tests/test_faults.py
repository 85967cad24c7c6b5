"""Faults and bad inputs (issue 15): every case asserts the outcome (a named error and exit status, or a correct
recovery), the message's key words, and that what was on disk before is byte-identical afterwards."""
import hashlib
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from ramjax import checkpoint as ckpt_lib
from ramjax import config as config_lib
from ramjax import metrics as metrics_lib
from ramjax import train_lib

sys.path.insert(0, os.path.dirname(__file__))
from test_train import make_fixture, ram_overrides  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(overrides):
    return config_lib.load_config(config_lib.TrainConfig, None, overrides)


def snapshot(d):
    """``{relative path: sha256}`` of every file under ``d`` (empty when ``d`` does not exist), except the run
    directory's lock file (which records its latest holder)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            if f == ".lock":
                continue
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixture(str(tmp_path_factory.mktemp("fx")))


def overrides(fx, run_dir, *extra):
    """The tiny RAM run of test_train (6 steps, checkpoints at 3 and 6), with a checkpoint every step."""
    return ram_overrides(fx, run_dir, "checkpoint.keep=5", "checkpoint.every=1", *extra)


@pytest.fixture(scope="module")
def straight(fx, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("straight") / "run")
    train_lib.train(_cfg(overrides(fx, run_dir)))
    return run_dir


def _losses(run_dir):
    return [(r["step"], r["train/loss"], r["data/crc32"]) for r in metrics_lib.read_metrics(run_dir)]


def assert_same_run(run_dir, ref_dir):
    """Same steps, data order, losses (bitwise) and final parameters (bitwise) as the uninterrupted run."""
    got, want = _losses(run_dir), _losses(ref_dir)
    assert got == want
    _, p_got = ckpt_lib.load_model_dir(os.path.join(run_dir, "model"))
    _, p_want = ckpt_lib.load_model_dir(os.path.join(ref_dir, "model"))
    for a, b in zip(jax.tree_util.tree_leaves(p_got), jax.tree_util.tree_leaves(p_want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------------------
# Checkpoint fallback


def _blobs(step_dir, item):
    """The data files of one orbax item (ocdbt d/ blobs), largest first."""
    out = []
    for root, _, files in os.walk(os.path.join(step_dir, item)):
        for f in files:
            p = os.path.join(root, f)
            if os.sep + "d" + os.sep in p:
                out.append(p)
    return sorted(out, key=os.path.getsize, reverse=True)


def _truncate_params(step_dir):
    p = _blobs(step_dir, "params")[0]
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def _zero_train(step_dir):
    for p in _blobs(step_dir, "train"):
        open(p, "wb").close()


def _flip_bits(step_dir):
    p = _blobs(step_dir, "params")[0]
    with open(p, "r+b") as f:
        data = bytearray(f.read())
        for i in range(len(data) // 3, len(data) // 3 + 64, 8):
            data[i] ^= 0x10
        f.seek(0)
        f.write(bytes(data))


def _delete_manifest(step_dir):
    found = False
    for root, _, files in os.walk(step_dir):
        for f in files:
            if f == "manifest.ocdbt":
                os.remove(os.path.join(root, f))
                found = True
    assert found


@pytest.mark.parametrize("damage", [_truncate_params, _zero_train, _flip_bits, _delete_manifest],
                         ids=["truncated-params", "zero-byte-train", "bit-flips", "no-manifest"])
def test_damaged_latest_checkpoint_falls_back_and_resume_is_exact(fx, straight, tmp_path, damage, caplog):
    """Interrupted after step 4 with checkpoints 3 (good) and 4 (damaged): the rerun logs the damage, resumes from
    3, moves step 4 aside, and ends bit-identical to the uninterrupted run."""
    run_dir = str(tmp_path / "run")
    over = overrides(fx, run_dir, "checkpoint.every=1")
    shutil.copytree(straight, run_dir)
    ck = os.path.join(run_dir, "checkpoints")
    for s in os.listdir(ck):  # keep 3 and 4 of the straight run's 1..6, as if killed after step 4
        if int(s) not in (3, 4):
            shutil.rmtree(os.path.join(ck, s))
    shutil.rmtree(os.path.join(run_dir, "model"))
    damage(os.path.join(ck, "4"))
    caplog.set_level("WARNING")
    r = train_lib.train(_cfg(over))
    assert r.step == 6
    assert "checkpoints/4" in caplog.text and ("falling back" in caplog.text or "trying an older" in caplog.text)
    assert os.path.isdir(os.path.join(run_dir, "checkpoints_damaged", "4"))
    assert_same_run(run_dir, straight)


def test_no_checkpoint_restores_is_a_named_error(fx, straight, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(straight, run_dir)
    for s in os.listdir(os.path.join(run_dir, "checkpoints")):
        _truncate_params(os.path.join(run_dir, "checkpoints", s))
    before = snapshot(run_dir)
    with pytest.raises(ckpt_lib.CheckpointCorruptError, match="no checkpoint .* can be restored"):
        train_lib.train(_cfg(overrides(fx, run_dir)))
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["truncate", "flip", "json"])
def test_damaged_model_dir_is_a_named_error_and_rerun_exports_it_again(fx, straight, tmp_path, damage):
    """A damaged exported model is named on load (file and fix); rerunning the finished run writes it again from
    the final checkpoint, identical to the original."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(straight, run_dir)
    model = os.path.join(run_dir, "model")
    if damage == "json":
        with open(os.path.join(model, ckpt_lib.MODEL_JSON), "w") as f:
            f.write('{"format_version": 1, "config": {"vocab_size": 6')
        match = "ramjax_model.json is not valid JSON"
    else:
        (_truncate_params if damage == "truncate" else _flip_bits)(model)
        match = "is damaged"
    with pytest.raises(ckpt_lib.CheckpointCorruptError, match=match) as e:
        ckpt_lib.load_model_dir(model)
    assert "export it again" in str(e.value)
    r = train_lib.train(_cfg(overrides(fx, run_dir)))
    assert r.step == 6
    assert_same_run(run_dir, straight)


# ------------------------------------------------------------------------------------------------------------
# Non-finite settings


@pytest.mark.parametrize("override,key", [("optimizer.lr=inf", "optimizer.lr"),
                                          ("optimizer.weight_decay=inf", "optimizer.weight_decay"),
                                          ("optimizer.clip_norm=-inf", "optimizer.clip_norm"),
                                          ("epochs=inf", "epochs")])
def test_non_finite_settings_are_named_errors(fx, tmp_path, override, key):
    run_dir = str(tmp_path / "run")
    with pytest.raises(config_lib.ConfigError, match=rf"{key}=-?inf must be"):
        _cfg(overrides(fx, run_dir, "steps=0", override))
    import train as train_cli

    assert train_cli.main(overrides(fx, run_dir, "steps=0", override)) == 2
    assert not os.path.exists(run_dir)


# ------------------------------------------------------------------------------------------------------------
# Run directories: writable, one run at a time, one experiment per directory, metrics never doubled


def _train_cli(argv, capsys):
    from ramjax import cli

    code = cli.train_main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "under-file", "proc", "read-only"])
def test_unusable_run_dir_is_a_named_error(fx, tmp_path, capsys, where):
    f = tmp_path / "a_file"
    f.write_text("keep me\n")
    run_dir, words = {"file": (str(f), "is a file"), "under-file": (str(f / "run"), "which is a file"),
                      "proc": ("/proc/ramjax_run", "virtual file system"),
                      "read-only": (str(tmp_path / "ro" / "run"), "cannot be written")}[where]
    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        (tmp_path / "ro").mkdir(mode=0o555)
    before = snapshot(str(tmp_path))
    code, err = _train_cli(overrides(fx, run_dir), capsys)
    assert code == 2 and "RunDirError" in err and words in err and "run_dir=" in err
    assert snapshot(str(tmp_path)) == before


def test_second_concurrent_run_is_refused_naming_the_holder(fx, straight, tmp_path, capsys):
    from ramjax import rundir

    run_dir = str(tmp_path / "run")
    shutil.copytree(straight, run_dir)
    before = snapshot(run_dir)
    with rundir.RunDirLock(run_dir):  # another run holds the directory (a second open file description)
        code, err = _train_cli(overrides(fx, run_dir), capsys)
        assert code == 2 and "RunDirBusyError" in err and f"pid {os.getpid()}" in err
    assert snapshot(run_dir) == before


def test_other_settings_on_a_run_dir_are_refused_and_force_restart_moves_the_old_run_aside(fx, straight, tmp_path,
                                                                                           capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(straight, run_dir)
    before = snapshot(run_dir)
    code, err = _train_cli(overrides(fx, run_dir, "optimizer.lr=1e-3"), capsys)
    assert code == 2 and "RunDirMismatchError" in err and "optimizer.lr: 0.003 -> 0.001" in err
    assert "--force-restart" in err and "new run_dir" in err
    assert snapshot(run_dir) == before  # config.yaml was not rewritten, the model not touched
    # the same with other data: refused, naming the data files
    code, err = _train_cli(overrides(fx, run_dir, f"data.train_files=[{fx}/sft.jsonl]", "data.format=auto"), capsys)
    assert code == 2 and "data.train_files" in err
    # --force-restart: the old run is kept aside byte for byte, the new one starts from step 0
    code, _ = _train_cli(overrides(fx, run_dir, "optimizer.lr=1e-3", "steps=2", "--force-restart"), capsys)
    assert code == 0
    aside = [d for d in os.listdir(tmp_path) if d.startswith("run.replaced-")]
    assert len(aside) == 1 and snapshot(str(tmp_path / aside[0])) == before
    assert [r["step"] for r in metrics_lib.read_metrics(run_dir)] == [1, 2]


def test_kill_before_the_first_checkpoint_then_rerun_logs_each_step_once(fx, straight, tmp_path):
    run_dir = str(tmp_path / "run")
    over = overrides(fx, run_dir, "checkpoint.every=0")

    class Killed(Exception):
        pass

    def die(event):
        if event["step"] == 4:
            raise Killed

    with pytest.raises(Killed):
        train_lib.train(_cfg(over), progress=die)
    assert [r["step"] for r in metrics_lib.read_metrics(run_dir)] == [1, 2, 3, 4]
    assert not os.listdir(os.path.join(run_dir, "checkpoints"))
    train_lib.train(_cfg(over))
    assert_same_run(run_dir, straight)  # steps 1..6 once each, same losses and parameters
