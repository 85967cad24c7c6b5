"""Orbax training checkpoints and ramjax model directories."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ramjax import checkpoint as ckpt
from ramjax import model as model_lib
from ramjax import sharding as shd
from ramjax import train_lib

sys.path.insert(0, os.path.dirname(__file__))
import tokenizer_fixtures  # noqa: E402

CFG = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, eos_token_id=(1, 2), rope_scaling=model_lib.RopeScaling())


def random_params(cfg, seed=0):
    """Random N(0, 0.02²) parameters of ``cfg``'s shapes (jitting flax's init is slow to compile on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype),
                                  model_lib.param_shapes(cfg))


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


def _assert_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_model_dir_round_trip(tmp_path, params):
    tok_dir = tmp_path / "tok"
    tokenizer_fixtures.make_hf_tokenizer(tok_dir, kind="llama")
    out = ckpt.save_model_dir(tmp_path / "m", CFG, params, tokenizer=str(tok_dir))
    assert os.path.isfile(os.path.join(out, "ramjax_model.json")) and not os.path.exists(out + ".tmp")
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    cfg2, p2 = ckpt.load_model_dir(out)
    assert cfg2 == CFG
    _assert_equal(p2, params)
    # onto a mesh: every parameter lands on its sharding
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    _, p3 = ckpt.load_model_dir(out, mesh=mesh)
    want = model_lib.param_shardings(CFG, mesh)
    for x, s in zip(jax.tree_util.tree_leaves(p3), jax.tree_util.tree_leaves(want)):
        assert x.sharding.spec == s.spec
    _assert_equal(p3, params)
    # dtype overrides cast on restore
    cfg4, p4 = ckpt.load_model_dir(out, dtype="bfloat16", param_dtype="bfloat16")
    assert cfg4.dtype == "bfloat16" and p4["embed"].dtype == jnp.bfloat16


def test_load_model_dispatches_to_model_dir(tmp_path, params):
    from ramjax import api

    tok_dir = tmp_path / "tok"
    tokenizer_fixtures.make_hf_tokenizer(tok_dir, kind="llama")
    ckpt.save_model_dir(tmp_path / "m", CFG, params, tokenizer=str(tok_dir))
    m = api.load_model(tmp_path / "m")
    assert m.config == CFG and m.tokenizer is not None
    _assert_equal(m.params, params)


def test_model_dir_of_another_shape_is_named_error(tmp_path, params):
    out = ckpt.save_model_dir(tmp_path / "m", CFG, params)
    with open(os.path.join(out, "ramjax_model.json")) as f:
        meta = json.load(f)
    meta["config"]["hidden_size"] = 48
    with open(os.path.join(out, "ramjax_model.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"embed.*\(64, 32\).*\(64, 48\)"):
        ckpt.load_model_dir(out)
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.load_model_dir(tmp_path / "nothing")


def _train_tree(params, step):
    opt = train_lib.make_optimizer("adamw", lambda n: 1e-3)
    return {"step": jnp.asarray(step, jnp.int32), "rng": jax.random.key_data(jax.random.key(step)),
            "opt_state": opt.init(params)}


def test_manager_saves_every_n_keeps_k_and_restores(tmp_path, params):
    m = ckpt.CheckpointManager(tmp_path / "ck", save_every=2, keep=2)
    for step in range(1, 8):
        m.save(step, params, _train_tree(params, step), {"epoch": 0, "position": step})
    assert m.save(7, params, _train_tree(params, 7), {"epoch": 0, "position": 7}, force=True) is True
    m.wait()
    assert m.all_steps() == [6, 7] and m.latest_step() == 7
    m.close()
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    p_sh = model_lib.param_shardings(CFG, mesh)
    tr = _train_tree(params, 0)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tr_abs = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
              "opt_state": ckpt.abstract_tree(jax.eval_shape(lambda: tr["opt_state"]),
                                              train_lib.opt_state_shardings(tr["opt_state"], p_sh, mesh))}
    m2 = ckpt.CheckpointManager(tmp_path / "ck", save_every=2, keep=2)
    p, t, d = m2.restore(None, ckpt.abstract_tree(model_lib.param_shapes(CFG), p_sh), tr_abs)
    assert d == {"epoch": 0, "position": 7} and int(t["step"]) == 7
    np.testing.assert_array_equal(np.asarray(t["rng"]), np.asarray(jax.random.key_data(jax.random.key(7))))
    _assert_equal(p, params)
    assert p["layers"]["wq"].sharding.spec == p_sh["layers"]["wq"].spec


def test_manager_restore_of_another_shape_lists_params(tmp_path, params):
    m = ckpt.CheckpointManager(tmp_path / "ck", save_every=1)
    m.save(1, params, _train_tree(params, 1), {})
    m.close()
    other = CFG.replace(intermediate_size=96, num_layers=3)
    m2 = ckpt.CheckpointManager(tmp_path / "ck")
    with pytest.raises(ckpt.CheckpointMismatchError) as e:
        m2.restore(1, ckpt.abstract_tree(model_lib.param_shapes(other)), {})
    msg = str(e.value)
    assert "layers/w_up" in msg and "layers/w_gate" in msg and "(3, 32, 96)" in msg
