"""ramjax: detachable alignment in JAX — a frozen proposal model times a small residual aligner.

Public API (see README.md): ``load_model``, ``logits``, ``sample``, ``stream``, ``SamplingParams`` (and its
``PRESETS``), ``load_tokenizer``,
``check_vocab_compatible``. Everything else is importable from its module (``ramjax.model``, ``ramjax.loss``, ...).
"""
from ramjax.api import Model, load_model, logits
from ramjax.model import ModelConfig
from ramjax.sampler import SampleResult, sample, stream
from ramjax.sampling_params import PRESETS, SamplingParams
from ramjax.tokenizer import Tokenizer, check_vocab_compatible, load_tokenizer

__all__ = ["PRESETS", "Model", "ModelConfig", "SampleResult", "SamplingParams", "Tokenizer", "check_vocab_compatible",
           "load_model", "load_tokenizer", "logits", "sample", "stream"]
__version__ = "0.1.0"
