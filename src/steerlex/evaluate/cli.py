"""``steerlex eval``: the safety evaluation from a JSON config and/or flags.

Register it with ``add_eval_parser(sub)`` on steerlex's subparsers. Flags override the config
file, which overrides the chosen profile (``--profile default`` unless given).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_eval_parser", "cmd_eval"]


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``sub`` (an argparse subparsers object)."""
    from steerlex.evaluate.config import PROFILES
    from steerlex.evaluate.defences import DEFENCE_KINDS

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
        "--profile",
        choices=tuple(PROFILES),
        default="default",
        help="built-in sizes the config starts from (default: default; smoke: a few prompts)",
    )
    p.add_argument("--model", help="model spec (default: the SAE's model, else the default model)")
    p.add_argument("--sae", help="SAE directory (needed by the amplify / calibrate defences)")
    p.add_argument("--layer", type=int, help="layer to steer (default: the SAE's)")
    p.add_argument("--features", help="features to steer: ids 3,17,42 or a selected_*.json")
    p.add_argument("--harm-features", help="harm features for the conditional gate")
    p.add_argument(
        "--defences",
        metavar="KINDS",
        help=f"comma-separated defence kinds to run ({', '.join(DEFENCE_KINDS)}, "
        "calibrate-conditional) with the default sweeps",
    )
    p.add_argument("--out", help="output directory (default runs/eval)")
    p.add_argument("--cache", help="generation cache file (default OUT/cache/generations.jsonl)")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per reply (default 48)")
    p.add_argument("--batch-size", type=int, help="prompts per batch (default 8)")
    p.add_argument("--seed", type=int, help="prompt sampling seed (default 0)")
    p.add_argument("--judge-url", help="LLM judge: OpenAI-compatible API root")
    p.add_argument("--judge-model", help="LLM judge: served model name")
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from steerlex.core.errors import EvalError
    from steerlex.evaluate.config import DefenceConfig, config_to_dict, default_defences

    out: dict[str, Any] = {}
    for key in ("model", "sae", "layer", "out", "cache", "seed", "device", "features"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    if args.harm_features is not None:
        out["harm_features"] = args.harm_features
    gen = {k: getattr(args, k) for k in ("max_new_tokens", "batch_size")}
    gen = {k: v for k, v in gen.items() if v is not None}
    if gen:
        out["generation"] = gen
    if args.defences:
        known = {d.label: d for d in default_defences(True)}
        chosen: list[DefenceConfig] = []
        for name in (n.strip() for n in args.defences.split(",")):
            if name not in known:
                raise EvalError(
                    f"--defences: unknown defence {name!r}; choose from {', '.join(known)}."
                )
            chosen.append(known[name])
        out["defences"] = [
            {k: v for k, v in config_to_dict(d).items() if v not in (None, False, "prompt")}
            for d in chosen
        ]
    if args.judge_url or args.judge_model:
        out["judge"] = {"kind": "openai", "base_url": args.judge_url, "model": args.judge_model}
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from steerlex.evaluate.config import config_from_dict, merge, profile, read_config_dict
    from steerlex.evaluate.run import run_eval

    data = profile(args.profile)
    if args.config:
        data = merge(data, read_config_dict(args.config))
    cfg = config_from_dict(merge(data, _overrides(args)))
    result = run_eval(cfg, progress=not args.quiet, dry_run=args.dry_run)
    if args.dry_run:
        print(f"plan: {result.scores['plan']}", file=sys.stderr)
    else:
        print((result.out / "results.md").read_text(encoding="utf-8"))
    return 0
