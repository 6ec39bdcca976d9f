"""Whether the Hugging Face hub can be reached, decided quickly.

The hub clients retry for tens of seconds on a machine without network; a 3-second
TCP check first lets steerlex fail at once with a clear message instead.
"""

from __future__ import annotations

import os
import socket
import urllib.parse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_TRUE = {"1", "true", "yes", "on"}


def offline_vars() -> list[str]:
    """The Hugging Face offline variables that are switched on."""
    return [v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in _TRUE]


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the hub endpoint cannot be reached, or ``None`` if a TCP connection opens.

    A configured proxy (which this check cannot see through) counts as reachable.
    Takes at most ``timeout`` seconds.
    """
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlsplit(endpoint)
    if not url.hostname:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {endpoint}: {exc}"
    return None
