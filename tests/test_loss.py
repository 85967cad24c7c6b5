"""Objectives against hand computations: RAM (padded and packed rows, finite-difference gradient), DPO, SFT."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ramjax import loss as loss_lib
from ramjax import model as model_lib
from ramjax import stages

CFG = model_lib.ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8)

# Two examples (prompt ids, response ids incl. EOS=1) for data and negative responses.
DATA = [([5, 6, 7], [8, 9, 1]), ([10, 11], [12, 13, 14, 1])]
NEG = [([5, 6, 7], [20, 1]), ([10, 11], [21, 22, 23, 24, 1])]
T = 10


def random_params(cfg, seed=0):
    """Random N(0, 0.02²) parameters of ``cfg``'s shapes (jitting flax's init is slow to compile on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype),
                                  model_lib.param_shapes(cfg))


def _row(examples):
    """Packs ``examples`` (list of (prompt, response)) into one row of length T; returns the five arrays."""
    tok, tgt, mask, seg = [], [], [], []
    for s, (p, r) in enumerate(examples, start=1):
        ids = p + r
        tok += ids[:-1]
        tgt += ids[1:]
        mask += [0] * (len(p) - 1) + [1] * len(r)
        seg += [s] * (len(ids) - 1)
    pad = T - len(tok)
    assert pad >= 0
    tok, tgt, mask, seg = (np.array(x + [0] * pad, np.int32) for x in (tok, tgt, mask, seg))
    pos = np.asarray(model_lib.positions_from_segments(jnp.asarray(seg[None])))[0]
    return tok, tgt, mask, seg, pos


def _batch(rows_of_examples, prefix=""):
    rows = [_row(ex) for ex in rows_of_examples]
    names = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    return {prefix + n: np.stack([r[i] for r in rows]) for i, n in enumerate(names)}


def _np_logsoftmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


_fwd = jax.jit(lambda p, t, s: model_lib.forward(CFG, p, t, segment_ids=s)[0])
_fwd_packed = jax.jit(lambda p, t, pos, s: model_lib.forward(CFG, p, t, pos, s)[0])


def _hand_seq_logprob(params, prompt, response):
    """log Q(response | prompt) by a forward over the example alone (trailing padding is invisible to it under
    the causal mask) and a float64 numpy log-softmax."""
    ids = np.array(prompt + response, np.int32)
    n = len(ids) - 1
    tok = np.zeros((1, T), np.int32)
    tok[0, :n] = ids[:-1]
    logits = _fwd(params, jnp.asarray(tok), jnp.asarray((np.arange(T) < n)[None].astype(np.int32)))
    lp = _np_logsoftmax(np.asarray(logits[0, :n], np.float64))
    start = len(prompt) - 1  # position predicting the first response token
    return float(sum(lp[start + i, tok] for i, tok in enumerate(response)))


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@functools.partial(jax.jit, static_argnums=2)
def _ram_loss(params, batch, alpha):
    obj = loss_lib.ram_objective(alpha)
    fwd = stages.model_forward(CFG)
    l, m = obj.loss(lambda lm: fwd(params, None, lm), batch, obj.normalizers(batch), None)
    return l, m


@pytest.mark.parametrize("packed", [False, True])
def test_ram_loss_matches_hand_computation(params, packed):
    alpha = 0.3
    if packed:  # both examples in one row, plus a padding row with nothing to learn
        b = {**_batch([DATA, []], "chosen_"), **_batch([NEG, []], "rejected_")}
    else:
        b = {**_batch([[e] for e in DATA], "chosen_"), **_batch([[e] for e in NEG], "rejected_")}
    l, m = _ram_loss(params, {k: jnp.asarray(v) for k, v in b.items()}, alpha)
    lq_d = np.array([_hand_seq_logprob(params, p, r) for p, r in DATA])
    lq_n = np.array([_hand_seq_logprob(params, p, r) for p, r in NEG])
    want = np.mean(-lq_d + alpha * lq_n)
    np.testing.assert_allclose(float(l), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["nll_data"]), -lq_d.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["logq_neg"]), lq_n.mean(), rtol=1e-5)


def test_ram_gradient_matches_finite_differences(params):
    b = {**_batch([[e] for e in DATA], "chosen_"), **_batch([[e] for e in NEG], "rejected_")}
    b = {k: jnp.asarray(v) for k, v in b.items()}
    f = lambda p: _ram_loss(p, b, 0.5)[0]  # noqa: E731
    g = jax.jit(jax.grad(f))(params)
    rng = np.random.default_rng(1)
    g_dir = jax.tree_util.tree_map(np.asarray, g)  # the steepest direction, then two random ones
    for i in range(3):
        d = g_dir if i == 0 else jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        norm = np.sqrt(sum(np.sum(x * x) for x in jax.tree_util.tree_leaves(d)))
        d = jax.tree_util.tree_map(lambda x: jnp.asarray(x / norm), d)
        eps = 1e-2
        plus = f(jax.tree_util.tree_map(lambda p, v: p + eps * v, params, d))
        minus = f(jax.tree_util.tree_map(lambda p, v: p - eps * v, params, d))
        fd = float(plus - minus) / (2 * eps)
        an = float(sum(jnp.sum(a * v) for a, v in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(d))))
        assert abs(fd - an) <= 5e-3 * abs(an) + 2e-4, (fd, an)


def test_sequence_logprobs_per_segment(params):
    b = _batch([DATA, [NEG[0]]])
    logits = _fwd_packed(params, b["tokens"], b["positions"], b["segment_ids"])
    per_seg = np.asarray(loss_lib.sequence_logprobs(logits, b["targets"], b["loss_mask"], b["segment_ids"],
                                                    max_segments=3))
    want = [[_hand_seq_logprob(params, *DATA[0]), _hand_seq_logprob(params, *DATA[1]), 0.0],
            [_hand_seq_logprob(params, *NEG[0]), 0.0, 0.0]]
    np.testing.assert_allclose(per_seg, want, rtol=1e-5, atol=1e-6)
    rows = np.asarray(loss_lib.sequence_logprobs(logits, b["targets"], b["loss_mask"], b["segment_ids"]))
    np.testing.assert_allclose(rows, np.sum(want, axis=1), rtol=1e-5)
    assert float(loss_lib.count_examples(jnp.asarray(b["loss_mask"]), jnp.asarray(b["segment_ids"]))) == 3.0
    assert float(loss_lib.count_examples(jnp.asarray(b["loss_mask"]))) == 2.0


def test_sft_loss_is_token_mean(params):
    b = _batch([[DATA[0]], [DATA[1]]])
    logits = _fwd_packed(params, b["tokens"], b["positions"], b["segment_ids"])
    s, n = loss_lib.sft_loss(logits, b["targets"], b["loss_mask"], b["segment_ids"])
    lq = [_hand_seq_logprob(params, p, r) for p, r in DATA]
    assert float(n) == sum(len(r) for _, r in DATA)
    np.testing.assert_allclose(float(s), -sum(lq), rtol=1e-5)


def test_token_logprobs_vocab_limit():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 6)), jnp.float32)
    tgt = jnp.asarray([[1, 3]])
    got = np.asarray(loss_lib.token_logprobs(logits, tgt, vocab_limit=4))
    want = _np_logsoftmax(np.asarray(logits[..., :4], np.float64))
    np.testing.assert_allclose(got, [[want[0, 0, 1], want[0, 1, 3]]], rtol=1e-6)


def test_dpo_loss_matches_formula():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, size=6) for _ in range(4))
    valid = np.array([1, 1, 1, 1, 1, 0], np.float32)
    beta, ls = 0.1, 0.2
    s, n, m = loss_lib.dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)), beta, ls,
                                jnp.asarray(valid))
    h = beta * ((pc - pr) - (rc - rr))
    logsig = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    per = -(1 - ls) * logsig(h) - ls * logsig(-h)
    v = valid.astype(bool)
    assert float(n) == 5
    np.testing.assert_allclose(float(s), per[v].sum(), rtol=1e-5)
    rc_, rr_ = beta * (pc - rc), beta * (pr - rr)
    np.testing.assert_allclose(float(m["rewards/chosen"]), rc_[v].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/rejected"]), rr_[v].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/margins"]), (rc_ - rr_)[v].sum(), rtol=1e-5)
    assert float(m["rewards/accuracies"]) == float((rc_ > rr_)[v].sum())
    np.testing.assert_allclose(float(m["logps/chosen"]), pc[v].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(m["logps/rejected"]), pr[v].sum(), rtol=1e-5)


@pytest.mark.parametrize("alpha", [-1e-4, float("nan"), float("inf")])
def test_alpha_validated(alpha):
    with pytest.raises(loss_lib.LossConfigError, match="alpha"):
        loss_lib.validate_alpha(alpha)


def test_dpo_params_validated():
    with pytest.raises(loss_lib.LossConfigError, match="beta"):
        loss_lib.validate_dpo(0.0, 0.0)
    with pytest.raises(loss_lib.LossConfigError, match="label_smoothing"):
        loss_lib.validate_dpo(0.1, 0.5)
