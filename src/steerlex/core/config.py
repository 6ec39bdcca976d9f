"""Config dataclasses: every option's default and help text in one place, read strictly.

A stage's config is a dataclass whose fields are declared with :func:`option` (default,
help text, and how the option appears on the command line) or :func:`section` (a nested
config). From that one declaration come the CLI flags (``steerlex.cli.options``), the
sections of ``steerlex run``'s config, and the generated reference docs.

:func:`build_strict` builds such a dataclass from a plain JSON object, strictly: unknown
keys and wrong types raise the caller's error class naming the key (``sets.n_benign``) and
what is allowed; a nested section given in part keeps its other defaults; keys a section
marks as *owned* (set by whoever embeds it, e.g. the run's model and paths) are refused.

A class whose JSON keys depend on its content (a defence's keys on its kind) reads and
writes its own object: :func:`build_strict` builds it with its classmethod
``from_config(data, path, error)`` and :func:`config_to_dict` writes it with its
``to_config()``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from steerlex.core.errors import SteerlexError
from steerlex.core.io import read_json_object

T = TypeVar("T")

__all__ = [
    "OptionInfo",
    "build_strict",
    "config_to_dict",
    "from_dict_strict",
    "inherit",
    "merge",
    "narrow",
    "option",
    "option_info",
    "read_json_config",
    "section",
]

_NO_DEFAULT: Any = dataclasses.MISSING


def option(
    default: Any = _NO_DEFAULT,
    *,
    help: str | Callable[[], str],
    factory: Any = _NO_DEFAULT,
    flag: str | None = None,
    choices: Any = None,
    required: bool = False,
    repeat: bool = False,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with its help text and CLI form.

    ``default`` or ``factory`` (for lists): the default, written once. ``flag``: the CLI
    flag's name when it differs from the field's (``source`` for ``sources``). ``choices``:
    allowed values, or a callable returning them (read at parse time, e.g. a registry's
    names). ``required``: the CLI demands it (the dataclass still has a default, so a
    config that embeds the stage can fill it in; ``validate()`` checks it). ``repeat``: a
    list given by repeating the flag (``--source a --source b``) instead of ``nargs="+"``.
    ``cli=False``: not a CLI flag (config files only). ``help`` may be a callable (text
    built from a registry when asked).
    """
    meta = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "required": required,
        "repeat": repeat,
        "metavar": metavar,
        "cli": cli,
    }
    if factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(factory: Any, *, help: str, owned: tuple[str, ...] = ()) -> Any:
    """A nested config field (built by ``factory`` by default). ``owned``: keys of the
    nested config that the embedding config sets itself; a user may not give them, and
    :func:`config_to_dict` leaves them out."""
    return dataclasses.field(
        default_factory=factory, metadata={"help": help, "owned": tuple(owned), "cli": False}
    )


def inherit(cls: type, name: str) -> Any:
    """A field with the same default and metadata as field ``name`` of dataclass ``cls``:
    a config that repeats an option of a library options class refers to it instead of
    typing its default and help again."""
    f = {x.name: x for x in fields(cls)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


def narrow(obj: Any, cls: type[T]) -> T:
    """An instance of dataclass ``cls`` with ``obj``'s values for ``cls``'s fields (e.g. the
    library options inside a stage config that extends them)."""
    return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One option of a config class, as the CLI and the docs see it."""

    name: str
    type: Any
    default: Any
    help: str
    flag: str
    choices: Any
    required: bool
    repeat: bool
    metavar: str | None
    cli: bool
    owned: tuple[str, ...]
    nested: bool


def _text(value: Any) -> str:
    return str(value() if callable(value) else value)


def option_info(cls: type) -> list[OptionInfo]:
    """Every field of config dataclass ``cls`` with its type, default and help."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        meta = f.metadata
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None if f.default is dataclasses.MISSING else f.default
        tp = hints[f.name]
        out.append(
            OptionInfo(
                name=f.name,
                type=tp,
                default=default,
                help=_text(meta.get("help", "")),
                flag=str(meta.get("flag") or f.name),
                choices=meta.get("choices"),
                required=bool(meta.get("required", False)),
                repeat=bool(meta.get("repeat", False)),
                metavar=meta.get("metavar"),
                cli=bool(meta.get("cli", True)),
                owned=tuple(meta.get("owned", ())),
                nested=is_dataclass(tp),
            )
        )
    return out


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
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of ({_type_name(typing.get_args(tp)[0])})"
    if origin is dict:
        value = typing.get_args(tp)[1]
        return "a JSON object" if value is Any else "an object of strings"
    return str(tp)


def _coerce(value: Any, tp: Any, path: str, error: type[SteerlexError]) -> Any:
    origin = typing.get_origin(tp)
    bad = error(
        f"Config key '{path}' must be {_type_name(tp)}, got "
        f"{json.dumps(value, default=repr)[:80]} ({type(value).__name__})."
    )
    if tp is Any:
        return value
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        if float in typing.get_args(tp) and isinstance(value, float) and not math.isfinite(value):
            raise error(f"Config key '{path}' must be a finite number, got {value}.")
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path, error)
            except error as exc:
                # the value has this member's JSON shape: its own error is the one to show
                same_shape = (is_dataclass(arg) and isinstance(value, dict)) or (
                    typing.get_origin(arg) is list and isinstance(value, list)
                )
                if same_shape:
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
    reader = getattr(tp, "from_config", None) if isinstance(tp, type) else None
    if reader is not None:  # a class that reads its own JSON object (module docstring)
        if not isinstance(value, dict):
            raise bad
        return reader(value, path, error)
    if is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, path, error)
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
            if not math.isfinite(value):  # JSON's NaN / Infinity, as Python's json reads them
                raise error(f"Config key '{path}' must be a finite number, got {value}.")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _check_choices(value: Any, choices: Any, path: str, error: type[SteerlexError]) -> None:
    """Raise unless ``value`` (or each item of a list) is one of an option's ``choices``."""
    if choices is None or value is None:
        return
    allowed = tuple(choices() if callable(choices) else choices)
    for item in value if isinstance(value, list) else [value]:
        if item not in allowed:
            raise error(
                f"Config key '{path}' is {json.dumps(item, default=repr)}; choose one of "
                f"{', '.join(map(str, allowed))}."
            )


def _refuse_owned(cls: type, data: dict[str, Any], prefix: str, error: type[SteerlexError]) -> None:
    """Raise when ``data`` (as given, defaults not merged in) sets a key a section owns."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        value = data.get(f.name)
        if not isinstance(value, dict) or not is_dataclass(hints[f.name]):
            continue
        owned = sorted(set(value) & set(f.metadata.get("owned", ())))
        if owned:
            raise error(
                f"Config key(s) {[prefix + f.name + '.' + o for o in owned]} are set by the run "
                "itself (from its model, layer, device and the outputs of earlier stages); "
                "remove them."
            )
        _refuse_owned(hints[f.name], value, f"{prefix}{f.name}.", error)


def build_strict(cls: type[T], data: dict[str, Any], path: str, error: type[SteerlexError]) -> T:
    """The dataclass ``cls`` from ``data``, nested dataclasses and typed lists included; an
    unknown key, a wrong type, a value outside an option's choices or a missing required key
    raises ``error`` naming the full key path (``path`` prefixes every name); so does a NaN
    or infinite number (Python's JSON reader accepts ``NaN`` and ``Infinity``). A nested
    section given in part keeps the defaults of its other keys; a key a :func:`section` owns
    raises."""
    _refuse_owned(cls, data, f"{path}." if path else "", error)
    return _build(cls, data, path, error)


def _build(cls: type[T], data: dict[str, Any], path: str, error: type[SteerlexError]) -> T:
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    prefix = f"{path}." if path else ""
    what = f"config key(s) under '{path}':" if path else "config key(s)"
    kwargs = {}
    for k, v in data.items():
        f = by_name.get(k)
        nested = f is not None and isinstance(v, dict) and is_dataclass(hints[k])
        if nested and f is not None and f.default_factory is not dataclasses.MISSING:
            v = merge(config_to_dict(f.default_factory(), keep_owned=True), v)
        kwargs[k] = _coerce(v, hints[k], prefix + k, error) if k in hints else v
        if f is not None:
            _check_choices(kwargs[k], f.metadata.get("choices"), prefix + k, error)
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
    return read_json_object(Path(path), what=what, fix="fix or replace the file", error=error)


def config_to_dict(cfg: Any, *, keep_owned: bool = False) -> Any:
    """A JSON-ready dict of a config (dataclasses and source specs included). Keys that a
    :func:`section` owns are left out unless ``keep_owned``."""
    writer = getattr(cfg, "to_config", None)
    if writer is not None and not isinstance(cfg, type):  # writes its own JSON object
        return writer()
    if is_dataclass(cfg) and not isinstance(cfg, type):
        out = {}
        for f in fields(cfg):
            value = config_to_dict(getattr(cfg, f.name), keep_owned=keep_owned)
            owned = f.metadata.get("owned", ())
            if owned and isinstance(value, dict) and not keep_owned:
                value = {k: v for k, v in value.items() if k not in owned}
            out[f.name] = value
        return out
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v, keep_owned=keep_owned) for v in cfg]
    return cfg
