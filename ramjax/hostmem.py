"""Host memory allocator settings for the command lines (standard library only: it runs before JAX is imported).

XLA:CPU gives every execution of a compiled program one block for its temporaries (~200 MB for the default
P_M's training step) and frees it afterwards. The block is allocated on an XLA worker thread; glibc serves
such a thread from a secondary arena, which cannot hold a chunk above 64 MB, so the block is ``mmap``-ed and
``munmap``-ed on every step and the kernel maps it again one 4 KB page at a time: ~50k page faults and ~100 ms
of kernel time per training step on a 2-core machine. ``glibc.malloc.hugetlb=1`` has glibc ask for transparent
huge pages on such chunks (``madvise``), so the same block takes a few hundred 2 MB faults instead (measured in
``bench/host_malloc.py``). Keeping the block mapped instead (one arena, no ``mmap``) removed the faults too but
serialised XLA's multi-threaded compiler on the arena lock (compiles ~20% slower), so it is not used. The
numbers computed do not change; only how their memory is mapped.

glibc reads these settings once, at process start (``GLIBC_TUNABLES``), so a command line that wants them
re-executes itself with the variable set (``maybe_reexec``) before importing anything heavy. Set
``RAMJAX_MALLOC_TUNING=0`` to keep the process as started.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence

OPT_OUT = "RAMJAX_MALLOC_TUNING"
TUNABLES = (("glibc.malloc.hugetlb", "1"),)


def _is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def tuned_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or ``None`` when nothing should change: not Linux/glibc, opted out
    (``RAMJAX_MALLOC_TUNING=0``), or every key of ``TUNABLES`` already set (by us or by the user: the user's
    value wins and is kept)."""
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off") or not _is_glibc():
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    present = {item.split("=", 1)[0] for item in current.split(":") if item}
    missing = [f"{k}={v}" for k, v in TUNABLES if k not in present]
    if not missing:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([current] + missing if current else missing)
    return env


def maybe_reexec(orig_argv: Sequence[str] | None = None) -> None:
    """Replaces this process (same PID, same command line: ``sys.orig_argv``, so ``python -m mod``, ``python
    script.py`` and console scripts all come back as they were started) by one started with
    ``tuned_environment``; returns without doing anything when that is ``None``. Call it only from a program's
    entry point, never from a function a caller may run in its own process."""
    env = tuned_environment(os.environ)
    if env is None:
        return
    args = list(sys.orig_argv if orig_argv is None else orig_argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *args[1:]], env)
    except OSError as e:  # e.g. a user who may run this interpreter but not look it up again: carry on as started
        logging.getLogger(__name__).warning("could not re-execute %s with GLIBC_TUNABLES=%s (%s); running with "
                                            "glibc's default allocator settings", sys.executable,
                                            env["GLIBC_TUNABLES"], e)
