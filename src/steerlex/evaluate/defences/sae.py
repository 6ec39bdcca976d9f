"""What the SAE defences share: their options (features, the conditional gate) and how they
become conditions. Each SAE kind (:mod:`.amplify`, :mod:`.calibrate`) only says which strategy
one strength builds."""

from __future__ import annotations

from dataclasses import dataclass

from steerlex.core.errors import EvalError
from steerlex.evaluate.config import DefenceConfig
from steerlex.evaluate.defences.base import Condition, Defence
from steerlex.evaluate.setup import EvalSetup
from steerlex.steer.strategies import GATE_MODES, Gate, SteeringStrategy

__all__ = ["SAEDefence", "SAESteeringOptions"]


@dataclass(frozen=True)
class SAESteeringOptions:
    """The keys of an SAE defence.

    ``features``/``harm_features``: ids or a ``selected_*.json`` (default: the config's
    top-level ones, else the data-selected features). ``conditional``: steer only where the
    harm features fire, with ``gate_threshold`` (default: calibrated on the selection split)
    and ``gate_mode`` (``prompt`` or ``token``). ``keep_norm``: the strategy's default when
    ``None``.
    """

    features: str | list[int] | None = None
    harm_features: str | list[int] | None = None
    conditional: bool = False
    gate_threshold: float | None = None
    gate_mode: str = "prompt"
    keep_norm: bool | None = None


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
        if opts.gate_mode not in GATE_MODES:
            raise EvalError(
                f"{where}: gate_mode must be {' or '.join(GATE_MODES)}, got {opts.gate_mode!r}."
            )

    @classmethod
    def label(cls, entry: DefenceConfig) -> str:
        return f"{entry.kind}-conditional" if _options(entry).conditional else entry.kind

    @classmethod
    def conditions(cls, entry: DefenceConfig, setup: EvalSetup) -> list[Condition]:
        opts = _options(entry)
        feats = setup.feature_ids(opts.features, "features")
        gate = None
        if opts.conditional:
            harm = tuple(setup.feature_ids(opts.harm_features, "harm_features"))
            threshold = opts.gate_threshold
            if threshold is None:
                threshold = setup.gate_threshold(harm)
            gate = Gate(harm, threshold, "token" if opts.gate_mode == "token" else "prompt")
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
                "gate": [list(gate.features), gate.threshold, gate.mode, gate.top_k]
                if gate
                else None,
                "sae": setup.sae_id,
                "layer": setup.layer,
            }
            out.append(Condition(entry.label, entry.kind, st, strat, key=key))
        return out


def _options(entry: DefenceConfig) -> SAESteeringOptions:
    opts = entry.options
    assert isinstance(opts, SAESteeringOptions)
    return opts
