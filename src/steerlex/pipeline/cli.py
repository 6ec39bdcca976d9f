"""``steerlex run``: the whole pipeline into one run directory (docs/pipeline.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_run_parser"]


def add_run_parser(sub: Any) -> argparse.ArgumentParser:
    from steerlex.pipeline.config import PROFILES
    from steerlex.pipeline.run import stage_names

    p: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="the whole chain on one model: harvest, SAE, explanations, selection, "
        "safety evaluation, report",
        description=(
            "Run harvest → train-sae → eval-sae → explain → explain-metrics → select → eval → "
            "features → examples → report into runs/<name>/ (see docs/pipeline.md). Finished "
            "stages are kept: rerun the same command after an interruption to continue."
        ),
    )
    p.add_argument("config", nargs="?", help="JSON run config on top of the profile (optional)")
    p.add_argument(
        "--profile", choices=sorted(PROFILES), default="default",
        help="built-in sizes: default (the 0.5B default model, 2-core CPU sizes) or quick "
        "(the 135M packaged model, a few minutes)",
    )  # fmt: skip
    p.add_argument("--name", help="run directory name under --runs-dir (default: the config's)")
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default runs)")
    p.add_argument("--device", help="torch device for every stage (default: the config's, cpu)")
    p.add_argument(
        "--stage", action="append", choices=stage_names(),
        help="run only this stage (repeatable; its inputs must exist); default: every "
        "unfinished stage in order",
    )  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_run)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from steerlex.core.config import merge
    from steerlex.pipeline.config import config_dict, config_from_dict, resolve_config
    from steerlex.pipeline.run import run_pipeline

    cfg = resolve_config(args.profile, args.config)
    over: dict[str, Any] = {}
    if args.name:
        over["name"] = args.name
    if args.device:
        over["device"] = args.device
    if over:
        cfg = config_from_dict(merge(config_dict(cfg), over))
    if args.print_config:
        print(json.dumps(config_dict(cfg), indent=2, sort_keys=True))
        return 0
    run_pipeline(cfg, args.runs_dir, only=args.stage)
    return 0
