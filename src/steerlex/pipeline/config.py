"""The config of ``steerlex run``: one JSON object, strict (unknown keys and wrong types are
errors naming the key), on top of a built-in profile.

The config has the run's own keys (``name``, ``model``, ``layer``, ``device``) and one
section per stage, and each section *is* that stage's config class (the same dataclass
its command's flags come from): every option of every stage can be set, with the same
default and help text. The keys the run fills in itself (the model, layer and device,
and the paths between stages) are owned by the run: they cannot be given and are not
written out. Every default is written out into the run directory as ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlex.core.config import (
    build_strict,
    config_to_dict,
    merge,
    option,
    read_json_config,
    section,
)
from steerlex.core.errors import PipelineError, SteerlexError
from steerlex.evaluate.config import EvalConfig
from steerlex.evaluate.plan import plan_defences
from steerlex.explain.method import default_method, get_method, method_names
from steerlex.jobs.explain import ExplainConfig, ExplainMetricsConfig
from steerlex.jobs.harvest import HarvestConfig
from steerlex.jobs.report import ExamplesConfig, FeaturesConfig
from steerlex.jobs.sae import EvalSAEConfig
from steerlex.jobs.select import SelectConfig, concept_side
from steerlex.models.embedded import DEFAULT_MODEL
from steerlex.pipeline.profiles import PROFILES, profile
from steerlex.sae.train import TrainConfig

__all__ = [
    "PROFILES",
    "RunConfig",
    "SelectSection",
    "config_dict",
    "config_fingerprint",
    "config_from_dict",
    "resolve_config",
    "selection_method",
]

_PATHS = ("out",)
_MODEL = ("model", "device")


@dataclass
class SelectSection:
    """The run's two selections: ``safety`` (the features the SAE defences steer, from
    output-side explanations) and ``harm`` (the conditional gate's detectors, from
    input-side explanations)."""

    safety: SelectConfig = section(
        lambda: SelectConfig(concept="safety"),
        help="the features to steer",
        owned=("sae", "explanations", "out", *_MODEL),
    )
    harm: SelectConfig = section(
        lambda: SelectConfig(concept="harm"),
        help="the harm detectors that open the conditional gate",
        owned=("sae", "explanations", "out", *_MODEL),
    )


@dataclass
class RunConfig:
    """Everything ``steerlex run`` does (docs/pipeline.md; every key: docs/config.md)."""

    name: str = option("default", help="the run directory's name under --runs-dir")
    model: str = option(DEFAULT_MODEL, help="model spec every stage uses")
    layer: int = option(8, help="decoder layer L (0-based): harvested, explained and steered")
    device: str = option("cpu", help="torch device for every stage")
    harvest: HarvestConfig = section(
        lambda: HarvestConfig(layer=0),
        help="the texts harvested (train and held-out parts)",
        owned=("model", "layer", "device", "split", *_PATHS),
    )
    train_sae: TrainConfig = section(
        TrainConfig, help="SAE training on the train part", owned=("device",)
    )
    eval_sae: EvalSAEConfig = section(
        EvalSAEConfig,
        help="SAE evaluation on the held-out part",
        owned=("sae", "activations", "verify", *_MODEL, *_PATHS),
    )
    explain: ExplainConfig = section(
        lambda: ExplainConfig(methods=list(method_names())),
        help="explanations of every feature",
        owned=("sae", "activations", *_MODEL, *_PATHS),
    )
    explain_metrics: ExplainMetricsConfig = section(
        ExplainMetricsConfig,
        help="explanation metrics (features 0: skip the stage)",
        owned=("sae", "explanations", *_MODEL, *_PATHS),
    )
    select: SelectSection = section(SelectSection, help="feature selection")
    eval: EvalConfig = section(
        EvalConfig,
        help="the safety evaluation (docs/evaluation.md)",
        owned=("sae", "layer", "features", "harm_features", "cache", *_MODEL, *_PATHS),
    )
    features: FeaturesConfig = section(
        FeaturesConfig,
        help="the feature browser's statistics",
        owned=("sae", "activations", *_MODEL, *_PATHS),
    )
    examples: ExamplesConfig = section(
        ExamplesConfig,
        help="the report's example conversations",
        owned=("sae", "layer", "generations", "features", *_MODEL, *_PATHS),
    )


def resolve_config(
    profile_name: str = "default",
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """The profile's config with the JSON file at ``path`` (if any) and ``overrides`` on
    top, checked."""
    if profile_name not in PROFILES:
        raise PipelineError(
            f"Unknown profile {profile_name!r}; choose one of {', '.join(PROFILES)}."
        )
    data = profile(profile_name)
    if path is not None:
        data = merge(data, read_json_config(path, "run config", PipelineError))
    return config_from_dict(merge(data, overrides or {}))


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from a JSON object (strict, every section included)."""
    if not isinstance(data, dict):
        raise PipelineError(f"The run config must be a JSON object, got {type(data).__name__}.")
    try:
        cfg = build_strict(RunConfig, data, "", PipelineError)
    except SteerlexError as exc:
        raise PipelineError(str(exc)) from None
    if not cfg.name or any(c in cfg.name for c in "/\\") or cfg.name.startswith("."):
        raise PipelineError(f"Config key 'name' must be a plain directory name, got {cfg.name!r}.")
    try:
        _check_sections(cfg)
    except PipelineError:
        raise
    except SteerlexError as exc:
        raise PipelineError(str(exc)) from None
    return cfg


def selection_method(s: SelectConfig) -> str:
    """The explanation method a selection reads (its own, else the default for the side of
    its concept)."""
    if s.explanation_method:
        return s.explanation_method
    return default_method(concept_side(s))


def _check_sections(cfg: RunConfig) -> None:
    """What can be checked without the run directory: known explanation methods, selections
    that read explanations the run makes, and the defences."""
    for m in cfg.explain.methods:
        get_method(m)
    if not cfg.explain.methods:
        raise PipelineError("Config key 'explain.methods' is empty; give at least one method.")
    for name, s in (("safety", cfg.select.safety), ("harm", cfg.select.harm)):
        method = selection_method(s)
        get_method(method)
        if s.method in ("semantic", "llm") and method not in cfg.explain.methods:
            raise PipelineError(
                f"Config key 'select.{name}' reads {method} explanations, but "
                f"'explain.methods' ({', '.join(cfg.explain.methods)}) does not make them; add "
                f"{method!r} to explain.methods or choose another select.{name}.explanation_method."
            )
    try:
        plan_defences(cfg.eval, with_sae=True)
    except SteerlexError as exc:
        raise PipelineError(f"Config key 'eval': {exc}") from None


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as JSON, every default written out (owned keys left out)."""
    out: dict[str, Any] = config_to_dict(cfg)
    return out


def config_fingerprint(cfg: RunConfig) -> str:
    """sha256 of the resolved config without its name: two runs with the same fingerprint
    compute the same things."""
    data = config_dict(cfg)
    data.pop("name", None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()
