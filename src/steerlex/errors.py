"""Errors that name the bad input and say what to do.

Every error a user can cause is a :class:`SteerlexError` (or a subclass); the CLI
prints its message without a traceback.
"""

from __future__ import annotations


class SteerlexError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class ModelSpecError(SteerlexError):
    """A model spec that cannot be resolved or loaded."""


class MissingPackageError(SteerlexError):
    """A pip package that steerlex needs for this operation is not installed."""

    def __init__(self, package: str, install: str, purpose: str) -> None:
        self.package = package
        self.install = install
        super().__init__(
            f"{purpose} needs the pip package '{package}', which is not installed. "
            f"Install it with: {install}"
        )


class IntegrityError(SteerlexError):
    """A file whose hash or structure does not match what was expected."""


class SourceError(SteerlexError):
    """A text or prompt source that cannot be read."""


class StoreError(SteerlexError):
    """An activation store that cannot be written or read as asked."""
