"""The harvest job: texts from named sets or files -> layer-L activations in a store."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlex.activations.harvest import HarvestOptions, harvest
from steerlex.activations.stats import activation_stats
from steerlex.activations.store import ActivationStore
from steerlex.core.config import narrow, option
from steerlex.core.errors import StoreError
from steerlex.core.paths import check_output_dir
from steerlex.data.sources import load_texts
from steerlex.data.split import SPLITS, Split, select_split
from steerlex.jobs.context import RunContext
from steerlex.models.embedded import DEFAULT_MODEL
from steerlex.models.hooks import check_layer
from steerlex.models.loading import DTYPES

__all__ = ["HarvestConfig", "HarvestResult", "harvest_job"]


@dataclass(frozen=True)
class HarvestConfig(HarvestOptions):
    """``steerlex harvest``: which texts, which model, where (plus :class:`HarvestOptions`:
    layer, chat formatting, positions kept, lengths, shard size, storage dtype)."""

    model: str = option(DEFAULT_MODEL, help="model spec")
    sources: list[str] = option(
        factory=list,
        flag="source",
        repeat=True,
        required=True,
        help="named set (see `steerlex sources`), a local file, or hf:DATASET[:CONFIG]:SPLIT; "
        "repeatable",
    )
    column: str | None = option(
        None, help="column/field holding the text in csv/jsonl/json/hf sources"
    )
    split: Split = option(
        "all",
        choices=SPLITS,
        help="keep only the train or held-out part of the texts (fixed by a hash of each text id)",
    )
    heldout_fraction: float = option(0.1, help="share of texts in the held-out part")
    limit: int | None = option(None, help="use at most the first N texts of each source")
    out: str | None = option(
        None, required=True, help="store directory (created; resumed if it holds the same run)"
    )
    model_dtype: str = option("float32", choices=tuple(DTYPES), help="model dtype")
    device: str = option(
        "cpu", help="torch device, e.g. cpu, cuda, cuda:1, or auto to spread the model over GPUs"
    )

    def validate(self) -> None:
        super().validate()
        if not self.sources:
            raise StoreError("No text source given; pass --source NAME_OR_FILE (repeatable).")
        if not self.out:
            raise StoreError("No store directory given; pass --out DIR.")
        check_output_dir(self.out, "--out", StoreError)
        if not 0 < self.heldout_fraction < 1:
            raise StoreError(
                f"heldout_fraction must be between 0 and 1, got {self.heldout_fraction}."
            )
        if self.limit is not None and self.limit < 1:
            raise StoreError(f"limit must be at least 1, got {self.limit}.")


@dataclass(frozen=True)
class HarvestResult:
    """The store written, the job's seconds (model load excluded) and its summary
    (counts, sizes, token-norm statistics)."""

    store: ActivationStore
    seconds: float
    summary: dict[str, Any]


def harvest_job(cfg: HarvestConfig, ctx: RunContext) -> HarvestResult:
    """Harvest ``cfg``'s texts into ``cfg.out`` (resuming a store of the same run)."""
    cfg.validate()
    items: list[Any] = []
    for spec in cfg.sources:
        text_set = load_texts(spec, column=cfg.column, limit=cfg.limit)
        ctx.say(f"source {text_set.name}: {len(text_set)} texts ({text_set.provenance})")
        items.extend(text_set.items)
    if cfg.split != "all":
        items = select_split(items, cfg.split, cfg.heldout_fraction)
        ctx.say(
            f"split {cfg.split} (held-out fraction {cfg.heldout_fraction}, by text id): "
            f"{len(items)} texts"
        )
    t0 = time.perf_counter()
    loaded = ctx.model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    check_layer(loaded.model, cfg.layer)
    ctx.say(f"model {loaded.spec} ready in {time.perf_counter() - t0:.1f}s ({loaded.source})")
    t1 = time.perf_counter()
    assert cfg.out is not None
    store = harvest(
        loaded, items, Path(cfg.out), narrow(cfg, HarvestOptions), progress=ctx.progress
    )
    seconds = time.perf_counter() - t1
    summary = store.summary()
    summary["seconds"] = round(seconds, 1)
    summary.update(activation_stats(store))
    return HarvestResult(store, seconds, summary)
