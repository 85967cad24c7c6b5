"""Evaluation: judge systems on held-out prompts, compare them with a baseline, and write the report.

A *system* is something that answers prompts: the proposal P_M alone, the aligner Q_θ alone, P_M · Q_θ sampled
token by token (``par``, ``sparse``, ``product``), the sequence-level *corrector* baseline (P_M drafts the whole
response, then a model of the aligner's size rewrites it), or any user function (``System.generate_fn``)::

    systems = [
        System("warm P_M", proposal=pm),
        System("warm P_M + RAM (product)", proposal=pm, aligner=q, mode="product"),
        System("corrector", proposal=pm, corrector=c, mode="corrector"),
    ]
    results = evaluate_systems(systems, eval_records, align_records=s_records, baseline_name="warm P_M")
    table = write_report("runs/default", results, stage_times={"pretrain": 120.0, ...})

Every system is run under every *decoding* (``"sampled"``: temperature 1 on both models; ``"greedy"``:
temperature 0), so that a greedy RAM is only ever compared with a greedy baseline. Per system and decoding the
results hold: strict (and lenient) judge accuracy with a percentile-bootstrap 95% interval, accuracy per task
kind, the pairwise win rate against the baseline on the same prompts (ties 0.5, with a paired-bootstrap interval),
mean response length in tokens, the KL-fallback rate and ESS reported by the sampler (token-weighted), finish
reasons, and sampling throughput (generated tokens / wall seconds, leaving out the first batch, whose time includes
compilation, when there are several; all prompts of a run are sampled in batches of one shape).
Per system: the held-out per-token log-likelihood of the alignment set S (for RAM the per-token normalised
product, see :func:`product_token_logprobs`) and the training cost given by the caller (:func:`training_cost`).

The same judge serves users' own data: :func:`evaluate_file` scores a JSONL of responses with an exact-match or
regex verifier, ``python -m ramjax.evaluate CONFIG [key=value ...]`` runs and judges systems from model
directories (``EvalConfig``), and :func:`write_alpacaeval` writes AlpacaEval-ready JSON for users with a judge.

Around this module: ``ramjax.verify`` (verifiers and judging), ``ramjax.loglik`` (held-out log-likelihood) and
``ramjax.report`` (results.json, report.md, AlpacaEval files); their public names are re-exported here.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

from ramjax import config as config_lib
from ramjax import distributed, files, report, sampler, stats, verify
from ramjax.api import load_model
from ramjax.loglik import heldout_loglik, product_token_logprobs, sequence_logliks
from ramjax.report import get_field, results_table, write_alpacaeval, write_json_atomic, write_outputs, write_report
from ramjax.sampling_params import PRESETS
from ramjax.verify import EvalError, default_verifier, judge_responses, make_eval_verifier

logger = logging.getLogger(__name__)

__all__ = [
    "EvalError", "MODES", "DECODINGS", "SAMPLING_DEFAULTS", "CORRECTOR_TEMPLATE", "Generation", "System",
    "corrector_prompt", "corrector_training_records", "training_cost", "product_token_logprobs", "sequence_logliks",
    "heldout_loglik", "judge_responses", "evaluate_systems", "evaluate_file", "write_alpacaeval", "write_outputs",
    "results_table", "write_report", "write_json_atomic", "SystemConfig", "EvalConfig", "evaluate_from_config", "main",
]


# What a system does with its models. par / sparse / product are the RAM sampling rules (see ramjax.sampler).
MODES: tuple[str, ...] = ("proposal", "aligner", "par", "sparse", "product", "corrector")
_RAM_MODES = ("par", "sparse", "product")

# Decoding presets (``ramjax.sampling_params.PRESETS``). They set only the temperatures and the greedy flag; a
# system's own ``sampling`` settings (top-p, n, KL threshold) apply under both, so "sampled" vs "greedy" is the one
# thing that changes between a system's two rows.
DECODINGS: dict[str, dict[str, Any]] = {
    name: {k: getattr(PRESETS[name], k) for k in ("proposal_temperature", "aligner_temperature", "greedy")}
    for name in ("sampled", "greedy")
}

# Sampler settings a system gets unless its ``sampling`` says otherwise: the ``sampled`` preset's plain sampling
# from the distribution (no nucleus, no top-k, no repetition penalty, no KL monitor), so systems are compared on
# their distributions.
_SAMPLED = PRESETS["sampled"]
SAMPLING_DEFAULTS: dict[str, Any] = {
    k: getattr(_SAMPLED, k)
    for k in ("n", "proposal_top_p", "aligner_top_p", "top_k", "repetition_penalty", "kl_threshold")
}

# The corrector's prompt, before the sampler's template wraps it. With the plain template the corrector sees
# "\n\nHuman: {prompt}\n\nDraft: {draft}\n\nAssistant: " — the same text at training (SFT) and at inference.
CORRECTOR_TEMPLATE = "{prompt}\n\nDraft: {draft}"


# ---------------------------------------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
    """One generated response: its text, its length in tokens, and the sampler's diagnostics (None if n/a)."""

    text: str
    num_tokens: int
    finish_reason: str = ""
    kl_fallback_rate: float | None = None
    ess_mean: float | None = None
    token_ids: list[int] | None = None


GenerateFn = Callable[..., Sequence[Any]]


@dataclasses.dataclass
class System:
    """Something that answers prompts, to be judged.

    name:       unique label (table rows, output files).
    proposal:   P_M, a ``ramjax.api.Model`` (modes proposal, par, sparse, product, corrector).
    aligner:    Q_θ (modes aligner, par, sparse, product).
    mode:       one of ``MODES``. ``corrector``: P_M drafts the whole response, then ``corrector`` rewrites it
                from ``corrector_prompt(prompt, draft)`` (the sequence-level baseline).
    corrector:  the corrector model (mode corrector).
    sampling:   sampler settings on top of ``SAMPLING_DEFAULTS`` (e.g. ``{"n": 16, "kl_threshold": 0.1}``); the
                decoding presets set the temperatures.
    train_cost: the caller's training cost of this system, e.g. ``training_cost(seconds, params, tokens)``.
    generate_fn: replaces the sampler: ``generate_fn(prompts, *, decoding, settings, seed, max_new_tokens, stop)``
                returning one ``Generation``, dict or str per prompt (stubs in tests, external APIs).
    loglik:     compute the held-out log-likelihood of S for this system (needs models).
    """

    name: str
    proposal: Any = None
    aligner: Any = None
    mode: str = "proposal"
    corrector: Any = None
    sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train_cost: Mapping[str, Any] | None = None
    generate_fn: GenerateFn | None = None
    loglik: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise EvalError(f"a system needs a non-empty name, got {self.name!r}")
        if self.mode not in MODES:
            raise EvalError(f"system {self.name!r}: unknown mode {self.mode!r}; expected one of {list(MODES)}")
        if self.generate_fn is None:
            need = {"proposal": ("proposal",), "aligner": ("aligner",), "corrector": ("proposal", "corrector")}
            for attr in need.get(self.mode, ("proposal", "aligner")):
                if getattr(self, attr) is None:
                    raise EvalError(f"system {self.name!r} (mode {self.mode}) needs a {attr} model, or a generate_fn")

    @property
    def loglik_kind(self) -> str | None:
        """Which distribution's likelihood of S this system reports: proposal, aligner, product or None."""
        if self.mode == "proposal":
            return "proposal"
        if self.mode == "aligner":
            return "aligner"
        if self.mode in _RAM_MODES:
            return "product"
        return None  # a corrector's distribution over responses is conditioned on a draft: no single likelihood


def corrector_prompt(prompt: str, draft: str) -> str:
    """The corrector's prompt for a task prompt and P_M's draft (the sampler's template wraps it)."""
    if not isinstance(prompt, str) or not isinstance(draft, str):
        raise EvalError(f"corrector_prompt needs two strings, got {type(prompt).__name__} and {type(draft).__name__}")
    return CORRECTOR_TEMPLATE.format(prompt=prompt, draft=draft.strip())


def corrector_training_records(records: Sequence[Mapping[str, Any]], drafts: Sequence[str]) -> list[dict[str, str]]:
    """SFT records for the corrector: ``{"prompt": corrector_prompt(prompt, draft), "response": target}``.

    records[i] holds "prompt" and the target in "response" (or "chosen", or "reference"); drafts[i] is P_M's draft
    for records[i]["prompt"].
    """
    if len(records) != len(drafts):
        raise EvalError(f"{len(records)} records but {len(drafts)} drafts; give one draft per record")
    out = []
    for i, (r, d) in enumerate(zip(records, drafts)):
        target = next((r[k] for k in ("response", "chosen", "reference") if k in r), None)
        if "prompt" not in r or not isinstance(target, str):
            raise EvalError(f"record {i} needs 'prompt' and a target 'response' (or 'chosen'/'reference') string; "
                            f"keys: {sorted(r)}")
        out.append({"prompt": corrector_prompt(r["prompt"], d), "response": target})
    return out


def training_cost(seconds: float | None = None, params: int | None = None, tokens: int | None = None,
                  flops: float | None = None, **extra: Any) -> dict[str, Any]:
    """A training-cost record: wall seconds, trained parameters, training tokens and FLOPs ≈ 6·params·tokens
    (forward + backward of a dense decoder; pass ``flops`` to override). Extra keys are kept (e.g. ``stages``)."""
    if flops is None and params is not None and tokens is not None:
        flops = 6.0 * float(params) * float(tokens)
    return {"seconds": seconds, "params": params, "tokens": tokens, "flops": flops, **extra}


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


def _opt_float(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(np.asarray(x))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _to_generation(obj: Any) -> Generation:
    """A Generation from a sampler result (object or dict), a dict or a bare string."""
    if isinstance(obj, Generation):
        return obj
    if isinstance(obj, str):
        return Generation(text=obj, num_tokens=len(obj.split()))
    if isinstance(obj, (list, tuple)) and obj and not isinstance(obj[0], (int, np.integer)):
        obj = obj[0]  # one prompt's list of samples: we draw one
    text = get_field(obj, "text")
    if not isinstance(text, str):
        raise EvalError(f"a generation must carry a 'text' string, got {type(obj).__name__} {obj!r:.80}")
    ids = get_field(obj, "token_ids")
    ids = [int(i) for i in ids] if ids is not None else None
    n = get_field(obj, "num_tokens", get_field(obj, "length"))
    if n is None:
        n = len(ids) if ids is not None else len(text.split())
    diag = get_field(obj, "diagnostics") or {}
    return Generation(
        text=text,
        num_tokens=int(n),
        finish_reason=str(get_field(obj, "finish_reason", "") or ""),
        kl_fallback_rate=_opt_float(get_field(obj, "kl_fallback_rate", get_field(diag, "kl_fallback_rate"))),
        ess_mean=_opt_float(get_field(obj, "ess_mean", get_field(diag, "ess_mean"))),
        token_ids=ids,
    )


def _settings(system: System, decoding: str) -> dict[str, Any]:
    if decoding not in DECODINGS:
        raise EvalError(f"unknown decoding {decoding!r}; expected one of {list(DECODINGS)}")
    return {**SAMPLING_DEFAULTS, **dict(system.sampling), **DECODINGS[decoding]}


def _run_sampler(proposal: Any, aligner: Any, prompts: Sequence[str], mode: str, settings: Mapping[str, Any], *,
                 seed: int, max_new_tokens: int, stop: Sequence[str], batch_size: int, template: str
                 ) -> tuple[list[Generation], list[float]]:
    """Samples one response per prompt, one sampler call per batch of ``batch_size`` prompts; returns the
    generations and each batch's wall seconds.

    The last batch is filled up with copies of its last prompt (their outputs dropped) so that every call has the
    same shape and compiles once; ``example_offset`` keeps each prompt's random stream what a single call over all
    prompts would give it.
    """

    kw = dict(settings)
    if mode in ("proposal", "aligner"):
        kw.pop("n", None), kw.pop("kl_threshold", None)
    prompts = list(prompts)
    gens: list[Generation] = []
    times: list[float] = []
    # Several processes (models on each one's local devices): each samples its batch of every round of
    # process_count batches; the results come back to every process in prompt order.
    for round_start in range(0, len(prompts), batch_size * jax.process_count()):
        start, chunk = distributed.local_share(prompts, round_start, batch_size)
        mine: tuple[list[Generation], list[float]] = ([], [])
        if chunk:
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (batch_size - real)
            t0 = time.perf_counter()
            out = sampler.sample(proposal, aligner, chunk, mode=mode, max_new_tokens=max_new_tokens, num_samples=1,
                                 seed=seed, stop=list(stop), template=template, batch_size=batch_size,
                                 example_offset=start, **kw)
            mine = ([_to_generation(r) for r in out[:real]], [time.perf_counter() - t0])
        for g, t in distributed.allgather_objects(mine):
            gens += g
            times += t
    return gens, times


def _generate(system: System, prompts: Sequence[str], decoding: str, *, seed: int, max_new_tokens: int,
              stop: Sequence[str], batch_size: int, template: str) -> tuple[list[Generation], list[float] | None]:
    """A system's responses to prompts, and the wall seconds per batch (None for a ``generate_fn``)."""
    settings = _settings(system, decoding)
    times: list[float] | None
    if system.generate_fn is not None:
        out = system.generate_fn(list(prompts), decoding=decoding, settings=settings, seed=seed,
                                 max_new_tokens=max_new_tokens, stop=tuple(stop))
        gens, times = [_to_generation(o) for o in out], None
    elif system.mode == "corrector":
        drafts, t_draft = _run_sampler(system.proposal, None, prompts, "proposal", settings, seed=seed,
                                       max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size,
                                       template=template)
        cprompts = [corrector_prompt(p, d.text) for p, d in zip(prompts, drafts)]
        # A different seed for the rewrite so that its random draws are not those of the draft.
        gens, t_fix = _run_sampler(system.corrector, None, cprompts, "proposal", settings, seed=seed + 1,
                                   max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size,
                                   template=template)
        times = [a + b for a, b in zip(t_draft, t_fix)]
    else:
        gens, times = _run_sampler(system.proposal, system.aligner, prompts, system.mode, settings, seed=seed,
                                   max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size,
                                   template=template)
    if len(gens) != len(prompts):
        raise EvalError(f"system {system.name!r} returned {len(gens)} responses for {len(prompts)} prompts")
    return gens, times


def _throughput(gens: Sequence[Generation], times: Sequence[float] | None, seconds: float,
                batch_size: int) -> tuple[float | None, bool]:
    """Generated tokens per second, and whether the first batch was left out.

    With two or more batches the first one is left out: it includes compilation. Otherwise all tokens over all
    seconds (compilation included unless the caller warmed up).
    """
    if times is not None and len(times) >= 2:
        toks = sum(g.num_tokens for g in gens[batch_size:])
        return (toks / sum(times[1:]) if sum(times[1:]) > 0 else None), True
    toks = sum(g.num_tokens for g in gens)
    return (toks / seconds if seconds > 0 else None), False


def _ci_dict(ci: stats.CI) -> dict[str, float]:
    return {"mean": ci.mean, "low": ci.low, "high": ci.high}


def _weighted(values: Sequence[float | None], weights: Sequence[int]) -> float | None:
    """Token-weighted mean of the non-None values (None if there are none)."""
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    if not pairs:
        return None
    w = np.asarray([max(p[1], 1) for p in pairs], np.float64)
    return float(np.dot([p[0] for p in pairs], w) / w.sum())


def _summarise(judged: list[dict[str, Any]] | None, gens: list[Generation], seconds: float, *, n_boot: int,
               seed: int) -> dict[str, Any]:
    """Per (system, decoding) summary; judged None (no references): accuracy, lenient and by_kind left empty."""
    lengths = [g.num_tokens for g in gens]
    out: dict[str, Any] = {
        "n": len(gens),
        "accuracy": None,
        "lenient": None,
        "by_kind": {},
        "mean_length": float(np.mean(lengths)),
        "kl_fallback_rate": _weighted([g.kl_fallback_rate for g in gens], lengths),
        "ess_mean": _weighted([g.ess_mean for g in gens], lengths),
        "finish_reasons": dict(sorted(_count(g.finish_reason or "unknown" for g in gens).items())),
        "seconds": float(seconds),
        "tokens_per_s": float(sum(lengths) / seconds) if seconds > 0 else None,
    }
    if judged is None:
        return out
    out["accuracy"] = _ci_dict(stats.bootstrap_ci([j["strict"] for j in judged], n_boot=n_boot, seed=seed))
    out["by_kind"] = stats.accuracy_by_kind(judged)
    if all("lenient" in j for j in judged):
        out["lenient"] = _ci_dict(stats.bootstrap_ci([j["lenient"] for j in judged], n_boot=n_boot, seed=seed))
    return out


def _count(items) -> dict[str, int]:
    c: dict[str, int] = {}
    for x in items:
        c[x] = c.get(x, 0) + 1
    return c


def evaluate_systems(
    systems: Sequence[System],
    eval_records: Sequence[Mapping[str, Any]],
    *,
    decoding: Sequence[str] = ("sampled", "greedy"),
    seed: int = 0,
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    baseline_name: str | None = None,
    align_records: Sequence[Mapping[str, Any]] | None = None,
    verifier: verify.Verifier | None | Literal["auto"] = "auto",
    batch_size: int = 32,
    template: str = "plain",
    n_boot: int = 1000,
    warmup: bool = False,
    loglik_batch_size: int = 16,
    loglik_max_len: int = 512,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs every system under every decoding on the eval prompts and judges the responses.

    eval_records: dicts with "prompt", the verifier's fields (``answer`` / ``regex`` for the default one) and
        optionally a group field (``family``/``category``/``kind``) for the per-group breakdown.
    baseline_name: the system the win rates are against (default: the first); compared at the same decoding.
    align_records: {"prompt", "response"} records of S for the held-out log-likelihood (skipped if None).
    verifier: ``verify(record, response)`` (see ``ramjax.verify``); "auto" (default) = :func:`default_verifier`
        of the records: exact/regex on their references, or, when they carry none, no judging at all (accuracy,
        per-group accuracy and win rates are None; the responses, lengths, likelihoods and AlpacaEval files are
        still produced). None: no judging.
    warmup: before its first decoding, run each system once on the first ``batch_size`` prompts, untimed (useful
        when all prompts fit in one batch; with several batches tokens/s already leaves the first, compiling, one
        out). The decodings share compiled code: temperatures are traced. A batch whose prompts fall in another
        length bucket may still compile inside the timed batches.
    progress: called with a short message before each (system, decoding) run.

    Returns::

        {"baseline": name, "decodings": [...], "n_prompts": N, "seed": seed, "max_new_tokens": ...,
         "systems": {name: {"mode", "loglik": {...} | None, "train_cost": {...} | None,
                            "decodings": {dec: {"n", "accuracy": {mean, low, high}, "lenient", "by_kind",
                                                "win_rate": {mean, low, high}, "mean_length", "kl_fallback_rate",
                                                "ess_mean", "finish_reasons", "seconds", "tokens_per_s",
                                                "first_batch_excluded", "first_batch_seconds",
                                                "warmup_seconds"}}}},
         "outputs": {name: {dec: [{"prompt", "response", "kind", "strict", "lenient"?, "num_tokens",
                                   "finish_reason"}]}}}
    """
    systems = list(systems)
    if not systems:
        raise EvalError("evaluate_systems needs at least one system")
    names = [s.name for s in systems]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalError(f"system names must be unique; repeated: {dupes}")
    baseline_name = names[0] if baseline_name is None else baseline_name
    if baseline_name not in names:
        raise EvalError(f"baseline {baseline_name!r} is not among the systems {names}")
    decoding = [decoding] if isinstance(decoding, str) else list(decoding)
    if not decoding:
        raise EvalError("decoding is empty; use ('sampled', 'greedy')")
    for d in decoding:
        if d not in DECODINGS:
            raise EvalError(f"unknown decoding {d!r}; expected one of {list(DECODINGS)}")
    records = list(eval_records)
    if not records:
        raise EvalError("no evaluation records")
    prompts = []
    for i, r in enumerate(records):
        if not isinstance(r.get("prompt"), str):
            raise EvalError(f"eval record {i} needs a 'prompt' string (keys: {sorted(r)})")
        prompts.append(r["prompt"])

    if verifier == "auto":
        verifier = default_verifier(records)
    results: dict[str, Any] = {"baseline": baseline_name, "decodings": decoding, "n_prompts": len(records),
                               "seed": seed, "max_new_tokens": max_new_tokens, "judged": verifier is not None,
                               "systems": {}, "outputs": {}}
    scores: dict[tuple[str, str], list[float]] = {}
    loglik_cache: dict[tuple, dict[str, float]] = {}
    for sys_ in systems:
        entry: dict[str, Any] = {"mode": sys_.mode, "loglik": None,
                                 "train_cost": dict(sys_.train_cost) if sys_.train_cost is not None else None,
                                 "decodings": {}}
        results["systems"][sys_.name] = entry
        results["outputs"][sys_.name] = {}
        kind = sys_.loglik_kind
        models_there = kind is not None and (kind == "aligner" or sys_.proposal is not None) and (
            kind == "proposal" or sys_.aligner is not None)
        if align_records is not None and sys_.loglik and models_there:
            key = (kind, id(sys_.proposal) if kind != "aligner" else None, id(sys_.aligner) if kind != "proposal"
                   else None)
            if key not in loglik_cache:
                t0 = time.perf_counter()
                loglik_cache[key] = heldout_loglik(align_records, kind=kind, proposal=sys_.proposal,
                                                   aligner=sys_.aligner, template=template, max_len=loglik_max_len,
                                                   batch_size=loglik_batch_size)
                logger.info("held-out log-likelihood of S under %s (%s): %.4f per token (%.1fs)", sys_.name, kind,
                            loglik_cache[key]["per_token"], time.perf_counter() - t0)
            entry["loglik"] = {"kind": kind, **loglik_cache[key]}
        for dec in decoding:
            if progress is not None:
                progress(f"{sys_.name} [{dec}]")
            gen_kw = dict(seed=seed, max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size,
                          template=template)
            warm_s = None
            if warmup and dec == decoding[0]:
                t0 = time.perf_counter()
                _generate(sys_, prompts[:batch_size], dec, **gen_kw)
                warm_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            gens, times = _generate(sys_, prompts, dec, **gen_kw)
            seconds = time.perf_counter() - t0
            texts = [g.text for g in gens]
            judged = judge_responses(records, texts, verifier) if verifier is not None else None
            summary = _summarise(judged, gens, seconds, n_boot=n_boot, seed=seed)
            summary["tokens_per_s"], summary["first_batch_excluded"] = _throughput(gens, times, seconds, batch_size)
            summary["first_batch_seconds"] = times[0] if times else None
            summary["warmup_seconds"] = warm_s
            entry["decodings"][dec] = summary
            if judged is not None:
                scores[(sys_.name, dec)] = [j["strict"] for j in judged]
            results["outputs"][sys_.name][dec] = [
                {"prompt": p, "response": g.text, **j, "num_tokens": g.num_tokens, "finish_reason": g.finish_reason}
                for p, g, j in zip(prompts, gens, judged or [{}] * len(gens))
            ]
            if judged is not None:
                logger.info("%s [%s]: strict %.3f [%.3f, %.3f], length %.1f, %.0f tok/s", sys_.name, dec,
                            summary["accuracy"]["mean"], summary["accuracy"]["low"], summary["accuracy"]["high"],
                            summary["mean_length"], summary["tokens_per_s"] or 0.0)
            else:
                logger.info("%s [%s]: (not judged) length %.1f, %.0f tok/s", sys_.name, dec, summary["mean_length"],
                            summary["tokens_per_s"] or 0.0)
    # Win rates against the baseline at the same decoding, with a paired bootstrap over prompts.
    for name, entry in results["systems"].items():
        for dec, summary in entry["decodings"].items():
            summary["win_rate"] = None
            if (name, dec) in scores:
                wins = stats.win_values(scores[(name, dec)], scores[(baseline_name, dec)])
                summary["win_rate"] = _ci_dict(stats.bootstrap_ci(wins, n_boot=n_boot, seed=seed))
    return results


# ---------------------------------------------------------------------------------------------------------
# Users' files
# ---------------------------------------------------------------------------------------------------------


def evaluate_file(
    records_path: str | os.PathLike,
    *,
    responses_path: str | os.PathLike | None = None,
    response_field: str = "response",
    verifier: str = "auto",
    field: str | None = None,
    case_sensitive: bool = True,
    full_match: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Judges the responses in a JSONL file with a verifier (see :func:`make_eval_verifier`).

    records_path: one JSON object per line, with the verifier's field (``answer`` for exact, ``regex`` for regex;
      ``field`` renames it) and, unless ``responses_path`` is given, the response in ``response_field``.
    responses_path: a second JSONL whose i-th line's ``response_field`` answers record i (e.g. ``sample.py``
      output).
    Returns {"n", "accuracy": {mean, low, high}, "lenient" (task judge only), "by_kind", "scores": [n floats]}.
    """
    records = files.read_jsonl(records_path, error=EvalError)
    source = files.read_jsonl(responses_path, error=EvalError) if responses_path is not None else records
    if len(source) != len(records):
        raise EvalError(f"{os.fspath(records_path)} has {len(records)} records but {os.fspath(responses_path)} has "
                        f"{len(source)} responses; they must pair up line by line")
    responses = []
    where = os.fspath(responses_path if responses_path is not None else records_path)
    for i, r in enumerate(source):
        v = r.get(response_field)
        if isinstance(v, list) and v and isinstance(v[0], str):
            v = v[0]
        if not isinstance(v, str):
            raise EvalError(f"{where}:{i + 1}: no {response_field!r} string (keys: {sorted(r)}); set response_field")
        responses.append(v)
    fn = make_eval_verifier(verifier, records, field=field, case_sensitive=case_sensitive, full_match=full_match)
    if fn is None:
        raise EvalError(f"{os.fspath(records_path)}: no 'answer' or 'regex' field to judge against; set verifier=")
    judged = judge_responses(records, responses, fn)
    strict = [j["strict"] for j in judged]
    out = {"n": len(judged), "accuracy": _ci_dict(stats.bootstrap_ci(strict, n_boot=n_boot, seed=seed)),
           "lenient": None, "by_kind": stats.accuracy_by_kind(judged), "scores": strict}
    if all("lenient" in j for j in judged):
        out["lenient"] = _ci_dict(stats.bootstrap_ci([j["lenient"] for j in judged], n_boot=n_boot, seed=seed))
    return out


# ---------------------------------------------------------------------------------------------------------
# Config and CLI: python -m ramjax.evaluate CONFIG [key=value ...]
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SystemConfig:
    """One system of an ``EvalConfig``: model directories and sampler settings (see ``System``)."""

    name: str = "proposal"
    mode: Literal["proposal", "aligner", "par", "sparse", "product", "corrector"] = "proposal"
    proposal: str | None = None
    aligner: str | None = None
    corrector: str | None = None
    n: int = _SAMPLED.n
    kl_threshold: float | None = _SAMPLED.kl_threshold
    proposal_top_p: float = _SAMPLED.proposal_top_p
    aligner_top_p: float = _SAMPLED.aligner_top_p
    top_k: int = _SAMPLED.top_k
    repetition_penalty: float = _SAMPLED.repetition_penalty

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"system {self.name!r}: n={self.n} must be >= 1")
        for k in ("proposal_top_p", "aligner_top_p"):
            if not 0 < getattr(self, k) <= 1:
                raise ValueError(f"system {self.name!r}: {k}={getattr(self, k)} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """``python -m ramjax.evaluate``: judge a JSONL of responses, or run and judge systems from model directories.

    eval_file:     JSONL of records ({"prompt", ...} plus the verifier's field: ``answer`` for exact, ``regex``
                   for regex; optional ``family``/``category`` for a per-group breakdown).
    verifier:      ``auto`` (exact/regex on the records' references; none there = no judging, only the
                   likelihoods and the AlpacaEval files), ``exact``, ``regex``, ``none``, ``task`` (the generated
                   suite's judge) or ``module:function``.
    responses_file: judge-only: the i-th line's ``response_field`` answers record i (no models are run). Without
                   it and without systems, ``eval_file`` itself must carry the responses.
    systems:       systems to run (model directories); the first is the baseline unless ``baseline`` is set.
    align_file:    {"prompt", "response"} JSONL (S) for the held-out log-likelihood; null = skip.
    max_examples:  evaluate only the first N records (0 = all).
    """

    eval_file: str = "data/eval.jsonl"
    run_dir: str = "runs/eval"
    responses_file: str | None = None
    response_field: str = "response"
    systems: tuple[SystemConfig, ...] = ()
    baseline: str | None = None
    decodings: tuple[Literal["sampled", "greedy"], ...] = ("sampled", "greedy")
    verifier: str = "auto"
    verifier_field: str | None = None
    case_sensitive: bool = True
    full_match: bool = True
    align_file: str | None = None
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int = 0
    batch_size: int = 32
    template: Literal["plain", "chat"] = "plain"
    max_examples: int = 0
    n_boot: int = 1000
    warmup: bool = False
    alpaca_eval: bool = True

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.max_examples < 0:
            raise ValueError(f"max_examples={self.max_examples} must be >= 0 (0 = all)")
        if not self.decodings:
            raise ValueError("decodings is empty; use [sampled, greedy]")
        names = [s.name for s in self.systems]
        if len(set(names)) != len(names):
            raise ValueError(f"system names must be unique, got {names}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not among the systems {names}")


def evaluate_from_config(cfg: EvalConfig) -> tuple[dict[str, Any], str]:
    """Runs an ``EvalConfig``; writes results under ``cfg.run_dir``. Returns (results, markdown table)."""
    if not cfg.systems:
        res = evaluate_file(cfg.eval_file, responses_path=cfg.responses_file, response_field=cfg.response_field,
                            verifier=cfg.verifier, field=cfg.verifier_field, case_sensitive=cfg.case_sensitive,
                            full_match=cfg.full_match, n_boot=cfg.n_boot, seed=cfg.seed)
        write_json_atomic(os.path.join(cfg.run_dir, "results.json"), report.jsonable(res))
        rows = [[k, str(int(v["n"])), report.fmt(v["strict"]), report.fmt(v.get("lenient"))]
                for k, v in res["by_kind"].items()]
        table = (f"strict accuracy {report.fmt_ci(res['accuracy'])} on {res['n']} records\n\n"
                 + report.md_table(["Kind", "n", "Strict", "Lenient"], rows))
        with open(os.path.join(cfg.run_dir, "report.md"), "w", encoding="utf-8") as f:
            f.write(f"# Judged {cfg.responses_file or cfg.eval_file}\n\n{table}\n")
        return res, table


    records = files.read_jsonl(cfg.eval_file, error=EvalError)
    if cfg.max_examples:
        records = records[: cfg.max_examples]
    verifier = make_eval_verifier(cfg.verifier, records, field=cfg.verifier_field, case_sensitive=cfg.case_sensitive,
                                  full_match=cfg.full_match)
    cache: dict[str, Any] = {}

    def model(path: str | None) -> Any:
        if path is None:
            return None
        if path not in cache:
            cache[path] = load_model(path)
        return cache[path]

    systems = []
    for sc in cfg.systems:
        sampling = {"n": sc.n, "kl_threshold": sc.kl_threshold, "proposal_top_p": sc.proposal_top_p,
                    "aligner_top_p": sc.aligner_top_p, "top_k": sc.top_k, "repetition_penalty": sc.repetition_penalty}
        systems.append(System(sc.name, proposal=model(sc.proposal), aligner=model(sc.aligner), mode=sc.mode,
                              corrector=model(sc.corrector), sampling=sampling))
    align = files.read_jsonl(cfg.align_file, error=EvalError) if cfg.align_file else None
    results = evaluate_systems(systems, records, decoding=cfg.decodings, seed=cfg.seed,
                               max_new_tokens=cfg.max_new_tokens, stop=cfg.stop, baseline_name=cfg.baseline,
                               align_records=align, verifier=verifier, batch_size=cfg.batch_size,
                               template=cfg.template, n_boot=cfg.n_boot, warmup=cfg.warmup)
    table = write_report(cfg.run_dir, results)
    if not cfg.alpaca_eval:
        for name, per_dec in results["outputs"].items():
            for dec in per_dec:
                p = os.path.join(cfg.run_dir, "outputs", f"{report.safe_name(name)}.{dec}.alpaca_eval.json")
                if os.path.exists(p):
                    os.unlink(p)
    return results, table


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ramjax.evaluate [CONFIG.yaml] [key=value ...]``: prints the resolved config and the table."""

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path, overrides = config_lib.split_cli_args(argv)
    cfg = config_lib.load_config(EvalConfig, path, overrides)
    from ramjax import distributed

    # On a TPU pod / SLURM (detected from the environment) every process samples its share of the prompts.
    distributed.initialize(config_lib.DistributedConfig(enabled=None))
    import jax

    primary = jax.process_index() == 0
    if primary:
        print(config_lib.format_config(cfg))
        os.makedirs(cfg.run_dir, exist_ok=True)
        config_lib.save_config(cfg, os.path.join(cfg.run_dir, "eval_config.yaml"))
    _, table = evaluate_from_config(cfg)
    if primary:
        print(table)
        print(f"\nwrote {os.path.join(cfg.run_dir, 'report.md')} and results.json")
    return 0


if __name__ == "__main__":
    from ramjax.cli import eval_main

    raise SystemExit(eval_main())  # --help, and named errors as one line with exit status 2
