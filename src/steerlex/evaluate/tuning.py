"""What the defences are tuned with on the selection split: the refusal direction, the gate's
harm scores and threshold, the harm probe's inputs, and the fingerprints that key cached generations by them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import Tensor

from steerlex.core.errors import EvalError
from steerlex.models.chat import prompt_residuals
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder
from steerlex.steer.strategies import Gate

__all__ = [
    "calibrate_gate",
    "direction_fingerprint",
    "gate_means",
    "gate_scores",
    "refusal_direction",
    "sae_fingerprint",
]


def sae_fingerprint(sae: SparseAutoencoder) -> str:
    """sha256 of the SAE's config and weights (part of every SAE defence's cache key)."""
    digest = hashlib.sha256(json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def direction_fingerprint(direction: Tensor, scale: float) -> str:
    """A hash of a refusal direction at 4 significant digits (stable across reruns)."""
    values = [float(f"{v:.4g}") for v in direction.float().cpu().tolist()] + [float(f"{scale:.4g}")]
    return "sha256:" + hashlib.sha256(json.dumps(values).encode()).hexdigest()


# --------------------------------------------------------------------------- the refusal direction


@torch.no_grad()
def _content_means(
    loaded: LoadedModel, layer: int, texts: Sequence[str], batch_size: int, max_length: int
) -> tuple[Tensor, float]:
    """Mean over prompts of each prompt's mean layer-``layer`` output over its user-text
    tokens ``[d]`` (float64), and the mean norm of those token vectors."""
    total: Tensor | None = None
    norms: list[float] = []
    counted = 0
    for enc, resid in prompt_residuals(
        loaded, texts, layer, batch_size=batch_size, max_length=max_length, skip_empty=True
    ):
        for i, e in enumerate(enc):
            rows = resid[i, e.content_start : e.content_end].double().cpu()
            total = rows.mean(dim=0) if total is None else total + rows.mean(dim=0)
            norms.extend(rows.norm(dim=-1).tolist())
            counted += 1
    if total is None:
        raise EvalError(f"None of the {len(texts)} prompts has a token of user text.")
    return total / counted, sum(norms) / len(norms)


def refusal_direction(
    loaded: LoadedModel,
    layer: int,
    harmful: Sequence[str],
    benign: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 256,
) -> tuple[Tensor, float]:
    """``(harmful mean − benign mean [d] float32, mean residual norm)`` at ``layer`` over the
    user-text tokens of the chat-formatted prompts (:func:`_content_means`)."""
    if not harmful or not benign:
        raise EvalError("the refusal direction needs harmful and benign selection prompts.")
    mh, nh = _content_means(loaded, layer, harmful, batch_size, max_length)
    mb, nb = _content_means(loaded, layer, benign, batch_size, max_length)
    return (mh - mb).float(), (nh + nb) / 2


# --------------------------------------------------------------------------- the gate


def gate_scores(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    texts: Sequence[str],
    harm: Sequence[int],
    *,
    layer: int,
    batch_size: int = 8,
    max_length: int = 256,
) -> list[float]:
    """The prompt-mode gate's harm score of each chat-formatted prompt.

    The same number :class:`~steerlex.steer.strategies.Gate` computes after prefill: the mean
    over the prompt's editable positions (from the user's text to the end of the prompt) of the
    mean ``relu(pre-activation)`` of the ``harm`` features.
    """
    gate = Gate(tuple(int(h) for h in harm))
    dev = sae.W_enc.device
    out: list[float] = []
    for enc, h in prompt_residuals(
        loaded, texts, layer, batch_size=batch_size, max_length=max_length
    ):
        editable = torch.zeros(h.shape[:2], dtype=torch.bool)
        for i, e in enumerate(enc):
            editable[i, e.content_start : len(e.input_ids)] = True
        with torch.no_grad():
            score = gate.prompt_score(h.to(dev, sae.W_enc.dtype), sae, editable.to(dev))
        out.extend(float(s) for s in score.cpu())
    return out


@torch.no_grad()
def gate_means(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    layer: int,
    batch_size: int = 8,
    max_length: int = 256,
) -> list[Tensor]:
    """Each chat-formatted prompt's mean layer-``layer`` output ``[d]`` (float32, CPU) over
    the positions the prompt-mode gate reads (from the user's text to the end of the prompt;
    :func:`gate_scores`), what the harm probe is fitted on. Prompts with none are skipped."""
    out: list[Tensor] = []
    for enc, h in prompt_residuals(
        loaded, texts, layer, batch_size=batch_size, max_length=max_length
    ):
        for i, e in enumerate(enc):
            rows = h[i, e.content_start : len(e.input_ids)]
            if len(rows):
                out.append(rows.float().mean(dim=0).cpu())
    return out


def calibrate_gate(harmful: Sequence[float], benign: Sequence[float]) -> tuple[float, float]:
    """``(threshold, youden_j)``: the gate threshold that best separates harmful from
    benign selection prompts (maximum of TPR − FPR over the observed scores; a tie goes to
    the higher threshold, i.e. fewer benign prompts gated).

    Raises:
        EvalError: an empty group.
    """
    if not harmful or not benign:
        raise EvalError("Calibrating the gate needs harmful and benign selection prompts.")
    best_t, best_j = max(list(harmful) + list(benign)), -1.0
    for t in sorted(set(harmful) | set(benign)):
        tpr = sum(s >= t for s in harmful) / len(harmful)
        fpr = sum(s >= t for s in benign) / len(benign)
        if tpr - fpr >= best_j - 1e-12:  # ties (up to rounding) go to the higher one
            best_t, best_j = t, tpr - fpr
    return float(best_t), float(best_j)
