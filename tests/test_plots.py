"""The SVG plot writer: valid XML, ticks, labels and bad input."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from steerlex.plots import Series, frequency_histogram, line_plot, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"


def test_line_plot_is_valid_svg_with_points_lines_and_legend() -> None:
    svg = line_plot(
        [
            Series("dense", [(0.1, 0.5), (0.2, 0.3), (0.4, 0.1)], ["0.1", "0.2", "0.4"]),
            Series("none <base>", [(0.05, 0.55)], line=False, errors=[(0.4, 0.7)]),
        ],
        title="ASR & over-refusal",
        xlabel="over-refusal",
        ylabel="ASR",
        y_range=(0, 1),
    )
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert len(root.findall(f"{SVG}polyline")) == 1  # the scatter series has no line
    assert len(root.findall(f"{SVG}circle")) == 4 + 2  # points + legend markers
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "ASR &amp; over-refusal" not in texts and "ASR & over-refusal" in texts
    assert "none <base>" in texts and "0.4" in texts


def test_non_finite_points_are_skipped_and_empty_plots_refused() -> None:
    svg = line_plot([Series("a", [(0.0, 1.0), (math.nan, 2.0), (1.0, 3.0)])])
    ET.fromstring(svg)
    with pytest.raises(ValueError, match="nothing to plot"):
        line_plot([Series("a", [(math.nan, 1.0)])])


def test_nice_ticks_cover_the_range_with_round_steps() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(0.013, 0.087)
    assert ticks[0] <= 0.013 and ticks[-1] >= 0.087
    assert len(nice_ticks(3.0, 3.0)) >= 2  # a flat series still gets an axis


def test_frequency_histogram_counts_dead_latents_apart_with_readable_axes() -> None:
    edges = [-8.0 + 0.5 * i for i in range(17)]
    counts = [0, 1, 0, 0, 2, 0, 0, 0, 3, 5, 8, 13, 9, 4, 2, 1]
    svg = frequency_histogram(edges, counts, 7, title="firing <freq>")
    root = ET.fromstring(svg)
    bins = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bin"]
    assert [int(str(r.get("data-count"))) for r in bins] == counts
    dead = [g for g in root.iter(f"{SVG}g") if g.get("class") == "dead"]
    assert len(dead) == 1 and dead[0].get("data-count") == "7"
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert "dead" in texts and "7" in texts and "latents" in texts
    assert "firing <freq>" in texts
    assert any("log10 bins" in t for t in texts)
    # decade ticks as powers of ten: 10^-8 .. 10^-1, then 1
    for label in ("10-8", "10-4", "10-1", "1"):
        assert label in texts
    # the dead bar is as tall as a bin of the same count (one scale)
    seven = frequency_histogram(edges, [7] + [0] * 15, 7)
    rects = [r for r in ET.fromstring(seven).iter(f"{SVG}rect") if r.get("fill") != "white"]
    dead_bar, first_bin = rects[0], rects[1]
    assert first_bin.get("class") == "bin" and first_bin.get("data-count") == "7"
    assert dead_bar.get("height") == first_bin.get("height") != "0.0"


@pytest.mark.parametrize(
    ("edges", "counts", "dead"),
    [([0.0, 1.0], [1, 2], 0), ([1.0, 0.0], [1], 0), ([0.0, 1.0], [-1], 0), ([0.0, 1.0], [1], -1)],
)
def test_frequency_histogram_refuses_bad_input(
    edges: list[float], counts: list[int], dead: int
) -> None:
    with pytest.raises(ValueError):
        frequency_histogram(edges, counts, dead)
