"""``amplify``: add ``alpha`` times the selected features' unit decoder directions
(:class:`~steerlex.steer.strategies.Amplification`); ``strengths`` are ``alpha`` values."""

from __future__ import annotations

from steerlex.evaluate.defences.base import DEFENCES
from steerlex.evaluate.defences.sae import SAEDefence
from steerlex.steer.strategies import Gate, SteeringStrategy, make_strategy

__all__ = ["Amplify"]


@DEFENCES.register("amplify", order=40)
class Amplify(SAEDefence):
    """SAE Amplification, optionally conditional."""

    defaults = ({"strengths": [2.0, 4.0, 8.0]},)

    @classmethod
    def strategy(
        cls, features: list[int], strength: float, keep_norm: bool | None, gate: Gate | None
    ) -> SteeringStrategy:
        return make_strategy("amplify", features, alpha=strength, keep_norm=keep_norm, gate=gate)
