"""``steerlex harvest``: store layer-L residual activations of texts."""

from __future__ import annotations

import argparse
import json
from typing import Any

from steerlex.cli.options import add_options, add_quiet, config_from_args, context_from_args
from steerlex.jobs.harvest import HarvestConfig, harvest_job

__all__ = ["format_summary", "register"]


def format_summary(s: dict[str, Any]) -> str:
    """The harvest summary as four lines."""
    return "\n".join(
        [
            f"Stored {s['n_tokens']:,} tokens from {s['n_texts']:,} texts in {s['n_shards']} "
            f"shard(s) ({s['bytes'] / 2**20:.1f} MiB, {s['dtype']}) at {s['directory']}",
            f"model {s['model']}, layer {s['layer']} ({s['hook_name']}), width {s['d_model']}",
            f"token norm: mean {s['norm_mean']:.2f}, median {s['norm_median']:.2f}, "
            f"p99 {s['norm_p99']:.2f}, max {s['norm_max']:.2f}",
            f"this run: {s['seconds']}s",
        ]
    )


def cmd_harvest(args: argparse.Namespace) -> int:
    result = harvest_job(config_from_args(HarvestConfig, args), context_from_args(args))
    print(json.dumps(result.summary, indent=2) if args.json else format_summary(result.summary))
    return 0


def register(sub: Any) -> None:
    """Add ``harvest``."""
    p = sub.add_parser("harvest", help="store layer-L residual activations of texts")
    add_options(p, HarvestConfig)
    add_quiet(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_harvest)
