"""What the SAE defences share: their options (features, the conditional gate) and how they
become conditions; the gate's options, which ``dense`` takes too. Each SAE kind (:mod:`.amplify`, :mod:`.calibrate`) only says which strategy
one strength builds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steerlex.core.errors import EvalError
from steerlex.evaluate.config import DefenceConfig
from steerlex.evaluate.defences.base import Condition, Defence
from steerlex.evaluate.setup import DETECTORS, EvalSetup
from steerlex.steer.strategies import GATE_MODES, Gate, SteeringStrategy

__all__ = [
    "ConditionalOptions",
    "SAEDefence",
    "SAESteeringOptions",
    "gate_key",
    "validate_gate",
]


@dataclass(frozen=True)
class ConditionalOptions:
    """The keys of a defence that can be conditional (the SAE kinds and ``dense``).

    ``conditional``: steer only where the gate opens. ``detector``: what the gate reads,
    ``probe`` (a logistic harm probe on the residual, fitted on the selection split: the best
    detector of benchmarks/detectors.py) or ``features`` (the ``harm_features``, default: the
    config's top-level ones, else the data-selected features; needs an SAE).
    ``gate_threshold``: default 0 (the probe's logit) or calibrated on the selection split
    (features). ``gate_mode``: ``prompt`` or ``token``.
    """

    conditional: bool = False
    detector: str = "probe"
    harm_features: str | list[int] | None = None
    gate_threshold: float | None = None
    gate_mode: str = "prompt"


@dataclass(frozen=True)
class SAESteeringOptions(ConditionalOptions):
    """The keys of an SAE defence: the gate's (:class:`ConditionalOptions`), ``features`` (ids
    or a ``selected_*.json``; default: the config's top-level ones, else the data-selected
    features), ``keep_norm`` (the strategy's default when ``None``), ``rank`` (measure each
    feature alone at the defence's largest strength on the selection split's harmful prompts
    and keep those that make refusal more likely, best first:
    :mod:`steerlex.evaluate.ranking`) and ``top_n`` (keep the first ``top_n`` features, after
    ranking when ``rank`` is on)."""

    features: str | list[int] | None = None
    keep_norm: bool | None = None
    rank: bool = False
    top_n: int | None = None


def validate_gate(opts: ConditionalOptions, where: str) -> None:
    """Raise :class:`EvalError` for a bad detector or gate mode."""
    if opts.gate_mode not in GATE_MODES:
        raise EvalError(
            f"{where}: gate_mode must be {' or '.join(GATE_MODES)}, got {opts.gate_mode!r}."
        )
    if opts.detector not in DETECTORS:
        raise EvalError(
            f"{where}: detector must be {' or '.join(DETECTORS)}, got {opts.detector!r}."
        )


def gate_key(gate: Gate | None) -> list[Any] | None:
    """What of a gate changes replies (part of a condition's cache key)."""
    if gate is None:
        return None
    if gate.probe is not None:
        return [gate.probe.fingerprint, gate.threshold, gate.mode, gate.top_k]
    return [list(gate.features), gate.threshold, gate.mode, gate.top_k]


class SAEDefence(Defence):
    """Base of the kinds that steer SAE features (registers nothing itself)."""

    needs_sae = True
    sweeps = True
    options = SAESteeringOptions

    @classmethod
    def strategy(
        cls, features: list[int], strength: float, keep_norm: bool | None, gate: Gate | None
    ) -> SteeringStrategy:
        """The strategy of one sweep point."""
        raise NotImplementedError

    @classmethod
    def validate(cls, entry: DefenceConfig, where: str) -> None:
        opts = _options(entry)
        validate_gate(opts, where)
        if opts.top_n is not None and (isinstance(opts.top_n, bool) or opts.top_n < 1):
            raise EvalError(f"{where}: top_n must be a positive integer or null, got {opts.top_n}.")

    @classmethod
    def label(cls, entry: DefenceConfig) -> str:
        return f"{entry.kind}-conditional" if _options(entry).conditional else entry.kind

    @classmethod
    def conditions(cls, entry: DefenceConfig, setup: EvalSetup) -> list[Condition]:
        opts = _options(entry)
        feats = setup.feature_ids(opts.features, "features")
        if opts.rank:
            top = max(entry.sweep())
            feats = setup.ranked_features(
                entry.label, feats, lambda f: cls.strategy([f], top, opts.keep_norm, None), top
            )
        if opts.top_n is not None:
            feats = feats[: opts.top_n]
        gate = setup.gate(opts)
        setup.note_features(entry.label, feats, gate)
        out = []
        for st in entry.sweep():
            strat = cls.strategy(feats, st, opts.keep_norm, gate)
            key = {
                "kind": entry.kind,
                "strategy": strat.describe(),
                "strength": st,
                "features": feats,
                "keep_norm": opts.keep_norm,
                "gate": gate_key(gate),
                "sae": setup.sae_id,
                "layer": setup.layer,
            }
            out.append(Condition(entry.label, entry.kind, st, strat, key=key))
        return out


def _options(entry: DefenceConfig) -> SAESteeringOptions:
    opts = entry.options
    assert isinstance(opts, SAESteeringOptions)
    return opts
