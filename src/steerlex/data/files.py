"""Local text files: ``.txt``, ``.jsonl``, ``.json`` and ``.csv``, plus the low-level readers
that the named sets reuse.

Promises: every read or parse failure becomes a :class:`~steerlex.core.errors.SourceError` that
names the file (and the line, where there is one) and says what to fix. Files are read as
UTF-8 (a leading byte-order mark is ignored).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from steerlex.core.errors import SourceError
from steerlex.data.textset import TextItem, TextSet, finish_set, items_from_records, pick_column

FILE_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json", ".csv")
"""File types :func:`load_file` reads (matched case-insensitively)."""


def read_bytes(path: Path) -> bytes:
    """The bytes of ``path``; :class:`SourceError` if it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SourceError(
            f"Cannot read {path}: {reason}. Check that the file exists and that you may read it."
        ) from exc


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` decoded as UTF-8 (BOM dropped); :class:`SourceError` naming the bad byte's line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SourceError(
            f"{where} is not valid UTF-8 (byte {data[exc.start]:#04x} on line {line}). "
            "Re-save the file with UTF-8 encoding."
        ) from exc


def split_lines(text: str) -> list[str]:
    """``text`` split on newlines only (not on the other separators ``str.splitlines`` uses)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def parse_jsonl(text: str, where: str) -> list[tuple[int, object]]:
    """``(line number, value)`` for each non-blank line of a JSON Lines text."""
    records: list[tuple[int, object]] = []
    for lineno, line in enumerate(split_lines(text), 1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise SourceError(
                f"{where}, line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}). "
                "Each line of a .jsonl file must be one JSON value; fix or remove that line."
            ) from exc
    return records


def parse_json(text: str, where: str) -> object:
    """The JSON value in ``text``."""
    try:
        value: object = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). "
            "Fix the file, or use .jsonl for one JSON value per line."
        ) from exc
    return value


def read_csv(text: str, where: str) -> tuple[list[str], list[tuple[int, dict[str | None, object]]]]:
    """The header and ``(row number, row)`` pairs (rows numbered from 1 after the header)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = list(reader.fieldnames or [])
        rows: list[tuple[int, dict[str | None, object]]] = [
            (number, dict(row)) for number, row in enumerate(reader, 1)
        ]
    except csv.Error as exc:
        raise SourceError(
            f"{where}, line {reader.line_num}: not valid CSV ({exc}). "
            "Check the quoting on that line."
        ) from exc
    return header, rows


def load_file(path: Path, *, column: str | None, limit: int | None) -> TextSet:
    """Load a local file as a :class:`TextSet` named after the path.

    * ``.txt``: one text per line, surrounding whitespace stripped; empty lines skipped,
      lines of whitespace only dropped with a warning (as blank texts of the other formats).
    * ``.jsonl``: one JSON string or object per line.
    * ``.json``: a list of strings or a list of objects.
    * ``.csv``: a header row, then one text per row.

    For objects and CSV rows the text comes from ``column`` or, when it is ``None``, the
    first of :data:`~steerlex.data.textset.DEFAULT_COLUMNS` present; the other scalar fields
    go into ``meta``. Ids are ``file:N`` where N is the line number (.txt, .jsonl), the list
    position from 1 (.json) or the data row number from 1 (.csv). The provenance records the
    absolute path and the file's sha256.
    """
    where = str(path)
    if path.is_dir():
        raise SourceError(f"{path} is a directory. Give a .txt, .jsonl, .json or .csv file.")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise SourceError(
            f"Unsupported file type {suffix or '(no extension)'!r} for {path}. Supported: "
            ".txt (one text per line), .jsonl, .json (list of strings or objects), .csv."
        )
    data = read_bytes(path)
    text = decode_utf8(data, where)
    if not text.strip():
        raise SourceError(f"{path} is empty. Put at least one text in it.")

    items: list[TextItem]
    if suffix == ".txt":
        if column is not None:
            raise SourceError(
                f"{path} is a .txt file (one text per line), so column={column!r} does not "
                "apply. Leave column unset, or use .jsonl/.json/.csv for named fields."
            )
        items = [
            TextItem(text=line.strip(), id=f"file:{lineno}", source=where, meta={})
            for lineno, line in enumerate(split_lines(text), 1)
            if line
        ]
    elif suffix == ".jsonl":
        items = items_from_records(
            parse_jsonl(text, where),
            column=column,
            source=where,
            id_prefix="file:",
            where=where,
            unit="line",
        )
    elif suffix == ".json":
        value = parse_json(text, where)
        if not isinstance(value, list):
            raise SourceError(
                f"{path} must hold a JSON list of strings or of objects, but its top level is "
                f'a {type(value).__name__}. Wrap the texts in a list, e.g. ["a", "b"].'
            )
        items = items_from_records(
            list(enumerate(value, 1)),
            column=column,
            source=where,
            id_prefix="file:",
            where=where,
            unit="item",
        )
    else:
        header, rows = read_csv(text, where)
        chosen = pick_column(header, column, where)
        items = items_from_records(
            rows, column=chosen, source=where, id_prefix="file:", where=where, unit="row"
        )

    digest = hashlib.sha256(data).hexdigest()
    provenance = f"local file {path.resolve()} (sha256 {digest})"
    return finish_set(where, items, provenance, limit=limit, where=where)
