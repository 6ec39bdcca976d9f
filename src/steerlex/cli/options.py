"""CLI flags derived from config dataclasses, and small printing helpers.

A command adds its stage config's options with :func:`add_options` (one flag per field:
name, type, default, choices and help all come from the field's
:func:`~steerlex.core.config.option`), and rebuilds the config from the parsed arguments
with :func:`config_from_args`. Nothing about an option is typed twice.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from steerlex.core.config import OptionInfo, option_info
from steerlex.jobs.context import RunContext

__all__ = [
    "add_options",
    "add_quiet",
    "config_from_args",
    "context_from_args",
    "finite_float",
    "flag_name",
    "given_options",
    "print_table",
]

T = TypeVar("T")


def flag_name(info: OptionInfo) -> str:
    """``--max-length`` for the option ``max_length``."""
    return "--" + info.flag.replace("_", "-")


def finite_float(text: str) -> float:
    """The type of every float flag: a number, NaN and infinities refused (argparse prints
    the flag's name with the message and exits with status 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _base_type(tp: Any) -> tuple[Any, bool]:
    """``(the type without None, whether None was allowed)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), len(args) < len(typing.get_args(tp))
    return tp, False


def _default_text(info: OptionInfo) -> str:
    d = info.default
    if isinstance(d, bool):
        return f" (default: {'on' if d else 'off'})"
    if d is None or d == "" or d == [] or "default" in info.help:
        return ""
    if isinstance(d, list):
        return f" (default {' '.join(str(v) for v in d)})"
    return f" (default {d})"


def _choices(info: OptionInfo, base: Any) -> Sequence[Any] | None:
    if info.choices is not None:
        return tuple(info.choices() if callable(info.choices) else info.choices)
    if typing.get_origin(base) is typing.Literal:
        return typing.get_args(base)
    return None


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: Sequence[str] = (),
    only: Sequence[str] | None = None,
    overrides: bool = False,
) -> None:
    """One flag per CLI option of config dataclass ``cls`` (fields in ``skip`` left out, or
    only those in ``only``). ``overrides``: the flags override a config file, so a flag not
    given leaves no value (:func:`given_options`) and none is required."""
    for info in option_info(cls):
        if not info.cli or info.nested or info.name in skip:
            continue
        if only is not None and info.name not in only:
            continue
        base, _ = _base_type(info.type)
        kw: dict[str, Any] = {"dest": info.name, "help": info.help + _default_text(info)}
        if info.metavar or info.flag != info.name:
            kw["metavar"] = info.metavar or info.flag.upper()
        if info.required:
            kw["required"] = True
        if base is bool:
            kw.update(action=argparse.BooleanOptionalAction, default=info.default)
        elif typing.get_origin(base) is list:
            (elem,) = typing.get_args(base)
            elem_base, _ = _base_type(elem)
            choices = _choices(info, elem_base)
            elem_type = str if typing.get_origin(elem_base) is typing.Literal else elem_base
            kw.update(type=finite_float if elem_type is float else elem_type)
            kw.update(action="append" if info.repeat else "store", default=None)
            if not info.repeat:
                kw["nargs"] = "+"
            if choices is not None:
                kw["choices"] = choices
        else:
            choices = _choices(info, base)
            simple = base if base in (int, float, str) else str
            kw.update(type=finite_float if simple is float else simple, default=info.default)
            if choices is not None:
                kw["choices"] = choices
        if overrides:
            kw["default"] = argparse.SUPPRESS
            kw.pop("required", None)
        parser.add_argument(flag_name(info), **kw)


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` given on the command line (flags added with ``overrides``;
    sections and ``cli=False`` options are never flags, even when a hand-made flag shares
    their name, as ``eval --defences`` does)."""
    return {
        i.name: getattr(args, i.name)
        for i in option_info(cls)
        if i.cli and not i.nested and hasattr(args, i.name)
    }


def config_from_args(cls: type[T], args: argparse.Namespace, **fixed: Any) -> T:
    """The config ``cls`` from parsed arguments (options not on the command line, or lists
    not given, keep their defaults); ``fixed`` sets fields directly."""
    values: dict[str, Any] = {}
    for info in option_info(cls):
        if info.name in fixed:
            values[info.name] = fixed[info.name]
            continue
        if not info.cli or info.nested or not hasattr(args, info.name):
            continue
        value = getattr(args, info.name)
        if value is None and isinstance(info.default, list):
            continue
        values[info.name] = value
    return cls(**values)


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bars."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def context_from_args(args: argparse.Namespace) -> RunContext:
    """A fresh :class:`RunContext` for one command (``--quiet`` turns progress off)."""
    return RunContext(progress=not getattr(args, "quiet", False))


def print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    """A plain-text table on standard output, columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
