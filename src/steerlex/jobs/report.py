"""The report jobs: per-feature statistics for the browser (``features``), example
conversations with and without steering (``examples``), and the two HTML files
(``report``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from steerlex.core.config import option
from steerlex.core.errors import ReportError
from steerlex.jobs.context import RunContext
from steerlex.report import (
    build_browser,
    build_report,
    conversation_examples,
    feature_stats,
    token_decoder,
    write_examples,
    write_feature_stats,
)
from steerlex.steer.select import FeatureSelection

__all__ = [
    "ExamplesConfig",
    "FeaturesConfig",
    "examples_job",
    "features_job",
    "report_job",
]


@dataclass(frozen=True)
class FeaturesConfig:
    """Per-feature firing frequency, maximum, histogram and top-activating contexts over an
    activation store (``features.json``, read by the feature browser)."""

    sae: str | None = option(None, help="SAE directory")
    activations: str | None = option(None, help="activation store of the SAE's model and layer")
    model: str | None = option(None, help="model spec whose tokenizer decodes the contexts")
    top_contexts: int = option(8, help="top-activating contexts kept per feature")
    max_tokens: int | None = option(None, help="read at most this many stored tokens")
    device: str = option("cpu", help="torch device")
    out: str | None = option(None, help="output file (features.json)")


def features_job(cfg: FeaturesConfig, ctx: RunContext) -> Path:
    """Write ``cfg.out`` (features.json); returns its path."""
    if not (cfg.sae and cfg.activations and cfg.model and cfg.out):
        raise ReportError("features needs an SAE, an activation store, a model and an output.")
    if cfg.top_contexts < 1:
        raise ReportError(f"top_contexts must be at least 1, got {cfg.top_contexts}.")
    sae = ctx.sae(cfg.sae, device=cfg.device)
    store = ctx.store(cfg.activations)
    decode = token_decoder(ctx.tokenizer(cfg.model))
    stats = feature_stats(
        sae, store, decode, top_k=cfg.top_contexts, max_tokens=cfg.max_tokens,
        progress=ctx.progress,
    )  # fmt: skip
    out = Path(cfg.out)
    write_feature_stats(out, stats)
    return out


@dataclass(frozen=True)
class ExamplesConfig:
    """Example conversations of the evaluation: the same test prompts answered without a
    defence and with one defence at its headline strength (``examples.json``)."""

    sae: str | None = option(None, help="SAE directory")
    model: str | None = option(None, help="model spec")
    layer: int | None = option(None, help="the steered layer")
    generations: str | None = option(None, help="the evaluation's generations.jsonl")
    features: str | None = option(None, help="the steered features (a selected_*.json)")
    defence: str = option(
        "amplify", help="the defence (a name in the eval section) whose replies are shown"
    )
    n: int = option(4, help="example conversations")
    device: str = option("cpu", help="torch device")
    out: str | None = option(None, help="output file (examples.json)")


def examples_job(cfg: ExamplesConfig, ctx: RunContext) -> Path:
    """Write ``cfg.out`` (examples.json); returns its path."""
    if not (cfg.sae and cfg.model and cfg.generations and cfg.features and cfg.out):
        raise ReportError("examples needs an SAE, a model, generations, features and an output.")
    if cfg.layer is None:
        raise ReportError("examples needs the steered layer.")
    sae = ctx.sae(cfg.sae, device=cfg.device)
    loaded = ctx.model(cfg.model, device=cfg.device)
    ids = FeatureSelection.load(cfg.features).ids
    rows = conversation_examples(loaded, sae, cfg.layer, cfg.generations, cfg.defence, ids, n=cfg.n)
    out = Path(cfg.out)
    write_examples(out, rows)
    return out


def report_job(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``browser.html`` and then ``report.html`` (which links to it) for ``run_dir``;
    returns (report, browser)."""
    browser = build_browser(run_dir)
    return build_report(run_dir), browser
