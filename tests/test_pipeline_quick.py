"""The whole chain, `steerlex run --profile quick`, on the small packaged model: every stage
runs, the report and browser are written, and a rerun keeps every finished stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from steerlex.cli import main

pytestmark = pytest.mark.slow


def test_quick_profile_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--profile", "quick", "--runs-dir", str(tmp_path)]) == 0
    d = tmp_path / "quick"
    for name in (
        "config.json", "run.json", "acts-train/index.json", "sae/cfg.json", "sae/eval/eval.json",
        "explanations/mi.jsonl", "explanations/topact.jsonl", "explanations/metrics.json",
        "selected_safety.json", "selected_harm.json", "eval/scores.json", "features.json",
        "examples.json", "report.html", "browser.html",
    ):  # fmt: skip
        assert (d / name).is_file(), name
    record = json.loads((d / "run.json").read_text())
    assert len(record["stages"]) == 10
    # one model load for the whole run (every stage shares the run context)
    assert record["model_loads"] == 1, record["models_loaded"]
    scores = json.loads((d / "eval" / "scores.json").read_text())
    assert {c["defence"] for c in scores["conditions"]} >= {"none", "dense", "amplify"}
    report = (d / "report.html").read_text()
    assert "<svg" in report and "amplify" in report
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']https?:", report)
    browser = (d / "browser.html").read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']https?:", browser)
    capsys.readouterr()
    # a rerun keeps every finished stage
    assert main(["run", "--profile", "quick", "--runs-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.count("done earlier, kept") == 10
    assert json.loads((d / "run.json").read_text()) == record
