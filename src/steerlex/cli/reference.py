"""Reference docs generated from the code, so they cannot drift (a test keeps both current):

- ``python -m steerlex.cli.reference cli > docs/cli.md``: every command's ``--help``;
- ``python -m steerlex.cli.reference config > docs/config.md``: every key of the
  ``steerlex run`` config, from the stage config classes, and the built-in profiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from typing import Any

from steerlex.cli import build_parser
from steerlex.core.config import config_to_dict, option_info
from steerlex.pipeline.config import RunConfig
from steerlex.pipeline.profiles import PROFILES

__all__ = ["cli_reference", "config_reference"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps sub-commands here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    """Markdown with every command's ``--help``, in the parser's order."""
    os.environ["COLUMNS"] = "100"  # fixed wrapping, whatever the terminal
    parser = build_parser()
    lines = [
        "# CLI reference",
        "",
        "Generated from the argument parser by `python -m steerlex.cli.reference cli > "
        "docs/cli.md`",
        "(a test keeps it current). Every command also answers `--help`. The options of each",
        "stage come from its config class, the same one `steerlex run`'s config sections use",
        "([config.md](config.md)).",
        "",
    ]
    commands = _subparsers(parser)
    lines += [f"- [`steerlex {name}`](#steerlex-{name})" for name in commands]
    lines.append("")
    for name, sub in commands.items():
        nested = _subparsers(sub)
        for full, p in [(name, sub)] + [(f"{name} {n}", s) for n, s in nested.items()]:
            lines += [f"## steerlex {full}", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return " / ".join(json.dumps(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(cls: type, prefix: str, skip: tuple[str, ...], instance: Any) -> list[str]:
    """The table of ``cls``'s keys; defaults are ``instance``'s (a section's own default
    may differ from its class's, e.g. every explanation method in a run)."""
    rows, nested = [], []
    for info in option_info(cls):
        if info.name in skip:
            continue
        if info.nested:
            nested.append(info)
            continue
        default = json.dumps(config_to_dict(getattr(instance, info.name)), default=str)
        kind = _type_name(info.type)
        if info.choices is not None:
            choices = info.choices() if callable(info.choices) else info.choices
            kind += " (" + " / ".join(json.dumps(c) for c in choices) + ")"
        rows.append(
            f"| `{prefix}{info.name}` | {_cell(kind)} | `{_cell(default)}` | {_cell(info.help)} |"
        )
    out = ["| key | type | default | what |", "|---|---|---|---|", *rows] if rows else []
    for info in nested:
        out += ["", f"### `{prefix}{info.name}`: {info.help}", ""]
        if info.owned:
            out += [f"Set by the run itself: {', '.join(f'`{o}`' for o in info.owned)}.", ""]
        out += _rows(info.type, f"{prefix}{info.name}.", info.owned, getattr(instance, info.name))
    return out


def config_reference() -> str:
    """Markdown with every key of the ``steerlex run`` config and the profiles."""
    lines = [
        "# The `steerlex run` config",
        "",
        "Generated from the config classes by `python -m steerlex.cli.reference config > "
        "docs/config.md`",
        "(a test keeps it current). A run config is one JSON object on top of a profile",
        "(`--profile`, below); give only the keys you change, in a file (`steerlex run my.json`)",
        "or one at a time (`--set train_sae.architecture=batchtopk`). Each stage's section is",
        "that stage's own config class, the one its command's flags come from",
        "([cli.md](cli.md)); the defaults here are the stages' own, and the profiles change",
        "some of them. Unknown keys and wrong types are refused, naming the key.",
        "",
        "## Keys",
        "",
        *_rows(RunConfig, "", (), RunConfig()),
        "",
        "## Profiles",
        "",
        "What each profile sets on top of the defaults above:",
        "",
    ]
    for name, data in PROFILES.items():
        lines += [f"### `{name}`", "", "```json", json.dumps(data, indent=2), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "cli"
    if what not in ("cli", "config"):
        sys.exit("usage: python -m steerlex.cli.reference cli|config")
    print(cli_reference() if what == "cli" else config_reference(), end="")
