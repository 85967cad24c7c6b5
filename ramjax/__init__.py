"""ramjax: detachable alignment in JAX — a frozen proposal model times a small residual aligner.

Public API (see README.md): ``load_model``, ``logits``, ``sample``, ``stream``, ``SamplingParams`` (and its
``PRESETS``), ``load_tokenizer``,
``check_vocab_compatible``. Everything else is importable from its module (``ramjax.model``, ``ramjax.loss``, ...).
The names are imported on first use, so ``import ramjax.cli`` (the command lines) starts without JAX: a command
line can still set the process up (``ramjax.hostmem``) before JAX and XLA load.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Model": "ramjax.api", "load_model": "ramjax.api", "logits": "ramjax.api",
    "ModelConfig": "ramjax.model",
    "SampleResult": "ramjax.sampler", "sample": "ramjax.sampler", "stream": "ramjax.sampler",
    "PRESETS": "ramjax.sampling_params", "SamplingParams": "ramjax.sampling_params",
    "Tokenizer": "ramjax.tokenizer", "check_vocab_compatible": "ramjax.tokenizer", "load_tokenizer": "ramjax.tokenizer",
}
__all__ = ["PRESETS", "Model", "ModelConfig", "SampleResult", "SamplingParams", "Tokenizer", "check_vocab_compatible",
           "load_model", "load_tokenizer", "logits", "sample", "stream"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from ramjax.api import Model, load_model, logits
    from ramjax.model import ModelConfig
    from ramjax.sampler import SampleResult, sample, stream
    from ramjax.sampling_params import PRESETS, SamplingParams
    from ramjax.tokenizer import Tokenizer, check_vocab_compatible, load_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ramjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
