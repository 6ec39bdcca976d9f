"""The ``steerlex`` command: one subcommand per stage, each a thin layer over a job.

A command module parses its arguments into the stage's config (flags derived from the
config dataclass, :mod:`steerlex.cli.options`), calls the job
(:mod:`steerlex.jobs`) and prints the result. Errors a user can cause (a SteerlexError)
are printed as one clear message with exit status 2, never as a traceback; Ctrl-C exits
with status 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from steerlex import __version__
from steerlex.cli import evaluate, explain, harvest, info, judge, run, sae, select, steer
from steerlex.core.errors import SteerlexError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``steerlex`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="steerlex",
        description="Explain SAE features with mutual-information word lists and steer LLMs "
        "with them.",
    )
    parser.add_argument("--version", action="version", version=f"steerlex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info.register(sub)
    harvest.register(sub)
    sae.register(sub)
    explain.register(sub)
    select.register(sub)
    steer.register(sub)
    evaluate.register(sub)
    judge.register(sub)
    run.register(sub)
    sae.register_utilities(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``steerlex ARGV``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SteerlexError as exc:
        print(f"steerlex {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        advice = str(exc) or "finished work is kept, rerun the same command to resume."
        print(f"steerlex {args.command}: interrupted; {advice}", file=sys.stderr)
        return 130
