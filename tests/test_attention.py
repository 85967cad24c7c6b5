"""Every ``attention_impl`` computes today's attention (the float32 einsum reference): values and parameter
gradients on packed + padded rows with grouped KV heads, prefill into a cache, under a mesh; cuDNN off-GPU is a named
error. Splash runs in the Pallas interpreter on CPU (the kernel itself, block sizes of 128)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ramjax import model as model_lib
from ramjax import sharding as shd
from ramjax.model import ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, qkv_bias=True)


def _batch(B: int, T: int, seed: int = 0):
    """Packed and padded rows: row 0 three segments, row 1 one segment then padding, row 2 (if any) full."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[0, T // 3:] = 2
    seg[0, 2 * T // 3:] = 3
    seg[1, T // 2:] = 0
    return jnp.asarray(tokens), model_lib.positions_from_segments(jnp.asarray(seg)), jnp.asarray(seg)


def _loss(cfg, params, tokens, pos, seg, mesh=None):
    logits, _ = model_lib.forward(cfg, params, tokens, pos, seg, mesh=mesh)
    w = jnp.cos(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)  # a generic linear functional
    return jnp.sum(logits * w * (seg > 0)[..., None]), logits


@pytest.fixture(scope="module")
def params():
    return model_lib.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def reference(params):
    return _value_and_grad(CFG, params, _batch(4, 12))


def _value_and_grad(cfg, params, batch, mesh=None):
    f = jax.jit(jax.value_and_grad(lambda p: _loss(cfg, p, *batch, mesh=mesh), has_aux=True))
    (_, logits), g = f(params)
    return logits, g


@pytest.mark.parametrize("impl,chunk", [("dot_product", 512), ("chunked", 5)])
def test_implementations_match_reference(params, reference, impl, chunk):
    """chunk 5 does not divide 12: the last block is padded."""
    ref_logits, ref_g = reference
    logits, g = _value_and_grad(CFG.replace(attention_impl=impl, attention_chunk=chunk), params, _batch(4, 12))
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=0)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def test_mask_changes_the_result(params):
    """The control: the comparison above can fail — dropping the packing mask (one segment per row) changes the
    chunked implementation's logits on the later segments by far more than the tolerance."""
    tokens, pos, seg = _batch(3, 12)
    packed, _ = model_lib.forward(CFG.replace(attention_impl="chunked", attention_chunk=5), params, tokens, pos, seg)
    merged, _ = model_lib.forward(CFG.replace(attention_impl="chunked", attention_chunk=5), params, tokens, pos,
                                  (seg > 0).astype(jnp.int32))
    assert float(jnp.max(jnp.abs(packed[0, 4:] - merged[0, 4:]))) > 1e-2


@pytest.mark.parametrize("impl", ["dot_product", "chunked"])
def test_prefill_into_cache_matches(params, impl):
    """Left-padded prompts prefilled into a cache at offset 0 and then a second block at offset 8."""
    B, T = 2, 8
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (B, 2 * T)), jnp.int32)
    seg = np.ones((B, 2 * T), np.int32)
    seg[1, :3] = 0  # row 1 left-padded
    seg = jnp.asarray(seg)
    pos = model_lib.positions_from_segments(seg)
    outs = {}
    for name, cfg in (("ref", CFG), (impl, CFG.replace(attention_impl=impl, attention_chunk=3))):
        cache = model_lib.init_cache(cfg, B, 2 * T)
        a, cache = model_lib.forward(cfg, params, tokens[:, :T], pos[:, :T], seg[:, :T], cache)
        b, cache = model_lib.forward(cfg, params, tokens[:, T:], pos[:, T:], seg[:, T:], cache)
        outs[name] = jnp.concatenate([a, b], 1)
    np.testing.assert_allclose(outs[impl], outs["ref"], atol=2e-5, rtol=0)


def test_chunked_under_mesh(params, reference):
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    ref_logits, ref_g = reference
    logits, g = _value_and_grad(CFG.replace(attention_impl="chunked", attention_chunk=4), params, _batch(4, 12),
                                mesh)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=0)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def test_chunked_scores_memory_is_smaller():
    """The compiled temporaries of a long-sequence forward+backward shrink with query chunks (the point of it)."""
    cfg = CFG.replace(num_layers=1)
    p = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
    B, T = 2, 1024
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def temp(c):
        f = jax.jit(jax.grad(lambda p, t: jnp.sum(model_lib.forward(c, p, t)[0][:, :, 0])))
        return f.lower(p, tokens).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp(cfg), temp(cfg.replace(attention_impl="chunked", attention_chunk=128))
    scores = B * cfg.num_heads * T * T * 4  # one float32 score matrix of the layer
    assert full > scores and chunked < full - scores // 2, (full, chunked, scores)


def test_cudnn_off_gpu_is_a_named_error(params):
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    tokens, pos, seg = _batch(2, 8)
    with pytest.raises(model_lib.AttentionImplError, match="NVIDIA GPU"):
        model_lib.forward(CFG.replace(attention_impl="cudnn"), params, tokens, pos, seg)


def test_splash_off_tpu_is_a_named_error(params):
    if jax.default_backend() == "tpu":
        pytest.skip("a TPU is present")
    tokens, pos, seg = _batch(2, 8)
    with pytest.raises(model_lib.AttentionImplError, match="TPU"):
        model_lib.forward(CFG.replace(attention_impl="splash"), params, tokens, pos, seg)


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match="attention_impl"):
        CFG.replace(attention_impl="flash")


@pytest.mark.slow  # ~30 s: the Pallas interpreter
def test_splash_kernel_matches_in_interpreter(params, monkeypatch):
    """The Pallas splash kernel itself (interpreted on CPU), forward and backward, packed + padded, GQA, sharded."""
    monkeypatch.setattr(model_lib, "_SPLASH_INTERPRET_OK", True)
    batch = _batch(2, 128)
    ref_logits, ref_g = _value_and_grad(CFG, params, batch)
    cfg = CFG.replace(attention_impl="splash", attention_chunk=128)
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    logits, g = _value_and_grad(cfg, params, batch, mesh)
    np.testing.assert_allclose(logits, ref_logits, atol=5e-5, rtol=0)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)
