"""One entry point for every text source: :func:`load_texts`.

A spec is, in this order of precedence:

1. a named set (see :func:`~steerlex.data.named.named_sets`), e.g. ``"harmbench"``;
2. ``hf:DATASET[:CONFIG]:SPLIT``, a Hugging Face dataset (needs ``pip install datasets``
   and network access; honours ``HF_HUB_OFFLINE=1``);
3. a path to a local ``.txt``, ``.jsonl``, ``.json`` or ``.csv`` file.
"""

from __future__ import annotations

import difflib
import importlib
import os
from importlib.util import find_spec
from pathlib import Path

from steerlex.core.errors import MissingPackageError, SourceError
from steerlex.data.files import FILE_SUFFIXES, load_file
from steerlex.data.named import NAMED_SET_NAMES, load_named
from steerlex.data.textset import TextSet, finish_set, items_from_records, pick_column
from steerlex.hub import hub_unreachable_reason, offline_vars

HF_PREFIX = "hf:"
_SYNTAX = (
    "a path to a .txt (one text per line), .jsonl, .json or .csv file, or "
    "hf:DATASET[:CONFIG]:SPLIT for a Hugging Face dataset (needs network and "
    "`pip install datasets`)"
)


def load_texts(spec: str, *, column: str | None = None, limit: int | None = None) -> TextSet:
    """Load the texts named by ``spec`` (see the module docstring for the forms).

    ``column`` picks the text field of ``.jsonl``/``.json`` objects, ``.csv`` rows and
    ``hf:`` datasets; by default the first of ``text``, ``prompt``, ``goal``, ``Behavior``,
    ``question`` that exists. ``limit`` keeps the first ``limit`` non-empty items, in source
    order. The result is never empty.

    Raises :class:`SourceError` for a spec, file, column or limit that cannot be used (the
    message names it and says what to do), and :class:`MissingPackageError` when the package
    holding a named set, or ``datasets`` for ``hf:``, is not installed.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SourceError(f"limit must be a positive integer or None, got {limit!r}.")
    if isinstance(spec, os.PathLike):
        spec = str(os.fspath(spec))
    if not isinstance(spec, str) or not spec.strip():
        problem = "Empty" if isinstance(spec, str) else f"{type(spec).__name__} as"
        raise SourceError(
            f"{problem} text source {spec!r}. Give a named set "
            f"({', '.join(NAMED_SET_NAMES)}) or {_SYNTAX}."
        )
    if spec in NAMED_SET_NAMES:
        if column is not None:
            raise SourceError(
                f"The named set '{spec}' has a fixed text field, so column={column!r} does "
                "not apply. Leave column unset."
            )
        return load_named(spec, limit=limit)
    if spec.startswith(HF_PREFIX):
        return _load_hf(spec, column=column, limit=limit)
    path = Path(spec).expanduser()
    if _exists(path):
        return load_file(path, column=column, limit=limit)
    if path.suffix.lower() in FILE_SUFFIXES or os.sep in spec or "/" in spec:
        raise SourceError(
            f"No file at {spec!r} (looked for {path.absolute()}). Check the path, or use a "
            f"named set ({', '.join(NAMED_SET_NAMES)}) or hf:DATASET[:CONFIG]:SPLIT."
        )
    close = difflib.get_close_matches(spec, NAMED_SET_NAMES, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise SourceError(
        f"Unknown text source {spec!r}: not a named set and not an existing file.{hint} "
        f"Named sets: {', '.join(NAMED_SET_NAMES)}. Or give {_SYNTAX}."
    )


def _exists(path: Path) -> bool:
    """``path.exists()``, but ``False`` for names the OS rejects (too long, NUL byte)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _parse_hf(spec: str) -> tuple[str, str | None, str]:
    """``(dataset, config, split)`` from ``hf:DATASET[:CONFIG]:SPLIT``; SPLIT may end in a
    slice such as ``train[:200]``."""
    head, bracket, tail = spec[len(HF_PREFIX) :].partition("[")
    parts = head.split(":")
    parts[-1] += bracket + tail
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise SourceError(
            f"Bad Hugging Face spec {spec!r}: expected hf:DATASET:SPLIT or "
            "hf:DATASET:CONFIG:SPLIT, e.g. hf:tatsu-lab/alpaca:train."
        )
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def _load_hf(spec: str, *, column: str | None, limit: int | None) -> TextSet:
    """Load ``hf:DATASET[:CONFIG]:SPLIT`` with the ``datasets`` package.

    Offline variables set: ``datasets`` is asked anyway and serves cached datasets only.
    Otherwise a TCP check of the hub (3 s at most) runs first, so an unreachable hub fails
    at once instead of after the client's retries.
    """
    dataset_id, config, split = _parse_hf(spec)
    if find_spec("datasets") is None:
        raise MissingPackageError(
            "datasets", "pip install datasets", f"Loading '{spec}' from the Hugging Face hub"
        )
    fallback = f"Use a named set ({', '.join(NAMED_SET_NAMES)}) or a local file instead."
    offline = offline_vars()
    if not offline:
        reason = hub_unreachable_reason()
        if reason is not None:
            raise SourceError(
                f"Cannot load Hugging Face dataset '{dataset_id}': {reason}. If you downloaded "
                f"it before, set HF_HUB_OFFLINE=1 to load it from the cache. {fallback}"
            )
    try:
        datasets = importlib.import_module("datasets")
        dataset = datasets.load_dataset(dataset_id, config, split=split)
        columns = [str(c) for c in dataset.column_names]
        rows = [(index, dict(row)) for index, row in enumerate(dataset)]
    except Exception as exc:  # library boundary: hub, network and format errors vary widely
        note = f" ({' and '.join(offline)} is set, so only cached datasets load)" if offline else ""
        raise SourceError(
            f"Could not load Hugging Face dataset '{dataset_id}' (config {config}, split "
            f"{split!r}){note}: {type(exc).__name__}: {exc}. {fallback}"
        ) from exc
    where = f"Hugging Face dataset '{dataset_id}' split {split!r}"
    chosen = pick_column(columns, column, where)
    items = items_from_records(
        rows,
        column=chosen,
        source=spec,
        id_prefix=f"{dataset_id}:{split}:",
        where=where,
        unit="row",
    )
    version = getattr(datasets, "__version__", "unknown-version")
    provenance = (
        f"Hugging Face dataset {dataset_id} (config {config}, split {split}, column {chosen!r}) "
        f"loaded with datasets=={version}; licence and citation: see "
        f"https://huggingface.co/datasets/{dataset_id}"
    )
    return finish_set(spec, items, provenance, limit=limit, where=where)
