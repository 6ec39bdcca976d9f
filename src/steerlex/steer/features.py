"""Feature lists: SAE feature ids given as ``3,17,42`` or as a ``selected_*.json`` file.

:func:`parse_feature_list` is what ``--features``/``--harm`` of the steering commands and the
``features``/``harm_features`` keys of an evaluation config go through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from steerlex.core.errors import SteeringError
from steerlex.sae.base import SparseAutoencoder

__all__ = ["FeatureList", "parse_feature_list"]


@dataclass(frozen=True)
class FeatureList:
    """Feature ids from ``--features``/``--harm``, with a short label per id when a file gave one."""

    ids: tuple[int, ...]
    labels: dict[int, str]
    source: str


def parse_feature_list(
    spec: str, *, what: str = "--features", sae: SparseAutoencoder | None = None
) -> FeatureList:
    """Comma-separated ids (``"3,17,42"``) or a ``selected_features.json`` file.

    The file holds ``{"features": [{"id": int, "score": float, "reason": str, ...}, ...]}``
    (written by ``steerlex select``); labels come from each entry's ``words`` or ``reason``. When
    the file records its SAE (``"sae": {"d_sae", "weights_id"}``) and ``sae`` is given, they must
    agree.

    Raises:
        SteeringError: neither a readable file nor a list of integers.
    """
    text = spec.strip()
    path = Path(text).expanduser()
    if path.is_file() or text.endswith(".json"):
        return _read_selection(path, what, sae)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise SteeringError(f"{what} is empty; give ids like 3,17,42 or a selected_features.json.")
    try:
        ids = tuple(int(p) for p in parts)
    except ValueError:
        raise SteeringError(
            f"{what} {spec!r} is neither an existing file nor comma-separated integer ids "
            "(e.g. 3,17,42)."
        ) from None
    return FeatureList(ids, {}, f"{what} {text}")


def _read_selection(path: Path, what: str, sae: SparseAutoencoder | None) -> FeatureList:
    if not path.is_file():
        raise SteeringError(f"{what} file {path} does not exist; run `steerlex select` first.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SteeringError(f"{what} file {path} is not readable JSON ({exc}).") from None
    fix = 'expected {"features": [{"id": 12, "score": 0.9, "reason": "..."}, ...]}'
    feats = data.get("features") if isinstance(data, dict) else None
    if not isinstance(feats, list):
        raise SteeringError(f'{what} file {path} has no "features" list; {fix}.')
    if not feats:
        raise SteeringError(f"{what} file {path} selects no features; choose some first.")
    ids: list[int] = []
    labels: dict[int, str] = {}
    for i, rec in enumerate(feats):
        fid = rec.get("id") if isinstance(rec, dict) else None
        if isinstance(fid, bool) or not isinstance(fid, int):
            raise SteeringError(f'{what} file {path}: entry {i} has no integer "id"; {fix}.')
        ids.append(fid)
        words = rec.get("words")
        if isinstance(words, list) and words:
            labels[fid] = "(" + ", ".join(str(w) for w in words[:4]) + ")"
        elif isinstance(rec.get("reason"), str) and rec["reason"]:
            reason = rec["reason"]
            labels[fid] = "(" + (reason if len(reason) <= 60 else reason[:57] + "...") + ")"
    recorded = data.get("sae")
    if sae is not None and isinstance(recorded, dict):
        d_sae, wid = recorded.get("d_sae"), recorded.get("weights_id")
        if isinstance(d_sae, int) and d_sae != sae.d_sae:
            raise SteeringError(
                f"{what} file {path} was made for an SAE with d_sae={d_sae}, but this SAE has "
                f"d_sae={sae.d_sae}; select features for this SAE."
            )
        if wid and sae.cfg.weights_id and wid != sae.cfg.weights_id:
            raise SteeringError(
                f"{what} file {path} was made for an SAE of model weights {wid}, but this SAE "
                f"belongs to {sae.cfg.weights_id}; select features for this SAE."
            )
    return FeatureList(tuple(ids), labels, f"{what} {path}")
