"""The optimizer step of the trainer, as pure functions of pytrees: ``TrainState`` and its shardings, optimizers and
learning-rate schedules, the train step (gradient accumulation by ``lax.scan`` over micro-batches, non-finite
updates dropped on the device) and the held-out evaluation step. ``ramjax.train_lib`` builds a run around them
(data, checkpoints, the loop, metrics) and re-exports them.

One step = one optimizer update on one *global* batch ``[B, T]``. Inside the jitted step the batch is split into
``grad_accum`` micro-batches that a ``lax.scan`` walks through, summing gradients. Every objective (``loss.py``)
yields sums; their normalisers (token or example counts, data only) are computed over the whole global batch
first, so each micro-batch contributes ``sum / global_count`` and the accumulated gradient is exactly the gradient
of the full-batch mean, whatever ``grad_accum`` or the mesh.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from ramjax import loss as loss_lib
from ramjax import sharding as shd
from ramjax import stages
from ramjax.stages import TrainConfigError

__all__ = ["TrainState", "init_state", "opt_state_shardings", "state_shardings", "OPTIMIZERS", "DECAYS",
           "make_schedule", "make_optimizer", "split_micro", "make_train_step", "schedule_count", "jit_train_step",
           "batch_shardings", "memory_report", "make_eval_step"]

Batch = Mapping[str, Any]
OPTIMIZERS = ("adamw", "rmsprop", "sgd")
DECAYS = ("constant", "linear", "cosine")


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


def opt_state_shardings(opt_state_shapes: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optax state: every sub-tree shaped like the params (moments, traces) takes the params'
    shardings; every other leaf (counters, scalars) is replicated."""
    pdef = jax.tree_util.tree_structure(params_shardings)
    is_params_like = lambda x: jax.tree_util.tree_structure(x) == pdef  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(opt_state_shapes, is_leaf=is_params_like)
    out = [params_shardings if is_params_like(x) else shd.replicated(mesh) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


def state_shardings(state_shapes: TrainState, params_shardings: Any, mesh: Mesh) -> TrainState:
    """``TrainState`` of shardings for a ``TrainState`` of shapes."""
    return TrainState(step=shd.replicated(mesh), params=params_shardings,
                      opt_state=opt_state_shardings(state_shapes.opt_state, params_shardings, mesh),
                      rng=shd.replicated(mesh))


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


def make_train_step(objective: loss_lib.Objective, optimizer: optax.GradientTransformation, *,
                    forward: stages.Forward, grad_accum: int = 1, schedule: optax.Schedule | None = None,
                    mesh: Mesh | None = None, rules=shd.DEFAULT_RULES) -> Callable:
    """The pure train step ``(state, batch, frozen) -> (state, metrics)``; jit it with ``jit_train_step``.

    objective: the loss (``ramjax.loss``); forward: the trained model's logits as a function of ``(state.params,
    frozen, LM inputs)`` (``stages.model_forward`` for a plain model).

    metrics: float32 scalars — the objective's metrics (global-batch means), ``grad_norm`` (before clipping),
    ``lr`` (the rate used for this update), ``tokens`` (loss tokens in the batch) and ``input_tokens`` (non-padding
    tokens fed to the model).
    """
    if grad_accum < 1:
        raise TrainConfigError(f"grad_accum={grad_accum} must be >= 1")

    def step(state: TrainState, batch: Batch, frozen: Any):
        batch = {k: batch[k] for k in objective.batch_keys}
        norms = objective.normalizers(batch)
        key, _ = jax.random.split(state.key)  # the state's key advances every step (for objectives that draw)

        split = getattr(forward, "head_split", None)  # model.loss_chunk_size > 0: the head runs over blocks

        def loss_fn(params, mb):
            logits_fn = loss_lib.SplitLogits(lambda lm: forward(params, frozen, lm),
                                             split(params, frozen) if split is not None else None)
            return objective.loss(logits_fn, mb, norms, frozen)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch)
        else:
            micro = {k: split_micro(v, grad_accum, mesh, rules) for k, v in batch.items()}
            zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            m_shapes = jax.eval_shape(lambda: grad_fn(state.params,
                                                      jax.tree_util.tree_map(lambda v: v[0], micro))[0][1])
            zeros_m = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), m_shapes)

            def body(carry, mb):
                g_acc, m_acc = carry
                (_, m), g = grad_fn(state.params, mb)
                return (jax.tree_util.tree_map(jnp.add, g_acc, g), jax.tree_util.tree_map(jnp.add, m_acc, m)), None

            (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), micro)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        # A NaN/inf loss or gradient drops the whole update here, on the device: the state keeps the previous
        # parameters and optimizer state, so a non-finite value can never reach a checkpoint or an export. The
        # flag goes back with the metrics; the loop decides whether to stop or skip (optimizer.nonfinite).
        finite = jnp.isfinite(metrics["grad_norm"])
        if "loss" in metrics:
            finite = finite & jnp.isfinite(metrics["loss"])
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree_util.tree_map(keep, params, state.params)
        opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
        metrics["nonfinite"] = (~finite).astype(jnp.float32)
        metrics["tokens"] = jnp.sum(batch[objective.tokens_key] > 0).astype(jnp.float32)
        metrics["input_tokens"] = sum(jnp.sum(v > 0) for k, v in batch.items()
                                      if k.endswith("segment_ids")).astype(jnp.float32)
        if schedule is not None:  # the rate of this update: optax's schedule at its own count of applied updates
            metrics["lr"] = jnp.asarray(schedule(schedule_count(state.opt_state, state.step)), jnp.float32)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(key))
        return new, metrics

    return step


def schedule_count(opt_state: Any, default: jax.Array) -> jax.Array:
    """The update count at which optax evaluates the learning-rate schedule (``ScaleByScheduleState.count``).

    It counts applied updates only: a step dropped as non-finite (``optimizer.nonfinite=skip``) keeps the old
    optimizer state, so the count (and the rate of the next update) stays behind ``TrainState.step``.
    ``default`` when the optimizer has no schedule state."""
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)):
        if isinstance(s, optax.ScaleByScheduleState):
            return s.count
    return default


def jit_train_step(step_fn: Callable, state_sh: TrainState, batch_sh: Mapping[str, Any], frozen_sh: Any,
                   mesh: Mesh, donate: bool = True) -> Callable:
    """``jax.jit`` with explicit shardings: state by its shardings (donated), batch by ``batch_sharding``,
    metrics replicated."""
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, frozen_sh),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=(0,) if donate else ())


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


def make_eval_step(objective: loss_lib.Objective, forward: stages.Forward) -> Callable:
    """The pure held-out pass over one batch ``(params, batch, norms, frozen) -> metrics``: the objective's loss
    and metrics at ``params`` (no gradient), with ``norms`` the normalizers of the *whole* held-out set, so the
    values of all its batches add up to the objective over the set (as micro-batches add up in the train step),
    plus ``tokens``, the loss tokens in the batch."""

    def fn(params: Any, batch: Batch, norms: dict[str, jax.Array], frozen: Any) -> dict[str, jax.Array]:
        batch = {k: batch[k] for k in objective.batch_keys}
        loss, metrics = objective.loss(lambda lm: forward(params, frozen, lm), batch, norms, frozen)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["tokens"] = jnp.sum(batch[objective.tokens_key] > 0).astype(jnp.float32)
        return metrics

    return fn
