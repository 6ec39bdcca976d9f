"""The built-in SAE architectures, one module each, registered in
:data:`steerlex.sae.base.SAE_ARCHITECTURES` when imported.

Adding an architecture is adding a module here (or, outside steerlex, importing a module
that registers a :class:`~steerlex.sae.base.SparseAutoencoder` subclass)."""

from steerlex.sae.architectures.batchtopk import BatchTopKSAE
from steerlex.sae.architectures.jumprelu import JumpReLUSAE
from steerlex.sae.architectures.relu import ReLUSAE
from steerlex.sae.architectures.topk import TopKSAE

__all__ = ["BatchTopKSAE", "JumpReLUSAE", "ReLUSAE", "TopKSAE"]
