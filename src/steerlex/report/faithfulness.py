"""How faithful the run's explanations are, read from ``explanations/metrics.json`` for the
report, the feature browser and the terminal summary.

- :func:`faithfulness_ranking`: the sampled features, most faithful first, by the per-feature
  AUROC of the method with the best mean (output side; the input side when the output side
  was not scored);
- :func:`method_auroc`: one method's mean AUROC and 95% interval on one side, as written;
- :func:`verdict`: what an interval says against random words (AUROC 0.5);
- :func:`quality_panel`: the report's one-paragraph account of every method on both sides.

Nothing here recomputes a metric: every number is the file's (the intervals are the Student-t
intervals over features that ``explain-metrics`` writes, see docs/metrics.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steerlex.explain.metrics import best_method, ranked_features
from steerlex.report.common import esc

__all__ = [
    "SIDES",
    "Ranking",
    "faithfulness_ranking",
    "fmt_auroc",
    "method_auroc",
    "quality_panel",
    "verdict",
]

#: The two faithfulness sides, in the order they are tried and shown.
SIDES = ("output", "input")
CHANCE = 0.5


@dataclass(frozen=True)
class Ranking:
    """Features ranked by one method's per-feature AUROC on one side, best first."""

    method: str
    side: str
    scores: tuple[tuple[int, float], ...]

    @property
    def label(self) -> str:
        """The column heading: ``"output AUROC (mi)"``."""
        return f"{self.side} AUROC ({self.method})"

    def by_feature(self) -> dict[int, float]:
        return dict(self.scores)


def faithfulness_ranking(metrics: Mapping[str, Any] | None) -> Ranking | None:
    """The ranking the report and the browser lead with; ``None`` when no method has
    per-feature AUROCs on either side (no metrics, or metrics written without features)."""
    if not metrics:
        return None
    for side in SIDES:
        method = best_method(metrics, side)
        if method is None:
            continue
        scores = ranked_features(metrics, method, side)
        if scores:
            return Ranking(method, side, tuple(scores))
    return None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def method_auroc(
    metrics: Mapping[str, Any] | None, method: str, side: str
) -> tuple[float, float | None, float | None] | None:
    """``(mean, low, high)`` of ``method``'s AUROC on ``side`` as ``metrics`` holds it (the
    interval ``None`` when it is missing); ``None`` when there is no finite mean."""
    block = (metrics or {}).get(f"{side}_faithfulness")
    rec = block.get(method) if isinstance(block, Mapping) else None
    if not isinstance(rec, Mapping):
        return None
    mean = _finite(rec.get("auroc_mean"))
    if mean is None:
        return None
    ci = rec.get("auroc_ci")
    lo, hi = (
        (_finite(ci[0]), _finite(ci[1])) if isinstance(ci, list) and len(ci) == 2 else (None, None)
    )
    if lo is None or hi is None:
        lo = hi = None
    return mean, lo, hi


def fmt_auroc(value: tuple[float, float | None, float | None] | None) -> str:
    """``"0.756 [0.702, 0.810]"``, ``"0.756"`` without an interval, ``"–"`` without a mean."""
    if value is None:
        return "–"
    mean, lo, hi = value
    if lo is None or hi is None:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def verdict(value: tuple[float, float | None, float | None] | None) -> str:
    """What the interval says against random words (AUROC 0.5)."""
    if value is None:
        return "not scored"
    mean, lo, hi = value
    if lo is None or hi is None:
        return "above random words" if mean > CHANCE else "not above random words"
    if lo > CHANCE:
        return "better than random words"
    if hi < CHANCE:
        return "worse than random words"
    return "not distinguishable from random words"


def _span(metrics: Mapping[str, Any], method: str, side: str) -> str:
    value = method_auroc(metrics, method, side)
    return (
        f'<span class="auroc" data-method="{esc(method)}" data-side="{esc(side)}">'
        f"{esc(fmt_auroc(value))}</span>"
    )


def _share(metrics: Mapping[str, Any], method: str, side: str) -> float | None:
    block = metrics.get(f"{side}_faithfulness")
    rec = block.get(method) if isinstance(block, Mapping) else None
    return _finite(rec.get("share_above_chance")) if isinstance(rec, Mapping) else None


def _lead_sentence(metrics: Mapping[str, Any], method: str, side: str) -> str:
    value = method_auroc(metrics, method, side)
    share = _share(metrics, method, side)
    test = (
        "steering a feature raises the log-probability of its words more than that of random "
        "vocabulary words"
        if side == "output"
        else "texts made of a feature's words make it fire more than texts of random words"
    )
    above = "" if share is None else f"; {share:.0%} of the features score above 0.5"
    return (
        f"on the {esc(side)} side the most faithful explanations are <strong>{esc(method)}"
        f"</strong>'s: {test} with AUROC {_span(metrics, method, side)} (95% CI; 0.5 = no "
        f"better than random words{above}), i.e. {esc(verdict(value))}"
    )


def quality_panel(metrics: Mapping[str, Any] | None, methods: Sequence[str]) -> str:
    """The report's panel: one paragraph on how good the explanations are on this run, every
    method's output- and input-side AUROC with its interval against random words. Hooks:
    ``#explanation-quality span.auroc[data-method][data-side]``."""
    if not metrics:
        return ""
    n = len(metrics.get("features") or [])
    lead = [
        _lead_sentence(metrics, m, side)
        for side in SIDES
        if (m := best_method(metrics, side)) is not None
    ]
    if not lead:
        return ""
    each = "; ".join(
        f"{esc(m)} {_span(metrics, m, 'output')} / {_span(metrics, m, 'input')}" for m in methods
    )
    text = (
        f"How good are the explanations on this run? On the {n} features explain-metrics "
        "sampled, "
        + "; and ".join(lead)
        + f". Every method, output / input AUROC [95% CI]: {each}. Random words score 0.5 on "
        "both sides by construction; an interval above 0.5 is a method that beats them."
    )
    return f'<div class="panel" id="explanation-quality"><p>{text}</p></div>'
