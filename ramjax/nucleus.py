"""The proposal's nucleus: the tokens kept by top-k then top-p of a row of logits, found without a sort.

Used by ``ramjax.decode_rules`` wherever a top-p set is needed itself (``target_logits``, ``sparse``'s P_M nucleus,
``par``, the exact fallbacks of the rejection draws). The set is returned as a per-row key threshold
(``_nucleus``; ``_in_nucleus`` turns it into the ``[B, V]`` set where used, so that no mask leaves a branch).

Paths, all keeping the same set (HF's rule, ties at the boundary kept), up to the summation order of float masses:

* a top-k fast path (``lax.top_k`` of ``FAST_K``), for peaked rows whose ``FAST_K`` largest logits hold top-p;
* otherwise (flat rows, e.g. random-weight models) ``_bisection_cut``: top-k by the exact 32-step bisection over
  the float order (``_threshold``), top-p by ``_mass_cut``: one histogram pass of the mass on CPU
  (``_histogram_cut``) or value halvings elsewhere (``_halving_cut``), then an exact finish on the few tokens of
  the one band that holds the answer (``_band_tokens``), with the key bisection as the fallback.

Every fused pass over ``[8, 49152]`` costs ~0.1 ms on CPU; a flat row's nucleus costs ~6 of them this way.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def order_keys(z_bv: jax.Array) -> jax.Array:
    """uint32 keys with the order of the float32 values (``-inf`` smallest): ``a < b`` iff ``key(a) < key(b)``."""
    i = jax.lax.bitcast_convert_type(z_bv.astype(jnp.float32), jnp.uint32)
    return jnp.where((i >> 31) == 1, ~i, i | jnp.uint32(0x80000000))


def _threshold(keys_bv: jax.Array, weights_bv: jax.Array, target_b: jax.Array) -> jax.Array:
    """The largest key ``v`` ``[B]`` with ``Σ weights[keys >= v] >= target`` (exact: bisection over the 32-bit keys).

    The weighted count above ``v`` only falls as ``v`` grows, so 32 halvings of the key range find it exactly; each
    is one fused pass over the vocabulary, far cheaper than a sort on CPU (XLA's CPU sort is ~50x slower here).
    """
    lo = jnp.min(keys_bv, axis=-1)
    hi = jnp.max(keys_bv, axis=-1) + jnp.uint32(1)

    def body(_, carry):
        lo, hi = carry
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(keys_bv >= mid[:, None], weights_bv, 0), axis=-1) >= target_b
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


FAST_K = 64  # candidates of the top-k fast path of ``nucleus_mask``


BAND_STEPS = 12  # ``_mass_cut``: value-range halvings, or log2 of its histogram's bins, before the exact finish
BAND_K = 64  # the finish ranks at most this many tokens left in the band (more: further halvings, then the keys)
BAND_EXTRA = 8  # further halvings ``_mass_cut`` may take while some row's band holds more than ``band_k`` tokens
BAND_CHUNK = 64  # the finish gathers the band's tokens by chunks of this many ids
# ``_mass_cut`` by one histogram pass instead of the halvings, on CPU (``_histogram_cut``): the same set up to float
# rounding (nearer a float64 reference than the halvings), ~1.2 ms less per flat [8, 49152] nucleus. Where a token's
# mass from the top lies within float32 rounding of top-p (~1% of flat 49k-token rows) it can keep another boundary
# token than the halvings, and a seed then draws other tokens than before it (landed in session 7).
HISTOGRAM_CUT = True


def _band_tokens(z_bv, w_bv, band, k: int):
    """The ``k`` largest logits of the band ``[B, k]`` (descending; ``-inf`` past the band's end) and their weights,
    read from at most ``k`` chunks of ``BAND_CHUNK`` ids: the chunks that hold band tokens are found by a ``TopK`` of
    the per-chunk band counts ``[B, V / 64]``, and only their ``k · 64`` logits are ranked. A ``TopK`` over the
    whole row (``[B, V]``) costs ~15 fused passes at V = 49k on CPU; this costs ~2. Exact where every row's band
    holds at most ``k`` tokens (then at most ``k`` chunks hold them); the caller checks that with the third
    result, the band's size ``[B]`` (int32, from the per-chunk counts: no pass of its own)."""
    B, V = z_bv.shape
    C = min(BAND_CHUNK, V)
    G = -(-V // C)
    pad = G * C - V
    if pad:
        z_bv = jnp.pad(z_bv, ((0, 0), (0, pad)), constant_values=NEG_INF)
        w_bv = jnp.pad(w_bv, ((0, 0), (0, pad)))
        band = jnp.pad(band, ((0, 0), (0, pad)))
    # float counts: XLA's CPU TopK kernel takes float32 (an int32 top_k became a sort, 5x slower here)
    per_chunk = jnp.sum(band.reshape(B, G, C), axis=-1, dtype=jnp.float32)  # [B, G]
    M = min(k, G)
    if M == G:  # every chunk (a top_k of all G would lower to a sort)
        chunks = jnp.broadcast_to(jnp.arange(G, dtype=jnp.int32), (B, G))
    else:  # the chunks with band tokens (all of them: at most k hold any)
        chunks = jax.lax.top_k(per_chunk, M)[1]

    def gather(x):
        return jnp.take_along_axis(x.reshape(B, G, C), chunks[:, :, None], axis=1).reshape(B, M * C)

    cz, cw, cb = gather(z_bv), gather(w_bv), gather(band)
    K = min(k, M * C)
    idx = jax.lax.top_k(jnp.where(cb, cz, NEG_INF), K)[1]  # the band's tokens, largest first
    bv = jnp.where(jnp.take_along_axis(cb, idx, axis=-1), jnp.take_along_axis(cz, idx, axis=-1), NEG_INF)
    bw = jnp.where(bv > NEG_INF, jnp.take_along_axis(cw, idx, axis=-1), 0.0)
    return bv, bw, jnp.sum(per_chunk, axis=-1).astype(jnp.int32)


def _mass_cut(z_bv, e_bv, s_b, top_p_b, band_k: int = BAND_K, *, valid=None, zmax=None,
              histogram: bool | None = None):
    """The key ``[B]`` of the largest logit ``v`` with ``Σ p[z >= v] >= top_p`` (exact), ``p = e / s`` the
    probabilities (``e`` ``[B, V]``: ``exp(z - max z)``, 0 outside the support; ``s`` ``[B]`` its row sums), found
    in few passes. Rows with ``top_p >= 1`` get some key (the caller keeps every token there). ``zmax``: the rows'
    largest logits where the caller has them (saves a pass). ``valid`` ``[B, V]``: the candidate tokens (default:
    the finite logits; top-k passes its set).

    Two ways to a *band* of tokens that holds the answer, then an exact finish (the band's tokens are ranked and the
    answer read off the masses around them):

    * ``histogram`` (CPU, ``HISTOGRAM_CUT``; ``_histogram_cut``): ``2 ** BAND_STEPS`` equal bins of the logits'
      range and one scatter-add of each bin's mass (XLA's CPU scatter-add is sequential, so its sums are
      deterministic; on GPU it would use atomics, hence the halvings there). On CPU at ``[8, 49152]`` this costs
      about a third of the halvings' 12 passes. Where its band fails a check (more than ``band_k`` tokens, or a
      float-rounding edge) the exact 32-step bisection over the keys (``_threshold``) runs;
    * halvings (``_halving_cut``): ``BAND_STEPS`` halvings of the value range ``[min, max]`` (each one fused pass),
      then up to ``BAND_EXTRA`` more while some row's band holds more than ``band_k`` tokens; where a band still
      holds more (e.g. ties no halving splits) the exact 32-step bisection over the keys (``_threshold``) runs.

    On a flat 49k-token distribution either band holds ~12-25 tokens. Every path keeps the same set, up to the
    summation order of float masses (a token whose mass from the top lies within float rounding of ``top_p``).
    """
    def probs():
        return e_bv / s_b[:, None]

    if band_k == 0:
        return _threshold(order_keys(z_bv), probs(), top_p_b)
    if histogram is None:
        histogram = HISTOGRAM_CUT and jax.default_backend() == "cpu"
    big = jnp.finfo(jnp.float32).max
    if valid is None:  # built where used, not passed into the branches (a cond operand is written out)
        def get_valid():
            return z_bv > -jnp.inf
    else:
        def get_valid():
            return valid
    if zmax is None:
        zmax = jnp.max(jnp.where(get_valid(), z_bv, -big), axis=-1)
    hi = jnp.nextafter(jnp.maximum(zmax, -big), big)

    if not histogram:
        lo = jnp.min(jnp.where(get_valid(), z_bv, big), axis=-1)
        return _halving_cut(z_bv, probs(), get_valid(), top_p_b, band_k, lo, hi)
    cut, ok = _histogram_cut(z_bv, e_bv, s_b, get_valid(), top_p_b, band_k, zmax, hi)
    # The fallback is rare (a band of more than band_k tokens, e.g. ties; a rounding edge), and one path in the
    # program instead of two keeps it small: on CPU each execution costs time in proportion to the program's size,
    # branches not taken included (~0.1 ms per 10k HLO instructions, as much as the rule at batch 1).
    return jax.lax.cond(jnp.all(ok), lambda: cut, lambda: _threshold(order_keys(z_bv), probs(), top_p_b))


def _band_finish(z_bv, w_bv, band, above, target_b, band_k: int):
    """The exact cut from a band (``[B, V]`` bool): the tokens of ``band`` lie below every token of mass ``above``
    ``[B]`` and above every other one. Returns the key ``[B]`` of the first band token, largest first, at which
    ``above`` plus the band's cumulative mass reaches the target (the last band token if float rounding never gets
    there), whether the band held at most ``band_k`` tokens (exact only then) and whether its whole mass reached
    the target (``[B]`` bools)."""
    bv, bw, count = _band_tokens(z_bv, w_bv, band, band_k)
    K = bv.shape[-1]
    cum = above[:, None] + jnp.cumsum(bw, axis=-1)
    first = jnp.minimum(jnp.sum(cum < target_b[:, None], axis=-1), jnp.maximum(count - 1, 0))
    cut = order_keys(jnp.take_along_axis(bv, jnp.minimum(first, K - 1)[:, None], axis=-1)[:, 0])
    return cut, count <= K, cum[:, -1] >= target_b


def _halving_cut(z_bv, w_bv, valid, target_b, band_k: int, lo, hi):
    """``_mass_cut`` by halvings of the value range ``[lo, hi)`` (``[B]``; ``w`` the probabilities), then the band
    finish, or the keys' 32-step bisection where some row's band stays larger than ``band_k``."""
    def halve(lo, hi):
        mid = lo + (hi - lo) * 0.5
        ok = jnp.sum(jnp.where(z_bv >= mid[:, None], w_bv, 0.0), axis=-1) >= target_b
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    def in_band(lo, hi):
        return valid & (z_bv >= lo[:, None]) & (z_bv < hi[:, None])

    lo, hi = jax.lax.fori_loop(0, BAND_STEPS, lambda _, c: halve(*c), (lo, hi))
    count = jnp.sum(in_band(lo, hi), axis=-1)

    def more(carry):  # one more halving of every row's band (rows already small keep a valid, smaller band)
        i, lo, hi, _ = carry
        lo, hi = halve(lo, hi)
        return i + 1, lo, hi, jnp.sum(in_band(lo, hi), axis=-1)

    _, lo, hi, count = jax.lax.while_loop(lambda c: (c[0] < BAND_EXTRA) & jnp.any(c[3] > band_k), more,
                                          (0, lo, hi, count))
    above = jnp.sum(jnp.where(z_bv >= hi[:, None], w_bv, 0.0), axis=-1)
    cut, small, _ = _band_finish(z_bv, w_bv, in_band(lo, hi), above, target_b, band_k)
    return jax.lax.cond(jnp.all(small), lambda: cut, lambda: _threshold(order_keys(z_bv), w_bv, target_b))


def _prefix_sums_2level(x_bn: jax.Array) -> jax.Array:
    """``out[:, j] = Σ_{i < j} x[:, i]`` (exclusive) for ``[B, n]``, ``n`` a square of a power of two, in two
    levels of triangular matmuls (XLA's CPU cumsum of ``[8, 4096]`` costs as much as two passes over a 49k
    vocabulary)."""
    B, n = x_bn.shape
    c = math.isqrt(n)
    strict = jnp.triu(jnp.ones((c, c), x_bn.dtype), k=1)  # x @ strict: the sum over i < j
    hp = jax.lax.Precision.HIGHEST
    chunks = x_bn.reshape(B, c, c)
    inner = jnp.einsum("bgi,ij->bgj", chunks, strict, precision=hp)
    before = jnp.einsum("bi,ij->bj", jnp.sum(chunks, axis=-1), strict, precision=hp)  # the chunks below
    return (inner + before[:, :, None]).reshape(B, n)


def _histogram_cut(z_bv, e_bv, s_b, valid, top_p_b, band_k: int, zmax, hi):
    """``_mass_cut`` from one histogram of the mass ``e`` over ``2 ** BAND_STEPS`` equal bins of ``[lo, hi)``,
    then an exact finish on the bin that holds the answer. Returns the key ``[B]`` and whether it is exact ``[B]``
    (rows with ``top_p >= 1`` count as exact: the caller ignores them).

    The test is on the *tail*: a logit ``v`` keeps enough mass iff the mass strictly below it is at most
    ``T = (1 - top_p) · S`` (``S`` the total), the same condition as ``Σ p[z >= v] >= top_p``; a small sum rounds
    by a small amount, so this is nearer the exact set than sums of ~95% of the mass (against a float64
    reference on flat 49k-token rows it disagrees less often than the halvings did).

    ``lo = max z + log((1 - top_p) · s / V)`` needs no pass: every token below it has ``e < (1 - top_p) · s / V``,
    so together less than the tail, and the answer lies in ``[lo, hi)`` (tokens below ``lo`` share the lowest
    bin). A logit's bin, ``floor((z - lo) · 2^BAND_STEPS / (hi - lo))`` clipped to the bins, comes from monotone
    float operations, so a higher bin holds only larger logits. The band is the bin ``b`` with
    ``below(b) <= T < below(b + 1)`` (``below``: the mass of the bins under it); its tokens are ranked and the
    answer is the first, largest first, whose mass strictly below (``below(b)`` plus the band tokens after it) is
    at most ``T`` (ties: the last of them, so all are kept). Checked: the band holds at most ``band_k`` tokens,
    its lowest token qualifies and the token above its highest does not (the band's own sum rounds differently
    from its bin's).
    """
    B, V = z_bv.shape
    nb = 1 << BAND_STEPS
    p_on = top_p_b < 1.0
    lo = zmax + jnp.log(jnp.where(p_on, (1.0 - top_p_b) * s_b / V, 1.0))
    lo = jnp.where(p_on, jnp.minimum(lo, zmax), zmax - 1.0)  # rows that keep everything: any finite range
    inv = nb / (hi - lo)
    finite = jnp.isfinite(inv) & jnp.isfinite(lo)
    inv = jnp.where(finite, inv, 0.0)
    scaled = jnp.where(valid, (z_bv - jnp.where(finite, lo, 0.0)[:, None]) * inv[:, None], 0.0)
    bins = jnp.clip(jnp.floor(scaled), 0, nb - 1).astype(jnp.int32)
    flat = bins + (jnp.arange(B, dtype=jnp.int32) * nb)[:, None]
    hist = jax.ops.segment_sum(e_bv.reshape(-1), flat.reshape(-1), num_segments=B * nb).reshape(B, nb)
    below = _prefix_sums_2level(hist)  # [B, nb]: the mass of the bins under bin j
    tail = (1.0 - top_p_b) * (below[:, -1] + hist[:, -1])
    b = jnp.sum(below <= tail[:, None], axis=-1) - 1  # below[:, 0] = 0: b >= 0
    under = jnp.take_along_axis(below, b[:, None], axis=-1)[:, 0]
    bv, bw, count = _band_tokens(z_bv, e_bv, valid & (bins == b[:, None]), band_k)
    K = bv.shape[-1]
    incl = jnp.flip(jnp.cumsum(jnp.flip(bw, -1), axis=-1), -1)  # [B, K]: band mass at and after each token
    after = jnp.pad(incl[:, 1:], ((0, 0), (0, 1)))  # strictly after (smaller, or tied and later)
    real = jnp.arange(K)[None, :] < count[:, None]
    fails = real & (under[:, None] + after > tail[:, None])  # true on a prefix of the real band tokens
    first = jnp.minimum(jnp.sum(fails, axis=-1), jnp.maximum(count - 1, 0))
    cut = order_keys(jnp.take_along_axis(bv, first[:, None], axis=-1)[:, 0])
    ok = (count <= K) & (under + incl[:, 0] > tail) & ~jnp.any(fails & (jnp.arange(K)[None, :] == count[:, None] - 1),
                                                                axis=-1)
    return cut, ~p_on | (ok & finite & (count > 0))


def _bisection_cut(z_bv, top_k_b, top_p_b, band_k: int, e, s, zmax):
    """``_nucleus``'s cut without the top-k fast path (any k, any nucleus size): top-k by the exact 32-step
    bisection over the float order, top-p by ``_mass_cut`` on the top-k renormalised mass. ``e``, ``s``,
    ``zmax``: ``exp(z - max z)``, its row sums and ``max z``. The key threshold ``[B]`` of ``_nucleus``."""
    lowest = jnp.zeros(z_bv.shape[:1], jnp.uint32)
    p_any = jnp.any(top_p_b < 1.0)

    def with_top_k():
        keys = order_keys(z_bv)
        valid = z_bv > -jnp.inf
        kth = jnp.where(top_k_b > 0, _threshold(keys, valid.astype(jnp.int32), top_k_b), lowest)
        in_k = keys >= kth[:, None]

        def top_p():
            # softmax(where(in_k, z, -inf)) exactly: top-k keeps the largest logit, so its max is max z, and
            # exp(-inf - max) is 0.
            ek = jnp.where(in_k, e, 0.0)
            cut = _mass_cut(z_bv, ek, jnp.sum(ek, axis=-1), top_p_b, band_k, valid=valid & in_k, zmax=zmax)
            return jnp.where(top_p_b < 1.0, cut, lowest)

        return jnp.maximum(kth, jax.lax.cond(p_any, top_p, lambda: lowest))  # in top-k and in top-p

    def top_p_only():  # no row has top-k (the usual case): no key array, no top-k mask
        def top_p():
            return jnp.where(top_p_b < 1.0, _mass_cut(z_bv, e, s, top_p_b, band_k, zmax=zmax), lowest)

        return jax.lax.cond(p_any, top_p, lambda: lowest)

    return jax.lax.cond(jnp.any(top_k_b > 0), with_top_k, top_p_only)


def _key_at_least(v_b: jax.Array) -> jax.Array:
    """The smallest key ``[B]`` whose logit is ``>= v`` as floats: ``order_keys(v)``, except that both zeros give
    the key of ``-0.0`` (``-0.0 >= 0.0`` holds as floats, not as keys)."""
    return order_keys(jnp.where(v_b == 0, jnp.float32(-0.0), v_b))


def _in_nucleus(z_bv: jax.Array, cut_b: jax.Array) -> jax.Array:
    """The nucleus ``[B, V]`` of ``_nucleus``' key threshold ``[B]``: the valid ids whose key is at least the cut.
    Elementwise, so XLA fuses it into whatever uses the set."""
    return (z_bv > -jnp.inf) & (order_keys(z_bv) >= cut_b[:, None])


def nucleus_mask(z_bv: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array, *, fast_k: int = FAST_K,
                 band_k: int = BAND_K) -> jax.Array:
    """Tokens kept by top-k then top-p of ``softmax(z)`` (``z`` tempered; ``-inf`` = already excluded), ``[B, V]``.

    Top-k keeps every token at least as large as the k-th largest. Top-p keeps the largest tokens down to the
    first one at which the (top-k renormalised) mass reaches ``top_p``, i.e. HF's rule: a token goes when the
    mass of the tokens ranked below it, itself included, is ``<= 1 - top_p``. Ties at the boundary are all kept.

    Fast path: the ``fast_k`` largest logits (``lax.top_k``) decide both filters whenever, in every row, top-k is
    off or ``<= fast_k`` and those candidates already hold ``top_p`` of the mass (peaked distributions, the usual
    case for trained models). Otherwise ``_bisection_cut`` runs (``fast_k=0`` forces it; ``band_k`` sizes its
    top-p finish, 0 forces the 32-step key bisection). All paths give the same set.
    """
    return _in_nucleus(z_bv, _nucleus(z_bv, top_k_b, top_p_b, fast_k, band_k)[0])


def _nucleus(z_bv, top_k_b, top_p_b, fast_k: int = FAST_K, band_k: int = BAND_K):
    """``nucleus_mask`` as a per-row key threshold ``[B]`` (the set is ``_in_nucleus(z, cut)``: a threshold, not a
    ``[B, V]`` mask, leaves the branches so that no mask is written out), and ``exp(z - max z)`` ``[B, V]``, which
    it computes anyway (the draw reuses it)."""
    B, V = z_bv.shape
    K = min(fast_k, V)
    # One exp pass serves the gate, the fast path's normaliser, the bisection's softmax and the draw.
    zmax = jnp.max(z_bv, axis=-1)
    e = jnp.exp(z_bv - zmax[:, None])
    s = jnp.sum(e, axis=-1)
    if K == 0:
        return _bisection_cut(z_bv, top_k_b, top_p_b, band_k, e, s, zmax), e
    k_on = top_k_b > 0
    p_on = top_p_b < 1.0
    lse_all = jnp.log(s) + zmax  # jax.nn.logsumexp(z) where max z is finite
    # The K largest probabilities hold at most K · (the largest probability): where that is below top_p (flat rows,
    # e.g. random-weight models) the fast path cannot hold, and its TopK (as costly as ~10 fused passes over a
    # 49k vocabulary on CPU) is skipped. A gate only: both paths keep the same set.
    could = jnp.where(k_on, top_k_b <= K, ~p_on | (K * jnp.exp(zmax - lse_all) >= top_p_b))

    def bisection():
        return _bisection_cut(z_bv, top_k_b, top_p_b, band_k, e, s, zmax)

    def fast():
        # The values are gathered through the indices: with the indices dead, XLA's CPU backend lowers top_k to a
        # full sort of the row (~100x slower at V = 49k) instead of its TopK kernel.
        top_i = jax.lax.top_k(z_bv, K)[1]
        top_v = jnp.take_along_axis(z_bv, top_i, axis=-1)  # [B, K] descending
        kth = jnp.where(k_on, jnp.take_along_axis(top_v, jnp.clip(top_k_b - 1, 0, K - 1)[:, None], axis=-1)[:, 0],
                        NEG_INF)
        in_k = top_v >= kth[:, None]
        # Normaliser of the top-k distribution: over the candidates when top-k is on (all of it lies among them
        # unless ties run past the K-th; checked below), else over the whole vocabulary.
        lse = jnp.where(k_on, jax.nn.logsumexp(jnp.where(in_k, top_v, NEG_INF), axis=-1), lse_all)
        probs = jnp.where(in_k, jnp.exp(top_v - lse[:, None]), 0.0)
        cum = jnp.cumsum(probs, axis=-1)
        n_keep = jnp.maximum(jnp.sum(in_k & ((cum - probs) < top_p_b[:, None]), axis=-1), 1)
        cut = jnp.where(p_on, jnp.take_along_axis(top_v, (n_keep - 1)[:, None], axis=-1)[:, 0], kth)
        k_ok = ~k_on | ((top_k_b <= K) & ((top_v[:, -1] < kth) | (K == V)))
        p_ok = ~p_on | (cum[:, -1] >= top_p_b) | (K == V)
        # the set {valid, z >= cut} as floats, as a key threshold
        return _key_at_least(cut), jnp.all(k_ok & p_ok)

    # The bisection appears once in the program (a smaller program runs faster on CPU, see _mass_cut).
    cut, fast_ok = jax.lax.cond(jnp.all(could | (K == V)), fast, lambda: (jnp.zeros((B,), jnp.uint32), False))
    return jax.lax.cond(fast_ok, lambda: cut, bisection), e


def filter_logits(z_bv: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array, *, fast_k: int = FAST_K,
                  band_k: int = BAND_K) -> jax.Array:
    """Tempered logits with everything outside top-k/top-p set to ``-inf``."""
    return _filtered(z_bv, top_k_b, top_p_b, fast_k=fast_k, band_k=band_k)[0]


def _filtered(z_bv, top_k_b, top_p_b, **kw):
    """``filter_logits`` and the draw's weights ``exp(filtered - max)`` ``[B, V]`` (bit for bit what ``draw``
    computes from the filtered logits: top-k/top-p always keep the largest logit, and ``exp(-inf)`` is 0), from the
    nucleus' own exp pass."""
    cut, e = _nucleus(z_bv, top_k_b, top_p_b, **kw)
    mask = _in_nucleus(z_bv, cut)
    return jnp.where(mask, z_bv, NEG_INF), jnp.where(mask, e, 0.0)
