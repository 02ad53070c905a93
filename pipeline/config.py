"""Frozen-dataclass configs and one generic loader for every job.

A job's YAML file is nothing but a serialized config dataclass. :func:`load_config` builds any
(nested) frozen dataclass from a YAML path or a dict plus ``section.field=value`` overrides, and
rejects unknown or ill-typed fields before any work starts, naming the field::

    cfg = load_config(TokenizeJobConfig, "tokenize.yaml", ["tokenize.batch_size=64"])

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Optional[X]``, ``Literal[...]``,
``tuple[X, ...]``, ``list[X]``, ``dict[str, X]`` and nested dataclasses.

A job config class may declare two class attributes the loader reads:

- ``PRESETS``: named starting points (``--preset NAME``), plain dicts merged under the YAML file;
- ``RENAMED``: old dotted keys → their new names; an old key is rejected with a message naming the new
  one (the vocabulary is one word per idea across jobs: ``output.uri``, ``compute.workers``, …).

Precision values are spelled ``fp32`` / ``bf16`` / ``fp16`` everywhere; ``float32`` / ``bfloat16`` /
``float16`` are rejected with the new spelling.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import field
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


# the one spelling of a precision; the torch spellings are rejected with the new one
RESPELLED = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class ConfigError(ValueError):
    """A config field is unknown, missing, ill-typed or out of range; the message names the field."""


# ---------------------------------------------------------------------------------------------------
# Generic loader


def load_config(cls: type[T], source: Union[str, os.PathLike, Mapping[str, Any], None] = None,
                overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` (a dataclass) from a YAML path / mapping / None plus ``a.b=value`` overrides.

    Override values are parsed as YAML scalars/lists (``64``, ``null``, ``[train, val]``); a leading
    ``--`` is accepted (``--tokenize.batch_size=64``). Raises :class:`ConfigError` naming the field
    for unknown fields, missing required fields, wrong types and failed ``__post_init__`` checks.
    """
    if source is None:
        data: dict = {}
    elif isinstance(source, Mapping):
        data = _deepcopy_mapping(source)
    else:
        with open(os.fspath(source), encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{os.fspath(source)}: expected a mapping at the top level, got "
                              f"{type(loaded).__name__}")
        data = _deepcopy_mapping(loaded)
    renamed = getattr(cls, "RENAMED", {})
    for old, new in renamed.items():
        if _has_path(data, old.split(".")):
            raise ConfigError(f"{old}: renamed to {new}; write {new} instead")
    for item in overrides:
        _apply_override(cls, data, item)
    return _build(cls, data, prefix="")


def _has_path(data: Any, parts: list[str]) -> bool:
    for name in parts:
        if not isinstance(data, Mapping) or name not in data:
            return False
        data = data[name]
    return True


def config_to_dict(cfg: Any) -> Any:
    """Dataclass → plain JSON/YAML-friendly structure (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Any) -> str:
    """Dataclass → YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _deepcopy_mapping(m: Mapping) -> dict:
    return {k: _deepcopy_mapping(v) if isinstance(v, Mapping) else v for k, v in m.items()}


def _apply_override(cls: type, data: dict, item: str) -> None:
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"override {item!r}: expected section.field=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    renamed = getattr(cls, "RENAMED", {})
    for i in range(len(parts), 0, -1):
        old = ".".join(parts[:i])
        if old in renamed:
            new = renamed[old] + dotted.strip()[len(old):]
            raise ConfigError(f"{dotted.strip()}: renamed to {new}; write {new}={raw}")
    # Walk the dataclass types so the value can be parsed for the field's type.
    target_cls: Any = cls
    node = data
    for i, name in enumerate(parts):
        where = ".".join(parts[:i + 1])
        fields = {f.name: f for f in dataclasses.fields(target_cls)}
        if name not in fields:
            raise ConfigError(f"{where}: unknown field (override {item!r}); known fields of "
                              f"{'.'.join(parts[:i]) or target_cls.__name__}: {sorted(fields)}")
        ftype = _hints(target_cls)[name]
        if i == len(parts) - 1:
            node[name] = _parse_override_value(raw, ftype)
        else:
            inner = _strip_optional(ftype)
            if not (isinstance(inner, type) and dataclasses.is_dataclass(inner)):
                raise ConfigError(f"{where}: is not a section (override {item!r})")
            child = node.get(name)
            if not isinstance(child, dict):
                child = {}
                node[name] = child
            node, target_cls = child, inner


def _parse_override_value(raw: str, ftype: Any) -> Any:
    inner = _strip_optional(ftype)
    if inner is str and raw.strip() not in ("null", "~"):
        return raw  # a str field keeps the text verbatim ("007" stays "007")
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


_HINT_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINT_CACHE:
        _HINT_CACHE[cls] = typing.get_type_hints(cls)
    return _HINT_CACHE[cls]


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _build(cls: type, data: Any, prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or cls.__name__
        if isinstance(data, str) and "uri" in fields:  # a location that became a section (issue 12)
            raise ConfigError(f"{where}: now a section; write {where}.uri={data}")
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}{u}" for u in unknown)
        raise ConfigError(f"{names}: unknown field(s); known fields of {prefix.rstrip('.') or cls.__name__}: "
                          f"{sorted(fields)}")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        where = f"{prefix}{name}"
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required field is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _convert(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: {value!r} matches none of {tp}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in RESPELLED and RESPELLED[value] in allowed:
            raise ConfigError(f"{where}: {value!r} is spelled {RESPELLED[value]!r}")
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {list(allowed)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value if value is not None else {}, prefix=f"{where}.")
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [_convert(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = (typing.get_args(tp) + (Any, Any))[:2]
        return {_convert(k, kt, f"{where}.<key>"): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected a bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


# ---------------------------------------------------------------------------------------------------
# Locations: fields holding a path or URL, resolved once on the driver

LOCATION = "enat.location"  # dataclass field metadata key marking a path/URL field


def location(default: Any = "", *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that holds a path or URL (``field(metadata={LOCATION: True})``).

    :func:`resolve_locations` makes every such field absolute on the driver, so Ray workers whose
    working directory differs (Ray Train workers, the nodes of a cluster) read the same files.
    Values may be a string, a tuple/list of strings or a dict of strings (each resolved).
    """
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={LOCATION: True})
    return field(default=default, metadata={LOCATION: True})


def absolute_location(value: str, cwd: Optional[str] = None) -> str:
    """A relative local path → an absolute one (against ``cwd``, default the process's); ``~`` expanded.

    ``file:`` URLs keep their scheme (``file://rel/x`` and ``file:rel/x`` become ``file:///<cwd>/rel/x``);
    ``sqlite:///rel.db`` (an MLflow store) becomes ``sqlite:////<cwd>/rel.db``; other URLs (``s3://``,
    ``gs://``, ``http://``, ``memory://`` …), ``models:/…`` registry URIs and empty values are returned unchanged.
    """
    if not value:
        return value
    cwd = cwd or os.getcwd()

    def absolute(path: str) -> str:
        return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))

    low = value.lower()
    if low.startswith("sqlite:///"):
        return "sqlite:///" + absolute(value[len("sqlite:///"):])
    if low.startswith("file://"):
        return "file://" + absolute(value[len("file://"):])
    if low.startswith("file:"):
        return "file://" + absolute(value[len("file:"):])
    if "://" in value or low.startswith("models:/"):  # URLs, and MLflow registry URIs (models:/name/1)
        return value
    return absolute(value)


def resolve_locations(cfg: T, cwd: Optional[str] = None) -> T:
    """``cfg`` with every :func:`location` field (in nested dataclasses too) made absolute.

    Called where a job's config is built on the driver (:func:`parse_job_args`), before anything is
    checked or handed to Ray; idempotent, so resolving an already resolved config changes nothing.
    """
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        return cfg
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get(LOCATION):
            new = _resolve_value(value, cwd)
        else:
            new = resolve_locations(value, cwd)
        if new is not value and new != value:
            changes[f.name] = new
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _resolve_value(value: Any, cwd: Optional[str]) -> Any:
    if isinstance(value, str):
        return absolute_location(value, cwd)
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve_value(v, cwd) for v in value)
    if isinstance(value, Mapping):
        return {k: _resolve_value(v, cwd) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------
# The command line every job shares


def merge_dicts(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    """Recursive dict merge: ``over`` wins; nested mappings are merged, other values replaced."""
    out = _deepcopy_mapping(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = _deepcopy_mapping(v) if isinstance(v, Mapping) else v
    return out


def parse_job_args(cls: type[T], argv: Optional[Sequence[str]], prog: str, description: str) -> T:
    """The command line every job shares: ``[--preset NAME] [--config x.yaml] [section.field=value ...]``.

    The preset (one of ``cls.PRESETS``) is the base, the YAML file is merged over it, the overrides
    are applied last; the result is validated by :func:`load_config` (errors name the field) before any work starts.
    """
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description,
                                epilog="Every field of the config can be overridden as section.field=value.")
    presets: Mapping[str, Mapping[str, Any]] = getattr(cls, "PRESETS", {})
    p.add_argument("--config", help=f"YAML file holding a {cls.__name__}")
    if presets:
        p.add_argument("--preset", choices=sorted(presets), help="start from a named preset")
    p.add_argument("--verbose", action="store_true", help="show Ray's own log lines too (ray.verbose=true)")
    p.add_argument("overrides", nargs="*", help="section.field=value (a leading -- is accepted)")
    args, extra = p.parse_known_args(argv)
    unknown = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    base: dict[str, Any] = dict(presets[args.preset]) if presets and args.preset else {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{args.config}: expected a mapping at the top level, got {type(loaded).__name__}")
        base = merge_dicts(base, loaded)
    # relative paths are resolved here, on the driver: workers may run in another directory
    overrides = list(args.overrides) + extra + (["ray.verbose=true"] if args.verbose else [])
    return resolve_locations(load_config(cls, base, overrides))
