"""The text containers every source returns, and the record-to-item logic they share.

Promises:

* A :class:`TextSet` returned by a loader is never empty and holds no item whose text is
  empty or whitespace only. Such texts are dropped with a :class:`BlankTextsWarning` that
  says how many (and :attr:`TextSet.dropped` counts them); a source of nothing else is
  refused.
* Item order is the order of the source; ``limit`` keeps a prefix of it.
* ``meta`` values are always strings.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from steerlex.core.errors import SourceError

DEFAULT_COLUMNS: tuple[str, ...] = ("text", "prompt", "goal", "Behavior", "question")
"""Columns tried in this order when a tabular source is loaded without ``column=``."""


class BlankTextsWarning(UserWarning):
    """A source held texts that are empty or whitespace only; they were dropped."""


@dataclass(frozen=True)
class TextItem:
    """One text with a stable id.

    ``id`` is unique within its set and does not change between runs for the same source;
    ``source`` is the set name or the file path; ``meta`` holds string-valued extras such as
    ``{"category": ...}`` (empty when the source has none).
    """

    text: str
    id: str
    source: str
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TextSet:
    """An ordered, named collection of :class:`TextItem` with a human-readable provenance.
    ``dropped``: how many texts of the source were dropped as empty or whitespace only."""

    name: str
    items: tuple[TextItem, ...]
    provenance: str
    dropped: int = 0

    def texts(self) -> list[str]:
        """The item texts, in order."""
        return [item.text for item in self.items]

    def __len__(self) -> int:
        return len(self.items)


def pick_column(columns: Sequence[str], column: str | None, where: str) -> str:
    """Return ``column`` if ``columns`` has it, else the first of :data:`DEFAULT_COLUMNS` present.

    Raises :class:`SourceError` naming ``where`` and listing ``columns`` when neither works.
    """
    shown = ", ".join(repr(c) for c in columns) or "(none)"
    if column is not None:
        if column in columns:
            return column
        raise SourceError(
            f"{where} has no column {column!r}. Available columns: {shown}. "
            "Pass one of them as column=..."
        )
    for candidate in DEFAULT_COLUMNS:
        if candidate in columns:
            return candidate
    defaults = ", ".join(repr(c) for c in DEFAULT_COLUMNS)
    raise SourceError(
        f"{where} has none of the default text columns ({defaults}). "
        f"Available columns: {shown}. Pass the text column as column=..."
    )


def _meta_from(record: Mapping[object, object], skip: str) -> dict[str, str]:
    """String versions of a record's scalar fields other than ``skip``."""
    return {
        key: str(value)
        for key, value in record.items()
        if isinstance(key, str) and key != skip and isinstance(value, (str, int, float, bool))
    }


def items_from_records(
    records: Sequence[tuple[int, object]],
    *,
    column: str | None,
    source: str,
    id_prefix: str,
    where: str,
    unit: str,
) -> list[TextItem]:
    """Turn ``(position, record)`` pairs into items.

    Records must be all strings (then ``column`` must be ``None``) or all mappings (then the
    text comes from :func:`pick_column` applied to the first record's keys, and every other
    scalar field goes into ``meta``). A ``None`` text counts as empty and is dropped later.
    Item ids are ``f"{id_prefix}{position}"``. ``unit`` names a position in messages
    ("line", "item", "row"). Raises :class:`SourceError` naming ``where`` and the position.
    """
    if not records:
        return []
    first = records[0][1]
    if isinstance(first, str):
        if column is not None:
            raise SourceError(
                f"{where} holds plain strings, so column={column!r} does not apply. "
                "Leave column unset, or use objects with named fields."
            )
        items = []
        for pos, record in records:
            if not isinstance(record, str):
                raise SourceError(
                    f"{where}, {unit} {pos}: expected a string like the first {unit}, "
                    f"got {type(record).__name__}. Use only strings or only objects."
                )
            items.append(TextItem(text=record, id=f"{id_prefix}{pos}", source=source, meta={}))
        return items
    if not isinstance(first, Mapping):
        raise SourceError(
            f"{where}, {unit} {records[0][0]}: expected a string or an object, "
            f"got {type(first).__name__}."
        )
    col = pick_column([k for k in first if isinstance(k, str)], column, where)
    items = []
    for pos, record in records:
        if not isinstance(record, Mapping):
            raise SourceError(
                f"{where}, {unit} {pos}: expected an object like the first {unit}, "
                f"got {type(record).__name__}. Use only strings or only objects."
            )
        if col not in record:
            raise SourceError(
                f"{where}, {unit} {pos}: has no field {col!r} (fields: "
                f"{', '.join(repr(k) for k in record if isinstance(k, str))}). "
                "Add it, or choose another column=..."
            )
        value = record[col]
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise SourceError(
                f"{where}, {unit} {pos}: field {col!r} is a {type(value).__name__}, "
                "not a string. Texts must be strings."
            )
        items.append(
            TextItem(
                text=value, id=f"{id_prefix}{pos}", source=source, meta=_meta_from(record, col)
            )
        )
    return items


def finish_set(
    name: str, items: Iterable[TextItem], provenance: str, *, limit: int | None, where: str
) -> TextSet:
    """Drop items with blank text (saying how many, with a :class:`BlankTextsWarning`), keep
    the first ``limit``, and build the :class:`TextSet`.

    Raises :class:`SourceError` naming ``where`` when no non-blank text is left.
    """
    items = list(items)
    kept = tuple(item for item in items if item.text.strip())
    blank = [item.id for item in items if not item.text.strip()]
    if not kept:
        found = f" (all {len(blank)} are empty or whitespace only)" if blank else ""
        raise SourceError(
            f"{where} contains no non-empty texts{found}. Check that the file or column holds "
            "the texts you meant to load."
        )
    if blank:
        shown = ", ".join(blank[:5]) + (", ..." if len(blank) > 5 else "")
        warnings.warn(
            f"{where}: dropped {len(blank)} of {len(items)} texts that are empty or whitespace "
            f"only ({shown}); kept {len(kept)}.",
            BlankTextsWarning,
            stacklevel=2,
        )
    if limit is not None:
        kept = kept[:limit]
    return TextSet(name=name, items=kept, provenance=provenance, dropped=len(blank))
