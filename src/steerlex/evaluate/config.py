"""The evaluation config: nested dataclasses read strictly from JSON (unknown keys and wrong
types are errors naming the key), and the built-in profiles."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from steerlex.configs import from_dict_strict
from steerlex.evaluate.sets import EvalError, SourceSpec

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


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true/false",
            "SourceSpec": 'a source object {"source": ...}',
        }.get(tp.__name__, tp.__name__)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of ({_type_name(typing.get_args(tp)[0])})"
    if origin is dict:
        return "an object of strings"
    return str(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    bad = EvalError(
        f"Config key '{path}' must be {_type_name(tp)}, got {json.dumps(value)[:80]} "
        f"({type(value).__name__})."
    )
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except EvalError as exc:
                if is_dataclass(arg) and isinstance(value, dict):
                    raise exc from None
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise bad
        return dict(value)
    if is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    prefix = f"{path}." if path else ""
    what = f"config key(s) under '{path}':" if path else "config key(s)"
    kwargs = {k: _coerce(v, hints[k], prefix + k) if k in hints else v for k, v in data.items()}
    if set(kwargs) <= set(hints):
        required = [
            f.name
            for f in fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in kwargs]
        if missing:
            raise EvalError(f"Config is missing {', '.join(prefix + k for k in missing)}.")
    return from_dict_strict(cls, kwargs, what, EvalError)


def config_from_dict(data: dict[str, Any]) -> EvalConfig:
    """An :class:`EvalConfig` from a JSON object; unknown keys and wrong types raise
    :class:`EvalError` naming the key (e.g. ``sets.n_benign``)."""
    if not isinstance(data, dict):
        raise EvalError(f"The eval config must be a JSON object, got {type(data).__name__}.")
    cfg = _build(EvalConfig, data, "")
    assert isinstance(cfg, EvalConfig)
    return cfg


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, recursively for objects (lists are replaced)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """The JSON object in the config file ``path`` (not yet checked)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalError(f"The eval config {p} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EvalError(f"The eval config {p} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise EvalError(f"The eval config {p} must hold a JSON object.")
    return data


def load_config(path: str | Path, *, base: dict[str, Any] | None = None) -> EvalConfig:
    """Read a JSON config file (on top of ``base``, e.g. a profile)."""
    return config_from_dict(merge(base or {}, read_config_dict(path)))


def config_to_dict(cfg: Any) -> Any:
    """A JSON-ready dict of a config (dataclasses and source specs included)."""
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, list):
        return [config_to_dict(v) for v in cfg]
    return cfg
