"""The trainer: train state, optimizers and schedules, the jitted train step, and the training loop.

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

from ramjax import loss as loss_lib
from ramjax import model as model_lib
from ramjax import sharding as shd

log = logging.getLogger(__name__)

Batch = Mapping[str, Any]
STAGES = ("pretrain", "sft", "ram", "dpo")
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
                  mesh: Mesh | None = None, rules=shd.DEFAULT_RULES, vocab_limit: int | None = None) -> Objective:
    """Sigmoid DPO with one example per row. ``frozen["ref_logps"]`` is a ``[N, 2]`` table of the reference
    model's summed (chosen, rejected) log-probs for every training example (``precompute_reference``); the batch
    carries ``example_index`` ``[B]`` (−1 on padding rows) to look them up."""
    loss_lib.validate_dpo(beta, label_smoothing)

    def normalizers(b):
        return {"examples": jnp.sum(b["example_index"] >= 0).astype(jnp.float32)}

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
        metrics["loss"] = l
        return l, metrics

    keys = tuple("chosen_" + k for k in _LM_KEYS) + tuple("rejected_" + k for k in _LM_KEYS) + ("example_index",)
    return Objective("dpo", normalizers, loss, keys, tokens_key="chosen_loss_mask")


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
    ``lr`` (the rate used for this update) and ``tokens`` (loss tokens in the batch).
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
