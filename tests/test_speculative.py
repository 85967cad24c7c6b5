"""Exact speculative RAM decoding (``ramjax.speculative``): the joint distribution of the first three tokens equals
the brute-force token-level target (χ², with a must-fail control that accepts every draft), greedy speculative
output equals greedy token-level output token for token under ragged acceptance, and the KV caches after rollback
equal a plain forward over the committed tokens.

Compiles dominate on CPU: the tiny-vocabulary models and the shapes are shared, and the full k × mode × monitor
grid of the χ² test is marked slow (the fast suite keeps one case per mode plus the control).
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import random_params
from sampling_fixtures import chi2_pvalue, text_model

from ramjax import decode_rules as R
from ramjax import model as model_lib
from ramjax import sampler as S
from ramjax import speculative as SP
from ramjax.api import Model
from ramjax.tokenizer import token_bytes

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


@pytest.mark.slow  # the fast suite keeps test_eos_and_max_new_tokens_inside_an_accepted_block[vectorised-commit]
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


@pytest.mark.parametrize("T", [1, 3])
def test_per_row_cache_write_puts_each_rows_chunk_at_its_own_slot_and_nothing_else(T):
    """``model._write_slots`` with a per-row index (the speculative caches' write: ``vmap(dynamic_update_slice)``,
    or for one row a plain ``dynamic_update_slice`` at ``index[0]``): row b's chunk lands at slots index[b] ..
    index[b] + T - 1 and every other slot keeps its value, for K/V buffers ``[B, S, K, Dh]`` and segment ids
    ``[B, S]``, with 4 rows and with 1; the scalar index writes every row at the same slot."""
    rng = np.random.default_rng(0)
    S = 9
    for index, shape in itertools.product(
            [np.array([0, 2, S - T, 5], np.int32), np.array([4], np.int32)],  # first slot, middle, last fit; one row
            [(S, 2, 3), (S,)]):
        B = len(index)
        shape = (B,) + shape
        buf = rng.normal(size=shape).astype(np.float32)
        x = rng.normal(size=(B, T) + shape[2:]).astype(np.float32)
        want = buf.copy()
        for b in range(B):
            want[b, index[b]:index[b] + T] = x[b]
        got = np.asarray(jax.jit(model_lib._write_slots)(jnp.asarray(buf), jnp.asarray(x), jnp.asarray(index)))
        np.testing.assert_array_equal(got, want)
        got = np.asarray(model_lib._write_slots(jnp.asarray(buf), jnp.asarray(x), jnp.asarray(np.int32(3))))
        want = buf.copy()
        want[:, 3:3 + T] = x
        np.testing.assert_array_equal(got, want)


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


# ----------------------------------------------------------------------------------------------------------------
# Stop strings, EOS and max_new_tokens reached inside an accepted draft block

STOP_PROMPTS = ["the quick brown fox", "hello world", "a b c d"]
STOP_KW = dict(mode="product", greedy=True, max_new_tokens=24, repetition_penalty=1.2, proposal_top_p=0.9,
               aligner_top_p=0.9, kl_threshold=None, batch_size=3)
NEVER = ["\x01\x02"]  # a stop string that never occurs, with the table shapes of the 2-character ones: one compile


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    """A P_M / Q_θ pair over a real (trained-on-a-few-KB) byte-level tokenizer, so stop strings match bytes that
    span tokens; P_M flatter than Q_θ as in ``models``: greedy drafts are often, not always, accepted."""
    p, tok = text_model(tmp_path_factory.mktemp("spec_tok"), P_CFG)
    pp = dict(p.params, lm_head=p.params["lm_head"] * 0.35)
    qcfg = Q_CFG.replace(vocab_size=tok.vocab_size)
    qp = jax.tree_util.tree_map(jnp.asarray, random_params(qcfg, 5))
    qp["lm_head"] = qp["lm_head"] * 1.5
    return Model(config=p.config, params=pp, tokenizer=tok), Model(config=qcfg, params=qp, tokenizer=tok), tok


def _round_ends(p, q, prompts, k, **kw) -> list[list[int]]:
    """Per row, its generated length after each speculative round of a greedy run (rounds replayed one jitted call
    at a time from ``speculative._prefill`` / ``_round``): token ``t`` was committed by the round that ended at the
    first length ``> t``, and it lies *inside* an accepted block when that round committed tokens after it too."""
    eos_ids = kw.pop("eos_ids", None)
    params = S.SamplingParams(**{k_: v for k_, v in kw.items() if k_ != "batch_size"})
    plan = S._plan(p, q, prompts, params, num_samples=1, seed=0, batch_size=None, eos_ids=eos_ids, example_offset=0,
                   rules=(), draft=True)
    st, batch, rowp = S._chunk_inputs(plan, [(i, 0) for i in range(len(prompts))])
    sp = SP._Spec(base=st, k=k)
    s = jax.jit(functools.partial(SP._prefill, sp))(plan.params_p, plan.params_q, batch, jax.random.key(0), rowp)
    step = jax.jit(functools.partial(SP._round, sp))
    ends: list[list[int]] = [[] for _ in prompts]
    while not bool(np.all(s.done)):
        running = ~np.asarray(s.done)
        s = step(plan.params_p, plan.params_q, s, plan.tables, rowp, np.int32(plan.max_new))
        for r in np.flatnonzero(running[:len(prompts)]):
            ends[r].append(int(s.length[r]))
    return ends


def _inside_block(ends: list[int], t: int) -> bool:
    """Whether token ``t`` was committed by a round that also committed the token after it."""
    end = next(e for e in ends if e > t)
    return t < end - 1


def _assert_same_rows(ref, spec):
    for a, b in zip(ref, spec):
        a, b = a[0], b[0]
        assert (b.token_ids, b.length, b.finish_reason, b.text) == (a.token_ids, a.length, a.finish_reason, a.text)


def test_stop_strings_spanning_tokens_inside_an_accepted_block_cut_as_token_by_token(text_pair):
    """Greedy: a stop string made of the end of token t-1 and the start of token t, where token t sits inside an
    accepted draft block (the round went on to commit token t+1), ends the row at token t with the text cut
    before the stop string, exactly as token-level decoding does; the same for a stop string completed by the
    last token of a block; every row of the batch (which hit the stop string elsewhere or never) agrees."""
    p, q, tok = text_pair
    K = 4
    ref0 = S.sample(p, q, STOP_PROMPTS, stop=NEVER, **STOP_KW)
    ends = _round_ends(p, q, STOP_PROMPTS, K, stop=NEVER, **STOP_KW)
    assert [e[-1] for e in ends] == [r[0].length for r in ref0] == [24] * 3
    assert any(b - a >= 2 for e in ends for a, b in zip([0] + e, e))  # some rounds accepted drafts
    tb = token_bytes(tok, p.vocab_limit)
    found = {True: None, False: None}  # inside a block / at a block's end -> (row, t, stop)
    for r, res in enumerate(ref0):
        ids = res[0].token_ids
        for t in range(2, len(ids) - 1):
            a, b = tb[ids[t - 1]], tb[ids[t]]
            stop = (a[-1:] + b[:1]).decode("latin-1")
            before = b"".join(tb[i] for i in ids[:t - 1]) + a
            if (len(a) and len(b) and stop.isprintable() and stop.isascii() and stop.encode() not in before
                    and stop.encode() not in b and found[_inside_block(ends[r], t)] is None):
                found[_inside_block(ends[r], t)] = (r, t, stop)
    assert found[True] is not None, ends  # a stop string completed strictly inside an accepted block
    for hit in found.values():
        if hit is None:
            continue
        r, t, stop = hit
        ref = S.sample(p, q, STOP_PROMPTS, stop=[stop], **STOP_KW)
        spec = S.sample(p, q, STOP_PROMPTS, stop=[stop], num_speculative_tokens=K, **STOP_KW)
        assert ref[r][0].finish_reason == "stop" and ref[r][0].length == t + 1
        assert ref[r][0].token_ids == ref0[r][0].token_ids[:t + 1]
        assert stop not in ref[r][0].text
        _assert_same_rows(ref, spec)


# the stop-window commit path also runs in the fast test_stop_strings_spanning_tokens_inside_an_accepted_block...
@pytest.mark.parametrize("stops", [[], pytest.param(NEVER, marks=pytest.mark.slow)],
                         ids=["vectorised-commit", "stop-window-commit"])
def test_eos_and_max_new_tokens_inside_an_accepted_block(text_pair, stops):
    """Greedy: an EOS id first generated strictly inside an accepted block, and a ``max_new_tokens`` that ends a
    row strictly inside one, stop every row exactly where token-level decoding stops it (both commit paths: the
    vectorised one without stop strings and the per-token one that carries the stop-string byte window)."""
    p, q, _ = text_pair
    K = 4
    kw = {**STOP_KW, "stop": stops, "eos_ids": []}
    ref0 = S.sample(p, q, STOP_PROMPTS, **kw)
    ends = _round_ends(p, q, STOP_PROMPTS, K, **kw)
    # EOS: the first token of some row that first occurs there strictly inside a block
    eos = next((ids[t], r) for r, ids in enumerate(r_[0].token_ids for r_ in ref0)
               for t in range(1, len(ids) - 1) if ids.index(ids[t]) == t and _inside_block(ends[r], t))
    ref = S.sample(p, q, STOP_PROMPTS, **{**kw, "eos_ids": [eos[0]]})
    spec = S.sample(p, q, STOP_PROMPTS, num_speculative_tokens=K, **{**kw, "eos_ids": [eos[0]]})
    assert ref[eos[1]][0].finish_reason == "eos"
    _assert_same_rows(ref, spec)
    # max_new_tokens: a length at which some row's round would have gone on
    m = next(t + 1 for t in range(2, 23) if any(_inside_block(e, t) for e in ends))
    ref = S.sample(p, q, STOP_PROMPTS, **{**kw, "max_new_tokens": m})
    spec = S.sample(p, q, STOP_PROMPTS, num_speculative_tokens=K, **{**kw, "max_new_tokens": m})
    assert all(r[0].finish_reason == "length" and r[0].length == m for r in ref)
    _assert_same_rows(ref, spec)


def test_sampled_rows_are_cut_at_the_first_stop_string_as_token_by_token(text_pair):
    """Sampled (T 1): speculative rows differ from token-level ones, but each is cut by the token-level rule: a row
    ends with ``stop`` exactly at the first token whose bytes complete a stop string (none completed before it),
    its text is the decoded text up to the stop string, and a row that ends by length never contains one."""
    p, q, tok = text_pair
    tb = token_bytes(tok, p.vocab_limit)
    stops = ["e ", "n"]
    kw = dict(mode="product", max_new_tokens=16, eos_ids=[], kl_threshold=None, stop=stops, seed=3)
    out = S.sample(p, q, ["the quick brown fox"], num_samples=24, num_speculative_tokens=3, **kw)[0]
    assert 0.05 < np.mean([r.acceptance_rate for r in out]) < 0.95
    reasons = [r.finish_reason for r in out]
    assert reasons.count("stop") >= 4 and reasons.count("length") >= 1, reasons
    spanning = 0
    for r in out:
        ids = r.token_ids
        full = b"".join(tb[i] for i in ids)
        prev = b"".join(tb[i] for i in ids[:-1])
        hits = [s.encode() for s in stops]
        if r.finish_reason == "stop":
            assert any(h in full for h in hits) and not any(h in prev for h in hits)
            text = tok.decode(ids, skip_special_tokens=True)
            assert r.text == text[:min(text.find(s) for s in stops if s in text)]
            spanning += any(h in full and h not in tb[ids[-1]] for h in hits)
        else:
            assert r.length == 16 and not any(h in full for h in hits)
    assert spanning >= 1  # some rows were cut by a stop string that spans two tokens
