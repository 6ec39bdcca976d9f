"""ReLU: ``relu(pre_acts(x))`` (SAELens ``"standard"``; loaded, not trained, by steerlex)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from steerlex.sae.base import SAE_ARCHITECTURES, SparseAutoencoder

__all__ = ["ReLUSAE"]


@SAE_ARCHITECTURES.register("relu", order=30)
class ReLUSAE(SparseAutoencoder):
    """``encode(x) = relu(pre_acts(x))``; sparsity comes from training (an L1 penalty)."""

    name = "relu"
    title = "ReLU"
    saelens_architecture = "standard"

    def activation(self, pre: Tensor) -> Tensor:
        return F.relu(pre)
