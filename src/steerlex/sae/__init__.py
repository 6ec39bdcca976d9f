"""Sparse autoencoders: one class per architecture, training, evaluation and file formats."""

from steerlex.core.errors import SAEError
from steerlex.sae.base import SAE_ARCHITECTURES, SAEConfig, SparseAutoencoder
from steerlex.sae.compat import check_sae_fits
from steerlex.sae.formats import convert_sae, load_sae, save_sae

__all__ = [
    "SAE_ARCHITECTURES",
    "SAEConfig",
    "SAEError",
    "SparseAutoencoder",
    "check_sae_fits",
    "convert_sae",
    "load_sae",
    "save_sae",
]
