"""The TopK sparse autoencoder.

Shapes (``...`` is any leading batch shape):

- ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``;
- ``encode(x [..., d_in]) -> [..., d_sae]`` (dense, at most ``k`` non-zeros per row);
- ``decode(f [..., d_sae]) -> [..., d_in]``; ``forward(x) = decode(encode(x))``.

With ``norm_scale = s`` the SAE works on ``s * x`` internally and ``decode`` divides
by ``s``, so both ``encode`` and ``decode`` take and give *raw* activations. With
``tied`` the decoder is the encoder's transpose (the paper's variant), otherwise
``W_dec`` is its own parameter whose rows are kept at unit norm during training.
``architecture`` "relu" and "jumprelu" exist so SAEs trained elsewhere (SAELens)
can be loaded and used; steerlex trains only "topk".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steerlex.core.config import from_dict_strict
from steerlex.core.errors import SAEError

Architecture = Literal["topk", "relu", "jumprelu"]
ARCHITECTURES: tuple[Architecture, ...] = ("topk", "relu", "jumprelu")


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE and say where it belongs.

    ``layer``/``hf_hook_name``/``model_spec``/``weights_id`` tie it to a model: an
    SAE must only be used on the residual stream it was trained on.
    """

    d_in: int
    d_sae: int
    k: int | None = None  # required for "topk"
    architecture: Architecture = "topk"
    tied: bool = False
    apply_b_dec_to_input: bool = True
    norm_scale: float = 1.0
    dtype: str = "float32"
    model_spec: str | None = None
    weights_id: str | None = None
    layer: int | None = None
    hf_hook_name: str | None = None
    keep: str | None = None  # positions it was trained on (the harvest keep rule)
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEError(
                f"Unknown SAE architecture '{self.architecture}'; steerlex supports {', '.join(ARCHITECTURES)}."
            )
        if self.d_in < 1 or self.d_sae < 1:
            raise SAEError(
                f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}."
            )
        if self.architecture == "topk":
            if self.k is None or self.k < 1:
                raise SAEError(f"A TopK SAE needs k >= 1, got k={self.k}.")
            if self.k > self.d_sae:
                raise SAEError(f"k={self.k} is larger than d_sae={self.d_sae}; choose k <= d_sae.")
        if not (self.norm_scale > 0 and math.isfinite(self.norm_scale)):
            raise SAEError(f"norm_scale must be a positive finite number, got {self.norm_scale}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        return from_dict_strict(cls, data, "SAE config keys", SAEError)


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder (TopK for training; ReLU/JumpReLU for loaded SAEs)."""

    def __init__(self, cfg: SAEConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))
        self.W_dec_free: nn.Parameter | None = (
            None if cfg.tied else nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, **kw))
        )
        self.threshold: nn.Parameter | None = (
            nn.Parameter(torch.zeros(cfg.d_sae, **kw), requires_grad=False)
            if cfg.architecture == "jumprelu"
            else None
        )
        self.reset_parameters()

    # --- parameters ---------------------------------------------------------------

    @property
    def W_dec(self) -> Tensor:
        """``[d_sae, d_in]``: the encoder's transpose when tied, else the free decoder."""
        return self.W_enc.T if self.W_dec_free is None else self.W_dec_free

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows: random unit vectors; encoder: the decoder's transpose; biases zero."""
        with torch.no_grad():
            rows = torch.randn(
                self.cfg.d_sae, self.cfg.d_in, generator=generator, dtype=torch.float32
            )
            rows /= rows.norm(dim=1, keepdim=True)
            rows = rows.to(self.W_enc.device, self.W_enc.dtype)
            self.W_enc.copy_(rows.T)
            if self.W_dec_free is not None:
                self.W_dec_free.copy_(rows)
            self.b_enc.zero_()
            self.b_dec.zero_()

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # --- encode / decode ------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``[..., d_sae]`` of raw activations ``x``."""
        self._check_input(x)
        h = x.to(self.W_enc.dtype) * self.cfg.norm_scale
        if not self.cfg.apply_b_dec_to_input:
            return torch.addmm(self.b_enc, h.reshape(-1, h.shape[-1]), self.W_enc).reshape(
                *h.shape[:-1], self.cfg.d_sae
            )
        # (h - b_dec) W_enc written as h W_enc - b_dec W_enc: the same numbers, but autograd
        # then reaches b_dec through a [d_sae] vector instead of a [batch, d_in] product,
        # which saves one of the three large matrix products of a training step.
        return torch.addmm(
            self.b_enc - self.b_dec @ self.W_enc, h.reshape(-1, h.shape[-1]), self.W_enc
        ).reshape(*h.shape[:-1], self.cfg.d_sae)

    def encode_topk(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` largest latents per row: ``(values [..., k] >= 0, indices [..., k])``.

        Only for TopK SAEs. ``k`` defaults to the config's (training anneals it).
        """
        if self.cfg.architecture != "topk":
            raise SAEError(f"encode_topk needs a TopK SAE; this one is '{self.cfg.architecture}'.")
        top = torch.topk(self.pre_acts(x), k or int(self.cfg.k or 0), dim=-1, sorted=False)
        return F.relu(top.values), top.indices

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations ``[..., d_sae]`` (dense tensor, sparse values)."""
        if self.cfg.architecture == "topk":
            values, indices = self.encode_topk(x)
            out = torch.zeros(
                *values.shape[:-1], self.cfg.d_sae, dtype=values.dtype, device=values.device
            )
            return out.scatter_(-1, indices, values)
        pre = self.pre_acts(x)
        if self.cfg.architecture == "relu":
            return F.relu(pre)
        assert self.threshold is not None
        return pre * (pre > self.threshold) * (pre > 0)

    def decode(self, f: Tensor) -> Tensor:
        """Raw-space reconstruction ``[..., d_in]`` of latents ``f [..., d_sae]``."""
        if f.shape[-1] != self.cfg.d_sae:
            raise SAEError(
                f"decode expects [..., {self.cfg.d_sae}] latents, got shape {tuple(f.shape)}."
            )
        return (f.to(self.W_enc.dtype) @ self.W_dec + self.b_dec) / self.cfg.norm_scale

    def decode_topk(self, values: Tensor, indices: Tensor) -> Tensor:
        """Fast sparse decode: sum of the ``k`` selected decoder rows, in raw space.

        Same result as ``decode`` of the scattered dense latents, without building
        them: ``embedding_bag`` gathers only the ``k`` rows each token uses.
        """
        lead = values.shape[:-1]
        flat_v = values.reshape(-1, values.shape[-1]).to(self.W_enc.dtype)
        flat_i = indices.reshape(-1, indices.shape[-1])
        weight = self.W_dec if self.W_dec_free is not None else self.W_enc.T.contiguous()
        out = F.embedding_bag(flat_i, weight, per_sample_weights=flat_v, mode="sum")
        return ((out + self.b_dec) / self.cfg.norm_scale).reshape(*lead, self.cfg.d_in)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x`` (raw space)."""
        if self.cfg.architecture == "topk":
            return self.decode_topk(*self.encode_topk(x))
        return self.decode(self.encode(x))

    # --- helpers --------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            where = (
                f" (trained on {self.cfg.model_spec} layer {self.cfg.layer})"
                if self.cfg.model_spec
                else ""
            )
            raise SAEError(
                f"This SAE takes activations of width d_in={self.cfg.d_in}{where}, "
                f"got width {x.shape[-1]}; pass the SAE trained for this model and layer."
            )

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale free decoder rows to unit norm (no-op for tied SAEs)."""
        if self.W_dec_free is not None:
            self.W_dec_free.div_(self.W_dec_free.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each free decoder row (keeps rows on the sphere)."""
        if self.W_dec_free is not None and self.W_dec_free.grad is not None:
            w, g = self.W_dec_free, self.W_dec_free.grad
            g -= (g * w).sum(dim=1, keepdim=True) * w

    def folded(self) -> SparseAutoencoder:
        """An equivalent SAE with ``norm_scale`` 1 and an explicit decoder (for export).

        ``encode``/``decode`` of raw activations give the same results (up to rounding).
        """
        s = self.cfg.norm_scale
        cfg = SAEConfig(**{**self.cfg.to_dict(), "norm_scale": 1.0, "tied": False})
        cfg.extra = {**self.cfg.extra, "folded_norm_scale": s, "trained_tied": self.cfg.tied}
        out = SparseAutoencoder(cfg, device=self.W_enc.device)
        with torch.no_grad():
            out.W_enc.copy_(self.W_enc * s)
            out.b_enc.copy_(self.b_enc)
            assert out.W_dec_free is not None
            out.W_dec_free.copy_(self.W_dec / s)
            out.b_dec.copy_(self.b_dec / s)
            if self.threshold is not None and out.threshold is not None:
                out.threshold.copy_(self.threshold)
        return out

    def weights(self) -> dict[str, Tensor]:
        """The SAELens weight names: W_enc, W_dec, b_enc, b_dec (+ threshold for JumpReLU)."""
        out = {
            "W_enc": self.W_enc.detach(),
            "W_dec": self.W_dec.detach().contiguous(),
            "b_enc": self.b_enc.detach(),
            "b_dec": self.b_dec.detach(),
        }
        if self.threshold is not None:
            out["threshold"] = self.threshold.detach()
        return out
