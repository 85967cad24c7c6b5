"""Exact speculative RAM decoding (``ramjax.speculative``): the joint distribution of the first three tokens equals
the brute-force token-level target (χ², with a must-fail control that accepts every draft), greedy speculative
output equals greedy token-level output token for token under ragged acceptance, and the KV caches after rollback
equal a plain forward over the committed tokens.

Compiles dominate on CPU: the tiny-vocabulary models and the shapes are shared, and the full k × mode × monitor
grid of the χ² test is marked slow (the fast suite keeps one case per mode plus the control).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import random_params
from sampling_fixtures import chi2_pvalue

from ramjax import decode_rules as R
from ramjax import model as model_lib
from ramjax import sampler as S
from ramjax import speculative as SP
from ramjax.api import Model

# ----------------------------------------------------------------------------------------------------------------
# Exactness on a tiny vocabulary: the joint distribution of the first three tokens

TV = 8  # vocabulary: 512 three-token outcomes
ROWS = 6000
TP_CFG = model_lib.ModelConfig(vocab_size=TV, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                               num_kv_heads=1, head_dim=8, max_position_embeddings=64)
TQ_CFG = model_lib.ModelConfig(vocab_size=TV, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                               num_kv_heads=1, head_dim=4, max_position_embeddings=64)
TPROMPT = [1, 5, 2, 2]
SETTINGS = dict(proposal_temperature=1.0, aligner_temperature=0.8, proposal_top_p=0.9, aligner_top_p=0.95, top_k=0,
                repetition_penalty=1.3)


@pytest.fixture(scope="module")
def tiny():
    pp, qp = random_params(TP_CFG, 11), random_params(TQ_CFG, 12)
    qp["lm_head"] *= 1.5  # the draft differs from the target; nuclei prune; ~5 effective outcomes of 512
    p = Model(config=TP_CFG, params=jax.tree_util.tree_map(jnp.asarray, pp))
    q = Model(config=TQ_CFG, params=jax.tree_util.tree_map(jnp.asarray, qp))
    return p, q


_fwd = jax.jit(lambda cfg, prm, toks, seg: model_lib.forward(cfg, prm, toks, None, seg)[0], static_argnums=0)


def brute_force_joint(p: Model, q: Model, mode: str, kl_threshold: float, **settings) -> tuple[np.ndarray, float]:
    """The token-level target's joint law of the first three tokens ``[TV, TV, TV]`` by full forwards over every
    prefix, and the fraction of the (prefix-weighted) positions where the KL fallback fires."""
    prefixes = [()] + [(a,) for a in range(TV)] + list(itertools.product(range(TV), repeat=2))
    L = len(TPROMPT) + 2
    toks = np.zeros((len(prefixes), L), np.int32)
    seg = np.zeros((len(prefixes), L), np.int32)
    for i, g in enumerate(prefixes):
        ids = TPROMPT + list(g)
        toks[i, :len(ids)] = ids
        seg[i, :len(ids)] = 1
    last = np.array([len(TPROMPT) + len(g) - 1 for g in prefixes])
    zp = np.asarray(_fwd(p.config, p.params, toks, seg))[np.arange(len(prefixes)), last]
    zq = np.asarray(_fwd(q.config, q.params, toks, seg))[np.arange(len(prefixes)), last]
    seen = np.zeros((len(prefixes), TV), bool)
    for i, g in enumerate(prefixes):
        seen[i, TPROMPT + list(g)] = True
    n = len(prefixes)
    d = dict(proposal_temperature=1.0, aligner_temperature=1.0, proposal_top_p=1.0, aligner_top_p=1.0, top_k=0,
             repetition_penalty=1.0, kl_threshold=kl_threshold, greedy=False)
    d.update(settings)
    dtypes = dict(top_k=np.int32, greedy=bool)
    rp = R.RowParams(**{k: np.full(n, v, dtypes.get(k, np.float32)) for k, v in d.items()})
    t = R.target_logits(mode, jnp.asarray(zp), jnp.asarray(zq), jnp.asarray(seen), rp,
                        kl_monitor=np.isfinite(kl_threshold))
    probs = np.asarray(jax.nn.softmax(t.logits, axis=-1), np.float64)
    fired = np.asarray(t.fired)
    index = {g: i for i, g in enumerate(prefixes)}
    joint = (probs[index[()]][:, None, None] * np.stack([probs[index[(a,)]] for a in range(TV)])[:, :, None]
             * np.stack([[probs[index[(a, b)]] for b in range(TV)] for a in range(TV)]))
    w1 = probs[index[()]]
    fire_rate = (fired[index[()]] + sum(w1[a] * fired[index[(a,)]] for a in range(TV))) / 2
    return joint, float(fire_rate)


def kl_threshold(p: Model, q: Model) -> float:
    """The KL-monitor threshold 0.9: with these models the KL at the first two positions is 0.2 .. 1.9, and at the
    likeliest ones 0.68 (first token: kept) and 0.98 (after token 0: fired), so the fallback is part of the target
    at some positions and not others. Checked: no KL within 0.02 of it (round-off cannot flip a decision)."""
    kls = []
    for g in [()] + [(a,) for a in range(TV)]:
        ids = np.array([TPROMPT + list(g)], np.int32)
        zp = _fwd(p.config, p.params, ids, np.ones_like(ids))[:, -1]
        zq = _fwd(q.config, q.params, ids, np.ones_like(ids))[:, -1]
        kls.append(float(R.kl_divergence(zp, zq)[0]))
    assert min(abs(np.array(kls) - 0.9)) > 0.02, kls
    return 0.9


def spec_counts(p, q, mode, k, kl_threshold, seed=0, **settings) -> tuple[np.ndarray, list]:
    out = S.sample(p, q, [TPROMPT], mode=mode, num_samples=ROWS, max_new_tokens=3, seed=seed, eos_ids=[],
                   kl_threshold=kl_threshold, num_speculative_tokens=k, **settings)[0]
    ids = np.array([r.token_ids for r in out])
    assert ids.shape == (ROWS, 3)
    return np.bincount((ids[:, 0] * TV + ids[:, 1]) * TV + ids[:, 2], minlength=TV ** 3), out


FAST = {("product", 3, True), ("sparse", 5, False)}
GRID = [pytest.param(m, k, mon, marks=() if (m, k, mon) in FAST else pytest.mark.slow)
        for m in ("product", "sparse") for k in (1, 3, 5) for mon in (False, True)]
GRID.append(pytest.param("proposal", 3, False, marks=pytest.mark.slow))  # the aligner drafts P_M's own law


@pytest.mark.parametrize("mode,k,monitor", GRID)
def test_speculative_joint_law_of_three_tokens_is_the_target(tiny, mode, k, monitor):
    p, q = tiny
    threshold = kl_threshold(p, q) if monitor else None
    joint, fire_rate = brute_force_joint(p, q, mode, np.inf if threshold is None else threshold, **SETTINGS)
    if monitor:
        assert 0.2 < fire_rate < 0.8  # the fallback is part of the target at some positions, not all
    counts, out = spec_counts(p, q, mode, k, threshold, **SETTINGS)
    assert chi2_pvalue(counts, joint.ravel()) > 1e-3
    acc = np.mean([r.acceptance_rate for r in out])
    assert 0.05 < acc < 0.98  # drafts are neither always nor never accepted: the test exercises both branches
    assert all(r.tokens_per_call >= 1.0 for r in out)


def test_must_fail_control_accepting_every_draft_is_detected(tiny, monkeypatch):
    """Without the min(1, p/q) test the law is the draft's, not the target's: the same χ² rejects it."""
    p, q = tiny
    monkeypatch.setattr(SP, "accept_drafts", lambda u, q_x, p_x: p_x > 0)  # only never-possible drafts rejected
    SP._compiled.cache_clear()
    try:
        joint, _ = brute_force_joint(p, q, "product", np.inf, **SETTINGS)
        counts, _ = spec_counts(p, q, "product", 3, None, **SETTINGS)
        assert chi2_pvalue(counts, joint.ravel()) < 1e-6
    finally:
        SP._compiled.cache_clear()


# ----------------------------------------------------------------------------------------------------------------
# Greedy: token for token equal to token-level decoding, with ragged acceptance

V = 48
P_CFG = model_lib.ModelConfig(vocab_size=56, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, max_position_embeddings=128)
Q_CFG = model_lib.ModelConfig(vocab_size=56, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=8, max_position_embeddings=128)
RAGGED = [[5, 6, 7], [9, 1, 2, 3, 4, 8, 8, 12, 40], [11] * 4 + list(range(20, 33)), [3], [30, 31, 30, 31, 2]]


@pytest.fixture(scope="module")
def models():
    pp, qp = random_params(P_CFG, 1), random_params(Q_CFG, 2)
    # P_M flatter than Q_θ: the product's argmax mostly follows the aligner (drafts often but not always accepted)
    pp["lm_head"] *= 0.35
    qp["lm_head"] *= 1.5
    p = Model(config=P_CFG, params=jax.tree_util.tree_map(jnp.asarray, pp), vocab_limit=V)
    q = Model(config=Q_CFG, params=jax.tree_util.tree_map(jnp.asarray, qp), vocab_limit=V)
    return p, q


GREEDY = dict(greedy=True, max_new_tokens=20, eos_ids=[], repetition_penalty=1.2, proposal_top_p=0.9,
              aligner_top_p=0.9)


def _median_gap_threshold(p, q, mode) -> float:
    """A KL threshold at the widest gap between the middle KLs of a greedy run, so the fallback fires at about
    half the tokens and no KL sits near the threshold."""
    run = S.sample(p, q, RAGGED, mode=mode, kl_threshold=1e9, **GREEDY)
    kls = np.sort([x for r in run for x in r[0].kl])
    mid = kls[len(kls) // 4: 3 * len(kls) // 4]
    i = int(np.argmax(np.diff(mid)))
    assert mid[i + 1] - mid[i] > 1e-3
    return float((mid[i] + mid[i + 1]) / 2)


@pytest.mark.parametrize("mode,monitor", [("product", True), pytest.param("sparse", False, marks=pytest.mark.slow)])
def test_greedy_speculative_equals_greedy_token_level(models, mode, monitor):
    p, q = models
    kl = _median_gap_threshold(p, q, mode) if monitor else None
    base = S.sample(p, q, RAGGED, mode=mode, kl_threshold=kl, **GREEDY)
    if monitor:
        assert 0.1 < np.mean([x for r in base for x in r[0].kl_fallback]) < 0.9
    for k, batch_size in ((2, None), (4, 2)):
        spec = S.sample(p, q, RAGGED, mode=mode, kl_threshold=kl, num_speculative_tokens=k, batch_size=batch_size,
                        **GREEDY)
        for b, s in zip(base, spec):
            assert s[0].token_ids == b[0].token_ids
            assert s[0].kl_fallback == b[0].kl_fallback and s[0].finish_reason == b[0].finish_reason
        rates = [s[0].acceptance_rate for s in spec]
        assert len(set(np.round(rates, 6))) > 2 and max(rates) > 0.2 and min(rates) < 0.9, rates  # ragged
        assert all(s[0].tokens_per_call > 1.0 for s in spec if s[0].acceptance_rate > 0)


def test_eos_and_max_new_tokens_stop_exactly_as_token_by_token(models):
    p, q = models
    base = S.sample(p, q, RAGGED, mode="product", kl_threshold=None, **GREEDY)
    eos = base[1][0].token_ids[6]  # a token that occurs mid-row: rows stop at its first occurrence
    kw = {**GREEDY, "eos_ids": [eos], "max_new_tokens": 13}
    ref = S.sample(p, q, RAGGED, mode="product", kl_threshold=None, **kw)
    spec = S.sample(p, q, RAGGED, mode="product", kl_threshold=None, num_speculative_tokens=4, **kw)
    assert any(r[0].finish_reason == "eos" for r in ref) and any(r[0].finish_reason == "length" for r in ref)
    for a, b in zip(ref, spec):
        assert (b[0].token_ids, b[0].length, b[0].finish_reason) == (a[0].token_ids, a[0].length, a[0].finish_reason)


def test_same_prompt_same_tokens_whatever_the_batch(models):
    p, q = models
    kw = dict(mode="product", max_new_tokens=12, eos_ids=[], kl_threshold=0.4, num_speculative_tokens=3, seed=4)
    full = S.sample(p, q, RAGGED, **kw)
    alone = S.sample(p, q, [RAGGED[2]], example_offset=2, **kw)
    assert alone[0][0].token_ids == full[2][0].token_ids
    assert S.sample(p, q, RAGGED, **kw)[0][0].token_ids == full[0][0].token_ids  # determinism


def test_caches_after_rollback_equal_a_forward_over_the_committed_tokens(models):
    p, q = models
    params = S.SamplingParams(mode="product", n=1, max_new_tokens=10, proposal_temperature=1.0,
                              aligner_temperature=1.0, proposal_top_p=1.0, aligner_top_p=1.0, kl_threshold=None,
                              repetition_penalty=1.0)
    plan = S._plan(p, q, RAGGED, params, num_samples=1, seed=0, batch_size=None, eos_ids=[], example_offset=0,
                   rules=())
    rows = [(i, 0) for i in range(len(RAGGED))]
    st, batch, rowp = S._chunk_inputs(plan, rows)
    # max_new 7 < the buffer: rows end mid-round, so rollback to a partial prefix is exercised
    final = SP.generate(st, 3, plan.params_p, plan.params_q, batch, plan.tables, rowp, jax.random.key(0),
                        np.int32(7), keep_caches=True)
    final = jax.device_get(final)
    P = st.prompt_len
    committed = []
    for r, prompt in enumerate(RAGGED):
        gen = [int(t) for t in final.tokens[r, :final.length[r]]]
        assert len(gen) == 7
        committed.append(prompt + gen[:-1])  # the last token is pending: in neither cache yet
    # reference: one cached forward over the committed tokens, right-padded (positions 0..n-1 per row)
    toks = np.zeros((len(RAGGED), 32), np.int32)
    seg = np.zeros((len(RAGGED), 32), np.int32)
    for r, c in enumerate(committed):
        toks[r, :len(c)] = c
        seg[r, :len(c)] = 1
    for cache, m in ((final.cache_p, p), (final.cache_q, q)):
        _, ref = model_lib.forward(m.config, m.params, toks, None, seg, model_lib.init_cache(m.config, len(RAGGED), 32))
        k_all, v_all = np.stack(cache.k), np.stack(cache.v)  # the per-layer cache as [layers, B, slots, ...]
        for r, (prompt, c) in enumerate(zip(RAGGED, committed)):
            start, n = P - len(prompt), len(c)
            assert int(cache.index[r]) == start + n
            np.testing.assert_allclose(k_all[:, r, start:start + n], np.asarray(ref.k)[:, r, :n], atol=2e-5)
            np.testing.assert_allclose(v_all[:, r, start:start + n], np.asarray(ref.v)[:, r, :n], atol=2e-5)
            assert np.all(cache.segment_ids[r, start:start + n] == 1)


def test_refusals(models):
    p, q = models
    with pytest.raises(SP.SpeculativeError, match="par.*no closed-form"):
        S.sample(p, q, [[1, 2]], mode="par", num_speculative_tokens=2)
    with pytest.raises(SP.SpeculativeError, match="par.*no closed-form"):  # refused by the record itself
        S.SamplingParams(mode="par", num_speculative_tokens=2).validate()
    with pytest.raises(S.SamplingParameterError, match="inra.*no draft"):
        S.SamplingParams(mode="inra", num_speculative_tokens=1).validate()
    with pytest.raises(SP.SpeculativeError, match="integer >= 0"):
        S.sample(p, q, [[1, 2]], mode="product", num_speculative_tokens=-1)
    with pytest.raises(SP.SpeculativeError, match="drafts with the aligner"):
        S.sample(p, None, [[1, 2]], mode="proposal", num_speculative_tokens=2)
    with pytest.raises(SP.SpeculativeError, match="stream.*use sample"):
        next(S.stream(p, q, [[1, 2]], mode="product", num_speculative_tokens=2))


def test_proposal_mode_speculative_equals_token_level(models):
    """Mode ``proposal`` with the aligner as the draft: greedy output equals greedy P_M token for token (these
    models' argmaxes rarely agree, so nearly every token comes from a rejection's residual draw; the χ² case
    ``proposal-3`` of the joint-law test covers accepted drafts), and k given in a ``SamplingParams`` record works
    like the keyword."""
    p, q = models
    settings = {k: v for k, v in GREEDY.items() if k != "eos_ids"}
    base = S.sample(p, None, RAGGED, mode="proposal", eos_ids=[], **settings)
    params = S.SamplingParams(mode="proposal", num_speculative_tokens=3, **settings)
    spec = S.sample(p, q, RAGGED, params, eos_ids=[])
    for b, s_ in zip(base, spec):
        assert s_[0].token_ids == b[0].token_ids and s_[0].finish_reason == b[0].finish_reason
    assert all(s_[0].acceptance_rate is not None and s_[0].tokens_per_call >= 1 for s_ in spec)


def test_sharded_mesh_gives_the_same_tokens(models):
    """Explicit in/out shardings on a (data 2, fsdp 2, tensor 2) mesh of simulated devices: the same tokens as on
    one device, and the outputs come back laid out over the mesh's batch axes."""
    from ramjax import sharding as shd

    p, _ = models
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    q2 = Q_CFG.replace(num_kv_heads=2)  # kv heads must divide the tensor axis
    qp = jax.tree_util.tree_map(jnp.asarray, random_params(q2, 2))
    qp["lm_head"] = qp["lm_head"] * 1.5
    kw = dict(mode="product", max_new_tokens=10, eos_ids=[], kl_threshold=0.5, num_speculative_tokens=3, seed=1)
    single = S.sample(p, Model(config=q2, params=qp, vocab_limit=V), RAGGED, **kw)
    sp = Model(config=P_CFG, params=p.params, vocab_limit=V, mesh=mesh)
    sq = Model(config=q2, params=qp, vocab_limit=V, mesh=mesh)
    sharded = S.sample(sp, sq, RAGGED, **kw)
    assert [r[0].token_ids for r in sharded] == [r[0].token_ids for r in single]
    assert [r[0].acceptance_rate for r in sharded] == [r[0].acceptance_rate for r in single]
    # the compiled program's shardings: params as the sampler places them, the per-row state over the batch axes
    params = S.SamplingParams(**{k: v for k, v in kw.items() if k not in ("eos_ids", "seed")})
    plan = S._plan(sp, sq, RAGGED, params, num_samples=1, seed=1, batch_size=None, eos_ids=[], example_offset=0,
                   rules=shd.DEFAULT_RULES, draft=True)
    st, batch, rowp = S._chunk_inputs(plan, [(i, 0) for i in range(len(RAGGED))])
    final = SP.generate(st, 3, plan.params_p, plan.params_q, batch, plan.tables, rowp, jax.random.key(1),
                        np.int32(10))
    assert final.tokens.sharding.is_equivalent_to(shd.batch_sharding(mesh, 2, shd.DEFAULT_RULES), 2)
