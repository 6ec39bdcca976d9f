"""The steerlex cache: where converted models and file hashes live.

The root is ``$STEERLEX_CACHE`` when set, else the user's cache directory
(``~/.cache/steerlex`` on Linux). Everything written here is written to a
temporary name first and moved into place with an atomic rename, so a killed
process never leaves a half-written entry that a later process would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import platformdirs

from steerlex.errors import SteerlexError

CACHE_ENV = "STEERLEX_CACHE"
_CHUNK = 1 << 22


def cache_root() -> Path:
    """Return the cache root (created if missing)."""
    root = Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("steerlex"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, streamed in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def read_json_object(
    path: Path, *, what: str, fix: str, error: type[SteerlexError]
) -> dict[str, Any]:
    """Parse ``path`` as a JSON object; otherwise raise ``error`` naming ``what``, the file
    and ``fix`` (what the user should do)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"The {what} {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"Cannot read the {what}: {path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"The {what} {path} must hold a JSON object, got {type(data).__name__}; {fix}")
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON (sorted keys, 2-space indent) via a temp file and rename."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` atomically: temp file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed
    and ``path`` is left as it was.
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
