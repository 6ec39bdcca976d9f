"""Sparse autoencoders: the TopK SAE, training, evaluation and file formats."""

from steerlex.sae.formats import check_sae_matches, convert_sae, load_sae, save_sae
from steerlex.sae.model import SAEConfig, SAEError, TopKSAE

__all__ = [
    "SAEConfig",
    "SAEError",
    "TopKSAE",
    "check_sae_matches",
    "convert_sae",
    "load_sae",
    "save_sae",
]
