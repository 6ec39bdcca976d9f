"""Harvest layer-L residual activations of many texts into an ActivationStore.

Texts are tokenized (chat-formatted for chat models), grouped into shards of a
fixed number of texts, and run in padded batches through the model up to layer
L only. Pad tokens are never stored, and the ``keep`` rule can leave out BOS and
chat-template positions (whose huge activations would dominate an SAE). Each
shard is a pure function of the inputs, so rerunning after an interruption skips
finished shards and yields a byte-identical store.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import transformers
from tqdm.auto import tqdm

import steerlex
from steerlex.activations.store import (
    FORMAT,
    FORMAT_VERSION,
    STORAGE_DTYPES,
    TEXTS,
    ActivationStore,
    ShardInfo,
    read_index,
    shard_name,
    write_index,
    write_shard,
)
from steerlex.core.config import option
from steerlex.core.errors import StoreError
from steerlex.core.io import LOCK_NAME, dir_lock, sha256_file, write_bytes_atomic
from steerlex.models.chat import KEEP_CHOICES, EncodedPrompt, Keep, encode_prompt, has_chat_template
from steerlex.models.hooks import check_layer, forward_to_layer, hook_name, residual_width
from steerlex.models.loading import LoadedModel


class HasText(Protocol):
    @property
    def text(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def source(self) -> str: ...


@dataclass(frozen=True)
class HarvestOptions:
    """How to harvest. Every field is part of the store's identity (see ``identity``)."""

    layer: int = option(help="decoder layer L (0-based); its output is stored", required=True)
    chat: bool | None = option(
        None, help="wrap texts in the chat template (default: when the tokenizer has one)"
    )
    system_prompt: str | None = option(
        None, help="system prompt for chat formatting (default: the template's own)"
    )
    keep: Keep = option(
        "no-prefix",
        choices=KEEP_CHOICES,
        help="positions to store: all; no-bos; no-prefix (drop BOS, system prompt and role "
        "header); content (only the user's text)",
    )
    max_length: int = option(512, help="truncate texts to this many tokens")
    batch_size: int = option(8, help="texts per forward pass")
    texts_per_shard: int = option(256, help="texts per shard file")
    dtype: str = option("float32", choices=tuple(STORAGE_DTYPES), help="storage dtype")

    def validate(self) -> None:
        if self.keep not in KEEP_CHOICES:
            raise StoreError(
                f"Unknown keep rule '{self.keep}'; use one of {', '.join(KEEP_CHOICES)}."
            )
        if self.dtype not in STORAGE_DTYPES:
            raise StoreError(
                f"Unknown storage dtype '{self.dtype}'; use one of {', '.join(STORAGE_DTYPES)}."
            )
        for name in ("max_length", "batch_size", "texts_per_shard"):
            if getattr(self, name) < 1:
                raise StoreError(f"{name} must be at least 1, got {getattr(self, name)}.")


def texts_digest(texts: Sequence[HasText]) -> str:
    """sha256 over the ordered texts (ids and contents)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.id.encode() + b"\0" + t.text.encode() + b"\0")
    return h.hexdigest()


def _identity(
    loaded: LoadedModel,
    texts: Sequence[HasText],
    options: HarvestOptions,
    layer: int,
    chat: bool,
) -> dict[str, Any]:
    """The store's identity: model, weights, model dtype, layer, text digest and every option
    (``chat`` resolved); a store is resumed only by a harvest with the same identity."""
    model_dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    return {
        "model_spec": loaded.spec,
        "weights_id": loaded.weights_id,
        "model_dtype": model_dtype,
        "layer": layer,
        "texts_sha256": texts_digest(texts),
        "n_texts": len(texts),
        **{k: v for k, v in asdict(options).items() if k != "layer"},
        "chat": chat,
    }


def _encode_texts(
    tokenizer: Any, texts: Sequence[HasText], options: HarvestOptions, chat: bool
) -> tuple[list[EncodedPrompt], list[list[int]]]:
    """Each text tokenized (:func:`encode_prompt`) and its kept positions under ``options.keep``."""
    encoded = [
        encode_prompt(
            tokenizer,
            t.text,
            chat=chat,
            system_prompt=options.system_prompt,
            max_length=options.max_length,
        )
        for t in texts
    ]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    keep = [e.keep_positions(options.keep, special) for e in encoded]
    return encoded, keep


def _write_texts(out_dir: Path, texts: Sequence[HasText]) -> None:
    """Write ``texts.jsonl`` (id, source, text per line), unless it already holds those bytes."""
    texts_blob = "".join(
        json.dumps({"id": t.id, "source": t.source, "text": t.text}, ensure_ascii=False) + "\n"
        for t in texts
    ).encode()
    if not (out_dir / TEXTS).is_file() or (out_dir / TEXTS).read_bytes() != texts_blob:
        write_bytes_atomic(out_dir / TEXTS, texts_blob)


def _new_index(
    loaded: LoadedModel,
    layer: int,
    options: HarvestOptions,
    identity: dict[str, Any],
    n_texts: int,
    n_shards: int,
    done: dict[int, ShardInfo],
) -> dict[str, Any]:
    """The store index (``complete: False``) listing the finished shards ``done``."""
    model = loaded.model
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": identity,
        "model": {
            "spec": loaded.spec,
            "weights_id": loaded.weights_id,
            "architecture": type(model).__name__,
            "layer": layer,
            "hook_name": hook_name(model, layer),
            "layer_convention": "output of decoder block L (0-based) = hidden_states[L + 1]",
        },
        "d_model": residual_width(model),
        "dtype": options.dtype,
        "n_texts": n_texts,
        "n_shards": n_shards,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "steerlex_version": steerlex.__version__,
        "shards": [done[i].to_json() for i in sorted(done)],
        "n_tokens": sum(s.n_tokens for s in done.values()),
        "complete": False,
    }


def _shard_texts(i: int, n_texts: int, texts_per_shard: int) -> tuple[int, int]:
    """Text range ``[lo, hi)`` of shard ``i``."""
    return i * texts_per_shard, min(n_texts, (i + 1) * texts_per_shard)


def _write_shards(
    loaded: LoadedModel,
    layer: int,
    options: HarvestOptions,
    encoded: Sequence[EncodedPrompt],
    keep: Sequence[list[int]],
    out_dir: Path,
    index: dict[str, Any],
    done: dict[int, ShardInfo],
    *,
    progress: bool,
    on_shard: Callable[[int], None] | None,
) -> None:
    """Harvest and write every shard not in ``done``, in order; after each, add it to ``done``
    and rewrite the index, then call ``on_shard(i)``."""
    n_texts, per = len(encoded), options.texts_per_shard
    n_shards = index["n_shards"]
    per_shard_tokens = []
    for i in range(n_shards):
        lo, hi = _shard_texts(i, n_texts, per)
        per_shard_tokens.append(sum(len(keep[j]) for j in range(lo, hi)))
    bar = tqdm(
        total=sum(per_shard_tokens),
        initial=sum(per_shard_tokens[i] for i in done),
        unit="tok",
        unit_scale=True,
        desc=f"harvest layer {layer}",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    storage = STORAGE_DTYPES[options.dtype]
    try:
        for i in range(n_shards):
            if i in done:
                continue
            lo, hi = _shard_texts(i, n_texts, per)
            tensors = _harvest_shard(
                loaded.model,
                layer,
                encoded[lo:hi],
                keep[lo:hi],
                lo,
                options.batch_size,
                storage,
                bar,
            )
            digest = write_shard(out_dir / shard_name(i), tensors)
            done[i] = ShardInfo(
                shard_name(i), int(tensors["token_ids"].shape[0]), lo, hi - lo, digest
            )
            index["shards"] = [done[k].to_json() for k in sorted(done)]
            index["n_tokens"] = sum(s.n_tokens for s in done.values())
            write_index(out_dir, index)
            if on_shard is not None:
                on_shard(i)
    finally:
        bar.close()


def harvest(
    loaded: LoadedModel,
    texts: Sequence[HasText],
    out: str | Path,
    options: HarvestOptions,
    *,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> ActivationStore:
    """Harvest layer ``options.layer`` activations of ``texts`` into the store at ``out``.

    Resumes a store with the same identity; refuses one made with another model,
    layer, text set or options. ``on_shard(i)`` is called after shard ``i`` is
    durably written (tests use it to simulate a kill).
    """
    options.validate()
    layer = check_layer(loaded.model, options.layer)
    if not texts:
        raise StoreError("No texts to harvest: the sources gave an empty list.")
    chat = has_chat_template(loaded.tokenizer) if options.chat is None else options.chat
    out_dir = Path(out)
    identity = _identity(loaded, texts, options, layer, chat)
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(
            f"The output path {out_dir} exists and is not a directory; choose another --out."
        )
    with dir_lock(out_dir, what="activation store", error=StoreError):
        return _harvest_locked(
            loaded, texts, out_dir, options, layer, chat, identity, progress, on_shard
        )


def _harvest_locked(
    loaded: LoadedModel,
    texts: Sequence[HasText],
    out_dir: Path,
    options: HarvestOptions,
    layer: int,
    chat: bool,
    identity: dict[str, Any],
    progress: bool,
    on_shard: Callable[[int], None] | None,
) -> ActivationStore:
    """:func:`harvest` once ``out_dir`` is locked: the folder check, then the work."""
    existing = _check_out_dir(out_dir, identity)
    encoded, keep = _encode_texts(loaded.tokenizer, texts, options, chat)
    _write_texts(out_dir, texts)
    n_shards = -(-len(texts) // options.texts_per_shard)
    done = _finished_shards(out_dir, existing)
    index = _new_index(loaded, layer, options, identity, len(texts), n_shards, done)
    write_index(out_dir, index)
    _write_shards(
        loaded,
        layer,
        options,
        encoded,
        keep,
        out_dir,
        index,
        done,
        progress=progress,
        on_shard=on_shard,
    )
    index["complete"] = True
    write_index(out_dir, index)
    return ActivationStore.open(out_dir)


def _check_out_dir(out_dir: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Return the existing index if it matches ``identity``; refuse to mix otherwise."""
    index = read_index(out_dir)
    if index is None:
        if any(p.name != LOCK_NAME for p in out_dir.iterdir()):
            raise StoreError(
                f"The output directory {out_dir} is not empty and holds no activation store; "
                "choose an empty or new directory for --out."
            )
        return None
    old = index.get("identity", {})
    diffs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
    if diffs:
        detail = "; ".join(
            f"{k}: store has {old.get(k)!r}, this run {identity.get(k)!r}" for k in diffs
        )
        raise StoreError(
            f"The output directory {out_dir} holds a store made differently ({detail}). "
            "Refusing to mix them: choose another --out, or delete the old store first."
        )
    return index


def _finished_shards(out_dir: Path, index: dict[str, Any] | None) -> dict[int, ShardInfo]:
    """Shards listed in the index whose files exist with the recorded hash."""
    if index is None:
        return {}
    done: dict[int, ShardInfo] = {}
    for entry in index.get("shards", []):
        info = ShardInfo(**entry)
        path = out_dir / info.file
        if path.is_file() and sha256_file(path) == info.sha256:
            done[int(info.file.removeprefix("shard_").removesuffix(".safetensors"))] = info
    # Orphans of an interrupted write (temp files) are never read; remove them.
    for tmp in out_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    return done


def _harvest_shard(
    model: Any,
    layer: int,
    encoded: Sequence[EncodedPrompt],
    keep: Sequence[list[int]],
    first_text: int,
    batch_size: int,
    storage: torch.dtype,
    bar: tqdm,
) -> dict[str, torch.Tensor]:
    """Activations of one shard's texts, in text order then position order."""
    device = model.get_input_embeddings().weight.device
    # Longest first, ties by index: less padding, and a fixed order so the bytes repeat.
    order = sorted(range(len(encoded)), key=lambda j: (-len(encoded[j].input_ids), j))
    results: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            batch = [j for j in order[b : b + batch_size] if keep[j]]
            if not batch:
                continue
            width = max(len(encoded[j].input_ids) for j in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, j in enumerate(batch):  # right padding: real tokens keep positions 0..n-1
                n = len(encoded[j].input_ids)
                ids[r, :n] = torch.tensor(encoded[j].input_ids)
                mask[r, :n] = 1
            hidden = forward_to_layer(
                model, ids.to(device), attention_mask=mask.to(device), layer=layer
            )
            for r, j in enumerate(batch):
                results[j] = hidden[r, keep[j]].to("cpu", storage)
                bar.update(len(keep[j]))
    d = residual_width(model)
    rows = [j for j in range(len(encoded)) if keep[j]]
    if not rows:
        empty_long = torch.empty(0, dtype=torch.int32)
        return {
            "activations": torch.empty(0, d, dtype=storage),
            "token_ids": empty_long,
            "text_index": empty_long.clone(),
            "position": empty_long.clone(),
        }
    return {
        "activations": torch.cat([results[j] for j in rows]),
        "token_ids": torch.tensor(
            [encoded[j].input_ids[p] for j in rows for p in keep[j]], dtype=torch.int32
        ),
        "text_index": torch.tensor(
            [first_text + j for j in rows for _ in keep[j]], dtype=torch.int32
        ),
        "position": torch.tensor([p for j in rows for p in keep[j]], dtype=torch.int32),
    }
