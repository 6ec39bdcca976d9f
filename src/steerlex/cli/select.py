"""``steerlex select``: choose the features to steer and write them as JSON."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from steerlex.cli.options import (
    add_options,
    add_quiet,
    config_from_args,
    context_from_args,
    print_table,
)
from steerlex.jobs.select import SelectConfig, select_job

__all__ = ["register"]


def cmd_select(args: argparse.Namespace) -> int:
    r = select_job(config_from_args(SelectConfig, args), context_from_args(args))
    sel = r.selection
    rows = [
        (str(f.id), f"{f.score:.3f}", ", ".join(f.words[:6]), f.reason)
        for f in sel.features[: max(args.show, 0)]
    ]
    if rows:
        print_table(rows, ("id", "score", "words", "reason"))
    if len(sel.features) > len(rows):
        print(f"... and {len(sel.features) - len(rows)} more (see the JSON file)")
    s = sel.settings
    where = f" from {r.explanation_method} explanations" if r.explanation_method else ""
    passed = ""
    if "n_scored" in s:
        passed = (
            f" ({s['n_passed']} of {s['n_scored']} at or above {s['threshold']})"
            if s.get("threshold") is not None
            else f" (the best of {s['n_scored']} scored)"
        )
    print(
        f"{len(sel.features)} features for '{sel.concept.name}' by {sel.method}{where}{passed} "
        f"-> {r.path}",
        file=sys.stderr,
    )
    return 0


def register(sub: Any) -> None:
    """Add ``select``."""
    p = sub.add_parser(
        "select",
        help="choose SAE features for a concept (safety, harm, your own) from their explanations",
        description=(
            "Choose the features to steer. semantic (default): sentence-encoder match between "
            "the concept and each feature's explanation words; llm: an LLM judge labels each "
            "word list with the concept's categories; data: features whose mean activation "
            "differs most between harmful and benign prompts (the baseline); manual: --ids. "
            "Writes SAE_DIR/selected_<concept>.json (see docs/selection.md)."
        ),
    )
    add_options(p, SelectConfig)
    p.add_argument("--show", type=int, default=20, help="print the first N features (default 20)")
    add_quiet(p)
    p.set_defaults(func=cmd_select)
