"""ramjax: detachable alignment in JAX — a frozen proposal model times a small residual aligner.

Public API (see README.md): ``load_model``, ``logits``, ``sample``, ``stream``, ``load_tokenizer``,
``check_vocab_compatible``. Everything else is importable from its module (``ramjax.model``, ``ramjax.loss``, ...).
"""
from ramjax.api import Model, load_model, logits
from ramjax.model import ModelConfig
from ramjax.sampler import SampleResult, sample, stream
from ramjax.tokenizer import Tokenizer, check_vocab_compatible, load_tokenizer

__all__ = ["Model", "ModelConfig", "SampleResult", "Tokenizer", "check_vocab_compatible", "load_model",
           "load_tokenizer", "logits", "sample", "stream"]
__version__ = "0.1.0"
