"""ramjax: detachable alignment in JAX — a frozen proposal model times a small residual aligner."""
from ramjax.api import Model, load_model, logits
from ramjax.model import ModelConfig

__all__ = ["Model", "ModelConfig", "load_model", "logits"]
__version__ = "0.1.0"
