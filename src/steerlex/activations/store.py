"""A sharded on-disk store of residual-stream activations.

Layout of a store directory::

    index.json                 identity, model and layer, shard list with sha256
    texts.jsonl                the harvested texts (id, source, text), in order
    shard_00000.safetensors    activations [n, d], token_ids [n], text_index [n], position [n]
    ...

Shards and the index are written to temporary names and renamed into place, and
a shard counts only once the index lists it, so a killed or disk-full run never
leaves a half-written shard that a reader would use. The index holds no
timestamps: the same inputs give a byte-identical store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from steerlex.core.errors import StoreError
from steerlex.core.io import atomic_path, read_json_object, sha256_file, write_json_atomic
from steerlex.models.cache import cached_sha256

INDEX = "index.json"
TEXTS = "texts.jsonl"
FORMAT = "steerlex-activations"
FORMAT_VERSION = 1
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


@dataclass(frozen=True)
class ShardInfo:
    file: str
    n_tokens: int
    first_text: int
    n_texts: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "n_tokens": self.n_tokens,
            "first_text": self.first_text,
            "n_texts": self.n_texts,
            "sha256": self.sha256,
        }


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write a shard atomically and return its sha256.

    An OSError (disk full, permissions) removes the partial file and becomes a
    StoreError that says finished shards are kept.
    """
    try:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            digest = sha256_file(tmp)
    except OSError as exc:
        raise StoreError(
            f"Writing {path.name} in {path.parent} failed ({exc.strerror or exc}). Free disk "
            "space or choose another output directory; finished shards are kept and a rerun "
            "with the same arguments resumes."
        ) from exc
    return digest


def read_index(directory: Path) -> dict[str, Any] | None:
    """The parsed index of a store directory, or None if it has none."""
    path = directory / INDEX
    if not path.is_file():
        return None
    data = read_json_object(
        path,
        what="activation index",
        fix="rerun `steerlex harvest` into a new --out.",
        error=StoreError,
    )
    if data.get("format") != FORMAT:
        raise StoreError(f"{path} is not a steerlex activation index.")
    return data


def write_index(directory: Path, index: dict[str, Any]) -> None:
    write_json_atomic(directory / INDEX, index)


class ActivationStore:
    """Read access to a finished (or partial, if asked) activation store."""

    def __init__(self, directory: Path, index: dict[str, Any]) -> None:
        self.directory = directory
        self.index = index
        self.shards = [ShardInfo(**s) for s in index["shards"]]

    @classmethod
    def open(cls, directory: str | Path, *, allow_incomplete: bool = False) -> ActivationStore:
        """Open the store in ``directory``; refuse an unfinished one unless allowed."""
        path = Path(directory)
        index = read_index(path)
        if index is None:
            raise StoreError(
                f"No activation store in {path} (no {INDEX}); run `steerlex harvest --out {path}` first."
            )
        if not index["complete"] and not allow_incomplete:
            done, total = len(index["shards"]), index["n_shards"]
            raise StoreError(
                f"The activation store in {path} is unfinished ({done} of {total} shards); "
                "rerun the same `steerlex harvest` command to resume it."
            )
        return cls(path, index)

    @property
    def d_model(self) -> int:
        return int(self.index["d_model"])

    @property
    def layer(self) -> int:
        return int(self.index["model"]["layer"])

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.index["dtype"]]

    def texts(self) -> list[dict[str, str]]:
        """The harvested texts in order: dicts with id, source and text."""
        with (self.directory / TEXTS).open() as f:
            return [json.loads(line) for line in f]

    def load_shard(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of shard ``i``: activations, token_ids, text_index, position."""
        info = self.shards[i]
        path = self.directory / info.file
        try:
            return load_file(str(path))
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise StoreError(
                f"Shard {path} is missing or damaged ({exc}); run `steerlex harvest` with the "
                "same arguments to rebuild it."
            ) from exc

    def verify(self) -> list[str]:
        """Files whose sha256 does not match the index (empty when all are sound).

        Each file is hashed once: the digest is memoised by path, size and mtime in the
        steerlex cache (:func:`~steerlex.models.cache.cached_sha256`), so checking an
        unchanged store again costs one ``stat`` per shard."""
        bad = []
        for info in self.shards:
            path = self.directory / info.file
            if not path.is_file() or cached_sha256(path) != info.sha256:
                bad.append(info.file)
        return bad

    def require_intact(self) -> None:
        """Raise :class:`StoreError` naming every missing or changed shard (see
        :meth:`verify`) and how to rebuild them."""
        bad = self.verify()
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise StoreError(
                f"The activation store {self.directory} is damaged: {shown} "
                f"{'is' if len(bad) == 1 else 'are'} missing or no longer match the sha256 in "
                f"{INDEX}. Rebuild {'it' if len(bad) == 1 else 'them'} by rerunning the same "
                "`steerlex harvest` command (finished, sound shards are kept), or pass "
                "--no-verify to use the store as it is."
            )

    def iter_shards(
        self, max_tokens: int | None = None
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(offset, tensors)`` of each shard in order, where ``offset`` is the store index of
        its first token; stops after the first ``max_tokens`` tokens (the last shard cut)."""
        limit = self.n_tokens if max_tokens is None else min(max_tokens, self.n_tokens)
        offset = 0
        for i in range(len(self.shards)):
            if offset >= limit:
                return
            tensors = self.load_shard(i)
            n = min(int(tensors["activations"].shape[0]), limit - offset)
            yield offset, {k: v[:n] for k, v in tensors.items()}
            offset += n

    def activations(self, max_tokens: int | None = None) -> torch.Tensor:
        """All activations (or the first ``max_tokens``) as one [n, d] tensor."""
        parts: list[torch.Tensor] = []
        total = 0
        for i in range(len(self.shards)):
            acts = self.load_shard(i)["activations"]
            parts.append(acts)
            total += acts.shape[0]
            if max_tokens is not None and total >= max_tokens:
                break
        if not parts:
            return torch.empty(0, self.d_model, dtype=self.dtype)
        out = torch.cat(parts)
        return out if max_tokens is None else out[:max_tokens]

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        shards_in_memory: int = 4,
        drop_last: bool = False,
        dtype: torch.dtype | None = None,
        shards: Sequence[int] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield [batch_size, d] activation batches covering the store (or ``shards``) once.

        With ``shuffle`` the shard order is permuted and tokens are mixed within a
        window of ``shards_in_memory`` shards, so memory stays bounded while
        neighbouring tokens of one text are spread apart. The order is a pure
        function of ``seed``. The last batch may be short unless ``drop_last``.
        """
        if batch_size < 1:
            raise StoreError(f"batch_size must be at least 1, got {batch_size}.")
        chosen = list(range(len(self.shards))) if shards is None else list(shards)
        gen = torch.Generator().manual_seed(seed)
        order = (
            [chosen[i] for i in torch.randperm(len(chosen), generator=gen).tolist()]
            if shuffle
            else chosen
        )
        carry = torch.empty(0, self.d_model, dtype=dtype or self.dtype)
        for start in range(0, len(order), max(1, shards_in_memory)):
            window = [
                self.load_shard(i)["activations"] for i in order[start : start + shards_in_memory]
            ]
            block = torch.cat(window)
            if dtype is not None:
                block = block.to(dtype)
            if shuffle:
                block = block[torch.randperm(block.shape[0], generator=gen)]
            block = torch.cat([carry, block])
            n_full = block.shape[0] // batch_size
            for b in range(n_full):
                yield block[b * batch_size : (b + 1) * batch_size]
            carry = block[n_full * batch_size :]
        if carry.shape[0] and not drop_last:
            yield carry

    def summary(self) -> dict[str, Any]:
        """Counts and sizes for printing."""
        size = sum((self.directory / s.file).stat().st_size for s in self.shards)
        return {
            "directory": str(self.directory),
            "model": self.index["model"]["spec"],
            "layer": self.layer,
            "hook_name": self.index["model"]["hook_name"],
            "d_model": self.d_model,
            "dtype": self.index["dtype"],
            "n_texts": self.index["n_texts"],
            "n_tokens": self.n_tokens,
            "n_shards": len(self.shards),
            "bytes": size,
            "complete": self.index["complete"],
        }


def create_store(
    directory: str | Path,
    shards: Sequence[torch.Tensor],
    *,
    model_spec: str = "unknown",
    weights_id: str = "unknown",
    layer: int = 0,
    hook_name: str = "unknown",
    dtype: str = "float32",
) -> ActivationStore:
    """Write activations you already have (one ``[n_i, d]`` tensor per shard) as a store.

    For bringing your own activations and for tests. Token ids and positions are
    unknown (-1); texts.jsonl is empty.
    """
    path = Path(directory)
    if path.exists() and any(path.iterdir()):
        raise StoreError(f"{path} is not empty; choose a new directory for the store.")
    if not shards:
        raise StoreError("create_store needs at least one shard.")
    d = shards[0].shape[-1]
    if any(s.ndim != 2 or s.shape[1] != d for s in shards):
        raise StoreError(
            f"Every shard must be a [n, {d}] tensor; got {[tuple(s.shape) for s in shards]}."
        )
    if dtype not in STORAGE_DTYPES:
        raise StoreError(
            f"Unknown storage dtype '{dtype}'; use one of {', '.join(STORAGE_DTYPES)}."
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / TEXTS).write_text("")
    infos = []
    for i, acts in enumerate(shards):
        n = acts.shape[0]
        minus = torch.full((n,), -1, dtype=torch.int32)
        tensors = {
            "activations": acts.to(STORAGE_DTYPES[dtype]),
            "token_ids": minus,
            "text_index": minus.clone(),
            "position": minus.clone(),
        }
        digest = write_shard(path / shard_name(i), tensors)
        infos.append(ShardInfo(shard_name(i), n, 0, 0, digest).to_json())
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": {
            "model_spec": model_spec,
            "weights_id": weights_id,
            "layer": layer,
            "source": "create_store",
        },
        "model": {
            "spec": model_spec,
            "weights_id": weights_id,
            "architecture": "unknown",
            "layer": layer,
            "hook_name": hook_name,
        },
        "d_model": d,
        "dtype": dtype,
        "n_texts": 0,
        "n_shards": len(shards),
        "shards": infos,
        "n_tokens": sum(s.shape[0] for s in shards),
        "complete": True,
    }
    write_index(path, index)
    return ActivationStore.open(path)
