"""The evaluation config: nested dataclasses read strictly from JSON (unknown keys and wrong
types are errors naming the key), and the built-in profiles."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlex.core.config import build_strict, config_to_dict, merge, read_json_config
from steerlex.core.errors import EvalError
from steerlex.evaluate.sets import SourceSpec

__all__ = [
    "PROFILES",
    "DefenceConfig",
    "EvalConfig",
    "GenerationConfig",
    "JudgeConfig",
    "SetsConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "merge",
    "profile",
    "read_config_dict",
]

Source = str | SourceSpec


@dataclass
class SetsConfig:
    """Which prompts (see :func:`steerlex.evaluate.sets.build_sets`)."""

    harmful: list[Source] = field(default_factory=lambda: ["harmbench"])
    templates: list[Source] = field(default_factory=lambda: ["jailbreak-wild", "dan"])
    benign: list[Source] = field(default_factory=lambda: ["benign"])
    utility: list[Source] = field(default_factory=list)
    n_jailbreak: int = 40
    n_harmful: int = 40
    n_benign: int = 40
    n_utility: int = 0
    n_selection: int = 16
    n_tuning: int = 64
    test_fraction: float = 0.5
    salt: str = "steerlex-eval"
    append: bool = True
    model_name: str = "ChatGPT"
    template_budget: int | None = 384


@dataclass
class GenerationConfig:
    """Decoding settings (part of every cache key)."""

    max_new_tokens: int = 48
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class DefenceConfig:
    """One defence. ``kind``: none, self-reminder, dense, amplify, calibrate. ``name`` defaults
    to the kind (``calibrate-conditional`` for a conditional calibrate). Steering kinds take
    ``strengths`` (the sweep) and optionally a fixed headline ``strength``; otherwise the
    headline strength is tuned on the selection split."""

    kind: str
    name: str | None = None
    strengths: list[float] | None = None
    strength: float | None = None
    conditional: bool = False
    gate_threshold: float | None = None
    gate_mode: str = "prompt"
    keep_norm: bool | None = None
    system_prompt: str | None = None
    suffix: str | None = None
    features: str | list[int] | None = None
    harm_features: str | list[int] | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return f"{self.kind}-conditional" if self.conditional else self.kind


@dataclass
class JudgeConfig:
    """An LLM judge. ``kind``: ``openai`` (any OpenAI-compatible endpoint: ``base_url`` and
    ``model``), ``transformers`` (a local chat model spec in ``model``, asked with the harm
    rubric) or ``guard`` (a local guard model such as Llama Guard in ``model``)."""

    kind: str
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    attempts: int = 3
    retries: int = 2
    timeout: float = 60.0
    max_tokens: int = 64


@dataclass
class EvalConfig:
    """Everything an evaluation run needs; see docs/evaluation.md for each key."""

    model: str | None = None
    sae: str | None = None
    layer: int | None = None
    out: str = "runs/eval"
    cache: str | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    features: str | list[int] | None = None
    harm_features: str | list[int] | None = None
    feature_top_n: int = 20
    tuning_max_length: int = 256
    max_overrefusal_increase: float = 0.05
    kl: bool = True
    sets: SetsConfig = field(default_factory=SetsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    defences: list[DefenceConfig] | None = None
    judge: JudgeConfig | None = None


def default_defences(with_sae: bool) -> list[DefenceConfig]:
    """none, self-reminder and dense; with an SAE also amplify, calibrate and conditional
    calibrate. Strength sweeps of three points each."""
    out = [
        DefenceConfig("none"),
        DefenceConfig("self-reminder"),
        DefenceConfig("dense", strengths=[0.1, 0.2, 0.4]),
    ]
    if with_sae:
        out += [
            DefenceConfig("amplify", strengths=[2.0, 4.0, 8.0]),
            DefenceConfig("calibrate", strengths=[1.0, 2.5, 5.0]),
            DefenceConfig("calibrate", conditional=True, strengths=[1.0, 2.5, 5.0]),
        ]
    return out


PROFILES: dict[str, dict[str, Any]] = {
    # Sized for a 2-core CPU and the 0.5B default model (about 1.5 hours with an SAE).
    "default": {},
    # Checks that everything runs: a few prompts, a few tokens, two defences.
    "smoke": {
        "sets": {
            "n_jailbreak": 4,
            "n_harmful": 4,
            "n_benign": 4,
            "n_selection": 2,
            "n_tuning": 8,
        },
        "generation": {"max_new_tokens": 8},
        "defences": [{"kind": "none"}, {"kind": "dense", "strengths": [0.2]}],
    },
}


def profile(name: str) -> dict[str, Any]:
    """The config dict of a built-in profile."""
    if name not in PROFILES:
        raise EvalError(f"Unknown profile {name!r}; choose one of {', '.join(PROFILES)}.")
    return json.loads(json.dumps(PROFILES[name]))


# --------------------------------------------------------------------------- strict parsing


def config_from_dict(data: dict[str, Any]) -> EvalConfig:
    """An :class:`EvalConfig` from a JSON object; unknown keys and wrong types raise
    :class:`EvalError` naming the key (e.g. ``sets.n_benign``)."""
    if not isinstance(data, dict):
        raise EvalError(f"The eval config must be a JSON object, got {type(data).__name__}.")
    cfg = build_strict(EvalConfig, data, "", EvalError)
    assert isinstance(cfg, EvalConfig)
    return cfg


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """The JSON object in the config file ``path`` (not yet checked)."""
    return read_json_config(path, "eval config", EvalError)


def load_config(path: str | Path, *, base: dict[str, Any] | None = None) -> EvalConfig:
    """Read a JSON config file (on top of ``base``, e.g. a profile)."""
    return config_from_dict(merge(base or {}, read_config_dict(path)))
