"""The decoder against itself: KV-cache decoding, left-padded ragged prompts, packed segments, padding isolation,
bf16 compute, rematerialisation, and positions_from_segments. (Parity with transformers is in test_hf.py.)"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import random_params, random_tokens

from ramjax import model as model_lib
from ramjax.model import ModelConfig, RopeScaling

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, qkv_bias=True, rope_theta=500.0,
                  rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 16))
forward = jax.jit(model_lib.forward, static_argnums=0, static_argnames=("last_only",))


@pytest.fixture(scope="module")
def params():
    return jax.tree_util.tree_map(jnp.asarray, random_params(CFG, seed=0))


def test_kv_cache_decode_equals_full_forward(params):
    B, T = 2, 12
    tokens = jnp.asarray(random_tokens(0, B, T, CFG.vocab_size))
    full, none = forward(CFG, params, tokens)
    assert none is None and full.shape == (B, T, CFG.vocab_size) and full.dtype == jnp.float32
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.ones((B, 1), jnp.int32)
    cache = model_lib.init_cache(CFG, B, 16)
    steps = []
    for t in range(T):  # token by token
        out, cache = forward(CFG, params, tokens[:, t:t + 1], pos[:, t:t + 1], seg, cache)
        steps.append(out[:, 0])
    assert int(cache.index) == T
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=2e-5, rtol=0)
    # multi-token chunks written at non-zero cache offsets (equal sizes: one compile)
    cache = model_lib.init_cache(CFG, B, 16)
    outs = []
    for a, b in ((0, 4), (4, 8), (8, 12)):
        out, cache = forward(CFG, params, tokens[:, a:b], pos[:, a:b], jnp.ones((B, b - a), jnp.int32), cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=0)
    last, _ = forward(CFG, params, tokens, last_only=True)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-6, rtol=0)


def test_left_padded_ragged_prefill_then_decode(params):
    """Ragged prompts left-padded into one batch, prefilled, then decoded step by step, equal per-row forwards."""
    lens, P, steps = [5, 8, 3], 8, 4
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, CFG.vocab_size, n) for n in lens]
    new = rng.integers(0, CFG.vocab_size, (len(lens), steps))
    tokens = np.full((len(lens), P), 7, np.int32)  # pad id 7: any id; padding must not matter
    seg = np.zeros((len(lens), P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):], seg[i, P - len(p):] = p, 1
    pos = model_lib.positions_from_segments(jnp.asarray(seg))
    cache = model_lib.init_cache(CFG, len(lens), P + steps)
    pre, cache = forward(CFG, params, jnp.asarray(tokens), pos, jnp.asarray(seg), cache)
    dec = []
    for s in range(steps):
        step_pos = jnp.asarray([[n + s] for n in lens], jnp.int32)
        out, cache = forward(CFG, params, jnp.asarray(new[:, s:s + 1]), step_pos, jnp.ones((3, 1), jnp.int32), cache)
        dec.append(out[:, 0])
    # references: each row alone, unpadded; tokens appended after the end cannot matter under causal attention,
    # so the rows share one length (one compile)
    L = max(lens) + steps
    ref_tokens = np.zeros((len(lens), L), np.int32)
    for i, p in enumerate(prompts):
        ref_tokens[i, :len(p) + steps] = np.concatenate([p, new[i]])
    ref, _ = forward(CFG, params, jnp.asarray(ref_tokens))
    for i, n in enumerate(lens):
        np.testing.assert_allclose(pre[i, P - n:], ref[i, :n], atol=2e-5, rtol=0)
        np.testing.assert_allclose(np.stack([d[i] for d in dec]), ref[i, n:n + steps], atol=2e-5, rtol=0)


def test_packed_segments_equal_separate_forwards(params):
    rng = np.random.default_rng(2)
    rows = [[5, 4, 3], [9, 6]]  # segment lengths per row; the rest of the 16 slots is padding
    T = 16
    tokens = rng.integers(0, CFG.vocab_size, (2, T)).astype(np.int32)
    seg = np.zeros((2, T), np.int32)
    for r, lens in enumerate(rows):
        start = 0
        for k, n in enumerate(lens):
            seg[r, start:start + n] = k + 1
            start += n
    pos = model_lib.positions_from_segments(jnp.asarray(seg))
    packed, _ = forward(CFG, params, jnp.asarray(tokens), pos, jnp.asarray(seg))
    pieces = [(r, s, n) for r, lens in enumerate(rows) for s, n in zip(np.cumsum([0] + lens[:-1]), lens)]
    alone = np.zeros((len(pieces), 9), np.int32)  # each segment alone, right-filled (causal: harmless)
    for k, (r, s, n) in enumerate(pieces):
        alone[k, :n] = tokens[r, s:s + n]
    ref, _ = forward(CFG, params, jnp.asarray(alone))
    for k, (r, s, n) in enumerate(pieces):
        np.testing.assert_allclose(packed[r, s:s + n], ref[k, :n], atol=2e-5, rtol=0)


def test_padding_never_leaks(params):
    """Changing the ids of padding tokens (segment 0, anywhere in the row) changes no real-token logit, with or
    without a cache; padding rows stay finite (they attend to padding, never to an empty set)."""
    rng = np.random.default_rng(3)
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 2, 2, 2, 0],
                    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
    tokens = rng.integers(0, CFG.vocab_size, seg.shape).astype(np.int32)
    other = np.where(seg == 0, rng.integers(0, CFG.vocab_size, seg.shape), tokens).astype(np.int32)
    assert (other != tokens).any()
    pos = model_lib.positions_from_segments(jnp.asarray(seg))
    real = seg > 0
    a, _ = forward(CFG, params, jnp.asarray(tokens), pos, jnp.asarray(seg))
    b, _ = forward(CFG, params, jnp.asarray(other), pos, jnp.asarray(seg))
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(np.asarray(a)[real], np.asarray(b)[real])
    assert not np.allclose(np.asarray(a)[~real], np.asarray(b)[~real])  # the pad ids did change something
    cache = model_lib.init_cache(CFG, 3, 12)
    ca, cache_a = forward(CFG, params, jnp.asarray(tokens), pos, jnp.asarray(seg), cache)
    cb, cache_b = forward(CFG, params, jnp.asarray(other), pos, jnp.asarray(seg), cache)
    np.testing.assert_array_equal(np.asarray(ca)[real], np.asarray(cb)[real])
    step = (jnp.asarray([[5], [6], [7]]), jnp.asarray([[7], [4], [0]]), jnp.ones((3, 1), jnp.int32))
    da, _ = forward(CFG, params, *step, cache_a)
    db, _ = forward(CFG, params, *step, cache_b)
    np.testing.assert_array_equal(np.asarray(da), np.asarray(db))


def _kl(p_logits, q_logits):
    lp, lq = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
    return float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))


def test_bfloat16_compute_close_to_float32(params):
    tokens = jnp.asarray(random_tokens(4, 2, 16, CFG.vocab_size))
    ref, _ = forward(CFG, params, tokens)
    cfg_bf = CFG.replace(dtype="bfloat16")
    out, _ = forward(cfg_bf, params, tokens)
    assert out.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    assert 0 < float(jnp.abs(out - ref).max()) < 0.15 and _kl(ref, out) < 2e-3
    cfg_all = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    p_bf = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, s: x.dtype == s.dtype, p_bf,
                                                         model_lib.param_shapes(cfg_all)))
    out2, cache = forward(cfg_all, p_bf, tokens, cache=model_lib.init_cache(cfg_all, 2, 16))
    assert out2.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16
    assert _kl(ref, out2) < 5e-3


def test_remat_same_logits_and_grads(params):
    cfg_r = CFG.replace(remat=True)
    assert jax.tree_util.tree_structure(model_lib.param_shapes(cfg_r)) == jax.tree_util.tree_structure(params)
    tokens = jnp.asarray(random_tokens(5, 2, 10, CFG.vocab_size))

    def loss(p, cfg):
        logits, _ = model_lib.forward(cfg, p, tokens)
        lp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

    vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l0, g0), (l1, g1) = vg(params, CFG), vg(params, cfg_r)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g0, g1)
    assert float(jnp.abs(g0["layers"]["wq"]).max()) > 0


def test_positions_from_segments():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1], [3, 3, 1, 1, 3, 3, 0]])
    want = [[0, 1, 2, 0, 1, 0, 0], [0, 0, 0, 1, 2, 3, 4], [0, 1, 0, 1, 0, 1, 0]]
    got = model_lib.positions_from_segments(seg)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)


def test_transposed_tied_head_gives_the_tied_logits():
    """A tied model decoded with ``head_t`` (its embedding transposed, held by the sampler on CPU for a faster LM
    head) gives the scanned forward's tied logits, prefill and a step; ``with_transposed_head`` leaves an untied
    model's weights alone and the sampler's CPU decode weights of a tied model hold the copy."""
    from ramjax import decode_loop

    cfg = CFG.replace(tie_word_embeddings=True)
    params = jax.tree_util.tree_map(jnp.asarray, random_params(cfg, seed=1))
    assert "lm_head" not in params
    assert model_lib.with_transposed_head(CFG, {"embed": 1}) == {"embed": 1}
    pu = model_lib.with_transposed_head(cfg, model_lib.unstack_layers(params))
    np.testing.assert_array_equal(pu["head_t"], np.asarray(params["embed"]).T)
    tokens = jnp.asarray(random_tokens(2, 2, 6, cfg.vocab_size))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    seg = jnp.ones((2, 6), jnp.int32)
    dec = jax.jit(model_lib.decode_forward, static_argnums=0)
    ref, c_ref = forward(cfg, params, tokens, pos, seg, model_lib.init_cache(cfg, 2, 8), last_only=True)
    got, c_got = dec(cfg, pu, tokens, pos, seg, model_lib.init_layer_cache(cfg, 2, 8))
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
    t, p, one = tokens[:, :1], jnp.full((2, 1), 6, jnp.int32), jnp.ones((2, 1), jnp.int32)
    ref, _ = forward(cfg, params, t, p, one, c_ref, last_only=True)
    got, _ = dec(cfg, pu, t, p, one, c_got)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
    assert float(jnp.abs(ref).max()) > 0.1  # the head is not trivially zero

    model = types.SimpleNamespace(config=cfg, params=params)  # what _decode_weights reads of a loaded model
    _, dw = decode_loop._decode_weights(model, None, (), None)
    assert jax.devices()[0].platform != "cpu" or "head_t" in dw


def test_per_layer_decode_equals_scanned_forward(params):
    """decode_forward (unrolled layers over per-layer weights and a LayerKVCache, the sampler's decode path) gives
    the scanned forward's logits on left-padded ragged prompts, then token by token; also in bf16 decode weights,
    within the bf16 tolerance of float32."""
    lens, P, steps = [5, 8, 3], 8, 4
    rng = np.random.default_rng(3)
    tokens = np.full((len(lens), P), 7, np.int32)
    seg = np.zeros((len(lens), P), np.int32)
    for i, n in enumerate(lens):
        tokens[i, P - n:], seg[i, P - n:] = rng.integers(0, CFG.vocab_size, n), 1
    new = rng.integers(0, CFG.vocab_size, (len(lens), steps)).astype(np.int32)
    pos = model_lib.positions_from_segments(jnp.asarray(seg))
    pu = model_lib.unstack_layers(params)
    assert len(pu["layers"]) == CFG.num_layers
    assert jax.tree_util.tree_structure(pu) == jax.tree_util.tree_structure(model_lib.unstacked_param_shapes(CFG))
    dec = jax.jit(model_lib.decode_forward, static_argnums=0)
    cfg_bf = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    pu_bf = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), pu)
    ref, c_ref = forward(CFG, params, jnp.asarray(tokens), pos, jnp.asarray(seg), model_lib.init_cache(CFG, 3, 12),
                         last_only=True)
    got, c_got = dec(CFG, pu, jnp.asarray(tokens), pos, jnp.asarray(seg), model_lib.init_layer_cache(CFG, 3, 12))
    bf, c_bf = dec(cfg_bf, pu_bf, jnp.asarray(tokens), pos, jnp.asarray(seg), model_lib.init_layer_cache(cfg_bf, 3, 12))
    outs = [(ref, got, bf)]
    for s in range(steps):
        t = jnp.asarray(new[:, s:s + 1])
        p = jnp.asarray(np.array(lens)[:, None] + s, jnp.int32)
        one = jnp.ones_like(t)
        ref, c_ref = forward(CFG, params, t, p, one, c_ref, last_only=True)
        got, c_got = dec(CFG, pu, t, p, one, c_got)
        bf, c_bf = dec(cfg_bf, pu_bf, t, p, one, c_bf)
        outs.append((ref, got, bf))
    assert int(c_got.index) == P + steps and c_bf.k[0].dtype == jnp.bfloat16
    for r, g, b in outs:
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=0)
        assert b.dtype == jnp.float32 and 0 < float(jnp.abs(b - r).max()) < 0.15 and _kl(r[:, 0], b[:, 0]) < 5e-3
    np.testing.assert_allclose(np.stack(c_got.k), c_ref.k, atol=2e-5, rtol=0)
