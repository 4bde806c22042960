"""The config tree as plain dicts: typed dict → dataclass (:func:`from_dict`), back
(:func:`to_dict`, :func:`flatten`), and dotted-key overrides (``--set a.b=v``, Tune's trial
configs). Generic over frozen dataclasses; an unknown key or a wrong type is a one-line
:class:`ConfigError` naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any

import yaml

from cliplab.errors import ConfigError


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and coerce where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown config key '{prefix}{name}'{hint}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a nested dict, rejecting unknown keys and bad types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in known:
            raise _unknown_key(cls, name, prefix)
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The nested plain-dict form (tuples become lists), as written to YAML/JSON and MLflow."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-3" -> ("train.lr", 0.001)``; values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """A copy of ``cfg`` with dotted-key overrides applied and type-checked."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        cls = type(cfg)
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            prefix = ".".join(parts[:i]) + ("." if i else "")
            if part not in {f.name for f in dataclasses.fields(cls)}:
                raise _unknown_key(cls, part, prefix)
            if i == len(parts) - 1:
                node[part] = value
            else:
                sub = typing.get_type_hints(cls)[part]
                if not _is_dataclass_type(sub):
                    raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
                node, cls = node[part], sub
    return from_dict(type(cfg), data)
