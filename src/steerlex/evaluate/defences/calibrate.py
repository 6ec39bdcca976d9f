"""``calibrate``: raise the selected features towards a target activation, the paper authors'
rule (:class:`~steerlex.steer.strategies.Calibration`); ``strengths`` are targets."""

from __future__ import annotations

from steerlex.evaluate.defences.base import DEFENCES
from steerlex.evaluate.defences.sae import SAEDefence
from steerlex.steer.strategies import Gate, SteeringStrategy, make_strategy

__all__ = ["Calibrate"]


@DEFENCES.register("calibrate", order=50)
class Calibrate(SAEDefence):
    """SAE Calibration, optionally conditional (``calibrate-conditional`` by default)."""

    defaults = (
        {"strengths": [1.0, 2.5, 5.0]},
        {"conditional": True, "strengths": [1.0, 2.5, 5.0]},
    )

    @classmethod
    def strategy(
        cls, features: list[int], strength: float, keep_norm: bool | None, gate: Gate | None
    ) -> SteeringStrategy:
        return make_strategy("calibrate", features, target=strength, keep_norm=keep_norm, gate=gate)
