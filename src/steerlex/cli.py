"""The ``steerlex`` command: one subcommand per pipeline stage.

Errors a user can cause (a SteerlexError) are printed as one clear message with
exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from steerlex import __version__
from steerlex.errors import SteerlexError


def _print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_models(args: argparse.Namespace) -> int:
    from steerlex.models.embedded import DEFAULT_MODEL, EMBEDDED, converted_dir, package_dir

    rows = []
    for m in EMBEDDED.values():
        installed = all(package_dir(p.module) is not None for p in m.parts)
        cached = (converted_dir(m.gguf_name, m.sha256) / "steerlex-model.json").is_file()
        status = "cached" if cached else ("installed" if installed else "not installed")
        default = " (default)" if m.spec == DEFAULT_MODEL else ""
        rows.append((m.spec + default, m.architecture, status, m.description))
    if args.json:
        out = [
            {
                "spec": m.spec,
                "description": m.description,
                "upstream": m.upstream,
                "licence": m.licence,
                "install": m.install,
                "sha256": m.sha256,
                "status": r[2],
            }
            for m, r in zip(EMBEDDED.values(), rows, strict=True)
        ]
        print(json.dumps(out, indent=2))
        return 0
    _print_table(rows, ("spec", "arch", "status", "description"))
    print()
    for m in EMBEDDED.values():
        print(f"{m.spec}: upstream {m.upstream}; install: {m.install}")
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


def model_info(spec: str) -> dict[str, Any]:
    """Describe a model without loading its weights (a meta-device skeleton gives the layout)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerlex.models.chat import has_chat_template
    from steerlex.models.hooks import decoder_layers, hook_name, num_layers, residual_width
    from steerlex.models.loading import _from_pretrained, load_config

    config, resolved, location, source, weights_id = load_config(spec)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    path, _ = decoder_layers(skeleton)
    n = num_layers(skeleton)
    tokenizer = _from_pretrained(AutoTokenizer, location, spec)
    text_config = config.get_text_config()
    return {
        "spec": spec,
        "kind": resolved.kind,
        "architecture": (config.architectures or [type(skeleton).__name__])[0],
        "model_type": config.model_type,
        "layers": n,
        "valid_layers": f"0..{n - 1}",
        "width (d_model)": residual_width(skeleton),
        "vocab_size": getattr(text_config, "vocab_size", None),
        "parameters": sum(p.numel() for p in skeleton.parameters()),
        "tied_embeddings": bool(getattr(text_config, "tie_word_embeddings", False)),
        "hook_names": f"{path}.0 .. {hook_name(skeleton, n - 1)}",
        "chat_template": has_chat_template(tokenizer),
        "weights_source": source,
        "weights_id": weights_id,
    }


def cmd_sources(args: argparse.Namespace) -> int:
    from steerlex.data import load_texts, named_sets

    rows = []
    for s in named_sets():
        try:
            size = str(len(load_texts(s.name)))
        except SteerlexError:
            size = "not installed"
        rows.append((s.name, size, s.description))
    _print_table(rows, ("name", "size", "description"))
    print(
        "\nAlso: a local .txt/.jsonl/.json/.csv file (with --column), or hf:DATASET[:CONFIG]:SPLIT."
    )
    return 0


def cmd_harvest(args: argparse.Namespace) -> int:
    from steerlex.activations.harvest import HarvestOptions, harvest
    from steerlex.activations.stats import activation_stats
    from steerlex.data import load_texts
    from steerlex.models.hooks import check_layer
    from steerlex.models.loading import load_model

    items: list[Any] = []
    for spec in args.source:
        text_set = load_texts(spec, column=args.column, limit=args.limit)
        print(
            f"source {text_set.name}: {len(text_set)} texts ({text_set.provenance})",
            file=sys.stderr,
        )
        items.extend(text_set.items)
    options = HarvestOptions(
        layer=args.layer,
        chat=args.chat,
        system_prompt=args.system_prompt,
        keep=args.keep,
        max_length=args.max_length,
        batch_size=args.batch_size,
        texts_per_shard=args.texts_per_shard,
        dtype=args.dtype,
    )
    options.validate()
    t0 = time.perf_counter()
    auto = args.device == "auto"
    loaded = load_model(
        args.model,
        dtype=args.model_dtype,
        device=None if auto else args.device,
        device_map="auto" if auto else None,
    )
    check_layer(loaded.model, args.layer)
    print(
        f"model {loaded.spec} loaded in {time.perf_counter() - t0:.1f}s ({loaded.source})",
        file=sys.stderr,
    )
    t1 = time.perf_counter()
    store = harvest(loaded, items, args.out, options, progress=not args.quiet)
    elapsed = time.perf_counter() - t1
    summary = store.summary()
    summary["seconds"] = round(elapsed, 1)
    summary.update(activation_stats(store))
    print(json.dumps(summary, indent=2) if args.json else _format_summary(summary))
    return 0


def _format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"Stored {s['n_tokens']:,} tokens from {s['n_texts']:,} texts in {s['n_shards']} shard(s) "
        f"({s['bytes'] / 2**20:.1f} MiB, {s['dtype']}) at {s['directory']}",
        f"model {s['model']}, layer {s['layer']} ({s['hook_name']}), width {s['d_model']}",
        f"token norm: mean {s['norm_mean']:.2f}, median {s['norm_median']:.2f}, "
        f"p99 {s['norm_p99']:.2f}, max {s['norm_max']:.2f}",
        f"this run: {s['seconds']}s",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steerlex",
        description="Explain SAE features with mutual-information word lists and steer LLMs with them.",
    )
    parser.add_argument("--version", action="version", version=f"steerlex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    from steerlex.models.chat import KEEP_CHOICES
    from steerlex.models.embedded import DEFAULT_MODEL

    p = sub.add_parser("harvest", help="store layer-L residual activations of texts")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    p.add_argument(
        "--layer", type=int, required=True, help="decoder layer L (0-based); its output is stored"
    )
    p.add_argument(
        "--source",
        action="append",
        required=True,
        help="named set (see `steerlex sources`), a local file, or hf:DATASET[:CONFIG]:SPLIT; repeatable",
    )
    p.add_argument("--column", help="column/field holding the text in csv/jsonl/json/hf sources")
    p.add_argument("--limit", type=int, help="use at most the first N texts of each source")
    p.add_argument(
        "--out", required=True, help="store directory (created; resumed if it holds the same run)"
    )
    chat = p.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="wrap texts in the chat template",
    )
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="use raw texts")
    p.add_argument(
        "--system-prompt", help="system prompt for chat formatting (default: the template's own)"
    )
    p.add_argument(
        "--keep",
        choices=KEEP_CHOICES,
        default="no-prefix",
        help="positions to store: all; no-bos; no-prefix (drop BOS, system prompt and role header: default); "
        "content (only the user's text)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="truncate texts to this many tokens (default 512)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    p.add_argument(
        "--texts-per-shard", type=int, default=256, help="texts per shard file (default 256)"
    )
    p.add_argument("--dtype", default="float32", help="storage dtype: float32, float16, bfloat16")
    p.add_argument(
        "--model-dtype", default="float32", help="model dtype: float32, float16, bfloat16"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cpu, cuda, cuda:1, or auto to spread the model over GPUs (default cpu)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_harvest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SteerlexError as exc:
        print(f"steerlex {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"steerlex {args.command}: interrupted; finished work is kept, rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
