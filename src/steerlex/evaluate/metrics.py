"""Rates with Wilson intervals and the KL divergence between next-token distributions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

__all__ = ["Rate", "kl_per_position", "mean_or_none", "wilson_interval"]

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` for ``k`` successes in ``n`` trials.

    ``n == 0`` gives ``(0.0, 1.0)`` (nothing is known). ``z`` defaults to the 95% quantile.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with its 95% Wilson interval (``rate`` is ``None`` when ``n == 0``)."""

    k: int
    n: int

    @property
    def rate(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def to_json(self) -> dict[str, float | int | None]:
        lo, hi = self.interval
        return {"k": self.k, "n": self.n, "rate": self.rate, "low": lo, "high": hi}

    def text(self, ci: bool = True) -> str:
        """``"45% [30-61]"``, or ``"n/a"`` without data."""
        if not self.n:
            return "n/a"
        lo, hi = self.interval
        out = f"{100 * self.k / self.n:.0f}%"
        return out + f" [{100 * lo:.0f}-{100 * hi:.0f}]" if ci else out


def kl_per_position(steered_logits: Tensor, base_logits: Tensor) -> Tensor:
    """``KL(steered || base)`` in nats at each position: ``[..., vocab]`` → ``[...]`` (float32).

    ``sum_v p_s(v) (log p_s(v) - log p_b(v))`` with ``p = softmax(logits)``; never negative
    (tiny negative rounding is clamped to 0).
    """
    s = F.log_softmax(steered_logits.float(), dim=-1)
    b = F.log_softmax(base_logits.float(), dim=-1)
    return (s.exp() * (s - b)).sum(dim=-1).clamp_min(0.0)


def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
