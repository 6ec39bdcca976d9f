"""Steer a model through SAE features: strategies (pure edits) and a steered generate/chat runtime.

Feature selection lives in :mod:`steerlex.steer.select`.
"""

from steerlex.core.errors import SteeringError
from steerlex.steer.runtime import (
    ActivityStats,
    FeatureActivity,
    SteeredModel,
    SteeredResponse,
    SteeringReport,
    encode_chat,
)
from steerlex.steer.strategies import (
    DEFAULT_GATE_THRESHOLD,
    DEFAULT_TARGET,
    STRATEGY_NAMES,
    Ablate,
    Amplification,
    Calibration,
    Clamp,
    Condition,
    SteeringStrategy,
    feature_pre_acts,
    make_strategy,
)

__all__ = [
    "DEFAULT_GATE_THRESHOLD",
    "DEFAULT_TARGET",
    "STRATEGY_NAMES",
    "Ablate",
    "ActivityStats",
    "Amplification",
    "Calibration",
    "Clamp",
    "Condition",
    "FeatureActivity",
    "SteeredModel",
    "SteeredResponse",
    "SteeringError",
    "SteeringReport",
    "SteeringStrategy",
    "encode_chat",
    "feature_pre_acts",
    "make_strategy",
]
