"""The small public API: load a model from disk and compute its logits.

``load_model`` returns a ``Model`` holding the architecture config, the params pytree and the tokenizer; the
sampler and the trainer take these objects. Everything else in ramjax is pure functions over ``model.params``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ramjax import model as model_lib
from ramjax import sharding as shd


@dataclasses.dataclass
class Model:
    """A loaded model.

    config:     the architecture (``ModelConfig``); ``config.vocab_size`` counts embedding rows.
    params:     pytree of arrays (sharded on ``mesh`` if one was given).
    tokenizer:  a ``ramjax.tokenizer.Tokenizer`` or None when the checkpoint has no tokenizer files.
    vocab_limit: number of usable token ids; rows at or beyond it are padding (e.g. Qwen2.5's 151936 vs 152064
                rows) and are excluded from ``logits`` and never sampled.
    """

    config: model_lib.ModelConfig
    params: Any
    tokenizer: Any = None
    vocab_limit: int = 0
    mesh: Mesh | None = None
    source: str = ""

    def __post_init__(self):
        if not self.vocab_limit:
            self.vocab_limit = self.config.vocab_size
            if self.tokenizer is not None:
                self.vocab_limit = min(self.config.vocab_size, self.tokenizer.vocab_size)


def load_model(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: str | None = None,
               param_dtype: str | None = None, rules=shd.DEFAULT_RULES) -> Model:
    """Loads a Hugging Face directory (``config.json`` + safetensors), a ramjax checkpoint directory, or a Hub id
    ``"org/name"`` (``"org/name@revision"``) that is not a local directory, through ``huggingface_hub``
    (optional; ``HF_HUB_OFFLINE=1`` reads the local cache only; see ``ramjax.hub``).

    With ``mesh``, every tensor is placed directly onto its sharding. ``dtype``/``param_dtype`` override the
    compute/storage dtypes (default: float32 compute, checkpoint storage dtype kept as configured).
    """
    from ramjax import hub
    from ramjax import tokenizer as tok_lib

    path = hub.resolve_model_path(path)

    if os.path.exists(os.path.join(path, "ramjax_model.json")):
        from ramjax import checkpoint

        cfg, params = checkpoint.load_model_dir(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, rules=rules)
    else:
        from ramjax import hf

        cfg, params = hf.load_hf(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, rules=rules)
    tokenizer = tok_lib.load_tokenizer(path) if tok_lib.has_tokenizer(path) else None
    return Model(config=cfg, params=params, tokenizer=tokenizer, mesh=mesh, source=path)


def logits(model: Model, token_ids: Sequence[Sequence[int]] | jax.Array) -> jax.Array:
    """Float32 logits ``[batch, seq, vocab_limit]`` for a batch of equal-length token-id rows.

    Padded embedding rows (ids ``>= model.vocab_limit``) are excluded: the last axis is sliced to the usable
    vocabulary, so a softmax over it is a distribution over real tokens only.
    """
    tokens = jnp.asarray(token_ids, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    return _jitted_logits(model.config, model.mesh, model.vocab_limit)(model.params, tokens)


@functools.lru_cache(maxsize=32)
def _jitted_logits(cfg: model_lib.ModelConfig, mesh: Mesh | None, vocab_limit: int):
    # one compile per (architecture, mesh, vocabulary) and input shape, not one per op
    def fn(params, tokens):
        out, _ = model_lib.forward(cfg, params, tokens, mesh=mesh)
        return out[..., :vocab_limit]
    return jax.jit(fn)
