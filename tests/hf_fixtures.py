"""Tiny random Hugging Face checkpoints built in the tests (torch CPU, seeded): nothing is downloaded.

``make_hf_model(dir, HFSpec(...))`` builds a ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` from a config, gives it
seeded random weights of a useful scale (the transformers init, std 0.02, makes every logit ≈ 0 and parity tests
vacuous), and writes it with ``save_pretrained(safe_serialization=True)``, optionally sharded and with a tokenizer
from ``tokenizer_fixtures``. It returns the torch model in float32 with eager attention, the reference for parity.

    from hf_fixtures import HFSpec, make_hf_model, hf_logits
    ref = make_hf_model(tmp_path / "m", HFSpec(arch="qwen2", num_kv_heads=1, tied=True))
    logits = hf_logits(ref, tokens)          # float32 [batch, seq, vocab]

``PARITY_SPECS`` lists the configurations the parity tests cover (GQA with 1 kv head, tied/untied, q/k/v bias,
Llama-3 rope scaling, odd head_dim). All models have hidden ≤ 64, 2 layers and vocab ≤ 512 unless a tokenizer is
requested (its ~620 ids set the vocabulary); building one takes well under a second.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # small so that tiny test positions cross every band


@dataclasses.dataclass(frozen=True)
class HFSpec:
    """A tiny checkpoint. ``bias``: Llama ``attention_bias`` (Qwen2 always has q/k/v bias and ignores it).

    tokenizer:        None, ``"qwen"`` or ``"llama"`` (a ``tokenizer_fixtures.make_hf_tokenizer`` tokenizer is
                      written into the directory and ``vocab_size`` becomes its size plus ``extra_vocab_rows``).
    extra_vocab_rows: embedding rows beyond the tokenizer (like Qwen2.5's 152064 rows for 151665 ids).
    """

    arch: str = "llama"
    vocab_size: int = 128
    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    tied: bool = False
    bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 256
    tokenizer: str | None = None
    extra_vocab_rows: int = 0
    seed: int = 0


PARITY_SPECS: dict[str, HFSpec] = {
    "llama_gqa1_untied": HFSpec(arch="llama", num_kv_heads=1),
    "llama_tied_bias": HFSpec(arch="llama", tied=True, bias=True, mlp_bias=True, seed=1),
    "llama3_rope_scaling": HFSpec(arch="llama", rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, seed=2),
    "llama_odd_head_dim": HFSpec(arch="llama", hidden_size=40, intermediate_size=72, num_heads=4, num_kv_heads=2,
                                 head_dim=12, vocab_size=96, seed=3),
    "qwen2_bias_tied": HFSpec(arch="qwen2", tied=True, num_kv_heads=1, rope_theta=1e6, seed=4),
    "qwen2_untied_mha": HFSpec(arch="qwen2", num_heads=4, num_kv_heads=4, hidden_size=64, intermediate_size=96,
                               vocab_size=512, seed=5),
}


def hf_config(spec: HFSpec) -> Any:
    """The transformers config object for ``spec`` (float32, eager attention)."""
    import transformers

    vocab = spec.vocab_size
    ids: dict[str, Any] = {}
    if spec.tokenizer is not None:
        vocab, ids = _tokenizer_vocab(spec)
    kw = dict(vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
              num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
              num_key_value_heads=spec.num_kv_heads, rms_norm_eps=spec.rms_norm_eps,
              max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=spec.tied,
              rope_parameters={"rope_theta": spec.rope_theta, "rope_type": "default", **(spec.rope_scaling or {})},
              attn_implementation="eager", dtype="float32", **ids)
    if spec.head_dim is not None:
        kw["head_dim"] = spec.head_dim
    if spec.arch == "llama":
        return transformers.LlamaConfig(attention_bias=spec.bias, mlp_bias=spec.mlp_bias, **kw)
    if spec.arch == "qwen2":
        return transformers.Qwen2Config(**kw)
    raise ValueError(f"arch must be 'llama' or 'qwen2', got {spec.arch!r}")


def _tokenizer_vocab(spec: HFSpec) -> tuple[int, dict[str, Any]]:
    import tempfile

    from tokenizer_fixtures import make_hf_tokenizer

    from ramjax.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as d:
        make_hf_tokenizer(d, spec.tokenizer)
        tok = load_tokenizer(d)
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        return tok.vocab_size + spec.extra_vocab_rows, ids


def randomize_(model: Any, seed: int) -> None:
    """Seeded weights of a scale that makes logits O(1): linear ~ N(0, 1/fan_in), embeddings ~ N(0, 4/hidden),
    norm scales ~ 1 + N(0, 0.2²), biases ~ N(0, 0.2²). Tied weights are shared parameters, drawn once."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:  # [vocab, hidden]; this scale keeps tied logits O(1) too
                p.copy_(2.0 * torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
            else:  # [out, in]
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))


def make_hf_model(directory: str | os.PathLike, spec: HFSpec | None = None, *, max_shard_size: str | int | None = None,
                  **overrides: Any) -> Any:
    """Builds, randomizes and ``save_pretrained``s a tiny model into ``directory``; returns the torch model.

    ``overrides`` replace fields of ``spec`` (default ``HFSpec()``). ``max_shard_size`` (e.g. ``"20KB"``) makes
    transformers write sharded safetensors with ``model.safetensors.index.json``.
    """
    import torch
    import transformers

    spec = dataclasses.replace(spec or HFSpec(), **overrides)
    cfg = hf_config(spec)
    torch.manual_seed(spec.seed)
    cls = transformers.LlamaForCausalLM if spec.arch == "llama" else transformers.Qwen2ForCausalLM
    model = cls(cfg).to(torch.float32).eval()
    randomize_(model, spec.seed)
    directory = os.fspath(directory)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, safe_serialization=True, **kw)
    if spec.tokenizer is not None:
        from tokenizer_fixtures import make_hf_tokenizer

        make_hf_tokenizer(directory, spec.tokenizer, generation_config=False)
    return model


def load_hf_reference(directory: str | os.PathLike) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` in float32 with eager attention (for round-trip checks)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(directory), dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model: Any, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Float32 logits ``[batch, seq, vocab]`` of a torch causal LM for int ``tokens`` ``[batch, seq]``."""
    import torch

    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.as_tensor(np.asarray(attention_mask))}
        out = model(input_ids=torch.as_tensor(np.asarray(tokens, np.int64)), **kw)
    return out.logits.float().numpy()


def random_tokens(seed: int, batch: int, seq: int, vocab: int) -> np.ndarray:
    """Seeded int32 token ids ``[batch, seq]`` in ``[0, vocab)``."""
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq)).astype(np.int32)


def random_params(cfg: Any, seed: int = 0) -> dict:
    """Seeded random ramjax params for ``cfg`` at the scale of ``randomize_`` (O(1) logits), as float32 numpy.

    Built on the host from ``model.param_shapes`` with a seeded numpy generator: much faster in tests than
    compiling ``init_params`` (whose XLA compile takes seconds even for tiny models).
    """
    import jax

    from ramjax import model as model_lib

    rng = np.random.default_rng(seed)
    shapes = model_lib.param_shapes(cfg)

    def draw(path, s):
        name = str(getattr(path[-2] if path[-1].key == "scale" else path[-1], "key"))
        shape = s.shape[1:] if path[0].key == "layers" else s.shape
        if path[-1].key == "scale":
            x = 1.0 + 0.2 * rng.standard_normal(s.shape)
        elif name.startswith("b"):
            x = 0.2 * rng.standard_normal(s.shape)
        elif name == "embed":
            x = 2.0 * rng.standard_normal(s.shape) / np.sqrt(cfg.hidden_size)
        else:  # fan-in: the embed dim of wq/wk/wv, every dim but the output one otherwise
            fan_in = shape[0] if name in ("wq", "wk", "wv") else int(np.prod(shape[:-1]))
            x = rng.standard_normal(s.shape) / np.sqrt(fan_in)
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)
