"""Per-feature statistics of an SAE over an activation store, for the feature browser.

:func:`feature_stats` streams the store once, in batches, through the SAE's encoder and
keeps, per feature (memory bounded by ``d_sae * (top_k + bins)`` numbers, whatever the
store's size):

- ``count`` / ``frequency``: tokens on which the feature is > 0 (and their share);
- ``max``: its largest activation;
- ``hist``: a histogram of its nonzero activations in ``bins`` equal bins over
  ``(0, hist_range]``, bin ``i`` being ``(i * w, (i + 1) * w]`` with ``w = hist_range / bins``.
  ``hist_range`` is the smallest power of two >= ``max`` (so ``max <= hist_range < 2 max``):
  a range fixed in advance is unknown in one pass, and a power-of-two range can grow by
  doubling, merging bin pairs exactly, so streaming gives the same counts as one shot;
- ``contexts``: its ``top_k`` highest-activating tokens (a running ``torch.topk`` merged
  batch by batch), each with the tokens of the same text ``window`` before and after it,
  decoded, and the feature's activation on every one of them (one more encoder pass over
  just those rows), so the browser can highlight them.

:func:`token_decoder` turns a tokenizer into the ``decode`` function (readable strings:
byte-level ``Ġ``/``Ċ`` and SentencePiece ``▁`` become spaces and newlines).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from steerlex.activations.store import ActivationStore
from steerlex.core.errors import ReportError
from steerlex.core.io import read_json_object, write_json_atomic
from steerlex.report.common import FIX
from steerlex.sae.compat import check_sae_fits

__all__ = [
    "STATS_FILE",
    "feature_stats",
    "read_feature_stats",
    "readable_token",
    "token_decoder",
    "write_feature_stats",
]

STATS_FILE = "features.json"
STATS_FORMAT = "steerlex-feature-stats"
STATS_VERSION = 1
_DIGITS = 5  # significant digits kept for activations in the JSON


def _round(value: float) -> float:
    return float(f"{value:.{_DIGITS}g}")


# --------------------------------------------------------------------------- decoding tokens


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode map used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def readable_token(piece: str, style: str = "byte") -> str:
    """A vocabulary entry as the text it stands for.

    ``style``: ``"byte"`` (byte-level BPE: ``Ġ`` space, ``Ċ`` newline, UTF-8 bytes joined;
    an incomplete UTF-8 sequence shows as ``�``), ``"sentencepiece"`` (``▁`` space,
    ``<0x0A>`` byte tokens) or ``"word"`` (a word-level vocabulary: a space before each).
    """
    if style == "byte":
        table = _byte_decoder()
        if piece and all(c in table for c in piece):
            return bytes(table[c] for c in piece).decode("utf-8", errors="replace")
        return piece
    if style == "sentencepiece":
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                code = int(piece[3:5], 16)
            except ValueError:
                return piece
            return chr(code) if code < 128 else "�"
        return piece.replace("▁", " ")
    return " " + piece


def _vocab_style(tokenizer: Any) -> str:
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return "byte"
    if any(t.startswith("Ġ") for t in vocab):
        return "byte"
    if any("▁" in t for t in vocab):
        return "sentencepiece"
    return "word"


def token_decoder(tokenizer: Any) -> Callable[[int], str]:
    """``decode(token_id) -> str`` for :func:`feature_stats`, readable and memoised.

    Special tokens keep their names (``<|im_end|>``); ids the tokenizer does not know show
    as ``<id 123>``.
    """
    style = _vocab_style(tokenizer)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    memo: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id in memo:
            return memo[token_id]
        piece = tokenizer.convert_ids_to_tokens(int(token_id))
        if not isinstance(piece, str):
            text = f"<id {token_id}>"
        elif token_id in specials:
            text = piece
        else:
            text = readable_token(piece, style)
        memo[token_id] = text
        return text

    return decode


# --------------------------------------------------------------------------- the streaming pass


def _ceil_log2(x: Tensor) -> Tensor:
    """Per element of positive ``x``: the smallest integer e with ``2**e >= x`` (exact)."""
    mantissa, exponent = torch.frexp(x.double())  # x = m * 2**e, 0.5 <= m < 1
    return torch.where(mantissa == 0.5, exponent - 1, exponent).long()


@dataclass
class _Accumulator:
    """The running per-feature state of :func:`feature_stats` (all on the SAE's device)."""

    count: Tensor  # [d_sae] tokens > 0
    maximum: Tensor  # [d_sae]
    exponent: Tensor  # [d_sae] histogram range 2**exponent (valid where count > 0)
    hist: Tensor  # [d_sae, bins]
    top_val: Tensor  # [top_k, d_sae]
    top_row: Tensor  # [top_k, d_sae] global store row, -1 = none

    @classmethod
    def empty(cls, d_sae: int, top_k: int, bins: int, device: torch.device) -> _Accumulator:
        return cls(
            count=torch.zeros(d_sae, dtype=torch.long, device=device),
            maximum=torch.zeros(d_sae, dtype=torch.float32, device=device),
            exponent=torch.zeros(d_sae, dtype=torch.long, device=device),
            hist=torch.zeros(d_sae, bins, dtype=torch.long, device=device),
            top_val=torch.zeros(top_k, d_sae, dtype=torch.float32, device=device),
            top_row=torch.full((top_k, d_sae), -1, dtype=torch.long, device=device),
        )

    @property
    def bins(self) -> int:
        return int(self.hist.shape[1])

    def _grow(self, features: Tensor, steps: Tensor) -> None:
        """Double the histogram range of ``features`` ``steps`` times: bin i -> i // 2."""
        cap = self.bins.bit_length()  # after this many doublings everything is in bin 0
        steps = steps.clamp(max=cap)
        h = self.hist[features]
        halve = torch.arange(self.bins, device=h.device) // 2
        for i in range(int(steps.max()) if steps.numel() else 0):
            todo = steps > i
            merged = torch.zeros_like(h[todo]).index_add_(1, halve, h[todo])
            h[todo] = merged
        self.hist[features] = h

    def update(self, f: Tensor, first_row: int) -> None:
        """Add a batch of latents ``f [b, d_sae]`` whose first row is store row ``first_row``."""
        f = f.float()
        positive = f > 0
        batch_max = f.max(dim=0).values
        fresh = (batch_max > 0) & (self.count == 0)
        self.count += positive.sum(dim=0)
        self.maximum = torch.maximum(self.maximum, batch_max)
        need = _ceil_log2(batch_max.clamp_min(torch.finfo(torch.float32).tiny))
        self.exponent = torch.where(fresh, need, self.exponent)
        grow = (batch_max > 0) & ~fresh & (need > self.exponent)
        if bool(grow.any()):
            idx = torch.nonzero(grow).flatten()
            self._grow(idx, need[idx] - self.exponent[idx])
            self.exponent[idx] = need[idx]
        rows, cols = torch.nonzero(positive, as_tuple=True)
        if rows.numel():
            values = f[rows, cols].double() * self.bins
            scaled = torch.ldexp(values, -self.exponent[cols])  # v * bins / 2**e, exact
            bin_index = (torch.ceil(scaled).long() - 1).clamp(0, self.bins - 1)
            flat = self.hist.view(-1)
            flat.index_add_(0, cols * self.bins + bin_index, torch.ones_like(bin_index))
        k = min(self.top_val.shape[0], f.shape[0])
        best = torch.topk(f, k, dim=0)
        values = torch.cat([self.top_val, best.values])
        row_ids = torch.cat([self.top_row, best.indices + first_row])
        keep = torch.topk(values, self.top_val.shape[0], dim=0)
        self.top_val = keep.values
        self.top_row = row_ids.gather(0, keep.indices)


def _check_args(top_k: int, window: int, bins: int, max_tokens: int | None, batch: int) -> None:
    for name, value, low in (("top_k", top_k, 1), ("window", window, 0), ("bins", bins, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ReportError(f"{name} must be an integer >= {low}, got {value!r}.")
    if max_tokens is not None and max_tokens < 1:
        raise ReportError(f"max_tokens must be at least 1 or None, got {max_tokens}.")
    if batch < 1:
        raise ReportError(f"batch_size must be at least 1, got {batch}.")


def _encode(sae: Any, x: Tensor) -> Tensor:
    device = sae.W_enc.device
    return sae.encode(x.to(device)).float()


# --------------------------------------------------------------------------- contexts


@dataclass
class _Entry:
    feature: int
    rank: int
    row: int  # global store row
    value: float


def _runs(text_index: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of a shard: the first row and one past the last row of its text."""
    n = text_index.shape[0]
    change = torch.nonzero(text_index[1:] != text_index[:-1]).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), change])
    ends = torch.cat([change, torch.tensor([n])])
    counts = ends - starts
    return torch.repeat_interleave(starts, counts), torch.repeat_interleave(ends, counts)


def _shard_contexts(
    sae: Any,
    tensors: dict[str, Tensor],
    entries: list[_Entry],
    offset: int,
    limit: int,
    window: int,
    batch_size: int,
) -> dict[tuple[int, int], dict[str, Any]]:
    """The context windows of ``entries`` (all in one shard) keyed by (feature, rank)."""
    ids = tensors["token_ids"].long()
    text_index = tensors["text_index"].long()
    position = tensors["position"].long()
    acts = tensors["activations"]
    start, end = _runs(text_index)
    local = torch.tensor([e.row - offset for e in entries], dtype=torch.long)
    lo = torch.maximum(start[local], local - window)
    hi = torch.minimum(torch.minimum(end[local], local + window + 1), torch.tensor(limit))
    span = torch.arange(-window, window + 1)
    cand = local[:, None] + span[None, :]  # [n_entries, 2w+1]
    valid = (cand >= lo[:, None]) & (cand < hi[:, None])
    feats = torch.tensor([e.feature for e in entries], dtype=torch.long)
    pair_row = cand[valid]
    pair_feat = feats[:, None].expand_as(cand)[valid]
    unique_rows = torch.unique(pair_row)
    where = torch.searchsorted(unique_rows, pair_row)
    pair_val = torch.zeros(pair_row.shape[0], dtype=torch.float32)
    for b in range(0, unique_rows.shape[0], batch_size):
        rows = unique_rows[b : b + batch_size]
        f = _encode(sae, acts[rows]).cpu()
        mine = (where >= b) & (where < b + rows.shape[0])
        pair_val[mine] = f[where[mine] - b, pair_feat[mine]]
    out: dict[tuple[int, int], dict[str, Any]] = {}
    pos = 0
    counts = valid.sum(dim=1).tolist()
    for e, n, first in zip(entries, counts, lo.tolist(), strict=True):
        window_rows = list(range(first, first + n))
        out[(e.feature, e.rank)] = {
            "activation": _round(e.value),
            "row": e.row,
            "text_index": int(text_index[e.row - offset]),
            "position": int(position[e.row - offset]),
            "focus": e.row - offset - first,
            "token_ids": [int(ids[r]) for r in window_rows],
            "acts": [_round(v) for v in pair_val[pos : pos + n].tolist()],
        }
        pos += n
    return out


def _contexts(
    sae: Any,
    store: ActivationStore,
    acc: _Accumulator,
    limit: int,
    window: int,
    batch_size: int,
    decode: Callable[[int], str],
) -> tuple[dict[int, list[dict[str, Any]]], str | None]:
    """Each feature's top contexts, best first; and a note when the store has no tokens."""
    top_val, top_row = acc.top_val.cpu(), acc.top_row.cpu()
    firing = torch.nonzero(top_val > 0)  # [n, 2] of (rank, feature)
    entries = [
        _Entry(int(f), int(r), int(top_row[r, f]), float(top_val[r, f])) for r, f in firing.tolist()
    ]
    offsets = [0]
    for info in store.shards:
        offsets.append(offsets[-1] + info.n_tokens)
    by_shard: dict[int, list[_Entry]] = {}
    for e in entries:
        shard = bisect.bisect_right(offsets, e.row) - 1
        by_shard.setdefault(shard, []).append(e)
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for shard, mine in sorted(by_shard.items()):
        tensors = store.load_shard(shard)
        if bool((tensors["token_ids"] < 0).any()) or bool((tensors["text_index"] < 0).any()):
            return {}, (
                f"The activation store {store.directory} records no token ids (it was written "
                "from bare activations), so there are no contexts to show."
            )
        found.update(
            _shard_contexts(
                sae, tensors, mine, offsets[shard], limit - offsets[shard], window, batch_size
            )
        )
    texts = store.texts()
    result: dict[int, list[dict[str, Any]]] = {}
    for e in sorted(entries, key=lambda e: (e.feature, e.rank)):
        ctx = found[(e.feature, e.rank)]
        ctx["tokens"] = [decode(t) for t in ctx["token_ids"]]
        meta = texts[ctx["text_index"]] if ctx["text_index"] < len(texts) else {}
        ctx["text_id"] = meta.get("id")
        ctx["source"] = meta.get("source")
        result.setdefault(e.feature, []).append(ctx)
    return result, None


# --------------------------------------------------------------------------- public API


def feature_stats(
    sae: Any,
    store: ActivationStore,
    decode: Callable[[int], str],
    *,
    top_k: int = 8,
    window: int = 10,
    bins: int = 20,
    max_tokens: int | None = None,
    batch_size: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Firing frequency, maximum, activation histogram and top contexts of every feature.

    ``sae``: an SAE (``encode``) reading the store's width. ``decode``: token id -> string
    (see :func:`token_decoder`). ``top_k``: contexts per feature. ``window``: tokens of the
    same text kept before and after the activating one. ``bins``: histogram bins (see the
    module docstring for the range). ``max_tokens``: only the first tokens of the store.
    ``batch_size``: rows per encoder call (memory ~ ``batch_size * d_sae`` floats).

    Returns a JSON-ready dict: ``n_tokens``, ``d_sae``, settings, ``store``/``sae``
    provenance, ``contexts_note`` (why there are no contexts, else ``None``) and
    ``features``: one record per feature id ``0..d_sae-1`` with ``id``, ``count``,
    ``frequency``, ``max``, ``hist_range``, ``hist`` and ``contexts`` (each: ``activation``,
    ``text_index``, ``text_id``, ``source``, ``position``, ``row``, ``focus`` (index of the
    activating token), ``token_ids``, ``tokens`` and ``acts``, the feature's activation on
    each token).

    Raises:
        ReportError: bad settings, an SAE of another width, or an empty store.
    """
    _check_args(top_k, window, bins, max_tokens, batch_size)
    d_sae = int(sae.cfg.d_sae)
    check_sae_fits(sae, store=store)
    limit = store.n_tokens if max_tokens is None else min(max_tokens, store.n_tokens)
    if limit == 0:
        raise ReportError(f"The activation store in {store.directory} holds no tokens.")
    acc = _Accumulator.empty(d_sae, top_k, bins, sae.W_enc.device)
    bar = tqdm(total=limit, desc="feature stats", unit="tok", disable=not progress)
    with torch.inference_mode():
        for offset, tensors in store.iter_shards(limit):
            acts = tensors["activations"]
            for b in range(0, int(acts.shape[0]), batch_size):
                x = acts[b : b + batch_size]
                acc.update(_encode(sae, x), offset + b)
                bar.update(int(x.shape[0]))
        contexts, note = _contexts(sae, store, acc, limit, window, batch_size, decode)
    bar.close()
    count = acc.count.cpu().tolist()
    maximum = acc.maximum.cpu().tolist()
    exponent = acc.exponent.cpu().tolist()
    hist = acc.hist.cpu().tolist()
    features = [
        {
            "id": c,
            "count": count[c],
            "frequency": count[c] / limit,
            "max": _round(maximum[c]) if count[c] else 0.0,
            "hist_range": math.ldexp(1.0, exponent[c]) if count[c] else None,
            "hist": hist[c] if count[c] else [],
            "contexts": contexts.get(c, []),
        }
        for c in range(d_sae)
    ]
    model = store.index.get("model", {})
    return {
        "format": STATS_FORMAT,
        "format_version": STATS_VERSION,
        "n_tokens": limit,
        "d_sae": d_sae,
        "top_k": top_k,
        "window": window,
        "bins": bins,
        "store": {
            "directory": str(store.directory),
            "model": model.get("spec"),
            "layer": model.get("layer"),
            "n_tokens": store.n_tokens,
        },
        "sae": {
            "d_sae": d_sae,
            "k": getattr(sae.cfg, "k", None),
            "architecture": getattr(sae.cfg, "architecture", None),
            "model_spec": getattr(sae.cfg, "model_spec", None),
            "layer": getattr(sae.cfg, "layer", None),
        },
        "contexts_note": note,
        "features": features,
    }


def write_feature_stats(path: str | Path, stats: dict[str, Any]) -> Path:
    """Write :func:`feature_stats`' result to ``path`` atomically; returns the path."""
    out = Path(path)
    write_json_atomic(out, stats)
    return out


def read_feature_stats(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`write_feature_stats`.

    Raises:
        ReportError: a missing, malformed or foreign file (the message names it).
    """
    p = Path(path)
    data = read_json_object(p, what="feature statistics", fix=FIX, error=ReportError)
    if data.get("format") != STATS_FORMAT or not isinstance(data.get("features"), list):
        raise ReportError(
            f"{p} is not a feature-statistics file written by steerlex (format "
            f"{data.get('format')!r}); {FIX}"
        )
    for i, rec in enumerate(data["features"]):
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), int):
            raise ReportError(f"{p}: feature record {i} has no integer 'id'; {FIX}")
    return data
