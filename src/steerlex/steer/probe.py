"""A linear harm probe on the residual stream: the conditional gate's detector when SAE
features are not the best one (benchmarks/detectors.py: a logistic probe on the position-
averaged residual separates harmful and jailbreak prompts from benign ones at AUROC 0.99-1.00,
where the explanation-selected harm features reach 0.84 on plain harmful requests).

The probe's score of one position is ``h @ weight + bias`` (a logit: ``>= 0`` means "harmful"
more likely than not); a prompt's score is the mean over its editable positions, which is the
probe of the mean residual it was fitted on. A probe is saved as safetensors with the model,
the layer and the width it was fitted for in the header; loading checks all three.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from steerlex.core.errors import SteeringError
from steerlex.core.io import atomic_path
from steerlex.core.logistic import fit_logistic

__all__ = ["PROBE_L2", "LinearProbe", "fit_probe", "is_probe_file", "load_probe"]

PROBE_L2 = 1e-2
"""The L2 penalty of :func:`fit_probe` on standardised inputs (a few dozen prompts a side)."""

_FORMAT = "steerlex-harm-probe-v1"


@dataclass(frozen=True)
class LinearProbe:
    """``weight`` ``[d_model]`` (float32) and ``bias`` in the raw residual space of ``layer``
    of the model whose weights are ``model`` (a ``weights_id``); ``fingerprint`` hashes weight
    and bias (it keys caches and names the probe)."""

    weight: Tensor = field(repr=False, compare=False)
    bias: float
    layer: int
    model: str
    fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        w = self.weight.detach().float().cpu().contiguous()
        if w.ndim != 1 or not bool(torch.isfinite(w).all()):
            raise SteeringError(f"a probe's weight must be a finite vector, got {tuple(w.shape)}.")
        object.__setattr__(self, "weight", w)
        digest = hashlib.sha256(w.numpy().tobytes() + repr(float(self.bias)).encode())
        object.__setattr__(self, "fingerprint", "sha256:" + digest.hexdigest())

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[0])

    def scores(self, h: Tensor) -> Tensor:
        """The logit of every position ``[..., d] -> [...]`` (float32)."""
        if h.shape[-1] != self.d_model:
            raise SteeringError(
                f"the harm probe was fitted on a residual stream of width {self.d_model} "
                f"(layer {self.layer} of {self.model}); this one has width {h.shape[-1]}."
            )
        return h.float() @ self.weight.to(h.device) + self.bias

    def check_for(self, model: str, layer: int, what: str = "the harm probe") -> None:
        """Refuse a probe fitted for another model or layer."""
        if self.model != model or self.layer != layer:
            name = self.meta.get("model_name", self.model)
            raise SteeringError(
                f"{what} was fitted on layer {self.layer} of {name} (weights {self.model}), not "
                f"layer {layer} of weights {model}; fit one for this model and layer (steerlex "
                "eval writes gate_probe.safetensors when a defence uses the probe gate)."
            )

    def save(self, path: Path) -> None:
        """Write the probe (safetensors, settings in the header) atomically."""
        header = {
            "format": _FORMAT,
            "bias": repr(float(self.bias)),
            "layer": str(self.layer),
            "model": self.model,
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"weight": self.weight}, str(tmp), header)


def is_probe_file(spec: str) -> bool:
    """Whether a ``--harm`` value names a probe file rather than feature ids."""
    return spec.strip().lower().endswith(".safetensors")


def load_probe(path: str | Path) -> LinearProbe:
    """Read a probe written by :meth:`LinearProbe.save`.

    Raises:
        SteeringError: a missing file, or one that is not a steerlex harm probe.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise SteeringError(f"The harm probe {p} does not exist.")
    try:
        with safe_open(str(p), "pt") as fh:
            header = fh.metadata() or {}
            if header.get("format") != _FORMAT:
                raise KeyError("format")
            weight = fh.get_tensor("weight")
        return LinearProbe(
            weight,
            float(header["bias"]),
            int(header["layer"]),
            header["model"],
            meta=json.loads(header.get("meta", "{}")),
        )
    except (KeyError, ValueError, OSError, SafetensorError) as exc:
        raise SteeringError(
            f"{p} is not a steerlex harm probe ({type(exc).__name__}: {exc}); give the "
            "gate_probe.safetensors a steerlex eval wrote, or harm feature ids."
        ) from None


def fit_probe(
    positive: Sequence[Tensor],
    negative: Sequence[Tensor],
    *,
    layer: int,
    model: str,
    model_name: str = "",
    l2: float = PROBE_L2,
) -> LinearProbe:
    """A logistic probe of mean residual rows: ``positive`` (harmful and jailbreak prompts)
    against ``negative`` (benign), each a ``[d_model]`` mean over a prompt's editable
    positions; the standardisation is folded into the returned weight and bias."""
    if not positive or not negative:
        raise SteeringError("fitting a harm probe needs harmful and benign prompts.")
    x = torch.stack([t.float().cpu() for t in (*positive, *negative)])
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])
    w, b, mean, scale = fit_logistic(x, y, l2=l2)
    weight = w / scale
    bias = b - float((mean / scale) @ w)
    meta: dict[str, Any] = {"positive": len(positive), "negative": len(negative), "l2": l2}
    if model_name:
        meta["model_name"] = model_name
    return LinearProbe(weight, bias, layer, model, meta=meta)
