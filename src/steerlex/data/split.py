"""Deterministic train / held-out splits by text id.

Each item goes to the held-out part when ``u(id) < fraction``, where ``u`` is a
uniform number in [0, 1) read from the sha256 of ``salt + id``. The assignment of an
item never depends on which other items are present, so adding texts to a source
does not move existing ones between parts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal, Protocol, TypeVar

from steerlex.core.errors import SourceError

Split = Literal["all", "train", "heldout"]
SPLITS: tuple[Split, ...] = ("all", "train", "heldout")


class HasId(Protocol):
    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=HasId)


def unit_hash(key: str, salt: str = "steerlex") -> float:
    """A number in [0, 1) fixed by ``salt`` and ``key``."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def select_split(
    items: Sequence[T], split: Split, fraction: float, *, salt: str = "steerlex"
) -> list[T]:
    """The items of ``split``, in their order."""
    if split not in SPLITS:
        raise SourceError(f"Unknown split '{split}'; use one of {', '.join(SPLITS)}.")
    if not 0.0 < fraction < 1.0:
        raise SourceError(
            f"The held-out fraction must be between 0 and 1 (exclusive), got {fraction}."
        )
    if split == "all":
        return list(items)
    want_heldout = split == "heldout"
    return [it for it in items if (unit_hash(it.id, salt) < fraction) == want_heldout]
