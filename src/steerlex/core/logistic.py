"""A small, deterministic logistic regression (L-BFGS in float64), for probes fitted on a
few hundred labelled rows: the judges' heads and the harm detectors."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fit_logistic"]


def fit_logistic(
    x: Tensor, y: Tensor, *, l2: float, steps: int = 200
) -> tuple[Tensor, float, Tensor, Tensor]:
    """A logistic regression of labels ``y`` (0/1) on rows ``x``, inputs standardised, an
    L2 penalty ``l2`` on the weights, fitted with L-BFGS: ``(weight, bias, mean, scale)``."""
    x, y = x.detach().double(), y.detach().double()
    mean, scale = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / scale
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y) + l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), float(b.detach()), mean.float(), scale.float()
