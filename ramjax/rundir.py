"""Run-directory ownership: one run per directory at a time, and a directory holds one experiment.

* ``check_writable(path, key)``: the directory can be created and written (not a file, not under a file, not on a
  virtual or read-only file system, not forbidden), checked *before* a run writes anything, with a named error.
* ``RunDirLock``: an exclusive ``flock`` on ``<run_dir>/.lock`` held for the whole run; a second run on the same
  directory fails at once with ``RunDirBusyError`` naming the holder's pid, host and command. The lock belongs to
  the open file, so a killed run (even ``kill -9``) releases it.
* ``check_fingerprint``: ``<run_dir>/fingerprint.json`` records the settings that define the result (the config
  without its bookkeeping keys, plus the sizes and content hashes of the data files). Resuming with other settings
  is refused with ``RunDirMismatchError`` naming each differing key and the two ways out: a new ``run_dir``, or
  ``--force-restart``, which moves the old run aside to ``<run_dir>.replaced-<UTC time>`` (nothing is deleted)
  and starts over.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping

from ramjax import files

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
FINGERPRINT_FILE = "fingerprint.json"

# Keys of a TrainConfig that do not change what a run computes (where it writes, how often it logs or saves, how
# the work is laid out on devices and in memory), so a run may resume with other values (e.g. remat or more
# micro-batches after running out of memory); every other key is part of the fingerprint.
TRAIN_BOOKKEEPING = ("run_dir", "checkpoint", "logging", "mesh", "distributed", "model.remat",
                     "model.attention_impl", "model.attention_chunk", "optimizer.grad_accum")


class RunDirError(ValueError):
    """The run directory cannot be used: not creatable/writable, busy, or holding another experiment."""


class RunDirBusyError(RunDirError):
    """Another live process holds the run directory's lock."""


class RunDirMismatchError(RunDirError):
    """The run directory holds a run made with other settings."""


def check_writable(path: str | os.PathLike, key: str = "run_dir") -> None:
    """Raises ``RunDirError`` unless ``path`` is (or can be created as) a writable directory. Writes nothing that
    stays: the probe file in the nearest existing directory is removed at once."""
    path = os.path.abspath(os.fspath(path))
    real = os.path.realpath(path)
    for virtual in ("/proc", "/sys", "/dev"):
        if real == virtual or real.startswith(virtual + os.sep):
            raise RunDirError(f"{key}={path!r} is on the virtual file system {virtual}; choose a directory on a "
                              f"disk, e.g. {key}=runs/<name>")
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"is under {existing!r}, which is a file"
        raise RunDirError(f"{key}={path!r} {what}, not a directory; choose another {key} (or move the file away)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ramjax-write-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device"}.get(
            e.errno, e.strerror or str(e))
        raise RunDirError(f"{key}={path!r} cannot be written ({existing!r}: {why}); choose a writable directory, "
                          f"or fix its permissions") from None


class RunDirLock:
    """An exclusive lock on ``<run_dir>/.lock`` (``fcntl.flock``, non-blocking), held until ``release``.

    ``acquire`` raises ``RunDirBusyError`` naming the holder (pid, host, command, start time) when another open
    file description holds it, whether in another process or in this one.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        import fcntl

        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusyError(
                f"run_dir={self.run_dir!r} is in use by another run ({holder}); wait for it to finish, stop it, or "
                f"use another run_dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        info = {}
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('since')}: {info.get('command')!r}"


def train_fingerprint(cfg: Any) -> dict[str, Any]:
    """The settings of a ``TrainConfig`` that define its result: every key but ``TRAIN_BOOKKEEPING``, plus the
    byte size and content hash of each local training file (so the same path holding other data is noticed)."""
    from ramjax import config as config_lib

    d = config_lib.config_to_dict(cfg)
    for k in TRAIN_BOOKKEEPING:
        *parents, last = k.split(".")
        node = d
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    d = json.loads(json.dumps(d, default=str))  # tuples -> lists, as stored
    local = [f for f in getattr(cfg.data, "train_files", ()) if os.path.isfile(f)]
    d["data_file_sizes"] = {f: os.path.getsize(f) for f in local}
    # and their content (an edit of the same size): a blake2b of the bytes, or for a file over
    # files.DIGEST_WHOLE_BYTES its mtime and the hash of its first and last MiB (see files.file_digest)
    d["data_file_hashes"] = {f: _digest_str(files.file_digest(f)) for f in local}
    return d


def _digest_str(digest: Mapping[str, Any] | None) -> str | None:
    if digest is None:
        return None
    if "blake2b" in digest:
        return f"blake2b:{digest['blake2b']}"
    return f"mtime_ns:{digest['mtime_ns']},blake2b_first_last_MiB:{digest['blake2b_ends']}"


def diff(old: Any, new: Any, prefix: str = "", *, shared_only: bool = False) -> list[str]:
    """``["key: old -> new", ...]`` for every differing leaf of two nested mappings (dotted keys).

    shared_only: ignore keys present on one side only (a setting added or retired by another ramjax version)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = sorted(set(old) & set(new)) if shared_only else sorted(set(old) | set(new))
        return [d for k in keys for d in diff(old.get(k), new.get(k), f"{prefix}{k}.", shared_only=shared_only)]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def replace_aside(run_dir: str) -> str:
    """Moves ``run_dir`` to ``<run_dir>.replaced-<UTC time>`` (nothing is deleted); returns the new path."""
    dest = f"{run_dir.rstrip(os.sep)}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 1
    while os.path.exists(dest):
        dest, n = f"{dest}.{n}", n + 1
    os.replace(run_dir, dest)
    log.warning("--force-restart: moved the previous run in %s to %s", run_dir, dest)
    return dest


def has_previous_run(run_dir: str, outputs: Iterable[str] = ("checkpoints", "metrics.jsonl", "model")) -> bool:
    return any(os.path.exists(os.path.join(run_dir, o)) for o in outputs)


def check_fingerprint(run_dir: str, fingerprint: Mapping[str, Any], *, write: bool = True, what: str = "run"
                      ) -> None:
    """Compares ``fingerprint`` with ``<run_dir>/fingerprint.json``; with ``write``, records it when absent.

    A directory with a previous run but no fingerprint (written before fingerprints existed) is accepted and
    stamped. A mismatch raises ``RunDirMismatchError`` naming the differing keys and the ways out (a new run_dir,
    or ``--force-restart``, which the caller handles with ``replace_aside``).
    """
    path = os.path.join(run_dir, FINGERPRINT_FILE)
    fp = json.loads(json.dumps(fingerprint, default=str))
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (ValueError, OSError) as e:
            raise RunDirMismatchError(f"{path} cannot be read ({e}); pass --force-restart to start over (the old "
                                      f"run is moved aside) or use another run_dir") from None
        changes = diff(old, fp, shared_only=True)
        if changes:
            raise RunDirMismatchError(
                f"run_dir={run_dir!r} holds a {what} made with other settings ({'; '.join(changes[:8])}"
                + (f"; +{len(changes) - 8} more" if len(changes) > 8 else "")
                + "); resuming it would mix two experiments. Use a new run_dir=..., or pass --force-restart to "
                  "move the old run aside and start over")
        return
    if write:
        files.atomic_write_json(path, fp)
