"""The trainer: train state, optimizers and schedules, the jitted train step, and the training loop.

    cfg = config.load_config(config.TrainConfig, "configs/ram.yaml", ["ram.alpha=1e-3"])
    result = train_lib.train(cfg)          # or train_lib.dry_run(cfg): validate, build shapes, compile, write nothing

One step = one optimizer update on one *global* batch ``[B, T]``. Inside the jitted step the batch is split into
``grad_accum`` micro-batches that a ``lax.scan`` walks through, summing gradients. Every objective (``loss.py``)
yields sums; their normalisers (token or example counts, data only) are computed over the whole global batch
first, so each micro-batch contributes ``sum / global_count`` and the accumulated gradient is exactly the gradient
of the full-batch mean, whatever ``grad_accum`` or the mesh.

Frozen inputs (e.g. the DPO reference log-probs, precomputed once before training so the reference model is not
kept in memory) enter the step as a separate ``frozen`` argument outside ``value_and_grad``; optimizer state
exists only for the trained parameters.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ramjax import files
from ramjax import loss as loss_lib
from ramjax import model as model_lib
from ramjax import realign
from ramjax import sharding as shd

log = logging.getLogger(__name__)

Batch = Mapping[str, Any]
STAGES = ("pretrain", "sft", "ram", "dpo", "trra")
OPTIMIZERS = ("adamw", "rmsprop", "sgd")
DECAYS = ("constant", "linear", "cosine")


class TrainConfigError(ValueError):
    """The training set-up is inconsistent (optimizer, schedule, batch vs mesh, stage options)."""


# ------------------------------------------------------------------------------------------------------------
# Train state


@flax.struct.dataclass
class TrainState:
    """Everything a step updates, as one pytree (donated to the step, saved in checkpoints).

    step:      int32 scalar, number of optimizer updates done.
    params:    the trained parameters.
    opt_state: the optax state of ``params`` only.
    rng:       raw ``uint32`` key data (``jax.random.key_data``), split once per step; raw so that orbax and
               shardings treat it as a plain array.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def init_state(params: Any, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """A fresh ``TrainState`` at step 0 (pure; jit it with ``state_shardings`` as out_shardings)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(key))


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(opt_state_shapes: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optax state: every sub-tree shaped like the params (moments, traces) takes the params'
    shardings; every other leaf (counters, scalars) is replicated."""
    pdef = jax.tree_util.tree_structure(params_shardings)
    is_params_like = lambda x: jax.tree_util.tree_structure(x) == pdef  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(opt_state_shapes, is_leaf=is_params_like)
    out = [params_shardings if is_params_like(x) else _replicated(mesh) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


def state_shardings(state_shapes: TrainState, params_shardings: Any, mesh: Mesh) -> TrainState:
    """``TrainState`` of shardings for a ``TrainState`` of shapes."""
    return TrainState(step=_replicated(mesh), params=params_shardings,
                      opt_state=opt_state_shardings(state_shapes.opt_state, params_shardings, mesh),
                      rng=_replicated(mesh))


# ------------------------------------------------------------------------------------------------------------
# Optimizers and schedules


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "constant",
                  end_lr_ratio: float = 0.0) -> optax.Schedule:
    """Linear warm-up from ``lr/warmup_steps`` to ``lr`` over ``warmup_steps`` updates, then ``decay``:

    * ``constant``: stays at ``lr``;
    * ``linear``:   straight to ``end_lr_ratio·lr`` at ``total_steps``;
    * ``cosine``:   half cosine to ``end_lr_ratio·lr`` at ``total_steps``.
    The schedule is evaluated at the update count ``n = 0, 1, ...``; warm-up uses ``(n+1)/warmup_steps`` so the
    first update is not wasted at lr 0.
    """
    if decay not in DECAYS:
        raise TrainConfigError(f"schedule decay={decay!r}; expected one of {DECAYS}")
    if lr < 0 or warmup_steps < 0 or total_steps < 1:
        raise TrainConfigError(f"schedule needs lr >= 0, warmup_steps >= 0, total_steps >= 1 "
                               f"(got lr={lr}, warmup_steps={warmup_steps}, total_steps={total_steps})")
    end = lr * end_lr_ratio
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(count):
        n = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum((n + 1.0) / max(warmup_steps, 1), 1.0) if warmup_steps > 0 else 1.0
        frac = jnp.clip((n - warmup_steps) / decay_steps, 0.0, 1.0)
        if decay == "constant":
            after = lr
        elif decay == "linear":
            after = lr + (end - lr) * frac
        else:
            after = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(n < warmup_steps, lr * warm, after)

    return schedule


def make_optimizer(name: str, schedule: optax.Schedule, *, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, rmsprop_decay: float = 0.99, momentum: float = 0.0,
                   clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """optax optimizer with global-norm clipping first.

    * ``adamw``:   decoupled weight decay (``optax.adamw``).
    * ``rmsprop``: PyTorch's ``torch.optim.RMSprop`` rule, which the RAM paper used: ``v = ρ v + (1−ρ) g²``,
                   update ``g / (√v + eps)`` (eps outside the root), ρ = ``rmsprop_decay`` (torch's 0.99);
                   weight decay is L2 added to the gradient as in torch; optional momentum.
    * ``sgd``:     optional momentum; L2 weight decay as in torch.
    ``clip_norm`` None or <= 0 disables clipping.
    """
    if name not in OPTIMIZERS:
        raise TrainConfigError(f"optimizer {name!r}; expected one of {OPTIMIZERS}")
    parts = []
    if clip_norm is not None and clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if name == "adamw":
        parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    else:
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay))
        if name == "rmsprop":
            parts.append(optax.rmsprop(schedule, decay=rmsprop_decay, eps=eps, eps_in_sqrt=False,
                                       momentum=momentum or None))
        else:
            parts.append(optax.sgd(schedule, momentum=momentum or None))
    return optax.chain(*parts)


# ------------------------------------------------------------------------------------------------------------
# Objectives


@dataclasses.dataclass(frozen=True)
class Objective:
    """One training objective.

    normalizers(batch) -> dict of float32 scalars computed from the *global* batch (data only: token / example
        counts); passed to every micro-batch.
    loss(params, micro_batch, norms, frozen, key) -> (loss, metrics): the micro-batch's contribution, already
        divided by the global normalisers, so contributions add up to the global-batch loss; ``metrics`` values
        add up the same way.
    batch_keys: the batch entries the step reads (the others are dropped before sharding).
    """

    name: str
    normalizers: Callable[[Batch], dict[str, jax.Array]]
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    batch_keys: tuple[str, ...]
    tokens_key: str = "loss_mask"


_LM_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _fwd(cfg: model_lib.ModelConfig, params, b: Batch, prefix: str, mesh, rules):
    logits, _ = model_lib.forward(cfg, params, b[prefix + "tokens"], b[prefix + "positions"],
                                  b[prefix + "segment_ids"], mesh=mesh, rules=rules)
    return logits


def lm_objective(cfg: model_lib.ModelConfig, *, name: str = "sft", mesh: Mesh | None = None,
                 rules=shd.DEFAULT_RULES, vocab_limit: int | None = None) -> Objective:
    """Token-mean NLL over masked tokens (``sft``: response tokens; ``pretrain``: every real token)."""

    def normalizers(b):
        return {"tokens": jnp.sum((b["loss_mask"] > 0) & (b["segment_ids"] > 0)).astype(jnp.float32)}

    def loss(params, b, norms, frozen, key):
        logits = _fwd(cfg, params, b, "", mesh, rules)
        s, _ = loss_lib.sft_loss(logits, b["targets"], b["loss_mask"], b["segment_ids"], vocab_limit)
        l = s / jnp.maximum(norms["tokens"], 1.0)
        return l, {"loss": l}

    return Objective(name, normalizers, loss, _LM_KEYS)


def ram_objective(cfg: model_lib.ModelConfig, alpha: float, *, mesh: Mesh | None = None, rules=shd.DEFAULT_RULES,
                  vocab_limit: int | None = None) -> Objective:
    """The RAM aligner loss (``loss.ram_sums``/``loss.ram_loss``) on ``chosen_*`` (data) and ``rejected_*``
    (negative: the proposal's sample or the dataset's rejected response) batch entries."""
    alpha = loss_lib.validate_alpha(alpha)

    def normalizers(b):
        return {"examples": loss_lib.count_examples(b["chosen_loss_mask"], b["chosen_segment_ids"])}

    def loss(params, b, norms, frozen, key):
        # One forward over data and negative rows together (bigger matmuls) when their shapes agree.
        if b["chosen_tokens"].shape == b["rejected_tokens"].shape:
            both = {k: jnp.concatenate([b["chosen_" + k], b["rejected_" + k]], axis=0) for k in _LM_KEYS}
            logits = _fwd(cfg, params, both, "", mesh, rules)
            n = b["chosen_tokens"].shape[0]
            lg_d, lg_n = logits[:n], logits[n:]
        else:
            lg_d = _fwd(cfg, params, b, "chosen_", mesh, rules)
            lg_n = _fwd(cfg, params, b, "rejected_", mesh, rules)
        sums = loss_lib.ram_sums(lg_d, b["chosen_targets"], b["chosen_loss_mask"], b["chosen_segment_ids"],
                                 lg_n, b["rejected_targets"], b["rejected_loss_mask"], b["rejected_segment_ids"],
                                 vocab_limit)
        out = loss_lib.ram_loss(sums, norms["examples"], alpha)
        return out["loss"], out

    keys = tuple("chosen_" + k for k in _LM_KEYS) + tuple("rejected_" + k for k in _LM_KEYS)
    return Objective("ram", normalizers, loss, keys, tokens_key="chosen_loss_mask")


def dpo_objective(cfg: model_lib.ModelConfig, beta: float, label_smoothing: float = 0.0, *,
                  rpo_alpha: float = 0.0, mesh: Mesh | None = None, rules=shd.DEFAULT_RULES,
                  vocab_limit: int | None = None) -> Objective:
    """Sigmoid DPO with one example per row. ``frozen["ref_logps"]`` is a ``[N, 2]`` table of the reference
    model's summed (chosen, rejected) log-probs for every training example (``precompute_reference``); the batch
    carries ``example_index`` ``[B]`` (−1 on padding rows) to look them up.

    rpo_alpha > 0 adds ``rpo_alpha ·`` the token-mean NLL of the chosen responses over the global batch (TRL's
    ``rpo_alpha``), reported as ``nll``."""
    loss_lib.validate_dpo(beta, label_smoothing)
    if not rpo_alpha >= 0:
        raise loss_lib.LossConfigError(f"dpo.rpo_alpha={rpo_alpha!r} must be >= 0 (0 = plain DPO, RPO uses 1)")

    def normalizers(b):
        valid = (b["example_index"] >= 0)[:, None]
        chosen = (b["chosen_loss_mask"] > 0) & (b["chosen_segment_ids"] > 0) & valid
        return {"examples": jnp.sum(b["example_index"] >= 0).astype(jnp.float32),
                "chosen_tokens": jnp.sum(chosen).astype(jnp.float32)}

    def loss(params, b, norms, frozen, key):
        n = b["chosen_tokens"].shape[0]
        both = {k: jnp.concatenate([b["chosen_" + k], b["rejected_" + k]], axis=0) for k in _LM_KEYS}
        logits = _fwd(cfg, params, both, "", mesh, rules)
        lp = loss_lib.sequence_logprobs(logits, both["targets"], both["loss_mask"], both["segment_ids"],
                                        vocab_limit=vocab_limit)
        idx = b["example_index"]
        valid = idx >= 0
        ref = jax.lax.stop_gradient(frozen["ref_logps"][jnp.maximum(idx, 0)])
        s, _, m = loss_lib.dpo_loss(lp[:n], lp[n:], ref[:, 0], ref[:, 1], beta, label_smoothing, valid)
        denom = jnp.maximum(norms["examples"], 1.0)
        l = s / denom
        metrics = {k: v / denom for k, v in m.items()}
        metrics["dpo_loss"] = l
        if rpo_alpha:
            nll = -jnp.sum(jnp.where(valid, lp[:n], 0.0)) / jnp.maximum(norms["chosen_tokens"], 1.0)
            metrics["nll"] = nll
            l = l + rpo_alpha * nll
        metrics["loss"] = l
        return l, metrics

    keys = tuple("chosen_" + k for k in _LM_KEYS) + tuple("rejected_" + k for k in _LM_KEYS) + ("example_index",)
    return Objective("dpo", normalizers, loss, keys, tokens_key="chosen_loss_mask")


TOPK_KEYS = ("trra_top_indices", "trra_top_logprobs", "trra_rest_logprob")


def trra_objective(cfg: model_lib.ModelConfig, ref_cfg: model_lib.ModelConfig, aligned_cfg: model_lib.ModelConfig,
                   lam: float, *, direction: str = "forward", temperature: float = 1.0, mesh: Mesh | None = None,
                   rules=shd.DEFAULT_RULES, vocab_limit: int | None = None, topk: int = 0) -> Objective:
    """TrRa (``realign.trra_loss``): the student matches softmax((λ·h_aligned + (1−λ)·h_ref)/T) on response
    tokens, a token mean over the global batch. The two teachers' params arrive in ``frozen["trra_reference"]`` and
    ``frozen["trra_aligned"]`` (not differentiated; held under stop_gradient too); their logits are computed per
    micro-batch, so the full teacher never exists for the whole batch at once.

    topk > 0: the teacher comes precomputed with the batch instead (``precompute_trra_teacher``), as
    ``trra_top_indices`` / ``trra_top_logprobs`` ``[B, T, k]`` and ``trra_rest_logprob`` ``[B, T]``, and the loss
    is the KL between the (k+1)-outcome coarsenings; no teacher model runs in the step."""
    vocab = vocab_limit or min(cfg.vocab_size, ref_cfg.vocab_size, aligned_cfg.vocab_size)

    def normalizers(b):
        return {"tokens": jnp.sum((b["loss_mask"] > 0) & (b["segment_ids"] > 0)).astype(jnp.float32)}

    def loss(params, b, norms, frozen, key):
        logits = _fwd(cfg, params, b, "", mesh, rules)
        if topk:
            teacher = realign.TopKTeacher(indices=b["trra_top_indices"], logprobs=b["trra_top_logprobs"],
                                          rest_logprob=b["trra_rest_logprob"])
        else:
            h_ref = _fwd(ref_cfg, jax.lax.stop_gradient(frozen["trra_reference"]), b, "", mesh, rules)
            h_al = _fwd(aligned_cfg, jax.lax.stop_gradient(frozen["trra_aligned"]), b, "", mesh, rules)
            teacher = (h_ref[..., :vocab], h_al[..., :vocab], lam)
        kl, _, m = realign.trra_loss(logits, teacher, b["loss_mask"], targets=b["targets"],
                                     segment_ids=b["segment_ids"], direction=direction, temperature=temperature,
                                     vocab_limit=vocab)
        denom = jnp.maximum(norms["tokens"], 1.0)
        metrics = {k: v / denom for k, v in m.items()}
        metrics["loss"] = kl / denom
        return kl / denom, metrics

    return Objective("trra", normalizers, loss, _LM_KEYS + (TOPK_KEYS if topk else ()))


def precompute_trra_teacher(ref_cfg: model_lib.ModelConfig, ref_params: Any, aligned_cfg: model_lib.ModelConfig,
                            aligned_params: Any, lam: float, k: int, data: Any, batch_size: int, mesh: Mesh, *,
                            temperature: float = 1.0, rules=shd.DEFAULT_RULES, vocab_limit: int | None = None
                            ) -> dict[str, np.ndarray]:
    """The TrRa teacher of every example of ``data`` (a ``TokenizedData``, one example per row) compressed to its
    top ``k`` tokens per position (``realign.trra_topk_teacher``): host arrays ``trra_top_indices`` int32 and
    ``trra_top_logprobs`` float32 ``[N, max_len, k]``, ``trra_rest_logprob`` float32 ``[N, max_len]``.

    One ordered pass in padding mode; each process computes its rows, the results are replicated to every process.
    """
    vocab = vocab_limit or min(ref_cfg.vocab_size, aligned_cfg.vocab_size)

    def fn(ref_p, al_p, b):
        h_ref = _fwd(ref_cfg, ref_p, b, "", mesh, rules)[..., :vocab]
        h_al = _fwd(aligned_cfg, al_p, b, "", mesh, rules)[..., :vocab]
        t = realign.trra_topk_teacher(h_ref, h_al, lam, k, temperature)
        return t.indices, t.logprobs, t.rest_logprob

    n, T = len(data), data.max_len
    out = {"trra_top_indices": np.zeros((n, T, k), np.int32), "trra_top_logprobs": np.zeros((n, T, k), np.float32),
           "trra_rest_logprob": np.zeros((n, T), np.float32)}
    return _per_example_pass(fn, (ref_params, aligned_params), data, _LM_KEYS + ("example_index",), batch_size,
                             mesh, rules, out, "TrRa teacher")


def inra_objective(inner: Objective, base_cfg: model_lib.ModelConfig) -> Objective:
    """Trains only an InRa adapter: ``inner`` (built for the L+1-layer model) sees the adapter inserted below layer
    0 of the frozen base params ``frozen["inra_base"]``; the trained pytree (and so the optimizer state) is the
    adapter alone."""

    def loss(adapter, b, norms, frozen, key):
        _, merged = realign.merge_adapter(base_cfg, jax.lax.stop_gradient(frozen["inra_base"]), adapter)
        return inner.loss(merged, b, norms, frozen, key)

    return dataclasses.replace(inner, name=inner.name + "+inra", loss=loss)


# ------------------------------------------------------------------------------------------------------------
# The train step


def split_micro(x: jax.Array, k: int, mesh: Mesh | None, rules=shd.DEFAULT_RULES) -> jax.Array:
    """``[B, ...] -> [k, B/k, ...]`` with micro-batch ``j`` = rows ``j, j+k, j+2k, ...``.

    The strided split keeps each micro-batch spread over every data shard, so no rows move between devices
    (a contiguous split would put a whole micro-batch on a few devices).
    """
    B = x.shape[0]
    y = x.reshape((B // k, k) + x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
        spec = shd.logical_to_pspec((None, "act_batch") + (None,) * (x.ndim - 1), rules)
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
    return y


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation, *, grad_accum: int = 1,
                    schedule: optax.Schedule | None = None, mesh: Mesh | None = None,
                    rules=shd.DEFAULT_RULES) -> Callable:
    """The pure train step ``(state, batch, frozen) -> (state, metrics)``; jit it with ``jit_train_step``.

    metrics: float32 scalars — the objective's metrics (global-batch means), ``grad_norm`` (before clipping),
    ``lr`` (the rate used for this update), ``tokens`` (loss tokens in the batch) and ``input_tokens`` (non-padding
    tokens fed to the model).
    """
    if grad_accum < 1:
        raise TrainConfigError(f"grad_accum={grad_accum} must be >= 1")

    def step(state: TrainState, batch: Batch, frozen: Any):
        batch = {k: batch[k] for k in objective.batch_keys}
        norms = objective.normalizers(batch)
        key, step_key = jax.random.split(state.key)
        grad_fn = jax.value_and_grad(objective.loss, has_aux=True)

        if grad_accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch, norms, frozen, step_key)
        else:
            micro = {k: split_micro(v, grad_accum, mesh, rules) for k, v in batch.items()}
            zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            m_shapes = jax.eval_shape(lambda: grad_fn(state.params, jax.tree_util.tree_map(lambda v: v[0], micro),
                                                      norms, frozen, step_key)[0][1])
            zeros_m = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), m_shapes)

            def body(carry, xs):
                g_acc, m_acc = carry
                mb, i = xs
                (_, m), g = grad_fn(state.params, mb, norms, frozen, jax.random.fold_in(step_key, i))
                return (jax.tree_util.tree_map(jnp.add, g_acc, g), jax.tree_util.tree_map(jnp.add, m_acc, m)), None

            (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), (micro, jnp.arange(grad_accum)))

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["tokens"] = jnp.sum(batch[objective.tokens_key] > 0).astype(jnp.float32)
        metrics["input_tokens"] = sum(jnp.sum(v > 0) for k, v in batch.items()
                                      if k.endswith("segment_ids")).astype(jnp.float32)
        if schedule is not None:  # optax evaluates the schedule at its update count, which equals state.step
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(key))
        return new, metrics

    return step


def jit_train_step(step_fn: Callable, state_sh: TrainState, batch_sh: Mapping[str, Any], frozen_sh: Any,
                   mesh: Mesh, donate: bool = True) -> Callable:
    """``jax.jit`` with explicit shardings: state by its shardings (donated), batch by ``batch_sharding``,
    metrics replicated."""
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, frozen_sh),
                   out_shardings=(state_sh, _replicated(mesh)), donate_argnums=(0,) if donate else ())


def batch_shardings(batch_like: Mapping[str, Any], mesh: Mesh, rules=shd.DEFAULT_RULES) -> dict[str, Any]:
    """Sharding of each batch entry: batch dimension over ``(data, fsdp)``."""
    return {k: shd.batch_sharding(mesh, np.ndim(v) if not hasattr(v, "ndim") else v.ndim, rules)
            for k, v in batch_like.items()}


def memory_report(compiled) -> dict[str, int]:
    """Bytes from ``compiled.memory_analysis()`` (arguments, outputs, temporaries, aliased, code); {} if absent."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if ma is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f: int(getattr(ma, f, 0) or 0) for f in fields}
    # Donated arguments alias their outputs, so the peak is roughly args + outputs + temps − aliases.
    out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                  + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
    return out


# ------------------------------------------------------------------------------------------------------------
# DPO reference log-probs (computed once, before training)


def _per_example_pass(fn: Callable, args: tuple, data: Any, keys: tuple[str, ...], batch_size: int, mesh: Mesh,
                      rules, out: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """One ordered pass over ``data`` in padding mode (one example per row): ``fn(*args, batch)`` returns a tuple of
    per-row arrays, written into ``out``'s tables (in that order) at each row's ``example_index``. Each process
    computes its rows; the results come back replicated. Raises if an example was never seen."""
    from ramjax import data as data_lib

    it = data_lib.BatchIterator(data, batch_size, shuffle=False, packing=False, drop_remainder=False, num_epochs=1)
    b_sh = {k: shd.batch_sharding(mesh, 1 if k == "example_index" else 2, rules) for k in keys}
    arg_sh = tuple(jax.tree_util.tree_map(lambda x: x.sharding, a) for a in args)
    jitted = jax.jit(lambda *a: (fn(*a[:-1], a[-1]), a[-1]["example_index"]), in_shardings=(*arg_sh, b_sh),
                     out_shardings=_replicated(mesh))
    seen = np.zeros(len(data), bool)
    for batch in it:
        vals, idx = jitted(*args, to_global({k: batch[k] for k in keys}, b_sh))
        idx = np.asarray(idx)
        ok = idx >= 0
        for table, v in zip(out.values(), vals):
            table[idx[ok]] = np.asarray(v)[ok]
        seen[idx[ok]] = True
    if not seen.all():
        raise RuntimeError(f"{what} missing for {int((~seen).sum())} examples")
    return out


def precompute_reference(model_cfg: model_lib.ModelConfig, params: Any, data: Any, batch_size: int, mesh: Mesh,
                         rules=shd.DEFAULT_RULES, vocab_limit: int | None = None) -> np.ndarray:
    """Summed response log-probs ``[N, 2]`` (chosen, rejected) of every example of ``data`` (a pair
    ``TokenizedData``) under ``params``: the DPO reference, so the reference model need not stay in memory.

    One ordered pass in padding mode; each process reads its rows, the results are replicated to every process.
    """
    keys = tuple("chosen_" + k for k in _LM_KEYS) + tuple("rejected_" + k for k in _LM_KEYS) + ("example_index",)

    def fn(params, b):
        n = b["chosen_tokens"].shape[0]
        both = {k: jnp.concatenate([b["chosen_" + k], b["rejected_" + k]], axis=0) for k in _LM_KEYS}
        logits = _fwd(model_cfg, params, both, "", mesh, rules)
        lp = loss_lib.sequence_logprobs(logits, both["targets"], both["loss_mask"], both["segment_ids"],
                                        vocab_limit=vocab_limit)
        return (jnp.stack([lp[:n], lp[n:]], axis=1),)

    out = {"ref_logps": np.zeros((len(data), 2), np.float32)}
    return _per_example_pass(fn, (params,), data, keys, batch_size, mesh, rules, out,
                             "reference log-probs")["ref_logps"]


def to_global(batch: Mapping[str, np.ndarray], shardings: Mapping[str, Any]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays on ``shardings`` (one code path for one and many processes)."""
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(batch[k])) for k, sh in shardings.items()}


# ------------------------------------------------------------------------------------------------------------
# The training loop


@dataclasses.dataclass
class Plan:
    """Everything ``train`` needs, built and validated before anything is written (see ``build``)."""

    cfg: Any
    model_cfg: model_lib.ModelConfig
    tokenizer: Any
    iterator: Any
    mesh: Mesh
    rules: tuple
    param_shardings: Any
    objective: Objective
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    total_steps: int
    warmup_steps: int
    resume_step: int | None
    params: Any = None             # loaded initial params (model.init is a checkpoint), or None
    source_is_hf: bool = False
    vocab_limit: int | None = None
    trained_shapes: Any = None     # shapes of the trained pytree when it is not the model (the InRa adapter)
    frozen_abstract: Any = None    # {name: abstract params with shardings} of frozen models (TrRa teachers, InRa base)
    frozen: Any = None             # the loaded frozen params (same names), or None (dry run)
    inra: bool = False


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


def initialize_distributed(dist: Any) -> None:
    """``jax.distributed.initialize`` when ``dist.enabled`` (a ``DistributedConfig``); no-op otherwise or if done."""
    if not getattr(dist, "enabled", False) or jax.distributed.is_initialized():
        return
    log.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s)",
             dist.coordinator_address, dist.num_processes, dist.process_id)
    jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id)


def _peek_model_config(path: str) -> tuple[model_lib.ModelConfig, bool]:
    """``(ModelConfig, is_hf)`` of a ramjax or Hugging Face model directory, without loading its weights."""
    import os

    from ramjax import checkpoint as ckpt_lib

    if ckpt_lib.is_model_dir(path):
        return ckpt_lib.read_model_config(path), False
    from ramjax import hf

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise TrainConfigError(f"model.init={path!r} is neither a ramjax model directory ({ckpt_lib.MODEL_JSON}) "
                               f"nor a Hugging Face directory (config.json + safetensors), nor 'scratch'")
    return hf.config_from_hf(hf.read_hf_config(path)), True


def _embedding_rows(path: str) -> int | None:
    """Embedding rows of a model directory (ramjax or HF ``config.json``), for the vocabulary check."""
    import json
    import os

    from ramjax import checkpoint as ckpt_lib

    if ckpt_lib.is_model_dir(path):
        return ckpt_lib.read_model_config(path).vocab_size
    cj = os.path.join(path, "config.json")
    if os.path.isfile(cj):
        with open(cj) as f:
            c = json.load(f)
        return c.get("vocab_size") or c.get("text_config", {}).get("vocab_size")
    return None


def _check_batch(cfg: Any, mesh: Mesh, rules) -> None:
    B, k = cfg.data.batch_size, cfg.optimizer.grad_accum
    div = shd.batch_divisor(mesh, rules)
    if (B // k) % div:
        raise TrainConfigError(
            f"data.batch_size={B} / optimizer.grad_accum={k} = {B // k} rows per micro-batch is not divisible by "
            f"the {div} batch shards of mesh {dict(mesh.shape)}; make batch_size a multiple of {div * k}")
    if B % jax.process_count():
        raise TrainConfigError(f"data.batch_size={B} must be a multiple of the process count {jax.process_count()}")


def _total_steps(cfg: Any, iterator: Any) -> int:
    if cfg.steps > 0:
        return int(cfg.steps)
    return max(1, int(math.ceil(cfg.epochs * iterator.batches_per_epoch(0))))


def _trra_teacher_configs(cfg: Any) -> tuple[model_lib.ModelConfig, model_lib.ModelConfig]:
    """The TrRa reference and aligned models' configs, computing in the run's dtype without remat."""
    over = dict(dtype=cfg.model.dtype, remat=False, attention_impl=cfg.model.attention_impl,
                attention_chunk=cfg.model.attention_chunk)
    return tuple(_peek_model_config(path)[0].replace(**over) for path in (cfg.trra.reference, cfg.trra.aligned))


def build_objective(cfg: Any, model_cfg: model_lib.ModelConfig, mesh: Mesh, rules=shd.DEFAULT_RULES,
                    vocab_limit: int | None = None) -> Objective:
    """The ``Objective`` of ``cfg.stage`` (a ``TrainConfig``); new stages plug in here."""
    if cfg.stage in ("sft", "pretrain"):
        return lm_objective(model_cfg, name=cfg.stage, mesh=mesh, rules=rules, vocab_limit=vocab_limit)
    if cfg.stage == "ram":
        return ram_objective(model_cfg, cfg.ram.alpha, mesh=mesh, rules=rules, vocab_limit=vocab_limit)
    if cfg.stage == "dpo":
        return dpo_objective(model_cfg, cfg.dpo.beta, cfg.dpo.label_smoothing, rpo_alpha=cfg.dpo.rpo_alpha,
                             mesh=mesh, rules=rules, vocab_limit=vocab_limit)
    if cfg.stage == "trra":
        ref_cfg, al_cfg = _trra_teacher_configs(cfg)
        return trra_objective(model_cfg, ref_cfg, al_cfg, cfg.trra.lam,
                              direction=cfg.trra.direction, temperature=cfg.trra.temperature, mesh=mesh,
                              rules=rules, vocab_limit=vocab_limit, topk=cfg.trra.teacher_topk)
    raise TrainConfigError(f"stage={cfg.stage!r} is not implemented by the trainer (supported: {STAGES})")


def build(cfg: Any, *, load_params: bool = True) -> Plan:
    """Validates ``cfg`` (a ``TrainConfig``) and builds everything a run needs — tokenizer, data, mesh, shapes,
    optimizer, objective — *without writing anything*, so bad input leaves no half-written run directory.

    Raises named errors: ``ConfigError``, ``TrainConfigError``, ``LossConfigError`` (α < 0), ``DataError``
    (malformed JSONL), ``VocabMismatchError`` (aligner vs proposal vocabulary), ``ShardingError``,
    ``CheckpointMismatchError`` (the run directory holds a checkpoint of another model shape).
    """
    import os

    from ramjax import checkpoint as ckpt_lib
    from ramjax import config as config_lib
    from ramjax import data as data_lib
    from ramjax import tokenizer as tok_lib

    config_lib.validate_config(cfg)
    if cfg.stage not in STAGES:
        raise TrainConfigError(f"stage={cfg.stage!r} is not implemented by the trainer (supported: {STAGES})")
    if cfg.stage == "ram":
        loss_lib.validate_alpha(cfg.ram.alpha)
    if cfg.stage == "trra" and cfg.trra.teacher_topk and cfg.data.packing:
        raise TrainConfigError("trra.teacher_topk > 0 stores the teacher per example and looks it up by the row's "
                               "example; set data.packing=false")
    if cfg.stage == "dpo":
        loss_lib.validate_dpo(cfg.dpo.beta, cfg.dpo.label_smoothing)
        if cfg.data.packing:
            raise TrainConfigError("stage=dpo needs one example per row (its loss pairs each example's chosen and "
                                   "rejected log-probs with precomputed reference log-probs); set data.packing=false")
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
                attention_impl=cfg.model.attention_impl, attention_chunk=cfg.model.attention_chunk)
    if scratch:
        model_cfg = cfg.model.model_config(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                           eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    else:
        model_cfg, source_is_hf = _peek_model_config(cfg.model.init)
        model_cfg = model_cfg.replace(**over)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise tok_lib.VocabMismatchError(
            f"the model has {model_cfg.vocab_size} embedding rows but the tokenizer {tok_path!r} has "
            f"{tokenizer.vocab_size} ids; use the model's own tokenizer or set model.arch.vocab_size >= "
            f"{tokenizer.vocab_size}")
    if cfg.stage == "ram":
        if cfg.proposal:
            if not tok_lib.has_tokenizer(cfg.proposal) and not os.path.isfile(cfg.proposal):
                raise TrainConfigError(f"proposal={cfg.proposal!r} has no tokenizer files to check the aligner's "
                                       f"vocabulary against")
            prop_tok = tok_lib.load_tokenizer(cfg.proposal)
            tok_lib.check_vocab_compatible(
                prop_tok, tokenizer, proposal_rows=_embedding_rows(cfg.proposal) if os.path.isdir(cfg.proposal)
                else None, aligner_rows=model_cfg.vocab_size)
        else:
            log.warning("stage=ram without proposal=PATH: the aligner's vocabulary is not checked against the "
                        "proposal's; set proposal to the proposal model directory")

    # Mesh, data, schedule.
    mesh = shd.make_mesh(cfg.mesh.mesh_config())
    rules = cfg.mesh.sharding_rules()
    _check_batch(cfg, mesh, rules)
    iterator = data_lib.train_iterator(cfg, tokenizer)
    total = _total_steps(cfg, iterator)
    warmup = cfg.schedule.warmup_steps or int(round(cfg.schedule.warmup_ratio * total))
    schedule = make_schedule(cfg.optimizer.lr, total, warmup, cfg.schedule.decay, cfg.schedule.final_lr_ratio)
    o = cfg.optimizer
    optimizer = make_optimizer(o.name, schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                               rmsprop_decay=o.rms_decay, momentum=o.momentum, clip_norm=o.clip_norm or None)

    # Resume: a checkpoint of another shape is an error now, before anything is written.
    ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
    resume_step = None
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        if not cfg.checkpoint.resume:
            raise TrainConfigError(f"{ckpt_dir} holds checkpoints but checkpoint.resume=false; use a fresh run_dir "
                                   f"or set checkpoint.resume=true")
        mngr = ckpt_lib.CheckpointManager(ckpt_dir)
        resume_step = mngr.latest_step()  # checked below against the model; damaged steps are skipped then
    if load_params and not scratch and resume_step is None:
        from ramjax import api

        m = api.load_model(cfg.model.init, mesh=mesh, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                           rules=rules)
        model_cfg = m.config.replace(**over)
        params = m.params if (load_params and resume_step is None) else None
    p_sh = model_lib.param_shardings(model_cfg, mesh, rules)
    frozen_models = _frozen_models(cfg, model_cfg, tokenizer, mesh, rules)
    frozen = {} if load_params else None
    for name, (path, fcfg) in frozen_models.items():
        if load_params:
            if name == "inra_base" and params is not None:
                frozen[name] = params  # model.init was loaded above: the base of the adapter
            else:
                from ramjax import api

                frozen[name] = api.load_model(path, mesh=mesh, dtype=cfg.model.dtype,
                                              param_dtype=cfg.model.param_dtype, rules=rules).params
    frozen_abstract = {name: _abstract_params(fcfg, mesh, rules) for name, (_, fcfg) in frozen_models.items()}
    trained_shapes = None
    if cfg.inra.enabled:
        trained_shapes = realign.adapter_shapes(model_cfg)
        p_sh = realign.adapter_shardings(model_cfg, mesh, rules)
        params = None
        if load_params and resume_step is None:
            params = _initial_adapter(cfg, model_cfg, frozen["inra_base"], p_sh)
    if resume_step is not None:
        # the newest step whose metadata reads (a damaged newer one is skipped with a warning; ``train`` falls back
        # further if its arrays turn out damaged too)
        resume_step = mngr.newest_readable_step(
            trained_shapes if trained_shapes is not None else model_lib.param_shapes(model_cfg))
    vocab_limit = tokenizer.vocab_size if tokenizer.vocab_size < model_cfg.vocab_size else None
    if cfg.stage == "trra":
        vocab_limit = tokenizer.vocab_size  # the teachers may pad their embeddings differently from the student
    if cfg.inra.enabled:
        inner_cfg = model_cfg.replace(num_layers=model_cfg.num_layers + 1)
        objective = inra_objective(build_objective(cfg, inner_cfg, mesh, rules, vocab_limit), model_cfg)
    else:
        objective = build_objective(cfg, model_cfg, mesh, rules, vocab_limit)
    return Plan(cfg=cfg, model_cfg=model_cfg, tokenizer=tokenizer, iterator=iterator, mesh=mesh, rules=rules,
                param_shardings=p_sh, objective=objective, optimizer=optimizer, schedule=schedule,
                total_steps=total, warmup_steps=warmup, resume_step=resume_step, params=params,
                source_is_hf=source_is_hf, vocab_limit=vocab_limit, trained_shapes=trained_shapes,
                frozen_abstract=frozen_abstract or None, frozen=frozen or None, inra=cfg.inra.enabled)


def _abstract_params(cfg: model_lib.ModelConfig, mesh: Mesh, rules) -> Any:
    sh = model_lib.param_shardings(cfg, mesh, rules)
    return jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                                  model_lib.param_shapes(cfg), sh)


def _frozen_models(cfg: Any, model_cfg: model_lib.ModelConfig, tokenizer: Any, mesh: Mesh, rules
                   ) -> dict[str, tuple[str, model_lib.ModelConfig]]:
    """``{name: (path, config)}`` of the frozen models a run needs: the TrRa reference and aligned models, the
    InRa base (``model.init``). Their vocabularies must cover the tokenizer's."""
    import os

    from ramjax import tokenizer as tok_lib

    out = {}
    if cfg.stage == "trra":
        for name, path in (("trra_reference", cfg.trra.reference), ("trra_aligned", cfg.trra.aligned)):
            if not os.path.isdir(path):
                raise TrainConfigError(f"trra.{name[5:]}={path!r} is not a model directory")
            fcfg, _ = _peek_model_config(path)
            if fcfg.vocab_size < tokenizer.vocab_size:
                raise tok_lib.VocabMismatchError(
                    f"trra.{name[5:]}={path!r} has {fcfg.vocab_size} embedding rows but the tokenizer has "
                    f"{tokenizer.vocab_size} ids; TrRa needs the student, reference and aligned models to share "
                    f"one vocabulary")
            out[name] = (path, fcfg.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=False,
                                            attention_impl=cfg.model.attention_impl,
                                            attention_chunk=cfg.model.attention_chunk))
    if cfg.inra.enabled:
        out["inra_base"] = (cfg.model.init, model_cfg)
    return out


def _initial_adapter(cfg: Any, model_cfg: model_lib.ModelConfig, base: Any, shardings: Any) -> Any:
    """The adapter to start from: ``inra.adapter_init`` if given, else a fresh identity copy of layer 0."""
    if cfg.inra.adapter_init:
        adapter = realign.load_adapter(cfg.inra.adapter_init, model_cfg)
        return jax.device_put(adapter, shardings)
    return jax.jit(lambda p: realign.build_adapter(model_cfg, p), out_shardings=shardings)(base)


def _abstract_batch(plan: Plan) -> tuple[dict, dict]:
    """Global ``ShapeDtypeStruct``s and shardings of one batch (from the iterator's local shapes)."""
    B, T = plan.cfg.data.batch_size, plan.iterator.data.max_len
    shapes, shardings = {}, {}
    topk = plan.cfg.trra.teacher_topk if plan.cfg.stage == "trra" else 0
    for k in plan.objective.batch_keys:
        # the dtypes of ramjax.data batches, and of the precomputed TrRa teacher
        dtype = np.float32 if k.endswith(("loss_mask", "logprobs", "logprob")) else np.int32
        shape = (B,) if k == "example_index" else (B, T, topk) if k in TOPK_KEYS[:2] else (B, T)
        shardings[k] = shd.batch_sharding(plan.mesh, len(shape), plan.rules)
        shapes[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
    return shapes, shardings


def _state_abstract(plan: Plan) -> tuple[TrainState, TrainState]:
    trained = plan.trained_shapes if plan.trained_shapes is not None else model_lib.param_shapes(plan.model_cfg)
    shapes = jax.eval_shape(lambda: init_state(trained, plan.optimizer, jax.random.key(0)))
    sh = state_shardings(shapes, plan.param_shardings, plan.mesh)
    abstract = jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes, sh)
    return abstract, sh


def _frozen_abstract(plan: Plan) -> tuple[Any, Any]:
    abstract, sh = {}, {}
    if plan.cfg.stage == "dpo":
        n = len(plan.iterator.data)
        sh["ref_logps"] = _replicated(plan.mesh)
        abstract["ref_logps"] = jax.ShapeDtypeStruct((n, 2), jnp.float32, sharding=sh["ref_logps"])
    for name, tree in (plan.frozen_abstract or {}).items():  # frozen models: TrRa teachers, InRa base
        if name.startswith("trra_") and _trra_topk(plan):
            continue  # a precomputed teacher replaces the teacher models in the step
        abstract[name] = tree
        sh[name] = jax.tree_util.tree_map(lambda a: a.sharding, tree)
    return (abstract, sh) if abstract else (None, None)


def _trained_count(plan: Plan) -> int:
    return model_lib.count_params(plan.trained_shapes if plan.trained_shapes is not None
                                  else model_lib.param_shapes(plan.model_cfg))


def compile_step(plan: Plan):
    """Lowers and compiles the train step for the plan's shapes; returns ``(compiled, memory report, shardings)``."""
    state_abs, state_sh = _state_abstract(plan)
    batch_abs, batch_sh = _abstract_batch(plan)
    frozen_abs, frozen_sh = _frozen_abstract(plan)
    step = make_train_step(plan.objective, plan.optimizer, grad_accum=plan.cfg.optimizer.grad_accum,
                           schedule=plan.schedule, mesh=plan.mesh, rules=plan.rules)
    jitted = jit_train_step(step, state_sh, batch_sh, frozen_sh, plan.mesh)
    compiled = jitted.lower(state_abs, batch_abs, frozen_abs).compile()
    mem = memory_report(compiled)
    if mem:
        log.info("compiled train step: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB, peak ~%.1f MiB "
                 "per device", mem["argument_size_in_bytes"] / 2**20, mem["output_size_in_bytes"] / 2**20,
                 mem["temp_size_in_bytes"] / 2**20, mem["peak_estimate_bytes"] / 2**20)
    return compiled, mem, (state_sh, batch_sh, frozen_sh)


def dry_run(cfg: Any) -> dict[str, Any]:
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
    the compiled step; for ``stage=ram`` with ``proposal=``, P_M's sampler (parameters, KV cache, prefill) for the
    one-time samples (``data.batch_size`` prompts of ``data.max_prompt_len`` + the rest of ``data.max_len``)."""
    from ramjax import memplan

    state_abs, _ = _state_abstract(plan)
    frozen_abs, _ = _frozen_abstract(plan)
    out = {"mesh": dict(plan.mesh.shape), "devices": int(plan.mesh.size),
           "train": {"params": memplan.tree_bytes_per_device(state_abs.params),
                     "optimizer": memplan.tree_bytes_per_device(state_abs.opt_state),
                     "frozen": memplan.tree_bytes_per_device(frozen_abs) if frozen_abs else 0,
                     "compiled": memplan.compiled_memory(compiled)},
           "samplers": {}}
    cfg = plan.cfg
    if cfg.stage == "ram" and cfg.proposal and _has_model_config(cfg.proposal):
        p_cfg = _peek_model_config(cfg.proposal)[0].replace(
            dtype=cfg.model.dtype, param_dtype=cfg.model.dtype, remat=False,
            attention_impl=cfg.model.attention_impl, attention_chunk=cfg.model.attention_chunk)
        d = cfg.data
        out["samplers"]["proposal"] = memplan.sampler_memory(
            p_cfg, plan.mesh, plan.rules, batch=d.batch_size, prompt_len=d.max_prompt_len,
            max_new=max(1, d.max_len - d.max_prompt_len))
    return out


def _has_model_config(path: str) -> bool:
    import os

    from ramjax import checkpoint as ckpt_lib

    return ckpt_lib.is_model_dir(path) or os.path.isfile(os.path.join(path, "config.json"))


class _StopFlag:
    """SIGTERM/SIGINT set a flag that the loop checks after each step (installed only in the main thread)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        import signal
        import threading

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
        import signal

        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def train(cfg: Any, *, progress: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Runs ``cfg`` (a ``TrainConfig``): builds everything (``build``), then trains in ``cfg.run_dir``.

    Resumes automatically from the latest checkpoint in ``run_dir/checkpoints`` (params, optimizer state, step,
    data iterator state, PRNG). Writes ``config.yaml``, ``meta.json``, ``metrics.jsonl`` and ``tb/`` (process 0),
    checkpoints every ``checkpoint.every`` steps, and at the end the final checkpoint, a ramjax model directory
    ``run_dir/model`` and Hugging Face safetensors in ``run_dir/hf`` (when the model came from HF or with
    ``checkpoint.export_hf``).
    SIGTERM/SIGINT: checkpoint after the current step and return with ``interrupted=True``.

    progress: called after every step with ``{"step", "total_steps"}`` plus, on logging steps, ``"metrics"``.
    """
    import os
    import time
    import zlib

    from ramjax import checkpoint as ckpt_lib
    from ramjax import config as config_lib
    from ramjax import metrics as metrics_lib

    if cfg.stage == "trra" and cfg.trra.iterations > 1:
        return _train_trra_rounds(cfg, progress)
    t_start = time.time()
    plan = build(cfg)
    primary = jax.process_index() == 0
    run_dir = cfg.run_dir
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    compiled, mem, (state_sh, batch_sh, frozen_sh) = compile_step(plan)
    num_params = _trained_count(plan)

    every = cfg.checkpoint.every or (plan.total_steps + 1)
    mngr = ckpt_lib.CheckpointManager(ckpt_dir, save_every=every, keep=cfg.checkpoint.keep)
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
    if primary:
        os.makedirs(run_dir, exist_ok=True)
        config_lib.save_config(cfg, os.path.join(run_dir, "config.yaml"))
    meta = {"jax_version": jax.__version__, "backend": jax.default_backend(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
            "mesh": dict(plan.mesh.shape), "stage": cfg.stage, "num_params": num_params,
            "model": ckpt_lib.config_to_dict(plan.model_cfg), "total_steps": plan.total_steps,
            "warmup_steps": plan.warmup_steps, "data": plan.iterator.stats.as_dict(), "compiled_memory": mem,
            "resumed_from": resumed if plan.resume_step is not None else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if primary:
        files.atomic_write_json(os.path.join(run_dir, "meta.json"), meta, default=str)
    writer = metrics_lib.MetricsWriter(run_dir, enabled=primary, tensorboard=cfg.logging.tensorboard)
    writer.truncate_after(resumed)  # the file reads as one run: no step logged twice

    frozen = dict(plan.frozen or {})
    if cfg.stage == "dpo":
        frozen["ref_logps"] = jax.device_put(_reference_table(plan, state, run_dir, primary, k_params),
                                             frozen_sh["ref_logps"])
    teacher = None
    if _trra_topk(plan):
        teacher = _trra_teacher_table(plan, frozen, run_dir, primary)
        for name in ("trra_reference", "trra_aligned"):  # off the devices before the first step
            frozen.pop(name, None)
        if plan.frozen:
            plan.frozen = {n: v for n, v in plan.frozen.items() if not n.startswith("trra_")}
    frozen = frozen or None

    step = int(jax.device_get(state.step))
    thr = metrics_lib.Throughput()
    pending: list[dict] = []
    last: dict[str, Any] = {}
    warned = 0
    interrupted = False
    with _StopFlag() as stop:
        while step < plan.total_steps:
            local = next(plan.iterator)
            if teacher is not None:
                local = _with_teacher(local, teacher)
            crc = zlib.crc32(np.ascontiguousarray(local[plan.objective.batch_keys[0]]).tobytes())
            state, m = compiled(state, to_global(local, batch_sh), frozen)
            step += 1
            pending.append(m)
            event = {"step": step, "total_steps": plan.total_steps}
            if step % cfg.logging.every == 0 or step == plan.total_steps or stop.signum is not None:
                host = [jax.device_get(x) for x in pending]
                for x in host:
                    thr.add(float(x["input_tokens"]))
                pending = []
                last = {f"train/{k}": float(v) for k, v in host[-1].items() if k not in ("input_tokens",)}
                last.update({f"perf/{k}": v for k, v in thr.update().items()})
                last.update({"data/epoch": plan.iterator.epoch, "data/position": plan.iterator.position,
                             "data/crc32": crc})
                writer.write(step, last)
                event["metrics"] = last
                if cfg.stage == "ram":
                    warned = _warn_alpha(last, cfg.ram.alpha, warned)
            mngr.save(step, state.params, {"step": state.step, "rng": state.rng, "opt_state": state.opt_state},
                      plan.iterator.state())
            if progress is not None:
                progress(event)
            if stop.signum is not None:
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
        out_cfg, out_params = plan.model_cfg, state.params
        if plan.inra:  # the adapter alone, and the adapted L+1-layer model as the run's model
            adapter = state.params
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                adapter = multihost_utils.process_allgather(adapter)
            if primary:
                realign.save_adapter(os.path.join(run_dir, "adapter.safetensors"), adapter, plan.model_cfg)
            out_cfg, out_params = realign.merge_adapter(plan.model_cfg, plan.frozen["inra_base"], state.params)
        ckpt_lib.save_model_dir(model_dir, out_cfg, out_params,
                                tokenizer=tok_src if tok_src and os.path.isdir(tok_src) else plan.tokenizer)
        if plan.source_is_hf or cfg.checkpoint.export_hf:
            hf_dir = _export_hf(os.path.join(run_dir, "hf"), plan, out_params, tok_src, out_cfg)
    meta.update({"final_step": step, "interrupted": interrupted, "elapsed_s": round(time.time() - t_start, 2),
                 "last_metrics": last})
    if primary:
        files.atomic_write_json(os.path.join(run_dir, "meta.json"), meta, default=str)
    return TrainResult(run_dir=run_dir, step=step, total_steps=plan.total_steps, interrupted=interrupted,
                       metrics=last, memory=mem, num_params=num_params, model_dir=model_dir, hf_dir=hf_dir)


def _warn_alpha(m: Mapping[str, float], alpha: float, warned: int) -> int:
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


def _trra_topk(plan: Plan) -> int:
    return plan.cfg.trra.teacher_topk if plan.cfg.stage == "trra" else 0


def _trra_teacher_table(plan: Plan, frozen: dict, run_dir: str, primary: bool) -> dict[str, np.ndarray]:
    """The precomputed TrRa teacher: from ``run_dir/trra_teacher.npz`` when resuming, else computed from the
    frozen teacher models and saved."""
    import os

    k, n, T = _trra_topk(plan), len(plan.iterator.data), plan.iterator.data.max_len
    path = os.path.join(run_dir, "trra_teacher.npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            table = {key: z[key] for key in TOPK_KEYS if key in z.files}
        if len(table) == 3 and table["trra_top_indices"].shape == (n, T, k):
            return table
        log.warning("%s does not hold a top-%d teacher for %d x %d positions: recomputing", path, k, n, T)
    c = plan.cfg
    ref_cfg, al_cfg = _trra_teacher_configs(c)
    mb = c.data.batch_size // c.optimizer.grad_accum
    table = precompute_trra_teacher(ref_cfg, frozen["trra_reference"], al_cfg,
                                    frozen["trra_aligned"], c.trra.lam, k, plan.iterator.data, mb, plan.mesh,
                                    temperature=c.trra.temperature, rules=plan.rules, vocab_limit=plan.vocab_limit)
    if primary:
        with files.atomic_writer(path, binary=True) as fh:
            np.savez(fh, **table)
    log.info("trra: top-%d teacher of %d examples computed once (the teacher models are not kept)", k, n)
    return table


def _with_teacher(batch: dict[str, np.ndarray], teacher: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds each row's precomputed teacher (looked up by ``example_index``; empty rows get zeros, masked anyway)."""
    idx = batch["example_index"]
    ok = idx >= 0
    out = dict(batch)
    for key, table in teacher.items():
        rows = table[np.maximum(idx, 0)]
        rows[~ok] = 0
        out[key] = rows
    return out


def _reference_table(plan: Plan, state: TrainState, run_dir: str, primary: bool, k_params: jax.Array) -> np.ndarray:
    """DPO reference log-probs ``[N, 2]``: from ``run_dir/ref_logps.npy`` when resuming, else computed from the
    initial params (the state's params at step 0, before any update) and saved."""
    import os

    path = os.path.join(run_dir, "ref_logps.npy")
    n = len(plan.iterator.data)
    if os.path.isfile(path):
        table = np.load(path)
        if table.shape == (n, 2):
            return table
        log.warning("%s has shape %s, expected %s: recomputing", path, table.shape, (n, 2))
    if int(jax.device_get(state.step)) == 0:
        # InRa: the reference is the base model (which the identity-initialised adapted model equals at step 0)
        params = plan.frozen["inra_base"] if plan.inra else state.params
    else:  # resumed without the saved table: recompute from the initial weights
        if plan.cfg.model.from_scratch:
            params = model_lib.init_params_sharded(plan.model_cfg, k_params, plan.mesh, plan.rules)
        else:
            from ramjax import api

            params = api.load_model(plan.cfg.model.init, mesh=plan.mesh, dtype=plan.cfg.model.dtype,
                                    param_dtype=plan.cfg.model.param_dtype, rules=plan.rules).params
    mb = plan.cfg.data.batch_size // plan.cfg.optimizer.grad_accum
    table = precompute_reference(plan.model_cfg, params, plan.iterator.data, mb, plan.mesh, plan.rules,
                                 plan.vocab_limit)
    if primary:
        with files.atomic_writer(path, binary=True) as fh:
            np.save(fh, table)
    log.info("dpo: reference log-probs of %d examples computed once (the reference model is not kept)", n)
    return table


def _export_hf(path: str, plan: Plan, params: Any, tok_src: str | None,
               model_cfg: model_lib.ModelConfig | None = None) -> str:
    """Hugging Face safetensors export via ``ramjax.hf.save_hf`` (every process calls it; process 0 writes)."""
    import os

    from ramjax import hf

    hf.save_hf(path, model_cfg or plan.model_cfg, params,
               tokenizer_dir=tok_src if tok_src and os.path.isdir(tok_src) else None)
    return path


def _train_trra_rounds(cfg: Any, progress: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    """Iterated TrRa: round r (1-based) trains in ``run_dir/round_r`` a student from ``model.init`` against the
    teacher whose aligned model is round r−1's student (round 1: ``trra.aligned``). A finished round (its
    ``meta.json`` says so) is skipped on restart. Returns the last round's result; ``run_dir/rounds.json`` lists
    every round's model directory and final metrics."""
    import json
    import os

    aligned = cfg.trra.aligned
    rounds = []
    result = None
    for r in range(1, cfg.trra.iterations + 1):
        rdir = os.path.join(cfg.run_dir, f"round_{r}")
        meta_path = os.path.join(rdir, "meta.json")
        done = None
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("interrupted") is False and os.path.isdir(os.path.join(rdir, "model")):
                done = meta
        if done is not None:
            log.info("trra round %d already finished in %s", r, rdir)
            model_dir, metrics = os.path.join(rdir, "model"), done.get("last_metrics", {})
        else:
            rcfg = dataclasses.replace(cfg, run_dir=rdir, trra=dataclasses.replace(cfg.trra, aligned=aligned,
                                                                                    iterations=1))
            result = train(rcfg, progress=progress)
            if result.interrupted:
                return result
            model_dir, metrics = result.model_dir, result.metrics
        rounds.append({"round": r, "aligned": aligned, "model_dir": model_dir, "metrics": metrics})
        aligned = model_dir
    if jax.process_index() == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        files.atomic_write_json(os.path.join(cfg.run_dir, "rounds.json"), {"rounds": rounds}, default=str)
    if result is None:  # every round had finished before
        last = rounds[-1]
        result = TrainResult(run_dir=os.path.dirname(last["model_dir"]), step=0, total_steps=0, interrupted=False,
                             metrics=last["metrics"], memory={}, num_params=0, model_dir=last["model_dir"])
    return result
