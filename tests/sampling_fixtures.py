"""Helpers shared by the sampler tests (test_sampler, test_sampler_review, test_speculative): the χ² check of the
exact-distribution tests and a tiny random model with a real (trained-on-a-few-KB) tokenizer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hf_fixtures import random_params
from scipy import stats
from tokenizer_fixtures import make_hf_tokenizer

from ramjax.api import Model
from ramjax.tokenizer import load_tokenizer


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """χ² goodness of fit; categories expected fewer than 5 times are pooled; an impossible outcome gives 0."""
    probs = np.asarray(probs, np.float64) / np.sum(probs)
    exp = counts.sum() * probs
    if np.any((probs == 0) & (counts > 0)):
        return 0.0
    big = exp >= 5
    obs, e = list(counts[big]), list(exp[big])
    if exp[~big].sum() > 0:
        obs.append(counts[~big].sum())
        e.append(exp[~big].sum())
    return float(stats.chisquare(obs, e).pvalue)


def text_model(directory, cfg, seed: int = 3):
    """``(Model, tokenizer)``: a llama-style HF tokenizer written to ``directory`` and a random model of shape ``cfg``
    with the tokenizer's vocabulary."""
    make_hf_tokenizer(directory, "llama")
    tok = load_tokenizer(directory)
    cfg = cfg.replace(vocab_size=tok.vocab_size)
    params = jax.tree_util.tree_map(jnp.asarray, random_params(cfg, seed))
    return Model(config=cfg, params=params, tokenizer=tok), tok
