"""The run's HTML report and static feature browser (self-contained files, no network).

- :func:`feature_stats` / :func:`write_feature_stats`: per-feature frequency, maximum,
  histogram and top contexts over an activation store (``features.json``);
- :func:`conversation_examples` / :func:`write_examples`: example conversations with and
  without a steering defence, with the selected features' activations (``examples.json``);
- :func:`build_browser`: ``browser.html``, a searchable feature browser;
- :func:`build_report`: ``report.html``, the run report.

See docs/report.md.
"""

from steerlex.core.errors import ReportError
from steerlex.report.browser import build_browser
from steerlex.report.examples import conversation_examples, read_examples, write_examples
from steerlex.report.features import (
    feature_stats,
    read_feature_stats,
    token_decoder,
    write_feature_stats,
)
from steerlex.report.html import build_report

__all__ = [
    "ReportError",
    "build_browser",
    "build_report",
    "conversation_examples",
    "feature_stats",
    "read_examples",
    "read_feature_stats",
    "token_decoder",
    "write_examples",
    "write_feature_stats",
]
