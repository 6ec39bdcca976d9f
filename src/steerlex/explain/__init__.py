"""Explanations of SAE features (mutual-information word lists, LogitLens, ...)."""

from __future__ import annotations

from steerlex.core.errors import ExplainError
from steerlex.explain.logitlens import FeatureTokens, decode_tokens, logit_lens, logit_lens_topk
from steerlex.explain.mi import (
    AffinityStats,
    affinity_stats,
    effective_words,
    feature_vectors,
    final_norm_module,
    mi_scores,
)

__all__ = [
    "AffinityStats",
    "ExplainError",
    "FeatureTokens",
    "affinity_stats",
    "decode_tokens",
    "effective_words",
    "feature_vectors",
    "final_norm_module",
    "logit_lens",
    "logit_lens_topk",
    "mi_scores",
]
