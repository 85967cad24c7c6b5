"""The small public API: load a model from disk and compute its logits.

``load_model`` returns a ``Model`` holding the architecture config, the params pytree and the tokenizer; the
sampler and the trainer take these objects. Everything else in ramjax is pure functions over ``model.params``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ramjax import checkpoint, hf, hub
from ramjax import model as model_lib
from ramjax import sharding as shd
from ramjax import tokenizer as tok_lib


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


class NonFiniteWeightsError(ValueError):
    """A loaded model holds NaN or inf weights (a diverged or corrupted save)."""


@jax.jit
def _finite_leaves(params: Any) -> Any:
    # one fused reduction per array, one program for the whole tree: a read of every weight, no copies
    return jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)), params)


def check_finite_weights(params: Any, where: str) -> None:
    """Raises ``NonFiniteWeightsError`` naming ``where`` (the file or directory) and the first parameters holding a
    NaN or inf. Costs one pass over the weights (on their devices; only one bool per array comes back)."""
    flags = jax.device_get(_finite_leaves(params))
    bad = [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0]
           if not bool(ok)]
    if bad:
        raise NonFiniteWeightsError(
            f"{where} holds NaN/inf weights in {len(bad)} parameter array(s), e.g. {', '.join(bad[:3])}; the model "
            f"was saved from a diverged run or the file is corrupt: re-export it from a good checkpoint (sampling it "
            f"would give garbage)")


def _weights_file(path: str) -> str:
    """The weights file(s) of a model directory, for error messages."""
    if os.path.exists(os.path.join(path, "ramjax_model.json")):
        return os.path.join(path, "params")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    return os.path.join(path, files[0]) if len(files) == 1 else os.path.join(path, "*.safetensors")


def load_model(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: str | None = None,
               param_dtype: str | None = None, rules=shd.DEFAULT_RULES) -> Model:
    """Loads a Hugging Face directory (``config.json`` + safetensors), a ramjax checkpoint directory, or a Hub id
    ``"org/name"`` (``"org/name@revision"``) that is not a local directory, through ``huggingface_hub``
    (optional; ``HF_HUB_OFFLINE=1`` reads the local cache only; see ``ramjax.hub``).

    Weights are checked for NaN/inf (``NonFiniteWeightsError`` names the file). With ``mesh``, every tensor is
    placed directly onto its sharding. ``dtype``/``param_dtype`` override the
    compute/storage dtypes (default: float32 compute, checkpoint storage dtype kept as configured).
    """
    path = hub.resolve_model_path(path)
    if model_format(path) == "ramjax":  # else Hugging Face (its reader names what is missing)
        cfg, params = checkpoint.load_model_dir(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, rules=rules)
    else:
        cfg, params = hf.load_hf(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, rules=rules)
    check_finite_weights(params, _weights_file(path))
    tokenizer = tok_lib.load_tokenizer(path) if tok_lib.has_tokenizer(path) else None
    return Model(config=cfg, params=params, tokenizer=tokenizer, mesh=mesh, source=path)


def model_format(path: str | os.PathLike) -> Literal["ramjax", "hf"] | None:
    """Whether a directory holds a ramjax checkpoint (``ramjax_model.json``), a Hugging Face model
    (``config.json``) or neither (None). The one place this is decided."""
    if checkpoint.is_model_dir(path):
        return "ramjax"
    return "hf" if os.path.isfile(os.path.join(os.fspath(path), "config.json")) else None


def read_config(path: str | os.PathLike) -> tuple[model_lib.ModelConfig, Literal["ramjax", "hf"]]:
    """``(ModelConfig, format)`` of a model directory without loading its weights (a directory that is neither
    format is read as Hugging Face, whose reader names the missing ``config.json``)."""
    path = os.fspath(path)
    if model_format(path) == "ramjax":
        return checkpoint.read_model_config(path), "ramjax"
    return hf.config_from_hf(hf.read_hf_config(path)), "hf"


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
