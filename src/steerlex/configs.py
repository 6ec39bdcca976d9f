"""Build config dataclasses from plain dicts, refusing unknown keys by name."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

from steerlex.errors import SteerlexError

T = TypeVar("T")


def from_dict_strict(
    cls: type[T], data: dict[str, Any], what: str, error: type[SteerlexError] = SteerlexError
) -> T:
    """``cls(**data)``, but an unknown key raises ``error`` naming it and the known keys."""
    assert is_dataclass(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise error(f"Unknown {what} {unknown}; known: {sorted(names)}.")
    return cls(**data)
