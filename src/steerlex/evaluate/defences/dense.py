"""``dense``: the refusal-direction baseline (no SAE).

Adds ``alpha`` times the mean residual norm along the unit refusal direction
(:class:`~steerlex.steer.strategies.DenseDirection`); the direction is computed once per run on
the selection split (:meth:`~steerlex.evaluate.setup.EvalSetup.refusal_direction`).
"""

from __future__ import annotations

from steerlex.evaluate.config import DefenceConfig
from steerlex.evaluate.defences.base import DEFENCES, Condition, Defence
from steerlex.evaluate.setup import EvalSetup
from steerlex.steer.strategies import DenseDirection

__all__ = ["Dense"]


@DEFENCES.register("dense", order=30)
class Dense(Defence):
    """``strengths`` are ``alpha`` values: fractions of the mean residual norm."""

    sweeps = True
    defaults = ({"strengths": [0.1, 0.2, 0.4]},)

    @classmethod
    def conditions(cls, entry: DefenceConfig, setup: EvalSetup) -> list[Condition]:
        rd = setup.refusal_direction()
        base = DenseDirection(direction=rd.vector, scale=rd.scale)
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
                },
            )
            for st in entry.sweep()
        ]
