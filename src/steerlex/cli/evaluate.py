"""``steerlex eval``: the safety evaluation from a JSON config and/or flags. Flags override
the config file, which overrides the profile's ``eval`` section (none unless given)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from steerlex.cli.judge import add_judge_options, judge_overrides
from steerlex.cli.options import add_options, add_quiet, context_from_args, given_options
from steerlex.core.config import config_to_dict, merge
from steerlex.core.errors import EvalError
from steerlex.evaluate.config import (
    EvalConfig,
    GenerationConfig,
    config_from_dict,
    default_defences,
    read_config_dict,
)
from steerlex.jobs.evaluate import eval_job
from steerlex.pipeline.profiles import PROFILES, profile

__all__ = ["register"]

_GENERATION = ("max_new_tokens", "batch_size")


def _defences(names: str) -> list[dict[str, Any]]:
    known = {d.label: d for d in default_defences(True)}
    out = []
    for name in (n.strip() for n in names.split(",")):
        if name not in known:
            raise EvalError(
                f"--defences: unknown defence {name!r}; choose from {', '.join(known)}."
            )
        entry = config_to_dict(known[name])
        out.append({k: v for k, v in entry.items() if v not in (None, False, "prompt")})
    return out


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = given_options(args, EvalConfig)
    gen = given_options(args, GenerationConfig)
    if gen:
        out["generation"] = gen
    if args.defences:
        out["defences"] = _defences(args.defences)
    judge = judge_overrides(args)
    if judge:
        out["judge"] = judge
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    data = profile(args.profile)["eval"] if args.profile else {}
    if args.config:
        data = merge(data, read_config_dict(args.config))
    cfg = config_from_dict(merge(data, _overrides(args)))
    result = eval_job(cfg, context_from_args(args), dry_run=args.dry_run)
    if args.dry_run:
        print(f"plan: {result.scores['plan']}", file=sys.stderr)
    else:
        print((result.out / "results.md").read_text(encoding="utf-8"))
    return 0


def register(sub: Any) -> None:
    """Add ``eval``."""
    p = sub.add_parser(
        "eval",
        help="safety evaluation: jailbreak attack success, over-refusal and utility per defence",
        description=(
            "Compare defences (none, self-reminder, dense refusal direction, SAE amplify / "
            "calibrate, conditional calibrate) on the same prompts with the same judges. "
            "Strengths are tuned on a selection split; headline numbers come from the test "
            "split. Writes generations.jsonl, scores.json, results.md, split.json and SVG "
            "trade-off plots to --out (see docs/evaluation.md)."
        ),
    )
    p.add_argument("--config", help="JSON config file (keys: docs/evaluation.md)")
    p.add_argument(
        "--profile", choices=tuple(PROFILES),
        help="start from a `steerlex run` profile's eval section (smoke: a few prompts, 8 "
        "tokens, two defences; default: the main job's sizes); default: the built-in defaults",
    )  # fmt: skip
    add_options(p, EvalConfig, overrides=True)
    add_options(p, GenerationConfig, only=_GENERATION, overrides=True)
    p.add_argument(
        "--defences", metavar="KINDS",
        help="comma-separated defence kinds to run "
        f"({', '.join(d.label for d in default_defences(True))}) with the default sweeps",
    )  # fmt: skip
    add_judge_options(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate only")
    add_quiet(p)
    p.set_defaults(func=cmd_eval)
