"""The evaluation cache: finished generations (and KL values), one JSON line each.

- **Key.** ``sha256`` of the model's weights id, the record kind, the exact prompt text, the
  defence's parameters (:attr:`~steerlex.evaluate.defences.Condition.key`, not its display name)
  and the generation settings. A rerun, or a run with one more defence, only computes what is new.
- **Resumable.** Records are appended and fsynced after every batch; a run killed mid-batch loses
  that batch only. A torn last line (a kill mid-write) is skipped with a warning and the next
  append starts on a fresh line.
- **One model.** Every line records its model. Lines of another model are ignored with one
  warning, never used, even if their key matched.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["CacheWarning", "EvalCache", "cache_key"]


class CacheWarning(UserWarning):
    """Cache lines that were ignored (another model's, or unreadable)."""


def cache_key(model_id: str, kind: str, payload: Mapping[str, Any]) -> str:
    """The hex sha256 of ``(model_id, kind, payload)`` (payload as sorted-key JSON)."""
    blob = json.dumps(
        {"model": model_id, "kind": kind, **payload}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class EvalCache:
    """An append-only JSONL cache at ``path`` for the model ``model_id``.

    ``get(key)`` gives the record stored under ``key`` (or ``None``); ``put_many`` appends records
    (each a dict with at least ``key``) and fsyncs. Counts of hits, other-model and bad lines are
    kept for the run summary.
    """

    def __init__(self, path: str | Path, model_id: str) -> None:
        self.path = Path(path)
        self.model_id = model_id
        self.records: dict[str, dict[str, Any]] = {}
        self.other_models: dict[str, int] = {}
        self.bad_lines = 0
        self.hits = 0
        self.written = 0
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            data = f.read()
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                self.bad_lines += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                self.bad_lines += 1
                continue
            model = rec.get("model")
            if model != self.model_id:
                name = str(model)
                self.other_models[name] = self.other_models.get(name, 0) + 1
                continue
            self.records[rec["key"]] = rec
        if self.other_models:
            listed = ", ".join(f"{m} ({n})" for m, n in sorted(self.other_models.items()))
            warnings.warn(
                f"{sum(self.other_models.values())} cached record(s) in {self.path} were written "
                f"by another model: {listed}; they are ignored (this run uses {self.model_id}).",
                CacheWarning,
                stacklevel=3,
            )
        if self.bad_lines:
            warnings.warn(
                f"{self.bad_lines} unreadable line(s) in {self.path} (a killed run?) are ignored.",
                CacheWarning,
                stacklevel=3,
            )

    def get(self, key: str) -> dict[str, Any] | None:
        rec = self.records.get(key)
        if rec is not None:
            self.hits += 1
        return rec

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def put_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append ``records`` (each stamped with this cache's model) and fsync."""
        lines = []
        for rec in records:
            full = {**rec, "model": self.model_id}
            self.records[str(full["key"])] = full
            lines.append(json.dumps(full, ensure_ascii=False, sort_keys=True))
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            if f.tell() > 0 and not self._ends_with_newline():
                f.write(b"\n")  # a torn last line from a killed run stays a line of its own
            f.write(("\n".join(lines) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.written += len(lines)

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
