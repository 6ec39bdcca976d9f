"""Steer a model: strategies (pure edits, through SAE features or a dense direction) and a
steered generate/chat runtime.

Feature selection lives in :mod:`steerlex.steer.select`; feature lists (ids or
``selected_*.json``) are read by :func:`steerlex.steer.features.parse_feature_list`.
"""

from steerlex.core.errors import SteeringError
from steerlex.steer.features import FeatureList, parse_feature_list
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
    DenseDirection,
    Gate,
    SAEFeatureStrategy,
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
    "DenseDirection",
    "FeatureActivity",
    "FeatureList",
    "Gate",
    "SAEFeatureStrategy",
    "SteeredModel",
    "SteeredResponse",
    "SteeringError",
    "SteeringReport",
    "SteeringStrategy",
    "encode_chat",
    "feature_pre_acts",
    "make_strategy",
    "parse_feature_list",
]
