"""The RAM recipe end to end, as one command, on your data or on the generated task suite.

    python train.py                                                        # the generated suite (configs/default.yaml)
    python train.py configs/default.yaml pipeline.data_dir=DIR run_dir=RUN  # your data, the same recipe

``DIR`` holds JSONL files in any format ``ramjax.data`` reads (prompt/response, messages, preference pairs, text):

    align.jsonl   the alignment set S (required): the responses the aligned system should give;
    corpus.jsonl  the general corpus D (P_M's pretraining and the aligner's initialisation); optional when
                  ``pipeline.proposal=`` starts from an existing P_M and the aligner does not pretrain on D;
    prefs.jsonl   preference pairs (prompt, chosen, rejected) for the DPO baseline (optional: no DPO without it);
    eval.jsonl    held-out prompts (optional; without it nothing is evaluated), with ``answer`` (exact match) or
                  ``regex`` for the verifier and optionally ``family``/``category`` for a per-group breakdown;
                  without references the evaluation writes the responses, the AlpacaEval files and the likelihood
                  metrics only.

Without ``data_dir`` the generated suite (``ramjax.experiments.tasks``) is written to ``RUN/data/`` in this layout
and read from there: one code path for both.

The recipe itself (each stage's steps or epochs, learning rate, schedule, batch, packing, sequence limits) lives in
``configs/recipe/*.yaml``, included by ``configs/default.yaml`` as the ``stages:`` section and by the stage configs
(``configs/pretrain.yaml``, ``sft.yaml``, ``ram.yaml``, ``dpo.yaml``), so a stage run by hand trains with the same
recipe. This module only wires the stages together: paths, model initialisations, data files.

Stages (each writes ``run_dir/<stage>/`` and is skipped when its output exists, so a rerun continues):

 1. ``data``         the suite, or DIR's files: D split into P_M's training rows and a held-out slice, S's warm-up
                     slice;
 2. ``tokenizer``    a sentencepiece BPE on D (size ``pipeline.tokenizer_vocab``; 0 = from D's size); skipped with
                     ``pipeline.proposal`` (its tokenizer is used);
 3. ``proposal``     pretrain P_M from scratch on D (skipped with ``pipeline.proposal``);
 4. ``warmup``       short SFT of P_M on a slice of S (the paper's warm-up);
 5. ``samples``      one-time proposal samples y ~ P_M for every prompt of S (preset ``pipeline.samples_preset``);
 6. ``aligner_base`` the aligner's initialisation (``pipeline.aligner_init``): ``pretrained`` = a small model
                     pretrained on D, ``truncate`` = P_M's bottom layers, a model directory, or ``scratch``;
 7. ``ram``          train the aligner with the RAM loss on (S, proposal samples);
 8. ``sft``/``dpo``  the baselines: SFT of the warmed-up P_M on S; DPO (RPO) of it on the preference pairs;
 9. ``corrector``    the sequence-level corrector baseline (an aligner-sized model that rewrites P_M's draft);
10. ``evaluate``     every system on the held-out prompts, sampled and greedy side by side; report and plots.

The library never prints: progress goes to the ``on_stage`` callback (the CLI prints stage times); warnings (a P_M
still far from converged, many prompts cut) go to the log and the report.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Literal

import numpy as np

from ramjax import config as config_lib
from ramjax import files, rundir
from ramjax.config import ConfigError, TrainConfig
from ramjax.model import ModelConfig
from ramjax.sampling_params import PRESETS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StageRecipe(TrainConfig):
    """One stage's recipe: a ``TrainConfig`` (steps / epochs / tokens, optimizer, schedule, data limits, batch,
    packing, stage-specific sections). The pipeline fills in the paths (run_dir, model.init, tokenizer, data files,
    proposal) and checks the whole config when the stage runs."""

    def validate(self) -> None:  # paths are the pipeline's to set; the sections validate themselves
        return None


@dataclasses.dataclass
class StagesConfig:
    """The recipe of every training stage (``configs/recipe/<stage>.yaml``)."""

    proposal: StageRecipe = dataclasses.field(default_factory=lambda: StageRecipe(stage="pretrain"))
    warmup: StageRecipe = dataclasses.field(default_factory=lambda: StageRecipe(stage="sft"))
    aligner_base: StageRecipe = dataclasses.field(default_factory=lambda: StageRecipe(stage="pretrain"))
    ram: StageRecipe = dataclasses.field(default_factory=lambda: StageRecipe(stage="ram"))
    sft: StageRecipe = dataclasses.field(default_factory=lambda: StageRecipe(stage="sft"))
    dpo: StageRecipe = dataclasses.field(default_factory=lambda: StageRecipe(stage="dpo"))
    corrector: StageRecipe = dataclasses.field(default_factory=lambda: StageRecipe(stage="sft"))

    def validate(self) -> None:
        want = {"proposal": "pretrain", "warmup": "sft", "aligner_base": "pretrain", "ram": "ram", "sft": "sft",
                "dpo": "dpo", "corrector": "sft"}
        for name, stage in want.items():
            got = getattr(self, name).stage
            if got != stage:
                raise ConfigError(f"stages.{name}.stage={got!r}; this stage trains with stage={stage!r}")


@dataclasses.dataclass
class SamplingPreset:
    """A named way of drawing tokens (temperature 0 = greedy; top_k 0 and repetition_penalty 1 = off)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ConfigError(f"bad sampling preset {self}: temperature >= 0, top_p in (0, 1], top_k >= 0, "
                              f"repetition_penalty > 0")

    @classmethod
    def of(cls, params: Any) -> "SamplingPreset":
        """The proposal-side settings of a ``SamplingParams`` (the one-time samples are drawn from P_M alone)."""
        return cls(temperature=params.proposal_temperature, top_p=params.proposal_top_p, top_k=params.top_k,
                   repetition_penalty=params.repetition_penalty)


def _default_presets() -> dict[str, SamplingPreset]:
    """``ramjax.sampling_params.PRESETS`` (sampled, greedy, release), the one definition of the presets."""
    return {name: SamplingPreset.of(p) for name, p in PRESETS.items()}


@dataclasses.dataclass
class PipelineConfig:
    """What the pipeline runs on and how it is wired (the per-stage recipe is in ``stages``).

    data_dir:   a directory with align.jsonl (+ corpus.jsonl, prefs.jsonl, eval.jsonl); null = generate the task
                suite (n_corpus, n_align, n_pref, n_eval, the quality proportions) into run_dir/data.
    proposal:   an existing P_M (Hugging Face or ramjax model directory, or Hub id) instead of pretraining one;
                its tokenizer is used.
    aligner_init: ``pretrained`` (a small model of aligner_arch pretrained on D), ``truncate`` (P_M's bottom
                aligner_arch.num_layers layers: same vocabulary and width by construction), ``scratch``, or a
                model directory.
    tokenizer_vocab: sentencepiece size; 0 = from D's size (see ``auto_vocab_size``).
    max_len / max_prompt_len: 0 = each stage recipe's own limits; set, they replace every stage's.
    heldout_corpus: rows of D held out (never trained on) for P_M's held-out loss per stage.
    warmup_fraction: share of S in the warm-up SFT.
    samples_preset: the sampling preset (``sampling``) of the one-time proposal samples.
    sampling:   named presets: ``ramjax.sampling_params.PRESETS`` (``sampled``, ``greedy``, ``release``); a mapping
                given here adds presets or changes the keys it names (``pipeline.sampling.release.top_k=5``).
    verifier:   ``auto`` (the suite's judge for the generated suite; exact/regex on eval.jsonl's answer/regex
                fields otherwise; none when there are none), or ``exact``, ``regex``, ``task``, ``none``,
                ``module:function``.
    eval_modes: RAM sampling rules evaluated; n: candidates per step for ``par``; max_eval: 0 = all of eval.jsonl.
    baselines:  also train and evaluate SFT, DPO (each with RAM on top) and the corrector.
    """

    data_dir: str | None = None
    proposal: str | None = None
    aligner_init: str = "pretrained"
    n_corpus: int = 18000
    n_align: int = 2000
    n_pref: int = 2000
    n_eval: int = 300
    concise_correct: float = 0.15
    wrong: float = 0.45
    verbose_correct: float = 0.40
    tokenizer_vocab: int = 0
    max_len: int = 0
    max_prompt_len: int = 0
    heldout_corpus: int = 500
    proposal_arch: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(vocab_size=0))
    aligner_arch: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(vocab_size=0))
    warmup_fraction: float = 0.1
    samples_preset: str = "sampled"
    sampling: dict[str, SamplingPreset] = dataclasses.field(default_factory=_default_presets)
    verifier: str = "auto"
    max_new_tokens: int = 24
    eval_modes: tuple[str, ...] = ("par", "sparse", "product")
    n: int = 16
    kl_threshold: float | None = PRESETS["sampled"].kl_threshold
    eval_batch_size: int = 64
    max_eval: int = 0
    loglik_records: int = 200
    baselines: bool = True

    def validate(self):
        if self.aligner_init in ("", None):
            raise ConfigError("pipeline.aligner_init is empty; expected pretrained, truncate, scratch or a model dir")
        total = self.concise_correct + self.wrong + self.verbose_correct
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"pipeline corpus proportions sum to {total}, not 1")
        if not 0 < self.warmup_fraction <= 1:
            raise ConfigError(f"pipeline.warmup_fraction={self.warmup_fraction} must be in (0, 1]")
        if self.samples_preset not in self.sampling:
            raise ConfigError(f"pipeline.samples_preset={self.samples_preset!r} is not among pipeline.sampling "
                              f"({', '.join(self.sampling) or 'none defined'})")
        if self.max_prompt_len and self.max_len and self.max_prompt_len > self.max_len:
            raise ConfigError(f"pipeline.max_prompt_len={self.max_prompt_len} exceeds pipeline.max_len={self.max_len}")
        if self.tokenizer_vocab and self.tokenizer_vocab < 261:
            raise ConfigError(f"pipeline.tokenizer_vocab={self.tokenizer_vocab}: at least 261 (4 special ids and 256 "
                              f"bytes come first), or 0 to size it from the corpus")


@dataclasses.dataclass
class DefaultRunConfig:
    """Top-level config of ``configs/default.yaml`` (``program: pipeline``: what ``train.py`` runs it with)."""

    program: Literal["pipeline"] = "pipeline"
    run_dir: str = "runs/default"
    seed: int = 0
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    stages: StagesConfig = dataclasses.field(default_factory=StagesConfig)


# ----------------------------------------------------------------------------------------------------------------
# Helpers

STAGES = ("data", "tokenizer", "proposal", "warmup", "samples", "aligner_base", "ram", "sft", "dpo", "corrector",
          "evaluate")
TRAINED = ("proposal", "warmup", "aligner_base", "ram", "sft", "dpo", "corrector")


class PipelineDataError(ValueError):
    """The data directory lacks a file the chosen settings need, or holds an unusable one."""


class PipelineSettingsError(rundir.RunDirMismatchError, ConfigError):
    """The run directory holds a pipeline run made with other settings (``force_restart`` moves it aside)."""


# what marks a directory as holding a pipeline run (``force_restart`` moves only such a directory aside)
PIPELINE_OUTPUTS = ("pipeline_config.yaml", "stage_times.json", "report.md", "results_table.md",
                    os.path.join("data", "prepared.json"), *TRAINED)


def _done(*outputs: str) -> bool:
    """A stage is done when every one of its outputs exists and reads back: a model directory loads with intact
    checksums, a JSONL/JSON file parses, any other file is non-empty (a run killed between two outputs, or a
    damaged file, reruns the stage; a training stage then resumes from its last checkpoint)."""
    for path in outputs:
        if not os.path.exists(path):
            return False
        try:
            if os.path.isdir(path) and os.path.exists(os.path.join(path, "ramjax_model.json")):
                from ramjax import checkpoint as ckpt_lib

                ckpt_lib.load_model_dir(path)
            elif path.endswith(".jsonl"):
                files.read_jsonl(path)
            elif path.endswith(".json"):
                with open(path, encoding="utf-8") as fh:
                    json.load(fh)
            elif os.path.isfile(path) and os.path.getsize(path) == 0:
                raise ValueError("empty file")
        except (ValueError, OSError) as e:
            log.warning("pipeline: %s is incomplete or damaged (%s); its stage runs again", path,
                        " ".join(str(e).split())[:200])
            return False
    return True


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _train_loss_trend(metrics_path: str) -> float | None:
    """Relative drop of the mean training loss from the second-to-last to the last tenth of training (0.05 = the
    loss still fell 5% at the end: the model had not converged). None without enough logged points."""
    from ramjax import metrics as metrics_lib

    pts = [(r["step"], r["train/loss"]) for r in metrics_lib.read_metrics(metrics_path)
           if "train/loss" in r and "step" in r]
    if len(pts) < 10:
        return None
    k = max(1, len(pts) // 10)
    last = float(np.mean([v for _, v in pts[-k:]]))
    prev = float(np.mean([v for _, v in pts[-2 * k:-k]]))
    return (prev - last) / prev if prev > 0 else None


def _truncate_model(src: str, num_layers: int, out: str) -> str:
    """A model directory holding ``src``'s embeddings, bottom ``num_layers`` layers, final norm and head."""
    import jax

    from ramjax import api, checkpoint
    from ramjax import model as model_lib

    m = api.load_model(src)
    if num_layers > m.config.num_layers:
        raise ConfigError(f"pipeline.aligner_arch.num_layers={num_layers} exceeds P_M's {m.config.num_layers} "
                          f"layers; a truncated copy keeps at most all of them")
    axes = model_lib.param_logical_axes(m.config)
    params = jax.tree_util.tree_map(lambda p, ax: p[:num_layers] if ax and ax[0] == "layers" else p, m.params, axes,
                                    is_leaf=lambda x: isinstance(x, tuple))
    cfg = dataclasses.replace(m.config, num_layers=num_layers)
    return checkpoint.save_model_dir(out, cfg, jax.device_get(params), m.tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


def run_pipeline(run: DefaultRunConfig, *, on_stage: Callable[[str, str, float | None], None] | None = None,
                 train_progress: Callable[[str, dict], None] | None = None,
                 force_restart: bool = False) -> dict[str, Any]:
    """Runs (or resumes) every stage; returns ``{"table", "stage_times", "report", "warnings"}`` (the markdown
    results table, seconds per stage run this time, the report path, warnings raised along the way).

    on_stage(stage, event, seconds): event "start" or "done" (with the stage's seconds) or "skip".
    train_progress(stage, info): forwarded from ``train_lib.train``'s progress callback.
    The run directory must be writable (``RunDirError``) and is locked for the run (a second pipeline on it fails
    with ``RunDirBusyError`` naming the holder). Resuming a run made with other settings fails with
    ``PipelineSettingsError`` naming the keys, unless ``force_restart``: then a directory holding a previous
    pipeline run is moved to ``<run_dir>.replaced-<UTC time>`` (nothing is deleted) and the pipeline starts over.
    """
    if "://" in run.run_dir:  # object storage: no local lock
        if force_restart:
            raise ConfigError(f"--force-restart moves a local run directory aside; run_dir={run.run_dir!r} is remote")
        return _run_pipeline(run, on_stage=on_stage, train_progress=train_progress)
    rundir.check_writable(run.run_dir)
    os.makedirs(run.run_dir, exist_ok=True)
    # one pipeline per run directory at a time (each training stage also locks its own directory)
    lock = rundir.RunDirLock(run.run_dir).acquire()
    try:
        if force_restart and rundir.has_previous_run(run.run_dir, PIPELINE_OUTPUTS):
            align = os.path.join(run.pipeline.data_dir, "align.jsonl") if run.pipeline.data_dir else None
            if align is not None and not os.path.isfile(align):  # a run that cannot start moves nothing aside
                raise PipelineDataError(f"{align} is missing: the alignment set S (prompt/response JSONL) is "
                                        f"required in pipeline.data_dir; nothing was moved")
            lock.release()
            rundir.replace_aside(run.run_dir)
            os.makedirs(run.run_dir)
            lock = rundir.RunDirLock(run.run_dir).acquire()
        _check_settings(run)
        return _run_pipeline(run, on_stage=on_stage, train_progress=train_progress)
    finally:
        lock.release()


def _check_settings(run: DefaultRunConfig) -> None:
    """Raises ``PipelineSettingsError`` when ``run_dir`` holds a pipeline run made with other settings: stages
    are skipped when their output exists, so resuming it would mix two experiments."""
    saved = os.path.join(run.run_dir, "pipeline_config.yaml")
    if not os.path.exists(saved):
        return
    try:
        old = config_lib.config_to_dict(config_lib.load_config(DefaultRunConfig, saved))
    except ConfigError as e:
        raise PipelineSettingsError(f"{saved} cannot be read ({e}); pass --force-restart to move the old run aside "
                                    f"and start over, or use a new run_dir=...") from None
    new = config_lib.config_to_dict(run)
    if old != new:
        diff = _diff(old, new)
        raise PipelineSettingsError(
            f"run_dir={run.run_dir!r} holds a pipeline run made with other settings ({'; '.join(diff[:8])}"
            + (f"; +{len(diff) - 8} more" if len(diff) > 8 else "")
            + "); resuming it would mix two experiments. Use a new run_dir=..., or pass --force-restart to move "
              "the old run aside and start over")
    _check_data(run)


# the user's data files of pipeline.data_dir (the files the data stage reads)
DATA_FILES = ("corpus.jsonl", "align.jsonl", "prefs.jsonl", "eval.jsonl")
DATA_FINGERPRINT = "data_fingerprint.json"
def _data_fingerprint(data_dir: str) -> dict[str, Any]:
    """``{file name: files.file_digest}`` of every ``DATA_FILES`` entry of ``data_dir`` (None for an absent one:
    a file added later changes which stages run)."""
    return {name: files.file_digest(os.path.join(data_dir, name)) for name in DATA_FILES}


def _check_data(run: DefaultRunConfig) -> None:
    """Raises ``PipelineSettingsError`` when a file of ``pipeline.data_dir`` differs (size, content hash, added or
    removed) from the one the run in ``run_dir`` started on, as recorded in ``run_dir/data_fingerprint.json``:
    stages already done were trained on the old data, so resuming would mix two experiments."""
    saved = os.path.join(run.run_dir, DATA_FINGERPRINT)
    if not run.pipeline.data_dir or not os.path.exists(saved):
        return
    try:
        old = _read_json(saved)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as e:
        raise PipelineSettingsError(f"{saved} cannot be read ({e}); pass --force-restart to move the old run aside "
                                    f"and start over, or use a new run_dir=...") from None
    src = os.path.abspath(run.pipeline.data_dir)
    new = _data_fingerprint(src)
    changed = []
    for name in DATA_FILES:
        a, b = old.get(name), new[name]
        if a == b:
            continue
        path = os.path.join(src, name)
        if a is None:
            changed.append(f"{path} was added")
        elif b is None:
            changed.append(f"{path} was removed")
        elif a.get("size") != b.get("size"):
            changed.append(f"{path} changed ({a.get('size')} -> {b.get('size')} bytes)")
        else:
            changed.append(f"{path} changed (same size, other content"
                           + (")" if "blake2b" in b else " or modification time)"))
    if changed:
        raise PipelineSettingsError(
            f"run_dir={run.run_dir!r} holds a pipeline run made from other data: {'; '.join(changed)} since it "
            f"started; resuming it would mix two experiments. Use a new run_dir=..., pass --force-restart to move "
            f"the old run aside and start over, or restore the original file")


def _run_pipeline(run: DefaultRunConfig, *, on_stage: Callable[[str, str, float | None], None] | None = None,
                  train_progress: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    from ramjax import api, evaluate, generate, report, sampler, train_lib
    from ramjax import data as data_lib
    from ramjax import tokenizer as tok_lib
    from ramjax.experiments import plots, tasks

    p, st = run.pipeline, run.stages
    rd = run.run_dir
    saved = os.path.join(rd, "pipeline_config.yaml")
    if "://" in rd:
        _check_settings(run)
    os.makedirs(rd, exist_ok=True)
    config_lib.save_config(run, saved)
    times_path = os.path.join(rd, "stage_times.json")
    times: dict[str, float] = dict(_read_json(times_path) or {}) if _done(times_path) else {}
    data_dir = os.path.join(rd, "data")
    src = os.path.abspath(p.data_dir) if p.data_dir else data_dir
    costs: dict[str, dict] = {}
    warnings: list[str] = []
    notify = on_stage or (lambda *a: None)

    def warn(msg: str) -> None:
        log.warning(msg)
        warnings.append(msg)

    def model_dir(name: str) -> str:
        return os.path.join(rd, name, "model")

    def stage(name: str, output: str | tuple[str, ...], fn: Callable[[], Any], enabled: bool = True) -> None:
        if not enabled or _done(*((output,) if isinstance(output, str) else output)):
            notify(name, "skip", None)
            return
        notify(name, "start", None)
        t0 = time.time()
        fn()
        times[name] = time.time() - t0
        files.atomic_write_json(times_path, times)  # a resumed run reports every stage's time, not only its own
        notify(name, "done", times[name])

    def train_cfg(name: str, *, init: str, arch: ModelConfig | None, train_files: list[str],
                  extra: dict | None = None) -> TrainConfig:
        """The stage's recipe with the pipeline's paths filled in."""
        d = config_lib.config_to_dict(getattr(st, name))
        d.update(run_dir=os.path.join(rd, name), seed=run.seed)
        d["model"] = {**d["model"], "init": init}
        if arch is not None:
            d["model"]["arch"] = config_lib.config_to_dict(arch)
        d["tokenizer"] = tok_path if init == "scratch" else None
        d["data"] = {**d["data"], "train_files": list(train_files)}
        if p.max_len:
            d["data"]["max_len"] = p.max_len
        if p.max_prompt_len:
            d["data"]["max_prompt_len"] = p.max_prompt_len
        for k, v in (extra or {}).items():
            d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
        return config_lib.config_from_dict(TrainConfig, d)

    def train(name: str, cfg: TrainConfig) -> None:
        t0 = time.time()
        res = train_lib.train(cfg, progress=(lambda info: train_progress(name, info)) if train_progress else None)
        if res.interrupted:
            raise KeyboardInterrupt(f"stage {name} interrupted at step {res.step}; rerun to resume")
        meta = _read_json(os.path.join(cfg.run_dir, "meta.json")) or {}
        dstats = meta.get("data") or {}
        # tokens: rows x row length per step (an upper bound with padding, close with packing); RAM/DPO see 2
        # sequences; the row length is the data's with data.padding=longest
        seqs = 2 if cfg.stage in ("ram", "dpo") else 1
        costs[name] = {"params": res.num_params, "steps": res.step, "seconds": time.time() - t0,
                       "tokens": res.step * cfg.data.batch_size * meta.get("row_len", cfg.data.max_len) * seqs,
                       "epochs": (res.step / meta["batches_per_epoch"]) if meta.get("batches_per_epoch") else None,
                       "data": dstats}
        cut = int(dstats.get("truncated_prompts", 0))
        if cut:
            msg = (f"stage {name}: {cut} of {dstats.get('read', '?')} prompts cut to max_prompt_len="
                   f"{cfg.data.max_prompt_len} tokens")
            (warn if cut > 0.01 * max(int(dstats.get("read", 0)), 1) else log.info)(msg)
        files.atomic_write_json(os.path.join(rd, name, "cost.json"), costs[name], indent=None)

    def cost(*names: str) -> dict | None:
        parts = [costs.get(n) or _read_json(os.path.join(rd, n, "cost.json")) for n in names]
        if any(c is None for c in parts):
            return None
        return evaluate.training_cost(seconds=sum(c["seconds"] for c in parts),
                                      params=sum(c["params"] for c in parts), tokens=sum(c["tokens"] for c in parts),
                                      flops=sum(6.0 * c["params"] * c["tokens"] for c in parts))

    # 1. data ---------------------------------------------------------------------------------------------
    f = {k: os.path.join(src, f"{k}.jsonl") for k in ("corpus", "align", "prefs", "eval")}
    derived = {k: os.path.join(data_dir, f"{k}.jsonl") for k in ("pretrain", "heldout", "warmup")}
    pretrained_aligner = p.aligner_init == "pretrained"

    def make_data():
        if p.data_dir is None:
            tasks.write_user_layout(data_dir, n_corpus=p.n_corpus, n_align=p.n_align, n_pref=p.n_pref,
                                    n_eval=p.n_eval, seed=run.seed,
                                    proportions={"concise_correct": p.concise_correct, "wrong": p.wrong,
                                                 "verbose_correct": p.verbose_correct})
        if not os.path.exists(f["align"]):
            raise PipelineDataError(f"{f['align']} is missing: the alignment set S (prompt/response JSONL) is required "
                                    f"in pipeline.data_dir")
        if not os.path.exists(f["corpus"]) and (p.proposal is None or pretrained_aligner):
            need = "P_M is pretrained on it" if p.proposal is None else "aligner_init=pretrained pretrains on it"
            raise PipelineDataError(f"{f['corpus']} is missing and {need}; add corpus.jsonl, or start from "
                                    f"checkpoints: pipeline.proposal=PATH and pipeline.aligner_init=truncate (or a "
                                    f"model dir)")
        os.makedirs(data_dir, exist_ok=True)
        if p.data_dir and "://" not in rd:  # the data the run is made from: _check_data compares every rerun's
            files.atomic_write_json(os.path.join(rd, DATA_FINGERPRINT), _data_fingerprint(src))
        info: dict[str, Any] = {"source": src}
        if os.path.exists(f["corpus"]):
            corpus = files.read_jsonl(f["corpus"], error=PipelineDataError)
            k = min(p.heldout_corpus, len(corpus) // 10)
            # a fixed pseudo-random slice (by seed): D's order may be sorted by source
            order = np.random.default_rng([run.seed, 7]).permutation(len(corpus))
            held = set(order[:k].tolist())
            files.atomic_write_jsonl(derived["pretrain"], [r for i, r in enumerate(corpus) if i not in held])
            files.atomic_write_jsonl(derived["heldout"], [corpus[i] for i in sorted(held)])
            info.update(corpus=len(corpus), heldout=k)
        align = files.read_jsonl(f["align"], error=PipelineDataError)
        k = max(1, int(round(p.warmup_fraction * len(align))))
        files.atomic_write_jsonl(derived["warmup"], align[:k])
        info.update(align=len(align), warmup=k)
        files.atomic_write_json(os.path.join(data_dir, "prepared.json"), info)
    stage("data", os.path.join(data_dir, "prepared.json"), make_data)
    has_corpus = os.path.exists(derived["pretrain"])
    has_prefs = os.path.exists(f["prefs"])
    has_eval = os.path.exists(f["eval"])

    # 2. tokenizer ----------------------------------------------------------------------------------------
    tok_dir = os.path.join(rd, "tokenizer")
    tok_path = p.proposal if p.proposal else tok_dir

    def make_tok():
        tok_lib.train_tokenizer_on_files([derived["pretrain"] if has_corpus else f["align"]], tok_dir,
                                         vocab_size=p.tokenizer_vocab, seed=run.seed)
    stage("tokenizer", os.path.join(tok_dir, "tokenizer_config.json"), make_tok, enabled=p.proposal is None)

    # 3-4. proposal: pretrain, warm-up ----------------------------------------------------------------------
    proposal_dir = p.proposal or model_dir("proposal")
    stage("proposal", model_dir("proposal"), lambda: train("proposal", train_cfg(
        "proposal", init="scratch", arch=p.proposal_arch, train_files=[derived["pretrain"]])),
        enabled=p.proposal is None)
    stage("warmup", model_dir("warmup"), lambda: train("warmup", train_cfg(
        "warmup", init=proposal_dir, arch=None, train_files=[derived["warmup"]])))

    # 5. one-time proposal samples for S ------------------------------------------------------------------------
    samples_path = os.path.join(data_dir, "align_samples.jsonl")
    pre = p.sampling[p.samples_preset]

    def align_pairs() -> list[dict[str, Any]]:
        """S as {"prompt", "response"} records, whatever its file's format."""
        return [dict(zip(("prompt", "response"), data_lib.prompt_response(r))) for r in data_lib.read_jsonl(f["align"])]

    def make_samples():
        warm = api.load_model(model_dir("warmup"))
        align = align_pairs()
        out = sampler.sample(warm, None, [r["prompt"] for r in align], mode="proposal",
                             max_new_tokens=p.max_new_tokens, seed=run.seed + 1,
                             proposal_temperature=pre.temperature, proposal_top_p=pre.top_p, top_k=pre.top_k,
                             repetition_penalty=pre.repetition_penalty, stop=["\n\nHuman:"],
                             batch_size=p.eval_batch_size)
        files.atomic_write_jsonl(samples_path, [generate.training_record(r, o) for r, o in zip(align, out)])
    stage("samples", samples_path, make_samples)

    # 6-7. aligner: its initialisation, then RAM ------------------------------------------------------------------
    def make_aligner_base():
        if pretrained_aligner:
            train("aligner_base", train_cfg("aligner_base", init="scratch", arch=p.aligner_arch,
                                            train_files=[derived["pretrain"]]))
        else:  # truncate
            _truncate_model(proposal_dir, p.aligner_arch.num_layers, model_dir("aligner_base"))
    stage("aligner_base", model_dir("aligner_base"), make_aligner_base,
          enabled=p.aligner_init in ("pretrained", "truncate"))
    if p.aligner_init in ("pretrained", "truncate"):
        aligner_init = model_dir("aligner_base")
    else:
        aligner_init = p.aligner_init  # scratch or a model directory
    scratch_arch = p.aligner_arch if aligner_init == "scratch" else None
    stage("ram", model_dir("ram"), lambda: train("ram", train_cfg(
        "ram", init=aligner_init, arch=scratch_arch, train_files=[samples_path],
        extra={"proposal": model_dir("warmup")})))

    # 8. baselines: SFT and DPO of the warmed-up proposal ----------------------------------------------------------
    stage("sft", model_dir("sft"), lambda: train("sft", train_cfg(
        "sft", init=model_dir("warmup"), arch=None, train_files=[f["align"]])), enabled=p.baselines)
    stage("dpo", model_dir("dpo"), lambda: train("dpo", train_cfg(
        "dpo", init=model_dir("warmup"), arch=None, train_files=[f["prefs"]])), enabled=p.baselines and has_prefs)
    if p.baselines and not has_prefs:
        warn(f"no {f['prefs']}: the DPO baselines are skipped")

    # 9. the sequence-level corrector: rewrite P_M's draft (the one-time samples) into the target --------------------
    corr_path = os.path.join(data_dir, "corrector.jsonl")

    def make_corrector():
        recs = files.read_jsonl(samples_path, error=PipelineDataError)
        files.atomic_write_jsonl(corr_path, evaluate.corrector_training_records(recs, [r["proposal"] for r in recs]))
        train("corrector", train_cfg("corrector", init=aligner_init, arch=scratch_arch, train_files=[corr_path]))
    stage("corrector", model_dir("corrector"), make_corrector, enabled=p.baselines)

    # 10. evaluation ----------------------------------------------------------------------------------------------
    def heldout_losses() -> dict[str, float]:
        """P_M's (and the aligner base's) loss per token on D's held-out slice, every token counted."""
        if not has_corpus:
            return {}
        recs = data_lib.read_jsonl(derived["heldout"])
        out = {}
        for name in ("proposal", "warmup", "aligner_base"):
            d = model_dir(name) if name != "proposal" else proposal_dir
            if not os.path.exists(d) or (name == "aligner_base" and not pretrained_aligner):
                continue
            m = api.load_model(d)
            lim = st.proposal.data
            td = data_lib.tokenize_records(recs, m.tokenizer, kind="single", template="plain",
                                           max_len=p.max_len or lim.max_len,
                                           max_prompt_len=p.max_prompt_len or lim.max_prompt_len,
                                           train_on_prompt=True)
            sums, counts = evaluate.sequence_logliks([(s.tokens, s.target) for s in td.examples], kind="proposal",
                                                     proposal=m, batch_size=p.eval_batch_size, pad_id=td.pad_id)
            out[name] = float(-sums.sum() / max(counts.sum(), 1.0))
        return out

    def make_eval():
        load = lambda name: api.load_model(model_dir(name))  # noqa: E731
        losses = heldout_losses()
        notes = []
        if losses:
            trend = _train_loss_trend(os.path.join(rd, "proposal", "metrics.jsonl")) if p.proposal is None else None
            rows = [[k, f"{v:.4f}"] for k, v in losses.items()]
            n_held = len(files.read_jsonl(derived["heldout"]))
            notes.append(f"## Held-out loss on D\n\nLoss per token (nats) on {n_held} rows of D never trained on.\n\n"
                         + report.md_table(["Model", "Loss"], rows))
            if trend is not None and trend > 0.02:
                warn(f"P_M's training loss still fell {100 * trend:.1f}% over the last tenth of pretraining: it is "
                     f"far from its floor on D; raise stages.proposal.epochs (or steps)")
        cut_rows = []
        for name in TRAINED:
            c = costs.get(name) or _read_json(os.path.join(rd, name, "cost.json"))
            if c:
                dstats = c.get("data") or {}
                ep = c.get("epochs")
                cut_rows.append([name, str(c["steps"]), f"{ep:.2f}" if ep is not None else "–",
                                 str(dstats.get("kept", "–")), str(dstats.get("truncated_prompts", "–")),
                                 str(dstats.get("truncated_responses", "–"))])
        if cut_rows:
            notes.append("## Training data per stage\n\n" + report.md_table(
                ["Stage", "Steps", "Epochs", "Examples", "Prompts cut", "Responses cut"], cut_rows))
        if warnings:
            notes.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in warnings))
        if not has_eval:
            warn(f"no {f['eval']}: nothing to evaluate")
            files.atomic_write(os.path.join(rd, "report.md"), "# ramjax pipeline\n\n" + "\n\n".join(notes) + "\n")
            files.atomic_write(os.path.join(rd, "results_table.md"), "(no eval.jsonl: nothing evaluated)\n")
            return
        warm, aligner = load("warmup"), load("ram")
        ram_sampling = {"n": p.n, "kl_threshold": p.kl_threshold}
        systems = [evaluate.System("P_M (warmed up)", proposal=warm)]
        if p.proposal is None:
            systems.append(evaluate.System("P_M (pretrained)", proposal=api.load_model(proposal_dir)))
        systems.append(evaluate.System("Q alone", aligner=aligner, mode="aligner"))
        # sparse is defined by P_M's nucleus (the released 0.95): at top-p 1 it would be Q alone
        mode_sampling = {"sparse": {"proposal_top_p": 0.95}}
        systems += [evaluate.System(f"P_M + RAM ({m})", proposal=warm, aligner=aligner, mode=m,
                                    sampling={**ram_sampling, **mode_sampling.get(m, {})}, train_cost=cost("ram"))
                    for m in p.eval_modes]
        if p.baselines:
            sft, corr = load("sft"), load("corrector")
            systems += [evaluate.System("SFT", proposal=sft, train_cost=cost("sft")),
                        evaluate.System("SFT + RAM (par)", proposal=sft, aligner=aligner, mode="par",
                                        sampling=ram_sampling, train_cost=cost("sft", "ram"))]
            if has_prefs:
                dpo = load("dpo")
                systems += [evaluate.System("DPO", proposal=dpo, train_cost=cost("dpo")),
                            evaluate.System("DPO + RAM (par)", proposal=dpo, aligner=aligner, mode="par",
                                            sampling=ram_sampling, train_cost=cost("dpo", "ram"))]
            systems.append(evaluate.System("Corrector", proposal=warm, corrector=corr, mode="corrector",
                                           train_cost=cost("corrector")))
        records = files.read_jsonl(f["eval"], error=PipelineDataError)
        if p.max_eval:
            records = records[: p.max_eval]
        spec = "task" if (p.verifier == "auto" and p.data_dir is None) else p.verifier
        verifier = evaluate.make_eval_verifier(spec, records)
        align = align_pairs()[: p.loglik_records]
        results = evaluate.evaluate_systems(
            systems, records, verifier=verifier, seed=run.seed, max_new_tokens=p.max_new_tokens,
            stop=["\n\nHuman:"], baseline_name="P_M (warmed up)", align_records=align,
            batch_size=p.eval_batch_size)
        results["heldout_loss"] = losses
        results["warnings"] = warnings
        results["stage_data"] = {n: (costs.get(n) or _read_json(os.path.join(rd, n, "cost.json")) or {}).get("data")
                                 for n in TRAINED}
        plot_dir = os.path.join(rd, "plots")
        os.makedirs(plot_dir, exist_ok=True)
        pngs = [plots.plot_accuracy(results, os.path.join(plot_dir, "accuracy.png"))] if results["judged"] else []
        pngs.append(plots.plot_training_curves({s: os.path.join(rd, s, "metrics.jsonl") for s in TRAINED
                                                if os.path.exists(os.path.join(rd, s, "metrics.jsonl"))},
                                               os.path.join(plot_dir, "training.png")))
        title = ("ramjax pipeline: RAM on the generated task suite" if p.data_dir is None
                 else f"ramjax pipeline: RAM on {p.data_dir}")
        table = evaluate.write_report(rd, results, stage_times=times, plots=pngs, notes="\n\n".join(notes) or None,
                                      cost_reference="SFT" if p.baselines else None, title=title)
        files.atomic_write(os.path.join(rd, "results_table.md"), table + "\n")
    stage("evaluate", (os.path.join(rd, "report.md"), os.path.join(rd, "results_table.md")), make_eval)

    table_path = os.path.join(rd, "results_table.md")
    table = open(table_path, encoding="utf-8").read() if os.path.exists(table_path) else ""
    return {"table": table, "stage_times": times, "report": os.path.join(rd, "report.md"), "warnings": warnings}

