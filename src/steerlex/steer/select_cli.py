"""``steerlex select``: choose the features to steer and write them as JSON.

Register it with ``add_select_parser(sub)`` on steerlex's subparsers.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from steerlex.core.errors import SteerlexError


def add_select_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``select`` subcommand to ``sub`` (an argparse subparsers object)."""
    from steerlex.explain.run import METHODS as EXPLANATION_METHODS
    from steerlex.steer.concepts import PRESETS
    from steerlex.steer.select import DEFAULT_DATA_TOP_N, DEFAULT_THRESHOLD, METHODS

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
    p.add_argument("--sae", required=True, help="SAE directory (or any format load_sae reads)")
    p.add_argument(
        "--concept", required=True,
        help=f"a built-in concept ({', '.join(PRESETS)}) or a name for your own "
        "(then give --concept-text and/or --concept-words)",
    )  # fmt: skip
    p.add_argument("--concept-text", help="what the concept means, in a phrase or sentence")
    p.add_argument("--concept-words", help="seed words, comma-separated: doctor,nurse,medicine")
    p.add_argument(
        "--concept-side", choices=("output", "input"),
        help="for your own concept: output (features to push up; default) or input (detectors)",
    )  # fmt: skip
    p.add_argument("--method", choices=METHODS, default="semantic", help="default semantic")
    p.add_argument(
        "--explanations", help="directory of <method>.jsonl files (default SAE_DIR/explanations)"
    )
    p.add_argument(
        "--explanation-method", choices=EXPLANATION_METHODS,
        help="which explanation file to read (default: mi for output-side concepts such as "
        "safety, mi-input for input-side ones such as harm)",
    )  # fmt: skip
    p.add_argument(
        "--threshold", type=float,
        help=f"keep features scoring at least this (semantic default {DEFAULT_THRESHOLD['words']} "
        f"with --scoring words, {DEFAULT_THRESHOLD['text']} with text, unless only --top-n is "
        "given; data: a minimum activation difference)",
    )  # fmt: skip
    p.add_argument(
        "--top-n", type=int,
        help=f"keep at most the N best (data default {DEFAULT_DATA_TOP_N})",
    )  # fmt: skip
    p.add_argument(
        "--scoring", choices=("words", "text"), default="words",
        help="semantic scoring: words (each explanation word against the seed words; default) "
        "or text (the joined words, or the summary, against the concept text)",
    )  # fmt: skip
    p.add_argument("--n-words", type=int, default=10, help="explanation words used (default 10)")
    p.add_argument("--ids", help="manual: feature ids, comma-separated")
    p.add_argument(
        "--llm", choices=("openai", "transformers"), default="openai",
        help="llm: judge back end, an OpenAI-compatible server or a local chat model",
    )  # fmt: skip
    p.add_argument("--llm-base-url", help="llm: API root, e.g. http://localhost:8000/v1")
    p.add_argument(
        "--llm-model", help="llm: served model name (openai) or steerlex model spec (transformers)"
    )
    p.add_argument("--model", help="data: model spec (default: the one the SAE records)")
    p.add_argument(
        "--harmful", action="append",
        help="data: harmful prompt source, repeatable (default harmbench)",
    )  # fmt: skip
    p.add_argument(
        "--benign", action="append", help="data: benign prompt source, repeatable (default benign)"
    )
    p.add_argument(
        "--split", choices=("train", "heldout", "all"), default="train",
        help="data: part of each source to use, by text id (default train: keeps the held-out "
        "part for evaluating the steering)",
    )  # fmt: skip
    p.add_argument(
        "--heldout-fraction", type=float, default=0.1, help="data: held-out share (default 0.1)"
    )
    p.add_argument("--limit", type=int, default=200, help="data: prompts per source (default 200)")
    p.add_argument(
        "--direction", choices=("harmful", "benign"), default="harmful",
        help="data: keep features more active on harmful (default) or on benign prompts",
    )  # fmt: skip
    p.add_argument("--layer", type=int, help="data: layer, if the SAE does not record it")
    p.add_argument("--batch-size", type=int, default=8, help="data: prompts per forward pass")
    p.add_argument("--max-length", type=int, default=256, help="data: tokens per prompt")
    p.add_argument("--device", default="cpu", help="data / llm transformers: torch device")
    p.add_argument("--out", help="output JSON (default SAE_DIR/selected_<concept>.json)")
    p.add_argument("--show", type=int, default=20, help="print the first N features (default 20)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_select)
    return p


def _sae_dir(sae: str) -> Path:
    p = Path(sae)
    return p.parent if p.is_file() else p


def cmd_select(args: argparse.Namespace) -> int:
    from steerlex.explain.run import read_explanations
    from steerlex.sae.formats import load_sae
    from steerlex.steer.concepts import get_concept
    from steerlex.steer.select import (
        DEFAULT_EXPLANATION,
        check_explanation_settings,
        read_explanation_settings,
        select_features,
        selection_prompts,
    )

    concept = get_concept(
        args.concept, description=args.concept_text, words=args.concept_words,
        side=args.concept_side,
    )  # fmt: skip
    sae = load_sae(args.sae)
    expl_dir = Path(args.explanations) if args.explanations else _sae_dir(args.sae) / "explanations"
    expl_method = args.explanation_method or DEFAULT_EXPLANATION[concept.side]
    expl_path = expl_dir / f"{expl_method}.jsonl"
    explanations = None
    needs_words = args.method in ("semantic", "llm")
    if expl_path.is_file() or needs_words:
        if not expl_path.is_file():
            present = sorted(q.stem for q in expl_dir.glob("*.jsonl")) if expl_dir.is_dir() else []
            hint = (
                f" {expl_dir} has: {', '.join(present)}; pick one with --explanation-method."
                if present
                else f" Run `steerlex explain --sae {args.sae} --method {expl_method}` first."
            )
            raise SteerlexError(f"No {expl_method} explanations at {expl_path}.{hint}")
        explanations = read_explanations(expl_path)
        check_explanation_settings(
            read_explanation_settings(expl_path), sae, source=f"The explanations in {expl_path}"
        )
    kw: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if args.method == "llm":
        from steerlex.explain.summaries import backend_from_options

        kw["backend"] = backend_from_options(
            args.llm, base_url=args.llm_base_url, model=args.llm_model, device=args.device
        )
    elif args.method == "data":
        from steerlex.models.loading import load_model

        spec = args.model or sae.cfg.model_spec
        if not spec:
            raise SteerlexError(f"The SAE in {args.sae} does not record its model; pass --model.")
        harmful_src, benign_src = args.harmful or ["harmbench"], args.benign or ["benign"]
        split: dict[str, Any] = dict(
            split=args.split, heldout_fraction=args.heldout_fraction, limit=args.limit
        )
        kw.update(
            loaded=load_model(spec, device=args.device),
            harmful=selection_prompts(harmful_src, **split),
            benign=selection_prompts(benign_src, **split),
            direction=args.direction, layer=args.layer, batch_size=args.batch_size,
            max_length=args.max_length,
        )  # fmt: skip
        sae = sae.to(kw["loaded"].device)
        extra.update(harmful_sources=harmful_src, benign_sources=benign_src, **split)
    elif args.method == "manual":
        kw["ids"] = args.ids if args.ids is not None else ""
    selection = select_features(
        explanations, concept, method=args.method, threshold=args.threshold, top_n=args.top_n,
        n_words=args.n_words, scoring=args.scoring, sae=sae, sae_path=str(args.sae),
        explanations_path=str(expl_path) if explanations is not None else None,
        extra_settings=extra, progress=not args.quiet, **kw,
    )  # fmt: skip
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", concept.name).strip("_") or "concept"
    out = Path(args.out) if args.out else _sae_dir(args.sae) / f"selected_{name}.json"
    selection.save(out)
    _print_selection(selection, args.show)
    s = selection.settings
    where = f" from {expl_method} explanations" if explanations is not None else ""
    passed = ""
    if "n_scored" in s:
        passed = (
            f" ({s['n_passed']} of {s['n_scored']} at or above {s['threshold']})"
            if s.get("threshold") is not None
            else f" (the best of {s['n_scored']} scored)"
        )
    print(
        f"{len(selection.features)} features for '{concept.name}' by {selection.method}{where}"
        f"{passed} -> {out}",
        file=sys.stderr,
    )
    return 0


def _print_selection(selection: Any, show: int) -> None:
    from steerlex.cli import _print_table

    rows = [
        (str(f.id), f"{f.score:.3f}", ", ".join(f.words[:6]), f.reason)
        for f in selection.features[: max(show, 0)]
    ]
    if rows:
        _print_table(rows, ("id", "score", "words", "reason"))
    if len(selection.features) > len(rows):
        print(f"... and {len(selection.features) - len(rows)} more (see the JSON file)")
