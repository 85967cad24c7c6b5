"""Per-token decoding rules: how one token is drawn from the proposal P_M's and the aligner Q_θ's logits.

Everything here is a pure function of batched arrays (``[B, V]`` logits, ``[B]`` per-row parameters and keys),
used inside the jitted decode loop of ``ramjax.sampler``. ``V`` is the usable vocabulary (padded embedding rows
already sliced off), so no padded id can ever be drawn.

Logit processing follows Hugging Face ``generate``: repetition penalty (over every token seen so far, prompt
included), then temperature, then top-k, then top-p. Top-k and top-p keep every token tied with the last kept
one (HF keeps an arbitrary subset of a tie), otherwise the kept sets are HF's.

The proposal's *nucleus* is the support of its processed distribution (penalty, ``T_M``, top-k, ``top_p_M``):
the set ``par`` draws candidates from and ``sparse``/``product`` restrict to.

Modes (``t`` below is the token drawn; ``z_M``/``z_Q`` penalised logits; all distributions renormalised):

* ``proposal``: P_M processed with its own settings.
* ``aligner``:  Q_θ processed with the aligner-side settings (``T_Q``, top-k, ``top_p_Q``).
* ``par``:      n candidates i.i.d. from P_M's processed distribution, self-normalised weights
                ``w_i ∝ exp(z_Q[c_i] / T_Q)`` (raw aligner logits), draw one candidate by ``w``. As n → ∞ this is
                ``product`` restricted to the nucleus. The effective sample size ``1/Σw²`` is recorded.
* ``sparse``:   the authors' released rule: ``softmax(z_Q / T_Q)`` restricted to P_M's nucleus, then top-p
                ``top_p_Q`` on that restricted distribution. As in the released code, this nucleus comes from P_M's
                *raw* logits (``T_M``, top-k, ``top_p_M``, no repetition penalty); the penalty acts on the
                aligner's logits only.
* ``product``:  exact ``softmax(z_M / T_M + z_Q_raw / T_Q)`` over the nucleus (``support="nucleus"``) or the
                whole vocabulary (``support="full"``).

KL monitor (par / sparse / product): ``KL(P_M ‖ Q_θ)`` from the untempered, unpenalised logits over the whole
vocabulary; where it exceeds ``kl_threshold`` the token is drawn by the fallback rule instead:
``"proposal"`` (default: P_M processed with its own settings, i.e. exactly the ``proposal`` mode) or
``"paper"`` (the released code: P_M's logits with the aligner-side temperature, repetition penalty and
``top_p_Q``, no top-k).

Greedy rows (``greedy`` flag) take the argmax of the same target instead of a draw: for ``par`` that is the
product's argmax over the nucleus (its n → ∞ limit). A temperature of 0 counts as 1 inside the formulas; the
caller turns temperature 0 into the greedy flag.

Costs. Sorting is avoided: XLA's CPU sort of ``[32, 8192]`` logits takes longer than the model step. Every fused
pass over ``[8, 49152]`` costs ~0.1 ms on CPU, so the rule's cost is its number of passes. ``choose`` mostly does
not compute a top-p set at all: it draws ``N_CANDIDATES`` i.i.d. candidates from the untruncated softmax and keeps
the first one inside the set, a one-pass test per candidate (``_rejection_token``; exact, with an exact fallback;
~6 passes in all). Where the set is needed (``target_logits``, ``sparse``'s P_M nucleus, ``par``), it comes from a
top-k fast path (``lax.top_k`` of 64, for peaked rows) or from a one-pass histogram of the mass (CPU; elsewhere
value halvings) with an exact finish (``ramjax.nucleus``; flat rows: ~6 passes, ~16 with the halvings), never a sort;
draws use two-level inverse-CDF sampling (one uniform per draw) instead of Gumbel noise over the whole vocabulary;
greedy rows use a two-pass ``argmax`` (``jnp.argmax`` is a slow variadic reduction on CPU), only in steps that have
one.
"""
from __future__ import annotations

import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

from ramjax.nucleus import _filtered, _in_nucleus, _nucleus, filter_logits, nucleus_mask  # noqa: F401 (API)

MODES = ("proposal", "aligner", "par", "sparse", "product", "inra")
RAM_MODES = ("par", "sparse", "product")
FALLBACKS = ("proposal", "paper")
SUPPORTS = ("nucleus", "full")
NEG_INF = -jnp.inf

Mode = Literal["proposal", "aligner", "par", "sparse", "product", "inra"]


@flax.struct.dataclass
class RowParams:
    """Per-row sampling parameters, all ``[B]`` traced arrays (changing them never recompiles).

    proposal_temperature, aligner_temperature: float32, > 0 (0 is mapped to 1 and ``greedy`` set by the caller).
    proposal_top_p, aligner_top_p: float32 in (0, 1]; 1 keeps everything.
    top_k: int32, 0 = off. Applies to the proposal (and to the aligner in ``aligner`` mode).
    repetition_penalty: float32 > 0, 1 = off.
    kl_threshold: float32; ``inf`` = monitor off.
    greedy: bool, argmax instead of a draw.
    inra_lambda: float32, InRa's mixing weight λ per row (mode ``inra``: the model mixes its two streams'
        logits as ``(1−λ)·h_bypass + λ·h_adapter`` before the proposal-side processing); None elsewhere.
    """

    proposal_temperature: jax.Array
    aligner_temperature: jax.Array
    proposal_top_p: jax.Array
    aligner_top_p: jax.Array
    top_k: jax.Array
    repetition_penalty: jax.Array
    kl_threshold: jax.Array
    greedy: jax.Array
    inra_lambda: jax.Array | None = None


@flax.struct.dataclass
class TokenChoice:
    """What one step chose, per row ``[B]``: the token, whether the KL fallback fired, the ESS of the par weights
    (NaN outside ``par`` or where the fallback fired) and ``KL(P_M ‖ Q_θ)`` (NaN where not computed)."""

    token: jax.Array
    fallback: jax.Array
    ess: jax.Array
    kl: jax.Array


# ----------------------------------------------------------------------------------------------------------------
# Logit processing (Hugging Face order)


def repetition_penalty(z_bv: jax.Array, seen_bv: jax.Array, penalty_b: jax.Array) -> jax.Array:
    """HF's rule on tokens already seen: negative logits are multiplied by the penalty, positive ones divided."""
    p = penalty_b[:, None]
    return jnp.where(seen_bv, jnp.where(z_bv < 0, z_bv * p, z_bv / p), z_bv)


def safe_temperature(t_b: jax.Array) -> jax.Array:
    """Temperature with 0 (greedy) mapped to 1 so divisions stay finite; ``[B, 1]`` for broadcasting."""
    return jnp.where(t_b > 0, t_b, 1.0)[:, None]


def kl_divergence(zp_bv: jax.Array, zq_bv: jax.Array) -> jax.Array:
    """``KL(softmax(zp) ‖ softmax(zq))`` per row ``[B]`` over the whole (usable) vocabulary."""
    lp = jax.nn.log_softmax(zp_bv, axis=-1)
    lq = jax.nn.log_softmax(zq_bv, axis=-1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Draws


def _prefix_sums(x: jax.Array) -> jax.Array:
    """Inclusive cumulative sum over the last axis as a matmul with a triangular matrix (XLA's CPU cumsum is
    several times slower at these sizes); float32 accumulation at full precision on every backend."""
    n = x.shape[-1]
    tri = jnp.triu(jnp.ones((n, n), x.dtype))
    return jnp.einsum("...i,ij->...j", x, tri, precision=jax.lax.Precision.HIGHEST)


def _chunk_size(vocab: int) -> int:
    return max(16, 1 << math.isqrt(max(vocab - 1, 1)).bit_length())


def _inverse_cdf(logits_bv: jax.Array, u_bn: jax.Array, weights_bv: jax.Array | None = None) -> jax.Array:
    """Token ids ``[B, n]`` for uniforms ``u`` in [0, 1): the first id whose cumulative probability exceeds
    ``u · total``, found in two levels (chunk of ~sqrt(V) ids, then the id inside it). A token of probability
    zero (``-inf`` logit) is never returned. ``weights_bv``: ``exp(logits - max logits)`` when the caller has it."""
    B, V = logits_bv.shape
    C = _chunk_size(V)
    G = -(-V // C)
    probs = weights_bv
    if probs is None:
        probs = jnp.exp(logits_bv - jnp.max(logits_bv, axis=-1, keepdims=True))  # -inf -> exactly 0
    probs = jnp.pad(probs, ((0, 0), (0, G * C - V))).reshape(B, G, C)
    chunk_mass = jnp.sum(probs, axis=-1)  # [B, G]
    chunk_cdf = _prefix_sums(chunk_mass)
    target = u_bn * chunk_cdf[:, -1:]  # [B, n]
    g = jnp.sum(chunk_cdf[:, None, :] <= target[:, :, None], axis=-1)
    # u · total can round up to the total: clamp to the last chunk (and below, the last id) with mass.
    last_g = G - 1 - jnp.argmax((chunk_mass > 0)[:, ::-1], axis=-1)
    g = jnp.minimum(g, last_g[:, None])
    before = jnp.take_along_axis(chunk_cdf - chunk_mass, g, axis=-1)
    rows = jnp.take_along_axis(probs, g[:, :, None], axis=1)  # [B, n, C]
    j = jnp.sum(_prefix_sums(rows) <= (target - before)[:, :, None], axis=-1)
    last_j = C - 1 - jnp.argmax((rows > 0)[:, :, ::-1], axis=-1)
    return (g * C + jnp.minimum(j, last_j)).astype(jnp.int32)


def argmax(x_bv: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` as int32 ``[B]`` (the first index of the largest value; a row holding a NaN gives
    its first NaN), in two fused passes: XLA's CPU backend lowers ``jnp.argmax`` to a variadic (value, index)
    reduction that runs ~60x slower than a ``max`` (1.8 ms on ``[8, 49152]``, a fifth of the whole rule)."""
    V = x_bv.shape[-1]
    nan = jnp.isnan(x_bv)
    m = jnp.max(x_bv, axis=-1, keepdims=True)
    idx = jnp.arange(V, dtype=jnp.int32)
    return jnp.min(jnp.where((x_bv == m) | nan, idx, V), axis=-1).astype(jnp.int32)


def draw(u_b: jax.Array, logits_bv: jax.Array, greedy_b: jax.Array, weights_bv: jax.Array | None = None
         ) -> jax.Array:
    """One token per row ``[B]`` from ``softmax(logits)`` (``-inf`` = excluded) by the uniform ``u`` in [0, 1), or
    its argmax where greedy (computed only in steps with a greedy row). ``weights_bv``: ``exp(logits - max)`` when
    the caller has it (``Target.weights``; saves an exp pass), else computed here."""
    sampled = _inverse_cdf(logits_bv, u_b[:, None], weights_bv)[:, 0]
    return jax.lax.cond(jnp.any(greedy_b), lambda: jnp.where(greedy_b, argmax(logits_bv), sampled), lambda: sampled)


def par_draw(u_cand_bn: jax.Array, u_pick_b: jax.Array, proposal_bv: jax.Array, weight_logits_bv: jax.Array,
             proposal_weights_bv: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Proposing–Aligning–Reducing: n candidates from ``softmax(proposal)`` (with replacement; one uniform each),
    self-normalised weights ``softmax(weight_logits[c])`` over the candidates (duplicates count), one candidate
    drawn by weight (uniform ``u_pick``).

    ``proposal_weights_bv``: ``exp(proposal - max)`` when the caller has it (saves an exp pass).
    Returns the token ``[B]`` and the effective sample size ``1/Σ w_i²`` ``[B]`` (in [1, n]).
    """
    n = u_cand_bn.shape[-1]
    cand = _inverse_cdf(proposal_bv, u_cand_bn, proposal_weights_bv)  # [B, n]
    logw = jnp.take_along_axis(weight_logits_bv, cand, axis=-1)
    w = jax.nn.softmax(logw, axis=-1)
    ess = 1.0 / jnp.sum(w * w, axis=-1)
    # Inverse CDF over the n weights (n is small: a direct cumulative sum).
    pick = jnp.sum(jnp.cumsum(w, axis=-1) <= (u_pick_b * jnp.sum(w, axis=-1))[:, None], axis=-1)
    pick = jnp.minimum(pick, n - 1)
    return jnp.take_along_axis(cand, pick[:, None], axis=-1)[:, 0], ess


def num_uniforms(mode: str, n: int) -> int:
    """Uniforms ``choose`` consumes per row and step: the draw, the fallback draw, and for par the pick and the
    n candidates, for every other mode the ``N_CANDIDATES`` candidates of the rejection draw."""
    return 3 + n if mode == "par" else 2 + N_CANDIDATES


# ----------------------------------------------------------------------------------------------------------------
# Rejection draws: a token of a top-p target without finding the nucleus


N_CANDIDATES = 4  # candidates per row and step of the rejection draw
REJECTION_MIN_TOP_P = 0.5  # below this a row's candidates are rejected too often: the exact path runs instead


def _in_top_p(x_bv: jax.Array, e_bv: jax.Array, s_b: jax.Array, top_p_b: jax.Array, t_b: jax.Array) -> jax.Array:
    """Whether token ``t`` ``[B]`` lies in the top-p nucleus of ``softmax(x)`` (no top-k), in one fused pass: it
    does iff the mass of the tokens strictly above it is below ``top_p`` (``nucleus_mask``'s set, HF's rule; the
    ties of the last kept token are all kept). ``e = exp(x - max x)``, ``s`` its row sums."""
    xt = jnp.take_along_axis(x_bv, t_b[:, None], axis=-1)
    above = jnp.sum(jnp.where(x_bv > xt, e_bv, 0.0), axis=-1)
    return (top_p_b >= 1.0) | (above < top_p_b * s_b)


def _first_kept(cand_bn: jax.Array, keep, done_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row, the first candidate (``[B, n]``, in order) that ``keep`` (``[B]`` tokens -> ``[B]`` bool) accepts,
    and whether one was; rows already ``done`` are skipped. Candidates are tested one at a time, for all rows
    together, only while some row has none yet (each test is a pass over the vocabulary)."""
    B, n = cand_bn.shape

    def body(c):
        i, tok, done = c
        t = jax.lax.dynamic_index_in_dim(cand_bn, i, axis=1, keepdims=False)
        ok = ~done & keep(t)
        return i + 1, jnp.where(ok, t, tok), done | ok

    _, tok, done = jax.lax.while_loop(lambda c: (c[0] < n) & ~jnp.all(c[2]), body,
                                      (0, cand_bn[:, 0], done_b))
    return tok, done


def _rejection_token(u_b, u_cand_bn, x_bv, e_bv, keep, exact, greedy_b, greedy_token, use):
    """One token per row from ``softmax(x)`` restricted to the set ``keep`` tests, exactly, without computing the
    set: i.i.d. candidates from ``softmax(x)`` (weights ``e = exp(x - max x)``; one uniform each), the first one
    ``keep`` accepts. A row whose ``N_CANDIDATES`` are all rejected (probability (1 - kept mass)^n) draws from
    ``exact()`` (the target's logits and weights, as ``draw`` takes them) with ``u``; so does every row when
    ``use`` (a traced bool) is False. The first accepted of i.i.d. proposals, or else an exact draw, is distributed
    exactly as the target. Greedy rows take ``greedy_token()`` (computed only in steps with a greedy row)."""
    no = jnp.zeros(x_bv.shape[:1], bool)

    def exact_draw():
        logits, weights = exact()
        return draw(u_b, logits, no, weights)

    def rejection():
        cand = _inverse_cdf(x_bv, u_cand_bn, e_bv)
        tok, done = _first_kept(cand, keep, greedy_b)
        return jax.lax.cond(jnp.all(done), lambda: tok, lambda: jnp.where(done, tok, exact_draw()))

    tok = jax.lax.cond(use, rejection, exact_draw)
    return jax.lax.cond(jnp.any(greedy_b), lambda: jnp.where(greedy_b, greedy_token(), tok), lambda: tok)


# ----------------------------------------------------------------------------------------------------------------
# One step


@flax.struct.dataclass
class Target:
    """The processed per-token target of a mode, per row: ``logits`` ``[B, V]`` (``-inf`` outside the support; the
    distribution is ``softmax(logits)``), whether the KL fallback rule replaced the mode's rule (``fired`` ``[B]``)
    and ``KL(P_M ‖ Q_θ)`` (``kl`` ``[B]``, NaN when the monitor is off). ``weights``: ``exp(logits - max)``
    ``[B, V]`` where the rule computed it on the way (``draw`` then skips its exp pass), else None."""

    logits: jax.Array
    fired: jax.Array
    kl: jax.Array
    weights: jax.Array | None = None


def _fallback_logits(zp_bv, zp_pen, params: RowParams, kl_fallback: str) -> tuple[jax.Array, jax.Array]:
    """The KL fallback's filtered logits and draw weights (``_filtered``)."""
    if kl_fallback == "proposal":
        return _filtered(zp_pen / safe_temperature(params.proposal_temperature), params.top_k,
                         params.proposal_top_p)
    return _filtered(zp_pen / safe_temperature(params.aligner_temperature), jnp.zeros_like(params.top_k),
                     params.aligner_top_p)


def target_logits(mode: str, zp_bv: jax.Array | None, zq_bv: jax.Array | None, seen_bv: jax.Array,
                  params: RowParams, *, kl_fallback: str = "proposal", product_support: str = "nucleus",
                  kl_monitor: bool = True) -> Target:
    """The exact per-token distribution of every mode with a closed form (all but ``par``), KL monitor included.

    This one function defines the target both of the token-level sampler (``choose`` draws from its distribution:
    by rejection against the same top-p sets where it can, ``_mode_token``, else from these logits; the rule tests
    compare the two) and of speculative decoding (``ramjax.speculative`` accepts drafts against it).
    zp_bv, zq_bv: float32 logits ``[B, V]`` (None where the mode does not use the model); seen_bv: bool ``[B, V]``
    the repetition-penalty set as of this position. Greedy rows are not special here (their token is the argmax).
    """
    if mode not in MODES or mode == "par":
        raise ValueError(f"mode {mode!r} has no closed-form target; expected one of "
                         f"{tuple(m for m in MODES if m != 'par')}")
    B = (zp_bv if zp_bv is not None else zq_bv).shape[0]
    nan = jnp.full((B,), jnp.nan, jnp.float32)
    no = jnp.zeros((B,), bool)
    rp = params.repetition_penalty
    if mode == "aligner":
        zq = repetition_penalty(zq_bv, seen_bv, rp) / safe_temperature(params.aligner_temperature)
        logits, weights = _filtered(zq, params.top_k, params.aligner_top_p)
        return Target(logits, no, nan, weights)

    # P_M processed with its own settings; its support is the nucleus.
    zp_pen = repetition_penalty(zp_bv, seen_bv, rp)
    t_p = safe_temperature(params.proposal_temperature)
    zp_t = zp_pen / t_p
    if mode in ("proposal", "inra"):  # InRa: zp already holds the λ-mixed logits of its two streams
        logits, weights = _filtered(zp_t, params.top_k, params.proposal_top_p)
        return Target(logits, no, nan, weights)

    t_q = safe_temperature(params.aligner_temperature)
    if mode == "product" and product_support not in SUPPORTS:
        raise ValueError(f"unknown product_support {product_support!r}; expected one of {SUPPORTS}")

    def main() -> tuple[jax.Array, jax.Array | None]:  # the logits, and the draw weights where computed anyway
        if mode == "sparse":
            # The released rule: P_M's nucleus from its raw (unpenalised) logits at T_M; the penalty applies to the
            # aligner's logits only (their ParKlLogitsWarper filters the base logits, then the aligner-side
            # processors run: temperature, repetition penalty, top-p).
            zp_raw_t = zp_bv / t_p
            nucleus = _in_nucleus(zp_raw_t, _nucleus(zp_raw_t, params.top_k, params.proposal_top_p)[0])
            zq_pen_t = repetition_penalty(zq_bv, seen_bv, rp) / t_q
            restricted = jnp.where(nucleus, zq_pen_t, NEG_INF)
            return _filtered(restricted, jnp.zeros_like(params.top_k), params.aligner_top_p)
        logits = zp_t + zq_bv / t_q  # product
        if product_support == "nucleus":
            logits = jnp.where(nucleus_mask(zp_t, params.top_k, params.proposal_top_p), logits, NEG_INF)
        return logits, None

    if not kl_monitor:
        logits, weights = main()
        return Target(logits, no, nan, weights)
    if kl_fallback not in FALLBACKS:
        raise ValueError(f"unknown kl_fallback {kl_fallback!r}; expected one of {FALLBACKS}")
    kl = kl_divergence(zp_bv, zq_bv)
    fired = kl > params.kl_threshold
    # Each rule runs only in steps where some row needs it (the KL is known first): the mode's rule where no row
    # fired, the fallback's where every row did, both (selected per row) otherwise.
    if mode == "product":  # its rule has no weights on the way: the fallback's are dropped too (same structure)
        logits = _by_rows(fired, lambda: _fallback_logits(zp_bv, zp_pen, params, kl_fallback)[0],
                          lambda: main()[0])
        return Target(logits, fired, kl)
    logits, weights = _by_rows(fired, lambda: _fallback_logits(zp_bv, zp_pen, params, kl_fallback), main)
    return Target(logits, fired, kl, weights)


def _top_p_token(x_bv, top_k_b, top_p_b, u_b, u_cand_bn, greedy_b) -> jax.Array:
    """A token of ``filter_logits(x, top_k, top_p)``'s distribution per row ``[B]`` (its argmax where greedy): by
    rejection from ``softmax(x)`` (``_rejection_token``) where no row has top-k and every sampled row's top-p is
    ``>= REJECTION_MIN_TOP_P``, else by ``draw`` from the filtered logits."""
    e = jnp.exp(x_bv - jnp.max(x_bv, axis=-1, keepdims=True))
    s = jnp.sum(e, axis=-1)
    use = jnp.all(top_k_b == 0) & jnp.all((top_p_b >= REJECTION_MIN_TOP_P) | greedy_b)
    return _rejection_token(u_b, u_cand_bn, x_bv, e, lambda t: _in_top_p(x_bv, e, s, top_p_b, t),
                            lambda: _filtered(x_bv, top_k_b, top_p_b), greedy_b, lambda: argmax(x_bv), use)


def _mode_token(mode: str, zp_bv, zq_bv, seen_bv, params: RowParams, u_b, u_cand_bn, product_support: str
                ) -> jax.Array:
    """A token per row ``[B]`` of the mode's own rule (``target_logits`` without the KL monitor; not par), drawn
    without computing the support where the rule allows: ``aligner``/``proposal``/``inra`` and ``sparse``'s
    aligner-side top-p by rejection against their top-p set, ``product`` by rejection against P_M's nucleus
    (``_rejection_token``). The same distribution as ``draw`` from ``target_logits`` (tested), other tokens."""
    greedy = params.greedy
    rp = params.repetition_penalty
    zero_k = jnp.zeros_like(params.top_k)
    if mode == "aligner":
        zq = repetition_penalty(zq_bv, seen_bv, rp) / safe_temperature(params.aligner_temperature)
        return _top_p_token(zq, params.top_k, params.aligner_top_p, u_b, u_cand_bn, greedy)
    t_p = safe_temperature(params.proposal_temperature)
    if mode in ("proposal", "inra"):
        zp_t = repetition_penalty(zp_bv, seen_bv, rp) / t_p
        return _top_p_token(zp_t, params.top_k, params.proposal_top_p, u_b, u_cand_bn, greedy)
    t_q = safe_temperature(params.aligner_temperature)
    if mode == "sparse":  # P_M's nucleus exactly (raw logits), then the aligner-side top-p by rejection
        zp_raw_t = zp_bv / t_p
        nucleus = _in_nucleus(zp_raw_t, _nucleus(zp_raw_t, params.top_k, params.proposal_top_p)[0])
        restricted = jnp.where(nucleus, repetition_penalty(zq_bv, seen_bv, rp) / t_q, NEG_INF)
        return _top_p_token(restricted, zero_k, params.aligner_top_p, u_b, u_cand_bn, greedy)
    if mode != "product":
        raise ValueError(f"mode {mode!r} has no closed-form target")
    zp_t = repetition_penalty(zp_bv, seen_bv, rp) / t_p
    y = zp_t + zq_bv / t_q
    e_y = jnp.exp(y - jnp.max(y, axis=-1, keepdims=True))
    if product_support == "full":
        return draw(u_b, y, greedy, e_y)
    # Candidates from the product over the whole vocabulary, kept where they lie in P_M's nucleus. Greedy rows
    # need the nucleus' argmax: a step with one takes the exact path.
    e_p = jnp.exp(zp_t - jnp.max(zp_t, axis=-1, keepdims=True))
    s_p = jnp.sum(e_p, axis=-1)
    use = (jnp.all(params.top_k == 0) & jnp.all(params.proposal_top_p >= REJECTION_MIN_TOP_P)
           & ~jnp.any(greedy))

    def exact():
        return jnp.where(nucleus_mask(zp_t, params.top_k, params.proposal_top_p), y, NEG_INF), None

    def greedy_token():
        return argmax(exact()[0])

    no = jnp.zeros_like(greedy)
    tok = _rejection_token(u_b, u_cand_bn, y, e_y, lambda t: _in_top_p(zp_t, e_p, s_p, params.proposal_top_p, t),
                           exact, no, greedy_token, use)
    return jax.lax.cond(jnp.any(greedy), lambda: jnp.where(greedy, greedy_token(), tok), lambda: tok)


def _fallback_token(zp_bv, seen_bv, params: RowParams, kl_fallback: str, u_b, u_cand_bn) -> jax.Array:
    """A token per row of the KL fallback rule (``_fallback_logits``' distribution), by ``_top_p_token``."""
    zp_pen = repetition_penalty(zp_bv, seen_bv, params.repetition_penalty)
    if kl_fallback == "proposal":
        return _top_p_token(zp_pen / safe_temperature(params.proposal_temperature), params.top_k,
                            params.proposal_top_p, u_b, u_cand_bn, params.greedy)
    return _top_p_token(zp_pen / safe_temperature(params.aligner_temperature), jnp.zeros_like(params.top_k),
                        params.aligner_top_p, u_b, u_cand_bn, params.greedy)


def _by_rows(fired_b: jax.Array, on_fired, on_rest):
    """``where(fired, on_fired(), on_rest())`` per row (leading axis), evaluating a branch only when some row
    takes it."""
    def both():
        return jax.tree_util.tree_map(lambda a, b: jnp.where(fired_b.reshape(fired_b.shape + (1,) * (a.ndim - 1)),
                                                             a, b), on_fired(), on_rest())

    which = jnp.where(jnp.all(fired_b), 1, jnp.where(jnp.any(fired_b), 2, 0))
    return jax.lax.switch(which, [on_rest, on_fired, both])


def choose(mode: str, zp_bv: jax.Array | None, zq_bv: jax.Array | None, seen_bv: jax.Array, u_bm: jax.Array,
           params: RowParams, *, kl_fallback: str = "proposal", product_support: str = "nucleus",
           kl_monitor: bool = True) -> TokenChoice:
    """Draws the next token of every row: from ``target_logits``' distribution in every mode but ``par`` (by
    rejection where the rule allows, ``_mode_token``), which draws candidates and weights (and, where the KL
    fallback fires, from the fallback rule).

    zp_bv, zq_bv: float32 logits ``[B, V]`` of P_M and Q_θ (None where the mode does not use the model).
    seen_bv:      bool ``[B, V]``, tokens already in the row (prompt and generated) for the repetition penalty.
    u_bm:         uniforms in [0, 1) ``[B, num_uniforms(mode, n)]`` for this step (par: n = m - 3 candidates).
    kl_monitor:   static switch; when False the KL is not computed at all (every row's threshold is ``inf``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    B = u_bm.shape[0]
    nan = jnp.full((B,), jnp.nan, jnp.float32)
    u_main, u_fallback = u_bm[:, 0], u_bm[:, 1]
    greedy = params.greedy
    if mode != "par":
        # The distribution of ``target_logits`` (which defines it), drawn by ``_mode_token``/``_fallback_token``.
        if mode == "product" and product_support not in SUPPORTS:
            raise ValueError(f"unknown product_support {product_support!r}; expected one of {SUPPORTS}")
        u_cand = u_bm[:, 2:]

        def main_token():
            return _mode_token(mode, zp_bv, zq_bv, seen_bv, params, u_main, u_cand, product_support)

        no = jnp.zeros((B,), bool)
        if not kl_monitor or mode in ("proposal", "aligner", "inra"):
            return TokenChoice(main_token(), no, nan, nan)
        if kl_fallback not in FALLBACKS:
            raise ValueError(f"unknown kl_fallback {kl_fallback!r}; expected one of {FALLBACKS}")
        kl = kl_divergence(zp_bv, zq_bv)
        fired = kl > params.kl_threshold
        # Each rule runs only in steps where some row needs it (a row uses one rule: they share the candidates).
        tok = _by_rows(fired, lambda: _fallback_token(zp_bv, seen_bv, params, kl_fallback, u_fallback, u_cand),
                       main_token)
        return TokenChoice(tok, fired, nan, kl)

    zp_pen = repetition_penalty(zp_bv, seen_bv, params.repetition_penalty)

    def par_token() -> tuple[jax.Array, jax.Array]:
        zp_t = zp_pen / safe_temperature(params.proposal_temperature)
        proposal, weights = _filtered(zp_t, params.top_k, params.proposal_top_p)
        zq_t = zq_bv / safe_temperature(params.aligner_temperature)
        product = jnp.where(proposal > NEG_INF, zp_t + zq_t, NEG_INF)
        tok, ess = par_draw(u_bm[:, 3:], u_bm[:, 2], proposal, zq_t, weights)
        tok = jax.lax.cond(jnp.any(greedy), lambda: jnp.where(greedy, argmax(product), tok), lambda: tok)
        return tok, ess

    if not kl_monitor:
        tok, ess = par_token()
        return TokenChoice(tok, jnp.zeros((B,), bool), ess, nan)
    if kl_fallback not in FALLBACKS:
        raise ValueError(f"unknown kl_fallback {kl_fallback!r}; expected one of {FALLBACKS}")
    kl = kl_divergence(zp_bv, zq_bv)
    fired = kl > params.kl_threshold
    def fallback_token() -> tuple[jax.Array, jax.Array]:
        logits, weights = _fallback_logits(zp_bv, zp_pen, params, kl_fallback)
        return draw(u_fallback, logits, greedy, weights), nan

    tok, ess = _by_rows(fired, fallback_token, par_token)
    return TokenChoice(tok, fired, jnp.where(fired, jnp.nan, ess), kl)
