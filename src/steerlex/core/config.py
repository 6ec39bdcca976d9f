"""Build config dataclasses from plain JSON objects, strictly: unknown keys and wrong types
raise the caller's error class naming the key (``sets.n_benign``) and what is allowed."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from steerlex.core.errors import SteerlexError

T = TypeVar("T")

__all__ = [
    "build_strict",
    "config_to_dict",
    "from_dict_strict",
    "merge",
    "read_json_config",
]


def from_dict_strict(
    cls: type[T], data: dict[str, Any], what: str, error: type[SteerlexError] = SteerlexError
) -> T:
    """``cls(**data)``, but an unknown key raises ``error`` naming it and the known keys."""
    assert is_dataclass(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise error(f"Unknown {what} {unknown}; known: {sorted(names)}.")
    return cls(**data)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any JSON value"
    if isinstance(tp, type):
        return {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true/false",
            "SourceSpec": 'a source object {"source": ...}',
        }.get(tp.__name__, tp.__name__)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of ({_type_name(typing.get_args(tp)[0])})"
    if origin is dict:
        value = typing.get_args(tp)[1]
        return "a JSON object" if value is Any else "an object of strings"
    return str(tp)


def _coerce(value: Any, tp: Any, path: str, error: type[SteerlexError]) -> Any:
    origin = typing.get_origin(tp)
    bad = error(
        f"Config key '{path}' must be {_type_name(tp)}, got {json.dumps(value)[:80]} "
        f"({type(value).__name__})."
    )
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path, error)
            except error as exc:
                if is_dataclass(arg) and isinstance(value, dict):
                    raise exc from None
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, f"{path}[{i}]", error) for i, v in enumerate(value)]
    if origin is dict:
        any_value = typing.get_args(tp)[1] is Any
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and (any_value or isinstance(v, str)) for k, v in value.items()
        ):
            raise bad
        return dict(value)
    if is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise bad
        return build_strict(tp, value, path, error)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def build_strict(cls: type[T], data: dict[str, Any], path: str, error: type[SteerlexError]) -> T:
    """The dataclass ``cls`` from ``data``, nested dataclasses and typed lists included; an
    unknown key, a wrong type or a missing required key raises ``error`` naming the full key
    path (``path`` prefixes every name)."""
    hints = typing.get_type_hints(cls)
    prefix = f"{path}." if path else ""
    what = f"config key(s) under '{path}':" if path else "config key(s)"
    kwargs = {
        k: _coerce(v, hints[k], prefix + k, error) if k in hints else v for k, v in data.items()
    }
    if set(kwargs) <= set(hints):
        required = [
            f.name
            for f in fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in kwargs]
        if missing:
            raise error(f"Config is missing {', '.join(prefix + k for k in missing)}.")
    return from_dict_strict(cls, kwargs, what, error)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, recursively for objects (lists are replaced)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_json_config(path: str | Path, what: str, error: type[SteerlexError]) -> dict[str, Any]:
    """The JSON object in the config file ``path`` (not yet checked against a dataclass)."""
    from steerlex.core.io import read_json_object

    return read_json_object(Path(path), what=what, fix="fix or replace the file", error=error)


def config_to_dict(cfg: Any) -> Any:
    """A JSON-ready dict of a config (dataclasses and source specs included)."""
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, list):
        return [config_to_dict(v) for v in cfg]
    return cfg
