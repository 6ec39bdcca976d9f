"""``steerlex judge``: label replies harmful or not; and the judge flags ``steerlex eval``
shares."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from steerlex.cli.options import add_quiet, context_from_args
from steerlex.core.config import build_strict
from steerlex.core.errors import EvalError
from steerlex.jobs.judge import JudgeJobConfig, judge_job
from steerlex.judges import DEFAULT_JUDGE, JUDGES
from steerlex.models.loading import DTYPES

__all__ = ["add_judge_options", "judge_overrides", "register"]


def add_judge_options(p: argparse.ArgumentParser) -> None:
    """``--judge NAME`` and the options of the judges that take them."""
    p.add_argument(
        "--judge", choices=JUDGES.names(),
        help=f"the harm judge (default: {DEFAULT_JUDGE}; see docs/judges.md)",
    )  # fmt: skip
    p.add_argument("--judge-model", help="judge llm/guard: model spec; openai: served model name")
    p.add_argument("--judge-url", help="judge openai: the API root (OpenAI-compatible)")
    p.add_argument("--judge-key-env", help="judge openai: the environment variable of the key")


def judge_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``judge`` config keys the judge flags set."""
    out: dict[str, Any] = {}
    if args.judge:
        out["name"] = args.judge
    if args.judge_url and not args.judge:
        out["name"] = "openai"
    for flag, key in (("judge_model", "model"), ("judge_url", "base_url"),
                      ("judge_key_env", "api_key_env")):  # fmt: skip
        if getattr(args, flag):
            out[key] = getattr(args, flag)
    return out


def cmd_judge(args: argparse.Namespace) -> int:
    data: dict[str, Any] = {"input": args.input, "out": args.out, "judge": judge_overrides(args)}
    for key in ("cache", "device", "dtype"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    cfg = build_strict(JudgeJobConfig, data, "judge", EvalError)
    s = judge_job(cfg, context_from_args(args))
    share = f" ({s.harmful / (s.n - s.unjudged):.1%} of those judged)" if s.n > s.unjudged else ""
    print(
        f"{s.n} replies judged by {s.judge}: {s.harmful} harmful{share}, {s.unjudged} "
        f"unjudged; wrote {s.out}",
        file=sys.stderr,
    )
    return 0


def register(sub: Any) -> None:
    """Add ``judge``."""
    p = sub.add_parser(
        "judge",
        help="label replies harmful or not (offline judges, verdicts cached)",
        description=(
            "Read a JSONL file of replies (behavior, reply, optionally prompt and context), "
            "judge whether each reply carries out the harmful behaviour, and write the same "
            "lines with harmful, judge and reason added. A line the judge fails on gets "
            "harmful: null and is counted as unjudged. See docs/judges.md."
        ),
    )
    p.add_argument("--input", required=True, help="JSONL file of replies to judge")
    p.add_argument("--out", required=True, help="JSONL file to write")
    add_judge_options(p)
    p.add_argument("--cache", help="folder of cached verdicts (default: the steerlex cache)")
    p.add_argument("--device", help="torch device of a judge model (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of a judge model (default float32)")
    add_quiet(p)
    p.set_defaults(func=cmd_judge)
