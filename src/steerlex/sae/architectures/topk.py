"""TopK: the ``k`` largest pre-activations of each token, then ReLU (Gao et al. 2024).

SAELens ``"topk"`` (``cfg.json`` adds ``k`` and ``rescale_acts_by_decoder_norm``, always
written ``false``: steerlex folds the decoder norms in when loading), eai-sparsify's
``"topk"`` activation and the paper's tied ``.pth`` are all this architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from steerlex.sae.base import SAE_ARCHITECTURES, SparseAutoencoder

__all__ = ["TopKSAE"]


@SAE_ARCHITECTURES.register("topk", order=10)
class TopKSAE(SparseAutoencoder):
    """``encode(x) = scatter(relu(topk(pre_acts(x), k)))``: at most ``k`` non-zeros per row."""

    name = "topk"
    title = "TopK"
    saelens_architecture = "topk"
    saelens_keys = ("k", "rescale_acts_by_decoder_norm")
    uses_k = True
    sparsify_activation = "topk"
    trainable = True

    def _topk(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        top = torch.topk(pre, k, dim=-1, sorted=False)
        return F.relu(top.values), top.indices

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = self._topk(pre, int(self.cfg.k or 0))
        out = torch.zeros(*pre.shape, dtype=values.dtype, device=values.device)
        return out.scatter_(-1, indices, values)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(values [N, k], indices [N, k])``: the ``k`` selected latents of each row (a
        value is 0 where fewer than ``k`` pre-activations are positive)."""
        return self._topk(self.pre_acts(x.reshape(-1, x.shape[-1])), int(self.cfg.k or 0))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x`` (raw space) through the sparse decoder, same shape."""
        out = self.decode_sparse(*self.encode_sparse(x))
        return out.reshape(*x.shape[:-1], self.cfg.d_in)

    def training_codes(self, pre: Tensor, k: int, *, groups: int = 1) -> tuple[Tensor, Tensor]:
        """Per-row TopK with the current (possibly annealed) ``k``; ``groups`` is irrelevant."""
        return self._topk(pre, k)
