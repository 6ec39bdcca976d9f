"""JumpReLU: a latent fires when its pre-activation exceeds its own threshold.

SAELens ``"jumprelu"`` (Gemma Scope's architecture; Rajamanoharan et al. 2024): the weights
file holds ``threshold [d_sae]`` next to the usual tensors, and SAELens encodes
``relu(pre) * (pre > threshold)``. steerlex loads such SAEs, and saves a trained BatchTopK
SAE in this form (one threshold shared by all latents).
"""

from __future__ import annotations

from torch import Tensor

from steerlex.sae.base import SAE_ARCHITECTURES, SparseAutoencoder

__all__ = ["JumpReLUSAE"]


@SAE_ARCHITECTURES.register("jumprelu", order=40)
class JumpReLUSAE(SparseAutoencoder):
    """``encode(x) = pre * (pre > threshold) * (pre > 0)`` with ``pre = pre_acts(x)``.

    ``threshold [d_sae]`` is in pre-activation units (a fixed parameter, no gradient).
    """

    name = "jumprelu"
    title = "JumpReLU"
    saelens_architecture = "jumprelu"
    latent_tensors = ("threshold",)

    threshold: Tensor

    def activation(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold) * (pre > 0)
