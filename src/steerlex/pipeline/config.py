"""The config of ``steerlex run``: one JSON object, strict (unknown keys and wrong types are
errors naming the key), on top of a built-in profile. Every default is written out into the
run directory as ``config.json``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlex.core.config import build_strict, config_to_dict, merge, read_json_config
from steerlex.core.errors import PipelineError
from steerlex.models.embedded import DEFAULT_MODEL, SMALL_MODEL

__all__ = [
    "PROFILES",
    "PipelineError",
    "RunConfig",
    "config_fingerprint",
    "resolve_config",
]

EXPLAIN_METHODS = ("mi", "paper", "mi-input", "logitlens", "topact")


@dataclass
class HarvestSection:
    """Texts for the SAE (``steerlex harvest``): each named set or file in ``sources``,
    at most ``limit`` texts of each, split by a hash of the text id."""

    sources: list[str] = field(default_factory=lambda: ["benign", "harmbench", "jailbreak-wild"])
    limit: int | None = 64
    heldout_fraction: float = 0.1
    max_length: int = 256
    batch_size: int = 8


@dataclass
class SAESection:
    """``steerlex train-sae`` settings (the rest are its defaults) and ``eval-sae``'s."""

    d_sae: int = 2048
    k: int = 32
    tokens: int = 131072
    lr: float = 2e-3
    warmup_steps: int = 25
    batch_size: int = 1024
    seed: int = 0
    eval_lm_texts: int = 16


@dataclass
class ExplainSection:
    """``steerlex explain`` (every method by default) and ``explain-metrics`` on
    ``metrics_features`` sampled features (0 skips the metrics)."""

    methods: list[str] = field(default_factory=lambda: list(EXPLAIN_METHODS))
    vocab_size: int = 5000
    metrics_features: int = 24
    metrics_strengths: list[float] = field(default_factory=lambda: [1.0])
    levels: bool = True


@dataclass
class SelectSection:
    """Features chosen from their explanations: ``safety`` (steered, from mi words) and
    ``harm`` (the conditional gate's detectors, from mi-input words)."""

    safety_top_n: int = 10
    harm_top_n: int = 10


@dataclass
class ReportSection:
    """The feature browser's statistics and the report's example conversations."""

    top_contexts: int = 8
    max_tokens: int | None = None
    examples: int = 4
    example_defence: str = "amplify"


@dataclass
class RunConfig:
    """Everything ``steerlex run`` does; see docs/pipeline.md for each key. ``eval`` is an
    eval config (docs/evaluation.md) without model, sae, layer, features, out and device,
    which the run fills in."""

    name: str = "default"
    model: str = DEFAULT_MODEL
    layer: int = 8
    device: str = "cpu"
    harvest: HarvestSection = field(default_factory=HarvestSection)
    sae: SAESection = field(default_factory=SAESection)
    explain: ExplainSection = field(default_factory=ExplainSection)
    select: SelectSection = field(default_factory=SelectSection)
    eval: dict[str, Any] = field(default_factory=dict)
    report: ReportSection = field(default_factory=ReportSection)


_DEFAULT_EVAL: dict[str, Any] = {
    "sets": {
        "n_jailbreak": 24,
        "n_harmful": 12,
        "n_benign": 24,
        "n_selection": 8,
        "n_tuning": 32,
    },
    "generation": {"max_new_tokens": 32, "batch_size": 8},
    "defences": [
        {"kind": "none"},
        {"kind": "dense", "strengths": [0.2]},
        # strengths where the full-size run (docs/results.md) saw the defences act
        {"kind": "amplify", "strengths": [1.5, 3.0]},
        {"kind": "amplify", "name": "amplify-data", "strengths": [1.0], "features": "data"},
        {"kind": "calibrate", "strengths": [20.0]},
        {"kind": "calibrate", "conditional": True, "strengths": [20.0]},
    ],
}

PROFILES: dict[str, dict[str, Any]] = {
    # The README's main job: the default model on 2 CPU cores (see docs/results.md for
    # the measured wall time).
    "default": {"eval": _DEFAULT_EVAL},
    # The whole chain on the small packaged model in a few minutes (what CI runs).
    "quick": {
        "name": "quick",
        "model": SMALL_MODEL,
        "layer": 10,
        "harvest": {"sources": ["benign", "harmbench"], "limit": 48, "max_length": 96},
        "sae": {"d_sae": 512, "k": 16, "tokens": 32768, "batch_size": 256, "eval_lm_texts": 4},
        "explain": {"vocab_size": 1000, "metrics_features": 4, "levels": False},
        "select": {"safety_top_n": 4, "harm_top_n": 4},
        "report": {"top_contexts": 4, "examples": 2},
        "eval": {
            "sets": {
                "n_jailbreak": 4,
                "n_harmful": 4,
                "n_benign": 4,
                "n_selection": 2,
                "n_tuning": 8,
                "template_budget": 96,
            },
            "generation": {"max_new_tokens": 8, "batch_size": 8},
            "defences": [
                {"kind": "none"},
                {"kind": "dense", "strengths": [0.2]},
                {"kind": "amplify", "strengths": [2.0]},
                {"kind": "calibrate", "conditional": True, "strengths": [5.0]},
            ],
        },
    },
}

# Keys the run fills in itself.
_EVAL_OWNED = ("model", "sae", "layer", "features", "harm_features", "out", "device", "cache")


def resolve_config(profile: str = "default", path: str | Path | None = None) -> RunConfig:
    """The profile's config with the JSON file at ``path`` (if any) on top, checked."""
    if profile not in PROFILES:
        raise PipelineError(f"Unknown profile {profile!r}; choose one of {', '.join(PROFILES)}.")
    data = json.loads(json.dumps(PROFILES[profile]))
    if path is not None:
        data = merge(data, read_json_config(path, "run config", PipelineError))
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from a JSON object (strict; the ``eval`` part too)."""
    if not isinstance(data, dict):
        raise PipelineError(f"The run config must be a JSON object, got {type(data).__name__}.")
    cfg = build_strict(RunConfig, data, "", PipelineError)
    bad = sorted(set(cfg.explain.methods) - set(EXPLAIN_METHODS))
    if bad or not cfg.explain.methods:
        raise PipelineError(
            f"Config key 'explain.methods' has {bad or 'no methods'}; "
            f"choose from {list(EXPLAIN_METHODS)}."
        )
    for need in ("mi", "mi-input"):
        if need not in cfg.explain.methods:
            raise PipelineError(
                f"Config key 'explain.methods' must include {need!r}: feature selection reads "
                "safety features from mi words and harm detectors from mi-input words."
            )
    if not cfg.name or any(c in cfg.name for c in "/\\") or cfg.name.startswith("."):
        raise PipelineError(f"Config key 'name' must be a plain directory name, got {cfg.name!r}.")
    owned = sorted(set(cfg.eval) & set(_EVAL_OWNED))
    if owned:
        raise PipelineError(
            f"Config key(s) {['eval.' + k for k in owned]} are set by the run itself "
            "(from model, layer, device and the selected features); remove them."
        )
    from steerlex.core.errors import EvalError
    from steerlex.evaluate.config import EvalConfig

    try:
        build_strict(EvalConfig, eval_section(cfg, sae="sae", safety="s.json", harm="h.json"),
                     "eval", EvalError)  # fmt: skip
    except EvalError as exc:
        raise PipelineError(str(exc)) from None
    return cfg


def eval_section(cfg: RunConfig, *, sae: str, safety: str, harm: str) -> dict[str, Any]:
    """The eval config of the run: ``cfg.eval`` with the run's model, SAE, layer and device
    filled in. SAE defences steer the explanation-selected ``safety`` features (the
    conditional ones gated by the ``harm`` detectors) unless they name their own; a defence
    whose ``features`` is ``"data"`` steers the data-selected features instead (chosen by
    the evaluation on its selection split, without explanations)."""
    from steerlex.evaluate.config import default_defences
    from steerlex.evaluate.defences import SAE_KINDS

    data = json.loads(json.dumps(cfg.eval))
    defences = data.get("defences")
    if defences is None:
        defences = config_to_dict(default_defences(with_sae=True))
    for d in defences if isinstance(defences, list) else []:
        if not isinstance(d, dict) or d.get("kind") not in SAE_KINDS:
            continue
        if d.get("features") == "data":
            d["features"] = None
            continue
        d.setdefault("features", safety)
        if d.get("conditional"):
            d.setdefault("harm_features", harm)
    data.update(defences=defences, model=cfg.model, sae=sae, layer=cfg.layer, device=cfg.device)
    return data


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as JSON, the eval part with every default written out (SAE
    defences keep ``features`` as given: null means the explanation-selected features)."""
    from steerlex.evaluate.config import config_from_dict as eval_from_dict
    from steerlex.evaluate.config import default_defences

    out: dict[str, Any] = config_to_dict(cfg)
    data = json.loads(json.dumps(cfg.eval))
    if data.get("defences") is None:
        data["defences"] = config_to_dict(default_defences(with_sae=True))
    full = config_to_dict(eval_from_dict(data))
    out["eval"] = {k: v for k, v in full.items() if k not in _EVAL_OWNED}
    return out


def config_fingerprint(cfg: RunConfig) -> str:
    """sha256 of the resolved config without its name: two runs with the same fingerprint
    compute the same things."""
    data = config_dict(cfg)
    data.pop("name", None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()
