"""The steerlex cache: where converted models and file hashes live.

The root is ``$STEERLEX_CACHE`` when set, else the user's cache directory
(``~/.cache/steerlex`` on Linux). Everything written here goes through
:mod:`steerlex.core.io` (temporary name, then an atomic rename), so a killed
process never leaves a half-written entry that a later process would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import platformdirs

from steerlex.core.io import sha256_file, write_json_atomic

CACHE_ENV = "STEERLEX_CACHE"


def cache_root() -> Path:
    """Return the cache root (created if missing)."""
    root = Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("steerlex"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached_sha256(path: Path) -> str:
    """sha256 of ``path``, memoised in the cache by (absolute path, size, mtime).

    Hashing a 2 GB weight file takes seconds; the memo makes repeated loads of the
    same unchanged file free while any change of size or mtime forces a rehash.
    """
    path = path.resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = cache_root() / "hashes.json"
    memo: dict[str, str] = {}
    if memo_path.exists():
        with contextlib.suppress(OSError, ValueError):
            memo = json.loads(memo_path.read_text())
    if key in memo:
        return memo[key]
    digest = sha256_file(path)
    memo[key] = digest
    with contextlib.suppress(OSError):
        write_json_atomic(memo_path, memo)
    return digest
