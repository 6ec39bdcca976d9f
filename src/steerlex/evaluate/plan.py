"""What an evaluation will generate: the checked defences, their conditions (through the defence
registry), the generation jobs, the time estimate printed before a run, and the headline
strength of each defence chosen on the selection split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from steerlex.core.errors import EvalError
from steerlex.evaluate.config import DefenceConfig, EvalConfig, default_defences
from steerlex.evaluate.defences.base import DEFENCES, Condition, Defence
from steerlex.evaluate.defences.none import NO_DEFENCE
from steerlex.evaluate.generation import GenerationRunner, Job
from steerlex.evaluate.scores import choose_strength, condition_metrics, rate
from steerlex.evaluate.sets import EvalPrompt, EvalSets
from steerlex.evaluate.setup import EvalSetup
from steerlex.sae.base import SparseAutoencoder
from steerlex.steer.features import parse_feature_list
from steerlex.steer.strategies import check_feature_ids

__all__ = [
    "PREFILL_ESTIMATE",
    "THROUGHPUT_ESTIMATE",
    "Estimate",
    "EvalPlan",
    "Headlines",
    "check_feature_specs",
    "choose_headlines",
    "make_plan",
    "plan_defences",
]

THROUGHPUT_ESTIMATE = {"float32": 26.0, "bfloat16": 73.0}
"""New tokens per second used for the time estimate printed before a run, by model dtype: the
default model at batch 8 on a 2-core CPU (docs/evaluation.md; bfloat16 2.8 times float32 on a
CPU with avx512_bf16, docs/results.md). Other dtypes use float32's. The progress bar shows the
measured rate."""
PREFILL_ESTIMATE = {"float32": 145.0, "bfloat16": 245.0}
"""Prompt tokens per second of a full forward pass, same setting (for the estimate only)."""


# --------------------------------------------------------------------------- defences


def _check_strengths(d: DefenceConfig, kind: type[Defence], where: str) -> None:
    if not kind.sweeps:
        if d.strengths or d.strength is not None:
            raise EvalError(f"{where}: a {d.kind} defence takes no strengths.")
        return
    if not d.strengths and d.strength is None:
        raise EvalError(f"{where}: give 'strengths' (the sweep) or 'strength'.")
    for s in d.sweep():
        if not math.isfinite(s):
            raise EvalError(f"{where}: strength {s} is not a finite number.")


def plan_defences(cfg: EvalConfig, *, with_sae: bool) -> list[DefenceConfig]:
    """The configured defences (or the defaults), checked: known kinds with their own options,
    unique names, an SAE for SAE kinds, strengths for sweeping kinds and none for the others,
    and each kind's own checks (:meth:`~steerlex.evaluate.defences.Defence.validate`)."""
    defences = cfg.defences if cfg.defences is not None else default_defences(with_sae)
    if not defences:
        raise EvalError("Config key 'defences' is empty; list at least one defence.")
    seen: set[str] = set()
    for i, d in enumerate(defences):
        if d.kind not in DEFENCES:
            raise EvalError(
                f"defences[{i}]: unknown kind {d.kind!r}; choose one of "
                f"{', '.join(DEFENCES.names())}."
            )
        kind = DEFENCES.get(d.kind)
        if not isinstance(d.options, kind.options):
            raise EvalError(
                f"defences[{i}] ({d.kind}): options must be a {kind.options.__name__}, got "
                f"{type(d.options).__name__}."
            )
        where = f"defences[{i}] ({d.label})"
        if d.label in seen:
            raise EvalError(f"{where}: the name {d.label!r} is used twice; give each a name.")
        seen.add(d.label)
        if kind.needs_sae and not with_sae:
            raise EvalError(
                f"{where} steers through SAE features and needs an SAE; set 'sae' (an SAE "
                "directory trained on this model's layer) or drop the defence."
            )
        _check_strengths(d, kind, where)
        kind.validate(d, where)
    return defences


def check_feature_specs(
    cfg: EvalConfig, defences: Sequence[DefenceConfig], sae: SparseAutoencoder | None
) -> None:
    """Every feature list the evaluation steers or gates with (the top-level ``features`` and
    ``harm_features``, and each defence's own) read and checked as the steering checks them
    when it builds a condition: integer ids, each once, and with an SAE each below its
    ``d_sae``. Done before a model is loaded, so a dry run refuses what the run would."""
    specs: list[tuple[str, str | list[int] | None]] = [
        ("features", cfg.features),
        ("harm_features", cfg.harm_features),
    ]
    for i, d in enumerate(defences):
        for key in ("features", "harm_features"):
            specs.append((f"defences[{i}] ({d.label}).{key}", getattr(d.options, key, None)))
    for what, spec in specs:
        if spec is None:
            continue
        if isinstance(spec, list):
            if not spec:
                raise EvalError(f"Config key '{what}' is an empty list; give feature ids.")
            ids: Sequence[int] = spec
        else:
            ids = parse_feature_list(spec, what=what, sae=sae).ids
        check_feature_ids(ids, sae, what)


# --------------------------------------------------------------------------- the plan


@dataclass
class EvalPlan:
    """Every defence's conditions and the prompts each is run on.

    ``tuned``: the defences whose headline strength is chosen on the selection split (a sweep
    of more than one strength and no fixed ``strength``).
    """

    defences: list[DefenceConfig]
    conditions: dict[str, list[Condition]]
    sets: EvalSets
    tuned: list[DefenceConfig] = field(init=False)

    def __post_init__(self) -> None:
        self.tuned = [
            d
            for d in self.defences
            if DEFENCES.get(d.kind).sweeps and d.strength is None and len(d.sweep()) > 1
        ]

    @property
    def selection(self) -> list[EvalPrompt]:
        """The selection split's jailbreak and benign prompts (the strength choice)."""
        return self.sets.of("jailbreak", "selection") + self.sets.of("benign", "selection")

    @property
    def sweep_prompts(self) -> list[EvalPrompt]:
        """The test split's jailbreak and benign prompts (every sweep point)."""
        return self.sets.of("jailbreak", "test") + self.sets.of("benign", "test")

    @property
    def headline_prompts(self) -> list[EvalPrompt]:
        """The test split's plain harmful and utility prompts (headline strength only)."""
        return self.sets.of("harmful", "test") + self.sets.of("utility", "test")

    @property
    def kl_prompts(self) -> list[EvalPrompt]:
        """The test split's benign and utility prompts (the KL)."""
        return self.sets.of("benign", "test") + self.sets.of("utility", "test")

    def all_conditions(self) -> list[Condition]:
        return [c for d in self.defences for c in self.conditions[d.label]]

    @property
    def tuning_jobs(self) -> list[Job]:
        if not self.tuned:
            return []
        jobs: list[Job] = [(NO_DEFENCE, self.selection)]
        return jobs + [(c, self.selection) for d in self.tuned for c in self.conditions[d.label]]

    @property
    def sweep_jobs(self) -> list[Job]:
        return [(c, self.sweep_prompts) for c in self.all_conditions()]


def make_plan(defences: list[DefenceConfig], setup: EvalSetup) -> EvalPlan:
    """The plan of ``defences``: each kind builds its conditions from ``setup``."""
    conditions = {d.label: DEFENCES.get(d.kind).conditions(d, setup) for d in defences}
    return EvalPlan(defences, conditions, setup.sets)


@dataclass(frozen=True)
class Estimate:
    """How many generations a run needs (uncached ones) and about how long they take."""

    tuning: int
    sweep: int
    headline: int
    cached: int
    prompt_tokens: int
    max_new_tokens: int
    dtype: str = "float32"

    @property
    def rates(self) -> tuple[float, float]:
        """(new, prompt) tokens per second assumed for :attr:`dtype`."""
        d = self.dtype if self.dtype in THROUGHPUT_ESTIMATE else "float32"
        return THROUGHPUT_ESTIMATE[d], PREFILL_ESTIMATE[d]

    @property
    def total(self) -> int:
        return self.tuning + self.sweep + self.headline

    @property
    def minutes(self) -> float:
        new_rate, prompt_rate = self.rates
        return (self.total * self.max_new_tokens / new_rate + self.prompt_tokens / prompt_rate) / 60

    def message(self, plan: EvalPlan, cache_path: Any) -> str:
        n_cond = sum(len(c) for c in plan.conditions.values())
        return (
            f"plan: {len(plan.defences)} defences, {n_cond} conditions; "
            f"generations to run: {self.tuning} tuning + {self.sweep} sweep + up to "
            f"{self.headline} headline (harmful/utility) = up to {self.total} ({self.cached} "
            f"already cached in {cache_path}); at most ~{self.total * self.max_new_tokens} new "
            f"and ~{self.prompt_tokens} prompt tokens: about {self.minutes:.0f} min at "
            f"{self.rates[0]:g} new and {self.rates[1]:g} prompt tokens/s (the default "
            f"model in {self.dtype if self.dtype in THROUGHPUT_ESTIMATE else 'float32'} at "
            "batch 8 on a 2-core CPU)"
        )


def estimate(plan: EvalPlan, runner: GenerationRunner) -> Estimate:
    """What :func:`plan` still has to generate, given the cache."""
    jobs = plan.tuning_jobs + plan.sweep_jobs
    headline = sum(
        max(runner.missing([(c, plan.headline_prompts)]) for c in plan.conditions[d.label])
        for d in plan.defences
    )
    prompt_tokens = sum(
        len(p.text.split()) * 4 // 3 + 30  # rough: ~1.33 tokens a word, plus the chat template
        for c, ps in jobs
        for p in ps
        if runner.key(c, p) not in runner.cache
    )
    return Estimate(
        tuning=runner.missing(plan.tuning_jobs),
        sweep=runner.missing(plan.sweep_jobs),
        headline=headline,
        cached=runner.cached(jobs),
        prompt_tokens=prompt_tokens,
        max_new_tokens=int(runner.gen["max_new_tokens"]),
        dtype=str(runner.steered.loaded.model.dtype).removeprefix("torch."),
    )


# --------------------------------------------------------------------------- strengths


@dataclass
class Headlines:
    """Each defence's headline condition, the strength chosen and why, and the selection-split
    sweep behind each tuned choice (``scores.json``'s ``tuning.sweeps``)."""

    conditions: dict[str, Condition]
    chosen: dict[str, tuple[float | None, str]]
    sweeps: dict[str, Any]


def _sweep_record(
    strength: float, why: str, pts: list[tuple[float, dict[str, Any]]], base: dict[str, Any]
) -> dict[str, Any]:
    return {
        "chosen": strength,
        "rule": why,
        "points": [
            {
                "strength": p,
                "attack_success": rate(m, "jailbreak", "attack_success"),
                "over_refusal": rate(m, "benign", "over_refusal"),
            }
            for p, m in pts
        ],
        "none": {
            "attack_success": rate(base, "jailbreak", "attack_success"),
            "over_refusal": rate(base, "benign", "over_refusal"),
        },
    }


def choose_headlines(plan: EvalPlan, runner: GenerationRunner, limit: float) -> Headlines:
    """The headline strength of every defence (the tuning jobs must be generated): none for a
    kind without strengths, the fixed ``strength`` or the only one, else
    :func:`~steerlex.evaluate.scores.choose_strength` on the selection split."""
    chosen: dict[str, tuple[float | None, str]] = {}
    sweeps: dict[str, Any] = {}
    base = condition_metrics(runner.records(NO_DEFENCE, plan.selection)) if plan.tuned else {}
    for d in plan.defences:
        if not DEFENCES.get(d.kind).sweeps:
            chosen[d.label] = (None, "no strength")
        elif d.strength is not None:
            chosen[d.label] = (d.strength, "fixed by the config ('strength')")
        elif len(d.sweep()) == 1:
            chosen[d.label] = (d.sweep()[0], "the only strength")
        else:
            pts = [
                (c.strength or 0.0, condition_metrics(runner.records(c, plan.selection)))
                for c in plan.conditions[d.label]
            ]
            st, why = choose_strength(pts, base, limit)
            chosen[d.label] = (st, why)
            sweeps[d.label] = _sweep_record(st, why, pts, base)
    conditions = {
        d.label: next(c for c in plan.conditions[d.label] if c.strength == chosen[d.label][0])
        for d in plan.defences
    }
    return Headlines(conditions, chosen, sweeps)
