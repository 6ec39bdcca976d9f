"""``dense``: the refusal-direction baseline (no SAE).

Adds ``alpha`` times the mean residual norm along the unit refusal direction
(:class:`~steerlex.steer.strategies.DenseDirection`); the direction is computed once per run on
the selection split (:meth:`~steerlex.evaluate.setup.EvalSetup.refusal_direction`).
"""

from __future__ import annotations

from steerlex.evaluate.config import DefenceConfig
from steerlex.evaluate.defences.base import DEFENCES, Condition, Defence
from steerlex.evaluate.defences.sae import ConditionalOptions, gate_key, validate_gate
from steerlex.evaluate.setup import EvalSetup
from steerlex.steer.strategies import DenseDirection

__all__ = ["Dense"]


@DEFENCES.register("dense", order=30)
class Dense(Defence):
    """``strengths`` are ``alpha`` values: fractions of the mean residual norm; with
    ``conditional`` the direction is added only where the gate opens (``dense-conditional``)."""

    sweeps = True
    options = ConditionalOptions
    defaults = ({"strengths": [0.1, 0.2, 0.4]},)

    @classmethod
    def validate(cls, entry: DefenceConfig, where: str) -> None:
        validate_gate(_options(entry), where)

    @classmethod
    def label(cls, entry: DefenceConfig) -> str:
        return "dense-conditional" if _options(entry).conditional else "dense"

    @classmethod
    def conditions(cls, entry: DefenceConfig, setup: EvalSetup) -> list[Condition]:
        rd = setup.refusal_direction()
        gate = setup.gate(_options(entry))
        if gate is not None:
            setup.note_features(entry.label, [], gate)
        base = DenseDirection(direction=rd.vector, scale=rd.scale, gate=gate)
        return [
            Condition(
                entry.label,
                entry.kind,
                st,
                base.with_strength(st),
                key={
                    "kind": "dense",
                    "alpha": st,
                    "layer": setup.layer,
                    "direction": rd.fingerprint,
                    **({"gate": gate_key(gate)} if gate is not None else {}),
                },
            )
            for st in entry.sweep()
        ]


def _options(entry: DefenceConfig) -> ConditionalOptions:
    opts = entry.options
    assert isinstance(opts, ConditionalOptions)
    return opts
