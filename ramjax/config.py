"""Typed run configs: nested dataclasses, loaded from YAML and overridden by dotted ``key=value`` arguments.

    cfg = load_config(TrainConfig, "configs/ram.yaml", ["optimizer.lr=1e-6", "ram.alpha=1e-3", "mesh.fsdp=8"])

Loading is strict. Every key is checked against the dataclass schema (an unknown key is a ``ConfigError`` with a
did-you-mean and the valid keys of its section) and every value against its annotation (``int``, ``float``
(ints accepted), ``bool``, ``str``, ``Literal``, ``X | None``, ``tuple``/``list``/``dict`` of X, nested
dataclasses); a wrong type names the key, the expected and the given type. After loading, every dataclass in the
tree that defines ``validate(self)`` is asked to check itself (children first), so cross-field rules live next to
the fields they concern.

Override values are parsed with ``yaml.safe_load`` (``[a.jsonl,b.jsonl]``, ``null``, ``true``), with three
conveniences for command lines: numbers written in exponent form without a dot (``1e-6``, which YAML 1.1 reads
as a string) are accepted for float and int fields; a bare scalar given for a list field becomes a one-element
list; and a value that YAML reads as a number or bool is kept as its text when the field is a string
(``run_dir=2024``). A YAML file may start from other files with ``include: base.yaml`` (or a list; paths relative
to the including file; later files and the including file win, merged key by key); a section may do the same with
a file holding that section only (``stages: {ram: {include: recipe/ram.yaml}}``).

``save_config`` writes YAML that ``load_config`` reads back to an equal config; ``format_config`` renders the
resolved config for printing.

The schemas for ``train.py`` (``TrainConfig``) and ``sample.py`` (``SampleConfig``) are at the end of this module;
their defaults are the papers' settings (RAM: arXiv 2505.19700; TrRa: arXiv 2506.12704) where the papers give one.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin

import yaml

from ramjax import files
from ramjax import loss as loss_lib
from ramjax.model import AttentionImpl, DType, ModelConfig
from ramjax.sampling_params import SamplingParams

T = TypeVar("T")

__all__ = [
    "ConfigError", "load_config", "config_from_dict", "override_config", "config_to_dict", "save_config",
    "format_config", "validate_config", "split_cli_args",
    "TrainConfig", "SampleConfig", "ModelSection", "DataConfig",
    "OptimizerConfig", "ScheduleConfig", "MeshSection", "CheckpointConfig", "LoggingConfig", "RamConfig",
    "DpoConfig", "TrraConfig", "InraConfig", "DistributedConfig", "TokenizerConfig",
]

_INCLUDE_KEYS = ("include", "base")
_NUMBER_RE = re.compile(r"^[+-]?(\d[\d_]*\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A config file, override or value does not fit the schema (unknown key, wrong type, failed validation)."""


# ------------------------------------------------------------------------------------------------------------
# Schema introspection


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields of dataclass ``cls`` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _section_type(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``Section`` or ``Section | None``), else None."""
    if _is_dataclass_type(tp):
        return tp
    if _is_union(tp):
        found = [a for a in get_args(tp) if _is_dataclass_type(a)]
        return found[0] if len(found) == 1 else None
    return None


def _non_none(tp: Any) -> Any:
    """``X`` for ``X | None``; ``tp`` otherwise."""
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_sequence_type(tp: Any) -> bool:
    return get_origin(tp) in (list, tuple, collections.abc.Sequence) or tp in (list, tuple)


def _accepts_str(tp: Any) -> bool:
    if tp is str or tp is Any:
        return True
    if _is_union(tp):
        return any(_accepts_str(a) for a in get_args(tp))
    return False


def _type_name(tp: Any) -> str:
    """A reader's name for an annotation: ``float``, ``'a' | 'b'``, ``list of str``, ``int | None``."""
    if tp is type(None) or tp is None:
        return "null"
    if tp is Any:
        return "any value"
    if _is_dataclass_type(tp):
        return f"a mapping (section {tp.__name__})"
    origin = get_origin(tp)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(repr(c) for c in get_args(tp))
    if _is_sequence_type(tp):
        args = get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"list of {_type_name(args[0]) if args else 'any value'}"
    if origin in (dict, collections.abc.Mapping):
        args = get_args(tp) or (Any, Any)
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return getattr(tp, "__name__", repr(tp))


def _given(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _schema_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema rooted at ``cls`` (sections and leaves)."""
    out = []
    for name, tp in _hints(cls).items():
        path = _join(prefix, name)
        out.append(path)
        sec = _section_type(tp)
        if sec is not None:
            out.extend(_schema_paths(sec, path))
    return out


def _unknown_key_error(section_cls: type, path: str, key: str, root: type | None, origin: str = "") -> ConfigError:
    valid = list(_hints(section_cls))
    full = _join(path, key)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = ""
    if close:
        hint = f"; did you mean {' or '.join(repr(_join(path, c)) for c in close)}?"
    elif root is not None:
        # the key may exist in another section (``lr=1e-6`` for ``optimizer.lr``)
        elsewhere = [p for p in _schema_paths(root) if p.rsplit(".", 1)[-1] == key]
        if not elsewhere:
            leaves = {p.rsplit(".", 1)[-1]: p for p in _schema_paths(root)}
            elsewhere = [leaves[c] for c in difflib.get_close_matches(key, list(leaves), n=3, cutoff=0.75)]
        if elsewhere:
            hint = f"; did you mean {' or '.join(repr(p) for p in elsewhere)}?"
    section = f"section {path!r}" if path else section_cls.__name__
    src = f" ({origin})" if origin else ""
    return ConfigError(f"unknown config key {full!r}{src}{hint} Valid keys of {section}: {', '.join(valid)}")


# ------------------------------------------------------------------------------------------------------------
# Conversion and checking of values


def _type_error(key: str, tp: Any, value: Any, extra: str = "") -> ConfigError:
    return ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {_given(value)}{extra}")


def _convert(value: Any, tp: Any, key: str, root: type | None) -> Any:
    """Checks ``value`` against annotation ``tp`` and returns it in the annotated container types."""
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(key, tp, value)
    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(key, tp, value)
        section_errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, root)
            except ConfigError as e:
                if _is_dataclass_type(arg) and isinstance(value, Mapping):
                    section_errors.append(e)  # the value is meant as this section: its own error is clearer
        if section_errors:
            raise section_errors[0]
        raise _type_error(key, tp, value)
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c and type(value) is type(c):  # type check keeps True from matching 1
                return c
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key {key!r}: expected one of {', '.join(repr(c) for c in choices)}, "
                          f"got {_given(value)}{hint}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        return _build(tp, value, key, root)
    if _is_sequence_type(tp):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        args = get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _type_error(key, tp, value, f" (length {len(value)})")
            items = [_convert(v, a, f"{key}[{i}]", root) for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [_convert(v, elem, f"{key}[{i}]", root) for i, v in enumerate(value)]
        return list(items) if (origin is list or tp is list) else tuple(items)
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, f"{key} (a key)", root): _convert(v, vt, _join(key, k), root) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value, " (write true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise _type_error(key, tp, value)
        if isinstance(value, int):
            return value
        if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
            value = float(value.replace("_", ""))
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, bool):
            raise _type_error(key, tp, value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and (_NUMBER_RE.match(value.strip()) or value.strip().lower() in ("inf", "-inf")):
            return float(value.replace("_", ""))
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value, " (quote it in YAML)")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(key, tp, value)
    raise ConfigError(f"config key {key!r}: unsupported annotation {tp!r} in the schema")


def _with_section_defaults(cls: type, data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A section given as a mapping starts from its field's default (``default_factory``), not from its class's
    defaults: ``model.arch`` defaults to ``vocab_size: 0`` (the tokenizer's), a pipeline's ``aligner_arch`` to its
    own shape, and a partial mapping changes only the keys it names."""
    out = None
    for f in dataclasses.fields(cls):
        if (f.name in data and isinstance(data[f.name], Mapping) and f.default_factory is not dataclasses.MISSING):
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                out = dict(data) if out is None else out
                base = {g.name: getattr(default, g.name) for g in dataclasses.fields(default) if g.init}
                out[f.name] = {**base, **data[f.name]}
    return data if out is None else out


def _build(cls: type[T], data: Mapping[str, Any], path: str, root: type | None) -> T:
    """Builds dataclass ``cls`` from a mapping, checking keys and types (no validation hooks)."""
    hints = _hints(cls)
    data = _with_section_defaults(cls, data)
    for k in data:
        if not isinstance(k, str):
            raise ConfigError(f"config keys must be strings; got {_given(k)} in section {path or cls.__name__!r}")
        if k not in hints:
            raise _unknown_key_error(cls, path, k, root)
    kwargs = {k: _convert(v, hints[k], _join(path, k), root) for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required config key(s) {', '.join(_join(path, m) for m in missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid section {path or cls.__name__!r}: {e}") from e


# ------------------------------------------------------------------------------------------------------------
# YAML files and overrides


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _read_yaml(path: str, cls: type, chain: tuple[str, ...] = ()) -> dict:
    """Reads a YAML mapping, resolving ``include:`` (or ``base:``) files first."""
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"config include cycle: {' -> '.join(chain + (real,))}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return _resolve_includes(dict(data), cls, path, chain + (real,))


def _resolve_includes(data: dict, cls: Any, path: str, chain: tuple[str, ...]) -> dict:
    """Resolves ``include:`` keys in ``data`` (a mapping for section type ``cls``) and in every nested section:
    the included files (relative to ``path``, the file being read) are merged first, then the mapping's own keys
    win. A nested ``include`` reads a file holding that section only (``model: {arch: {include: arch.yaml}}``)."""
    sec = _section_type(cls) if cls is not None else None
    inner = _non_none(cls) if cls is not None else None
    if sec is None:
        # a mapping of sections (``dict[str, Section]``) may come from a file too; any other mapping (e.g.
        # data.field_map) is free-form: its keys are data, not includes
        if get_origin(inner) not in (dict, collections.abc.Mapping) or _section_type(
                (get_args(inner) or (Any, Any))[1]) is None:
            return data
        hints = {}
    else:
        hints = _hints(sec)
    merged: dict = {}
    for key in _INCLUDE_KEYS:
        if key in data and key not in hints:
            includes = data.pop(key)
            includes = [includes] if isinstance(includes, str) else includes
            if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
                raise ConfigError(f"{path}: {key!r} must be a file name or a list of file names")
            for inc in includes:
                inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
                merged = _deep_merge(merged, _read_yaml(inc_path, sec, chain))
    item = (get_args(inner) or (Any, Any))[1] if sec is None else None
    for k, v in list(data.items()):
        if isinstance(v, Mapping):
            data[k] = _resolve_includes(dict(v), hints.get(k) if sec is not None else item, path, chain)
    return _deep_merge(merged, data)


@dataclasses.dataclass(frozen=True)
class _TopLevel:
    """The one key every config file may hold whatever its schema: which program runs it (see ``ramjax.cli``)."""

    program: str = "train"


def read_yaml(path: str | os.PathLike) -> dict:
    """The raw mapping of a config file with its ``include:`` files merged (no schema applied)."""
    return _read_yaml(os.fspath(path), _TopLevel)


def _parse_override_value(raw: str, tp: Any, key: str, root: type) -> Any:
    text = raw.strip()
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    if value is not None and not isinstance(value, (str, list, dict)) and _accepts_str(tp):
        try:
            _convert(value, tp, key, root)
        except ConfigError:
            value = text  # run_dir=2024: the user meant the text
    inner = _non_none(tp)
    if _is_sequence_type(inner) and value is not None and not isinstance(value, (list, tuple, dict)):
        args = get_args(inner)
        fixed = get_origin(inner) is tuple and args and not (len(args) == 2 and args[1] is Ellipsis)
        if not fixed:
            value = [value]  # data.train_files=a.jsonl
    return value


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """Returns ``data`` (a raw mapping for ``cls``) with dotted ``key=value`` overrides applied in order.

    Keys are checked against the schema as they are applied, so an error names the override that caused it.
    A mapping given for a section (``mesh={fsdp: 8}``) is merged into it; any other value replaces.
    """
    out = _deep_merge({}, data)
    for ov in overrides:
        if not isinstance(ov, str) or "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value (e.g. optimizer.lr=1e-6)")
        key, raw = ov.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {ov!r}: empty key component in {key!r}")
        tp: Any = cls
        node = out
        for i, part in enumerate(parts):
            prefix = ".".join(parts[:i])
            sec = _section_type(tp)
            inner = _non_none(tp)
            if sec is not None:
                hints = _hints(sec)
                if part not in hints:
                    raise _unknown_key_error(sec, prefix, part, cls, origin=f"from override {ov!r}")
                tp = hints[part]
            elif get_origin(inner) in (dict, collections.abc.Mapping):
                tp = (get_args(inner) or (Any, Any))[1]
            else:
                raise ConfigError(f"override {ov!r}: {prefix!r} is a value ({_type_name(tp)}), not a section, so "
                                  f"it has no key {part!r}")
            if i < len(parts) - 1:
                child = node.get(part)
                if child is None:
                    child = {}
                elif not isinstance(child, Mapping):
                    raise ConfigError(f"override {ov!r}: {_join(prefix, part)!r} holds {_given(child)}, not a section")
                node[part] = child = dict(child)
                node = child
        value = _parse_override_value(raw, tp, key, cls)
        last = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(last), Mapping) and _section_type(tp) is not None:
            value = _deep_merge(dict(node[last]), value)
        node[last] = value
    return out


def _check_finite(value: Any, key: str) -> None:
    # inf/nan in a setting (a learning rate, a weight decay, epochs, a temperature...) silently trains or samples
    # NaN: no setting of ramjax means anything with a non-finite number, so reject them all in one place.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number" + (" (null turns it off)" if "threshold" in key
                                                                      else ""))


def validate_config(cfg: Any, path: str = "") -> None:
    """Calls ``validate()`` on every dataclass in the tree, children first; errors become ``ConfigError``."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        return
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate_config(v, _join(path, f.name))
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                validate_config(item, f"{_join(path, f.name)}[{i}]")
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        try:
            hook()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{path or type(cfg).__name__}: {e}") from e
    # after the section's own checks, whose messages are more specific
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        for i, item in enumerate(v) if isinstance(v, (list, tuple)) else [(None, v)]:
            _check_finite(item, _join(path, f.name) + ("" if i is None else f"[{i}]"))


def config_from_dict(cls: type[T], data: Mapping[str, Any], overrides: Sequence[str] = (), validate: bool = True) -> T:
    """Builds ``cls`` from a raw mapping plus overrides, checking keys and types, then runs validation hooks."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"{cls!r} is not a dataclass type")
    if not isinstance(data, Mapping):
        raise ConfigError(f"a {cls.__name__} config must be a mapping, got {type(data).__name__}")
    cfg = _build(cls, apply_overrides(cls, data, overrides), "", cls)
    if validate:
        validate_config(cfg)
    return cfg


def load_config(cls: type[T], yaml_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Loads ``cls`` from a YAML file (or only defaults when ``yaml_path`` is None), then dotted overrides.

    Raises ``ConfigError`` for a missing or malformed file, an unknown key (with a did-you-mean and the valid
    keys of its section), a value of the wrong type (naming key, expected and given type) or a failed
    ``validate()`` hook.
    """
    data = _read_yaml(os.fspath(yaml_path), cls) if yaml_path is not None else {}
    return config_from_dict(cls, data, overrides)


def override_config(cfg: T, overrides: Sequence[str]) -> T:
    """A copy of ``cfg`` with dotted ``key=value`` overrides applied and validated (e.g. for sweeps)."""
    return config_from_dict(type(cfg), config_to_dict(cfg), overrides)


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML-safe data for a config: dataclasses become dicts, tuples become lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def format_config(cfg: Any) -> str:
    """The config as YAML text, headed by its class name (for printing the resolved config of a run)."""
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return f"# {type(cfg).__name__}\n{body}"


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Writes ``cfg`` as YAML to ``path`` atomically (temp file + rename: never a half-written file)."""
    files.atomic_write(path, format_config(cfg))


def split_cli_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Splits ``[CONFIG.yaml] key=value ...`` into the YAML path (or None) and the overrides.

    Raises ``ConfigError`` for a second YAML file or an argument that is neither a file nor ``key=value``.
    """
    path = None
    overrides = []
    for arg in argv:
        if "=" in arg:
            overrides.append(arg)
        elif arg.endswith((".yaml", ".yml")) and path is None:
            path = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}: give at most one CONFIG.yaml followed by key=value "
                              f"overrides (e.g. optimizer.lr=1e-6)")
    return path, overrides


# ------------------------------------------------------------------------------------------------------------
# The schema of train.py

Stage = Literal["pretrain", "sft", "dpo", "ram", "trra"]
DataFormat = Literal["auto", "sft", "chat", "preference", "text", "proposal_samples"]
Template = Literal["plain", "chat"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The model being trained.

    init:        ``scratch`` (build from ``arch``) or the path of a Hugging Face directory or ramjax checkpoint.
    arch:        the architecture of a model built from scratch, a ``ramjax.model.ModelConfig`` (its shape keys:
                 ``vocab_size`` — 0 takes the tokenizer's size —, ``hidden_size``, ``num_layers``, ``architecture``,
                 ``rope_scaling`` ...; dtypes, remat and attention are set here, token ids by the tokenizer). Aligner
                 size ablations change only these keys. Ignored when the model is loaded from a checkpoint (its own
                 config.json / ramjax_model.json wins).
    dtype:       compute dtype (``bfloat16`` as in the paper, ``float32`` for exact tests on CPU); logits and
                 softmax stay float32 and the trained model keeps ``param_dtype`` master weights.
    remat:       rematerialise each layer in the backward pass (less memory, ~1/3 more compute).
    attention_impl: how training/prefill attention runs (same function, different memory/speed): ``xla`` (float32
                 einsum, the reference), ``dot_product`` (``jax.nn.dot_product_attention``), ``cudnn`` (cuDNN flash
                 attention, NVIDIA GPUs, bf16), ``chunked`` (``attention_chunk`` queries at a time, any backend; scores
                 never exceed ``[batch, heads, chunk, seq]``), ``splash`` (Pallas splash attention, TPUs).
    attention_chunk: query block of ``chunked`` and the block size of ``splash`` (a multiple of 128 on TPU).
    loss_chunk_size: > 0 applies the LM head and the loss to this many sequence positions at a time, recomputed in
                 the backward pass (``loss.chunked_sums``), so no ``[batch, seq, vocab]`` logits exist for the whole
                 sequence (at Qwen's 152k vocabulary and 4k contexts they are GBs per row); 0 = off. Same values.
    """

    init: str = "scratch"
    arch: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(vocab_size=0))
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    remat: bool = False
    attention_impl: AttentionImpl = "xla"
    attention_chunk: int = 512
    loss_chunk_size: int = 0

    def validate(self) -> None:
        _check(bool(self.init.strip()), "model.init is empty; give 'scratch' or a model directory")
        _check(self.attention_chunk >= 1, f"model.attention_chunk={self.attention_chunk} must be >= 1")
        default = ModelConfig()
        for name in _ARCH_SET_ELSEWHERE:
            _check(getattr(self.arch, name) == getattr(default, name),
                   f"model.arch.{name} is not an architecture key: set "
                   + (f"model.{name}" if hasattr(self, name) else "the tokenizer (token ids come from it)"))
        _check(self.loss_chunk_size >= 0, f"model.loss_chunk_size={self.loss_chunk_size} must be >= 0 (0 = off)")

    @property
    def from_scratch(self) -> bool:
        return self.init == "scratch"

    def model_config(self, vocab_size: int | None = None, bos_token_id: int | None = None,
                     eos_token_id: int | tuple[int, ...] | None = None, pad_token_id: int | None = None
                     ) -> ModelConfig:
        """The ``ModelConfig`` of a from-scratch model: ``arch`` with this section's dtypes, remat and attention,
        the tokenizer's token ids, and ``vocab_size`` filling ``arch.vocab_size: 0``."""
        vocab = self.arch.vocab_size or vocab_size
        if not vocab:
            raise ConfigError("model.arch.vocab_size is 0 (from the tokenizer) but no tokenizer vocabulary size was "
                              "given; set model.arch.vocab_size or a tokenizer")
        return self.arch.replace(vocab_size=vocab, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                                 attention_impl=self.attention_impl, attention_chunk=self.attention_chunk,
                                 loss_chunk_size=self.loss_chunk_size,
                                 bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


# ``ModelConfig`` fields that a training config sets outside ``model.arch``
_ARCH_SET_ELSEWHERE = ("dtype", "param_dtype", "remat", "attention_impl", "attention_chunk", "loss_chunk_size",
                       "bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data (see ``ramjax.data``).

    train_files / eval_files: JSONL files (``source: jsonl``) or ArrayRecord files of JSON records (``grain``).
    format:      ``auto`` detects per file from the fields: ``proposal`` → proposal_samples (written by sample.py),
                 ``chosen``+``rejected`` → preference (TRL strings or message lists, HH-RLHF dialogues,
                 UltraFeedback-binarized), ``messages`` → chat, ``prompt``+``response``/``completion`` → sft,
                 ``text`` → text (pretraining). See ``ramjax.data`` for how each splits prompt and response.
    template:    how a ``prompt`` is rendered: ``plain`` (``"\\n\\nHuman: {prompt}\\n\\nAssistant: "``, the RAM
                 authors' template) or ``chat`` (the tokenizer's chat template).
    max_len:     tokens per row (prompt + response + EOS of one example, or of several when packing).
    max_prompt_len: prompts are cut from the left to this many tokens (BOS kept); responses are cut to fit
                 ``max_len``; an example left without a response token is skipped and counted.
    packing:     pack several examples per row (segment ids) instead of one right-padded example per row.
    batch_size:  global rows per step, over all hosts (each host gets batch_size / process_count).
    field_map:   renames source fields before parsing, e.g. ``{instruction: prompt, output: response}``.
    source:      ``jsonl``, ``hf`` (Hugging Face ``datasets``: local parquet/JSON/JSONL/CSV ``train_files`` and
                 ``eval_files``, or ``hf_path`` = a dataset directory or cached Hub dataset with ``hf_name`` and
                 ``split``), ``tfds`` (``tfds_name``, ``split``, ``tfds_data_dir``) or ``grain``; datasets, tfds and
                 grain are optional packages, imported only when used.
    """

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    format: DataFormat = "auto"
    template: Template = "plain"
    max_len: int = 512
    max_prompt_len: int = 256
    packing: bool = False
    batch_size: int = 64
    shuffle: bool = True
    field_map: dict[str, str] = dataclasses.field(default_factory=dict)
    source: Literal["jsonl", "hf", "tfds", "grain"] = "jsonl"
    hf_path: str | None = None
    hf_name: str | None = None
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    split: str = "train"

    def validate(self) -> None:
        _check(self.max_len > 1, f"data.max_len={self.max_len} must be > 1")
        _check(0 < self.max_prompt_len <= self.max_len,
               f"data.max_prompt_len={self.max_prompt_len} must be in [1, data.max_len={self.max_len}] (examples "
               f"whose prompt leaves no room for a response token are skipped and counted)")
        _check(self.batch_size > 0, f"data.batch_size={self.batch_size} must be positive")
        if self.source == "tfds":
            _check(bool(self.tfds_name), "data.source=tfds needs data.tfds_name (e.g. data.tfds_name=my_dataset)")
        if self.source == "hf":
            _check(bool(self.train_files) or bool(self.hf_path),
                   "data.source=hf needs data.train_files=[a.parquet,...] or data.hf_path=DATASET_DIR")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optax optimizer. The paper trains the aligner with RMSprop (lr 2e-7…1e-6) and clips gradients at norm 10.

    rms_decay is RMSprop's squared-gradient decay (PyTorch's ``alpha``, 0.99); momentum applies to rmsprop and
    sgd; b1/b2 to adamw. ``clip_norm: 0`` turns clipping off. ``grad_accum`` micro-batches per step split the
    global batch (which must be divisible by it).

    nonfinite: what a step whose loss or gradient norm is NaN/inf does. Either way its update is dropped on the
    device (the parameters and optimizer state stay those of the previous step, so no NaN is ever checkpointed or
    exported); ``stop`` then ends the run with ``NonFiniteTrainingError`` naming the step, ``skip`` carries on and
    stops only after more than ``max_skipped_steps`` such steps.
    """

    name: Literal["adamw", "rmsprop", "sgd"] = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    rms_decay: float = 0.99
    momentum: float = 0.0
    clip_norm: float = 10.0
    grad_accum: int = 1
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10

    def validate(self) -> None:
        _check(self.max_skipped_steps >= 0, f"optimizer.max_skipped_steps={self.max_skipped_steps} must be >= 0")
        _check(self.lr >= 0, f"optimizer.lr={self.lr} must be >= 0")
        _check(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"optimizer.b1={self.b1}, b2={self.b2} must be in [0, 1)")
        _check(0 <= self.rms_decay < 1, f"optimizer.rms_decay={self.rms_decay} must be in [0, 1)")
        _check(self.eps > 0, f"optimizer.eps={self.eps} must be positive")
        _check(self.momentum >= 0, f"optimizer.momentum={self.momentum} must be >= 0")
        _check(self.clip_norm >= 0, f"optimizer.clip_norm={self.clip_norm} must be >= 0 (0 = off)")
        _check(self.grad_accum >= 1, f"optimizer.grad_accum={self.grad_accum} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up from 0, then ``decay`` to ``final_lr_ratio``·lr at the last step.

    ``warmup_steps > 0`` overrides ``warmup_ratio`` (fraction of total steps; the paper uses 10%).
    """

    warmup_ratio: float = 0.1
    warmup_steps: int = 0
    decay: Literal["constant", "linear", "cosine"] = "linear"
    final_lr_ratio: float = 0.0

    def validate(self) -> None:
        _check(0 <= self.warmup_ratio <= 1, f"schedule.warmup_ratio={self.warmup_ratio} must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        _check(0 <= self.final_lr_ratio <= 1, f"schedule.final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")


_MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh ``(data, fsdp, tensor)``; ``-1`` on one axis takes all remaining devices.

    rules: overrides of logical-axis rules (``ramjax.sharding.DEFAULT_RULES``), e.g. ``{vocab: null}`` to replicate
    the vocabulary or ``{act_batch: [data, fsdp]}``; names not given keep their defaults.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, str | tuple[str, ...] | None] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        _check(all(s > 0 or s == -1 for s in sizes), f"mesh sizes must be positive or -1, got {sizes}")
        _check(sum(s == -1 for s in sizes) <= 1, f"mesh: at most one axis may be -1, got {sizes}")
        from ramjax.sharding import DEFAULT_RULES

        known = [name for name, _ in DEFAULT_RULES]
        for name, target in self.rules.items():
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"mesh.rules: unknown logical axis {name!r}{hint} Known: {', '.join(known)}")
            targets = (target,) if isinstance(target, str) else tuple(target or ())
            for t in targets:
                _check(t in _MESH_AXES, f"mesh.rules.{name}: {t!r} is not a mesh axis; use one of {_MESH_AXES}")

    def mesh_config(self):
        """The ``ramjax.sharding.MeshConfig`` of this section."""
        from ramjax.sharding import MeshConfig

        return MeshConfig(data=self.data, fsdp=self.fsdp, tensor=self.tensor)

    def sharding_rules(self) -> tuple[tuple[str, Any], ...]:
        """``DEFAULT_RULES`` with this section's overrides applied (same order)."""
        from ramjax.sharding import DEFAULT_RULES

        return tuple((name, self.rules.get(name, target) if name in self.rules else target)
                     for name, target in DEFAULT_RULES)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``run_dir/checkpoints``: every N steps (0 = only at the end), keep the last ``keep``;
    ``resume`` continues from the latest one; ``export_hf`` writes ``run_dir/hf`` when the model came from HF.
    ``async_save`` writes checkpoints in a background thread while training continues (the next save, the end of
    the run and a preemption wait for it)."""

    every: int = 1000
    keep: int = 3
    resume: bool = True
    export_hf: bool = True
    async_save: bool = False

    def validate(self) -> None:
        _check(self.every >= 0, f"checkpoint.every={self.every} must be >= 0 (0 = only the final step)")
        _check(self.keep >= 1, f"checkpoint.keep={self.keep} must be >= 1")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Metrics every N steps to ``run_dir/metrics.jsonl`` (+ TensorBoard in ``run_dir/tb``), process 0 only.

    eval_every: with ``data.eval_files``, the held-out objective (``eval/loss``, the objective's other metrics,
                ``eval/tokens``) is computed on every eval example every this many steps and at the last step
                (0: at the last step only).
    """

    every: int = 10
    eval_every: int = 100
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        _check(self.every >= 1, f"logging.every={self.every} must be >= 1")
        _check(self.eval_every >= 0, f"logging.eval_every={self.eval_every} must be >= 0 (0: evaluate the "
                                     f"data.eval_files at the last step only)")


@dataclasses.dataclass(frozen=True)
class RamConfig:
    """The RAM aligner loss ``-log Q(y_data|x) + alpha · log Q(y_neg|x)`` (sums over response tokens).

    alpha:      weight of the negative term; 1e-4 in the paper (ablated 1e-5…1e-1). The term is unbounded below,
                so alpha must be >= 0 and small.
    negatives:  where y_neg comes from: ``proposal`` (the one-time P_M sample written by sample.py, field
                ``proposal``) or ``rejected`` (the ``rejected`` response of preference data).
    """

    alpha: float = 1e-4
    negatives: Literal["proposal", "rejected"] = "proposal"

    def validate(self) -> None:
        loss_lib.validate_alpha(self.alpha)


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """DPO baseline: ``beta`` (TRL default 0.1), conservative-DPO ``label_smoothing`` in [0, 0.5), and
    ``rpo_alpha`` (TRL's name; RPO, Pang et al. 2024): weight of a token-mean NLL on the chosen responses added to
    the DPO loss, which keeps DPO from pushing the chosen responses' likelihood down with the rejected ones
    (0 = plain DPO; RPO uses 1)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0

    def validate(self) -> None:
        loss_lib.validate_dpo(self.beta, self.label_smoothing, self.rpo_alpha)


@dataclasses.dataclass(frozen=True)
class TrraConfig:
    """Training-time realignment: the teacher is softmax((lam·h_aligned + (1-lam)·h_reference) / temperature).

    lam > 1 extrapolates past the aligned model (paper: 0.5 … 10); any real value is allowed. ``direction``:
    ``forward`` = KL(teacher ‖ student), ``reverse`` = KL(student ‖ teacher). ``reference`` and ``aligned`` are
    model directories (ramjax or Hugging Face) sharing the student's vocabulary; the student starts from
    ``model.init`` (normally the reference). ``iterations > 1`` is iterated TrRa: round r trains a fresh student
    (from ``model.init``) in ``run_dir/round_r`` against the teacher whose aligned model is round r−1's student.
    ``teacher_topk = k > 0`` computes the teacher once before training, stored per response position as its top k
    tokens plus the mass of the rest (``run_dir/trra_teacher.npz``, host memory), and trains against that: the two
    teacher models leave the devices before the first step (needs ``data.packing: false``).
    """

    lam: float = 2.0
    direction: Literal["forward", "reverse"] = "forward"
    temperature: float = 1.0
    reference: str | None = None
    aligned: str | None = None
    iterations: int = 1
    teacher_topk: int = 0

    def validate(self) -> None:
        _check(self.temperature > 0, f"trra.temperature={self.temperature} must be positive")
        _check(self.teacher_topk >= 0, f"trra.teacher_topk={self.teacher_topk} must be >= 0 (0 = the full teacher "
                                       f"every step)")
        _check(self.lam == self.lam and abs(self.lam) != float("inf"), f"trra.lam={self.lam} must be finite")
        _check(self.iterations >= 1, f"trra.iterations={self.iterations} must be >= 1 (1 = plain TrRa)")


@dataclasses.dataclass(frozen=True)
class InraConfig:
    """Inference-time realignment: train only an InRa adapter layer (any stage but pretrain).

    With ``enabled``, a copy of the bottom decoder layer with zeroed attention-output and MLP-down projections is
    inserted below layer 0 of ``model.init`` (so training starts from the identity) and only it trains; the
    optimizer state exists for the adapter alone. ``adapter_init``: an adapter file (``run_dir/adapter.safetensors``
    of an earlier run) to start from instead. The run writes ``run_dir/adapter.safetensors`` and the L+1-layer
    model as ``run_dir/model`` (and ``run_dir/hf``); sample it with ``mode=inra``.
    """

    enabled: bool = False
    adapter_init: str | None = None


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs: ``jax.distributed.initialize(coordinator_address, num_processes, process_id)``.

    enabled: null (default) starts the distributed runtime when the environment shows several processes (a
    multi-host TPU slice, SLURM with several tasks, Open MPI, or ``JAX_COORDINATOR_ADDRESS``; see
    ``ramjax.distributed``); true always; false never (one process). Leave the three settings null to let JAX
    detect them (TPU pods, SLURM) or to take ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``.
    """

    enabled: bool | None = None
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def validate(self) -> None:
        if self.num_processes is not None:
            _check(self.num_processes >= 1, f"distributed.num_processes={self.num_processes} must be >= 1")
            if self.process_id is not None:
                _check(0 <= self.process_id < self.num_processes,
                       f"distributed.process_id={self.process_id} must be in [0, {self.num_processes})")


# which data formats each stage can read (besides ``auto``)
_STAGE_FORMATS = {
    "pretrain": ("text", "sft", "chat", "preference", "proposal_samples"),
    "sft": ("sft", "chat", "preference", "proposal_samples", "text"),
    "trra": ("sft", "chat", "preference", "proposal_samples"),
    "dpo": ("preference",),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run of ``train.py``.

    stage:    ``pretrain`` (next-token loss on text), ``sft`` (responses only; the P_M warm-up and the SFT
              baseline), ``dpo`` (baseline), ``ram`` (the residual aligner Q_θ), ``trra`` (training-time
              realignment).
    run_dir:  everything the run writes: config.yaml, metrics.jsonl, tb/, checkpoints/, hf/.
    steps:    optimizer steps; 0 = ``tokens`` (rows × max_len per step) when set, else ``epochs`` passes over the
              data.
    tokenizer: tokenizer path (directory or file); null = the model's own (required for ``model.init: scratch``).
    proposal: stage ram only: the proposal model directory, read only to check that vocabularies match.
    """

    program: Literal["train"] = "train"
    stage: Stage = "sft"
    run_dir: str = "runs/default"
    seed: int = 0
    steps: int = 0
    epochs: float = 1.0
    tokens: int = 0
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    tokenizer: str | None = None
    proposal: str | None = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    ram: RamConfig = dataclasses.field(default_factory=RamConfig)
    dpo: DpoConfig = dataclasses.field(default_factory=DpoConfig)
    trra: TrraConfig = dataclasses.field(default_factory=TrraConfig)
    inra: InraConfig = dataclasses.field(default_factory=InraConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def validate(self) -> None:
        _check(self.steps >= 0, f"steps={self.steps} must be >= 0 (0 = from epochs)")
        _check(self.steps > 0 or self.tokens > 0 or self.epochs > 0,
               f"steps=0 and tokens=0 need epochs > 0, got epochs={self.epochs}")
        _check(self.tokens >= 0, f"tokens={self.tokens} must be >= 0 (0 = from epochs)")
        _check(bool(self.run_dir.strip()), "run_dir is empty")
        _check(self.data.batch_size % self.optimizer.grad_accum == 0,
               f"data.batch_size={self.data.batch_size} must be divisible by "
               f"optimizer.grad_accum={self.optimizer.grad_accum}")
        if self.model.from_scratch:
            _check(self.tokenizer is not None,
                   "model.init=scratch has no tokenizer of its own; set tokenizer=PATH (a tokenizer directory or file)")
            _check(self.model.arch.max_position_embeddings >= self.data.max_len,
                   f"model.arch.max_position_embeddings={self.model.arch.max_position_embeddings} is smaller than "
                   f"data.max_len={self.data.max_len}")
        fmt = self.data.format
        if fmt != "auto":
            if self.stage == "ram":
                want = "proposal_samples" if self.ram.negatives == "proposal" else "preference"
                _check(fmt == want, f"stage=ram with ram.negatives={self.ram.negatives} reads data.format={want!r}, "
                                    f"not {fmt!r}" + ("; for preference data set ram.negatives=rejected"
                                                      if fmt == "preference" else ""))
            else:
                _check(fmt in _STAGE_FORMATS[self.stage],
                       f"stage={self.stage} cannot train on data.format={fmt!r}; use one of "
                       f"{', '.join(_STAGE_FORMATS[self.stage])} or auto")
        if self.stage == "trra":
            _check(self.trra.reference is not None and self.trra.aligned is not None,
                   "stage=trra needs trra.reference and trra.aligned (model directories)")
        if self.inra.enabled:
            _check(self.stage != "pretrain", "inra.enabled trains an adapter on top of a trained model; use it with "
                                             "stage=sft, dpo, ram or trra, not pretrain")
            _check(not self.model.from_scratch, "inra.enabled needs model.init=PATH (the model the adapter "
                                                "realigns), not scratch")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """``python train.py configs/tokenizer.yaml``: a sentencepiece BPE trained on JSONL files (any data format).

    files: the corpus (text records as is; prompt/response records in the plain dialogue template).
    out_dir: where tokenizer.model + tokenizer_config.json go (pass it as ``tokenizer=`` to the stage configs).
    vocab_size: pieces; 0 = sized from the corpus (``ramjax.tokenizer.auto_vocab_size``).
    """

    program: Literal["tokenizer"] = "tokenizer"
    files: tuple[str, ...] = ()
    out_dir: str = "runs/tokenizer"
    vocab_size: int = 0
    seed: int = 0
    format: str = "auto"

    def validate(self) -> None:
        _check(bool(self.files), "files is empty; set files=[corpus.jsonl,...]")
        _check(self.vocab_size == 0 or self.vocab_size > 260,
               f"vocab_size={self.vocab_size}: 0 (from the corpus) or > 260 (4 special ids and 256 bytes come first)")


# ------------------------------------------------------------------------------------------------------------
# The schema of sample.py


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """One run of ``sample.py``: the aligned model P_M·Q_θ (or either alone) sampled token by token.

    proposal, aligner: model directories (HF or ramjax checkpoints); mode ``inra``: ``proposal`` is the base model
                 and ``adapter`` the adapter file of an ``inra.enabled`` training run.
    sampling:    a ``ramjax.SamplingParams`` (``ramjax.sampling_params``, the one home of every sampling setting and
                 its default): mode (``proposal`` — P_M alone, also how the one-time RAM training samples are drawn —
                 ``aligner``, ``par``, ``sparse``, ``product``, ``inra``), n, max_new_tokens, temperatures, top-p/top-k,
                 repetition penalty, KL threshold and fallback, product support, stop strings, greedy, InRa λ,
                 template, decode dtype. Its defaults are the authors' released settings (proposal T 0.5 / top-p
                 0.95, aligner T 0.5 / top-p 0.9, penalty 1.05, KL monitor 0.1); the authors drew their one-time
                 training samples with the ``release`` preset (top-k 10), the pipeline with ``sampled`` (T 1).
                 ``sample.py`` also accepts the bare field names (``mode=sparse`` = ``sampling.mode=sparse``) and
                 ``lambda=`` for ``sampling.inra_lambda=``.
    lambda_field: mode ``inra``: a prompt record with this field uses its own λ (else ``sampling.inra_lambda``).
    output_file:  JSONL (one line per sample); alpaca_output: AlpacaEval JSON (instruction, output, generator).
    mesh:        the mesh of each process's own devices: with several processes (``distributed``, detected on TPU
                 pods and SLURM) every process holds the models and samples its share of the prompts; process 0
                 writes the one, ordered output.
    aligner_tokenizer: ``own`` (the aligner directory must hold its tokenizer files; its vocabulary is checked
                 against the proposal's) or ``proposal`` (an aligner saved without tokenizer files uses the
                 proposal's, with a warning: only when you know it was trained with that tokenizer).
    """

    proposal: str = ""
    aligner: str | None = None
    adapter: str | None = None
    prompts_file: str = ""
    output_file: str = "samples.jsonl"
    alpaca_output: str | None = None
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    lambda_field: str = "lambda"
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 8
    generator: str = "ramjax"
    aligner_tokenizer: Literal["own", "proposal"] = "own"
    mesh: MeshSection = dataclasses.field(default_factory=lambda: MeshSection(data=-1, fsdp=1, tensor=1))
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def validate(self) -> None:
        # the sampling section validates itself (SamplingParams.validate, run first by validate_config)
        _check(bool(self.proposal), "proposal is empty; set proposal=PATH (a HF directory or ramjax checkpoint)")
        _check(bool(self.prompts_file), "prompts_file is empty; set prompts_file=PATH (JSONL with prompt/messages/"
                                        "instruction)")
        mode = self.sampling.mode
        if mode not in ("proposal", "inra"):
            _check(self.aligner is not None, f"sampling.mode={mode} needs aligner=PATH")
        if mode == "inra":
            _check(self.adapter is not None, "mode=inra needs adapter=PATH (the adapter.safetensors of an "
                                             "inra.enabled training run) and proposal=PATH (its base model)")
        _check(self.num_samples >= 1, f"num_samples={self.num_samples} must be >= 1")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
