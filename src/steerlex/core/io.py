"""Files written atomically, directories locked while written, JSON read with clear errors.

Everything steerlex writes that a later run could trust goes to a temporary name beside
the target, is fsynced and is renamed into place, so a killed process never leaves a
half-written file behind. The file gets the mode a plain ``open()`` would give it (``0o666``
less the umask), not the private ``0o600`` of a temporary file.

A directory that a long job writes (an activation store, an SAE training directory, a run
directory) is held with :func:`dir_lock` for the whole job: an exclusive ``flock`` on
``DIR/.steerlex.lock``, which records who holds it, so a second writer fails at once with
an error naming the holder instead of racing the first.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steerlex.core.errors import SteerlexError

__all__ = [
    "LOCK_NAME",
    "atomic_path",
    "dir_lock",
    "file_mode",
    "read_json_object",
    "sha256_file",
    "write_bytes_atomic",
    "write_json_atomic",
]

_CHUNK = 1 << 22
LOCK_NAME = ".steerlex.lock"
_UMASK_LOCK = threading.Lock()


def file_mode(directory: bool = False) -> int:
    """The mode ``open()`` (or ``mkdir()`` when ``directory``) would give a new file now:
    ``0o666`` (``0o777``) less the process's umask."""
    with _UMASK_LOCK:  # reading the umask means setting it; no other thread may see the 0
        mask = os.umask(0)
        os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


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
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def dir_lock(directory: Path, *, what: str, error: type[SteerlexError]) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (created if missing) while the block runs.

    Another process holding it (or this one, through another ``dir_lock``) makes this raise
    ``error`` at once, naming ``what``, the directory and the holder (pid, host, command,
    since when). The lock is an ``flock`` on ``DIR/.steerlex.lock``: the kernel releases it
    when the holder exits, however it exits, so a killed job never leaves a stale lock.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise error(
            f"Cannot create or lock the {what} {directory} ({exc.strerror or exc}); choose a "
            "directory you can write."
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            raise error(
                f"The {what} {directory} is being written by another steerlex process "
                f"({holder}); wait for it to finish, or choose another directory."
            ) from None
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {since}: {' '.join(sys.argv)}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info[:4000].encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an unheld lock names no one (and a store's bytes repeat)
    finally:
        os.close(fd)  # releases the flock
