"""Sampler correctness found in review: the stream's stop-string hold-back, the prompt's repetition-penalty set
built without conflicting writes, ``sparse`` = the authors' released rule under a repetition penalty (checked by
χ² against the rule written out independently in numpy), and non-finite weights/logits refused with named errors.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sampling_fixtures
from hf_fixtures import random_params
from sampling_fixtures import chi2_pvalue

from ramjax import api
from ramjax import decode_rules as R
from ramjax import model as model_lib
from ramjax import sampler as S
from ramjax.api import Model

V = 48
ROWS = 20000


# ----------------------------------------------------------------------------------------------------------------
# The repetition-penalty set of the prompt


def test_prompt_seen_set_keeps_a_pad_id_that_occurs_in_the_prompt():
    rng = np.random.default_rng(0)
    B, P, vocab = 16, 24, 12
    tokens = rng.integers(0, 4, (B, P)).astype(np.int32)  # few ids: the pad id 0 also occurs among real tokens
    seg = (rng.random((B, P)) < 0.5).astype(np.int32)
    tokens[seg == 0] = 0  # padding slots hold the pad id, interleaved with real ones (after them too)
    expected = np.zeros((B, vocab), bool)
    for b in range(B):
        expected[b, tokens[b][seg[b] > 0]] = True
    assert expected[:, 0].any()  # the case that matters: id 0 is both padding and a real token
    got = np.asarray(jax.jit(S.prompt_seen_set, static_argnums=2)(tokens, seg, vocab))
    np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------------------------------------------
# sparse = the released rule (ParKlLogitsWarper, then the aligner-side HF processors)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def released_sparse(zp, zq, seen, *, t_m, t_q, top_p_m, top_p_q, penalty, kl_threshold):
    """The authors' released sampling distribution over the vocabulary, written out from their code: the base
    (P_M) logits filtered by ``top_k_top_p_filtering(base, top_p_m, temperature=t_m)`` (sort descending, drop
    tokens once the cumulative tempered probability exceeds top_p, keeping the first one above) restrict the raw
    aligner logits; when KL(P_M ‖ Q) > threshold the raw base logits are used instead. Then the aligner-side
    processors: temperature t_q, HF repetition penalty on the seen ids, HF top-p (ascending sort, drop while the
    cumulative probability is <= 1 - top_p)."""
    zp = np.asarray(zp, np.float64)
    zq = np.asarray(zq, np.float64)
    lp = zp - zp.max() - np.log(np.exp(zp - zp.max()).sum())
    lq = zq - zq.max() - np.log(np.exp(zq - zq.max()).sum())
    kl = float(np.sum(np.exp(lp) * (lp - lq)))
    if kl <= kl_threshold:
        order = np.argsort(-zp, kind="stable")
        cum = np.cumsum(_softmax(zp[order] / t_m))
        remove = cum > top_p_m
        remove[1:] = remove[:-1].copy()
        remove[0] = False
        keep = np.ones_like(remove)
        keep[order] = ~remove
        warped = np.where(keep, zq, -np.inf)
    else:
        warped = zp.copy()
    x = warped / t_q
    x = np.where(seen, np.where(x < 0, x * penalty, x / penalty), x)
    order = np.argsort(x, kind="stable")
    cum = np.cumsum(_softmax(x[order]))
    remove = cum <= 1 - top_p_q
    remove[-1] = False
    keep = np.ones_like(remove)
    keep[order] = ~remove
    return _softmax(np.where(keep, x, -np.inf)), kl


def _penalised_nucleus_sparse(zp, zq, seen, *, t_m, t_q, top_p_m, top_p_q, penalty):
    """The rule ramjax had before the fix (P_M's nucleus from *penalised* logits): the must-fail control."""
    zp_pen = np.where(seen, np.where(zp < 0, zp * penalty, zp / penalty), zp)
    return released_sparse(zp_pen, zq, seen, t_m=t_m, t_q=t_q, top_p_m=top_p_m, top_p_q=top_p_q, penalty=penalty,
                           kl_threshold=np.inf)[0]


def _sparse_case():
    rng = np.random.default_rng(3)
    zp = (1.2 * rng.standard_normal(V)).astype(np.float32)
    zq = (1.2 * rng.standard_normal(V)).astype(np.float32)
    # A strong penalty on the tokens at the nucleus boundary makes the two nuclei differ visibly.
    order = np.argsort(-zp)
    probs = _softmax(zp / 0.7)[order]
    edge = int(np.searchsorted(np.cumsum(probs), 0.95))
    seen = np.zeros(V, bool)
    seen[order[max(0, edge - 6):edge + 1]] = True
    seen[order[0]] = True
    return zp, zq, seen


_choose = jax.jit(R.choose, static_argnums=0, static_argnames=("kl_fallback", "product_support", "kl_monitor"))


@pytest.mark.parametrize("monitor", ["off", "kept", "fired"])
def test_sparse_is_the_released_rule_under_a_repetition_penalty(monitor):
    zp, zq, seen = _sparse_case()
    s = dict(t_m=0.7, t_q=0.5, top_p_m=0.95, top_p_q=0.9)
    _, kl = released_sparse(zp, zq, seen, penalty=1.05, kl_threshold=np.inf, **s)
    threshold = {"off": np.inf, "kept": 2 * kl, "fired": 0.5 * kl}[monitor]
    out = {}
    for penalty in (1.05, 3.0):  # the default penalty, and a large one where a wrong nucleus is obvious
        ref, _ = released_sparse(zp, zq, seen, penalty=penalty, kl_threshold=threshold, **s)
        rp = R.RowParams(
            proposal_temperature=np.full(ROWS, s["t_m"], np.float32),
            aligner_temperature=np.full(ROWS, s["t_q"], np.float32),
            proposal_top_p=np.full(ROWS, s["top_p_m"], np.float32),
            aligner_top_p=np.full(ROWS, s["top_p_q"], np.float32), top_k=np.zeros(ROWS, np.int32),
            repetition_penalty=np.full(ROWS, penalty, np.float32),
            kl_threshold=np.full(ROWS, threshold, np.float32), greedy=np.zeros(ROWS, bool))
        u = jax.random.uniform(jax.random.key(int(penalty * 100)), (ROWS, R.num_uniforms("sparse", 1)))
        ch = _choose("sparse", jnp.broadcast_to(zp, (ROWS, V)), jnp.broadcast_to(zq, (ROWS, V)),
                     jnp.broadcast_to(seen, (ROWS, V)), u, rp, kl_fallback="paper",
                     kl_monitor=monitor != "off")
        counts = np.bincount(np.asarray(ch.token), minlength=V)
        assert chi2_pvalue(counts, ref) > 1e-3, (penalty, monitor)
        assert np.all(np.asarray(ch.fallback) == (monitor == "fired"))
        out[penalty] = (counts, ref)
    if monitor != "fired":  # must-fail control: the penalised-nucleus rule is rejected by the same counts
        counts, ref = out[3.0]
        wrong = _penalised_nucleus_sparse(zp, zq, seen, penalty=3.0, **s)
        assert 0.5 * np.abs(wrong - ref).sum() > 0.02
        assert chi2_pvalue(counts, wrong) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# stream(): a stop string spanning tokens must not leak its start


P_CFG = model_lib.ModelConfig(vocab_size=56, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, max_position_embeddings=128)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return sampling_fixtures.text_model(tmp_path_factory.mktemp("tok"), P_CFG)


TEXT = dict(mode="proposal", greedy=True, max_new_tokens=16, seed=0, repetition_penalty=1.0, eos_ids=[])


def test_stream_holds_back_a_stop_string_spanning_tokens(text_model):
    m, tok = text_model
    prompts = ["the quick brown fox"]
    ids = S.sample(m, None, prompts, stop=["\x01\x02\x03"], **TEXT)[0][0].token_ids
    pieces = [tok.decode([t]) for t in ids]
    # a stop string made of the last two characters of token k and the first of token k+1: its start is text the
    # stream would have shown before token k+1 arrives
    for k in range(1, 15):
        a, b = pieces[k], pieces[k + 1]
        stop = a[-2:] + b[:1]
        if len(a) >= 2 and b and stop.isprintable() and stop not in "".join(pieces[:k + 1]):
            break
    else:
        pytest.skip("no suitable token boundary in this random sample")
    res = S.sample(m, None, prompts, stop=[stop], **TEXT)[0][0]
    assert res.finish_reason == "stop"
    events = list(S.stream(m, None, prompts, stop=[stop], **TEXT))
    joined = "".join(e.text_deltas[0] for e in events)
    assert joined == res.text
    assert events[-1].finish_reasons == ["stop"]
    # and without a stop string nothing is held back at the end
    events = list(S.stream(m, None, prompts, stop=["\x01\x02\x03"], **TEXT))
    assert "".join(e.text_deltas[0] for e in events) == tok.decode(ids)


def test_partial_stop_lengths():
    assert S._partial_stop("abc umpfu", ["ul", "fux"]) == 2
    assert S._partial_stop("abc", ["cd", "bcd"]) == 2
    assert S._partial_stop("abc", ["x"]) == 0
    assert S._partial_stop("ab", ["ab"]) == 0  # a complete stop string is cut by the device check, not held


# ----------------------------------------------------------------------------------------------------------------
# Non-finite weights: at load (named file) and at sampling (named model)


Q_CFG = model_lib.ModelConfig(vocab_size=56, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=8, max_position_embeddings=128)


def _poisoned(params):
    params = jax.tree_util.tree_map(np.array, params)
    params["layers"]["w_up"][0, 3, 5] = np.nan
    return params


def test_nonfinite_weights_are_refused_at_load(tmp_path):
    from ramjax import checkpoint, hf

    bad = _poisoned(random_params(Q_CFG, 2))
    checkpoint.save_model_dir(tmp_path / "ckpt", Q_CFG, bad)
    with pytest.raises(api.NonFiniteWeightsError, match=r"ckpt/params.*w_up"):
        api.load_model(tmp_path / "ckpt")
    hf.save_hf(tmp_path / "hfdir", Q_CFG, bad)
    with pytest.raises(api.NonFiniteWeightsError, match=r"hfdir/model\.safetensors.*w_up"):
        api.load_model(tmp_path / "hfdir")
    good = random_params(Q_CFG, 2)
    hf.save_hf(tmp_path / "good", Q_CFG, good)
    assert api.load_model(tmp_path / "good").config == Q_CFG


def test_nonfinite_logits_at_sampling_name_the_model():
    p = Model(config=P_CFG, params=jax.tree_util.tree_map(jnp.asarray, random_params(P_CFG, 1)), vocab_limit=V,
              source="/models/pm")
    q_bad = Model(config=Q_CFG, params=jax.tree_util.tree_map(jnp.asarray, _poisoned(random_params(Q_CFG, 2))),
                  vocab_limit=V, source="/models/bad_aligner")
    kw = dict(max_new_tokens=4, eos_ids=[], kl_threshold=0.1)
    # par: where the review saw normal-looking text from a NaN aligner
    with pytest.raises(S.NonFiniteLogitsError, match=r"the aligner model \(/models/bad_aligner\)") as e:
        S.sample(p, q_bad, [[1, 2, 3], [4]], mode="par", **kw)
    assert "proposal" not in str(e.value)
    with pytest.raises(S.NonFiniteLogitsError, match="aligner"):
        list(S.stream(p, q_bad, [[1, 2, 3], [4]], mode="par", **kw))
    # the healthy pair samples fine with the same shapes
    assert len(S.sample(p, Model(config=Q_CFG, params=jax.tree_util.tree_map(jnp.asarray, random_params(Q_CFG, 2)),
                                 vocab_limit=V), [[1, 2, 3], [4]], mode="par", **kw)[0][0].token_ids) == 4
