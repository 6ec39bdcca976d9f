"""The evaluation config: nested dataclasses read strictly from JSON (unknown keys and wrong
types are errors naming the key), and the built-in profiles."""

from __future__ import annotations

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
from steerlex.core.errors import EvalError, SteerlexError
from steerlex.core.paths import check_output_dir, check_output_file
from steerlex.evaluate.defences.base import DEFENCES, option_names
from steerlex.evaluate.sets import SourceSpec
from steerlex.judges.base import JudgeConfig

__all__ = [
    "COMMON_KEYS",
    "FLAT_KEYS",
    "DefenceConfig",
    "EvalConfig",
    "GenerationConfig",
    "JudgeConfig",
    "SetsConfig",
    "config_from_dict",
    "config_to_dict",
    "default_defences",
    "load_config",
    "merge",
    "read_config_dict",
]

Source = str | SourceSpec


@dataclass
class SetsConfig:
    """Which prompts (see :func:`steerlex.evaluate.sets.build_sets`)."""

    harmful: list[Source] = option(
        factory=lambda: ["harmbench"], help="harmful request sources (named sets or files)"
    )
    templates: list[Source] = option(
        factory=lambda: ["jailbreak-wild", "dan"], help="jailbreak template sources"
    )
    reformulated: list[Source] = option(
        factory=list,
        help="reformulated harmful requests, a jailbreak family of their own (e.g. past-tense)",
    )
    benign: list[Source] = option(factory=lambda: ["benign"], help="benign request sources")
    utility: list[Source] = option(
        factory=list, help="utility prompt sources (with reference answers, optional)"
    )
    n_jailbreak: int = option(40, help="test jailbreak prompts (a template around a request)")
    n_reformulated: int = option(0, help="test reformulated requests, split evenly by source")
    n_harmful: int = option(40, help="test plain harmful requests")
    n_benign: int = option(40, help="test benign requests (over-refusal)")
    n_utility: int = option(0, help="test utility prompts")
    n_selection: int = option(
        16, help="selection jailbreak, harmful and benign prompts for strength tuning"
    )
    n_tuning: int = option(
        64, help="selection harmful and benign prompts for the direction and the features"
    )
    test_fraction: float = option(0.5, help="share of the prompts in the test split")
    salt: str = option("steerlex-eval", help="salt of the fixed selection / test split")
    append: bool = option(True, help="append the request to templates that have no slot for it")
    model_name: str = option("ChatGPT", help="the name templates address (`{generator.name}`)")
    template_budget: int | None = option(384, help="template tokens kept (null: no limit)")


@dataclass
class GenerationConfig:
    """Decoding settings (part of every cache key)."""

    max_new_tokens: int = option(48, help="new tokens per reply")
    batch_size: int = option(8, help="prompts per batch")
    do_sample: bool = option(False, help="sample instead of greedy decoding")
    temperature: float = option(1.0, help="sampling temperature")
    top_p: float = option(1.0, help="nucleus sampling mass")
    seed: int | None = option(None, help="sampling seed")


COMMON_KEYS: tuple[str, ...] = ("kind", "name", "strengths", "strength")
"""The keys of every defence entry; the rest are its kind's options."""

FLAT_KEYS: dict[str, Any] = {
    "conditional": False,
    "gate_threshold": None,
    "gate_mode": "prompt",
    "keep_norm": None,
    "system_prompt": None,
    "suffix": None,
    "features": None,
    "harm_features": None,
}
"""The option keys every defence entry had before each kind declared its own, with their
defaults: a config written by an earlier steerlex (every entry with all of them) still
reads, as an entry of any kind may give them at these values."""


def _is_flat_default(key: str, value: Any) -> bool:
    default = FLAT_KEYS[key]
    if default is None or isinstance(default, bool):
        return value is default
    return type(value) is type(default) and bool(value == default)


@dataclass
class DefenceConfig:
    """One defence: its ``kind`` (a name in :data:`~steerlex.evaluate.defences.DEFENCES`),
    ``name`` (default: the kind's, e.g. ``calibrate-conditional``), for a sweeping kind the
    ``strengths`` (the sweep) and optionally a fixed headline ``strength`` (otherwise the headline
    strength is tuned on the selection split), and ``options``: an instance of the kind's
    options dataclass (its own keys; ``None``: the kind's defaults).

    In JSON it is one flat object, ``{"kind": "calibrate", "conditional": true, "strengths":
    [...]}``: the common keys plus the kind's own, checked strictly (:meth:`from_config`).
    """

    kind: str
    name: str | None = None
    strengths: list[float] | None = None
    strength: float | None = None
    options: Any = None

    def __post_init__(self) -> None:
        if self.options is None and self.kind in DEFENCES:
            self.options = DEFENCES.get(self.kind).options()

    @property
    def label(self) -> str:
        """The name in tables and plots: ``name``, else the kind's default name."""
        if self.name:
            return self.name
        return DEFENCES.get(self.kind).label(self)

    def sweep(self) -> list[float]:
        """Every strength to run: ``strengths``, then ``strength`` unless it is among them."""
        out = list(self.strengths or [])
        if self.strength is not None and self.strength not in out:
            out.append(self.strength)
        return out

    @classmethod
    def from_config(
        cls, data: dict[str, Any], path: str = "", error: type[SteerlexError] = EvalError
    ) -> DefenceConfig:
        """The entry from its flat JSON object; an unknown kind, a key the kind does not take
        or a wrong type raises ``error`` naming it (``path`` is where the entry sits, e.g.
        ``defences[2]``)."""
        where = path or "the defence"
        prefix = f"{path}." if path else ""
        if "kind" not in data:
            raise error(f"Config is missing {prefix}kind ({', '.join(DEFENCES.names())}).")
        kind = data["kind"]
        if not isinstance(kind, str) or kind not in DEFENCES:
            raise error(
                f"{where}: unknown kind {kind!r}; choose one of {', '.join(DEFENCES.names())}."
            )
        options_cls = DEFENCES.get(kind).options
        own = option_names(options_cls)
        rest = {}
        for k, v in data.items():
            if k in COMMON_KEYS or (k not in own and k in FLAT_KEYS and _is_flat_default(k, v)):
                continue
            if k not in own:
                raise error(
                    f"{where}: unknown key {k!r} for a {kind} defence; it takes "
                    f"{', '.join(COMMON_KEYS + own)}."
                )
            rest[k] = v
        options = build_strict(options_cls, rest, path, error)
        common = {k: data[k] for k in COMMON_KEYS if k in data}
        out = build_strict(cls, common, path, error)
        assert isinstance(out, DefenceConfig)
        out.options = options
        return out

    def to_config(self) -> dict[str, Any]:
        """The flat JSON object: the common keys and the kind's own."""
        common = {k: config_to_dict(getattr(self, k)) for k in COMMON_KEYS}
        return {**common, **config_to_dict(self.options)}


@dataclass
class EvalConfig:
    """Everything an evaluation run needs; see docs/evaluation.md for each key."""

    model: str | None = option(
        None, help="model spec (default: the SAE's model, else the default model)"
    )
    sae: str | None = option(
        None, help="SAE directory (needed by the SAE defences: amplify, calibrate)"
    )
    layer: int | None = option(
        None,
        help="layer the steering defences edit (default: the SAE's, else a third of the depth)",
    )
    out: str = option("runs/eval", help="output directory")
    cache: str | None = option(
        None, help="generation cache file (default OUT/cache/generations.jsonl)"
    )
    seed: int = option(0, help="prompt sampling seed")
    device: str = option("cpu", help="torch device")
    dtype: str = option("float32", help="model dtype")
    features: str | list[int] | None = option(
        None,
        help="features the SAE defences steer: ids 3,17,42 or a selected_*.json (default: "
        "data-selected on the selection split)",
    )
    harm_features: str | list[int] | None = option(
        None, help="harm features for the conditional gate (default: as features)"
    )
    feature_top_n: int = option(20, help="data-selected feature count")
    tuning_max_length: int = option(
        256, help="tokens per tuning prompt (refusal direction, data features)"
    )
    max_overrefusal_increase: float = option(
        0.05, help="headline strength: the most over-refusal it may add to no defence"
    )
    kl: bool = option(True, help="compute the KL utility metric")
    sets: SetsConfig = section(SetsConfig, help="the prompt sets and their split")
    generation: GenerationConfig = section(GenerationConfig, help="decoding")
    defences: list[DefenceConfig] | None = option(
        None,
        cli=False,
        help="the defences (default: none, self-reminder, dense; with an SAE also amplify, "
        "calibrate, calibrate-conditional)",
    )
    judge: JudgeConfig = section(
        JudgeConfig, help="the harm judge (the rules judge runs beside it)"
    )

    def validate(self) -> None:
        """What can be checked before a model or an SAE is loaded: the decoding settings,
        the sizes and the output paths. (The defences are checked by
        :func:`~steerlex.evaluate.plan.plan_defences`, the feature ids against the SAE by
        :func:`~steerlex.evaluate.plan.check_feature_specs`.) A dry run checks the same."""
        g = self.generation
        for key, flag, value in (
            ("generation.max_new_tokens", "--max-new-tokens", g.max_new_tokens),
            ("generation.batch_size", "--batch-size", g.batch_size),
            ("feature_top_n", "--feature-top-n", self.feature_top_n),
            ("tuning_max_length", "--tuning-max-length", self.tuning_max_length),
        ):
            if value < 1:
                raise EvalError(f"Config key '{key}' (CLI {flag}) must be at least 1, got {value}.")
        if g.do_sample and not g.temperature > 0:
            raise EvalError(
                f"Config key 'generation.temperature' must be > 0 when sampling, got "
                f"{g.temperature}."
            )
        if g.do_sample and not 0 < g.top_p <= 1:
            raise EvalError(
                f"Config key 'generation.top_p' must be in (0, 1] when sampling, got {g.top_p}."
            )
        if not 0 <= self.max_overrefusal_increase <= 1:
            raise EvalError(
                "Config key 'max_overrefusal_increase' (CLI --max-overrefusal-increase) must be "
                f"a share between 0 and 1, got {self.max_overrefusal_increase}."
            )
        check_output_dir(self.out, "--out", EvalError)
        if self.cache:
            check_output_file(self.cache, "--cache", EvalError)


def default_defences(with_sae: bool) -> list[DefenceConfig]:
    """Every kind's default entries (:attr:`~steerlex.evaluate.defences.Defence.defaults`), in
    registry order; the SAE kinds only ``with_sae``. Built in: none, self-reminder and dense;
    with an SAE also amplify, calibrate and conditional calibrate, sweeps of three points."""
    return [
        DefenceConfig.from_config({"kind": name, **entry}, f"the default {name} defence")
        for name, kind in DEFENCES.items()
        if with_sae or not kind.needs_sae
        for entry in kind.defaults
    ]


# --------------------------------------------------------------------------- strict parsing


def config_from_dict(data: dict[str, Any]) -> EvalConfig:
    """An :class:`EvalConfig` from a JSON object; unknown keys and wrong types raise
    :class:`EvalError` naming the key (e.g. ``sets.n_benign``, ``defences[2]``)."""
    if not isinstance(data, dict):
        raise EvalError(f"The eval config must be a JSON object, got {type(data).__name__}.")
    defences = data.get("defences")
    for i, d in enumerate(defences if isinstance(defences, list) else []):
        if isinstance(d, dict):  # for the message: build_strict names only 'defences'
            DefenceConfig.from_config(d, f"defences[{i}]", EvalError)
    cfg = build_strict(EvalConfig, data, "", EvalError)
    assert isinstance(cfg, EvalConfig)
    return cfg


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """The JSON object in the config file ``path`` (not yet checked)."""
    return read_json_config(path, "eval config", EvalError)


def load_config(path: str | Path, *, base: dict[str, Any] | None = None) -> EvalConfig:
    """Read a JSON config file (on top of ``base``, e.g. a profile)."""
    return config_from_dict(merge(base or {}, read_config_dict(path)))
