"""Output paths checked before any work: a directory or file a job will write must be one
it can create (or already write), so a bad ``--out`` fails at once with a message naming
the option, the path and what to do, never with an ``OSError`` traceback after minutes of
work.

:func:`check_output_dir` and :func:`check_output_file` create nothing that stays: they
find the nearest part of the path that exists, refuse a file where a directory must go,
and create (and remove at once) a hidden probe directory there, which is the only test
that holds for root, read-only mounts and pseudo file systems such as ``/proc`` alike.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from steerlex.core.errors import SteerlexError

__all__ = ["check_output_dir", "check_output_file"]

_PROBE_PREFIX = ".steerlex-probe-"


def _probe(directory: Path) -> OSError | None:
    """``None`` when a new directory can be made in ``directory``, else the error."""
    try:
        made = tempfile.mkdtemp(prefix=_PROBE_PREFIX, dir=directory)
    except OSError as exc:
        return exc
    os.rmdir(made)
    return None


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a dangling link counts as existing)."""
    p = path
    while not os.path.lexists(p) and p.parent != p:
        p = p.parent
    return p


def _check_creatable(path: Path, label: str, error: type[SteerlexError], fix: str) -> None:
    """``path`` does not exist: every existing ancestor must be a directory we can write."""
    anc = _nearest_existing(path.absolute())
    if not anc.is_dir():
        kind = "a file" if anc.is_file() else "not a directory"
        raise error(f"{label} {path} cannot be created: {anc} is {kind}; {fix}.")
    exc = _probe(anc)
    if exc is not None:
        raise error(
            f"{label} {path} cannot be created: {anc} accepts no new directories "
            f"({_why(exc)}); {fix}."
        )


def check_output_dir(
    path: str | Path, label: str, error: type[SteerlexError] = SteerlexError
) -> Path:
    """Raise ``error`` unless ``path`` is a directory this process can write, or one it can
    create; returns it as a :class:`Path`. ``label`` names the input in the message
    (``"--out"``, ``"--runs-dir"``, ``"--out (default SAE_DIR/eval)"``)."""
    p = Path(path)
    fix = "pass a directory path you can write (a new or an existing directory)"
    if os.path.lexists(p):
        if not p.is_dir():
            kind = "a file" if p.is_file() else "not a directory"
            raise error(
                f"{label} {p} is {kind}; it must be a directory. Pass another path, or move "
                f"{p} away."
            )
        exc = _probe(p)
        if exc is not None:
            raise error(
                f"{label} {p} is a directory this process cannot write ({_why(exc)}); {fix}."
            )
        return p
    _check_creatable(p, label, error, fix)
    return p


def check_output_file(
    path: str | Path, label: str, error: type[SteerlexError] = SteerlexError
) -> Path:
    """Raise ``error`` unless ``path`` is a file this process can write (a new file in a
    directory it can write or create, or an existing file there; files are replaced by
    rename, so the directory is what must be writable); returns it as a :class:`Path`."""
    p = Path(path)
    fix = "pass a file path in a directory you can write"
    if p.is_dir():
        raise error(f"{label} {p} is a directory; it must be a file path. Pass a file name.")
    parent = p.absolute().parent
    if os.path.lexists(parent):
        if not parent.is_dir():
            raise error(f"{label} {p} cannot be written: {parent} is not a directory; {fix}.")
        exc = _probe(parent)
        if exc is not None:
            raise error(
                f"{label} {p} cannot be written: {parent} accepts no new files ({_why(exc)}); "
                f"{fix}."
            )
        return p
    _check_creatable(p, label, error, fix)
    return p
