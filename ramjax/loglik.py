"""Held-out log-likelihood: teacher-forced log-probabilities of response tokens under P_M, Q_θ or their
token-level product (the distribution RAM samples from), for the evaluation report and the pipeline.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ramjax import data as data_lib
from ramjax import loss as loss_lib
from ramjax import model as model_lib
from ramjax.verify import EvalError

__all__ = ["product_token_logprobs", "sequence_logliks", "heldout_loglik"]


def product_token_logprobs(logits_p_btv: Any, logits_q_btv: Any, targets_bt: Any, vocab_limit: int | None = None):
    """Per-token log-probabilities of ``targets`` under the token-level product of two models, float32 ``[B, T]``.

    The product distribution at each position is normalised over the vocabulary:
    ``log softmax(log p_M + log q)[target] = log softmax(logits_p + logits_q)[target]`` (the per-model
    normalisers are constants per position and cancel). This is the distribution the ``product`` sampler draws
    from at temperature 1 over the full vocabulary, and the limit of ``par`` as n → ∞ (without a nucleus).
    Ids ``>= vocab_limit`` (padded embedding rows) are excluded.
    """

    lp = logits_p_btv.astype(jnp.float32)
    lq = logits_q_btv.astype(jnp.float32)
    if vocab_limit is not None:
        lp, lq = lp[..., :vocab_limit], lq[..., :vocab_limit]
    joint = jax.nn.log_softmax(jax.nn.log_softmax(lp, axis=-1) + jax.nn.log_softmax(lq, axis=-1), axis=-1)
    return jnp.take_along_axis(joint, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]


@functools.lru_cache(maxsize=None)
def _loglik_fn(kind: str, cfg_p: Any, cfg_q: Any, vocab: int):
    """A jitted ``(params_p, params_q, batch) -> (sums [B], counts [B])`` for one kind and pair of configs."""


    def fn(params_p, params_q, b):
        def logits(cfg, params):
            out, _ = model_lib.forward(cfg, params, b["tokens"], b["positions"], b["segment_ids"])
            return out

        if kind == "product":
            lp = product_token_logprobs(logits(cfg_p, params_p), logits(cfg_q, params_q), b["targets"], vocab)
        else:
            cfg, params = (cfg_p, params_p) if kind == "proposal" else (cfg_q, params_q)
            lp = loss_lib.token_logprobs(logits(cfg, params)[..., :vocab], b["targets"])
        mask = b["loss_mask"] * (b["segment_ids"] > 0)
        return jnp.sum(lp * mask, axis=-1), jnp.sum(mask, axis=-1)

    return jax.jit(fn)


def sequence_logliks(seqs: Sequence[tuple[Sequence[int], Sequence[bool]]], *, kind: str, proposal: Any = None,
                     aligner: Any = None, batch_size: int = 16, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-likelihood of the flagged tokens of each sequence, and their count: two float64 ``[N]`` arrays.

    seqs[i] = (tokens [L_i] ints, target [L_i] bools): token j counts iff target[j] (predicted from token j-1;
    target[0] is ignored), as in ``ramjax.data.Seq``. kind: ``proposal`` (log p_M), ``aligner`` (log q) or
    ``product`` (log softmax(log p_M + log q), see ``product_token_logprobs``); teacher-forced, untempered, over
    the models' shared usable vocabulary (``min`` of their ``vocab_limit``). Rows are right-padded to a power of two
    so that few shapes are compiled.
    """
    if kind not in ("proposal", "aligner", "product"):
        raise EvalError(f"unknown log-likelihood kind {kind!r}; expected proposal, aligner or product")
    need = {"proposal": (proposal,), "aligner": (aligner,), "product": (proposal, aligner)}[kind]
    if any(m is None for m in need):
        needs = "proposal and aligner" if kind == "product" else kind
        raise EvalError(f"log-likelihood kind {kind!r} needs the {needs}"
                        f" model")
    vocab = min(m.vocab_limit for m in need)
    cfg_p = proposal.config if proposal is not None and kind != "aligner" else None
    cfg_q = aligner.config if aligner is not None and kind != "proposal" else None
    params_p = proposal.params if cfg_p is not None else None
    params_q = aligner.params if cfg_q is not None else None
    fn = _loglik_fn(kind, cfg_p, cfg_q, int(vocab))
    seqs = [(np.asarray(t, np.int64), np.asarray(g, bool)) for t, g in seqs]
    for i, (t, g) in enumerate(seqs):
        if t.ndim != 1 or g.shape != t.shape or t.size < 2:
            raise EvalError(f"sequence {i}: tokens and target flags must be 1-D of equal length >= 2")
        if t.min() < 0 or t.max() >= vocab:
            raise EvalError(f"sequence {i}: token ids must be in [0, {vocab}) (the models' shared vocabulary)")
    sums = np.zeros(len(seqs))
    counts = np.zeros(len(seqs))
    T = max(8, 1 << (max(len(t) for t, _ in seqs) - 1).bit_length()) if seqs else 8
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        rows = [[i] for i in range(len(chunk))] + [[]] * (batch_size - len(chunk))  # one sequence per row
        b = data_lib.fill_rows(rows, [data_lib.Seq(t, g) for t, g in chunk], T, pad_id)
        s, c = fn(params_p, params_q, b)
        sums[start : start + len(chunk)] = np.asarray(s, np.float64)[: len(chunk)]
        counts[start : start + len(chunk)] = np.asarray(c, np.float64)[: len(chunk)]
    return sums, counts


def heldout_loglik(records: Sequence[Mapping[str, Any]], *, kind: str, proposal: Any = None, aligner: Any = None,
                   tokenizer: Any = None, template: str = "plain", max_len: int = 512, max_prompt_len: int = 256,
                   batch_size: int = 16) -> dict[str, float]:
    """Held-out log-likelihood of {"prompt", "response"} records (the alignment set S) under one model or the
    product; the response tokens and EOS count, the prompt does not (as in training).

    Returns {"per_token": total log-lik / tokens, "per_sequence": mean summed log-lik per record, "tokens",
    "sequences"}. tokenizer: defaults to the proposal's (or the aligner's).
    """

    tok = tokenizer or getattr(proposal, "tokenizer", None) or getattr(aligner, "tokenizer", None)
    if tok is None:
        raise EvalError("heldout_loglik needs a tokenizer: the models have none; pass tokenizer=")
    recs = []
    for i, r in enumerate(records):
        if "prompt" not in r or "response" not in r:
            raise EvalError(f"record {i} needs 'prompt' and 'response' for the log-likelihood (keys: {sorted(r)})")
        recs.append(data_lib.Record(where=f"record {i}", format="sft",
                                    data={"prompt": r["prompt"], "response": r["response"]}))
    td = data_lib.tokenize_records(recs, tok, kind="single", template=template, max_len=max_len,
                                   max_prompt_len=max_prompt_len)
    sums, counts = sequence_logliks([(s.tokens, s.target) for s in td.examples], kind=kind, proposal=proposal,
                                    aligner=aligner, batch_size=batch_size, pad_id=td.pad_id)
    n_tok = float(counts.sum())
    return {"per_token": float(sums.sum() / max(n_tok, 1.0)), "per_sequence": float(sums.mean()),
            "tokens": int(n_tok), "sequences": int(len(sums))}
