"""The embedded default: the whole RAM pipeline on a generated task suite, small models trained from scratch.

    python train.py                      # = python train.py configs/default.yaml
    python train.py configs/default.yaml pipeline.proposal_steps=400 run_dir=runs/quick

Stages (each writes ``run_dir/<stage>/`` and is skipped when its output already exists, so an interrupted run
continues where it stopped):

 1. ``data``         generate the task suite: corpus D (mixed quality), alignment set S, preference pairs, held-out
                     evaluation prompts (``ramjax.experiments.tasks``), as ordinary JSONL files;
 2. ``tokenizer``    train a small sentencepiece tokenizer on D;
 3. ``proposal``     pretrain P_M from scratch on D;
 4. ``warmup``       short SFT of P_M on a slice of S (the paper's warm-up);
 5. ``samples``      one-time proposal samples y ~ P_M for every prompt of S;
 6. ``aligner_base`` pretrain a smaller model on D (the aligner's initialisation, as the paper's aligners are small
                     pretrained models of the proposal's family);
 7. ``ram``          train the aligner with the RAM loss on (S, proposal samples);
 8. ``sft``/``dpo``  the baselines: full SFT of the warmed-up P_M on S; DPO of it on the preference pairs;
 9. ``corrector``    the sequence-level corrector baseline (a model of the aligner's size trained by SFT to rewrite
                     P_M's draft into the target);
10. ``evaluate``     every system on the held-out prompts, sampled (T=1) and greedy side by side; report and plots.

The library never prints: progress goes to the ``on_stage`` callback (the CLI prints stage times).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Literal

from ramjax import config as config_lib
from ramjax import files
from ramjax.config import ConfigError
from ramjax.model import ModelConfig
from ramjax.sampling_params import PRESETS

log = logging.getLogger(__name__)


def _arch(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> ModelConfig:
    # vocab_size 0: the tokenizer's
    return ModelConfig(vocab_size=0, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=hidden // heads, intermediate_size=mlp, max_position_embeddings=256)


@dataclasses.dataclass
class PipelineConfig:
    """Sizes and budgets of the embedded default (defaults: ~10 minutes on 2 CPU cores).

    proposal_arch / aligner_arch: model shapes (aligner ~1/4 of the proposal's parameters).
    aligner_init: ``pretrained`` (pretrain the aligner on D first, the paper's setting) or ``scratch`` (ablation).
    batch_size: rows of ``max_len`` tokens per step; pretraining, SFT, RAM and the corrector pack several examples
    into a row (~3 at these lengths), DPO holds one pair per row. ram_batch_size: the RAM stage's rows.
    *_steps: optimizer steps per stage; *_lr: learning rates (tiny models need far larger rates than the paper's).
    eval_modes: RAM sampling modes to evaluate; n: candidates per step for ``par``.
    baselines: also train and evaluate the SFT, DPO and corrector baselines (off: P_M, Q and RAM only).
    """

    n_corpus: int = 20000
    n_align: int = 2000
    n_pref: int = 2000
    n_eval: int = 300
    concise_correct: float = 0.15
    wrong: float = 0.45
    verbose_correct: float = 0.40
    tokenizer_vocab: int = 360
    max_len: int = 80
    proposal_arch: ModelConfig = dataclasses.field(default_factory=lambda: _arch(128, 4, 4, 2, 352))
    aligner_arch: ModelConfig = dataclasses.field(default_factory=lambda: _arch(64, 3, 4, 1, 176))
    aligner_init: str = "pretrained"
    batch_size: int = 32
    proposal_steps: int = 800
    proposal_lr: float = 3e-3
    warmup_fraction: float = 0.1
    warmup_steps: int = 40
    warmup_lr: float = 3e-4
    aligner_pretrain_steps: int = 400
    ram_steps: int = 600
    ram_lr: float = 3e-3
    ram_batch_size: int = 16
    alpha: float = 1e-4
    sft_steps: int = 200
    sft_lr: float = 1e-3
    dpo_steps: int = 150
    dpo_lr: float = 3e-4
    dpo_beta: float = 0.1
    dpo_rpo_alpha: float = 1.0
    corrector_steps: int = 250
    corrector_lr: float = 3e-3
    sample_temperature: float = 1.0
    max_new_tokens: int = 24
    eval_modes: tuple[str, ...] = ("par", "sparse", "product")
    n: int = 16
    kl_threshold: float | None = PRESETS["sampled"].kl_threshold
    eval_batch_size: int = 64
    baselines: bool = True

    def validate(self):
        if self.aligner_init not in ("pretrained", "scratch"):
            raise ConfigError(f"pipeline.aligner_init={self.aligner_init!r}; expected 'pretrained' or 'scratch'")
        total = self.concise_correct + self.wrong + self.verbose_correct
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"pipeline corpus proportions sum to {total}, not 1")
        if not 0 < self.warmup_fraction <= 1:
            raise ConfigError(f"pipeline.warmup_fraction={self.warmup_fraction} must be in (0, 1]")


@dataclasses.dataclass
class DefaultRunConfig:
    """Top-level config of ``configs/default.yaml`` (``program: pipeline``: what ``train.py`` runs it with)."""

    program: Literal["pipeline"] = "pipeline"
    run_dir: str = "runs/default"
    seed: int = 0
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)


# ----------------------------------------------------------------------------------------------------------------
# Stages

STAGES = ("data", "tokenizer", "proposal", "warmup", "samples", "aligner_base", "ram", "sft", "dpo", "corrector",
          "evaluate")


def _train_cfg(run: DefaultRunConfig, stage: str, name: str, *, init: str, arch: ModelConfig | None,
               files: list[str], steps: int, lr: float, extra: dict | None = None):
    """A ``TrainConfig`` for one pipeline stage (small models: AdamW, short warm-up, cosine decay)."""
    from ramjax.config import TrainConfig

    p = run.pipeline
    d: dict[str, Any] = {
        "stage": stage, "run_dir": os.path.join(run.run_dir, name), "seed": run.seed, "steps": steps,
        "model": {"init": init, **({"arch": config_lib.config_to_dict(arch)} if arch is not None else {})},
        "tokenizer": os.path.join(run.run_dir, "tokenizer"),
        "data": {"train_files": files, "template": "plain", "max_len": p.max_len, "max_prompt_len": p.max_len // 2,
                 "packing": stage in ("pretrain", "sft", "ram"), "batch_size": p.batch_size},
        "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 0.01, "clip_norm": 1.0},
        "schedule": {"warmup_ratio": 0.05, "decay": "cosine", "final_lr_ratio": 0.1},
        "checkpoint": {"every": 0, "keep": 1, "resume": True, "export_hf": False},
        "logging": {"every": 20, "tensorboard": True, "progress": False},
    }
    for k, v in (extra or {}).items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return config_lib.config_from_dict(TrainConfig, d)


def _model_dir(run: DefaultRunConfig, name: str) -> str:
    return os.path.join(run.run_dir, name, "model")


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


def _write_jsonl(path: str, records) -> None:
    files.atomic_write_jsonl(path, records)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _write_json(path: str, obj: Any) -> None:
    files.atomic_write_json(path, obj, indent=None)


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _baseline_systems(load: Callable[[str], Any], warm: Any, aligner: Any, ram_sampling: dict,
                      cost: Callable[..., dict | None]) -> list:
    """The paper's comparisons: SFT and DPO of the warmed-up P_M, RAM on top of each, the sequence-level corrector."""
    from ramjax import evaluate

    sft, dpo, corr = load("sft"), load("dpo"), load("corrector")
    return [evaluate.System("SFT", proposal=sft, train_cost=cost("sft")),
            evaluate.System("SFT + RAM (par)", proposal=sft, aligner=aligner, mode="par",
                            sampling=ram_sampling, train_cost=cost("sft", "ram")),
            evaluate.System("DPO", proposal=dpo, train_cost=cost("dpo")),
            evaluate.System("DPO + RAM (par)", proposal=dpo, aligner=aligner, mode="par",
                            sampling=ram_sampling, train_cost=cost("dpo", "ram")),
            evaluate.System("Corrector", proposal=warm, corrector=corr, mode="corrector",
                            train_cost=cost("corrector"))]


def run_pipeline(run: DefaultRunConfig, *, on_stage: Callable[[str, str, float | None], None] | None = None,
                 train_progress: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Runs (or resumes) every stage; returns ``{"table", "stage_times", "report"}`` (the markdown results table,
    seconds per stage, kept across resumed invocations in ``stage_times.json``, the report path).

    on_stage(stage, event, seconds): event "start" or "done" (with the stage's seconds) or "skip".
    train_progress(stage, info): forwarded from ``train_lib.train``'s progress callback.
    The run directory must be writable (``RunDirError``) and is locked for the run (a second pipeline on it fails
    with ``RunDirBusyError`` naming the holder).
    """
    from ramjax import rundir

    if "://" in run.run_dir:  # object storage: no local lock
        return _run_pipeline(run, on_stage=on_stage, train_progress=train_progress)
    rundir.check_writable(run.run_dir)
    os.makedirs(run.run_dir, exist_ok=True)
    # one pipeline per run directory at a time (each training stage also locks its own directory)
    with rundir.RunDirLock(run.run_dir):
        return _run_pipeline(run, on_stage=on_stage, train_progress=train_progress)


def _run_pipeline(run: DefaultRunConfig, *, on_stage: Callable[[str, str, float | None], None] | None = None,
                  train_progress: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    from ramjax import api, evaluate, generate, sampler, train_lib
    from ramjax import tokenizer as tok_lib
    from ramjax.experiments import plots, tasks

    p = run.pipeline
    rd = run.run_dir
    saved = os.path.join(rd, "pipeline_config.yaml")
    if os.path.exists(saved):
        # stages are skipped when their output exists: resuming with other settings would mix two experiments
        old = config_lib.load_config(DefaultRunConfig, saved)
        if config_lib.config_to_dict(old) != config_lib.config_to_dict(run):
            diff = _diff(config_lib.config_to_dict(old), config_lib.config_to_dict(run))
            raise ConfigError(f"{rd} holds a run made with other settings ({', '.join(diff[:5])}); pass a new "
                              f"run_dir=... or delete {rd} to start over")
    os.makedirs(rd, exist_ok=True)
    config_lib.save_config(run, saved)
    times_path = os.path.join(rd, "stage_times.json")
    times: dict[str, float] = dict(_read_json(times_path) or {}) if _done(times_path) else {}
    data_dir = os.path.join(rd, "data")
    costs: dict[str, dict] = {}
    notify = on_stage or (lambda *a: None)

    def stage(name: str, output: str | tuple[str, ...], fn: Callable[[], Any]) -> None:
        if _done(*((output,) if isinstance(output, str) else output)):
            notify(name, "skip", None)
            return
        notify(name, "start", None)
        t0 = time.time()
        fn()
        times[name] = time.time() - t0
        files.atomic_write_json(times_path, times)  # a resumed run reports every stage's time, not only its own
        notify(name, "done", times[name])

    def train(name: str, cfg) -> None:
        t0 = time.time()
        res = train_lib.train(cfg, progress=(lambda info: train_progress(name, info)) if train_progress else None)
        if res.interrupted:
            raise KeyboardInterrupt(f"stage {name} interrupted at step {res.step}; rerun to resume")
        # tokens: rows x length per step (an upper bound with padding, close with packing); RAM/DPO see 2 sequences
        seqs = 2 if cfg.stage in ("ram", "dpo") else 1
        costs[name] = {"params": res.num_params, "steps": res.step, "seconds": time.time() - t0,
                       "tokens": res.step * cfg.data.batch_size * cfg.data.max_len * seqs}
        _write_json(os.path.join(rd, name, "cost.json"), costs[name])

    def cost(*names: str) -> dict | None:
        parts = [costs.get(n) or _read_json(os.path.join(rd, n, "cost.json")) for n in names]
        if any(c is None for c in parts):
            return None
        return evaluate.training_cost(seconds=sum(c["seconds"] for c in parts),
                                      params=sum(c["params"] for c in parts), tokens=sum(c["tokens"] for c in parts),
                                      flops=sum(6.0 * c["params"] * c["tokens"] for c in parts))

    # 1. data ---------------------------------------------------------------------------------------------
    def make_data():
        paths = tasks.generate_task_data(
            data_dir, n_corpus=p.n_corpus, n_align=p.n_align, n_pref=p.n_pref, n_eval=p.n_eval, seed=run.seed,
            proportions={"concise_correct": p.concise_correct, "wrong": p.wrong,
                         "verbose_correct": p.verbose_correct})
        align = tasks.read_jsonl(paths["align"])
        k = max(1, int(round(p.warmup_fraction * len(align))))
        _write_jsonl(os.path.join(data_dir, "warmup.jsonl"), align[:k])
    stage("data", os.path.join(data_dir, "warmup.jsonl"), make_data)
    f = {k: os.path.join(data_dir, f"{k}.jsonl") for k in ("corpus", "pretrain", "align", "pref", "eval", "warmup")}

    # 2. tokenizer ----------------------------------------------------------------------------------------
    tok_dir = os.path.join(rd, "tokenizer")

    def make_tok():
        texts = [r["text"] for r in tasks.read_jsonl(f["pretrain"])]
        tok_lib.train_sentencepiece(texts, p.tokenizer_vocab, tok_dir, seed=run.seed)
    stage("tokenizer", os.path.join(tok_dir, "tokenizer_config.json"), make_tok)

    # 3-4. proposal: pretrain, warm-up ----------------------------------------------------------------------
    stage("proposal", _model_dir(run, "proposal"), lambda: train("proposal", _train_cfg(
        run, "pretrain", "proposal", init="scratch", arch=p.proposal_arch, files=[f["pretrain"]],
        steps=p.proposal_steps, lr=p.proposal_lr)))
    stage("warmup", _model_dir(run, "warmup"), lambda: train("warmup", _train_cfg(
        run, "sft", "warmup", init=_model_dir(run, "proposal"), arch=None, files=[f["warmup"]],
        steps=p.warmup_steps, lr=p.warmup_lr, extra={"schedule": {"decay": "constant"}})))

    # 5. one-time proposal samples for S ------------------------------------------------------------------------
    samples_path = os.path.join(data_dir, "align_samples.jsonl")

    def make_samples():
        warm = api.load_model(_model_dir(run, "warmup"))
        align = tasks.read_jsonl(f["align"])
        out = sampler.sample(warm, None, [r["prompt"] for r in align], mode="proposal",
                             max_new_tokens=p.max_new_tokens, seed=run.seed + 1,
                             proposal_temperature=p.sample_temperature, proposal_top_p=1.0,
                             repetition_penalty=1.0, stop=["\n\nHuman:"], batch_size=p.eval_batch_size)
        _write_jsonl(samples_path, [generate.training_record(r, o) for r, o in zip(align, out)])
    stage("samples", samples_path, make_samples)

    # 6-7. aligner: pretrain on D, then RAM -------------------------------------------------------------------
    if p.aligner_init == "pretrained":
        stage("aligner_base", _model_dir(run, "aligner_base"), lambda: train("aligner_base", _train_cfg(
            run, "pretrain", "aligner_base", init="scratch", arch=p.aligner_arch, files=[f["pretrain"]],
            steps=p.aligner_pretrain_steps, lr=p.proposal_lr)))
    ram_init = _model_dir(run, "aligner_base") if p.aligner_init == "pretrained" else "scratch"
    stage("ram", _model_dir(run, "ram"), lambda: train("ram", _train_cfg(
        run, "ram", "ram", init=ram_init, arch=p.aligner_arch if ram_init == "scratch" else None,
        files=[samples_path], steps=p.ram_steps, lr=p.ram_lr,
        extra={"ram": {"alpha": p.alpha, "negatives": "proposal"}, "proposal": _model_dir(run, "warmup"),
               "data": {"batch_size": p.ram_batch_size}})))

    # 8. baselines: SFT and DPO of the warmed-up proposal ----------------------------------------------------------
    baseline_stage = stage if p.baselines else (lambda name, output, fn: notify(name, "skip", None))
    baseline_stage("sft", _model_dir(run, "sft"), lambda: train("sft", _train_cfg(
        run, "sft", "sft", init=_model_dir(run, "warmup"), arch=None, files=[f["align"]], steps=p.sft_steps,
        lr=p.sft_lr)))
    baseline_stage("dpo", _model_dir(run, "dpo"), lambda: train("dpo", _train_cfg(
        run, "dpo", "dpo", init=_model_dir(run, "warmup"), arch=None, files=[f["pref"]], steps=p.dpo_steps,
        lr=p.dpo_lr, extra={"dpo": {"beta": p.dpo_beta, "rpo_alpha": p.dpo_rpo_alpha}})))

    # 9. the sequence-level corrector: rewrite P_M's draft (the one-time samples) into the target --------------------
    corr_path = os.path.join(data_dir, "corrector.jsonl")

    def make_corrector():
        recs = tasks.read_jsonl(samples_path)
        _write_jsonl(corr_path, evaluate.corrector_training_records(recs, [r["proposal"] for r in recs]))
        init = _model_dir(run, "aligner_base") if p.aligner_init == "pretrained" else "scratch"
        train("corrector", _train_cfg(run, "sft", "corrector", init=init,
                                      arch=p.aligner_arch if init == "scratch" else None, files=[corr_path],
                                      steps=p.corrector_steps, lr=p.corrector_lr))
    baseline_stage("corrector", _model_dir(run, "corrector"), make_corrector)

    # 10. evaluation ----------------------------------------------------------------------------------------------
    def make_eval():
        load = lambda name: api.load_model(_model_dir(run, name))  # noqa: E731
        base, warm, aligner = load("proposal"), load("warmup"), load("ram")
        ram_sampling = {"n": p.n, "kl_threshold": p.kl_threshold}
        systems = [evaluate.System("P_M (warmed up)", proposal=warm),
                   evaluate.System("P_M (pretrained)", proposal=base),
                   evaluate.System("Q alone", aligner=aligner, mode="aligner")]
        # sparse is defined by P_M's nucleus (the released 0.95): at top-p 1 it would be Q alone
        mode_sampling = {"sparse": {"proposal_top_p": 0.95}}
        systems += [evaluate.System(f"P_M + RAM ({m})", proposal=warm, aligner=aligner, mode=m,
                                    sampling={**ram_sampling, **mode_sampling.get(m, {})}, train_cost=cost("ram"))
                    for m in p.eval_modes]
        if p.baselines:
            systems += _baseline_systems(load, warm, aligner, ram_sampling, cost)
        results = evaluate.evaluate_systems(
            systems, tasks.read_jsonl(f["eval"]), verifier=tasks.task_verifier, seed=run.seed,
            max_new_tokens=p.max_new_tokens,
            stop=["\n\nHuman:"], baseline_name="P_M (warmed up)", align_records=tasks.read_jsonl(f["align"])[:200],
            batch_size=p.eval_batch_size)
        plot_dir = os.path.join(rd, "plots")
        os.makedirs(plot_dir, exist_ok=True)
        pngs = [plots.plot_accuracy(results, os.path.join(plot_dir, "accuracy.png")),
                plots.plot_training_curves({s: os.path.join(rd, s, "metrics.jsonl") for s in
                                            ("proposal", "warmup", "aligner_base", "ram", "sft", "dpo", "corrector")
                                            if os.path.exists(os.path.join(rd, s, "metrics.jsonl"))},
                                           os.path.join(plot_dir, "training.png"))]
        table = evaluate.write_report(rd, results, stage_times=times, plots=pngs,
                                      cost_reference="SFT" if p.baselines else None,
                                      title="ramjax embedded default: RAM on the generated task suite")
        files.atomic_write(os.path.join(rd, "results_table.md"), table + "\n")
    stage("evaluate", tuple(os.path.join(rd, f) for f in ("results.json", "report.md", "results_table.md")),
          make_eval)

    table_path = os.path.join(rd, "results_table.md")
    table = open(table_path).read() if os.path.exists(table_path) else ""
    return {"table": table, "stage_times": times, "report": os.path.join(rd, "report.md")}
