"""Checkpoints (orbax): training checkpoints that resume exactly, and ramjax model directories.

Training checkpoints live in ``run_dir/checkpoints/<step>/`` and hold three items:

* ``params``    the trained parameters (an orbax array tree, restored straight onto the requested shardings);
* ``train``     the rest of the train state: ``{"step", "rng", "opt_state"}`` (rng as raw ``uint32`` key data);
* ``data``      the data iterator state (JSON), so a resumed run sees exactly the batches it would have seen.

orbax writes each step into a temporary directory and renames it when complete, so a process killed mid-save
leaves no checkpoint that looks valid; ``latest_step`` only ever returns committed steps. Every save also stores a
checksum of each saved array (computed on device, ``tree_checksums``) in the ``data`` item, and every restore
verifies it, so a committed checkpoint damaged later (a truncated or bit-flipped blob, a deleted manifest) is
detected; ``restore_newest`` then falls back to the newest checkpoint that restores intact, logging which one and
why, and raises ``CheckpointCorruptError`` only when none does. Exported model directories carry the same
checksums in ``ramjax_model.json`` and ``load_model_dir`` verifies them.

A *ramjax model directory* is what training exports and what ``ramjax.load_model`` reads besides Hugging Face
directories: ``ramjax_model.json`` (the ``ModelConfig``), ``params/`` (orbax) and the tokenizer files, if any.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from ramjax import files
from ramjax import model as model_lib
from ramjax import sharding as shd

log = logging.getLogger(__name__)

MODEL_JSON = "ramjax_model.json"
FORMAT_VERSION = 1
_ITEMS = ("params", "train", "data")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is restored into (missing, extra or mis-shaped arrays)."""


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint or model directory is missing or incomplete."""


class CheckpointCorruptError(ValueError):
    """A checkpoint or model directory exists but cannot be read back intact (truncated or damaged files, a
    checksum that does not match, unreadable metadata); the message names the directory and what to do."""


_CHECKSUM_KEY = "_ramjax_checksums"


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 (1-, 2- and 4-byte dtypes; wider ones are split into 4-byte words)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> [..., 2] words


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    # Position-weighted sum of the bit patterns, mod 2**32: exact integer arithmetic, so the value does not depend
    # on the sharding or the reduction order, and any changed, swapped or zeroed word changes it (with high
    # probability).
    out = []
    for x in leaves:
        u = _as_uint32(x).reshape(-1)
        w = jnp.arange(u.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        out.append(jnp.sum(u * w, dtype=jnp.uint32) ^ jnp.uint32(u.shape[0]))
    return out


def tree_checksums(tree: Any) -> dict[str, int]:
    """``{array path: checksum}`` of every array leaf of ``tree`` (one jitted pass on the devices holding it)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat = [(p, x) for p, x in flat if hasattr(x, "dtype") and hasattr(x, "shape")]
    if not flat:
        return {}
    sums = jax.device_get(_checksums([jnp.asarray(x) for _, x in flat]))
    return {_path_str(p): int(v) for (p, _), v in zip(flat, sums)}


def verify_checksums(tree: Any, stored: dict[str, int] | None, what: str, *, only: Iterable[str] | None = None,
                     fix: str = "") -> None:
    """Raises ``CheckpointCorruptError`` naming the arrays of ``tree`` whose checksum differs from ``stored``.

    stored: the ``tree_checksums`` written with the checkpoint (None: written before checksums existed; skipped).
    only:   restrict the comparison to these paths (e.g. leaves restored in their stored dtype).
    """
    if not stored:
        return
    got = tree_checksums(tree)
    keys = [k for k in got if k in stored and (only is None or k in set(only))]
    bad = [k for k in keys if got[k] != int(stored[k])]
    if bad:
        raise CheckpointCorruptError(
            f"{what} is damaged: the checksum of {', '.join(bad[:5])}" + (f" (+{len(bad) - 5} more)"
                                                                          if len(bad) > 5 else "")
            + " does not match the one written with it (a truncated, overwritten or bit-flipped file)" + fix)


# ------------------------------------------------------------------------------------------------------------
# Shape comparison


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_str(p): tuple(x.shape) for p, x in leaves if x is not None and hasattr(x, "shape")}


def compare_shapes(stored: Any, expected: Any, what: str = "checkpoint") -> None:
    """Raises ``CheckpointMismatchError`` listing every missing, unexpected or mis-shaped array.

    stored:   a tree of objects with ``.shape`` (orbax ``ArrayMetadata`` or arrays) read from disk.
    expected: a tree of objects with ``.shape`` (``ShapeDtypeStruct`` or arrays) the caller wants to restore.
    """
    s, e = _flat_shapes(stored), _flat_shapes(expected)
    missing = sorted(set(e) - set(s))
    extra = sorted(set(s) - set(e))
    wrong = sorted(k for k in set(s) & set(e) if s[k] != e[k])
    if not (missing or extra or wrong):
        return
    lines = []
    if wrong:
        lines.append("shape differs: " + ", ".join(f"{k} stored {s[k]} vs model {e[k]}" for k in wrong[:20])
                     + (f" (+{len(wrong) - 20} more)" if len(wrong) > 20 else ""))
    if missing:
        lines.append("missing from the checkpoint: " + ", ".join(missing[:20])
                     + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""))
    if extra:
        lines.append("not in the model: " + ", ".join(extra[:20])
                     + (f" (+{len(extra) - 20} more)" if len(extra) > 20 else ""))
    raise CheckpointMismatchError(
        f"{what} does not match the model being restored: " + "; ".join(lines)
        + ". Use a checkpoint of the same architecture (or point the run at a fresh run directory).")


def abstract_tree(shapes: Any, shardings: Any | None = None, dtype: Any = None) -> Any:
    """``ShapeDtypeStruct`` tree with optional shardings and an optional dtype override for float leaves."""
    def one(s, sh=None):
        dt = s.dtype
        if dtype is not None and jnp.issubdtype(dt, jnp.floating):
            dt = dtype
        return jax.ShapeDtypeStruct(s.shape, dt, sharding=sh)
    if shardings is None:
        return jax.tree_util.tree_map(one, shapes)
    return jax.tree_util.tree_map(one, shapes, shardings)


# ------------------------------------------------------------------------------------------------------------
# Training checkpoints


class CheckpointManager:
    """Saves every ``save_every`` steps, keeps the last ``keep``, restores the latest onto given shardings.

    directory:   ``run_dir/checkpoints``.
    async_save:  write in a background thread (training continues while arrays are written); ``wait`` blocks.
    All processes must call ``save``/``restore`` together (orbax coordinates the writes; only process 0 writes the
    JSON item and the metadata).
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1000, keep: int | None = 3,
                 async_save: bool = False):
        if save_every < 1:
            raise ValueError(f"checkpoint save_every={save_every} must be >= 1")
        if keep is not None and keep < 1:
            raise ValueError(f"checkpoint keep={keep} must be >= 1 (or None to keep all)")
        self.directory = _resolve(directory)  # local: absolute; gs:// and other epath URIs: as given
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        # Handlers registered up front so that a fresh manager can read item metadata before any save/restore.
        handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler()}
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` writes: ``step`` is a multiple of ``save_every``."""
        return step % self.save_every == 0 and step not in self._mngr.all_steps()

    def save(self, step: int, params: Any, train: dict[str, Any], data_state: dict[str, Any] | None,
             *, force: bool = False) -> bool:
        """Saves ``params``, ``train`` (``{"step", "rng", "opt_state"}``) and the JSON ``data_state`` at ``step``.

        Without ``force`` it saves only on multiples of ``save_every``. Returns whether a save started.
        """
        # The decision is ours (orbax's default policy would also save the very first step).
        if step in self._mngr.all_steps() or not (force or step % self.save_every == 0):
            return False
        data = dict(data_state or {})
        data[_CHECKSUM_KEY] = {"params": tree_checksums(params), "train": tree_checksums(train)}
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
                                  data=ocp.args.JsonSave(data))
        try:
            return bool(self._mngr.save(step, args=args, force=True))
        except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise plain errors for a full or read-only disk
            raise _storage_error(e, f"saving checkpoint {self.directory}/{step}") from e

    def newest_readable_step(self, expected_params: Any) -> int | None:
        """The newest step whose metadata reads and whose parameter shapes match ``expected_params`` (shape
        tree), skipping (with a warning) steps whose metadata cannot be read; None when there is no step.

        Raises ``CheckpointMismatchError`` when the newest readable step holds another model's shapes (that is a
        run directory of another model, not damage) and ``CheckpointCorruptError`` when no step's metadata reads.
        """
        steps = sorted(self.all_steps(), reverse=True)
        reasons = []
        for step in steps:
            try:
                stored = self.stored_param_shapes(step)
            except Exception as e:  # noqa: BLE001 -- any unreadable metadata is damage
                reasons.append(f"step {step}: {type(e).__name__}: {_short(e)}")
                log.warning("checkpoint %s/%d: metadata unreadable (%s); trying an older one", self.directory, step,
                            _short(e))
                continue
            compare_shapes(stored, expected_params, f"checkpoint {self.directory}/{step}")
            return step
        if steps:
            raise CheckpointCorruptError(self._none_restores(reasons))
        return None

    def _none_restores(self, reasons: list[str]) -> str:
        return (f"no checkpoint in {self.directory} can be restored ({'; '.join(reasons)}); move the "
                f"damaged step directories away to start the run over from the beginning, or use a fresh run_dir")

    def restore_newest(self, abstract_params: Any, abstract_train: dict[str, Any], *, max_step: int | None = None
                       ) -> tuple[int, Any, dict[str, Any], dict[str, Any]]:
        """Restores the newest checkpoint (at most ``max_step``) that restores intact: ``(step, params, train,
        data_state)``.

        A damaged checkpoint (unreadable files, a checksum mismatch) is logged with its reason and moved to
        ``<run_dir>/checkpoints_damaged/<step>`` (so the resumed run can save that step again, and nothing is
        deleted), and the next older one is tried. Raises ``CheckpointCorruptError`` listing every step's reason
        when none restores, and ``CheckpointMismatchError`` when a checkpoint holds another model's shapes.
        """
        steps = sorted((s for s in self.all_steps() if max_step is None or s <= max_step), reverse=True)
        if not steps:
            raise CheckpointNotFoundError(f"no committed checkpoint in {self.directory}")
        reasons, damaged = [], []
        for step in steps:
            try:
                out = self.restore(step, abstract_params, abstract_train)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 -- damage shows up as any of orbax/tensorstore's errors
                reasons.append(f"step {step}: {_short(e)}")
                damaged.append(step)
                log.warning("checkpoint %s/%d cannot be restored (%s); falling back to an older checkpoint",
                            self.directory, step, _short(e))
                continue
            if damaged:
                log.warning("resuming from checkpoint %s/%d: the newer %s could not be restored and moved to %s",
                            self.directory, step, damaged, self._quarantine(damaged))
            return (step, *out)
        raise CheckpointCorruptError(self._none_restores(reasons))

    def _quarantine(self, steps: list[int]) -> str:
        """Moves damaged step directories next to ``checkpoints/`` (process 0) and reloads the step list."""
        dest = files.epath_of(self.directory).parent / "checkpoints_damaged"
        if jax.process_index() == 0:
            dest.mkdir(parents=True, exist_ok=True)
            for step in steps:
                src = files.epath_of(self.directory) / str(step)
                if src.exists():
                    target = dest / str(step)
                    n = 1
                    while target.exists():
                        target, n = dest / f"{step}.{n}", n + 1
                    src.rename(target)
        dest = os.fspath(dest)
        _sync("ramjax_checkpoint_quarantine")
        self._mngr.reload()
        return dest

    def stored_param_shapes(self, step: int) -> Any:
        """The stored parameter metadata tree (``ArrayMetadata`` leaves with ``.shape``/``.dtype``)."""
        md = self._mngr.item_metadata(step)
        item = md["params"]
        return getattr(item, "tree", item)

    def restore(self, step: int | None, abstract_params: Any, abstract_train: dict[str, Any]
                ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restores ``(params, train, data_state)`` at ``step`` (default: latest) onto the abstract trees' shardings.

        abstract_*: ``ShapeDtypeStruct`` trees with ``sharding`` set (see ``abstract_tree``).
        Raises ``CheckpointMismatchError`` naming the offending parameters when the stored shapes differ.
        """
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {self.directory}")
        compare_shapes(self.stored_param_shapes(step), abstract_params, f"checkpoint {self.directory}/{step}")
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                  train=ocp.args.StandardRestore(abstract_train), data=ocp.args.JsonRestore())
        where = f"checkpoint {self.directory}/{step}"
        try:
            out = self._mngr.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:  # e.g. an optimizer of another kind, or damaged files
            raise CheckpointCorruptError(
                f"{where} cannot be restored into this train state ({_short(e)}): its files are damaged, or it "
                f"was written with another optimizer or model (then use a fresh run directory)") from e
        data = dict(out["data"] or {})
        sums = data.pop(_CHECKSUM_KEY, None) or {}
        verify_checksums(out["params"], sums.get("params"), f"{where} (params)")
        verify_checksums(out["train"], sums.get("train"), f"{where} (train state)")
        return out["params"], out["train"], data

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


# ------------------------------------------------------------------------------------------------------------
# ramjax model directories


def config_to_dict(cfg: model_lib.ModelConfig) -> dict[str, Any]:
    """JSON-able dict of a ``ModelConfig`` (tuples become lists)."""
    d = dataclasses.asdict(cfg)
    if isinstance(d.get("eos_token_id"), tuple):
        d["eos_token_id"] = list(d["eos_token_id"])
    return d


def config_from_dict(d: dict[str, Any]) -> model_lib.ModelConfig:
    """Inverse of ``config_to_dict``; unknown keys are an error naming them."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointMismatchError(f"{MODEL_JSON} has unknown model config keys {unknown}; it was written by "
                                      f"another ramjax version (known keys: {sorted(known)})")
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = model_lib.RopeScaling(**d["rope_scaling"])
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return model_lib.ModelConfig(**d)


def _resolve(path: str | os.PathLike) -> str:
    """A local path made absolute (orbax wants one); a URI (``gs://...``, any ``etils.epath`` path) unchanged."""
    return os.fspath(path) if files.is_remote(path) else os.path.abspath(os.fspath(path))


def is_model_dir(path: str | os.PathLike) -> bool:
    return (files.epath_of(path) / MODEL_JSON).is_file()


def _copy_tokenizer(tokenizer: Any, path: str) -> None:
    """Writes tokenizer files into ``path``: from an object with ``save``/``save_pretrained`` or a directory."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        from ramjax import tokenizer as tok_lib

        src = os.fspath(tokenizer)
        names = getattr(tok_lib, "TOKENIZER_FILES", None) or (
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
            "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")
        for name in names:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(path, name))
        return
    for meth in ("save", "save_pretrained"):
        if hasattr(tokenizer, meth):
            getattr(tokenizer, meth)(path)
            return
    src = getattr(tokenizer, "path", None) or getattr(tokenizer, "source", None)
    if src and os.path.isdir(src):
        _copy_tokenizer(src, path)
        return
    raise TypeError(f"cannot save tokenizer of type {type(tokenizer).__name__}: pass a tokenizer directory path "
                    f"or an object with save(path)")


def save_model_dir(path: str | os.PathLike, cfg: model_lib.ModelConfig, params: Any, tokenizer: Any = None) -> str:
    """Writes a ramjax model directory: ``ramjax_model.json``, ``params/`` (orbax) and tokenizer files.

    tokenizer: a ``ramjax.tokenizer.Tokenizer`` (saved with its ``save``), a directory to copy tokenizer files
    from, or None. The directory is assembled next to ``path`` and renamed into place, so a crash never leaves a
    half-written model directory. Must be called by every process (orbax writes the shards together).
    """
    path = _resolve(path)
    tmp = path + ".tmp"
    primary = jax.process_index() == 0
    if primary:
        if files.epath_of(tmp).exists():
            files.epath_of(tmp).rmtree()
        files.epath_of(tmp).mkdir(parents=True)
    _sync("ramjax_save_model_dir_start")
    sums = tree_checksums(params)
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(os.path.join(tmp, "params"), params)
        ckptr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 -- a full or read-only disk surfaces as a plain tensorstore error
        raise _storage_error(e, f"writing model directory {path}") from e
    if primary:
        meta = {"format_version": FORMAT_VERSION, "config": config_to_dict(cfg),
                "num_params": model_lib.count_params(params), "checksums": sums}
        files.epath_of(os.path.join(tmp, MODEL_JSON)).write_text(json.dumps(meta, indent=2))
        if files.is_remote(tmp):  # tokenizers save to local files: stage them, then copy
            import tempfile

            with tempfile.TemporaryDirectory() as local:
                _copy_tokenizer(tokenizer, local)
                for name in os.listdir(local):
                    with open(os.path.join(local, name), "rb") as fh:
                        (files.epath_of(tmp) / name).write_bytes(fh.read())
        else:
            _copy_tokenizer(tokenizer, tmp)
        if files.epath_of(path).exists():
            files.epath_of(path).rmtree()
        files.epath_of(tmp).rename(path)
    _sync("ramjax_save_model_dir_end")
    return path


def read_model_config(path: str | os.PathLike) -> model_lib.ModelConfig:
    """The ``ModelConfig`` stored in a ramjax model directory."""
    path = os.fspath(path)
    if not is_model_dir(path):
        raise CheckpointNotFoundError(f"{path!r} is not a ramjax model directory (no {MODEL_JSON})")
    meta = _read_model_json(path)
    return config_from_dict(meta["config"] if "config" in meta else meta)


def _read_model_json(path: str) -> dict[str, Any]:
    f = os.path.join(path, MODEL_JSON)
    try:
        meta = json.loads(files.epath_of(f).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{f} is not valid JSON ({e}); the model directory is damaged: export it "
                                     f"again (rerun the training run that wrote it) or restore it from a copy") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("config", meta), dict):
        raise CheckpointCorruptError(f"{f} does not hold a model config object; the model directory is damaged: "
                                     f"export it again or restore it from a copy")
    return meta

def load_model_dir(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype: str | None = None,
                   param_dtype: str | None = None, rules=shd.DEFAULT_RULES
                   ) -> tuple[model_lib.ModelConfig, Any]:
    """Loads ``(ModelConfig, params)`` from a ramjax model directory.

    mesh:        place every parameter directly onto its sharding (``model.param_shardings``); default: the
                 first local device.
    dtype / param_dtype: override the compute / storage dtype (stored float arrays are cast on restore).
    Raises ``CheckpointMismatchError`` listing offending arrays if ``params/`` does not match the config.
    """
    path = os.fspath(path)
    cfg = read_model_config(path)
    over = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    if over:
        cfg = cfg.replace(**over)
    params_dir = os.path.join(_resolve(path), "params")
    if not files.epath_of(params_dir).is_dir():
        raise CheckpointNotFoundError(f"{path!r} has {MODEL_JSON} but no params/ directory")
    shapes = model_lib.param_shapes(cfg)
    ckptr = ocp.StandardCheckpointer()
    damaged = (f"model directory {path!r} is damaged: export it again (rerun the training run that wrote it; it "
               f"resumes from its last checkpoint) or restore it from a copy")
    try:
        stored = ckptr.metadata(params_dir).item_metadata
    except Exception as e:  # noqa: BLE001 -- unreadable orbax metadata is damage
        raise CheckpointCorruptError(f"{damaged} (params/ metadata unreadable: {_short(e)})") from e
    stored = getattr(stored, "tree", stored)
    compare_shapes(stored, shapes, f"model directory {path!r}")
    if mesh is not None:
        shardings = model_lib.param_shardings(cfg, mesh, rules)
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: dev, shapes)
    target = abstract_tree(shapes, shardings, cfg.weight_dtype)
    try:
        params = ckptr.restore(params_dir, target)
    except Exception as e:  # noqa: BLE001 -- truncated/missing blobs raise plain tensorstore errors
        raise CheckpointCorruptError(f"{damaged} (params/ cannot be read: {_short(e)})") from e
    # leaves restored in their stored dtype can be compared with the checksums written at export
    same = [k for k, v in _flat_dtypes(stored).items() if _flat_dtypes(target).get(k) == v]
    verify_checksums(params, _read_model_json(path).get("checksums"), f"model directory {path!r}", only=same,
                     fix="; export it again (rerun the training run that wrote it) or restore it from a copy")
    return cfg, params


def _flat_dtypes(tree: Any) -> dict[str, str]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_str(p): str(jnp.dtype(x.dtype)) for p, x in leaves if getattr(x, "dtype", None) is not None}


def _short(e: BaseException, limit: int = 300) -> str:
    """One line of an exception's message (tensorstore errors span many lines)."""
    text = " ".join(str(e).split())
    return (text[:limit] + "...") if len(text) > limit else (text or type(e).__name__)


class StorageError(ValueError, OSError):
    """Writing a checkpoint or model failed because the storage is full or not writable; what was committed
    before stays valid (a rerun resumes from the last committed checkpoint). A ValueError too, so the CLIs report
    it like every other named error (one line, exit 2)."""


def _storage_error(e: BaseException, what: str) -> BaseException:
    """A named ``StorageError`` for a full/read-only disk (orbax raises tensorstore's RESOURCE_EXHAUSTED or a plain
    OSError), else ``e`` unchanged."""
    import errno

    text = str(e)
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "RESOURCE_EXHAUSTED" in text \
        or "No space left" in text or "Disk quota" in text
    denied = (isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM)) \
        or "PERMISSION_DENIED" in text or "Read-only file system" in text
    if not (full or denied):
        return e
    why = "the disk is full" if full else "the location is not writable"
    return StorageError(f"{what} failed: {why} ({_short(e, 200)}). Free space (or fix permissions) and rerun: "
                        f"the run resumes from its last committed checkpoint, nothing committed is lost")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


__all__: Iterable[str] = ["CheckpointManager", "CheckpointMismatchError", "CheckpointNotFoundError",
                          "CheckpointCorruptError", "StorageError", "tree_checksums", "verify_checksums",
                          "save_model_dir", "load_model_dir", "read_model_config", "is_model_dir",
                          "compare_shapes", "abstract_tree", "config_to_dict", "config_from_dict"]
