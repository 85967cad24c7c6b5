"""Several processes (TPU-pod workers, one process per GPU host or per GPU): starting JAX's distributed runtime and
the few host-level collectives ramjax needs outside jitted code.

``initialize(cfg)`` starts ``jax.distributed`` when ``cfg.enabled`` is true, or — the default, ``enabled: null`` —
when the environment says this is one of several processes:

* ``distributed.coordinator_address`` / ``num_processes`` set in the config, or the environment variables
  ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``);
* SLURM (``srun``: ``SLURM_JOB_ID`` and ``SLURM_NTASKS`` > 1), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1);
* a multi-host Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` lists several workers, or ``MEGASCALE_COORDINATOR_ADDRESS``),
  where ``jax.distributed.initialize()`` finds the coordinator itself.

It must run before anything touches a device (``train.py`` and ``sample.py`` call it first).

Host-level collectives (all processes must call them in the same order): ``any_process`` (one bool per process →
their OR; the cross-host preemption flag), ``broadcast_int`` (process 0's value), ``allgather_objects`` (one
picklable object per process → the list in process order). With one process they are the identity.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

__all__ = ["DistributedError", "detect", "initialize", "is_multiprocess", "any_process", "broadcast_int",
           "allgather_objects", "local_share"]


class DistributedError(ValueError):
    """The distributed settings are incomplete or contradict the environment."""


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    v = env.get(name)
    if v is None or not v.strip():
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"environment variable {name}={v!r} is not an integer") from None


def _cluster(env: Mapping[str, str]) -> str | None:
    """A cluster manager JAX detects by itself (SLURM, Open MPI, multi-host Cloud TPU), or None."""
    if env.get("SLURM_JOB_ID") and (_int_env(env, "SLURM_NTASKS") or _int_env(env, "SLURM_NPROCS") or 1) > 1:
        return f"SLURM job {env['SLURM_JOB_ID']} with {env.get('SLURM_NTASKS') or env.get('SLURM_NPROCS')} tasks"
    if (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return f"Open MPI with {env['OMPI_COMM_WORLD_SIZE']} ranks"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU slice with {len(hosts)} workers"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "multi-slice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
    return None


def detect(env: Mapping[str, str] | None = None) -> str | None:
    """Why this process looks like one of several (a short reason), or None for a single-process run."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    return _cluster(env)


def initialize_args(cfg: Any, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments for ``jax.distributed.initialize`` (plus ``reason``), or None when this run is
    single-process.

    cfg: a ``DistributedConfig`` (``enabled`` True/False/None = auto, ``coordinator_address``, ``num_processes``,
    ``process_id``); explicit settings win over the environment (``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); what neither gives is left to JAX's cluster detection (SLURM, Open
    MPI, Cloud TPU). A coordinator without the process count and id outside such a cluster is a
    ``DistributedError`` (JAX would wait at the barrier forever).
    """
    env = os.environ if env is None else env
    enabled = getattr(cfg, "enabled", None)
    if enabled is False:
        return None
    explicit = any(getattr(cfg, k, None) is not None for k in ("coordinator_address", "num_processes"))
    reason = "distributed.enabled=true" if enabled else ("distributed.* set in the config" if explicit
                                                        else detect(env))
    if reason is None:
        return None

    def pick(name: str, var: str, as_int: bool):
        v = getattr(cfg, name, None)
        if v is not None:
            return v
        return _int_env(env, var) if as_int else (env.get(var) or None)

    kw = {"coordinator_address": pick("coordinator_address", "JAX_COORDINATOR_ADDRESS", False),
          "num_processes": pick("num_processes", "JAX_NUM_PROCESSES", True),
          "process_id": pick("process_id", "JAX_PROCESS_ID", True)}
    if kw["coordinator_address"] and None in (kw["num_processes"], kw["process_id"]) and _cluster(env) is None:
        raise DistributedError(
            f"the coordinator address {kw['coordinator_address']!r} is given but not the number of processes and "
            f"this process's id, and no cluster manager (SLURM, Open MPI, Cloud TPU) is there to tell JAX: set "
            f"distributed.num_processes and distributed.process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID) on "
            f"every process")
    kw["reason"] = reason
    return kw


def initialize(cfg: Any, env: Mapping[str, str] | None = None) -> bool:
    """Starts ``jax.distributed`` if this run is multi-process (see the module doc); returns whether it did.

    A no-op when the runtime is already up. Raises ``DistributedError`` for half-given settings.
    """
    if jax.distributed.is_initialized():
        return False
    kw = initialize_args(cfg, env)
    if kw is None:
        return False
    reason = kw.pop("reason")
    log.info("jax.distributed.initialize(%s) because %s", ", ".join(f"{k}={v}" for k, v in kw.items()
                                                                   if v is not None), reason)
    jax.distributed.initialize(**{k: v for k, v in kw.items() if v is not None})
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def _gather(x: np.ndarray) -> np.ndarray:
    """``[process_count, *x.shape]``: every process's ``x`` (same shape and dtype on all), in process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def any_process(flag: bool) -> bool:
    """True on every process iff ``flag`` is true on at least one (a tiny all-gather; call it on all processes)."""
    if not is_multiprocess():
        return bool(flag)
    return bool(np.any(_gather(np.asarray([int(bool(flag))], np.int32))))


def broadcast_int(value: int) -> int:
    """Process 0's ``value`` on every process."""
    if not is_multiprocess():
        return int(value)
    return int(_gather(np.asarray([int(value)], np.int64))[0, 0])


def allgather_objects(obj: Any) -> list[Any]:
    """``[obj of process 0, obj of process 1, ...]`` on every process (pickled; for small host-side results)."""
    if not is_multiprocess():
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = _gather(np.asarray([data.size], np.int64))[:, 0]
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    allbufs = _gather(buf)
    return [pickle.loads(allbufs[i, :int(n)].tobytes()) for i, n in enumerate(sizes)]


def local_share(items: Sequence[Any], start: int, batch_size: int) -> tuple[int, Sequence[Any]]:
    """This process's batch of a round of ``process_count`` batches starting at ``items[start]``: process ``p``
    takes ``items[start + p·batch_size : start + (p+1)·batch_size]``. Returns ``(its first index, the batch)``;
    the batch is empty when the round has fewer batches than processes. Rounds advance by
    ``process_count · batch_size``, so every batch holds the same examples as in a one-process run with the same
    ``batch_size`` (same padding, same compiled shapes, same tokens)."""
    first = start + jax.process_index() * batch_size
    return first, items[first:first + batch_size]
