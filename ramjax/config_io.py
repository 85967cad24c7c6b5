"""Typed configs in and out: nested dataclasses loaded from YAML and dotted ``key=value`` overrides, checked,
validated, printed and saved. This module knows no ramjax schema (those are in ``ramjax.config``, which re-exports
the functions here).

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

T = TypeVar("T")

__all__ = [
    "ConfigError", "load_config", "config_from_dict", "override_config", "config_to_dict", "save_config",
    "format_config", "validate_config", "split_cli_args", "read_yaml", "apply_overrides",
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
    own shape, and a partial mapping changes only the keys it names. A mapping of sections (``dict[str, Section]``)
    likewise keeps its default entries: a mapping given for it adds entries or changes the keys it names in one
    (``pipeline.sampling.release.top_k=5`` leaves the other presets and release's other settings as they were)."""
    out = None
    for f in dataclasses.fields(cls):
        if (f.name in data and isinstance(data[f.name], Mapping) and f.default_factory is not dataclasses.MISSING):
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                out = dict(data) if out is None else out
                out[f.name] = {**_fields_of(default), **data[f.name]}
            elif isinstance(default, Mapping) and default and all(dataclasses.is_dataclass(v)
                                                                  for v in default.values()):
                out = dict(data) if out is None else out
                merged = {k: _fields_of(v) for k, v in default.items()}
                for k, v in data[f.name].items():
                    merged[k] = {**merged[k], **v} if k in merged and isinstance(v, Mapping) else v
                out[f.name] = merged
    return data if out is None else out


def _fields_of(section: Any) -> dict[str, Any]:
    return {g.name: getattr(section, g.name) for g in dataclasses.fields(section) if g.init}


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
