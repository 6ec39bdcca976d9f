"""The sparse autoencoder: one base class, one subclass per architecture.

Shapes (``...`` is any leading batch shape):

- ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``;
- ``pre_acts(x [..., d_in]) -> [..., d_sae]``: the encoder's affine map;
- ``encode(x [..., d_in]) -> [..., d_sae]``: dense latents (mostly zeros), all >= 0;
- ``encode_sparse(x [..., d_in]) -> (values [N, m] >= 0, indices [N, m])`` with ``N`` the
  number of rows of ``x``: the same latents in packed form (zero-padded where a row has
  fewer than ``m`` non-zero latents); ``decode_sparse(values, indices) -> [N, d_in]``;
- ``decode(f [..., d_sae]) -> [..., d_in]``; ``forward(x)`` is the reconstruction.

With ``norm_scale = s`` the SAE works on ``s * x`` internally and ``decode`` divides by
``s``, so every method takes and gives *raw* activations. With ``tied`` the decoder is the
encoder's transpose (the paper's variant), otherwise ``W_dec`` is its own parameter whose
rows are kept at unit norm during training.

The architectures (how pre-activations become latents) are classes registered in
:data:`SAE_ARCHITECTURES`; the built-in ones live in :mod:`steerlex.sae.architectures`
(``topk``, ``batchtopk``, ``relu``, ``jumprelu``), one module each. ``SparseAutoencoder(cfg)``
builds the registered class of ``cfg.architecture``; code that uses an SAE calls only the
methods above and never looks at the architecture's name. A class declares what the file
formats need as class attributes (:attr:`SparseAutoencoder.saelens_architecture`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steerlex.core.config import from_dict_strict
from steerlex.core.errors import SAEError
from steerlex.core.registry import Registry

__all__ = [
    "SAE_ARCHITECTURES",
    "SAEConfig",
    "SparseAutoencoder",
    "pack_latents",
    "sae_class",
    "trainable_architectures",
]

#: The SAE architectures by name (``SAEConfig.architecture``): subclasses of
#: :class:`SparseAutoencoder`. Built-ins: one module each in ``steerlex.sae.architectures``.
SAE_ARCHITECTURES: Registry[type[SparseAutoencoder]] = Registry(
    "SAE architecture", "steerlex.sae.architectures", SAEError
)


def sae_class(architecture: str) -> type[SparseAutoencoder]:
    """The registered class of ``architecture``; an unknown name raises naming the choices."""
    return SAE_ARCHITECTURES.get(architecture)


def trainable_architectures() -> tuple[str, ...]:
    """Names of the architectures ``steerlex train-sae`` can train, in display order."""
    return tuple(name for name, cls in SAE_ARCHITECTURES.items() if cls.trainable)


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE and say where it belongs.

    ``layer``/``hf_hook_name``/``model_spec``/``weights_id`` tie it to a model: an
    SAE must only be used on the residual stream it was trained on. ``k`` is the number of
    active latents for architectures that select by rank (``topk``, ``batchtopk``) and
    ``None`` for the others. ``extra`` holds provenance (source format, hook kind, ...).
    """

    d_in: int
    d_sae: int
    k: int | None = None
    architecture: str = "topk"
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
        """Raise :class:`SAEError` for an unknown architecture or inconsistent sizes."""
        cls = sae_class(self.architecture)
        if self.d_in < 1 or self.d_sae < 1:
            raise SAEError(
                f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}."
            )
        if cls.uses_k:
            if self.k is None or self.k < 1:
                raise SAEError(f"A {cls.title} SAE needs k >= 1, got k={self.k}.")
            if self.k > self.d_sae:
                raise SAEError(f"k={self.k} is larger than d_sae={self.d_sae}; choose k <= d_sae.")
        elif self.k is not None:
            raise SAEError(
                f"k={self.k} applies only to TopK SAEs (those that keep the k largest latents); "
                f"a {cls.title} SAE has no k. Leave k unset (None)."
            )
        if not (self.norm_scale > 0 and math.isfinite(self.norm_scale)):
            raise SAEError(f"norm_scale must be a positive finite number, got {self.norm_scale}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        return from_dict_strict(cls, data, "SAE config keys", SAEError)


def pack_latents(f: Tensor) -> tuple[Tensor, Tensor]:
    """Dense latents ``f [N, d_sae]`` (>= 0) -> ``(values [N, m], indices [N, m])``.

    ``m`` is the largest number of non-zero latents in a row (at least 1); rows with fewer
    are padded with latents whose value is 0. The indices of a row are distinct, so
    scattering the pair back gives ``f``. Gradients flow to the selected values.
    """
    m = max(1, int((f > 0).sum(-1).max())) if f.shape[0] else 1
    top = torch.topk(f, min(m, f.shape[-1]), dim=-1, sorted=False)
    return top.values, top.indices


class SparseAutoencoder(nn.Module):
    """The SAE interface and the math every architecture shares (see the module docstring).

    A subclass defines :meth:`activation` (pre-activations -> dense latents) and may
    override :meth:`encode_sparse` when it has a faster packed form. Class attributes say
    what the file formats need:

    - ``name``: the registry name (``SAEConfig.architecture``); ``title``: for messages;
    - ``saelens_architecture``: the SAELens ``cfg.json`` architecture it is saved and loaded
      as (``None``: it is saved as :meth:`for_inference`'s class);
    - ``saelens_keys``: the architecture's own ``cfg.json`` keys (TopK: ``k`` and
      ``rescale_acts_by_decoder_norm``);
    - ``uses_k``: whether ``cfg.k`` applies; ``latent_tensors``: extra ``[d_sae]`` tensors
      stored with the weights (JumpReLU: ``("threshold",)``);
    - ``sparsify_activation``: the eai-sparsify activation it is, if any;
    - ``trainable``: whether :func:`steerlex.sae.train.train_sae` can train it.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = "sparse autoencoder"
    saelens_architecture: ClassVar[str | None] = None
    saelens_keys: ClassVar[tuple[str, ...]] = ()
    uses_k: ClassVar[bool] = False
    latent_tensors: ClassVar[tuple[str, ...]] = ()
    sparsify_activation: ClassVar[str | None] = None
    trainable: ClassVar[bool] = False

    cfg: SAEConfig

    def __new__(cls, *args: Any, **kwargs: Any) -> SparseAutoencoder:
        # SparseAutoencoder(cfg) builds the registered class of cfg.architecture, so code
        # that only has a config never names a subclass. (copy/pickle call __new__ without
        # arguments on the subclass itself.)
        cfg = args[0] if args else kwargs.get("cfg")
        if cls is SparseAutoencoder and isinstance(cfg, SAEConfig):
            cls = sae_class(cfg.architecture)
        return super().__new__(cls)

    def __init__(self, cfg: SAEConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        cfg.validate()
        if cfg.architecture != type(self).name:
            raise SAEError(
                f"{type(self).__name__} is the '{type(self).name}' architecture but the config "
                f"says '{cfg.architecture}'; build SparseAutoencoder(cfg) to get the class of "
                "cfg.architecture."
            )
        self.cfg = cfg
        kw = self._factory_kwargs(device)
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))
        self.W_dec_free: nn.Parameter | None = (
            None if cfg.tied else nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, **kw))
        )
        for name in self.latent_tensors:  # fixed per-latent tensors (not trained by steerlex)
            self.register_parameter(
                name, nn.Parameter(torch.zeros(cfg.d_sae, **kw), requires_grad=False)
            )
        self.reset_parameters()

    def _factory_kwargs(self, device: torch.device | str | None) -> dict[str, Any]:
        return {"device": device, "dtype": getattr(torch, self.cfg.dtype)}

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

    def activation(self, pre: Tensor) -> Tensor:
        """Dense latents ``[..., d_sae]`` (>= 0) from pre-activations ``[..., d_sae]``."""
        raise NotImplementedError(f"{type(self).__name__} must define activation().")

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations ``[..., d_sae]`` (dense tensor, sparse values, all >= 0)."""
        return self.activation(self.pre_acts(x))

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The non-zero latents of each row: ``(values [N, m] >= 0, indices [N, m])``.

        ``N`` is the number of rows of ``x [..., d_in]`` (leading dims flattened). ``m`` is
        ``k`` for TopK; otherwise the batch's largest count of non-zero latents, shorter rows
        padded with zero-valued latents (the indices of a row are distinct). :meth:`decode_sparse` of the pair equals :meth:`decode` of
        :meth:`encode` (up to rounding).
        """
        return pack_latents(self.encode(x.reshape(-1, x.shape[-1])))

    def decode(self, f: Tensor) -> Tensor:
        """Raw-space reconstruction ``[..., d_in]`` of latents ``f [..., d_sae]``."""
        if f.shape[-1] != self.cfg.d_sae:
            raise SAEError(
                f"decode expects [..., {self.cfg.d_sae}] latents, got shape {tuple(f.shape)}."
            )
        return (f.to(self.W_enc.dtype) @ self.W_dec + self.b_dec) / self.cfg.norm_scale

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """Sparse decode ``[..., d_in]`` of ``(values [..., m], indices [..., m])``, in raw space.

        Same result as ``decode`` of the scattered dense latents, without building them:
        ``embedding_bag`` gathers only the ``m`` rows each token uses.
        """
        lead = values.shape[:-1]
        flat_v = values.reshape(-1, values.shape[-1]).to(self.W_enc.dtype)
        flat_i = indices.reshape(-1, indices.shape[-1])
        weight = self.W_dec if self.W_dec_free is not None else self.W_enc.T.contiguous()
        out = F.embedding_bag(flat_i, weight, per_sample_weights=flat_v, mode="sum")
        return ((out + self.b_dec) / self.cfg.norm_scale).reshape(*lead, self.cfg.d_in)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x`` (raw space), same shape."""
        return self.decode(self.encode(x))

    # --- training (architectures steerlex trains) -------------------------------------

    def training_codes(self, pre: Tensor, k: int, *, groups: int = 1) -> tuple[Tensor, Tensor]:
        """Sparse codes ``(values [N, m], indices [N, m])`` of pre-activations ``pre [N, d_sae]``
        during training, with ``k`` active latents (the trainer anneals it).

        ``pre`` holds ``groups`` equal consecutive blocks of rows, one per data stream; an
        architecture that selects across a batch does so within each block, so one process
        with ``groups`` streams computes what that many data-parallel processes compute.
        """
        raise SAEError(
            f"steerlex cannot train {self.title} SAEs; train one of "
            f"{', '.join(trainable_architectures())}."
        )

    def observe_training_codes(
        self, values: Tensor, reduce_min: Callable[[Tensor], Tensor]
    ) -> dict[str, float]:
        """Update running statistics from a training step's code ``values``; returns numbers
        to log. ``reduce_min`` takes the minimum of a tensor across processes. Default: none."""
        return {}

    def for_inference(self) -> SparseAutoencoder:
        """The SAE to save and use after training (this one, unless the architecture is only
        a training procedure: BatchTopK becomes JumpReLU)."""
        return self

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

        Same class; the pre-activations are unchanged, so thresholds carry over as they are.
        ``encode``/``decode`` of raw activations give the same results (up to rounding).
        """
        s = self.cfg.norm_scale
        cfg = SAEConfig(**{**self.cfg.to_dict(), "norm_scale": 1.0, "tied": False})
        cfg.extra = {**self.cfg.extra, "folded_norm_scale": s, "trained_tied": self.cfg.tied}
        out = type(self)(cfg, device=self.W_enc.device)
        with torch.no_grad():
            out.W_enc.copy_(self.W_enc * s)
            out.b_enc.copy_(self.b_enc)
            assert out.W_dec_free is not None
            out.W_dec_free.copy_(self.W_dec / s)
            out.b_dec.copy_(self.b_dec / s)
            for name in self.latent_tensors:
                getattr(out, name).copy_(getattr(self, name))
            for name, buf in self.named_buffers():
                out.get_buffer(name).copy_(buf)
        return out

    def weights(self) -> dict[str, Tensor]:
        """The SAELens weight names: W_enc, W_dec, b_enc, b_dec (+ ``latent_tensors``)."""
        out = {
            "W_enc": self.W_enc.detach(),
            "W_dec": self.W_dec.detach().contiguous(),
            "b_enc": self.b_enc.detach(),
            "b_dec": self.b_dec.detach(),
        }
        for name in self.latent_tensors:
            out[name] = getattr(self, name).detach()
        return out
