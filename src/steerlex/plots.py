"""Tiny, dependency-free SVG charts: lines and scatter points on linear axes, and the SAE's
firing-frequency histogram on log10 bins.

:func:`line_plot` and :func:`frequency_histogram` return an SVG document as a string (write
it with :func:`~steerlex.core.io.write_bytes_atomic` or embed it in HTML). No fonts, scripts or
external resources are referenced, so the file renders the same offline and inside a report.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

__all__ = ["PALETTE", "Series", "frequency_histogram", "line_plot", "nice_ticks"]

PALETTE: tuple[str, ...] = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
)


@dataclass(frozen=True)
class Series:
    """One named set of points, drawn in order.

    ``labels`` (one per point, may be empty strings) are written next to the points, e.g. the
    steering strength. ``line=False`` draws points only (a scatter). ``errors`` are optional
    ``(low, high)`` vertical intervals, one per point, drawn as whiskers.
    """

    name: str
    points: Sequence[tuple[float, float]]
    labels: Sequence[str] = field(default_factory=tuple)
    line: bool = True
    errors: Sequence[tuple[float, float]] | None = None


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def line_plot(
    series: Sequence[Series],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    width: int = 640,
    height: int = 420,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
) -> str:
    """An SVG document plotting ``series`` (lines with markers, or scatter points), with axes,
    round ticks, a grid, point labels and a legend. Non-finite points are skipped.

    ``x_range``/``y_range`` fix an axis (e.g. ``(0, 1)`` for rates); by default each covers the
    data. Raises ``ValueError`` when no series has a finite point.
    """
    pts = [(x, y) for s in series for x, y in s.points if math.isfinite(x) and math.isfinite(y)] + [
        (x, e)
        for s in series
        for (x, _), err in zip(s.points, s.errors or (), strict=False)
        for e in err
        if math.isfinite(x) and math.isfinite(e)
    ]
    if not pts:
        raise ValueError("nothing to plot: no series has a finite point")
    xs = nice_ticks(*(x_range or (min(p[0] for p in pts), max(p[0] for p in pts))))
    ys = nice_ticks(*(y_range or (min(p[1] for p in pts), max(p[1] for p in pts))))
    legend_w = 170
    left, right, top, bottom = 64, 16 + legend_w, 36 if title else 16, 48
    pw, ph = width - left - right, height - top - bottom
    x0, x1, y0, y1 = xs[0], xs[-1], ys[0], ys[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        out.append(
            f'<text x="{left + pw / 2:.1f}" y="20" text-anchor="middle" font-size="14">'
            f"{escape(title)}</text>"
        )
    for t in xs:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#e5e5e5"/>')
        out.append(
            f'<text x="{x:.1f}" y="{top + ph + 15}" text-anchor="middle">{escape(_fmt(t))}</text>'
        )
    for t in ys:
        y = sy(t)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(_fmt(t))}</text>'
        )
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    if xlabel:
        out.append(
            f'<text x="{left + pw / 2:.1f}" y="{height - 10}" text-anchor="middle">'
            f"{escape(xlabel)}</text>"
        )
    if ylabel:
        cy = top + ph / 2
        out.append(
            f'<text x="16" y="{cy:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 16 {cy:.1f})">{escape(ylabel)}</text>'
        )
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        good = [
            (j, x, y) for j, (x, y) in enumerate(s.points) if math.isfinite(x) and math.isfinite(y)
        ]
        if s.line and len(good) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for _, x, y in good)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>'
            )
        for j, x, y in good:
            if s.errors is not None and j < len(s.errors):
                lo, hi = s.errors[j]
                if math.isfinite(lo) and math.isfinite(hi):
                    out.append(
                        f'<line x1="{sx(x):.1f}" y1="{sy(lo):.1f}" x2="{sx(x):.1f}" '
                        f'y2="{sy(hi):.1f}" stroke="{color}" stroke-opacity="0.5"/>'
                    )
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"/>')
            label = s.labels[j] if j < len(s.labels) else ""
            if label:
                out.append(
                    f'<text x="{sx(x) + 5:.1f}" y="{sy(y) - 5:.1f}" fill="{color}" '
                    f'font-size="10">{escape(label)}</text>'
                )
        ly = top + 8 + i * 18
        lx = left + pw + 14
        out.append(
            f'<line x1="{lx}" y1="{ly}" x2="{lx + 18}" y2="{ly}" stroke="{color}" '
            f'stroke-width="{1.8 if s.line else 0}"/>'
        )
        out.append(f'<circle cx="{lx + 9}" cy="{ly}" r="3.5" fill="{color}"/>')
        out.append(f'<text x="{lx + 24}" y="{ly + 4}">{escape(s.name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _power_of_ten(exponent: int) -> str:
    """SVG text content for ``10**exponent``: ``1``, ``10`` or ``10`` with a raised exponent."""
    if exponent == 0:
        return "1"
    if exponent == 1:
        return "10"
    return f'10<tspan baseline-shift="super" font-size="8">{exponent}</tspan>'


def _decade_ticks(lo: float, hi: float, most: int = 10) -> list[int]:
    """Whole log10 values in ``[lo, hi]``, thinned to at most ``most`` (every 2nd, 3rd, ...)."""
    ticks = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
    step = max(1, math.ceil(len(ticks) / most))
    return [t for t in ticks if (t - ticks[-1]) % step == 0] if ticks else []


def frequency_histogram(
    log10_edges: Sequence[float],
    counts: Sequence[int],
    n_dead: int,
    *,
    title: str = "",
    width: int = 640,
    height: int = 280,
) -> str:
    """An SVG bar chart of how often the latents fire: one bar per log10-frequency bin
    (``counts[i]`` latents fire on a share of tokens in ``10**edges[i]..10**edges[i+1]``), the
    x axis labelled in powers of ten, and the dead latents (which never fire, log10 = -inf)
    as a separate bar labelled "dead" left of the axis. Hooks: ``rect.bin[data-count]`` and
    ``g.dead[data-count]``.

    Raises ``ValueError`` unless there is one more edge than counts, rising, and the counts
    and ``n_dead`` are non-negative.
    """
    edges, values = [float(e) for e in log10_edges], [int(c) for c in counts]
    if len(edges) != len(values) + 1 or not values:
        raise ValueError(f"need one more edge than counts, got {len(edges)} and {len(values)}")
    if any(b <= a for a, b in itertools.pairwise(edges)) or not all(map(math.isfinite, edges)):
        raise ValueError("histogram edges must be finite and rising")
    if n_dead < 0 or min(values) < 0:
        raise ValueError("histogram counts must be non-negative")
    ys = nice_ticks(0.0, float(max([*values, n_dead, 1])))
    left, right, top, bottom, dead_w, gap = 64, 16, 36 if title else 16, 52, 28, 28
    x_left = left + dead_w + gap
    pw, ph = width - x_left - right, height - top - bottom
    y_top = ys[-1]

    def sx(v: float) -> float:
        return x_left + (v - edges[0]) / (edges[-1] - edges[0]) * pw

    def bar_h(c: float) -> float:
        return ph * c / y_top

    base = top + ph
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
        'font-size="11">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        out.append(
            f'<text x="{width / 2:.1f}" y="20" text-anchor="middle" font-size="13">'
            f"{escape(title)}</text>"
        )
    for t in ys:
        y = base - bar_h(t)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#e5e5e5"/>'
        )
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    h = bar_h(n_dead)
    out.append(
        f'<g class="dead" data-count="{n_dead}"><rect x="{left + 2}" y="{base - h:.1f}" '
        f'width="{dead_w - 4}" height="{h:.1f}" fill="#999"><title>dead (never fire): '
        f"{n_dead} latents</title></rect>"
        f'<text x="{left + dead_w / 2:.1f}" y="{base - h - 4:.1f}" text-anchor="middle">'
        f"{n_dead}</text>"
        f'<text x="{left + dead_w / 2:.1f}" y="{base + 15}" text-anchor="middle">dead</text></g>'
    )
    for i, c in enumerate(values):
        x0, x1, h = sx(edges[i]), sx(edges[i + 1]), bar_h(c)
        low = "≤ " if i == 0 else ""
        out.append(
            f'<rect class="bin" data-count="{c}" x="{x0 + 0.5:.1f}" y="{base - h:.1f}" '
            f'width="{max(1.0, x1 - x0 - 1):.1f}" height="{h:.1f}" fill="{PALETTE[0]}">'
            f"<title>{low}10^{edges[i]:.2f} to 10^{edges[i + 1]:.2f} of tokens: {c} latents"
            "</title></rect>"
        )
    for t in _decade_ticks(edges[0], edges[-1]):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#444"/>')
        out.append(
            f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle">{_power_of_ten(t)}</text>'
        )
    out.append(f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="#444"/>')
    out.append(f'<line x1="{x_left}" y1="{top}" x2="{x_left}" y2="{base}" stroke="#444"/>')
    out.append(
        f'<text x="{x_left + pw / 2:.1f}" y="{height - 10}" text-anchor="middle">firing '
        "frequency: share of tokens on which a latent fires (log10 bins)</text>"
    )
    cy = top + ph / 2
    out.append(
        f'<text x="16" y="{cy:.1f}" text-anchor="middle" transform="rotate(-90 16 {cy:.1f})">'
        "latents</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"
