"""Files written atomically and JSON read with clear errors.

Everything steerlex writes that a later run could trust goes to a temporary name beside
the target, is fsynced and is renamed into place, so a killed process never leaves a
half-written file behind.
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

from steerlex.core.errors import SteerlexError

__all__ = [
    "atomic_path",
    "read_json_object",
    "sha256_file",
    "write_bytes_atomic",
    "write_json_atomic",
]

_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, streamed in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
