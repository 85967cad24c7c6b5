"""``SamplingParams``: every setting of the sampler in one frozen record, the single home of their defaults, and
the named presets built from it.

    params = SamplingParams(mode="sparse", aligner_temperature=0.3)
    ramjax.sample(proposal, aligner, prompts, params, num_samples=4, seed=0)
    ramjax.sample(proposal, None, prompts, PRESETS["release"])            # the one-time training samples
    ramjax.sample(proposal, aligner, prompts, mode="par", n=16)           # keywords override the defaults

This module needs no JAX (config files embed a ``SamplingParams`` as their ``sampling:`` section). The defaults of
the record are the authors' released decoding settings for the aligned model (proposal T 0.5 / top-p 0.95,
aligner T 0.5 / top-p 0.9, repetition penalty 1.05, KL monitor at 0.1; MISSION / arXiv 2505.19700).

Presets (``PRESETS``):

* ``sampled``: plain ancestral sampling from each system's distribution (T 1, no nucleus, no top-k, no repetition
  penalty, no KL monitor): how evaluation compares systems.
* ``greedy``: the same with the argmax instead of a draw (temperatures 0 and ``greedy``).
* ``release``: the authors' settings for the one-time P_M samples RAM trains on: mode ``proposal``, T 0.5,
  top-p 0.95, top-k 10, repetition penalty 1.05.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any, Literal, Mapping, Sequence

__all__ = ["SamplingParams", "PRESETS", "preset", "SamplerError", "ModeError", "SamplingParameterError",
           "SpeculativeError", "MODES",
           "RAM_MODES", "FALLBACKS", "SUPPORTS", "TEMPLATES", "resolve", "FIELDS"]

MODES = ("proposal", "aligner", "par", "sparse", "product", "inra")
RAM_MODES = ("par", "sparse", "product")
FALLBACKS = ("proposal", "paper")
SUPPORTS = ("nucleus", "full")
TEMPLATES = ("plain", "chat")
DECODE_DTYPES = ("float32", "bfloat16")

# A setting that may be given per prompt: one value for every prompt, or a sequence with one value per prompt.
PerPromptFloat = float | tuple[float, ...]
PerPromptInt = int | tuple[int, ...]
PerPromptBool = bool | tuple[bool, ...]


class SamplerError(ValueError):
    """Bad input to the sampler; the message names the argument and the fix."""


class ModeError(SamplerError):
    """Unknown mode, or a model the mode needs is missing."""


class SamplingParameterError(SamplerError):
    """A sampling parameter is out of range (n, temperature, top-p, top-k, penalty, threshold...)."""


class SpeculativeError(SamplingParameterError):
    """Speculative decoding (``num_speculative_tokens > 0``) cannot run with these settings (mode, models, k)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn (see ``ramjax.decode_rules`` for the rules).

    mode:        ``proposal`` (P_M alone), ``aligner`` (Q_θ alone), ``par`` (n candidates from P_M's nucleus
                 weighted by Q_θ), ``sparse`` (the released rule: Q_θ restricted to P_M's nucleus, then the
                 aligner-side top-p), ``product`` (exact softmax(z_M/T_M + z_Q/T_Q)), ``inra`` (an InRa model's two
                 streams mixed by ``inra_lambda``, drawn with the proposal-side settings).
    n:           candidates per token in ``par`` (a compile-time constant).
    max_new_tokens: generated tokens per sample at most.
    proposal_temperature, aligner_temperature, proposal_top_p, aligner_top_p, top_k, repetition_penalty,
    kl_threshold, greedy, inra_lambda: one value, or (``sample``/``stream`` only) one per prompt. Temperature 0
                 or ``greedy`` makes the row greedy (the argmax of the mode's target). ``top_k`` 0 = off;
                 ``repetition_penalty`` 1 = off (HF's rule over prompt and generated tokens); ``kl_threshold``
                 None = no KL monitor (par / sparse / product: where KL(P_M‖Q_θ) exceeds it the token is drawn by
                 the fallback rule). ``inra_lambda``: mode ``inra``, 0 = the base model, 1 = the adapted model.
    kl_fallback: ``proposal`` (the fallback token is drawn from P_M with its own settings) or ``paper`` (the
                 released code: P_M's logits with the aligner-side temperature, penalty and top-p).
    product_support: ``nucleus`` (P_M's) or ``full`` vocabulary for mode ``product``.
    stop:        stop strings, matched on the generated text on device.
    template:    how text prompts are rendered: ``plain`` (the authors' ``"\\n\\nHuman: {p}\\n\\nAssistant: "``) or
                 ``chat`` (the tokenizer's chat template).
    num_speculative_tokens: k > 0 turns on exact speculative decoding (``ramjax.speculative``, vLLM's name): the
                 aligner drafts k tokens per round from its own processed distribution and P_M verifies them in one
                 forward; every token has the token-level distribution of the mode (different tokens for a seed).
                 Modes ``product``, ``sparse``, ``proposal`` (with or without the KL monitor); ignored in
                 ``aligner`` (the draft is the target); refused in ``par`` (no closed-form per-token distribution)
                 and ``inra`` (no draft model). 0 = off (the default). ``sample`` only (``stream`` refuses it).
    decode_dtype: None decodes with the models' own weights and compute dtype; ``bfloat16`` (or ``float32``) casts
                 the weights the sampler decodes with (and the compute dtype) to it: half the bytes each memory-bound
                 decode step reads, for TPUs and GPUs. Logits and the rules stay float32. On XLA's CPU backend bf16
                 matmuls are ~10x slower than float32 (measured, bench/sample.py): keep None there.
    """

    mode: Literal["proposal", "aligner", "par", "sparse", "product", "inra"] = "par"
    n: int = 8
    max_new_tokens: int = 64
    proposal_temperature: PerPromptFloat = 0.5
    aligner_temperature: PerPromptFloat = 0.5
    proposal_top_p: PerPromptFloat = 0.95
    aligner_top_p: PerPromptFloat = 0.9
    top_k: PerPromptInt = 0
    repetition_penalty: PerPromptFloat = 1.05
    kl_threshold: PerPromptFloat | None = 0.1
    kl_fallback: Literal["proposal", "paper"] = "proposal"
    product_support: Literal["nucleus", "full"] = "nucleus"
    stop: tuple[str, ...] = ()
    greedy: PerPromptBool = False
    inra_lambda: PerPromptFloat = 1.0
    template: Literal["plain", "chat"] = "plain"
    decode_dtype: Literal["float32", "bfloat16"] | None = None
    num_speculative_tokens: int = 0

    def __post_init__(self) -> None:
        # Lists become tuples (the record stays hashable) and a single stop string a one-element tuple.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "stop" and isinstance(v, str):
                object.__setattr__(self, f.name, (v,))
            elif isinstance(v, list) or (hasattr(v, "tolist") and getattr(v, "ndim", 0) > 0):
                object.__setattr__(self, f.name, tuple(v.tolist() if hasattr(v, "tolist") else v))

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with ``changes`` (field names; an unknown name is a ``SamplingParameterError`` with a
        did-you-mean)."""
        check_names(changes)
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raises ``SamplingParameterError`` naming the first setting out of range and what is expected."""
        if self.mode not in MODES:
            raise ModeError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        _choice("kl_fallback", self.kl_fallback, FALLBACKS)
        _choice("product_support", self.product_support, SUPPORTS)
        _choice("template", self.template, TEMPLATES)
        if self.decode_dtype is not None:
            _choice("decode_dtype", self.decode_dtype, DECODE_DTYPES)
        for name in ("n", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SamplingParameterError(f"{name}={v!r} must be an integer >= 1")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise SpeculativeError(f"num_speculative_tokens={k!r} must be an integer >= 0 (0 = off)")
        if k and self.mode == "par":
            raise SpeculativeError(
                "num_speculative_tokens > 0 cannot be used with mode='par': par draws from a self-normalised "
                "importance-sampling approximation (n candidates), which has no closed-form per-token distribution "
                "to accept drafts against. Use mode='product' (par's n -> infinity limit) or 'sparse', or "
                "num_speculative_tokens=0")
        if k and self.mode == "inra":
            raise SpeculativeError("num_speculative_tokens > 0 cannot be used with mode='inra' (it has no draft "
                                   "model); set num_speculative_tokens=0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParameterError(f"stop={self.stop!r}: stop strings must be non-empty strings")
        for name, check, expect, _ in PER_PROMPT:
            value = getattr(self, name)
            if name == "kl_threshold" and value is None:
                continue
            for v in (value if isinstance(value, tuple) else (value,)):
                if name == "greedy":
                    if not isinstance(v, bool) and not (hasattr(v, "dtype") and v.dtype == bool):
                        raise SamplingParameterError(f"greedy={v!r} is invalid: expected true or false")
                    continue
                if v is None or isinstance(v, bool) or not _is_number(v) or not check(v):
                    raise SamplingParameterError(f"{name}={v!r} is invalid: expected {expect}")


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, (str, bytes))


def _temp(v) -> bool:
    return v >= 0 and math.isfinite(v)


# name, check, what is expected, numpy dtype name: the settings that may be given one per prompt.
PER_PROMPT: tuple[tuple[str, Any, str, str], ...] = (
    ("proposal_temperature", _temp, "a finite temperature >= 0 (0 = greedy)", "float32"),
    ("aligner_temperature", _temp, "a finite temperature >= 0 (0 = greedy)", "float32"),
    ("proposal_top_p", lambda v: 0 < v <= 1, "top-p in (0, 1]", "float32"),
    ("aligner_top_p", lambda v: 0 < v <= 1, "top-p in (0, 1]", "float32"),
    ("top_k", lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0 (0 = off)", "int32"),
    ("repetition_penalty", lambda v: v > 0 and math.isfinite(v), "a finite penalty > 0 (1 = off)", "float32"),
    ("kl_threshold", lambda v: v >= 0, "a threshold >= 0, or None (off)", "float32"),
    ("inra_lambda", math.isfinite, "a finite λ (0 = the base model, 1 = the adapted model; any real value mixes)",
     "float32"),
    ("greedy", None, "true or false", "bool"),
)

FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SamplingParameterError(f"{name}={value!r}; expected one of {', '.join(choices)}{hint}")


def check_names(changes: Mapping[str, Any]) -> None:
    """Raises ``SamplingParameterError`` (with a did-you-mean) for a name that is not a ``SamplingParams`` field."""
    for k in changes:
        if k not in FIELDS:
            close = difflib.get_close_matches(k, FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SamplingParameterError(f"unknown sampling setting {k!r}{hint} (the fields of SamplingParams: "
                                         f"{', '.join(FIELDS)})")


# Plain sampling from the distribution: no nucleus, no top-k, no penalty, no KL monitor.
_PLAIN = dict(proposal_temperature=1.0, aligner_temperature=1.0, proposal_top_p=1.0, aligner_top_p=1.0, top_k=0,
              repetition_penalty=1.0, kl_threshold=None)

PRESETS: dict[str, SamplingParams] = {
    "sampled": SamplingParams(**_PLAIN),
    # temperature 0 as well as the flag: external generators (``evaluate.System.generate_fn``) read T = 0 as greedy
    "greedy": SamplingParams(**{**_PLAIN, "proposal_temperature": 0.0, "aligner_temperature": 0.0}, greedy=True),
    "release": SamplingParams(mode="proposal", proposal_temperature=0.5, proposal_top_p=0.95, top_k=10,
                              repetition_penalty=1.05),
}


def preset(name: str, **changes: Any) -> SamplingParams:
    """The named preset (``sampled``, ``greedy``, ``release``) with ``changes`` applied."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SamplingParameterError(f"unknown sampling preset {name!r}{hint}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**changes)


def resolve(params: SamplingParams | str | None, overrides: Mapping[str, Any] | None = None) -> SamplingParams:
    """``params`` (a ``SamplingParams``, a preset name, or None = the defaults) with field ``overrides``, validated."""
    if params is None:
        params = SamplingParams()
    elif isinstance(params, str):
        params = preset(params)
    elif not isinstance(params, SamplingParams):
        raise SamplingParameterError(f"params must be a SamplingParams or a preset name ({', '.join(PRESETS)}), got "
                                     f"{type(params).__name__}")
    if overrides:
        params = params.replace(**overrides)
    params.validate()
    return params
