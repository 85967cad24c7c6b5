"""Run directories on any ``etils.epath`` path: ``gs://`` is served here by an in-memory fsspec file system (no
network), so the writers and readers are exercised through epath exactly as on Cloud Storage (whole-object
writes, no appends, no local absolute paths)."""
import json
import os
import sys

import numpy as np
import pytest

from ramjax import checkpoint as ckpt_lib
from ramjax import files
from ramjax import metrics as metrics_lib


@pytest.fixture
def fake_gcs():
    """``gs://`` → a fresh in-memory file system for the test."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}
        pseudo_dirs = [""]

        def __init__(self, *args, **kwargs):  # epath passes gcsfs options (finalize_on_close=...)
            super().__init__()

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for p in ("gs://", "gcs://"):
                if path.startswith(p):
                    path = path[len(p):]
            return MemoryFileSystem._strip_protocol(path)

    old = {name: fsspec.registry.get(name) for name in ("gs", "gcs")}
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    fsspec.config.conf.pop("gs", None)
    FakeGCS.store, FakeGCS.pseudo_dirs = {}, [""]
    FakeGCS.clear_instance_cache()
    yield FakeGCS
    for name, cls in old.items():
        if cls is not None:
            fsspec.register_implementation(name, cls, clobber=True)
        else:
            sys.modules["fsspec.registry"]._registry.pop(name, None)  # back to the lazy gcsfs entry


def test_atomic_files_and_jsonl_on_gs(fake_gcs, tmp_path):
    base = "gs://bucket/runs/a"
    assert files.is_remote(base) and not files.is_remote(tmp_path)
    files.atomic_write_json(f"{base}/meta.json", {"step": 3, "text": "é"})
    assert json.loads(files.epath_of(f"{base}/meta.json").read_text()) == {"step": 3, "text": "é"}
    files.atomic_write_jsonl(f"{base}/x.jsonl", [{"a": 1}, {"a": 2}])
    assert files.read_jsonl(f"{base}/x.jsonl") == [{"a": 1}, {"a": 2}]
    with files.atomic_writer(f"{base}/t.npy", binary=True) as f:
        np.save(f, np.arange(4))
    with files.epath_of(f"{base}/t.npy").open("rb") as f:
        np.testing.assert_array_equal(np.load(f), np.arange(4))
    # a failing write leaves nothing behind
    with pytest.raises(RuntimeError), files.atomic_writer(f"{base}/never.json") as f:
        f.write("{")
        raise RuntimeError("boom")
    assert not files.epath_of(f"{base}/never.json").exists()
    # nothing went to a local directory named "gs:"
    assert not os.path.exists("gs:") and not os.path.exists(os.path.join(os.getcwd(), "gs:"))
    with pytest.raises(files.JSONLError, match="does not exist"):
        files.read_jsonl(f"{base}/missing.jsonl")


def test_metrics_writer_on_gs_rewrites_whole_objects_and_truncates_on_resume(fake_gcs):
    run = "gs://bucket/runs/m"
    w = metrics_lib.MetricsWriter(run, tensorboard=False)
    for step in (1, 2, 3):
        w.write(step, {"train/loss": 1.0 / step})
    w.close()
    assert [r["step"] for r in metrics_lib.read_metrics(run)] == [1, 2, 3]
    w = metrics_lib.MetricsWriter(run, tensorboard=False)  # a resumed run from the checkpoint at step 2
    w.truncate_after(2)
    w.write(3, {"train/loss": 0.3})
    w.write(4, {"train/loss": 0.25})
    w.close()
    got = metrics_lib.read_metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4] and got[2]["train/loss"] == 0.3


def test_model_dir_json_and_tokenizer_on_gs(fake_gcs, tmp_path):
    """The parts of a model directory that go through epath (the config JSON, tokenizer files, directory
    checks); the arrays themselves go through orbax/tensorstore, whose gs:// driver talks to Cloud Storage."""
    from ramjax.model import ModelConfig

    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    d = files.epath_of("gs://bucket/models/m")
    d.mkdir(parents=True)
    (d / ckpt_lib.MODEL_JSON).write_text(json.dumps({"format_version": 1, "config": ckpt_lib.config_to_dict(cfg)}))
    assert ckpt_lib.is_model_dir("gs://bucket/models/m") and not ckpt_lib.is_model_dir("gs://bucket/models/x")
    assert ckpt_lib.read_model_config("gs://bucket/models/m") == cfg
    with pytest.raises(ckpt_lib.CheckpointNotFoundError, match="no params"):
        ckpt_lib.load_model_dir("gs://bucket/models/m")
    # URIs are never turned into local absolute paths (they were: /cwd/gs:/bucket/...)
    assert ckpt_lib._resolve("gs://bucket/runs/r/checkpoints") == "gs://bucket/runs/r/checkpoints"
    assert ckpt_lib._resolve("rel/dir") == os.path.abspath("rel/dir")


def test_checkpoints_and_model_dirs_on_a_local_path_still_work(tmp_path):
    import jax.numpy as jnp

    mngr = ckpt_lib.CheckpointManager(tmp_path / "ckpt", save_every=1, keep=2, async_save=True)
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    train = {"step": jnp.asarray(1), "rng": jnp.zeros((2,), jnp.uint32), "opt_state": {"m": jnp.ones((2, 3))}}
    assert mngr.save(1, params, train, {"position": 5})
    mngr.wait()
    assert mngr.latest_step() == 1 and mngr.directory == os.path.abspath(tmp_path / "ckpt")
    mngr.close()


def test_local_staging_uploads_a_directory_tree(fake_gcs, tmp_path):
    with files.local_staging(tmp_path / "here") as d:  # local: the path itself
        assert d == str(tmp_path / "here")
    with files.local_staging("gs://bucket/export/hf") as d:
        os.makedirs(os.path.join(d, "sub"))
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write("{}")
        with open(os.path.join(d, "sub", "w.bin"), "wb") as f:
            f.write(b"\x00\x01")
    assert files.epath_of("gs://bucket/export/hf/config.json").read_text() == "{}"
    assert files.epath_of("gs://bucket/export/hf/sub/w.bin").read_bytes() == b"\x00\x01"
    with files.local_staging("gs://bucket/export/other", upload=False) as d:  # processes other than 0
        with open(os.path.join(d, "x"), "w") as f:
            f.write("x")
    assert not files.epath_of("gs://bucket/export/other").exists()
