"""The chunked LM head (``loss.chunked_sums`` over ``model.hidden_states``) gives every objective's sums and their
gradients as the full ``[B, T, V]`` logits do — SFT, RAM, per-segment DPO log-probs, TrRa's KL with raw teachers —
on padded and packed rows, with a block size that does not divide the sequence; and the compiled backward holds
less memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ramjax import loss as L
from ramjax import model as M

CFG = M.ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, tie_word_embeddings=False)
T_CFG = CFG.replace(tie_word_embeddings=True)  # the teachers: another head layout
VOCAB_LIMIT = 47  # padded embedding rows excluded from the normaliser


def _batch(B=3, T=12, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((B, T), np.int32)
    seg[0, 5:] = 2           # packed: two examples
    seg[1, 9:] = 0           # padded tail
    mask = (rng.random((B, T)) < 0.7).astype(np.float32) * (seg > 0)
    return {"tokens": jnp.asarray(rng.integers(0, VOCAB_LIMIT, (B, T)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, VOCAB_LIMIT, (B, T)), jnp.int32),
            "loss_mask": jnp.asarray(mask), "segment_ids": jnp.asarray(seg),
            "positions": M.positions_from_segments(jnp.asarray(seg))}


@pytest.fixture(scope="module")
def models():
    return (M.init_params(CFG, jax.random.key(0)), M.init_params(T_CFG, jax.random.key(1)),
            M.init_params(T_CFG, jax.random.key(2)))


def _objectives(params, teachers, b, chunk):
    """Every objective's sums, with the full logits (chunk=0) or chunked."""
    ref_p, al_p = teachers
    h = M.hidden_states(CFG, params, b["tokens"], b["positions"], b["segment_ids"])
    h_ref = jax.lax.stop_gradient(M.hidden_states(T_CFG, ref_p, b["tokens"], b["positions"], b["segment_ids"]))
    h_al = jax.lax.stop_gradient(M.hidden_states(T_CFG, al_p, b["tokens"], b["positions"], b["segment_ids"]))

    def sums(x):
        lg = M.logits_from_hidden(CFG, params, x["h"])
        teacher = (M.logits_from_hidden(T_CFG, ref_p, x["h_ref"]), M.logits_from_hidden(T_CFG, al_p, x["h_al"]), 0.7)
        sft = L.sft_loss(lg, x["targets"], x["loss_mask"], x["segment_ids"], VOCAB_LIMIT)
        ram = L.ram_sums(lg, x["targets"], x["loss_mask"], x["segment_ids"], lg, x["tokens"], x["loss_mask"],
                         x["segment_ids"], VOCAB_LIMIT)
        seg = L.sequence_logprobs(lg, x["targets"], x["loss_mask"], x["segment_ids"], max_segments=3,
                                  vocab_limit=VOCAB_LIMIT)
        kl = L.trra_loss(lg, teacher, x["loss_mask"], targets=x["targets"], segment_ids=x["segment_ids"],
                               temperature=1.3, vocab_limit=VOCAB_LIMIT)
        return {"sft": sft, "ram": ram, "dpo_segments": seg, "trra": kl}

    x = dict(b, h=h, h_ref=h_ref, h_al=h_al)
    return sums(x) if not chunk else L.chunked_sums(sums, x, chunk)


def _scalar(out):
    """A generic linear functional of every sum, so one gradient checks them all."""
    leaves = jax.tree_util.tree_leaves(out)
    return sum(jnp.sum(x * (0.3 + 0.1 * i)) for i, x in enumerate(leaves))


def test_chunked_equals_full_values_and_gradients(models, chunk=5):
    params, ref_p, al_p = models
    b = _batch()
    f = jax.jit(lambda p, c: jax.value_and_grad(lambda q: _scalar(_objectives(q, (ref_p, al_p), b, c)))(p),
                static_argnums=1)
    full = jax.jit(_objectives, static_argnums=3)(params, (ref_p, al_p), b, 0)
    chunked = jax.jit(_objectives, static_argnums=3)(params, (ref_p, al_p), b, chunk)
    for (path, a), c in zip(jax.tree_util.tree_flatten_with_path(full)[0], jax.tree_util.tree_leaves(chunked)):
        np.testing.assert_allclose(c, a, rtol=2e-5, atol=2e-5, err_msg=jax.tree_util.keystr(path))
    (v_full, g_full), (v_chunk, g_chunk) = f(params, 0), f(params, chunk)
    np.testing.assert_allclose(v_chunk, v_full, rtol=1e-5)
    for a, c in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_chunk)):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)
    # the sums are not trivial: SFT's token count is the mask's, and the per-segment table has both segments
    assert float(full["sft"][1]) == float(jnp.sum(b["loss_mask"])) > 10
    assert float(jnp.abs(full["dpo_segments"][0, 1])) > 0


def test_hidden_then_head_is_forward(models):
    params = models[0]
    b = _batch()
    want, _ = M.forward(CFG, params, b["tokens"], b["positions"], b["segment_ids"])
    got = M.logits_from_hidden(CFG, params, M.hidden_states(CFG, params, b["tokens"], b["positions"],
                                                            b["segment_ids"]))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_chunked_backward_holds_less_memory():
    """Compiled temporaries of d(SFT loss)/d(params) at T=512, V=4096: the chunked head saves at least half of
    the full [B, T, V] float32 logits (the full version keeps logits and their softmax for the backward)."""
    cfg = CFG.replace(vocab_size=4096)
    p = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    B, T = 2, 512
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def loss(params, t, chunk):
        h = M.hidden_states(cfg, params, t)

        def sums(x):
            return L.sft_loss(M.logits_from_hidden(cfg, params, x["h"]), x["t"], jnp.ones_like(x["t"], jnp.float32))
        x = {"h": h, "t": t}
        s, n = sums(x) if not chunk else L.chunked_sums(sums, x, chunk)
        return s / n

    def temp(chunk):
        f = jax.jit(jax.grad(lambda q, t: loss(q, t, chunk)))
        return f.lower(p, tok).compile().memory_analysis().temp_size_in_bytes

    logits = B * T * cfg.vocab_size * 4
    full, chunked = temp(0), temp(64)
    assert full > logits and chunked < full - logits // 2, (full, chunked, logits)



def test_trainer_objectives_with_loss_chunks(models):
    """The objectives as the train step runs them (``loss.*_objective`` over ``stages.model_forward``'s logits
    function, cut at the head by ``loss_chunk_size=5``): the loss, its metrics and its gradient equal those of the
    full logits — SFT, RAM (packed), DPO (+RPO), TrRa with the two frozen teacher models."""
    from ramjax import sharding as shd
    from ramjax import stages

    params, ref_p, al_p = models
    b = _batch(4, 12)
    pair = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in b.items()}
    pair["rejected_targets"] = jnp.roll(b["targets"], 1, axis=1)
    dpo_pair = dict(pair, example_index=jnp.asarray([0, 1, 2, -1]))
    frozen = {"trra_reference": ref_p, "trra_aligned": al_p,
              "ref_logps": -jnp.asarray([[3.0, 4.0], [5.0, 1.0], [2.0, 2.5], [0.0, 0.0]])}
    teacher = stages._trra_teacher_logits(T_CFG, T_CFG, None, shd.DEFAULT_RULES)
    objs = {"sft": (L.lm_objective("sft", vocab_limit=VOCAB_LIMIT), b),
            "ram": (L.ram_objective(0.1, vocab_limit=VOCAB_LIMIT), pair),
            "dpo": (L.dpo_objective(0.2, rpo_alpha=0.5, vocab_limit=VOCAB_LIMIT), dpo_pair),
            "trra": (L.trra_objective(0.7, temperature=1.3, vocab_limit=VOCAB_LIMIT, teacher_logits=teacher), b)}
    results = {}
    for chunk in (0, 5):
        fwd = stages.model_forward(CFG.replace(loss_chunk_size=chunk))
        for name, (obj, batch) in objs.items():
            norms = obj.normalizers(batch)

            def loss(p, obj=obj, batch=batch, norms=norms):
                logits_fn = L.SplitLogits(lambda lm: fwd(p, frozen, lm), fwd.head_split(p, frozen))
                return obj.loss(logits_fn, batch, norms, frozen)
            results[name, chunk] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    for name in objs:
        (l0, m0), g0 = results[name, 0]
        (l5, m5), g5 = results[name, 5]
        np.testing.assert_allclose(l5, l0, rtol=2e-5, err_msg=name)
        for k in m0:
            np.testing.assert_allclose(m5[k], m0[k], rtol=2e-5, atol=1e-6, err_msg=f"{name} {k}")
        for a, c in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g5)):
            np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6, err_msg=name)
        assert float(l0) != 0.0


@pytest.mark.slow  # four short training runs (~2 min on a loaded machine)
def test_ram_and_sft_training_with_loss_chunks_equals_full_logits(tmp_path):
    """The trainer's objectives with model.loss_chunk_size (a block of 5 positions: 24 is not a multiple) give the
    losses and parameters of the full-logit run: RAM on packed rows (grad_accum 2, a 2x2x2 mesh), and SFT."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_train import _assert_trees_close, _cfg, _losses, make_fixture, ram_overrides

    from ramjax import checkpoint as ckpt_lib
    from ramjax import train_lib

    fx = make_fixture(str(tmp_path / "fx"))
    for name, extra in (("ram", ["steps=3", "data.packing=true"]),
                        ("sft", ["steps=2", "stage=sft", f"data.train_files=[{fx}/sft.jsonl]"])):
        runs = {}
        for chunk in (0, 5):
            d = str(tmp_path / f"{name}{chunk}")
            train_lib.train(_cfg(ram_overrides(fx, d, *extra, f"model.loss_chunk_size={chunk}")))
            runs[chunk] = d
        got, want = _losses(runs[5]), _losses(runs[0])
        assert [s for s, _, _ in got] == [s for s, _, _ in want]
        np.testing.assert_allclose([x for _, x, _ in got], [x for _, x, _ in want], rtol=2e-5)
        _, p5 = ckpt_lib.load_model_dir(os.path.join(runs[5], "model"))
        _, p0 = ckpt_lib.load_model_dir(os.path.join(runs[0], "model"))
        _assert_trees_close(p5, p0, 2e-5)
