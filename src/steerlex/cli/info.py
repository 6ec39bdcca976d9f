"""``steerlex models``, ``steerlex info`` and ``steerlex sources``: what can be used."""

from __future__ import annotations

import argparse
import json
from typing import Any

from steerlex.cli.options import print_table
from steerlex.data.named import named_set_sizes
from steerlex.models.info import embedded_models, model_info

__all__ = ["register"]


def cmd_models(args: argparse.Namespace) -> int:
    models = embedded_models()
    if args.json:
        keys = ("spec", "description", "upstream", "licence", "install", "sha256", "status")
        print(json.dumps([{k: m[k] for k in keys} for m in models], indent=2))
        return 0
    rows = [
        (m["spec"] + (" (default)" if m["default"] else ""), m["architecture"], m["status"],
         m["description"])
        for m in models
    ]  # fmt: skip
    print_table(rows, ("spec", "arch", "status", "description"))
    print()
    for m in models:
        print(f"{m['spec']}: upstream {m['upstream']}; install: {m['install']}")
    print(
        "\nOther specs: a path to a .gguf file, a directory saved by transformers, "
        "or a Hugging Face hub id (Org/Model; needs network)."
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k.ljust(width)}  {v}")
    return 0


def cmd_sources(args: argparse.Namespace) -> int:
    rows = [
        (info.name, "not installed" if n is None else str(n), info.description)
        for info, n in named_set_sizes()
    ]
    print_table(rows, ("name", "size", "description"))
    print(
        "\nAlso: a local .txt/.jsonl/.json/.csv file (with --column), or hf:DATASET[:CONFIG]:SPLIT."
    )
    return 0


def register(sub: Any) -> None:
    """Add ``models``, ``info`` and ``sources``."""
    p = sub.add_parser("models", help="list the embedded models and the other model spec forms")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "info", help="describe a model: architecture, layers, width, chat template, weights"
    )
    p.add_argument("model", help="model spec, e.g. embedded:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sources", help="list the named text and prompt sets")
    p.set_defaults(func=cmd_sources)
