"""LogitLens baseline: decoder direction → final norm → unembedding → top tokens.

``logit_lens_topk`` does the tensor work (``[C, d] @ [V, d].T`` in feature chunks, top-K per
row); :func:`logit_lens` goes from an SAE and a model to readable token strings per feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from steerlex.core.errors import ExplainError
from steerlex.explain.mi import Side, Transform, _slab_topk, feature_vectors

__all__ = ["FeatureTokens", "decode_tokens", "logit_lens", "logit_lens_topk", "unembedding"]


@dataclass(frozen=True)
class FeatureTokens:
    """The top tokens of one feature: ids, readable strings and logit scores (descending)."""

    feature: int
    token_ids: list[int]
    tokens: list[str]
    scores: list[float]


def unembedding(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(W_U [V, d], bias [V] or None)`` from ``model.get_output_embeddings()``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ExplainError(
            f"{type(model).__name__} has no output embedding (get_output_embeddings().weight); "
            "LogitLens needs a causal LM with an unembedding."
        )
    bias = getattr(head, "bias", None)
    return weight.detach(), bias.detach() if isinstance(bias, Tensor) else None


def logit_lens_topk(
    vectors: Tensor,
    unembed: Tensor,
    *,
    bias: Tensor | None = None,
    top_k: int = 20,
    feature_chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Top-K logits of each vector: ``(scores [C, K] float32, token_ids [C, K] int64)``.

    ``vectors [C, d]`` (already through the final norm if wanted), ``unembed [V, d]``,
    ``bias [V]`` optional. Memory: ``feature_chunk × V`` logits at a time. Ties go to the
    lower token id.
    """
    if vectors.ndim != 2 or unembed.ndim != 2:
        raise ExplainError(
            f"vectors must be [C, d] and unembed [V, d], got {tuple(vectors.shape)} and "
            f"{tuple(unembed.shape)}."
        )
    if vectors.shape[1] != unembed.shape[1]:
        raise ExplainError(
            f"Width mismatch: feature vectors have width {vectors.shape[1]} but the "
            f"unembedding has width {unembed.shape[1]}; the SAE belongs to another model."
        )
    n_feat, n_vocab = vectors.shape[0], unembed.shape[0]
    if n_feat == 0 or n_vocab == 0:
        raise ExplainError("No features or an empty unembedding.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_vocab:
        raise ExplainError(
            f"top_k must be an integer between 1 and the vocabulary size {n_vocab}, got {top_k!r}."
        )
    if isinstance(feature_chunk, bool) or not isinstance(feature_chunk, int) or feature_chunk < 1:
        raise ExplainError(f"feature_chunk must be an integer >= 1, got {feature_chunk!r}.")
    dev = unembed.device
    w_u = unembed.to(torch.float32)
    b = bias.to(dev, torch.float32) if bias is not None else None
    scores = torch.empty(n_feat, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(n_feat, top_k, dtype=torch.long, device=dev)
    with torch.no_grad():
        for f0 in range(0, n_feat, feature_chunk):
            logits = vectors[f0 : f0 + feature_chunk].to(dev, torch.float32) @ w_u.T
            if b is not None:
                logits += b
            vals, idx = _slab_topk(logits, top_k, 0)
            scores[f0 : f0 + feature_chunk] = vals
            ids[f0 : f0 + feature_chunk] = idx
    return scores, ids


def decode_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Readable strings for single token ids (byte-level ``Ġ``/``▁`` markers become spaces).

    Uses ``convert_ids_to_tokens`` + ``convert_tokens_to_string`` per token, falling back
    to ``decode([id])``; ids the tokenizer does not know give ``"<id N>"``.
    """
    out: list[str] = []
    for token_id in ids:
        text: str | None = None
        try:
            token = tokenizer.convert_ids_to_tokens(int(token_id))
            if isinstance(token, str):
                text = tokenizer.convert_tokens_to_string([token])
        except Exception:
            text = None
        if text is None:
            try:
                text = tokenizer.decode([int(token_id)])
            except Exception:
                text = None
        out.append(text if isinstance(text, str) else f"<id {int(token_id)}>")
    return out


def logit_lens(
    sae: nn.Module,
    model: nn.Module,
    tokenizer: Any,
    *,
    top_k: int = 20,
    transform: Transform = "final_norm",
    side: Side = "decoder",
    features: Sequence[int] | None = None,
    feature_chunk: int = 1024,
) -> list[FeatureTokens]:
    """The top tokens of each feature's direction read through the unembedding.

    Args:
        sae: the SAE (``W_dec [C, d]``).
        model: the causal LM the SAE was trained on.
        tokenizer: its tokenizer (for readable strings).
        top_k: tokens per feature.
        transform: ``"final_norm"`` (default, the usual logit lens) or ``"identity"``.
        side: ``"decoder"`` (default) or ``"encoder"``.
        features: feature ids to explain (default all), in this order.
        feature_chunk: features per ``[chunk, V]`` logit block.
    """
    vectors = feature_vectors(sae, model, side=side, transform=transform)
    if features is not None:
        index = torch.as_tensor(list(features), dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= vectors.shape[0]):
            raise ExplainError(
                f"Feature ids must be in [0, {vectors.shape[0] - 1}], got {list(features)[:10]}..."
            )
        vectors = vectors[index.to(vectors.device)]
        feature_ids = [int(i) for i in index]
    else:
        feature_ids = list(range(vectors.shape[0]))
    w_u, bias = unembedding(model)
    scores, ids = logit_lens_topk(vectors, w_u, bias=bias, top_k=top_k, feature_chunk=feature_chunk)
    result: list[FeatureTokens] = []
    for row, feature in enumerate(feature_ids):
        token_ids = [int(i) for i in ids[row].tolist()]
        result.append(
            FeatureTokens(
                feature=feature,
                token_ids=token_ids,
                tokens=decode_tokens(tokenizer, token_ids),
                scores=[float(v) for v in scores[row].tolist()],
            )
        )
    return result
