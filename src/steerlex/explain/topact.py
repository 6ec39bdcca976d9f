"""TopAct baseline: the top-activating contexts of each SAE feature in an activation store.

:func:`top_activations` streams the store shard by shard, encodes each batch with the
SAE's ``encode_sparse`` (any architecture; memory bounded by one shard plus the candidate
table) and keeps, per feature, a running table of the best candidate tokens. It then cuts
a window of stored tokens of the same text around each candidate, removes near-duplicates
(see below) and returns up to ``per_feature`` :class:`Span` objects per feature.

De-duplication rule (applied per feature, candidates visited by activation descending,
ties by store row ascending):

1. **Template groups.** A text's *group* is the tuple of its first 32 stored token ids
   (the whole text if shorter; stored tokens start after the dropped chat-template
   prefix). At most ``per_group`` spans (default 2) of one feature may come from texts
   of the same group, so a jailbreak template repeated in hundreds of prompts fills at
   most two slots.
2. **Identical contexts.** A candidate is dropped when its span's token ids, or the
   token ids from 3 before to 3 after its activating token, equal those of a span
   already kept for that feature.

The running candidate table keeps, per feature, the best ``candidates`` tokens
(default ``4 * per_feature``) after capping each template group at ``2 * per_group``
of them, so repeated templates cannot crowd out other texts before step 2. This cap
is order-independent: streaming gives exactly the one-shot result. A feature whose
candidates are exhausted by duplicates gets fewer than ``per_feature`` spans.

:func:`topact_words` turns spans into the word list that the other explainers return.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from steerlex.activations.store import ActivationStore
from steerlex.core.errors import ExplainError
from steerlex.sae.base import SparseAutoencoder
from steerlex.sae.compat import check_sae_fits

GROUP_PREFIX = 32
FOCUS_RADIUS = 3
MERGE_EVERY = 1 << 21  # buffered (value, feature, row) entries before a merge


@dataclass(frozen=True)
class Span:
    """One top-activating context of a feature.

    ``token_ids``: the stored tokens of the window (same text only); ``focus``: index of
    the activating token in it; ``position``: that token's position in the full formatted
    prompt; ``activations``: the feature's activation on every token of the span (None
    when not computed); ``text``/``tokens``: decoded with a tokenizer, else None.
    """

    feature: int
    activation: float
    text_index: int
    position: int
    token_ids: tuple[int, ...]
    focus: int
    activations: tuple[float, ...] | None = None
    text: str | None = None
    tokens: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "activation": self.activation,
            "text_index": self.text_index,
            "position": self.position,
            "token_ids": list(self.token_ids),
            "focus": self.focus,
            "activations": None if self.activations is None else list(self.activations),
            "text": self.text,
            "tokens": None if self.tokens is None else list(self.tokens),
        }


@dataclass
class _ShardMeta:
    offset: int  # global row of the shard's first row
    token_ids: Tensor  # [n] int64
    text_index: Tensor  # [n] int64
    position: Tensor  # [n] int64
    run_start: Tensor  # [n] first row of the row's text (within the shard)
    run_end: Tensor  # [n] one past its last row
    group: Tensor  # [n] template-group id of the row's text


def _check_window(window: Sequence[int]) -> tuple[int, int]:
    if (
        len(window) != 2
        or any(isinstance(w, bool) or not isinstance(w, int) for w in window)
        or any(w < 0 for w in window)
    ):
        raise ExplainError(
            f"window must be (tokens_before, tokens_after) with two integers >= 0, got {window!r}."
        )
    return int(window[0]), int(window[1])


def _shard_meta(
    tensors: dict[str, Tensor], offset: int, groups: dict[tuple[int, ...], int]
) -> _ShardMeta:
    tok = tensors["token_ids"].long()
    ti = tensors["text_index"].long()
    pos = tensors["position"].long()
    n = tok.shape[0]
    if n and (bool((tok < 0).any()) or bool((ti < 0).any())):
        raise ExplainError(
            "The activation store has no token ids or text indices (it was written by "
            "create_store from bare activations); TopAct needs a store made by `steerlex harvest`."
        )
    run_start = torch.zeros(n, dtype=torch.long)
    run_end = torch.zeros(n, dtype=torch.long)
    group = torch.zeros(n, dtype=torch.long)
    if n:
        change = torch.nonzero(ti[1:] != ti[:-1]).flatten() + 1
        starts = torch.cat([torch.zeros(1, dtype=torch.long), change])
        ends = torch.cat([change, torch.tensor([n])])
        counts = ends - starts
        run_start = torch.repeat_interleave(starts, counts)
        run_end = torch.repeat_interleave(ends, counts)
        tok_list = tok.tolist()
        gids = []
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            key = tuple(tok_list[s : min(e, s + GROUP_PREFIX)])
            gids.append(groups.setdefault(key, len(groups)))
        group = torch.repeat_interleave(torch.tensor(gids, dtype=torch.long), counts)
    return _ShardMeta(offset, tok, ti, pos, run_start, run_end, group)


def _rank_in_groups(keys: Tensor) -> Tensor:
    """Rank of each entry within its run of equal consecutive ``keys`` (keys sorted)."""
    n = keys.shape[0]
    if n == 0:
        return keys.new_zeros(0)
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(n, device=keys.device) - torch.repeat_interleave(starts, counts)


def _order(val: Tensor, row: Tensor, *major: Tensor) -> Tensor:
    """Permutation sorting by ``major`` keys (first is most significant), then value
    descending, then row ascending. Stable sorts from least to most significant key."""
    perm = torch.argsort(row, stable=True)
    perm = perm[torch.argsort(-val[perm], stable=True)]
    for key in reversed(major):
        perm = perm[torch.argsort(key[perm], stable=True)]
    return perm


def _merge(
    state: tuple[Tensor, Tensor, Tensor, Tensor], m: int, per_group_keep: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keep, per feature, the best ``m`` entries after capping each (feature, group)."""
    val, feat, row, grp = state
    perm = _order(val, row, feat, grp)
    val, feat, row, grp = val[perm], feat[perm], row[perm], grp[perm]
    # combined (feature, group) key: both are non-negative and below 2**31
    keep = _rank_in_groups(feat * (1 << 31) + grp) < per_group_keep
    val, feat, row, grp = val[keep], feat[keep], row[keep], grp[keep]
    perm = _order(val, row, feat)
    val, feat, row, grp = val[perm], feat[perm], row[perm], grp[perm]
    keep = _rank_in_groups(feat) < m
    return val[keep], feat[keep], row[keep], grp[keep]


def _merge_pending(
    state: tuple[Tensor, Tensor, Tensor, Tensor],
    pending: list[tuple[Tensor, Tensor, Tensor, Tensor]],
    m: int,
    per_group_keep: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not pending:
        return state
    parts = [state, *pending]
    merged = tuple(torch.cat([p[i] for p in parts]) for i in range(4))
    return _merge(merged, m, per_group_keep)  # type: ignore[arg-type]


_Candidates = tuple[Tensor, Tensor, Tensor, Tensor]  # (value, feature, row, group), aligned


def _check_topact_args(
    per_feature: int,
    window: Sequence[int],
    batch_size: int,
    per_group: int,
    candidates: int | None,
    max_tokens: int | None,
) -> tuple[int, int, int]:
    """Check the plain arguments of :func:`top_activations`, in its order.

    Returns ``(before, after, m)``: the window's tokens before and after the activating
    one and the size of the running candidate table per feature.

    Raises:
        ExplainError: a value out of range (the message names it).
    """
    if isinstance(per_feature, bool) or not isinstance(per_feature, int) or per_feature < 1:
        raise ExplainError(f"per_feature must be an integer >= 1, got {per_feature!r}.")
    before, after = _check_window(window)
    if batch_size < 1:
        raise ExplainError(f"batch_size must be at least 1, got {batch_size}.")
    if per_group < 1:
        raise ExplainError(f"per_group must be at least 1, got {per_group}.")
    m = 4 * per_feature if candidates is None else int(candidates)
    if m < per_feature:
        raise ExplainError(f"candidates ({m}) must be at least per_feature ({per_feature}).")
    if max_tokens is not None and max_tokens < 1:
        raise ExplainError(f"max_tokens must be at least 1 or None, got {max_tokens}.")
    return before, after, m


def _wanted_features(features: Iterable[int] | None, d_sae: int) -> list[int]:
    """The feature ids to explain, sorted and unique (``None``: all of ``0..d_sae-1``).

    Raises:
        ExplainError: an id outside ``0..d_sae-1``, or no ids.
    """
    if features is None:
        return list(range(d_sae))
    wanted = sorted({int(f) for f in features})
    bad = [f for f in wanted if not 0 <= f < d_sae]
    if bad:
        raise ExplainError(f"Feature ids {bad[:5]} are outside 0..{d_sae - 1}.")
    if not wanted:
        raise ExplainError("features is empty; pass None for all features.")
    return wanted


def _stream_candidates(
    sae: SparseAutoencoder,
    store: ActivationStore,
    allowed: Tensor,
    *,
    limit: int,
    batch_size: int,
    m: int,
    per_group: int,
    progress: bool,
) -> tuple[_Candidates, list[_ShardMeta]]:
    """Encode the store's first ``limit`` tokens and keep the running candidate table.

    ``allowed [d_sae]`` (bool, on the SAE's device) marks the requested features. Returns
    the table (on the SAE's device; per feature at most ``m`` entries after capping each
    template group at ``2 * per_group``; ordered by feature, then activation descending,
    then store row ascending; rows are global store rows) and the metadata of every
    shard read, in store order.
    """
    device = allowed.device
    groups: dict[tuple[int, ...], int] = {}
    metas: list[_ShardMeta] = []
    empty_f = torch.zeros(0, dtype=torch.float32, device=device)
    empty_l = torch.zeros(0, dtype=torch.long, device=device)
    state: _Candidates = (empty_f, empty_l, empty_l, empty_l)
    pending: list[_Candidates] = []
    n_pending = 0
    bar = tqdm(total=limit, desc="topact", unit="tok", disable=not progress)
    with torch.inference_mode():
        for offset, tensors in store.iter_shards(limit):
            n = int(tensors["activations"].shape[0])
            meta = _shard_meta(tensors, offset, groups)
            metas.append(meta)
            acts = tensors["activations"]
            grp_dev = meta.group.to(device)
            for b in range(0, n, batch_size):
                x = acts[b : b + batch_size].to(device)
                vals, idx = sae.encode_sparse(x)
                rows = torch.arange(b, b + x.shape[0], device=device).unsqueeze(1).expand_as(idx)
                keep = (vals > 0) & allowed[idx]
                new = (
                    vals[keep].float(),
                    idx[keep].long(),
                    rows[keep] + offset,
                    grp_dev[rows[keep]],
                )
                pending.append(new)
                n_pending += int(new[0].shape[0])
                if n_pending >= max(MERGE_EVERY, int(state[0].shape[0])):
                    state = _merge_pending(state, pending, m, 2 * per_group)
                    pending, n_pending = [], 0
                bar.update(x.shape[0])
        state = _merge_pending(state, pending, m, 2 * per_group)
    bar.close()
    return state, metas


def _shard_lists(meta: _ShardMeta) -> list[list[int]]:
    """``[group, run_start, run_end, token_ids, text_index, position]`` of a shard as lists."""
    return [
        t.tolist()
        for t in (
            meta.group,
            meta.run_start,
            meta.run_end,
            meta.token_ids,
            meta.text_index,
            meta.position,
        )
    ]


def _select_spans(
    state: _Candidates,
    metas: Sequence[_ShardMeta],
    wanted: Sequence[int],
    *,
    per_feature: int,
    per_group: int,
    before: int,
    after: int,
) -> tuple[dict[int, list[Span]], dict[tuple[int, int], tuple[int, int, int]]]:
    """Cut the spans of the candidate table and apply the de-duplication rule.

    Visits the candidates in table order (per feature: activation descending, row
    ascending) and keeps up to ``per_feature`` spans per feature (module docstring, steps
    1 and 2). Returns ``{feature: spans}`` for every id in ``wanted`` (no
    ``activations``, ``text`` or ``tokens`` yet) and, per kept span ``(feature, i)``, its
    ``(shard, lo, hi)``: the shard and its local rows ``lo:hi``.
    """
    val, feat, row, _ = (t.cpu() for t in state)
    offsets = torch.tensor([mt.offset for mt in metas])
    shard_of = torch.searchsorted(offsets, row, right=True) - 1

    result: dict[int, list[Span]] = {f: [] for f in wanted}
    where: dict[tuple[int, int], tuple[int, int, int]] = {}  # (feature, i) -> (shard, lo, hi)
    seen_full: dict[int, set[tuple[int, ...]]] = {}
    seen_focus: dict[int, set[tuple[int, ...]]] = {}
    group_count: dict[tuple[int, int], int] = {}
    lists: dict[int, list[list[int]]] = {}
    for v, f, r, s in zip(
        val.tolist(), feat.tolist(), row.tolist(), shard_of.tolist(), strict=True
    ):
        kept = result[f]
        if len(kept) >= per_feature:
            continue
        if s not in lists:  # python lists: per-element tensor indexing is slow
            lists[s] = _shard_lists(metas[s])
        grp_l, start_l, end_l, tok_l, text_l, pos_l = lists[s]
        local = r - metas[s].offset
        g = grp_l[local]
        if group_count.get((f, g), 0) >= per_group:
            continue
        lo = max(start_l[local], local - before)
        hi = min(end_l[local], local + after + 1)
        ids = tuple(tok_l[lo:hi])
        focus = local - lo
        around = ids[max(0, focus - FOCUS_RADIUS) : focus + FOCUS_RADIUS + 1]
        full_seen = seen_full.setdefault(f, set())
        focus_seen = seen_focus.setdefault(f, set())
        if ids in full_seen or around in focus_seen:
            continue
        full_seen.add(ids)
        focus_seen.add(around)
        group_count[(f, g)] = group_count.get((f, g), 0) + 1
        where[(f, len(kept))] = (s, lo, hi)
        kept.append(
            Span(
                feature=f,
                activation=float(v),
                text_index=text_l[local],
                position=pos_l[local],
                token_ids=ids,
                focus=focus,
            )
        )
    return result, where


def top_activations(
    sae: SparseAutoencoder,
    store: ActivationStore,
    *,
    per_feature: int = 20,
    window: Sequence[int] = (8, 3),
    features: Iterable[int] | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4096,
    progress: bool = True,
    tokenizer: Any = None,
    per_group: int = 2,
    candidates: int | None = None,
    span_activations: bool = True,
) -> dict[int, list[Span]]:
    """Top-activating spans per feature (see the module docstring for the rules).

    ``sae``: an SAE (any architecture) whose input width equals the store's.
    ``window``: stored tokens (before, after) the activating one, never crossing texts.
    ``features``: feature ids to explain (default: all). ``max_tokens``: read only the
    first tokens of the store. ``tokenizer``: decode spans (``text`` and ``tokens``).
    ``per_group``: spans per template group. ``candidates``: size of the running table per
    feature (default ``4 * per_feature``). ``span_activations``: also compute the
    feature's activation on every span token (one more encoder pass over the rows of the
    kept spans). Returns ``{feature: spans}`` for every requested feature, best first; a
    feature that never fires gets an empty list.
    """
    before, after, m = _check_topact_args(
        per_feature, window, batch_size, per_group, candidates, max_tokens
    )
    d_sae = int(sae.cfg.d_sae)
    check_sae_fits(sae, store=store)
    if store.n_tokens == 0 or not store.shards:
        raise ExplainError(f"The activation store in {store.directory} holds no tokens.")
    wanted = _wanted_features(features, d_sae)
    device = sae.W_enc.device
    allowed = torch.zeros(d_sae, dtype=torch.bool, device=device)
    allowed[torch.tensor(wanted, dtype=torch.long, device=device)] = True

    limit = store.n_tokens if max_tokens is None else min(max_tokens, store.n_tokens)
    state, metas = _stream_candidates(
        sae,
        store,
        allowed,
        limit=limit,
        batch_size=batch_size,
        m=m,
        per_group=per_group,
        progress=progress,
    )
    result, where = _select_spans(
        state,
        metas,
        wanted,
        per_feature=per_feature,
        per_group=per_group,
        before=before,
        after=after,
    )
    if span_activations:
        _fill_activations(sae, store, result, where, batch_size)
    if tokenizer is not None:
        result = {f: [_decode(sp, tokenizer) for sp in spans] for f, spans in result.items()}
    return result


def _fill_activations(
    sae: SparseAutoencoder,
    store: ActivationStore,
    result: dict[int, list[Span]],
    where: dict[tuple[int, int], tuple[int, int, int]],
    batch_size: int,
) -> None:
    """Set ``Span.activations``: encode each shard's span rows once, look up the feature."""
    by_shard: dict[int, list[tuple[int, int, int, int]]] = {}
    for (f, i), (s, lo, hi) in where.items():
        by_shard.setdefault(s, []).append((f, i, lo, hi))
    device = sae.W_enc.device
    with torch.inference_mode():
        for s in sorted(by_shard):
            items = by_shard[s]
            rows = sorted({r for _, _, lo, hi in items for r in range(lo, hi)})
            acts = store.load_shard(s)["activations"]
            vals_parts, idx_parts = [], []
            for b in range(0, len(rows), batch_size):
                x = acts[torch.tensor(rows[b : b + batch_size], dtype=torch.long)].to(device)
                v, ix = sae.encode_sparse(x)
                vals_parts.append(v.float().cpu())
                idx_parts.append(ix.long().cpu())
            vals, idx = torch.cat(vals_parts), torch.cat(idx_parts)
            slot = {r: j for j, r in enumerate(rows)}
            for f, i, lo, hi in items:
                js = torch.tensor([slot[r] for r in range(lo, hi)], dtype=torch.long)
                per_tok = (vals[js] * (idx[js] == f)).sum(-1)
                sp = result[f][i]
                result[f][i] = replace(sp, activations=tuple(float(a) for a in per_tok.tolist()))


def _decode(span: Span, tokenizer: Any) -> Span:
    ids = list(span.token_ids)
    return replace(
        span,
        text=str(tokenizer.decode(ids)),
        tokens=tuple(str(tokenizer.decode([t])) for t in ids),
    )


def _span_words(
    span: Span, tokenizer: Any, context: int, neighbour_weight: float
) -> dict[str, float]:
    """Cleaned words of one span with their weights (max over the word's tokens)."""
    pieces = (
        span.tokens
        if span.tokens is not None
        else tuple(str(tokenizer.decode([t])) for t in span.token_ids)
    )
    a_focus = span.activation
    own = span.activations or tuple(0.0 for _ in pieces)
    weights = []
    for j in range(len(pieces)):
        w = own[j] if j != span.focus else a_focus
        dist = abs(j - span.focus)
        if dist <= context:
            w = max(w, a_focus * neighbour_weight**dist)
        weights.append(w)
    # join sub-word pieces: a piece opens a new word when it is the first, starts with
    # whitespace, or the tokenizer decodes it with a space after the previous piece
    words: list[tuple[str, float]] = []
    ids = span.token_ids
    # special tokens (BOS, unknown, chat-template markers) are word breaks, never words
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    for j, (piece, w) in enumerate(zip(pieces, weights, strict=True)):
        if ids[j] in special:
            words.append(("", 0.0))
            continue
        if j == 0 or not piece or piece[0].isspace() or not words:
            words.append((piece, w))
        elif len(str(tokenizer.decode([ids[j - 1], ids[j]]))) > len(pieces[j - 1]) + len(piece):
            # the tokenizer puts a space between the two (word-level vocabularies)
            words.append((piece, w))
        else:
            text, w0 = words[-1]
            words[-1] = (text + piece, max(w0, w))
    out: dict[str, float] = {}
    for text, w in words:
        word = clean_word(text)
        if word and w > 0:
            out[word] = max(out.get(word, 0.0), w)
    return out


def clean_word(text: str) -> str | None:
    """Lower-case ``text`` with non-letters stripped from both ends; None unless the rest
    is alphabetic and at least 2 characters long."""
    word = text.strip().lower()
    start, end = 0, len(word)
    while start < end and not word[start].isalpha():
        start += 1
    while end > start and not word[end - 1].isalpha():
        end -= 1
    word = word[start:end]
    return word if len(word) >= 2 and word.isalpha() else None


def topact_words(
    spans: Iterable[Span],
    tokenizer: Any,
    top_k: int = 50,
    *,
    context: int = 1,
    neighbour_weight: float = 0.5,
) -> list[str]:
    """The TopAct explanation of one feature as a word list (best first).

    Each span's tokens are joined into words (a token opens a new word when it starts
    with whitespace or decodes with a space after the previous token), cleaned by :func:`clean_word`, and weighted: a token's weight is its own
    activation of the feature (the focus token: the span's activation; unknown
    activations count 0), raised to at least ``a_focus * neighbour_weight**d`` for the
    tokens at distance ``d <= context`` from the focus. A word takes the largest weight
    of its tokens within a span; its score is the sum over spans. Ties by the word.
    """
    if top_k < 1:
        raise ExplainError(f"top_k must be at least 1, got {top_k}.")
    if context < 0 or not 0 <= neighbour_weight <= 1:
        raise ExplainError(
            f"context must be >= 0 and neighbour_weight in [0, 1], got {context} and "
            f"{neighbour_weight}."
        )
    score: dict[str, float] = {}
    for span in spans:
        for word, w in _span_words(span, tokenizer, context, neighbour_weight).items():
            score[word] = score.get(word, 0.0) + w
    ranked = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[:top_k]]
