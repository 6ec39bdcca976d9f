"""The CLI reference (docs/cli.md), generated from the argument parser so it cannot drift:
``python -m steerlex.cli_reference > docs/cli.md``; a test checks the file is current."""

from __future__ import annotations

import argparse
import os


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps sub-commands here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    """Markdown with every command's ``--help``, in the parser's order."""
    from steerlex.cli import build_parser

    os.environ["COLUMNS"] = "100"  # fixed wrapping, whatever the terminal
    parser = build_parser()
    lines = [
        "# CLI reference",
        "",
        "Generated from the argument parser by `python -m steerlex.cli_reference > docs/cli.md`",
        "(a test keeps it current). Every command also answers `--help`.",
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


if __name__ == "__main__":
    print(cli_reference(), end="")
