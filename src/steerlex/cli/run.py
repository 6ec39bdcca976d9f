"""``steerlex run``: the whole pipeline into one run directory (docs/pipeline.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from steerlex.core.errors import PipelineError
from steerlex.pipeline.config import (
    PROFILES,
    RunConfig,
    config_dict,
    resolve_config,
)
from steerlex.pipeline.run import resumed_config, run_pipeline
from steerlex.pipeline.stages import stage_names

__all__ = ["parse_set", "register"]


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["train_sae.tied=true", "name=x"]`` -> ``{"train_sae": {"tied": True}, "name": "x"}``
    (values are JSON when they parse as JSON, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise PipelineError(
                f"--set {item!r} is not KEY=VALUE; e.g. --set train_sae.d_sae=4096 or "
                "--set harvest.sources='[\"benign\"]'."
            )
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PipelineError(f"--set {item!r} sets a key inside {part!r}, which is a value.")
        node[leaf] = value
    return out


def _config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    over = parse_set(args.set or [])
    if args.name:
        over["name"] = args.name
    if args.device:
        over["device"] = args.device
    if args.resume:
        if args.config or args.profile or over:
            raise PipelineError(
                "--resume continues a run with its own config; it takes no config file, "
                "--profile, --name, --device or --set (only --stage)."
            )
        run_dir = Path(args.resume)
        return resumed_config(run_dir), run_dir.parent
    return resolve_config(args.profile or "default", args.config, over), Path(args.runs_dir)


def cmd_run(args: argparse.Namespace) -> int:
    cfg, runs_dir = _config(args)
    if args.print_config:
        print(json.dumps(config_dict(cfg), indent=2, sort_keys=True))
        return 0
    run_pipeline(cfg, runs_dir, only=args.stage)
    return 0


def register(sub: Any) -> None:
    """Add ``run``."""
    p = sub.add_parser(
        "run",
        help="the whole chain on one model: harvest, SAE, explanations, selection, "
        "safety evaluation, report",
        description=(
            "Run harvest → train-sae → eval-sae → explain → explain-metrics → select → eval → "
            "features → examples → report into runs/<name>/ (see docs/pipeline.md; every config "
            "key: docs/config.md). Finished stages are kept: after an interruption or a failed "
            "stage, `steerlex run --resume runs/<name>` continues."
        ),
    )
    p.add_argument("config", nargs="?", help="JSON run config on top of the profile (optional)")
    p.add_argument(
        "--profile", choices=sorted(PROFILES),
        help="built-in sizes: default (the 0.5B default model, 2-core CPU sizes; the default), "
        "quick (the 135M packaged model, a few minutes) or smoke (quick with the two defences "
        "that need no SAE features)",
    )  # fmt: skip
    p.add_argument("--name", help="run directory name under --runs-dir (default: the config's)")
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default runs)")
    p.add_argument("--device", help="torch device for every stage (default: the config's, cpu)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="set one config key (JSON value), e.g. --set train_sae.architecture=batchtopk; "
        "repeatable",
    )  # fmt: skip
    p.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue the run in RUN_DIR with the config it was started with",
    )  # fmt: skip
    p.add_argument(
        "--stage", action="append", choices=stage_names(),
        help="run only this stage (repeatable; its inputs must exist); default: every "
        "unfinished stage in order",
    )  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_run)
