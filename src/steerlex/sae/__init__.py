"""Sparse autoencoders: the TopK SAE, training, evaluation and file formats."""

from steerlex.sae.model import SAEConfig, SAEError, TopKSAE

__all__ = ["SAEConfig", "SAEError", "TopKSAE"]
