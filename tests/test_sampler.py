"""The two-model decoder: exact distributions (χ²) of every rule, the cache against full recomputation, batch
invariance, determinism, stop strings, EOS and bad inputs.

Compiles dominate the run time on CPU, so tests share shapes: the rule-level tests use one ``[ROWS, V]`` shape, the
model-level tests a few fixed batch sizes and buckets.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sampling_fixtures
from hf_fixtures import random_params
from sampling_fixtures import chi2_pvalue

from ramjax import decode_rules as R
from ramjax import model as model_lib
from ramjax import nucleus as NU
from ramjax import sampler as S
from ramjax.api import Model

V = 48  # usable vocabulary of the tiny models
ROWS = 4000  # draws per distribution in the rule-level tests
P_CFG = model_lib.ModelConfig(vocab_size=56, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, max_position_embeddings=128)
Q_CFG = model_lib.ModelConfig(vocab_size=56, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=8, max_position_embeddings=128)
OPEN = dict(proposal_temperature=1.0, aligner_temperature=1.0, proposal_top_p=1.0, aligner_top_p=1.0, top_k=0,
            repetition_penalty=1.0, kl_threshold=None)


def tv(counts: np.ndarray, probs: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - probs / probs.sum()).sum())


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


# ----------------------------------------------------------------------------------------------------------------
# Rule level: decode_rules.choose on fixed logits


def rowp(B: int, **kw) -> R.RowParams:
    d = dict(proposal_temperature=1.0, aligner_temperature=1.0, proposal_top_p=1.0, aligner_top_p=1.0, top_k=0,
             repetition_penalty=1.0, kl_threshold=np.inf, greedy=False)
    d.update(kw)
    dtypes = dict(top_k=np.int32, greedy=bool)
    return R.RowParams(**{k: np.broadcast_to(np.asarray(v, dtypes.get(k, np.float32)), (B,)).copy()
                          for k, v in d.items()})


_choose = jax.jit(R.choose, static_argnums=0, static_argnames=("kl_fallback", "product_support", "kl_monitor"))


def run_rule(mode: str, zp, zq, *, n: int = 8, seed: int = 0, seen=None, kl_monitor: bool = False,
             kl_fallback: str = "proposal", product_support: str = "nucleus", **kw) -> R.TokenChoice:
    B = ROWS
    zp_b = jnp.broadcast_to(jnp.asarray(zp, jnp.float32), (B, len(zp)))
    zq_b = jnp.broadcast_to(jnp.asarray(zq, jnp.float32), (B, len(zq)))
    seen_b = jnp.zeros((B, len(zp)), bool) if seen is None else jnp.broadcast_to(jnp.asarray(seen), (B, len(zp)))
    u = jax.random.uniform(jax.random.key(seed), (B, R.num_uniforms(mode, n)))
    out = _choose(mode, zp_b, zq_b, seen_b, u, rowp(B, **kw), kl_fallback=kl_fallback,
                  product_support=product_support, kl_monitor=kl_monitor)
    return jax.device_get(out)


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    zp = 1.5 * rng.standard_normal(V)
    zq = 1.5 * rng.standard_normal(V)
    return zp.astype(np.float32), zq.astype(np.float32)


def hf_process(z: np.ndarray, *, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, seen_ids=()) -> np.ndarray:
    """Hugging Face's processors in generate's order (penalty, temperature, top-k, top-p) on one row."""
    import torch
    from transformers.generation import logits_process as lp

    scores = torch.tensor(np.asarray(z, np.float32))[None]
    ids = torch.tensor([list(seen_ids) or [0]], dtype=torch.long)
    procs = []
    if penalty != 1.0 and seen_ids:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(penalty))
    if temperature != 1.0:
        procs.append(lp.TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(lp.TopPLogitsWarper(top_p))
    for p in procs:
        scores = p(ids, scores)
    return scores[0].numpy()


@pytest.mark.parametrize("fast_k,band_k", [(0, NU.BAND_K), (4, NU.BAND_K), (0, 2), (0, 0)])
def test_filters_match_hugging_face(fast_k, band_k):
    """Penalty, temperature, top-k, top-p per row equal transformers' processors (kept set and values), without
    the top-k fast path (fast_k=0: top-p by the value bisection with its exact band finish, or where the band holds
    more than band_k tokens (band_k=2) or band_k=0, by the 32-step key bisection) and with it (the peaked rows
    with fast_k=4; the rule-level tests below run it with fast_k >= V), as the batch-wide switches pick."""
    rng = np.random.default_rng(1)
    B = 16
    for scale, ks, ps in ((2.0, [0, 1, 5, 20], [1.0, 0.9, 0.5, 0.05]), (8.0, [0, 1, 3], [1.0, 0.6, 0.3])):
        z = (scale * rng.standard_normal((B, V))).astype(np.float32)
        seen = rng.random((B, V)) < 0.2
        temps = rng.choice([0.5, 1.0, 1.7], B)
        k = rng.choice(ks, B)
        p = rng.choice(ps, B)
        pens = rng.choice([1.0, 1.3], B)
        zp = R.repetition_penalty(jnp.asarray(z), jnp.asarray(seen), jnp.asarray(pens, jnp.float32))
        ours = np.asarray(R.filter_logits(zp / jnp.asarray(temps, jnp.float32)[:, None], jnp.asarray(k, jnp.int32),
                                          jnp.asarray(p, jnp.float32), fast_k=fast_k, band_k=band_k))
        for b in range(B):
            ref = hf_process(z[b], temperature=temps[b], top_k=int(k[b]), top_p=p[b], penalty=pens[b],
                             seen_ids=np.flatnonzero(seen[b]).tolist())
            np.testing.assert_array_equal(np.isfinite(ours[b]), np.isfinite(ref), err_msg=f"row {b}")
            np.testing.assert_allclose(ours[b][np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6)


@pytest.mark.parametrize("histogram", [True, False])
def test_band_finish_equals_key_bisection_on_flat_large_vocabularies(monkeypatch, histogram):
    """Flat distributions over a large vocabulary (random-weight models: no top-k fast path) are where top-p runs
    the histogram (CPU) or the value halvings, then the band finish; it keeps exactly the set of the 32-step key
    bisection, with excluded ids, ties, top-k and rows that keep everything in the batch."""
    monkeypatch.setattr(NU, "HISTOGRAM_CUT", histogram)
    rng = np.random.default_rng(7)
    z = jnp.asarray((0.5 * rng.standard_normal((8, 8192))).astype(np.float32))
    z = z.at[0, :4000].set(-jnp.inf).at[1, 100:200].set(z[1, 7])  # excluded ids; many ties
    k = jnp.zeros(8, jnp.int32).at[2].set(5000)
    p = jnp.asarray([0.95, 0.9, 0.5, 0.99, 0.3, 0.95, 0.999, 0.8], jnp.float32)
    band = R.nucleus_mask(z, k, p, fast_k=0)
    exact = R.nucleus_mask(z, k, p, fast_k=0, band_k=0)
    np.testing.assert_array_equal(band, exact)
    assert 0 < int(band.sum()) < int((z > -jnp.inf).sum())
    # the same without top-k and with a row that keeps everything (the usual random-weight step)
    p = p.at[5].set(1.0)
    np.testing.assert_array_equal(R.nucleus_mask(z, jnp.zeros(8, jnp.int32), p, fast_k=0),
                                  R.nucleus_mask(z, jnp.zeros(8, jnp.int32), p, fast_k=0, band_k=0))


def test_histogram_cut_decides_flat_rows_itself():
    """The histogram's own band (not its fallback) decides typical flat rows at V = 49152: its checks pass and its
    cut is the key bisection's; the band it ranks stays small."""
    rng = np.random.default_rng(3)
    B, V = 8, 49152
    z = jnp.asarray((0.5 * rng.standard_normal((B, V))).astype(np.float32))
    p = jnp.asarray([0.95, 0.9, 0.99, 0.8, 0.95, 0.6, 0.95, 1.0], jnp.float32)
    zmax = jnp.max(z, axis=-1)
    e = jnp.exp(z - zmax[:, None])
    s = jnp.sum(e, axis=-1)
    hi = jnp.nextafter(zmax, jnp.inf)
    cut, ok = NU._histogram_cut(z, e, s, z > -jnp.inf, p, NU.BAND_K, zmax, hi)
    assert bool(jnp.all(ok))
    exact = NU._threshold(NU.order_keys(z), e / s[:, None], p)
    np.testing.assert_array_equal(np.asarray(cut)[:7], np.asarray(exact)[:7])


def test_nucleus_fast_path_compiles_to_a_top_k_not_a_sort():
    """The top-k fast path must reach XLA as a TopK: when only top_k's values were used, the CPU backend lowered
    it to a full sort of every row (~100x slower at V = 49k, as slow as the model step at batch 8)."""
    z = jnp.zeros((8, 4096), jnp.float32)
    txt = jax.jit(R.nucleus_mask).lower(z, jnp.zeros(8, jnp.int32), jnp.full(8, 0.9)).compile().as_text()
    if jax.default_backend() == "cpu":
        assert "TopK" in txt
    assert " sort(" not in txt


def test_draws_follow_the_distribution_and_never_excluded_ids(logits):
    zp, _ = logits
    masked = np.where(np.arange(V) % 3 == 0, -np.inf, zp).astype(np.float32)
    out = run_rule("proposal", masked, masked)
    counts = np.bincount(out.token, minlength=V)
    assert counts[np.arange(V) % 3 == 0].sum() == 0
    assert chi2_pvalue(counts, softmax(masked)) > 0.01


def nucleus_of(z: np.ndarray, top_p: float) -> np.ndarray:
    """Reference top-p set (HF rule) computed with a sort in numpy."""
    p = softmax(z)
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros(len(z), bool)
    keep[order[before < top_p]] = True
    return keep


def test_par_converges_to_product_on_the_nucleus(logits):
    zp, zq = logits
    nucleus = nucleus_of(zp, 0.9)
    target = np.where(nucleus, softmax(zp + zq), 0)
    dists = {}
    for n in (1, 4, 32):
        out = run_rule("par", zp, zq, n=n, proposal_top_p=0.9, seed=n)
        counts = np.bincount(out.token, minlength=V)
        assert counts[~nucleus].sum() == 0
        assert np.all((out.ess >= 1 - 1e-5) & (out.ess <= n + 1e-4))
        dists[n] = tv(counts, target)
        if n == 1:  # one candidate: the proposal's nucleus distribution itself
            assert chi2_pvalue(counts, np.where(nucleus, softmax(zp), 0)) > 0.01
    assert dists[1] > dists[4] > dists[32], dists
    assert dists[32] < 0.05, dists


def test_sparse_is_q_restricted_to_the_nucleus_then_top_p(logits):
    zp, zq = logits
    nucleus = nucleus_of(zp / 0.8, 0.9)
    restricted = np.where(nucleus, zq / 0.6, -np.inf)
    expected = np.where(nucleus_of(restricted, 0.8), softmax(restricted), 0)
    out = run_rule("sparse", zp, zq, proposal_temperature=0.8, proposal_top_p=0.9, aligner_temperature=0.6,
                   aligner_top_p=0.8)
    counts = np.bincount(out.token, minlength=V)
    assert counts[~nucleus].sum() == 0
    assert chi2_pvalue(counts, expected) > 0.01
    assert chi2_pvalue(counts, np.where(nucleus, softmax(restricted), 0)) < 1e-4  # without the aligner top-p


@pytest.mark.parametrize("top_p", [0.9, 0.5, 0.3])
def test_rejection_draws_follow_the_target_with_and_without_the_exact_fallback(logits, top_p):
    """``choose`` draws aligner/proposal/sparse/product tokens by rejection (candidates from the softmax, the first
    inside the top-p set) and falls back to the exact draw for rows whose candidates are all rejected (frequent at
    top-p 0.5) or for every row (top-p 0.3 < REJECTION_MIN_TOP_P). Each gives target_logits' distribution; the
    same draws are far from the distribution without the top-p (must-fail control)."""
    zp, zq = logits
    nucleus = nucleus_of(zp / 0.8, top_p)
    cases = {
        "aligner": (dict(aligner_top_p=top_p, aligner_temperature=0.8), softmax(zq / 0.8),
                    nucleus_of(zq / 0.8, top_p)),
        "proposal": (dict(proposal_top_p=top_p, proposal_temperature=0.8), softmax(zp / 0.8), nucleus),
        "product": (dict(proposal_top_p=top_p, proposal_temperature=0.8, aligner_temperature=0.6),
                    softmax(zp / 0.8 + zq / 0.6), nucleus),
    }
    for mode, (kw, full, keep) in cases.items():
        out = run_rule(mode, zp, zq, seed=3, **kw)
        counts = np.bincount(out.token, minlength=V)
        assert counts[~keep].sum() == 0, mode
        assert chi2_pvalue(counts, np.where(keep, full, 0)) > 0.01, mode
        assert chi2_pvalue(counts, full) < 1e-4, mode


def test_kl_monitor_threshold_zero_and_infinity(logits):
    zp, zq = logits
    kl = float(np.sum(softmax(zp) * (log_softmax(zp) - log_softmax(zq))))
    common = dict(proposal_temperature=0.8, proposal_top_p=0.9, aligner_temperature=0.6, aligner_top_p=0.8)
    plain = run_rule("product", zp, zq, **common)
    never = run_rule("product", zp, zq, kl_monitor=True, kl_threshold=np.inf, **common)
    assert not never.fallback.any()
    np.testing.assert_array_equal(never.token, plain.token)
    np.testing.assert_allclose(never.kl, kl, rtol=1e-4)
    # Threshold 0: every token from P_M with its own settings ...
    # (seed 1: at seed 0 the rejection draws' 4000 tokens gave p = 0.0099 here; 100k and 200k draws of this rule
    # give p = 0.12 and 0.37)
    always = run_rule("product", zp, zq, kl_monitor=True, kl_threshold=0.0, seed=1, **common)
    assert always.fallback.all()
    counts = np.bincount(always.token, minlength=V)
    proposal = np.where(nucleus_of(zp / 0.8, 0.9), softmax(zp / 0.8), 0)
    assert chi2_pvalue(counts, proposal) > 0.01
    # ... or, with the released code's rule, from P_M's logits at the aligner's temperature and top-p.
    paper = run_rule("product", zp, zq, kl_monitor=True, kl_threshold=0.0, kl_fallback="paper", **common)
    counts = np.bincount(paper.token, minlength=V)
    assert chi2_pvalue(counts, np.where(nucleus_of(zp / 0.6, 0.8), softmax(zp / 0.6), 0)) > 0.01
    assert chi2_pvalue(counts, proposal) < 1e-4


def test_greedy_rows_take_the_argmax_of_each_target(logits):
    zp, zq = logits
    nucleus = nucleus_of(zp, 0.9)
    kw = dict(greedy=True, proposal_top_p=0.9)
    assert set(run_rule("proposal", zp, zq, **kw).token) == {int(np.argmax(zp))}
    prod = int(np.argmax(np.where(nucleus, zp + zq, -np.inf)))
    assert set(run_rule("product", zp, zq, **kw).token) == {prod}
    assert set(run_rule("par", zp, zq, n=4, **kw).token) == {prod}
    assert set(run_rule("sparse", zp, zq, **kw).token) == {int(np.argmax(np.where(nucleus, zq, -np.inf)))}


# ----------------------------------------------------------------------------------------------------------------
# Stop strings on device vs a Python reference


def test_fast_argmax_equals_jnp_argmax_with_ties_infinities_and_nans():
    """decode_rules.argmax (two fused passes; jnp.argmax is a slow variadic reduction on XLA's CPU backend) returns
    jnp.argmax's index in every row: the first of tied maxima, 0 for an all -inf row, the first NaN of a row with
    NaNs."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 300)).astype(np.float32)
    x[1, [5, 17, 290]] = 9.0  # ties: the first wins
    x[2] = -np.inf
    x[3, [40, 80]] = np.nan
    x[4, :] = np.where(np.arange(300) % 2, -np.inf, x[4])
    x[5, 299] = np.inf
    x[6] = 0.0
    np.testing.assert_array_equal(np.asarray(R.argmax(jnp.asarray(x))), np.asarray(jnp.argmax(jnp.asarray(x), -1)))


def test_stop_window_finds_strings_across_any_number_of_tokens():
    rng = np.random.default_rng(3)
    vocab = 40
    alphabet = b"ab\n:"  # small alphabet: stop strings occur often and span tokens
    tb = [bytes(rng.choice(list(alphabet), rng.integers(0, 7))) for _ in range(vocab)]
    tb[5] = b"ab:\nab:\nab:\nab"  # longer than the window
    stops = ["b:\na", "\n\n", "aaaaa", "a"]
    for stop_set in (stops[:3], stops[3:]):
        host, L = S._stop_tables(tb, stop_set, vocab)
        tables = jax.tree_util.tree_map(jnp.asarray, S._Tables(is_eos=np.zeros(vocab, bool), **host))
        B, T = 64, 30
        seq = rng.integers(0, vocab, (B, T))

        @jax.jit
        def run(seq):
            def body(window, tok):
                return S._roll_window(window, tok, tables), S._stop_hit(window, tok, tables)
            return jax.lax.scan(body, jnp.full((B, L), S._EMPTY, jnp.int16), seq.T)[1].T

        hits = np.asarray(run(seq))
        enc = [s.encode() for s in stop_set]
        for b in range(B):
            text = b""
            for t in range(T):
                before = text
                text += tb[seq[b, t]]
                # a stop string ends inside this token's bytes (and did not already end before them)
                expect = any(s in text[max(0, len(before) - len(s) + 1):] for s in enc)
                assert hits[b, t] == expect, (b, t, before, tb[seq[b, t]])


# ----------------------------------------------------------------------------------------------------------------
# Model level


@pytest.fixture(scope="module")
def models():
    pp = random_params(P_CFG, 1)
    qp = random_params(Q_CFG, 2)
    # Padded rows 48..55 get large weights: sampled they would dominate, so the vocab slice is tested too.
    pp["lm_head"][:, V:] *= 8.0
    qp["lm_head"][:, V:] *= 8.0
    p = Model(config=P_CFG, params=jax.tree_util.tree_map(jnp.asarray, pp), vocab_limit=V)
    q = Model(config=Q_CFG, params=jax.tree_util.tree_map(jnp.asarray, qp), vocab_limit=V)
    return p, q


_full_logits = jax.jit(lambda cfg, prm, toks, seg: model_lib.forward(cfg, prm, toks, None, seg)[0],
                       static_argnums=0)


def full_logits(m: Model, ids: list[int]) -> np.ndarray:
    """Logits of the next token after ``ids`` by a full forward without cache (right-padded to 32)."""
    toks = np.zeros((1, 32), np.int32)
    seg = np.zeros((1, 32), np.int32)
    toks[0, :len(ids)] = ids
    seg[0, :len(ids)] = 1
    return np.asarray(_full_logits(m.config, m.params, toks, seg))[0, len(ids) - 1]


PROMPT = [3, 17, 17, 9, 30, 17, 2]


def test_product_full_vocab_matches_both_models_exactly(models):
    p, q = models
    zp, zq = full_logits(p, PROMPT), full_logits(q, PROMPT)
    assert softmax(zp)[V:].sum() > 0.5  # the padded rows would win if they were not sliced off
    out = S.sample(p, q, [PROMPT] * 2000, mode="product", product_support="full", max_new_tokens=1, seed=0,
                   eos_ids=[], **OPEN)
    counts = np.bincount([r[0].token_ids[0] for r in out], minlength=V)
    assert len(counts) == V
    exact = softmax(log_softmax(zp[:V]) + log_softmax(zq[:V]))
    assert chi2_pvalue(counts, exact) > 0.01
    assert chi2_pvalue(counts, softmax(zp[:V])) < 1e-4  # P_M alone is a different distribution
    assert chi2_pvalue(counts, softmax(log_softmax(zp[:V]) + 0.5 * log_softmax(zq[:V]))) < 1e-4


def test_proposal_matches_hugging_face_processing(models):
    p, _ = models
    zp = full_logits(p, PROMPT)[:V]
    settings = dict(proposal_temperature=0.7, top_k=12, proposal_top_p=0.9, repetition_penalty=1.3)
    out = S.sample(p, None, [PROMPT] * 2000, mode="proposal", max_new_tokens=1, seed=1, eos_ids=[], **settings)
    counts = np.bincount([r[0].token_ids[0] for r in out], minlength=V)
    ref = hf_process(zp, temperature=0.7, top_k=12, top_p=0.9, penalty=1.3, seen_ids=PROMPT)
    assert chi2_pvalue(counts, softmax(ref)) > 0.01
    assert chi2_pvalue(counts, softmax(hf_process(zp, temperature=0.7, top_k=12, top_p=0.9))) < 1e-4


RAGGED = [[5, 6, 7], [9, 1, 2, 3, 4, 8, 8, 12, 40], [11] * 4 + list(range(20, 33))]


def test_cached_decoding_equals_full_recomputation(models):
    """Greedy product decoding through both KV caches (ragged, left-padded prompts) equals recomputing full
    forwards of both models at every step."""
    p, q = models
    out = S.sample(p, q, RAGGED, mode="product", product_support="full", greedy=True, max_new_tokens=12, seed=0,
                   eos_ids=[], **OPEN)
    for prompt, res in zip(RAGGED, out):
        ids = list(prompt)
        expected = []
        for _ in range(12):
            zp, zq = full_logits(p, ids)[:V], full_logits(q, ids)[:V]
            tok = int(np.argmax(log_softmax(zp) + log_softmax(zq)))
            expected.append(tok)
            ids.append(tok)
        assert res[0].token_ids == expected
        assert res[0].finish_reason == "length" and res[0].length == 12


BATCH = [PROMPT, [4, 4, 4], list(range(1, 14)), [7]]
PAR = dict(mode="par", n=4, max_new_tokens=10, proposal_temperature=1.0, aligner_temperature=1.0,
           proposal_top_p=0.95, repetition_penalty=1.1, kl_threshold=1e9, eos_ids=[], batch_size=4)


def test_batch_invariance_determinism_and_kl_flags(models):
    p, q = models

    def toks(prompts, **kw):
        return [r[0].token_ids for r in S.sample(p, q, prompts, **{**PAR, **kw})]

    base = toks(BATCH, seed=5)
    assert all(len(t) == 10 for t in base)
    assert toks(BATCH, seed=5) == base  # determinism
    assert toks(BATCH, seed=6) != base
    # The key follows the example index (list position + example_offset), not the row: the same prompt alone
    # (with inactive padding rows) or at another row of a batch of other prompts gets the same tokens.
    assert toks([PROMPT], seed=5)[0] == base[0]
    assert toks([BATCH[2]], seed=5, example_offset=2)[0] == base[2]
    assert toks([[8, 8], [9] * 12, PROMPT], seed=5, example_offset=-2)[2] == base[0]
    # One SamplingParams record gives what the same settings as keywords give (and keywords override it).
    fields = {k: v for k, v in PAR.items() if k in S.SamplingParams.__dataclass_fields__}
    params = S.SamplingParams(**fields)
    via_params = S.sample(p, q, BATCH, params, seed=5, eos_ids=[], batch_size=4)
    assert [r[0].token_ids for r in via_params] == base
    assert [r[0].token_ids for r in S.sample(p, q, BATCH, params.replace(n=2), seed=5, eos_ids=[], batch_size=4,
                                             n=4)] == base
    # KL threshold per prompt: 0 -> every token from P_M, inf -> none
    res = S.sample(p, q, BATCH, **{**PAR, "seed": 5, "kl_threshold": [0.0, math.inf, 0.0, 1e9]})
    assert [r[0].kl_fallback_rate for r in res] == [1.0, 0.0, 1.0, 0.0]
    assert res[1][0].token_ids == base[1] and res[3][0].token_ids == base[3]
    assert all(r[0].ess_mean is not None and 1.0 <= r[0].ess_mean <= 4.0 for r in (res[1], res[3]))
    assert res[0][0].ess_mean is None  # every token came from the fallback


def test_bf16_decode_weights(models):
    """decode_dtype=bfloat16 decodes with bf16 per-layer copies of the weights (cached per model and dtype) and
    draws valid tokens; greedy tokens mostly agree with float32 (numerics: test_model's bf16 parity test)."""
    p, q = models
    kw = {**PAR, "seed": 5, "greedy": True}
    f32 = [r[0].token_ids for r in S.sample(p, q, BATCH, **kw)]
    bf = [r[0].token_ids for r in S.sample(p, q, BATCH, decode_dtype="bfloat16", **kw)]
    cached = [w for ref, w in S._DECODE_WEIGHTS.values() if ref() is not None]
    dtypes = {str(x.dtype) for w in cached for x in jax.tree_util.tree_leaves(w)}
    assert {"bfloat16", "float32"} <= dtypes
    assert all(len(t) == 10 and all(0 <= i < V for i in t) for t in bf)
    same = np.mean([a == b for x, y in zip(f32, bf) for a, b in zip(x, y)])
    assert same >= 0.5, same


def test_decode_layout_shares_the_models_weights_on_cpu(models):
    """On one CPU device the per-layer decode weights are views of the model's stacked buffers, not a second copy
    (each layer's slice at its offset in the stack; the embedding is the same array), and hold the values of a
    copied per-layer layout."""
    p, _ = models
    _, dw = S._decode_weights(p, None, (), None)
    for name in ("wq", "w_down"):
        stacked = p.params["layers"][name]
        base, step = stacked.unsafe_buffer_pointer(), stacked[0].nbytes
        assert [layer[name].unsafe_buffer_pointer() for layer in dw["layers"]] == \
            [base + i * step for i in range(stacked.shape[0])]
    assert dw["embed"] is p.params["embed"]
    copied = jax.jit(model_lib.unstack_layers)(p.params)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), dw, copied))


def test_stream_yields_the_same_tokens(models):
    p, q = models
    expected = [r[0].token_ids for r in S.sample(p, q, BATCH, seed=5, **PAR)]
    kw = {k: v for k, v in PAR.items() if k != "batch_size"}
    events = list(S.stream(p, q, BATCH, seed=5, **kw))
    assert [e.step for e in events] == list(range(10))
    got = [[e.token_ids[r] for e in events] for r in range(4)]
    assert got == expected
    assert events[-1].finish_reasons == ["length"] * 4 and events[0].finish_reasons == [None] * 4


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    return sampling_fixtures.text_model(tmp_path_factory.mktemp("tok"), P_CFG)


TEXT = dict(mode="proposal", greedy=True, max_new_tokens=16, seed=0, batch_size=2, repetition_penalty=1.0)


def test_stop_string_spanning_two_tokens_and_eos(text_models):
    m, tok = text_models
    prompts = ["the quick brown fox", "hello world"]
    never = ["\x01\x02"]  # same table shapes as the real stop strings below: one compile
    first = S.sample(m, None, prompts, stop=never, eos_ids=[], **TEXT)
    ids = first[0][0].token_ids
    assert len(ids) == 16 and first[0][0].finish_reason == "length"
    pieces = [tok.decode([t]) for t in ids]
    # a 2-character stop string made of the last character of token k and the first of token k+1
    for k in range(1, 15):
        a, b = pieces[k], pieces[k + 1]
        stop = a[-1:] + b[:1]
        text_before = "".join(pieces[:k + 1])[:-1]
        if (len(stop) == 2 and stop.isprintable() and stop not in text_before + stop[:1]
                and stop not in a and stop not in b):
            break
    else:
        pytest.skip("no suitable token boundary in this random sample")
    res = S.sample(m, None, prompts, stop=[stop], eos_ids=[], **TEXT)[0][0]
    assert res.finish_reason == "stop" and res.length == k + 2
    assert res.token_ids == ids[:k + 2]
    assert res.text == tok.decode(ids)[: tok.decode(ids).find(stop)]
    # EOS: the row stops at the first EOS id, which is not part of token_ids
    eos = ids[5]
    first_eos = ids.index(eos)
    res = S.sample(m, None, prompts, stop=never, eos_ids=[eos], **TEXT)[0][0]
    assert res.finish_reason == "eos" and res.length == first_eos + 1 and res.token_ids == ids[:first_eos]
    assert res.text == tok.decode(ids[:first_eos])


def test_greedy_proposal_equals_transformers_generate(tmp_path):
    """Parity with transformers on the same weights (a Qwen2 checkpoint loaded through ramjax.hf): greedy decoding
    with HF's repetition penalty, our two ragged prompts batched and left-padded, HF's one at a time."""
    import torch
    from hf_fixtures import HFSpec, make_hf_model

    from ramjax.api import load_model

    ref = make_hf_model(tmp_path / "qwen", HFSpec(arch="qwen2", vocab_size=64, num_kv_heads=1, tied=True, seed=7))
    m = load_model(tmp_path / "qwen")
    prompts = [[5, 9, 9, 2, 31], [7, 1, 1, 40, 40, 40, 12, 3, 22, 8, 19]]
    ours = S.sample(m, None, prompts, mode="proposal", greedy=True, max_new_tokens=12, repetition_penalty=1.3,
                    eos_ids=[], batch_size=2)
    for prompt, res in zip(prompts, ours):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                               repetition_penalty=1.3, pad_token_id=0, attention_mask=torch.ones(1, len(prompt)))
        assert res[0].token_ids == out[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_named_errors(models, text_models):
    from ramjax.tokenizer import VocabMismatchError

    p, q = models
    with pytest.raises(S.ModeError, match="unknown mode"):
        S.sample(p, q, [[1]], mode="beam")
    with pytest.raises(S.ModeError, match="needs the aligner"):
        S.sample(p, None, [[1]], mode="par")
    with pytest.raises(S.SamplingParameterError, match="n=0"):
        S.sample(p, q, [[1]], n=0)
    with pytest.raises(S.SamplingParameterError, match="did you mean 'kl_threshold'"):
        S.sample(p, q, [[1]], kl_treshold=0.2)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(S.SamplingParameterError, match="top_p"):
            S.sample(p, q, [[1]], proposal_top_p=bad)
    with pytest.raises(S.SamplingParameterError, match="aligner_top_p"):
        S.sample(p, q, [[1], [2]], aligner_top_p=[0.5, 2.0])
    with pytest.raises(S.SamplingParameterError, match="temperature"):
        S.sample(p, q, [[1]], proposal_temperature=-1.0)
    with pytest.raises(S.SamplingParameterError, match="one per prompt"):
        S.sample(p, q, [[1]], top_k=[1, 2])
    with pytest.raises(S.ContextLengthError, match="max_position_embeddings"):
        S.sample(p, q, [list(range(1, 40)) * 3], max_new_tokens=16)
    with pytest.raises(S.PromptError, match="no tokens"):
        S.sample(p, q, [[]])
    with pytest.raises(S.PromptError, match="outside the vocabulary"):
        S.sample(p, q, [[1, V]])
    with pytest.raises(S.PromptError, match="no tokenizer"):
        S.sample(p, q, ["text"])
    with pytest.raises(S.SamplingParameterError, match="stop strings need a tokenizer"):
        S.sample(p, q, [[1]], stop=["x"])
    with pytest.raises(VocabMismatchError, match="usable token ids"):
        S.sample(p, Model(config=Q_CFG, params=q.params, vocab_limit=V - 1), [[1]])
    m, tok = text_models
    import tempfile

    from tokenizer_fixtures import make_hf_tokenizer

    from ramjax.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as d:
        make_hf_tokenizer(d, "qwen")
        other = load_tokenizer(d)
    q_other = Model(config=m.config.replace(vocab_size=other.vocab_size), params=m.params, tokenizer=other)
    with pytest.raises(VocabMismatchError):
        S.sample(m, q_other, ["hi"], mode="sparse")


# ----------------------------------------------------------------------------------------------------------------
# sample.py and the JSONL loop


@pytest.fixture(scope="module")
def model_dir(text_models, tmp_path_factory):
    from ramjax import checkpoint

    m, tok = text_models
    d = tmp_path_factory.mktemp("model") / "pm"
    checkpoint.save_model_dir(d, m.config, m.params, tok)
    return d


def _write_jsonl(path, rows):
    import json

    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


RECORDS = [
    {"prompt": "the quick brown fox", "response": "jumps"},
    {"instruction": "add the numbers", "input": "2 and 3", "output": "5"},
    {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"}]},
    {"prompt": "sort the letters", "response": "abc"},
    {"prompt": "copy the word alignment", "response": "alignment"},
]


def test_sample_py_writes_samples_alpaca_and_resumable_training_data(model_dir, tmp_path):
    import json

    import sample as sample_cli
    from ramjax import data as data_lib

    prompts = tmp_path / "prompts.jsonl"
    _write_jsonl(prompts, RECORDS)
    common = [f"proposal={model_dir}", f"prompts_file={prompts}", "mode=proposal", "max_new_tokens=6",
              "proposal_temperature=1.0", "seed=3"]
    out, alpaca = tmp_path / "out" / "samples.jsonl", tmp_path / "out" / "alpaca.json"
    assert sample_cli.main(common + [f"output_file={out}", f"alpaca_output={alpaca}", "num_samples=2",
                                     "batch_size=4", "generator=tiny"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(d["index"], d["sample_index"]) for d in lines] == [(i, j) for i in range(5) for j in range(2)]
    assert all(set(d) >= {"prompt", "text", "token_ids", "finish_reason", "length", "kl_fallback_rate",
                          "ess_mean"} for d in lines)
    assert lines[2]["prompt"] == "add the numbers\n\n2 and 3"
    assert lines[4]["prompt"] == [{"role": "user", "content": "hello world"}]  # the reference turn is left out
    ae = json.loads(alpaca.read_text())
    assert [a["instruction"] for a in ae] == ["the quick brown fox", "add the numbers\n\n2 and 3", "hello world",
                                              "sort the letters", "copy the word alignment"]
    assert all(a["generator"] == "tiny" and isinstance(a["output"], str) for a in ae)

    # Training data: every example with P_M's sample; an interrupted run continues without duplicates or losses.
    train_args = common + ["batch_size=2", "--training-data"]
    full = tmp_path / "full.jsonl"
    assert sample_cli.main(train_args + [f"output_file={full}"]) == 0
    reference = full.read_text()
    part = tmp_path / "part.jsonl"
    ref_lines = reference.splitlines(keepends=True)
    part.write_text("".join(ref_lines[:3]) + ref_lines[3][:10])  # killed while writing the 4th line
    assert sample_cli.main(train_args + [f"output_file={part}"]) == 0
    assert part.read_text() == reference
    assert sample_cli.main(train_args + [f"output_file={part}"]) == 0  # nothing left to do
    assert part.read_text() == reference
    recs = data_lib.read_jsonl(str(full))
    assert [r.format for r in recs] == ["proposal_samples"] * 5
    assert all(isinstance(r.data["proposal"], str) for r in recs)
    assert recs[2].data["messages"][-1] == {"role": "assistant", "content": "hi"}  # the original example is kept


def test_sample_py_reports_bad_config(tmp_path, capsys):
    import sample as sample_cli

    assert sample_cli.main([f"prompts_file={tmp_path}/p.jsonl", "proposal=x", "mode=beam"]) == 2
    assert "sampling.mode" in capsys.readouterr().err  # the bare key was read as the sampling section's


def test_sharded_mesh_gives_the_same_tokens(models):
    """Explicit shardings on a (data 2, fsdp 2, tensor 2) mesh of simulated devices: same tokens as one device."""
    from ramjax import sharding as shd

    p, q = models
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    q2 = Q_CFG.replace(num_kv_heads=2)  # kv heads must divide the tensor axis
    qp = jax.tree_util.tree_map(jnp.asarray, random_params(q2, 2))
    q0 = Model(config=q2, params=qp, vocab_limit=V)
    sp = Model(config=P_CFG, params=p.params, vocab_limit=V, mesh=mesh)
    sq = Model(config=q2, params=qp, vocab_limit=V, mesh=mesh)
    kw = {**PAR, "batch_size": None, "seed": 2}
    single = [r[0].token_ids for r in S.sample(p, q0, RAGGED, **kw)]
    assert [r[0].token_ids for r in S.sample(sp, sq, RAGGED, **kw)] == single
    kw.pop("batch_size")
    events = list(S.stream(sp, sq, RAGGED, **kw))
    assert [[e.token_ids[r] for e in events] for r in range(3)] == single
