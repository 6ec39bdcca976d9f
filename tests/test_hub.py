"""The quick hub reachability check."""

from __future__ import annotations

import pytest

from steerlex import hub


def test_hub_check_reports_connection_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(address: tuple[str, int], timeout: float) -> object:
        raise ConnectionRefusedError(111, "Connection refused")

    for var in hub._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    reason = hub.hub_unreachable_reason()
    assert reason is not None and "hub.example.invalid" in reason and "refused" in reason
