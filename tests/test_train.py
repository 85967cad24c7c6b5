"""The train step (gradient accumulation, sharding, schedules) and the training loop (resume, signals, errors)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ramjax import model as model_lib
from ramjax import sharding as shd
from ramjax import train_lib

CFG = model_lib.ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8)


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
    return jax.device_get(jax.jit(model_lib.init_params, static_argnums=0)(CFG, jax.random.key(0)))


def _setup(mesh, grad_accum=1, opt="sgd", lr=0.1):
    sched = train_lib.make_schedule(lr, 10)
    optimizer = train_lib.make_optimizer(opt, sched, clip_norm=None, momentum=0.9)
    obj = train_lib.ram_objective(CFG, 0.1, mesh=mesh)
    p_sh = model_lib.param_shardings(CFG, mesh)
    params = shd.shard_tree(_params0(), p_sh)
    shapes = jax.eval_shape(lambda p: train_lib.init_state(p, optimizer, jax.random.key(1)), params)
    st_sh = train_lib.state_shardings(shapes, p_sh, mesh)
    state = jax.jit(lambda p: train_lib.init_state(p, optimizer, jax.random.key(1)), out_shardings=st_sh)(params)
    batch = _ram_batch()
    b_sh = train_lib.batch_shardings(batch, mesh)
    step = train_lib.jit_train_step(train_lib.make_train_step(obj, optimizer, grad_accum=grad_accum, schedule=sched,
                                                              mesh=mesh), st_sh, b_sh, None, mesh)
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
