"""``steerlex explain``, ``steerlex explain-metrics`` and ``steerlex export-neuronpedia``."""

from __future__ import annotations

import argparse
from typing import Any

from steerlex.cli.options import add_options, add_quiet, config_from_args, context_from_args
from steerlex.jobs.explain import (
    ExplainConfig,
    ExplainMetricsConfig,
    NeuronpediaConfig,
    explain_job,
    explain_metrics_job,
    export_neuronpedia_job,
    shown_words,
)

__all__ = ["register"]


def cmd_explain(args: argparse.Namespace) -> int:
    result = explain_job(config_from_args(ExplainConfig, args), context_from_args(args))
    for name, r in result.methods.items():
        print(f"{name}: {r.summaries}")
        print(f"{name}: {len(r.explanations)} features explained in {r.seconds:.1f}s -> {r.path}")
        for e in r.explanations[: args.show]:
            print(f"  feature {e.feature}: {shown_words(r, e)}")
    return 0


def cmd_explain_metrics(args: argparse.Namespace) -> int:
    r = explain_metrics_job(config_from_args(ExplainMetricsConfig, args), context_from_args(args))
    print(r.table)
    print(
        f"metrics of {len(r.metrics['features'])} features -> {r.path} "
        f"(table: {r.path.with_suffix('.md')})"
    )
    return 0


def cmd_export_neuronpedia(args: argparse.Namespace) -> int:
    r = export_neuronpedia_job(config_from_args(NeuronpediaConfig, args), context_from_args(args))
    print(
        f"Neuronpedia export of {r.model_id} / {r.source_id}: {r.features} features, "
        f"{r.explanations} explanations, {r.activations} activations -> {r.path}"
    )
    if r.note:
        print(r.note)
    print(
        f"{r.root} is laid out like Neuronpedia's dataset bucket v1/; to import it, see "
        "docs/formats.md#neuronpedia-export"
    )
    return 0


def register(sub: Any) -> None:
    """Add ``explain``, ``explain-metrics`` and ``export-neuronpedia``."""
    p = sub.add_parser(
        "explain", help="explain every SAE feature with vocabulary words (mi, paper) or tokens"
    )
    add_options(p, ExplainConfig)
    p.add_argument("--show", type=int, default=5, help="print the words of the first N features")
    add_quiet(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "explain-metrics",
        help="score explanations: output- and input-side faithfulness, frequency bias, levels",
    )
    add_options(p, ExplainMetricsConfig)
    add_quiet(p)
    p.set_defaults(func=cmd_explain_metrics)

    p = sub.add_parser(
        "export-neuronpedia",
        help="write features, explanations and TopAct examples as a Neuronpedia dataset export",
    )
    add_options(p, NeuronpediaConfig)
    add_quiet(p)
    p.set_defaults(func=cmd_export_neuronpedia)
