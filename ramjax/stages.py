"""What each training stage adds to the stage-agnostic trainer (``ramjax.train_lib``).

The trainer runs one ``Stage`` record: an objective (``ramjax.loss``), the trained model as a function of the
trained pytree (the model itself, or an InRa adapter below a frozen base), the frozen inputs of the step (frozen
models, tables precomputed before step 0), and how the run's model is exported. ``build_stage`` makes it from the
config:

* ``pretrain``/``sft``: the token-mean NLL.
* ``ram``: the residual aligner loss; the aligner's vocabulary is checked against ``proposal``'s.
* ``dpo``: the reference log-probs of every example are computed once from the initial weights (``ref_logps.npy``,
  reused on resume), so the reference model is not kept.
* ``trra``: the two frozen teachers (``trra.reference``, ``trra.aligned``) run in the step, or their top-k teacher
  is computed once (``trra.teacher_topk``, ``trra_teacher.npz``) and the teachers leave the devices;
  ``trra.iterations > 1`` runs several trainer runs (``iterated_trra``).
* ``inra.enabled`` (with any stage but pretrain): only an identity-initialised adapter trains
  (``ramjax.inra``); the run also writes ``adapter.safetensors`` and exports the merged L+1-layer model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ramjax import api, files, inra
from ramjax import data as data_lib
from ramjax import loss as loss_lib
from ramjax import model as model_lib
from ramjax import sharding as shd
from ramjax import tokenizer as tok_lib
from ramjax.config import TrainConfig

log = logging.getLogger(__name__)

Rules = tuple
Forward = Callable[[Any, Any, Mapping[str, jax.Array]], jax.Array]
"""``(trained params, frozen, {tokens, positions, segment_ids}) -> logits [B, T, V]``."""


class TrainConfigError(ValueError):
    """The training set-up is inconsistent (optimizer, schedule, batch vs mesh, stage options)."""


@dataclasses.dataclass
class Setup:
    """What a stage's ``prepare`` may read: the run, its data and the train state at the start of the loop."""

    cfg: TrainConfig
    model_cfg: model_lib.ModelConfig
    mesh: Mesh
    rules: Rules
    data: Any               # the training examples (``data.TokenizedData``)
    run_dir: str
    primary: bool           # process 0 (writes files)
    step: int               # the state's step (0 for a fresh run)
    params: Any             # the state's trained params
    key: jax.Array          # the key the initial params were drawn from (models built from scratch)
    vocab_limit: int | None
    frozen: dict[str, Any]  # the stage's loaded frozen models (``prepare`` may drop those the step no longer needs)


@dataclasses.dataclass
class Stage:
    """One stage as the trainer sees it.

    objective:       the loss (``ramjax.loss.Objective``).
    forward:         the trained model's logits (``Forward``).
    vocab_limit:     softmax over ids ``< vocab_limit`` (None: every embedding row).
    frozen:          frozen params by name (TrRa teachers, InRa base) as loaded; None on a dry run.
    frozen_abstract: ``ShapeDtypeStruct`` s (with shardings) of the step's ``frozen`` argument, by name.
    trained_shapes:  shapes of the trained pytree when it is not the model (the InRa adapter), else None.
    trained_shardings: its shardings (None: the model's).
    initial:         the initial trained params (None: the trainer's — the loaded or freshly drawn model).
    prepare:         ``Setup -> (frozen tables by name, host batch transform or None)``, run once before the loop.
    export:          ``(trained params, run_dir, primary) -> (ModelConfig, params)`` of the run's model.
    watch:           called with each logged metrics dict (warnings about the run).
    """

    objective: loss_lib.Objective
    forward: Forward
    vocab_limit: int | None
    frozen: dict[str, Any] | None
    frozen_abstract: dict[str, Any]
    trained_shapes: Any = None
    trained_shardings: Any = None
    initial: Any = None
    prepare: Callable[[Setup], tuple[dict[str, Any], Callable | None]] | None = None
    export: Callable[[Any, str, bool], tuple[model_lib.ModelConfig, Any]] | None = None
    watch: Callable[[Mapping[str, float]], None] | None = None


def model_forward(cfg: model_lib.ModelConfig, mesh: Mesh | None = None, rules: Rules = shd.DEFAULT_RULES
                  ) -> Forward:
    """The plain model as a ``Forward`` (``frozen`` unused). Its ``head_split(params, frozen)`` cuts it at the LM
    head (``loss.HeadSplit``) when ``cfg.loss_chunk_size > 0``, else gives None."""

    def forward(params, frozen, lm):
        return model_lib.forward(cfg, params, lm["tokens"], lm["positions"], lm["segment_ids"], mesh=mesh,
                                 rules=rules)[0]

    def head_split(params, frozen):
        if not cfg.loss_chunk_size:
            return None
        return _head_split(cfg, params, mesh, rules, cfg.loss_chunk_size)

    forward.head_split = head_split
    return forward


def _head_split(cfg: model_lib.ModelConfig, params: Any, mesh: Mesh | None, rules: Rules,
                chunk: int = 0) -> loss_lib.HeadSplit:
    return loss_lib.HeadSplit(
        hidden=lambda lm: model_lib.hidden_states(cfg, params, lm["tokens"], lm["positions"], lm["segment_ids"],
                                                  mesh=mesh, rules=rules),
        head=lambda h: model_lib.logits_from_hidden(cfg, params, h, mesh=mesh, rules=rules), chunk=chunk)


def _abstract_params(cfg: model_lib.ModelConfig, mesh: Mesh, rules: Rules) -> Any:
    sh = model_lib.param_shardings(cfg, mesh, rules)
    return jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                                  model_lib.param_shapes(cfg), sh)


# ------------------------------------------------------------------------------------------------------------
# Checks that need the stage, before anything is loaded


def check(cfg: TrainConfig, tokenizer: Any, model_cfg: model_lib.ModelConfig) -> None:
    """Stage-specific consistency checks (data layout, vocabularies) that the config alone cannot make."""
    if cfg.stage == "trra" and cfg.trra.teacher_topk and cfg.data.packing:
        raise TrainConfigError("trra.teacher_topk > 0 stores the teacher per example and looks it up by the row's "
                               "example; set data.packing=false")
    if cfg.stage == "dpo" and cfg.data.packing:
        raise TrainConfigError("stage=dpo needs one example per row (its loss pairs each example's chosen and "
                               "rejected log-probs with precomputed reference log-probs); set data.packing=false")
    if cfg.stage == "ram":
        if cfg.proposal:
            if not tok_lib.has_tokenizer(cfg.proposal) and not os.path.isfile(cfg.proposal):
                raise TrainConfigError(f"proposal={cfg.proposal!r} has no tokenizer files to check the aligner's "
                                       f"vocabulary against")
            prop_tok = tok_lib.load_tokenizer(cfg.proposal)
            # a proposal directory without a model config (a tokenizer alone) is checked by its tokenizer only
            rows = api.read_config(cfg.proposal)[0].vocab_size if api.model_format(cfg.proposal) else None
            tok_lib.check_vocab_compatible(prop_tok, tokenizer, proposal_rows=rows,
                                           aligner_rows=model_cfg.vocab_size)
        else:
            log.warning("stage=ram without proposal=PATH: the aligner's vocabulary is not checked against the "
                        "proposal's; set proposal to the proposal model directory")
    if cfg.stage == "trra":
        for name, path in (("reference", cfg.trra.reference), ("aligned", cfg.trra.aligned)):
            if not os.path.isdir(path):
                raise TrainConfigError(f"trra.{name}={path!r} is not a model directory")
            rows = api.read_config(path)[0].vocab_size
            if rows < tokenizer.vocab_size:
                raise tok_lib.VocabMismatchError(
                    f"trra.{name}={path!r} has {rows} embedding rows but the tokenizer has {tokenizer.vocab_size} "
                    f"ids; TrRa needs the student, reference and aligned models to share one vocabulary")


def sampler_configs(cfg: TrainConfig) -> dict[str, model_lib.ModelConfig]:
    """The models a stage samples from before training, by name, for memory planning: ``stage=ram`` with a
    ``proposal`` model directory draws the one-time P_M samples (computing in the run's dtype)."""
    if cfg.stage == "ram" and cfg.proposal and api.model_format(cfg.proposal):
        m = cfg.model
        return {"proposal": api.read_config(cfg.proposal)[0].replace(
            dtype=m.dtype, param_dtype=m.dtype, remat=False, attention_impl=m.attention_impl,
            attention_chunk=m.attention_chunk)}
    return {}


# ------------------------------------------------------------------------------------------------------------
# Building the stage


def trra_teacher_configs(cfg: TrainConfig) -> tuple[model_lib.ModelConfig, model_lib.ModelConfig]:
    """The TrRa reference and aligned models' configs, computing in the run's dtype without remat."""
    over = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=False,
                attention_impl=cfg.model.attention_impl, attention_chunk=cfg.model.attention_chunk)
    return tuple(api.read_config(path)[0].replace(**over) for path in (cfg.trra.reference, cfg.trra.aligned))


def _load(path: str, cfg: TrainConfig, mesh: Mesh, rules: Rules) -> Any:
    return api.load_model(path, mesh=mesh, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                          rules=rules).params


def _trra_teacher_logits(ref_cfg: model_lib.ModelConfig, al_cfg: model_lib.ModelConfig, mesh: Mesh | None,
                         rules: Rules) -> loss_lib.TeacherLogitsFn:
    ref_fwd, al_fwd = model_forward(ref_cfg, mesh, rules), model_forward(al_cfg, mesh, rules)

    def teacher(lm, frozen):
        return ref_fwd(frozen["trra_reference"], None, lm), al_fwd(frozen["trra_aligned"], None, lm)

    def head_split(frozen):  # both teachers cut at their heads (used when the student's loss is chunked)
        ref = _head_split(ref_cfg, frozen["trra_reference"], mesh, rules)
        al = _head_split(al_cfg, frozen["trra_aligned"], mesh, rules)
        return loss_lib.HeadSplit(hidden=lambda lm: (ref.hidden(lm), al.hidden(lm)),
                                  head=lambda hs: (ref.head(hs[0]), al.head(hs[1])))

    teacher.head_split = head_split
    return teacher


def build_stage(cfg: TrainConfig, model_cfg: model_lib.ModelConfig, tokenizer: Any, mesh: Mesh, rules: Rules, *,
                num_examples: int, params: Any = None, load: bool = True, resuming: bool = False) -> Stage:
    """The ``Stage`` of ``cfg`` for a model of ``model_cfg`` on ``mesh``.

    num_examples: training examples (the size of per-example tables); params: the loaded ``model.init`` params
    (or None); load: load the frozen models (False: a dry run, shapes only); resuming: a checkpoint will provide
    the trained params (no initial adapter is built).
    """
    vocab_limit = tokenizer.vocab_size if tokenizer.vocab_size < model_cfg.vocab_size else None
    frozen: dict[str, Any] = {}
    frozen_abstract: dict[str, Any] = {}
    prepare = None
    trained_cfg = model_cfg.replace(num_layers=model_cfg.num_layers + 1) if cfg.inra.enabled else model_cfg

    if cfg.stage in ("sft", "pretrain"):
        objective = loss_lib.lm_objective(cfg.stage, vocab_limit=vocab_limit)
    elif cfg.stage == "ram":
        objective = loss_lib.ram_objective(cfg.ram.alpha, vocab_limit=vocab_limit)
    elif cfg.stage == "dpo":
        objective = loss_lib.dpo_objective(cfg.dpo.beta, cfg.dpo.label_smoothing, rpo_alpha=cfg.dpo.rpo_alpha,
                                           vocab_limit=vocab_limit)
        frozen_abstract["ref_logps"] = jax.ShapeDtypeStruct((num_examples, 2), jnp.float32,
                                                            sharding=shd.replicated(mesh))
        prepare = _dpo_prepare
    elif cfg.stage == "trra":
        vocab_limit = tokenizer.vocab_size  # the teachers may pad their embeddings differently from the student
        ref_cfg, al_cfg = trra_teacher_configs(cfg)
        topk = cfg.trra.teacher_topk
        objective = loss_lib.trra_objective(
            cfg.trra.lam, direction=cfg.trra.direction, temperature=cfg.trra.temperature, vocab_limit=vocab_limit,
            teacher_logits=None if topk else _trra_teacher_logits(ref_cfg, al_cfg, mesh, rules), topk=topk)
        for name, path, fcfg in (("trra_reference", cfg.trra.reference, ref_cfg),
                                 ("trra_aligned", cfg.trra.aligned, al_cfg)):
            if load:
                frozen[name] = _load(path, cfg, mesh, rules)
            if not topk:  # a precomputed teacher replaces the teacher models in the step
                frozen_abstract[name] = _abstract_params(fcfg, mesh, rules)
        if topk:
            prepare = _trra_topk_prepare(ref_cfg, al_cfg)
    else:
        raise TrainConfigError(f"stage={cfg.stage!r} is not implemented by the trainer")

    stage = Stage(objective=objective, forward=model_forward(trained_cfg, mesh, rules), vocab_limit=vocab_limit,
                  frozen=frozen if load else None, frozen_abstract=frozen_abstract, prepare=prepare,
                  export=lambda p, run_dir, primary: (model_cfg, p))
    if cfg.stage == "ram":
        stage.watch = _alpha_watch(cfg.ram.alpha)
    if cfg.inra.enabled:
        _add_inra(stage, cfg, model_cfg, trained_cfg, mesh, rules, params, load, resuming)
    return stage


def _add_inra(stage: Stage, cfg: TrainConfig, model_cfg: model_lib.ModelConfig,
              trained_cfg: model_lib.ModelConfig, mesh: Mesh, rules: Rules, params: Any, load: bool,
              resuming: bool) -> None:
    """Makes ``stage`` train an InRa adapter below the frozen base ``model.init`` (``frozen["inra_base"]``)."""
    inner = model_forward(trained_cfg, mesh, rules)

    def forward(adapter, frozen, lm):
        _, merged = inra.merge_adapter(model_cfg, jax.lax.stop_gradient(frozen["inra_base"]), adapter)
        return inner(merged, frozen, lm)

    stage.objective = dataclasses.replace(stage.objective, name=stage.objective.name + "+inra")
    stage.forward = forward
    stage.frozen_abstract["inra_base"] = _abstract_params(model_cfg, mesh, rules)
    stage.trained_shapes = inra.adapter_shapes(model_cfg)
    stage.trained_shardings = inra.adapter_shardings(model_cfg, mesh, rules)
    if load:
        stage.frozen["inra_base"] = params if params is not None else _load(cfg.model.init, cfg, mesh, rules)
        if not resuming:
            if cfg.inra.adapter_init:
                stage.initial = jax.device_put(inra.load_adapter(cfg.inra.adapter_init, model_cfg),
                                               stage.trained_shardings)
            else:  # a fresh identity copy of layer 0
                stage.initial = jax.jit(lambda p: inra.build_adapter(model_cfg, p),
                                        out_shardings=stage.trained_shardings)(stage.frozen["inra_base"])

    def export(adapter, run_dir, primary):
        """Writes the adapter alone; the run's model is the adapted L+1-layer model."""
        host = multihost_utils.process_allgather(adapter) if jax.process_count() > 1 else adapter
        if primary:
            inra.save_adapter(os.path.join(run_dir, "adapter.safetensors"), host, model_cfg)
        return inra.merge_adapter(model_cfg, stage.frozen["inra_base"], adapter)

    stage.export = export
    if stage.prepare is _dpo_prepare:  # the DPO reference is the base model (the identity adapter's model)
        stage.prepare = lambda s: _dpo_prepare(s, base=stage.frozen["inra_base"])


def _alpha_watch(alpha: float) -> Callable[[Mapping[str, float]], None]:
    warned = [0]

    def watch(m):
        warned[0] = warn_alpha(m, alpha, warned[0])

    return watch


def warn_alpha(m: Mapping[str, float], alpha: float, warned: int) -> int:
    """Logs a warning when the α term dominates the RAM objective (then every 10th time it still does)."""
    nll, neg = m.get("train/nll_data"), m.get("train/logq_neg")
    if nll is None or neg is None:
        return warned
    if abs(alpha * neg) > abs(nll):
        if warned % 10 == 0:
            log.warning("ram: the alpha term dominates the loss (|alpha * logq_neg| = %.4g > nll_data = %.4g): the "
                        "objective is unbounded below in log Q(y_neg|x), so training may push the negatives' "
                        "likelihood down without limit; lower ram.alpha (the paper uses 1e-4)", abs(alpha * neg), nll)
        return warned + 1
    return warned


# ------------------------------------------------------------------------------------------------------------
# Tables computed once before training


def per_example_pass(fn: Callable, args: tuple, data: Any, keys: tuple[str, ...], batch_size: int, mesh: Mesh,
                     rules: Rules, out: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """One ordered pass over ``data`` in padding mode (one example per row): ``fn(*args, batch)`` returns a tuple of
    per-row arrays, written into ``out``'s tables (in that order) at each row's ``example_index``. Each process
    computes its rows; the results come back replicated. Raises if an example was never seen."""
    it = data_lib.BatchIterator(data, batch_size, shuffle=False, packing=False, drop_remainder=False, num_epochs=1)
    b_sh = {k: shd.batch_sharding(mesh, 1 if k == "example_index" else 2, rules) for k in keys}
    arg_sh = tuple(jax.tree_util.tree_map(lambda x: x.sharding, a) for a in args)
    jitted = jax.jit(lambda *a: (fn(*a[:-1], a[-1]), a[-1]["example_index"]), in_shardings=(*arg_sh, b_sh),
                     out_shardings=shd.replicated(mesh))
    seen = np.zeros(len(data), bool)
    for batch in it:
        vals, idx = jitted(*args, shd.to_global({k: batch[k] for k in keys}, b_sh))
        idx = np.asarray(idx)
        ok = idx >= 0
        for table, v in zip(out.values(), vals):
            table[idx[ok]] = np.asarray(v)[ok]
        seen[idx[ok]] = True
    if not seen.all():
        raise RuntimeError(f"{what} missing for {int((~seen).sum())} examples")
    return out


def precompute_reference(model_cfg: model_lib.ModelConfig, params: Any, data: Any, batch_size: int, mesh: Mesh,
                         rules: Rules = shd.DEFAULT_RULES, vocab_limit: int | None = None) -> np.ndarray:
    """Summed response log-probs ``[N, 2]`` (chosen, rejected) of every example of ``data`` (a pair
    ``TokenizedData``) under ``params``: the DPO reference, so the reference model need not stay in memory."""
    fwd = model_forward(model_cfg, mesh, rules)

    def fn(params, b):
        lp_c, lp_r = loss_lib.pair_logprobs(lambda lm: fwd(params, None, lm), b, vocab_limit)
        return (jnp.stack([lp_c, lp_r], axis=1),)

    out = {"ref_logps": np.zeros((len(data), 2), np.float32)}
    return per_example_pass(fn, (params,), data, loss_lib.PAIR_KEYS + ("example_index",), batch_size, mesh, rules,
                            out, "reference log-probs")["ref_logps"]


def precompute_trra_teacher(ref_cfg: model_lib.ModelConfig, ref_params: Any, aligned_cfg: model_lib.ModelConfig,
                            aligned_params: Any, lam: float, k: int, data: Any, batch_size: int, mesh: Mesh, *,
                            temperature: float = 1.0, rules: Rules = shd.DEFAULT_RULES,
                            vocab_limit: int | None = None) -> dict[str, np.ndarray]:
    """The TrRa teacher of every example of ``data`` (one example per row) compressed to its top ``k`` tokens per
    position (``loss.trra_topk_teacher``): host arrays ``trra_top_indices`` int32 and ``trra_top_logprobs``
    float32 ``[N, max_len, k]``, ``trra_rest_logprob`` float32 ``[N, max_len]``."""
    vocab = vocab_limit or min(ref_cfg.vocab_size, aligned_cfg.vocab_size)
    teacher = _trra_teacher_logits(ref_cfg, aligned_cfg, mesh, rules)

    def fn(ref_p, al_p, b):
        h_ref, h_al = teacher(loss_lib.lm_inputs(b), {"trra_reference": ref_p, "trra_aligned": al_p})
        t = loss_lib.trra_topk_teacher(h_ref[..., :vocab], h_al[..., :vocab], lam, k, temperature)
        return t.indices, t.logprobs, t.rest_logprob

    n, T = len(data), data.max_len
    out = {"trra_top_indices": np.zeros((n, T, k), np.int32), "trra_top_logprobs": np.zeros((n, T, k), np.float32),
           "trra_rest_logprob": np.zeros((n, T), np.float32)}
    return per_example_pass(fn, (ref_params, aligned_params), data, loss_lib.LM_KEYS + ("example_index",),
                            batch_size, mesh, rules, out, "TrRa teacher")


def _micro_batch(cfg: TrainConfig) -> int:
    return cfg.data.batch_size // cfg.optimizer.grad_accum


def _dpo_prepare(s: Setup, base: Any = None) -> tuple[dict[str, Any], None]:
    """DPO reference log-probs ``[N, 2]``: from ``run_dir/ref_logps.npy`` when resuming, else computed from the
    initial weights (the state's params at step 0, before any update; InRa: the base model) and saved."""
    path = os.path.join(s.run_dir, "ref_logps.npy")
    n = len(s.data)
    table = None
    if os.path.isfile(path):
        table = np.load(path)
        if table.shape != (n, 2):
            log.warning("%s has shape %s, expected %s: recomputing", path, table.shape, (n, 2))
            table = None
    if table is None:
        if base is not None:
            params = base
        elif s.step == 0:
            params = s.params
        elif s.cfg.model.from_scratch:  # resumed without the saved table: recompute from the initial weights
            params = model_lib.init_params_sharded(s.model_cfg, s.key, s.mesh, s.rules)
        else:
            params = _load(s.cfg.model.init, s.cfg, s.mesh, s.rules)
        table = precompute_reference(s.model_cfg, params, s.data, _micro_batch(s.cfg), s.mesh, s.rules,
                                     s.vocab_limit)
        if s.primary:
            with files.atomic_writer(path, binary=True) as fh:
                np.save(fh, table)
        log.info("dpo: reference log-probs of %d examples computed once (the reference model is not kept)", n)
    return {"ref_logps": jax.device_put(table, shd.replicated(s.mesh))}, None


def _trra_topk_prepare(ref_cfg: model_lib.ModelConfig, al_cfg: model_lib.ModelConfig
                       ) -> Callable[[Setup], tuple[dict[str, Any], Callable]]:
    def prepare(s: Setup) -> tuple[dict[str, Any], Callable]:
        """The precomputed TrRa teacher: from ``run_dir/trra_teacher.npz`` when resuming, else computed from the
        frozen teacher models and saved. The teacher models leave the devices; each host batch gets its rows."""
        c = s.cfg
        k, n, T = c.trra.teacher_topk, len(s.data), s.data.max_len
        path = os.path.join(s.run_dir, "trra_teacher.npz")
        table = None
        if os.path.isfile(path):
            with np.load(path) as z:
                table = {key: z[key] for key in loss_lib.TOPK_KEYS if key in z.files}
            if len(table) != 3 or table["trra_top_indices"].shape != (n, T, k):
                log.warning("%s does not hold a top-%d teacher for %d x %d positions: recomputing", path, k, n, T)
                table = None
        if table is None:
            table = precompute_trra_teacher(ref_cfg, s.frozen["trra_reference"], al_cfg, s.frozen["trra_aligned"],
                                            c.trra.lam, k, s.data, _micro_batch(c), s.mesh,
                                            temperature=c.trra.temperature, rules=s.rules, vocab_limit=s.vocab_limit)
            if s.primary:
                with files.atomic_writer(path, binary=True) as fh:
                    np.savez(fh, **table)
            log.info("trra: top-%d teacher of %d examples computed once (the teacher models are not kept)", k, n)
        for name in ("trra_reference", "trra_aligned"):  # off the devices before the first step
            s.frozen.pop(name, None)
        return {}, lambda batch: with_teacher(batch, table)

    return prepare


def with_teacher(batch: dict[str, np.ndarray], teacher: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds each row's precomputed teacher (looked up by ``example_index``; empty rows get zeros, masked anyway)."""
    idx = batch["example_index"]
    ok = idx >= 0
    out = dict(batch)
    for key, table in teacher.items():
        rows = table[np.maximum(idx, 0)]
        rows[~ok] = 0
        out[key] = rows
    return out


# ------------------------------------------------------------------------------------------------------------
# Iterated TrRa: several trainer runs


def driver(cfg: TrainConfig) -> Callable | None:
    """A function running ``cfg`` as several trainer runs, ``(cfg, train_once, finished) -> result`` (see
    ``iterated_trra``), or None for one run."""
    if cfg.stage == "trra" and cfg.trra.iterations > 1:
        return iterated_trra
    return None


def iterated_trra(cfg: TrainConfig, train_once: Callable[[TrainConfig], Any],
                  finished: Callable[[str, dict], Any]) -> Any:
    """Iterated TrRa: round r (1-based) trains in ``run_dir/round_r`` a student from ``model.init`` against the
    teacher whose aligned model is round r−1's student (round 1: ``trra.aligned``). A finished round (its
    ``meta.json`` says so) is skipped on restart. Returns the last round's ``train_once`` result, or
    ``finished(model_dir, metrics)`` of the last round when every round had finished before;
    ``run_dir/rounds.json`` lists every round's model directory and final metrics."""
    aligned = cfg.trra.aligned
    rounds = []
    result = None
    for r in range(1, cfg.trra.iterations + 1):
        rdir = os.path.join(cfg.run_dir, f"round_{r}")
        meta_path = os.path.join(rdir, "meta.json")
        done = None
        if os.path.isfile(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("interrupted") is False and os.path.isdir(os.path.join(rdir, "model")):
                done = meta
        if done is not None:
            log.info("trra round %d already finished in %s", r, rdir)
            model_dir, metrics = os.path.join(rdir, "model"), done.get("last_metrics", {})
        else:
            rcfg = dataclasses.replace(cfg, run_dir=rdir, trra=dataclasses.replace(cfg.trra, aligned=aligned,
                                                                                    iterations=1))
            result = train_once(rcfg)
            if result.interrupted:
                return result
            model_dir, metrics = result.model_dir, result.metrics
        rounds.append({"round": r, "aligned": aligned, "model_dir": model_dir, "metrics": metrics})
        aligned = model_dir
    if jax.process_index() == 0:
        files.epath_of(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(os.path.join(cfg.run_dir, "rounds.json"), {"rounds": rounds}, default=str)
    return result if result is not None else finished(rounds[-1]["model_dir"], rounds[-1]["metrics"])
