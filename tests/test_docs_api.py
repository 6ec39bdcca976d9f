"""Every ``python`` block of docs/api.md runs as written, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from steerlex.explain.method import EXPLANATION_METHODS

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs_api"}
    before = set(EXPLANATION_METHODS.names())
    try:
        for i, code in enumerate(blocks):
            try:
                exec(compile(code, f"docs/api.md block {i + 1}", "exec"), namespace)
            except Exception as exc:  # name the block that broke
                raise AssertionError(f"docs/api.md block {i + 1} failed: {exc!r}") from exc
    finally:  # the page registers a toy method; later tests must not see it
        for name in set(EXPLANATION_METHODS.names()) - before:
            EXPLANATION_METHODS.remove(name)
    assert "first-letter" not in EXPLANATION_METHODS
    assert (tmp_path / "demo" / "eval" / "scores.json").is_file()
    assert (tmp_path / "demo" / "selected_safety.json").is_file()
