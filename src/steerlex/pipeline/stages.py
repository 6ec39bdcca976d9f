"""The stages of ``steerlex run``: for each, what it needs, what it makes, and the job it
calls with the stage config the run builds from its own config and run directory.

:func:`stage_configs` builds every stage's full config up front (the run's model, layer,
device and paths filled in), so a bad option fails before the first stage runs. A stage's
``check`` does what needs more than the configs before any stage runs: the harvest checks
the run's layer against the model's layer count, read from its config (no weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from steerlex.core.config import config_to_dict
from steerlex.core.errors import LayerError, PipelineError, SteerlexError
from steerlex.core.io import write_json_atomic
from steerlex.evaluate.config import EvalConfig
from steerlex.jobs.context import RunContext
from steerlex.jobs.evaluate import eval_job, plan_run_defences
from steerlex.jobs.explain import (
    ExplainConfig,
    ExplainMetricsConfig,
    explain_job,
    explain_metrics_job,
    shown_words,
)
from steerlex.jobs.harvest import HarvestConfig, harvest_job
from steerlex.jobs.report import (
    ExamplesConfig,
    FeaturesConfig,
    examples_job,
    features_job,
    report_job,
)
from steerlex.jobs.sae import EvalSAEConfig, TrainSAEConfig, eval_sae_job, train_sae_job
from steerlex.jobs.select import SelectConfig, select_job
from steerlex.models.hooks import check_layer
from steerlex.models.loading import load_config
from steerlex.pipeline.config import RunConfig, selection_method

__all__ = ["STAGES", "Stage", "StageConfigs", "stage_configs", "stage_names"]

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class StageConfigs:
    """The config of every stage of one run (harvest: one per split)."""

    harvest: dict[str, HarvestConfig]
    train_sae: TrainSAEConfig
    eval_sae: EvalSAEConfig
    explain: ExplainConfig
    explain_metrics: ExplainMetricsConfig
    select: dict[str, SelectConfig]
    eval: EvalConfig
    features: FeaturesConfig
    examples: ExamplesConfig


def stage_configs(cfg: RunConfig, d: Path) -> StageConfigs:
    """Every stage's config for run directory ``d``, checked."""
    m, dev = cfg.model, cfg.device
    sae, expl = str(d / "sae"), str(d / "explanations")
    train, heldout = str(d / "acts-train"), str(d / "acts-heldout")
    safety, harm = str(d / "selected_safety.json"), str(d / "selected_harm.json")
    h = cfg.harvest
    e = cfg.examples
    out = StageConfigs(
        harvest={
            "train": replace(h, model=m, device=dev, layer=cfg.layer, split="train", out=train),
            "heldout": replace(
                h, model=m, device=dev, layer=cfg.layer, split="heldout", out=heldout
            ),
        },
        train_sae=TrainSAEConfig(
            **{**config_to_dict(cfg.train_sae), "device": dev}, activations=train, out=sae
        ),
        eval_sae=replace(cfg.eval_sae, model=m, device=dev, sae=sae, activations=heldout, out=None),
        explain=replace(cfg.explain, model=m, device=dev, sae=sae, activations=train, out=expl),
        explain_metrics=replace(
            cfg.explain_metrics, model=m, device=dev, sae=sae, explanations=expl, out=None
        ),
        select={
            "safety": replace(
                cfg.select.safety, model=m, device=dev, sae=sae, explanations=expl, out=safety
            ),
            "harm": replace(
                cfg.select.harm, model=m, device=dev, sae=sae, explanations=expl, out=harm
            ),
        },
        eval=plan_run_defences(
            cfg.eval,
            model=m,
            device=dev,
            sae=sae,
            layer=cfg.layer,
            out=str(d / "eval"),
            safety=safety,
            harm=harm,
        ),
        features=replace(
            cfg.features,
            model=m,
            device=dev,
            sae=sae,
            activations=train,
            out=str(d / "features.json"),
        ),
        examples=replace(
            e,
            model=m,
            device=dev,
            sae=sae,
            layer=cfg.layer,
            features=safety,
            generations=str(d / "eval" / "generations.jsonl"),
            out=str(d / "examples.json"),
        ),
    )
    _check(cfg, out)
    return out


def _check(cfg: RunConfig, c: StageConfigs) -> None:
    """Every stage config's own checks (the run's sections are checked when read)."""
    for h in c.harvest.values():
        h.validate()
    c.train_sae.validate(1)
    c.eval_sae.validate()
    c.explain.validate()
    if cfg.explain_metrics.features > 0:
        c.explain_metrics.validate()
    for s in c.select.values():
        s.validate()
    try:
        c.eval.validate()
    except SteerlexError as exc:
        raise PipelineError(f"Config section 'eval': {exc}") from None


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One step: what it needs (run-relative paths, each with the stage that makes it),
    what it makes (both depend on the stage configs, e.g. which explanation methods run),
    how, and what to check before any stage of the run starts (``check``, beyond the
    configs' own checks)."""

    name: str
    needs: Callable[[StageConfigs], tuple[tuple[str, str], ...]]
    makes: Callable[[StageConfigs], tuple[str, ...]]
    run: Callable[[StageConfigs, Path, RunContext], None]
    help: str
    check: Callable[[StageConfigs, RunContext], None] | None = None


def _check_layer(c: StageConfigs, ctx: RunContext) -> None:
    """The run's layer against the model's decoder layers, counted on a weightless (meta
    device) copy built from the model's config, or on the model ``ctx`` already holds."""
    h = c.harvest["train"]
    loaded = ctx.loaded_model(h.model)
    if loaded is not None:
        model = loaded.model
    else:
        config = load_config(h.model)[0]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    try:
        check_layer(model, h.layer)
    except LayerError as exc:
        raise PipelineError(
            f"Config key 'layer' does not fit the model {h.model}: {exc}; set another, e.g. "
            "--set layer=N."
        ) from None


def _harvest(c: StageConfigs, d: Path, ctx: RunContext) -> None:
    for split, h in c.harvest.items():
        r = harvest_job(h, ctx)
        ctx.say(f"  {split}: {r.summary['n_tokens']:,} tokens of {r.summary['n_texts']:,} texts")


def _train(c: StageConfigs, d: Path, ctx: RunContext) -> None:
    r = train_sae_job(c.train_sae, ctx)
    ctx.say(f"  trained on {r.n_tokens:,} stored tokens in {r.seconds:.0f}s")


def _eval_sae(c: StageConfigs, d: Path, ctx: RunContext) -> None:
    r = eval_sae_job(c.eval_sae, ctx)
    act = r.result["activation"]
    ctx.say(f"  held-out FVE {act['fve']:.4f}, L0 {act['l0']:.1f}, dead {act['dead_fraction']:.2%}")


def _explain(c: StageConfigs, d: Path, ctx: RunContext) -> None:
    r = explain_job(c.explain, ctx)
    for name, m in r.methods.items():
        ctx.say(f"  {name}: {len(m.explanations)} features in {m.seconds:.1f}s")
        for e in m.explanations[:3]:
            ctx.say(f"    feature {e.feature}: {shown_words(m, e)}")


def _explain_metrics(c: StageConfigs, d: Path, ctx: RunContext) -> None:
    r = explain_metrics_job(c.explain_metrics, ctx)
    ctx.say(r.table)


def _select(c: StageConfigs, d: Path, ctx: RunContext) -> None:
    for name, s in c.select.items():
        r = select_job(s, ctx)
        shown = ", ".join(str(f.id) for f in r.features[:10])
        ctx.say(f"  {name}: {len(r.features)} features by {r.method} ({shown})")


def _eval(c: StageConfigs, d: Path, ctx: RunContext) -> None:
    write_json_atomic(d / "eval_config.json", config_to_dict(c.eval))
    eval_job(c.eval, ctx)


def _features(c: StageConfigs, d: Path, ctx: RunContext) -> None:
    features_job(c.features, ctx)


def _examples(c: StageConfigs, d: Path, ctx: RunContext) -> None:
    examples_job(c.examples, ctx)


def _report(c: StageConfigs, d: Path, ctx: RunContext) -> None:
    report_job(d)
    lacking = []
    for stage in STAGES:
        skipped = stage.name == "explain-metrics" and c.explain_metrics.features <= 0
        if stage.name == "report" or skipped:
            continue
        missing = [m for m in stage.makes(c) if not (d / m).exists()]
        if missing:
            lacking.append(f"{stage.name} ({', '.join(missing)})")
    if lacking:
        ctx.say(
            f"  partial report: the outputs of {len(lacking)} earlier stage(s) are missing, "
            f"so their sections say 'not run': {'; '.join(lacking)}. Run them first "
            f"(steerlex run --resume {d}), then the report again (steerlex run --resume {d} "
            "--stage report)."
        )


def _fixed(*paths: str) -> Callable[[StageConfigs], tuple[str, ...]]:
    return lambda c: paths


def _needs(*pairs: tuple[str, str]) -> Callable[[StageConfigs], tuple[tuple[str, str], ...]]:
    return lambda c: pairs


def _explained(c: StageConfigs) -> tuple[str, ...]:
    return tuple(f"explanations/{m}.jsonl" for m in c.explain.methods)


def _selection_inputs(c: StageConfigs) -> tuple[tuple[str, str], ...]:
    methods = dict.fromkeys(selection_method(s) for s in c.select.values())
    return tuple((f"explanations/{m}.jsonl", "explain") for m in methods)


_SAE = ("sae/cfg.json", "train-sae")
_TRAIN = ("acts-train/index.json", "harvest")
_SELECTED = (("selected_safety.json", "select"), ("selected_harm.json", "select"))

STAGES: tuple[Stage, ...] = (
    Stage("harvest", _needs(), _fixed("acts-train/index.json", "acts-heldout/index.json"),
          _harvest, "layer-L activations of the texts, train and held-out", _check_layer),
    Stage("train-sae", _needs(_TRAIN), _fixed("sae/cfg.json"), _train,
          "an SAE on the train activations"),
    Stage("eval-sae", _needs(_SAE, ("acts-heldout/index.json", "harvest")),
          _fixed("sae/eval/eval.json"), _eval_sae, "held-out FVE, L0, dead latents, spliced loss"),
    Stage("explain", _needs(_SAE, _TRAIN), _explained, _explain,
          "word lists for every feature by every method"),
    Stage("explain-metrics", lambda c: tuple((p, "explain") for p in _explained(c)),
          _fixed("explanations/metrics.json"), _explain_metrics,
          "faithfulness, frequency bias and levels of the explanations"),
    Stage("select", _selection_inputs, _fixed("selected_safety.json", "selected_harm.json"),
          _select, "safety features and harm detectors chosen from their explanations"),
    Stage("eval", _needs(*_SELECTED, _SAE), _fixed("eval/scores.json"), _eval,
          "the safety evaluation of every defence"),
    Stage("features", _needs(_SAE, _TRAIN), _fixed("features.json"), _features,
          "top contexts and activation histograms"),
    Stage("examples", _needs(("eval/scores.json", "eval"), _SELECTED[0]), _fixed("examples.json"),
          _examples, "conversations with and without steering"),
    Stage("report", _needs(), _fixed("report.html", "browser.html"), _report,
          "report.html and the feature browser"),
)  # fmt: skip


def stage_names() -> list[str]:
    return [s.name for s in STAGES]
