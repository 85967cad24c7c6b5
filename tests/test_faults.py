"""Faults and bad inputs (issue 15): every case asserts the outcome (a named error and exit status, or a correct
recovery), the message's key words, and that what was on disk before is byte-identical afterwards."""
import hashlib
import json
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
from test_train import fx, ram_overrides  # noqa: E402,F401 -- fx: the tiny run's fixture, module-scoped here too

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
        if os.geteuid() == 0:  # root writes anywhere: run the CLI as an unprivileged user instead
            return _read_only_run_dir_as_nobody(fx)
        (tmp_path / "ro").mkdir(mode=0o555)
    before = snapshot(str(tmp_path))
    code, err = _train_cli(overrides(fx, run_dir), capsys)
    assert code == 2 and "RunDirError" in err and words in err and "run_dir=" in err
    assert snapshot(str(tmp_path)) == before


def _read_only_run_dir_as_nobody(fx):
    """``python train.py`` run as user nobody (``setpriv``) with run_dir under a directory it cannot write: exit
    2 with the named error, nothing written. The fixture is copied to a world-readable temporary directory (pytest's
    own are private to root)."""
    import subprocess
    import tempfile

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: no way to run as an unprivileged user")
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    base = tempfile.mkdtemp(prefix="ramjax-readonly-")
    try:
        shutil.copytree(fx, os.path.join(base, "fx"))
        os.mkdir(os.path.join(base, "ro"))
        for root, dirs, names in os.walk(base):
            os.chmod(root, 0o555 if root == os.path.join(base, "ro") else 0o755)
            for n in names:
                os.chmod(os.path.join(root, n), 0o644)
        env = {**os.environ, "HOME": base, "JAX_PLATFORMS": "cpu"}
        probe = subprocess.run([*as_nobody, sys.executable, "-c", "import ramjax"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
        if probe.returncode != 0:
            pytest.skip(f"user nobody cannot run this Python/checkout: {probe.stderr.strip()[-300:]}")
        run_dir = os.path.join(base, "ro", "run")
        before = snapshot(base)
        proc = subprocess.run([*as_nobody, sys.executable, os.path.join(ROOT, "train.py"),
                               *overrides(os.path.join(base, "fx"), run_dir)], cwd=base, env=env,
                              capture_output=True, text=True, timeout=600)
        err = proc.stderr
        assert proc.returncode == 2, err[-2000:]
        assert "RunDirError" in err and "cannot be written" in err and "permission denied" in err and "run_dir=" in err
        assert snapshot(base) == before and not os.path.exists(run_dir)
    finally:
        for root, dirs, _ in os.walk(base):
            os.chmod(root, 0o755)
        shutil.rmtree(base, ignore_errors=True)


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


def test_same_size_edit_of_a_training_file_is_refused_naming_the_file(fx, tmp_path, capsys):
    """The run directory's fingerprint holds each training file's content hash, not only its size: a file edited
    in place to other content of the same size is refused (exit 2, the file named, nothing touched); the original
    bytes pass the check again."""
    from ramjax import rundir

    data = tmp_path / "ram.jsonl"
    shutil.copyfile(f"{fx}/ram.jsonl", data)
    original = data.read_bytes()
    run_dir = str(tmp_path / "run")
    args = overrides(fx, run_dir, f"data.train_files=[{data}]")
    os.makedirs(run_dir)
    rundir.check_fingerprint(run_dir, rundir.train_fingerprint(_cfg(args)))  # as the first run recorded it
    i = original.index(b'"prompt": "') + len(b'"prompt": "')
    edited = original[:i] + bytes([original[i] ^ 1]) + original[i + 1:]  # one character of the first prompt
    assert len(edited) == len(original) and edited != original
    data.write_bytes(edited)
    before = snapshot(str(tmp_path))
    code, err = _train_cli(args, capsys)
    assert code == 2 and "RunDirMismatchError" in err and f"data_file_hashes.{data}" in err
    assert "--force-restart" in err and "new run_dir" in err and snapshot(str(tmp_path)) == before
    data.write_bytes(original)
    rundir.check_fingerprint(run_dir, rundir.train_fingerprint(_cfg(args)), write=False)  # no error


def test_pipeline_with_other_settings_is_refused_and_force_restart_moves_it_aside(tmp_path, capsys, monkeypatch):
    """The one-command pipeline (``python train.py`` with program: pipeline) on a run directory of a pipeline made
    with other settings: exit 2 naming the keys and the ways out, nothing touched; ``--force-restart`` moves the old
    run aside byte for byte and starts the pipeline in an empty directory. (The stages themselves are stubbed: the
    whole pipeline's run and resume are test_pipeline's.)"""
    from ramjax.experiments import pipeline

    default = os.path.join(ROOT, "configs", "default.yaml")
    run_dir = tmp_path / "run"
    old = config_lib.load_config(pipeline.DefaultRunConfig, default, [f"run_dir={run_dir}", "stages.ram.steps=2"])
    config_lib.save_config(old, str(run_dir / "pipeline_config.yaml"))
    (run_dir / "ram" / "model").mkdir(parents=True)
    (run_dir / "ram" / "model" / "ramjax_model.json").write_text('{"format_version": 1}\n')
    (run_dir / "report.md").write_text("# the old run's report\n")
    before = snapshot(str(run_dir))
    started = []

    def stub(run, **_):
        started.append((run.stages.ram.steps, sorted(os.listdir(run.run_dir))))
        return {"table": "", "stage_times": {}, "report": os.path.join(run.run_dir, "report.md")}

    monkeypatch.setattr(pipeline, "_run_pipeline", stub)
    args = [default, f"run_dir={run_dir}", "stages.ram.steps=3"]
    code, err = _train_cli(args, capsys)
    assert code == 2 and "other settings" in err and "stages.ram.steps: 2 -> 3" in err
    assert "--force-restart" in err and "new run_dir" in err and err.count("\n") == 1
    assert snapshot(str(run_dir)) == before and not started
    # a forced restart that cannot start (its data directory lacks align.jsonl) moves nothing
    code, err = _train_cli(args + [f"pipeline.data_dir={tmp_path}/nodata", "--force-restart"], capsys)
    assert code == 2 and "align.jsonl is missing" in err and "nothing was moved" in err
    assert snapshot(str(run_dir)) == before and not started
    # the explicit way out: the old run is kept aside byte for byte, the new one starts in an empty directory
    code, _ = _train_cli(args + ["--force-restart"], capsys)
    assert code == 0 and started == [(3, [".lock"])]
    aside = [d for d in os.listdir(tmp_path) if d.startswith("run.replaced-")]
    assert len(aside) == 1 and snapshot(str(tmp_path / aside[0])) == before
    # the flag means nothing to the other programs: refused rather than ignored
    code, err = _train_cli([os.path.join(ROOT, "configs", "ablate.yaml"), "--force-restart"], capsys)
    assert code == 2 and "--force-restart applies to" in err


def test_pipeline_on_changed_data_files_is_refused_naming_the_file(tmp_path, capsys):
    """A pipeline run on ``pipeline.data_dir``, then the same command after ``DIR/align.jsonl`` changed (same path,
    same settings, other content; then other content of the same size; then a ``prefs.jsonl`` added): exit 2 naming
    the file and the ways out, nothing under the run touched. The original bytes back: the rerun passes the check.
    (The pipeline is stopped after its data stage, which records the data fingerprint: the stages themselves are
    test_user_data's.)"""
    from ramjax.experiments import pipeline

    data = tmp_path / "DIR"
    data.mkdir()
    (data / "corpus.jsonl").write_text("".join(json.dumps({"text": f"a line of text {i}"}) + "\n" for i in range(40)))
    align = data / "align.jsonl"
    align.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(10)))
    original = align.read_bytes()
    run_dir = tmp_path / "run"
    args = [os.path.join(ROOT, "configs", "default.yaml"), f"run_dir={run_dir}", f"pipeline.data_dir={data}"]
    cfg = config_lib.load_config(pipeline.DefaultRunConfig, args[0], args[1:])

    class Stop(Exception):
        pass

    def stop_after_data(name, event, _seconds):
        if name != "data" and event == "start":
            raise Stop

    with pytest.raises(Stop):
        pipeline.run_pipeline(cfg, on_stage=stop_after_data)
    assert os.path.exists(run_dir / "data" / "prepared.json")
    before = snapshot(str(run_dir))
    edits = [(original.replace(b"a9", b"a99"), ["changed (", " -> ", "bytes)"]),   # one byte longer
             (original.replace(b"a9", b"b9"), ["changed (same size, other content)"])]
    for content, words in edits:
        align.write_bytes(content)
        code, err = _train_cli(args, capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert f"{align} " in err and "other data" in err and all(w in err for w in words), err
        assert "new run_dir" in err and "--force-restart" in err
        assert snapshot(str(run_dir)) == before
    align.write_bytes(original)
    (data / "prefs.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    code, err = _train_cli(args, capsys)
    assert code == 2 and f"{data / 'prefs.jsonl'} was added" in err and snapshot(str(run_dir)) == before
    (data / "prefs.jsonl").unlink()
    with pytest.raises(Stop):  # the data the run started on: the check passes and the run resumes
        pipeline.run_pipeline(cfg, on_stage=stop_after_data)
    # --force-restart on changed data: the old run is kept aside byte for byte and the new one records the new data
    align.write_bytes(original.replace(b"a9", b"b9"))
    with pytest.raises(Stop):
        pipeline.run_pipeline(cfg, on_stage=stop_after_data, force_restart=True)
    aside = [d for d in os.listdir(tmp_path) if d.startswith("run.replaced-")]
    assert len(aside) == 1 and snapshot(str(tmp_path / aside[0])) == before
    with pytest.raises(Stop):
        pipeline.run_pipeline(cfg, on_stage=stop_after_data)


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


# ------------------------------------------------------------------------------------------------------------
# Named errors: sample.py, evaluate, ablate, model files, JSONL encodings, chat templates


def _sample_cli(argv, capsys):
    from ramjax import cli

    code = cli.sample_main(argv)
    return code, capsys.readouterr().err


def _prompts(path, n=4):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"the quick fox {i}"}) + "\n")
    return str(path)


def _sample_args(fx, tmp_path, *extra):
    return ["mode=proposal", f"proposal={fx}/aligner0", f"prompts_file={_prompts(tmp_path / 'p.jsonl')}",
            f"output_file={tmp_path / 'out.jsonl'}", "max_new_tokens=2", "batch_size=4", "mesh.data=1",
            "mesh.fsdp=-1", *extra]


def _refused_sample(fx, tmp_path, capsys, *extra):
    """sample.py with ``extra`` over the standard arguments, resuming an output that already holds the first
    prompt's sample: asserts exit 2 with a one-line error and that every file under tmp_path is byte-identical
    afterwards (nothing written, nothing created); returns the error line."""
    args = _sample_args(fx, tmp_path, *extra)
    (tmp_path / "out.jsonl").write_text(json.dumps({"index": 0, "sample_index": 0, "prompt": "the quick fox 0",
                                                    "text": "x"}) + "\n")
    before = snapshot(str(tmp_path))
    code, err = _sample_cli(args, capsys)
    err = err.strip().splitlines()[-1] if err.strip() else err
    assert code == 2 and err.startswith("error: "), err
    assert snapshot(str(tmp_path)) == before
    return err


def test_sample_missing_proposal_and_directory_output_are_named(fx, tmp_path, capsys):
    err = _refused_sample(fx, tmp_path, capsys, f"proposal={tmp_path}/nope")
    assert "nope" in err
    (tmp_path / "outdir").mkdir()
    code, err = _sample_cli(_sample_args(fx, tmp_path, f"output_file={tmp_path}/outdir"), capsys)
    assert code == 2 and "GenerateError" in err and "is a directory" in err and "samples.jsonl" in err
    assert os.listdir(tmp_path / "outdir") == []


def test_sample_refuses_an_output_file_of_another_prompt_set(fx, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    foreign = [{"prompt": f"another prompt {i}", "proposal": "x"} for i in range(2)]
    out.write_text("".join(json.dumps(r) + "\n" for r in foreign))
    before = out.read_bytes()
    code, err = _sample_cli(_sample_args(fx, tmp_path, "--training-data"), capsys)
    assert code == 2 and "GenerateError" in err and "another prompt set" in err and "out.jsonl:1" in err
    assert out.read_bytes() == before


def test_inra_adapter_that_is_not_safetensors_is_named(fx, tmp_path, capsys):
    bogus = tmp_path / "passwd"
    bogus.write_text("root:x:0:0:root:/root:/bin/bash\n")
    err = _refused_sample(fx, tmp_path, capsys, "mode=inra", f"adapter={bogus}")
    assert "RealignError" in err and "not a readable safetensors file" in err and "passwd" in err


def test_sample_refuses_a_model_with_non_finite_weights(fx, tmp_path, capsys):
    """One NaN weight in a saved aligner: sample.py stops at load naming the file and the parameter (where the
    review saw healthy-looking diagnostics and empty texts), and the output being resumed is untouched."""
    cfg, params = ckpt_lib.load_model_dir(f"{fx}/aligner0")
    params = jax.tree_util.tree_map(np.array, params)
    params["layers"]["w_up"][0, 1, 2] = np.nan
    ckpt_lib.save_model_dir(tmp_path / "bad", cfg, params, tokenizer=f"{fx}/tok")
    for mode in ("proposal", "product", "par"):  # par: the review saw normal-looking text from a NaN aligner
        err = _refused_sample(fx, tmp_path, capsys, f"mode={mode}", f"proposal={tmp_path}/bad" if mode == "proposal"
                              else f"aligner={tmp_path}/bad", "kl_threshold=null")
        assert "NonFiniteWeightsError" in err and "bad" in err and "w_up" in err


def test_aligner_without_tokenizer_files_needs_an_explicit_choice(fx, tmp_path, capsys, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(f"{fx}/aligner0", bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    out = tmp_path / "new" / "out.jsonl"
    args = _sample_args(fx, tmp_path, "mode=product", f"aligner={bare}", "kl_threshold=null", f"output_file={out}")
    before = snapshot(str(tmp_path))
    code, err = _sample_cli(args, capsys)
    assert code == 2 and "VocabMismatchError" in err and "no tokenizer files" in err
    assert "aligner_tokenizer=proposal" in err
    assert snapshot(str(tmp_path)) == before and not os.path.exists(out.parent)  # nothing created, not even new/
    caplog.set_level("WARNING")
    code, err = _sample_cli(args + ["aligner_tokenizer=proposal"], capsys)
    assert code == 0 and "using the proposal's" in caplog.text
    assert len(out.read_text().splitlines()) == 4


def test_sampling_error_in_the_first_batch_creates_no_output(fx, tmp_path, capsys):
    """A prompt longer than the model's context fails in the first batch: no output file appears; an existing
    output of the same prompt set (being resumed) keeps its bytes."""
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "the quick fox " * n}) + "\n" for n in (1, 200)))
    out = tmp_path / "out.jsonl"
    args = _sample_args(fx, tmp_path, f"prompts_file={prompts}", "batch_size=2")
    code, err = _sample_cli(args, capsys)
    assert code == 2 and "ContextLengthError" in err and not out.exists()
    # resuming: the first prompt's line is there, the second prompt still fails; the file is untouched
    line = {"index": 0, "sample_index": 0, "prompt": "the quick fox ", "text": "x"}
    out.write_text(json.dumps(line) + "\n")
    before = out.read_bytes()
    code, err = _sample_cli(args, capsys)
    assert code == 2 and "ContextLengthError" in err and out.read_bytes() == before


def test_too_long_prompt_in_a_later_batch_is_refused_before_any_batch_is_sampled(fx, tmp_path, capsys):
    """Every prompt is checked against the context before the first batch: a too-long prompt in the third batch
    (line 6, after a blank line) stops sample.py with exit 2 and a one-line error naming the file, the line and the
    fix, and nothing is written (the first batches were written before the fix); an output being resumed keeps its
    bytes. A run without the long prompt samples every prompt (the check refuses only what does not fit)."""
    prompts = tmp_path / "long.jsonl"
    rows = [json.dumps({"prompt": f"the quick fox {i}"}) for i in range(4)]
    rows.insert(2, "")  # a blank line: the error names the file's line, not the record's index
    rows.append(json.dumps({"prompt": "the quick fox " * 200}))
    prompts.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out.jsonl"
    args = _sample_args(fx, tmp_path, f"prompts_file={prompts}", "batch_size=2")
    code, err = _sample_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ContextLengthError: ") and f"{prompts}:6:" in lines[-1]
    assert "max_new_tokens=2" in lines[-1] and "context is 64" in lines[-1] and "lower max_new_tokens" in lines[-1]
    assert not out.exists()
    line = {"index": 0, "sample_index": 0, "prompt": "the quick fox 0", "text": "x"}
    out.write_text(json.dumps(line) + "\n")
    before = snapshot(str(tmp_path))
    code, err = _sample_cli(args, capsys)
    assert code == 2 and f"{prompts}:6:" in err and snapshot(str(tmp_path)) == before
    # the same file without its long prompt is sampled in full (resumed after the first line)
    prompts.write_text("\n".join(rows[:-1]) + "\n")
    code, _ = _sample_cli(args, capsys)
    assert code == 0 and [json.loads(x)["index"] for x in out.read_text().splitlines()] == [0, 1, 2, 3]


def test_non_utf8_jsonl_names_file_and_line(fx, tmp_path, capsys):
    from ramjax import data as data_lib

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b", "proposal": "c"}\n{"prompt": "\xff\xfe", "response": "b"}\n')
    with pytest.raises(data_lib.DataError, match=r"bad.jsonl:2.*UTF-8"):
        train_lib.train(_cfg(overrides(fx, str(tmp_path / "run"), f"data.train_files=[{bad}]")))
    assert not os.path.exists(tmp_path / "run")
    code, err = _train_cli(overrides(fx, str(tmp_path / "run"), f"data.train_files=[{bad}]"), capsys)
    assert code == 2 and "DataError" in err and "bad.jsonl:2" in err and "UTF-8" in err
    assert not os.path.exists(tmp_path / "run")
    err = _refused_sample(fx, tmp_path, capsys, f"prompts_file={bad}")
    assert "bad.jsonl:2" in err and "UTF-8" in err


@pytest.mark.parametrize("damage", ["config", "safetensors"])
def test_damaged_hf_files_are_named(fx, tmp_path, capsys, damage):
    import hf_fixtures

    from ramjax import api, hf

    d = tmp_path / "hf"
    hf_fixtures.make_hf_model(d)
    if damage == "config":
        (d / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
        match = r"config.json is not valid JSON"
    else:
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:200])
        match = r"model.safetensors is not a readable safetensors file"
    before = snapshot(str(d))
    with pytest.raises(hf.ModelFileError, match=match):
        api.load_model(str(d))
    assert snapshot(str(d)) == before
    # the same through sample.py: exit 2, the file named, the output being resumed untouched
    err = _refused_sample(fx, tmp_path, capsys, f"proposal={d}")
    assert "ModelFileError" in err and match in err  # the patterns are plain text


def _cli_run(main, argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("which", ["evaluate", "ablate"])
def test_evaluate_and_ablate_clis_report_errors_like_train(tmp_path, capsys, which, monkeypatch):
    from ramjax import cli

    main = cli.eval_main if which == "evaluate" else cli.ablate_main
    monkeypatch.chdir(tmp_path)  # no runs/default here
    code, out, _ = _cli_run(main, ["--help"], capsys)
    assert code == 0 and "usage" in out
    code, _, err = _cli_run(main, ["foo=1"], capsys)
    assert code == 2 and "foo" in err and err.count("\n") == 1
    key = "max_new_tokns=3" if which == "evaluate" else "alpah=1"
    code, _, err = _cli_run(main, [key], capsys)
    assert code == 2 and "did you mean" in err
    cfg = os.path.join(ROOT, "configs", "eval.yaml" if which == "evaluate" else "ablate.yaml")
    code, _, err = _cli_run(main, [cfg], capsys)  # the default run is missing
    assert code == 2 and "runs/default" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "runs" / "default")


def test_evaluate_cli_names_bad_user_jsonl(tmp_path, capsys):
    from ramjax import cli

    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"prompt": "a", "response": "b", "reference": "b"}\n{"prompt": "a", \n')
    code, _, err = _cli_run(cli.eval_main, ["systems=[]", f"eval_file={bad}", "verifier=exact",
                                            f"run_dir={tmp_path}/ev"], capsys)
    assert code == 2 and "mine.jsonl:2" in err
    bad.write_text('{"prompt": "a", "response": "b", "reference": "b"}\n{"prompt": "a", "response": "b"}\n')
    code, _, err = _cli_run(cli.eval_main, ["systems=[]", f"eval_file={bad}", "verifier=exact",
                                            f"run_dir={tmp_path}/ev"], capsys)
    assert code == 2 and "reference" in err and err.count("\n") == 1


@pytest.mark.parametrize("template,words", [
    ("{% include 'other.jinja' %}", "cannot load other templates"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "range()"),
    ("{% for i in range(100000) %}{% for m in messages %}{{ m.content * 100 }}{% endfor %}{% endfor %}",
     "exceeds"),
    ("{{ 'a' * 1000000000 }}", "'*'"),
])
def test_chat_template_include_and_runaway_rendering_are_named(tmp_path, template, words):
    import time

    import tokenizer_fixtures

    from ramjax import tokenizer as tok_lib

    d = tmp_path / "tok"
    tokenizer_fixtures.make_hf_tokenizer(d, kind="qwen")
    (d / tok_lib.CHAT_TEMPLATE_FILE).write_text(template)
    tok = tok_lib.load_tokenizer(str(d))
    t0 = time.monotonic()
    with pytest.raises(tok_lib.ChatTemplateError, match="chat template 'default' of the tokenizer from") as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert words in str(e.value) and time.monotonic() - t0 < tok_lib.TEMPLATE_MAX_SECONDS


# ------------------------------------------------------------------------------------------------------------
# Non-finite training, token ids, context length


def _all_finite(tree):
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_diverging_run_stops_with_a_named_error_and_saves_no_nan(fx, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    code, err = _train_cli(overrides(fx, run_dir, "optimizer.lr=1e30", "optimizer.clip_norm=0"), capsys)
    assert code == 2 and "NonFiniteTrainingError" in err and "step 2" in err and "optimizer.nonfinite=skip" in err
    assert not os.path.exists(os.path.join(run_dir, "model"))
    mngr = ckpt_lib.CheckpointManager(os.path.join(run_dir, "checkpoints"))
    assert mngr.all_steps() == [1]  # the diverged step 2 was never saved
    stored = mngr.stored_param_shapes(1)
    import orbax.checkpoint as ocp

    params = ocp.StandardCheckpointer().restore(os.path.join(run_dir, "checkpoints", "1", "params"))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(stored) and _all_finite(params)


def test_skip_mode_drops_non_finite_updates_up_to_the_limit(fx, tmp_path):
    run_dir = str(tmp_path / "run")
    over = overrides(fx, run_dir, "optimizer.lr=1e30", "optimizer.clip_norm=0", "optimizer.nonfinite=skip",
                     "optimizer.max_skipped_steps=5")
    r = train_lib.train(_cfg(over))  # steps 2..6 diverge: 5 skipped, the limit
    assert r.step == 6 and r.metrics["train/skipped_steps"] == 5
    # the logged rate is the one the optimizer used: one update applied, so steps 2..6 all report the schedule at
    # update 1 (linear decay over 6 steps after 1 warm-up step), not at steps 2..6
    sched = train_lib.make_schedule(1e30, 6, 1, "linear", 0.0)
    want = [float(np.float32(sched(0)))] + [float(np.float32(sched(1)))] * 5
    assert [r["train/lr"] for r in metrics_lib.read_metrics(run_dir)] == want
    _, exported = ckpt_lib.load_model_dir(os.path.join(run_dir, "model"))
    assert _all_finite(exported)
    with pytest.raises(train_lib.NonFiniteTrainingError, match="more than optimizer.max_skipped_steps=4"):
        train_lib.train(_cfg(overrides(fx, str(tmp_path / "run2"), "optimizer.lr=1e30", "optimizer.clip_norm=0",
                                       "optimizer.nonfinite=skip", "optimizer.max_skipped_steps=4")))


def test_skipped_step_limit_counts_across_resumes(fx, tmp_path):
    """optimizer.max_skipped_steps bounds the whole run, not each invocation: a diverging run (steps 2.. are
    non-finite) interrupted by SIGTERM after step 3 has skipped 2; resumed, its third skip is allowed and the fourth
    (step 5) stops it with the run's total, where a counter restarting at 0 would let it finish with 5 skipped."""
    import signal

    run_dir = str(tmp_path / "run")
    over = overrides(fx, run_dir, "optimizer.lr=1e30", "optimizer.clip_norm=0", "optimizer.nonfinite=skip",
                     "optimizer.max_skipped_steps=3")

    def term_at_3(event):
        if event["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    r = train_lib.train(_cfg(over), progress=term_at_3)
    assert r.interrupted and r.step == 3 and r.metrics["train/skipped_steps"] == 2
    with pytest.raises(train_lib.NonFiniteTrainingError, match=r"step 5 .*4 non-finite steps skipped, more than "
                                                              r"optimizer.max_skipped_steps=3"):
        train_lib.train(_cfg(over))
    logged = {r["step"]: r["train/skipped_steps"] for r in metrics_lib.read_metrics(run_dir)}
    assert logged == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}  # one count across the two invocations
    assert not os.path.exists(os.path.join(run_dir, "model"))
    assert ckpt_lib.CheckpointManager(os.path.join(run_dir, "checkpoints")).latest_step() == 4


@pytest.mark.parametrize("bad_id", [99999, -5])
def test_out_of_vocabulary_proposal_token_ids_name_file_and_line(fx, tmp_path, capsys, bad_id):
    from ramjax import data as data_lib

    f = tmp_path / "ram.jsonl"
    rows = [json.loads(line) for line in open(f"{fx}/ram.jsonl")]
    rows[2]["proposal_token_ids"] = [5, 6, bad_id]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data_lib.DataError, match=rf"ram.jsonl:3: field 'proposal_token_ids' .*{bad_id}"):
        train_lib.train(_cfg(overrides(fx, str(tmp_path / "run"), f"data.train_files=[{f}]")))
    assert not os.path.exists(tmp_path / "run")
    code, err = _train_cli(overrides(fx, str(tmp_path / "run"), f"data.train_files=[{f}]"), capsys)
    assert code == 2 and "DataError" in err and "ram.jsonl:3" in err and str(bad_id) in err
    assert not os.path.exists(tmp_path / "run")


def test_rows_longer_than_the_loaded_models_context_are_refused(fx, tmp_path, capsys):
    code, err = _train_cli(overrides(fx, str(tmp_path / "run"), "data.max_len=128", "data.max_prompt_len=100"), capsys)
    assert code == 2 and "TrainConfigError" in err and "data.max_len=128 exceeds" in err
    assert "max_position_embeddings=64" in err and not os.path.exists(tmp_path / "run")


def test_disk_full_while_checkpointing_is_named_and_resume_stays_exact(fx, straight, tmp_path, monkeypatch, capsys):
    """orbax surfaces a full disk as tensorstore's RESOURCE_EXHAUSTED: a named StorageError (exit 2); the rerun
    resumes from the last committed checkpoint, bit-identical to the uninterrupted run."""
    import orbax.checkpoint as ocp

    run_dir = str(tmp_path / "run")
    real_save = ocp.CheckpointManager.save

    def full_at_4(self, step, *a, **k):
        if step == 4:
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"d/abc\": No space left on device [28]")
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_4)
    code, err = _train_cli(overrides(fx, run_dir), capsys)
    assert code == 2 and "StorageError" in err and "disk is full" in err and "resumes from its last" in err
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    assert ckpt_lib.CheckpointManager(os.path.join(run_dir, "checkpoints")).all_steps() == [1, 2, 3]
    train_lib.train(_cfg(overrides(fx, run_dir)))
    assert_same_run(run_dir, straight)
