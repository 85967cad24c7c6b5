"""Small file helpers shared by the whole library: atomic writes and one JSONL reader.

Atomic write: the content goes to a temporary file in the destination's own directory (so the final rename never
crosses a file system), is flushed and fsync'ed, then ``os.replace`` d over the destination. A reader (or a run
killed half-way) therefore sees either the old file or the new one, never a torn one; the temporary file is
removed if writing fails.

    atomic_write(path, "text")                  # str → UTF-8, bytes as they are
    atomic_write_json(path, obj)                # indent=2, UTF-8 (not \\u-escaped), trailing newline
    atomic_write_jsonl(path, records)           # one JSON object per line
    with atomic_writer(path, binary=True) as f:  # anything that writes to a file object (np.save, np.savez)
        np.save(f, table)

JSONL: ``read_jsonl(path)`` returns the JSON values of a file's non-blank lines; bad JSON or bad UTF-8 raises
``JSONLError`` (or the ``error`` class the caller passes) naming ``file:line``.

Paths with a scheme (``gs://bucket/run/meta.json``, any ``etils.epath`` path) are written and read through
``etils.epath``: an object store writes a whole object at once when it is closed, which is the same all-or-nothing
guarantee as the rename. ``is_remote``/``epath_of`` tell and convert such paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

__all__ = ["JSONLError", "is_remote", "epath_of", "local_staging", "atomic_writer", "atomic_write", "atomic_write_json",
           "atomic_write_jsonl", "iter_jsonl", "read_jsonl", "file_digest"]


class JSONLError(ValueError):
    """A JSONL file that cannot be read: the message names ``file:line`` and what is wrong there."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a location with a scheme (``gs://``, ``s3://``...) rather than a local file."""
    return "://" in os.fspath(path)


def epath_of(path: str | os.PathLike):
    """``etils.epath.Path`` of ``path`` (local or remote), for directory listing, existence and reads."""
    from etils import epath

    return epath.Path(os.fspath(path))


@contextlib.contextmanager
def local_staging(path: str | os.PathLike, *, upload: bool = True) -> Iterator[str]:
    """Yields a local directory to write ``path``'s files into: ``path`` itself when it is local; for a remote
    ``path`` a temporary directory whose files are copied there (replacing what was there) when the block ends
    without error and ``upload`` is true (pass ``process_index == 0`` so one process uploads)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="ramjax_stage_") as local:
        yield local
        if not upload:
            return
        dest = epath_of(path)
        if dest.exists():
            dest.rmtree()
        for root, _, names in os.walk(local):
            rel = os.path.relpath(root, local)
            target = dest if rel == "." else dest / rel
            target.mkdir(parents=True, exist_ok=True)
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    (target / name).write_bytes(f.read())


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, binary: bool = False) -> Iterator[IO]:
    """Yields a file object whose content replaces ``path`` atomically when the ``with`` block ends without error.

    Parent directories are created. Text mode writes UTF-8. On an exception the temporary file is removed and
    ``path`` is untouched. A remote path (``is_remote``) is buffered in memory and written as one object.
    """
    if is_remote(path):
        import io

        buf = io.BytesIO() if binary else io.StringIO()
        yield buf
        dest = epath_of(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if binary:
            dest.write_bytes(buf.getvalue())
        else:
            dest.write_text(buf.getvalue(), encoding="utf-8")
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # ".tmp." first: leftovers are easy to spot (and tests look for them)
    fd, tmp = tempfile.mkstemp(prefix=".tmp." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> str:
    """Writes ``data`` (``str`` as UTF-8, ``bytes`` as is) to ``path`` atomically; returns the path."""
    with atomic_writer(path, binary=isinstance(data, bytes)) as f:
        f.write(data)
    return os.fspath(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **dump_kwargs: Any) -> str:
    """Writes ``obj`` as JSON (plus a final newline) to ``path`` atomically; returns the path.

    Non-ASCII text is written as UTF-8, not escaped. ``dump_kwargs`` go to ``json.dumps`` (e.g. ``default=str``,
    ``allow_nan=False``).
    """
    dump_kwargs.setdefault("ensure_ascii", False)
    return atomic_write(path, json.dumps(obj, indent=indent, **dump_kwargs) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[Any], **dump_kwargs: Any) -> str:
    """Writes one JSON value per line (UTF-8, not escaped) to ``path`` atomically; returns the path."""
    dump_kwargs.setdefault("ensure_ascii", False)
    with atomic_writer(path) as f:
        for r in records:
            f.write(json.dumps(r, **dump_kwargs) + "\n")
    return os.fspath(path)


def iter_jsonl(path: str | os.PathLike, *, error: type[Exception] = JSONLError, objects: bool = False,
               skip_invalid: bool = False) -> Iterator[tuple[int, Any]]:
    """Yields ``(line_number, value)`` for every non-blank line of a JSONL file (line numbers from 1).

    error:        the exception class raised, with a message naming ``file:line``, for a line that is not UTF-8
                  or not JSON (or not an object when ``objects``), and for a missing file.
    objects:      every line must hold a JSON object.
    skip_invalid: skip bad lines instead of raising (for a file another process may be appending to).
    """
    path = os.fspath(path)
    remote = is_remote(path)
    if not (epath_of(path).is_file() if remote else os.path.isfile(path)):
        raise error(f"{path!r} does not exist (or is not a file)")
    with (epath_of(path).open("rb") if remote else open(path, "rb")) as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if skip_invalid:
                    continue
                raise error(f"{where}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_invalid:
                    continue
                raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if objects and not isinstance(value, Mapping):
                if skip_invalid:
                    continue
                raise error(f"{where}: each line must be a JSON object, got {type(value).__name__}")
            yield lineno, value


def read_jsonl(path: str | os.PathLike, *, error: type[Exception] = JSONLError, objects: bool = False,
               skip_invalid: bool = False) -> list[Any]:
    """The JSON values of the non-blank lines of ``path`` (see ``iter_jsonl`` for the options and errors)."""
    return [v for _, v in iter_jsonl(path, error=error, objects=objects, skip_invalid=skip_invalid)]


# files up to this size are hashed whole; a larger one by its size, mtime and first and last MiB (hashing many GiB
# at every start would cost minutes; an edit that keeps the size, the mtime and both ends is not detected)
DIGEST_WHOLE_BYTES = 1 << 30
_DIGEST_PART_BYTES = 1 << 20


def file_digest(path: str | os.PathLike) -> dict[str, Any] | None:
    """``{"size", "blake2b"}`` of a file (``blake2b``: the hex digest of its bytes, streamed), or for a file over
    ``DIGEST_WHOLE_BYTES`` ``{"size", "mtime_ns", "blake2b_ends"}`` (the digest of its first and last MiB); None when
    the file does not exist."""
    import hashlib

    if not os.path.isfile(path):
        return None
    st = os.stat(path)
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        if st.st_size <= DIGEST_WHOLE_BYTES:
            while chunk := f.read(1 << 22):
                h.update(chunk)
            return {"size": st.st_size, "blake2b": h.hexdigest()}
        h.update(f.read(_DIGEST_PART_BYTES))
        f.seek(st.st_size - _DIGEST_PART_BYTES)
        h.update(f.read(_DIGEST_PART_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "blake2b_ends": h.hexdigest()}
