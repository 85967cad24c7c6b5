"""The trainer: a run built from a ``TrainConfig`` (data, model, mesh, stage), the loop, held-out evaluation,
checkpoints, exports and metrics, around the pure step of ``ramjax.train_step`` (train state, optimizers and
schedules, the jitted train step; re-exported here).

    cfg = config.load_config(config.TrainConfig, "configs/ram.yaml", ["ram.alpha=1e-3"])
    result = train_lib.train(cfg)          # or train_lib.dry_run(cfg): validate, build shapes, compile, write nothing

The trainer knows no stage: what a stage adds (its objective, the trained model as a function of the trained
pytree, frozen models and tables, the export) is a ``ramjax.stages.Stage`` record, built from the config.

Frozen inputs (frozen models, the DPO reference log-probs precomputed once before training so the reference model
is not kept in memory) enter the step as a separate ``frozen`` argument outside ``value_and_grad``; optimizer state
exists only for the trained parameters.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from ramjax import api, distributed, files, hf, memplan, rundir, stages
from ramjax import checkpoint as ckpt_lib
from ramjax import config as config_lib
from ramjax import data as data_lib
from ramjax import loss as loss_lib
from ramjax import metrics as metrics_lib
from ramjax import model as model_lib
from ramjax import sharding as shd
from ramjax import tokenizer as tok_lib
from ramjax.config import DistributedConfig, TrainConfig
from ramjax.stages import TrainConfigError
from ramjax.train_step import (
    DECAYS,
    OPTIMIZERS,
    TrainState,
    batch_shardings,
    init_state,
    jit_train_step,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    memory_report,
    opt_state_shardings,
    schedule_count,
    split_micro,
    state_shardings,
)

# the pure step of ramjax.train_step is re-exported: train_lib is where users and benches find the trainer
__all__ = [
    "train", "dry_run", "build", "compile_step", "memory_plan", "Plan", "TrainResult", "HeldOut",
    "initialize_distributed", "NonFiniteTrainingError", "TrainConfigError", "TrainState", "init_state",
    "opt_state_shardings", "state_shardings", "OPTIMIZERS", "DECAYS", "make_schedule", "make_optimizer",
    "split_micro", "make_train_step", "schedule_count", "jit_train_step", "batch_shardings", "memory_report",
    "make_eval_step",
]

log = logging.getLogger(__name__)

Batch = Mapping[str, Any]
to_global = shd.to_global


class NonFiniteTrainingError(ValueError):
    """A step's loss or gradient norm was NaN/inf (``optimizer.nonfinite=stop``, or more skipped steps than
    ``optimizer.max_skipped_steps``). The message names the step; the run directory holds only finite parameters."""


# ------------------------------------------------------------------------------------------------------------
# Held-out evaluation (data.eval_files)


class HeldOut:
    """The held-out evaluation of a run (``data.eval_files``): one ordered pass over every held-out example in
    micro-batches (``Plan.eval_iterator``), scored by the stage's own objective, so it works for every stage.
    Tables a stage precomputes per example (the DPO reference log-probs, the TrRa top-k teacher) are computed for
    the held-out examples too, by the stage's ``prepare``, and kept under ``run_dir/eval/``.

    ``__call__(params) -> {"eval/<metric>": float}``: the objective and its metrics over the whole held-out set,
    plus ``eval/tokens`` (loss tokens). The objective's normalizers are counts (tokens, examples), so the held-out
    set's are the sums of its batches' normalizers; with them every batch contributes ``sum / set count``.
    """

    def __init__(self, plan: Plan, setup: stages.Setup, params_sh: Any, frozen_sh: Any):
        stage, self.iterator = plan.stage, plan.eval_iterator
        self.host_batch = None
        tables: dict[str, Any] = {}
        if stage.prepare is not None:
            eval_dir = os.path.join(setup.run_dir, "eval")
            if setup.primary:
                os.makedirs(eval_dir, exist_ok=True)
            # a copy of the frozen models: a prepare that takes them off the devices must not take the training's
            tables, self.host_batch = stage.prepare(dataclasses.replace(
                setup, data=self.iterator.data, run_dir=eval_dir, frozen=dict(setup.frozen or {})))
        self.frozen = {n: tables[n] if n in tables else stage.frozen[n] for n in stage.frozen_abstract} or None
        objective = stage.objective
        self.keys = objective.batch_keys
        self.batch_sh = {k: shd.batch_sharding(plan.mesh, 1 if k == "example_index" else
                                               2 + len(objective.extra_dims.get(k, ())), plan.rules)
                         for k in self.keys}
        rep = shd.replicated(plan.mesh)
        norm_fn = jax.jit(objective.normalizers, in_shardings=(self.batch_sh,), out_shardings=rep)
        totals: dict[str, float] = {}
        for batch in self._batches():
            for k, v in jax.device_get(norm_fn(batch)).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        self.norms = jax.device_put({k: np.float32(v) for k, v in totals.items()}, rep)
        self.step = jax.jit(make_eval_step(objective, stage.forward),
                            in_shardings=(params_sh, self.batch_sh, rep, frozen_sh), out_shardings=rep)
        log.info("held-out data: %d examples, %d batches per evaluation", len(self.iterator.data),
                 self.iterator.batches_per_epoch(0))

    def _batches(self):
        """The global held-out batches, in order (the iterator is rewound for every pass)."""
        self.iterator.restore({"epoch": 0, "position": 0})
        for local in self.iterator:
            if self.host_batch is not None:
                local = self.host_batch(local)
            yield shd.to_global({k: local[k] for k in self.keys}, self.batch_sh)

    def __call__(self, params: Any) -> dict[str, float]:
        total: dict[str, float] = {}
        for batch in self._batches():
            for k, v in jax.device_get(self.step(params, batch, self.norms, self.frozen)).items():
                total[k] = total.get(k, 0.0) + float(v)
        return {f"eval/{k}": v for k, v in total.items()}


# ------------------------------------------------------------------------------------------------------------
# The training loop


@dataclasses.dataclass
class Plan:
    """Everything ``train`` needs, built and validated before anything is written (see ``build``)."""

    cfg: TrainConfig
    model_cfg: model_lib.ModelConfig
    tokenizer: tok_lib.Tokenizer
    iterator: data_lib.BatchIterator
    mesh: Mesh
    rules: tuple
    param_shardings: Any           # of the trained pytree
    stage: stages.Stage
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    total_steps: int
    warmup_steps: int
    resume_step: int | None
    params: Any = None             # the initial trained params (loaded or built), or None (from scratch / resumed)
    source_is_hf: bool = False
    eval_iterator: data_lib.BatchIterator | None = None  # data.eval_files in micro-batches, or None

    @property
    def objective(self) -> loss_lib.Objective:
        return self.stage.objective

    @property
    def vocab_limit(self) -> int | None:
        return self.stage.vocab_limit


@dataclasses.dataclass
class TrainResult:
    """What a run did. ``interrupted``: stopped by SIGTERM/SIGINT after checkpointing ``step``."""

    run_dir: str
    step: int
    total_steps: int
    interrupted: bool
    metrics: dict
    memory: dict
    num_params: int
    model_dir: str | None = None
    hf_dir: str | None = None


def initialize_distributed(dist: DistributedConfig) -> None:
    """Starts ``jax.distributed`` for a ``DistributedConfig`` when the run is multi-process (explicitly or detected
    from the environment); see ``ramjax.distributed.initialize``."""
    from ramjax import distributed

    distributed.initialize(dist)


def _check_batch(cfg: TrainConfig, mesh: Mesh, rules) -> None:
    B, k = cfg.data.batch_size, cfg.optimizer.grad_accum
    div = shd.batch_divisor(mesh, rules)
    if (B // k) % div:
        raise TrainConfigError(
            f"data.batch_size={B} / optimizer.grad_accum={k} = {B // k} rows per micro-batch is not divisible by "
            f"the {div} batch shards of mesh {dict(mesh.shape)}; make batch_size a multiple of {div * k}")
    if B % jax.process_count():
        raise TrainConfigError(f"data.batch_size={B} must be a multiple of the process count {jax.process_count()}")


def _total_steps(cfg: TrainConfig, iterator: data_lib.BatchIterator) -> int:
    if cfg.steps > 0:
        return int(cfg.steps)
    if cfg.tokens > 0:  # rows of the data's row length per step (packed rows are nearly full)
        return max(1, int(math.ceil(cfg.tokens / (cfg.data.batch_size * iterator.data.max_len))))
    return max(1, int(math.ceil(cfg.epochs * iterator.batches_per_epoch(0))))


def build(cfg: TrainConfig, *, load_params: bool = True) -> Plan:
    """Validates ``cfg`` and builds everything a run needs — tokenizer, data, mesh, shapes, optimizer, stage —
    *without writing anything*, so bad input leaves no half-written run directory.

    Raises named errors: ``ConfigError`` (including α < 0), ``TrainConfigError``, ``DataError`` (malformed
    JSONL), ``VocabMismatchError`` (aligner vs proposal vocabulary), ``ShardingError``, ``CheckpointMismatchError``
    (the run directory holds a checkpoint of another model shape).
    """
    config_lib.validate_config(cfg)
    initialize_distributed(cfg.distributed)

    # Tokenizer and model shape.
    scratch = cfg.model.from_scratch
    if not scratch and not os.path.isdir(cfg.model.init):
        raise TrainConfigError(f"model.init={cfg.model.init!r} is neither 'scratch' nor a model directory")
    tok_path = cfg.tokenizer or (None if scratch else cfg.model.init)
    if tok_path is None:
        raise TrainConfigError("no tokenizer: set tokenizer=PATH")
    tokenizer = tok_lib.load_tokenizer(tok_path)
    params = None
    source_is_hf = False
    over = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                attention_impl=cfg.model.attention_impl, attention_chunk=cfg.model.attention_chunk,
                loss_chunk_size=cfg.model.loss_chunk_size)
    if scratch:
        model_cfg = cfg.model.model_config(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                           eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    else:
        model_cfg, fmt = api.read_config(cfg.model.init)
        model_cfg, source_is_hf = model_cfg.replace(**over), fmt == "hf"
    if cfg.data.max_len > model_cfg.max_position_embeddings:  # rows past the context train on garbage positions
        raise TrainConfigError(
            f"data.max_len={cfg.data.max_len} exceeds the context of the model "
            f"({'model.arch' if scratch else repr(cfg.model.init)}: max_position_embeddings="
            f"{model_cfg.max_position_embeddings}); set data.max_len <= {model_cfg.max_position_embeddings} (and "
            f"data.max_prompt_len below it)")
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise tok_lib.VocabMismatchError(
            f"the model has {model_cfg.vocab_size} embedding rows but the tokenizer {tok_path!r} has "
            f"{tokenizer.vocab_size} ids; use the model's own tokenizer or set model.arch.vocab_size >= "
            f"{tokenizer.vocab_size}")
    stages.check(cfg, tokenizer, model_cfg)

    # Mesh, data, schedule.
    mesh = shd.make_mesh(cfg.mesh.mesh_config())
    rules = cfg.mesh.sharding_rules()
    _check_batch(cfg, mesh, rules)
    iterator = data_lib.train_iterator(cfg, tokenizer)
    # held-out batches of the train step's micro-batch size (what the step holds in memory at once)
    eval_iterator = data_lib.eval_iterator(cfg, tokenizer, batch_size=cfg.data.batch_size // cfg.optimizer.grad_accum)
    total = _total_steps(cfg, iterator)
    warmup = cfg.schedule.warmup_steps or int(round(cfg.schedule.warmup_ratio * total))
    schedule = make_schedule(cfg.optimizer.lr, total, warmup, cfg.schedule.decay, cfg.schedule.final_lr_ratio)
    o = cfg.optimizer
    optimizer = make_optimizer(o.name, schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                               rmsprop_decay=o.rms_decay, momentum=o.momentum, clip_norm=o.clip_norm or None)

    # Resume: a checkpoint of another shape is an error now, before anything is written.
    ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
    resume_step = None
    if files.epath_of(ckpt_dir).is_dir() and any(files.epath_of(ckpt_dir).iterdir()):  # local or gs://...
        if not cfg.checkpoint.resume:
            raise TrainConfigError(f"{ckpt_dir} holds checkpoints but checkpoint.resume=false; use a fresh run_dir "
                                   f"or set checkpoint.resume=true")
        mngr = ckpt_lib.CheckpointManager(ckpt_dir)
        resume_step = mngr.latest_step()  # checked below against the model; damaged steps are skipped then
    if load_params and not scratch and resume_step is None:
        m = api.load_model(cfg.model.init, mesh=mesh, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                           rules=rules)
        model_cfg = m.config.replace(**over)
        params = m.params
    stage = stages.build_stage(cfg, model_cfg, tokenizer, mesh, rules, num_examples=len(iterator.data),
                               params=params, load=load_params, resuming=resume_step is not None)
    p_sh = stage.trained_shardings or model_lib.param_shardings(model_cfg, mesh, rules)
    if stage.trained_shapes is not None:
        params = stage.initial
    if resume_step is not None:
        # the newest step whose metadata reads (a damaged newer one is skipped with a warning; ``train`` falls back
        # further if its arrays turn out damaged too)
        resume_step = mngr.newest_readable_step(_trained_shapes(model_cfg, stage))
    return Plan(cfg=cfg, model_cfg=model_cfg, tokenizer=tokenizer, iterator=iterator, mesh=mesh, rules=rules,
                param_shardings=p_sh, stage=stage, optimizer=optimizer, schedule=schedule, total_steps=total,
                warmup_steps=warmup, resume_step=resume_step, params=params, source_is_hf=source_is_hf,
                eval_iterator=eval_iterator)


def _trained_shapes(model_cfg: model_lib.ModelConfig, stage: stages.Stage) -> Any:
    return stage.trained_shapes if stage.trained_shapes is not None else model_lib.param_shapes(model_cfg)


def _abstract_batch(plan: Plan) -> tuple[dict, dict]:
    """Global ``ShapeDtypeStruct``s and shardings of one batch (from the iterator's local shapes)."""
    B, T = plan.cfg.data.batch_size, plan.iterator.data.max_len
    shapes, shardings = {}, {}
    for k in plan.objective.batch_keys:
        # the dtypes of ramjax.data batches, and of tables added per batch (the precomputed TrRa teacher)
        dtype = np.float32 if k.endswith(("loss_mask", "logprobs", "logprob")) else np.int32
        shape = (B,) if k == "example_index" else (B, T) + tuple(plan.objective.extra_dims.get(k, ()))
        shardings[k] = shd.batch_sharding(plan.mesh, len(shape), plan.rules)
        shapes[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
    return shapes, shardings


def _state_abstract(plan: Plan) -> tuple[TrainState, TrainState]:
    trained = _trained_shapes(plan.model_cfg, plan.stage)
    shapes = jax.eval_shape(lambda: init_state(trained, plan.optimizer, jax.random.key(0)))
    sh = state_shardings(shapes, plan.param_shardings, plan.mesh)
    abstract = jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes, sh)
    return abstract, sh


def _frozen_abstract(plan: Plan) -> tuple[Any, Any]:
    abstract = dict(plan.stage.frozen_abstract)
    if not abstract:
        return None, None
    return abstract, jax.tree_util.tree_map(lambda a: a.sharding, abstract)


def _trained_count(plan: Plan) -> int:
    return model_lib.count_params(_trained_shapes(plan.model_cfg, plan.stage))


def compile_step(plan: Plan):
    """Lowers and compiles the train step for the plan's shapes; returns ``(compiled, memory report, shardings)``."""
    state_abs, state_sh = _state_abstract(plan)
    batch_abs, batch_sh = _abstract_batch(plan)
    frozen_abs, frozen_sh = _frozen_abstract(plan)
    step = make_train_step(plan.objective, plan.optimizer, forward=plan.stage.forward,
                           grad_accum=plan.cfg.optimizer.grad_accum, schedule=plan.schedule, mesh=plan.mesh,
                           rules=plan.rules)
    jitted = jit_train_step(step, state_sh, batch_sh, frozen_sh, plan.mesh)
    compiled = jitted.lower(state_abs, batch_abs, frozen_abs).compile()
    mem = memory_report(compiled)
    if mem:
        log.info("compiled train step: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB, peak ~%.1f MiB "
                 "per device", mem["argument_size_in_bytes"] / 2**20, mem["output_size_in_bytes"] / 2**20,
                 mem["temp_size_in_bytes"] / 2**20, mem["peak_estimate_bytes"] / 2**20)
    return compiled, mem, (state_sh, batch_sh, frozen_sh)


def dry_run(cfg: TrainConfig) -> dict[str, Any]:
    """Validates ``cfg``, builds shapes, compiles the step; writes nothing. Returns parameter counts, steps,
    data statistics and the compiled memory estimate."""
    plan = build(cfg, load_params=False)
    compiled, mem, _ = compile_step(plan)
    n = _trained_count(plan)
    return {"stage": cfg.stage, "num_params": n, "model": dataclasses.asdict(plan.model_cfg),
            "total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps, "resume_step": plan.resume_step,
            "batches_per_epoch": plan.iterator.batches_per_epoch(0), "data": plan.iterator.stats.as_dict(),
            "mesh": dict(plan.mesh.shape), "memory": mem, "plan": memory_plan(plan, compiled)}


def memory_plan(plan: Plan, compiled: Any) -> dict[str, Any]:
    """Per-device bytes of the run (see ``ramjax.memplan``): trained parameters, optimizer state, frozen models and
    the compiled step; and the samplers the stage needs (``stages.sampler_configs``: for ``stage=ram`` with
    ``proposal=``, P_M's sampler — parameters, KV cache, prefill — for the one-time samples, ``data.batch_size``
    prompts of ``data.max_prompt_len`` + the rest of ``data.max_len``)."""
    state_abs, _ = _state_abstract(plan)
    frozen_abs, _ = _frozen_abstract(plan)
    out = {"mesh": dict(plan.mesh.shape), "devices": int(plan.mesh.size),
           "train": {"params": memplan.tree_bytes_per_device(state_abs.params),
                     "optimizer": memplan.tree_bytes_per_device(state_abs.opt_state),
                     "frozen": memplan.tree_bytes_per_device(frozen_abs) if frozen_abs else 0,
                     "compiled": memplan.compiled_memory(compiled)},
           "samplers": {}}
    d = plan.cfg.data
    for name, s_cfg in stages.sampler_configs(plan.cfg).items():
        out["samplers"][name] = memplan.sampler_memory(s_cfg, plan.mesh, plan.rules, batch=d.batch_size,
                                                       prompt_len=d.max_prompt_len,
                                                       max_new=max(1, d.max_len - d.max_prompt_len))
    return out


class _StopFlag:
    """SIGTERM/SIGINT set a flag that the loop checks after each step (installed only in the main thread)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == 2:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d: checkpointing after the current step, then exiting", signum)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def train(cfg: TrainConfig, *, progress: Callable[[dict[str, Any]], None] | None = None,
          force_restart: bool = False) -> TrainResult:
    """Runs ``cfg``: builds everything (``build``), then trains in ``cfg.run_dir``.

    Resumes automatically from the latest checkpoint in ``run_dir/checkpoints`` (params, optimizer state, step,
    data iterator state, PRNG). Writes ``config.yaml``, ``meta.json``, ``metrics.jsonl`` and ``tb/`` (process 0),
    checkpoints every ``checkpoint.every`` steps, and at the end the final checkpoint, a ramjax model directory
    ``run_dir/model`` and Hugging Face safetensors in ``run_dir/hf`` (when the model came from HF or with
    ``checkpoint.export_hf``). A stage that runs as several trainer runs (iterated TrRa) does so here.
    SIGTERM/SIGINT (on any process of a multi-host run): every process checkpoints after the same step and returns
    with ``interrupted=True``.

    The run owns ``run_dir`` (``ramjax.rundir``): it must be writable (checked before anything is built), a
    second concurrent run on it fails with ``RunDirBusyError`` naming the holder, and resuming with settings other
    than those recorded in ``fingerprint.json`` fails with ``RunDirMismatchError`` naming the keys, unless
    ``force_restart`` (the old run is moved to ``<run_dir>.replaced-<time>`` and the run starts over).

    progress: called after every step with ``{"step", "total_steps"}`` plus, on logging steps, ``"metrics"``.
    """
    driver = stages.driver(cfg)
    if driver is None:
        return _train_owned(cfg, progress, force_restart)
    return driver(cfg, lambda c: _train_owned(c, progress, False), _finished)


def _train_owned(cfg: TrainConfig, progress: Callable[[dict[str, Any]], None] | None, force_restart: bool
                 ) -> TrainResult:
    with _RunDirOwner(cfg, force_restart) as owner:
        return _train_once(cfg, progress, owner)


class _RunDirOwner:
    """Run-directory ownership for one trainer run: writability and fingerprint checks up front (nothing
    written), the lock (taken at once when the directory exists, else by ``claim`` once the run is built and about
    to write), the fingerprint recorded by ``claim``."""

    def __init__(self, cfg: TrainConfig, force_restart: bool):
        self.cfg, self.force_restart = cfg, force_restart
        initialize_distributed(cfg.distributed)  # before the first JAX call (process_index)
        self.primary = jax.process_index() == 0
        self.lock = None

    def __enter__(self) -> "_RunDirOwner":
        rd = self.cfg.run_dir
        if "://" in rd:  # object storage (gs://...): no local lock or probe; the fingerprint is not kept there
            log.warning("run_dir=%s is remote: no run-directory lock or settings fingerprint", rd)
            self.remote = True
            return self
        self.remote = False
        rundir.check_writable(rd)
        self.fingerprint = rundir.train_fingerprint(self.cfg)
        try:
            if self.primary and os.path.isdir(rd):
                self.lock = rundir.RunDirLock(rd).acquire()
            if self.force_restart and rundir.has_previous_run(rd):
                build(self.cfg, load_params=False)  # a bad config moves nothing aside
                if self.primary:
                    self.lock.release()
                    self.lock = None
                    rundir.replace_aside(rd)
                _sync_processes("ramjax_force_restart")
            elif os.path.isdir(rd):
                rundir.check_fingerprint(rd, self.fingerprint, write=False)
        except BaseException:
            self.__exit__()
            raise
        return self

    def claim(self) -> None:
        """Takes the lock (if not held) and records the fingerprint: call right before the run writes."""
        if self.primary and not self.remote:
            if self.lock is None:
                self.lock = rundir.RunDirLock(self.cfg.run_dir).acquire()
            rundir.check_fingerprint(self.cfg.run_dir, self.fingerprint)

    def __exit__(self, *exc) -> bool:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        return False


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _finished(model_dir: str, metrics: dict) -> TrainResult:
    """The result of a run that had already finished before (nothing trained now)."""
    return TrainResult(run_dir=os.path.dirname(model_dir), step=0, total_steps=0, interrupted=False,
                       metrics=metrics, memory={}, num_params=0, model_dir=model_dir)


def _train_once(cfg: TrainConfig, progress: Callable[[dict[str, Any]], None] | None, owner: _RunDirOwner
                ) -> TrainResult:
    t_start = time.time()
    plan = build(cfg)
    stage = plan.stage
    primary = jax.process_index() == 0
    run_dir = cfg.run_dir
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    compiled, mem, (state_sh, batch_sh, frozen_sh) = compile_step(plan)
    num_params = _trained_count(plan)

    every = cfg.checkpoint.every or (plan.total_steps + 1)
    mngr = ckpt_lib.CheckpointManager(ckpt_dir, save_every=every, keep=cfg.checkpoint.keep,
                                      async_save=cfg.checkpoint.async_save)
    root = jax.random.key(cfg.seed)
    k_params, k_train = jax.random.split(root)
    state_abs, _ = _state_abstract(plan)
    if plan.resume_step is not None:
        p_abs = state_abs.params
        train_abs = {"step": state_abs.step, "rng": state_abs.rng, "opt_state": state_abs.opt_state}
        # the newest checkpoint that restores intact (damaged newer ones are logged and moved aside)
        resumed, params, tr, data_state = mngr.restore_newest(p_abs, train_abs)
        state = TrainState(step=tr["step"], params=params, opt_state=tr["opt_state"], rng=tr["rng"])
        plan.iterator.restore(data_state)
        log.info("resumed from %s/%d (data epoch %d, position %d)", ckpt_dir, resumed,
                 plan.iterator.epoch, plan.iterator.position)
    else:
        params = plan.params
        if params is None:  # from scratch
            params = model_lib.init_params_sharded(plan.model_cfg, k_params, plan.mesh, plan.rules)
        state = jax.jit(lambda p: init_state(p, plan.optimizer, k_train), out_shardings=state_sh,
                        donate_argnums=(0,))(params)
        resumed = 0  # a run killed before its first checkpoint starts over: drop what it logged
    plan.params = params = None  # the state owns the params now

    # --- from here on the run directory is written (only once the state is restored: a checkpoint that cannot be
    # restored is an error that leaves the directory as it was)
    owner.claim()
    if primary:
        files.epath_of(run_dir).mkdir(parents=True, exist_ok=True)
        config_lib.save_config(cfg, os.path.join(run_dir, "config.yaml"))
    meta = {"jax_version": jax.__version__, "backend": jax.default_backend(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
            "mesh": dict(plan.mesh.shape), "stage": cfg.stage, "num_params": num_params,
            "model": ckpt_lib.config_to_dict(plan.model_cfg), "total_steps": plan.total_steps,
            "warmup_steps": plan.warmup_steps, "batches_per_epoch": plan.iterator.batches_per_epoch(0),
            "row_len": plan.iterator.data.max_len,
            "data": plan.iterator.stats.as_dict(), "compiled_memory": mem,
            "resumed_from": resumed if plan.resume_step is not None else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if primary:
        files.atomic_write_json(os.path.join(run_dir, "meta.json"), meta, default=str)
    writer = metrics_lib.MetricsWriter(run_dir, enabled=primary, tensorboard=cfg.logging.tensorboard)
    writer.truncate_after(resumed)  # the file reads as one run: no step logged twice

    host_batch = None
    tables: dict[str, Any] = {}
    setup = stages.Setup(
        cfg=cfg, model_cfg=plan.model_cfg, mesh=plan.mesh, rules=plan.rules, data=plan.iterator.data,
        run_dir=run_dir, primary=primary, step=int(jax.device_get(state.step)), params=state.params,
        key=k_params, vocab_limit=stage.vocab_limit, frozen=stage.frozen)
    # before the training's prepare, which may take frozen models off the devices that the held-out tables need
    held_out = HeldOut(plan, setup, state_sh.params, frozen_sh) if plan.eval_iterator is not None else None
    if stage.prepare is not None:
        tables, host_batch = stage.prepare(setup)
    frozen = {name: tables[name] if name in tables else stage.frozen[name] for name in stage.frozen_abstract}
    frozen = frozen or None
    eval_every = cfg.logging.eval_every

    step = int(jax.device_get(state.step))
    thr = metrics_lib.Throughput()
    pending: list[dict] = []
    pending_steps: list[int] = []
    last: dict[str, Any] = {}
    interrupted = False
    # non-finite steps skipped so far, those of earlier invocations included (optimizer.max_skipped_steps bounds the
    # run, not each resume): a skipped step advances TrainState.step but keeps the old optimizer state, whose update
    # count therefore stays behind by one; so the checkpointed state itself holds the count, as step - count
    skipped = step - int(jax.device_get(schedule_count(state.opt_state, state.step)))

    def check_finite(steps: list[int], host: list[dict]) -> None:
        """Counts the steps the device flagged non-finite (their updates were dropped there); raises
        ``NonFiniteTrainingError`` under ``nonfinite=stop`` or past ``max_skipped_steps``, before any save."""
        nonlocal skipped
        bad = [(s, x) for s, x in zip(steps, host) if s >= 0 and float(x.get("nonfinite", 0.0))]
        if not bad:
            return
        skipped += len(bad)
        s0, x0 = bad[0]
        what = (f"step {s0} had loss {float(x0.get('loss', float('nan')))} and gradient norm "
                f"{float(x0['grad_norm'])}")
        o = cfg.optimizer
        if o.nonfinite == "stop" or skipped > o.max_skipped_steps:
            mngr.close()
            writer.close()
            why = ("optimizer.nonfinite=stop" if o.nonfinite == "stop" else
                   f"{skipped} non-finite steps skipped, more than optimizer.max_skipped_steps={o.max_skipped_steps}")
            raise NonFiniteTrainingError(
                f"training diverged: {what} ({why}). Its update was dropped, so {ckpt_dir} holds only finite "
                f"parameters and no model was exported. Lower optimizer.lr, set optimizer.clip_norm > 0, check the "
                f"data (token ids, lengths), or set optimizer.nonfinite=skip to skip such steps")
        log.warning("%s: its update was dropped (optimizer.nonfinite=skip; %d of at most %d skipped)", what,
                    skipped, o.max_skipped_steps)

    def _flush_metrics(extra: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Fetches the pending steps' metrics, logs the last one (with ``extra``, the held-out metrics of this
        step); returns it."""
        nonlocal pending, pending_steps
        host = [jax.device_get(x) for x in pending]
        for x in host:
            thr.add(float(x["input_tokens"]))
        flagged = pending_steps
        pending, pending_steps = [], []
        out = {f"train/{k}": float(v) for k, v in host[-1].items() if k not in ("input_tokens",)}
        out.update({f"perf/{k}": v for k, v in thr.update().items()})
        out.update({"data/epoch": plan.iterator.epoch, "data/position": plan.iterator.position, "data/crc32": crc})
        out.update(extra or {})
        out["train/skipped_steps"] = skipped + sum(
            1 for s, x in zip(flagged, host) if s >= 0 and float(x.get("nonfinite", 0.0)))
        writer.write(step, out)
        check_finite(flagged, host)  # raises (after logging the record) under nonfinite=stop
        if stage.watch is not None:
            stage.watch(out)
        return out

    with _StopFlag() as stop:
        while step < plan.total_steps:
            local = next(plan.iterator)
            if host_batch is not None:
                local = host_batch(local)
            crc = zlib.crc32(np.ascontiguousarray(local[plan.objective.batch_keys[0]]).tobytes())
            state, m = compiled(state, shd.to_global(local, batch_sh), frozen)
            step += 1
            pending.append(m)
            pending_steps.append(step)
            event = {"step": step, "total_steps": plan.total_steps}
            evaluated = {}
            if held_out is not None and (step == plan.total_steps or (eval_every and step % eval_every == 0)):
                evaluated = held_out(state.params)
            if step % cfg.logging.every == 0 or step == plan.total_steps:
                event["metrics"] = last = _flush_metrics(evaluated)
            elif evaluated:  # an evaluation between logging steps: its own record
                writer.write(step, evaluated)
                event["metrics"] = last = {**last, **evaluated}
            if pending and mngr.should_save(step):  # a checkpoint between logging steps: check its steps first
                check_finite(pending_steps, [jax.device_get(x) for x in pending])
                pending_steps = [-1] * len(pending)  # counted now; the logging step must not count them again
            mngr.save(step, state.params, {"step": state.step, "rng": state.rng, "opt_state": state.opt_state},
                      plan.iterator.state())
            if progress is not None:
                progress(event)
            # A signal on any host (during the step or the callbacks above) stops every host after this same step:
            # a tiny all-gather of the flags (with one process, the flag itself). Each host then saves the same
            # checkpoint below, so none waits forever in the collective save.
            if distributed.any_process(stop.signum is not None):
                if pending:
                    last = _flush_metrics()
                interrupted = step < plan.total_steps
                break
    if interrupted or step == plan.total_steps:
        mngr.save(step, state.params, {"step": state.step, "rng": state.rng, "opt_state": state.opt_state},
                  plan.iterator.state(), force=True)
    mngr.close()
    writer.close()

    model_dir = hf_dir = None
    if not interrupted:
        model_dir = os.path.join(run_dir, "model")
        tok_src = cfg.tokenizer or (None if cfg.model.from_scratch else cfg.model.init)
        tok_dir = tok_src if tok_src and os.path.isdir(tok_src) else None
        out_cfg, out_params = stage.export(state.params, run_dir, primary)
        ckpt_lib.save_model_dir(model_dir, out_cfg, out_params, tokenizer=tok_dir or plan.tokenizer)
        if plan.source_is_hf or cfg.checkpoint.export_hf:
            hf_dir = os.path.join(run_dir, "hf")  # every process calls it; process 0 writes
            # a gs:// run directory: written locally, then process 0 uploads the files
            with files.local_staging(hf_dir, upload=primary) as local:
                hf.save_hf(local, out_cfg, out_params, tokenizer_dir=tok_dir)
    meta.update({"final_step": step, "interrupted": interrupted, "elapsed_s": round(time.time() - t_start, 2),
                 "last_metrics": last})
    if primary:
        files.atomic_write_json(os.path.join(run_dir, "meta.json"), meta, default=str)
    return TrainResult(run_dir=run_dir, step=step, total_steps=plan.total_steps, interrupted=interrupted,
                       metrics=last, memory=mem, num_params=num_params, model_dir=model_dir, hf_dir=hf_dir)
