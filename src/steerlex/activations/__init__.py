"""Harvest residual-stream activations into a sharded, resumable on-disk store."""

from steerlex.activations.harvest import HarvestOptions, harvest
from steerlex.activations.stats import activation_stats
from steerlex.activations.store import ActivationStore

__all__ = ["ActivationStore", "HarvestOptions", "activation_stats", "harvest"]
