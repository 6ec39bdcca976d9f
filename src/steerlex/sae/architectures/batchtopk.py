"""BatchTopK: the ``k * n`` largest latents of a batch of ``n`` tokens (Bussmann et al. 2024).

Training selects across the batch instead of per token, so a token may use more or fewer
than ``k`` latents while the batch averages ``k``. The selection depends on the batch, so
for inference the SAE becomes a JumpReLU SAE whose single threshold (shared by all latents)
is the smallest value the selection kept, averaged over training.

How the threshold is estimated (as SAELens v6's ``BatchTopKTrainingSAE`` does it): after
every step, ``ema <- (1 - lr) * ema + lr * min(positive selected values)`` with
``lr = THRESHOLD_LR = 0.01``, starting from 0. steerlex divides the average by
``1 - (1 - lr)^steps`` (the bias correction of Adam), so a short run does not end with a
threshold pulled towards the starting 0; for long runs the two agree. With several data
streams or processes the minimum is taken over the whole step's batch.

Saved like SAELens saves it: ``cfg.json`` with ``"architecture": "jumprelu"`` and
``threshold [d_sae]`` in the weights file (``metadata.training_architecture`` says
``"batchtopk"``); the SAE loads as JumpReLU in steerlex and in ``sae_lens``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from steerlex.core.errors import SAEError
from steerlex.sae.base import SAE_ARCHITECTURES, SAEConfig, SparseAutoencoder, pack_latents

__all__ = ["THRESHOLD_LR", "BatchTopKSAE"]

#: Weight of each step's minimum in the running threshold (SAELens's ``topk_threshold_lr``).
THRESHOLD_LR = 0.01
#: Per-token candidates (times k) searched before the batch-level selection.
CANDIDATES = 4


@SAE_ARCHITECTURES.register("batchtopk", order=20)
class BatchTopKSAE(SparseAutoencoder):
    """Batch-level TopK for training; :meth:`for_inference` gives the JumpReLU form.

    ``encode`` of this class selects across all rows it is given (it is the training
    activation); the saved and returned SAE is the batch-independent JumpReLU one.
    Buffers: ``threshold_ema`` (float64) and ``threshold_updates`` (steps seen).
    """

    name = "batchtopk"
    title = "BatchTopK"
    uses_k = True
    trainable = True
    inference_architecture = "jumprelu"

    threshold_ema: Tensor
    threshold_updates: Tensor

    def __init__(self, cfg: SAEConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__(cfg, device=device)
        self.register_buffer("threshold_ema", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=device))

    def training_codes(self, pre: Tensor, k: int, *, groups: int = 1) -> tuple[Tensor, Tensor]:
        """The ``k * rows`` largest ``relu(pre)`` values of each block of rows, packed.

        Selecting among each token's ``CANDIDATES * k`` largest values first gives the same
        set (a value outside them could be selected only if all of its token's candidates
        were) at a fraction of the cost of one top-k over the whole block; when a token has
        every positive candidate selected, the whole block is searched instead.
        """
        n, d = pre.shape
        if groups < 1 or n % groups:
            raise SAEError(f"{n} rows cannot be split into {groups} equal data-stream blocks.")
        acts = F.relu(pre)
        keep = k * (n // groups)
        c = min(d, CANDIDATES * k)
        cand = torch.topk(acts, c, dim=-1, sorted=False)  # [n, c]
        flat = cand.values.reshape(groups, -1)
        chosen = torch.topk(flat, min(keep, flat.shape[1]), dim=-1, sorted=False).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, chosen, True).reshape(n, c)
        if c < d and bool((mask.all(-1) & (cand.values.amin(-1) > 0)).any()):
            return self._block_codes(acts, keep, groups)
        picked = cand.values * mask
        m = max(1, int(mask.sum(-1).max()))
        top = torch.topk(picked, min(m, c), dim=-1, sorted=False)
        return top.values, cand.indices.gather(-1, top.indices)

    @staticmethod
    def _block_codes(acts: Tensor, keep: int, groups: int) -> tuple[Tensor, Tensor]:
        """The ``keep`` largest of ``acts [n, d]`` in each of ``groups`` row blocks, packed."""
        flat = acts.reshape(groups, -1)
        top = torch.topk(flat, min(keep, flat.shape[1]), dim=-1, sorted=False)
        dense = torch.zeros_like(flat).scatter(-1, top.indices, top.values)
        return pack_latents(dense.reshape(acts.shape))

    def activation(self, pre: Tensor) -> Tensor:
        flat = pre.reshape(-1, pre.shape[-1])
        values, indices = self.training_codes(flat, int(self.cfg.k or 0))
        dense = torch.zeros_like(flat).scatter(-1, indices, values)
        return dense.reshape(pre.shape)

    @torch.no_grad()
    def observe_training_codes(
        self, values: Tensor, reduce_min: Callable[[Tensor], Tensor]
    ) -> dict[str, float]:
        """Fold the step's smallest positive selected value into the running threshold."""
        positive = values.detach()[values.detach() > 0]
        local = positive.min().double() if positive.numel() else torch.tensor(math.inf)
        smallest = reduce_min(local.to(self.threshold_ema.device, torch.float64))
        if bool(torch.isfinite(smallest)):
            self.threshold_ema.mul_(1 - THRESHOLD_LR).add_(THRESHOLD_LR * smallest)
            self.threshold_updates += 1
        return {"threshold": self.inference_threshold()}

    def inference_threshold(self) -> float:
        """The inference threshold: the bias-corrected running minimum (0 before training)."""
        steps = int(self.threshold_updates)
        if steps == 0:
            return 0.0
        return float(self.threshold_ema) / (1 - (1 - THRESHOLD_LR) ** steps)

    def for_inference(self) -> SparseAutoencoder:
        """A JumpReLU SAE with the same weights and every latent's threshold
        :meth:`inference_threshold`; ``cfg.extra`` records ``training_architecture`` and ``training_k``."""
        cfg = SAEConfig(
            **{**self.cfg.to_dict(), "architecture": self.inference_architecture, "k": None}
        )
        cfg.extra = {**self.cfg.extra, "training_architecture": self.name, "training_k": self.cfg.k}
        out = SparseAutoencoder(cfg, device=self.W_enc.device)
        with torch.no_grad():
            out.W_enc.copy_(self.W_enc)
            out.b_enc.copy_(self.b_enc)
            out.b_dec.copy_(self.b_dec)
            if self.W_dec_free is not None and out.W_dec_free is not None:
                out.W_dec_free.copy_(self.W_dec_free)
            out.get_parameter("threshold").fill_(self.inference_threshold())
        return out
