"""Hub ids in ``load_model``: resolved offline from a Hugging Face cache that the test fills by hand (the
``models--org--name/{refs,snapshots}`` layout), never from the network."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import ramjax
from ramjax import hf, hub
from ramjax import model as model_lib

pytest.importorskip("huggingface_hub")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKENS = [[1, 5, 9, 2, 7]]

# Runs in a fresh interpreter so that HF_HUB_CACHE / HF_HUB_OFFLINE are read by huggingface_hub at import, as a
# user's environment would set them.
CHILD = """
import json, sys
import numpy as np
import ramjax
out = {}
for name in ("org/tiny", "org/tiny@COMMIT"):
    m = ramjax.load_model(name)
    out[name] = {"source": m.source, "logits": np.asarray(ramjax.logits(m, TOKENS)).tolist()}
try:
    ramjax.load_model("org/not-cached")
except FileNotFoundError as e:
    out["error"] = str(e)
print(json.dumps(out))
""".replace("COMMIT", COMMIT).replace("TOKENS", repr(TOKENS))


def test_hub_id_resolves_offline_from_a_prefilled_cache(tmp_path):
    cfg = model_lib.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=8)
    params = model_lib.init_params(cfg, jax.random.key(0))
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / COMMIT
    hf.save_hf(snap, cfg, params)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(COMMIT)
    want = np.asarray(ramjax.logits(ramjax.load_model(str(snap)), TOKENS))

    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("org/tiny", f"org/tiny@{COMMIT}"):
        assert os.path.realpath(out[name]["source"]) == os.path.realpath(snap)
        np.testing.assert_allclose(np.asarray(out[name]["logits"]), want, rtol=1e-6, atol=1e-6)
    assert "'org/not-cached'" in out["error"] and "HF_HUB_OFFLINE=1" in out["error"] and str(cache) in out["error"]


def test_local_paths_and_missing_package(tmp_path, monkeypatch):
    assert hub.resolve_model_path(tmp_path) == str(tmp_path)  # a directory is used as is, even if named a/b
    with pytest.raises(FileNotFoundError, match=r"'runs/x/model' is not a directory"):
        hub.resolve_model_path("runs/x/model")  # three parts: a missing local path, not a Hub id
    assert hub.is_hub_id("Qwen/Qwen2.5-0.5B") and hub.is_hub_id("org/name@v1.0")
    assert not hub.is_hub_id("../name") and not hub.is_hub_id("/abs/path") and not hub.is_hub_id("name")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install huggingface_hub"):
        ramjax.load_model("org/name")
