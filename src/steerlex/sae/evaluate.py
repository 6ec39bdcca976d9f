"""How good is an SAE? Reconstruction, sparsity, dead latents and spliced-in LM loss.

Two families of numbers, both on held-out data:

- :func:`activation_metrics` streams stored activations ``x [n, d_in]`` through the SAE:
  NMSE and FVE of the reconstruction, mean L0, dead and dense latents, per-latent firing
  frequency and a log10 firing-frequency histogram. One pass, bounded memory.
- :func:`spliced_lm_loss` runs the language model on texts with the layer-L output replaced
  (at the positions the harvest kept, and only there) by the SAE's reconstruction, by zeros or
  by the mean activation, and reports next-token cross-entropies and "loss recovered".

:func:`evaluate_sae` runs both and writes ``eval.json`` (+ ``firing_frequency.json``, and
``firing_histogram.png`` when matplotlib is installed) into a directory.

Definitions (``x̂ = sae(x)``, sums over the evaluated tokens, ``μ`` their mean vector)::

    NMSE = Σ ||x - x̂||² / Σ ||x - μ||²        FVE = 1 - NMSE
    L0   = mean over tokens of #{latents > 0}
    freq_j = #{tokens where latent j > 0} / n_tokens
    dead  = #{j : freq_j == 0} / d_sae         dense = #{j : freq_j > dense_threshold} / d_sae

The denominator is accumulated in one pass with Chan et al.'s pairwise update of the mean and
the sum of squared deviations (in float64), which equals the two-pass value without the
cancellation of ``Σ||x||² - n||μ||²``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from steerlex.activations.store import ActivationStore
from steerlex.core.errors import SAEError
from steerlex.core.io import atomic_path, write_bytes_atomic, write_json_atomic
from steerlex.models.chat import KEEP_CHOICES, Keep, encode_prompt, has_chat_template
from steerlex.models.hooks import check_layer, edit_residual
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder
from steerlex.sae.compat import check_sae_fits, sae_origin

__all__ = [
    "EVAL_FILE",
    "FREQUENCY_FILE",
    "PLOT_FILE",
    "activation_metrics",
    "evaluate_sae",
    "firing_histogram",
    "spliced_lm_loss",
]

EVAL_FILE = "eval.json"
FREQUENCY_FILE = "firing_frequency.json"
PLOT_FILE = "firing_histogram.png"

CE_POSITIONS = (
    "the prediction made at token position t (of the token at t+1) counts when t is a position "
    "the keep rule keeps and t+1 is a real token of the (truncated) prompt; the same predictions "
    "count in every condition, pad positions never count"
)

ActivationSource = ActivationStore | Tensor | Iterable[Tensor]


# --- streaming activation metrics --------------------------------------------------------------


@dataclass
class _Batch:
    """One batch of activations and a human-readable description of where it came from."""

    x: Tensor  # [b, d_in]
    source: str  # "shard shard_00003.safetensors" or "input batch 2"
    offset: int  # row of x[0] within that source
    token_info: Tensor | None = None  # [b, 2] (text_index, position) when from a store

    @property
    def where(self) -> str:
        return f"{self.source} rows {self.offset}..{self.offset + self.x.shape[0] - 1}"


def _iter_source(
    source: ActivationSource, batch_size: int, max_tokens: int | None
) -> Iterator[_Batch]:
    """Batches of at most ``batch_size`` rows, in order, stopping after ``max_tokens`` rows."""
    seen = 0

    def clip(x: Tensor) -> Tensor:
        return x if max_tokens is None else x[: max_tokens - seen]

    if isinstance(source, ActivationStore):
        for i, info in enumerate(source.shards):
            if max_tokens is not None and seen >= max_tokens:
                return
            shard = source.load_shard(i)
            acts = clip(shard["activations"])
            where_tok = torch.stack([shard["text_index"], shard["position"]], dim=1)
            for lo in range(0, acts.shape[0], batch_size):
                x = acts[lo : lo + batch_size]
                yield _Batch(x, f"shard {info.file}", lo, where_tok[lo : lo + batch_size])
            seen += acts.shape[0]
        return
    batches: Iterable[Tensor] = [source] if isinstance(source, Tensor) else source
    for b, raw in enumerate(batches):
        if max_tokens is not None and seen >= max_tokens:
            return
        if not isinstance(raw, Tensor):
            raise SAEError(
                f"activation_metrics takes an ActivationStore, a [n, d] tensor or an iterable of "
                f"[b, d] tensors; batch {b} is a {type(raw).__name__}."
            )
        x2 = clip(raw.reshape(-1, raw.shape[-1]) if raw.dim() != 2 else raw)
        for lo in range(0, x2.shape[0], batch_size):
            yield _Batch(x2[lo : lo + batch_size], f"input batch {b}", lo)
        seen += x2.shape[0]


def _check_finite(batch: _Batch) -> None:
    finite = torch.isfinite(batch.x)
    if bool(finite.all()):
        return
    bad = ~finite
    n_nan = int(torch.isnan(batch.x).sum())
    n_inf = int(bad.sum()) - n_nan
    rows = bad.any(dim=1).nonzero().flatten()
    first = int(rows[0])
    detail = f"first at row {batch.offset + first} of {batch.source}"
    if batch.token_info is not None:
        text, pos = batch.token_info[first].tolist()
        if text >= 0:  # stores written from raw tensors record -1
            detail += f" (text {text}, token position {pos})"
    raise SAEError(
        f"The activations hold non-finite values: {n_nan} NaN and {n_inf} Inf in "
        f"{rows.numel()} token row(s) of {batch.where}; {detail}. Re-harvest them (an fp16 "
        "model or storage dtype can overflow; use float32)."
    )


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def firing_histogram(
    counts: Tensor, n_tokens: int, *, bins: int = 50, lo: float = -8.0, hi: float = 0.0
) -> dict[str, Any]:
    """Histogram of log10 firing frequency of the latents that fire at least once.

    Args:
        counts: ``[d_sae]`` number of tokens on which each latent is > 0.
        n_tokens: number of evaluated tokens (> 0).
        bins, lo, hi: ``bins`` equal bins of log10(frequency) over ``[lo, hi]``; values below
            ``lo`` go to the first bin, frequency 1 (log10 = 0) to the last.

    Returns:
        ``{"log10_edges": [bins + 1 floats], "counts": [bins ints], "n_dead": int, ...}``; dead
        latents (frequency 0, log10 = -inf) are counted in ``n_dead`` only.
    """
    if bins < 1 or not lo < hi:
        raise SAEError(f"A histogram needs bins >= 1 and lo < hi, got {bins}, {lo}, {hi}.")
    counts = counts.detach().to("cpu", torch.float64)
    alive = counts > 0
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    logf = torch.log10(counts[alive] / n_tokens)
    idx = (torch.bucketize(logf, edges, right=True) - 1).clamp(0, bins - 1)
    hist = torch.bincount(idx, minlength=bins)
    return {
        "log10_edges": edges.tolist(),
        "counts": [int(c) for c in hist.tolist()],
        "n_dead": int((~alive).sum()),
        "n_alive": int(alive.sum()),
        "note": "log10 of the fraction of tokens on which a latent is > 0; dead latents "
        "are in n_dead, not in counts; values below the first edge are in the first bin",
    }


@dataclass
class _MetricSums:
    """Running sums of one streaming pass, on the SAE's device.

    ``mean`` ``[d_in]``, ``m2`` (Σ ||x - mean||²) and ``sq_err`` (Σ ||x - x̂||²) are in the
    accumulation dtype (:func:`_acc_dtype`); ``l0_sum`` and ``counts`` ``[d_sae]`` are int64.
    """

    n: int
    mean: Tensor
    m2: Tensor
    sq_err: Tensor
    l0_sum: Tensor
    counts: Tensor

    @classmethod
    def zeros(cls, d_in: int, d_sae: int, device: torch.device) -> _MetricSums:
        """Empty sums (no token seen yet) for an SAE of width ``d_in -> d_sae``."""
        acc = _acc_dtype(device)
        return cls(
            n=0,
            mean=torch.zeros(d_in, dtype=acc, device=device),
            m2=torch.zeros((), dtype=acc, device=device),
            sq_err=torch.zeros((), dtype=acc, device=device),
            l0_sum=torch.zeros((), dtype=torch.int64, device=device),
            counts=torch.zeros(d_sae, dtype=torch.int64, device=device),
        )

    def add(self, sae: SparseAutoencoder, x: Tensor) -> None:
        """Add the ``[b, d_in]`` batch ``x`` (already on the SAE's device, b >= 1)."""
        values, indices = sae.encode_sparse(x)
        recon = sae.decode_sparse(values, indices)
        fired = values > 0
        self.l0_sum += fired.sum()
        self.counts += torch.bincount(indices[fired], minlength=sae.cfg.d_sae)
        xa = x.to(self.mean.dtype)
        self.sq_err += (xa - recon.to(self.mean.dtype)).square().sum()
        # Chan et al.'s pairwise update of the mean and the sum of squared deviations
        nb = xa.shape[0]
        mb = xa.mean(dim=0)
        m2b = (xa - mb).square().sum()
        delta = mb - self.mean
        new_n = self.n + nb
        self.m2 += m2b + delta.square().sum() * (self.n * nb / new_n)
        self.mean += delta * (nb / new_n)
        self.n = new_n


def _expected_tokens(
    sae: SparseAutoencoder, source: ActivationSource, max_tokens: int | None
) -> int | None:
    """Tokens the pass will read, when known up front (for the progress bar), else None.

    Checks that the SAE fits a store source (:func:`check_sae_fits`).
    """
    if isinstance(source, ActivationStore):
        check_sae_fits(sae, store=source)
        return source.n_tokens if max_tokens is None else min(max_tokens, source.n_tokens)
    if isinstance(source, Tensor):
        return source.shape[0] if max_tokens is None else min(max_tokens, source.shape[0])
    return None


def _check_width(sae: SparseAutoencoder, batch: _Batch) -> None:
    """Raise SAEError when the batch's width is not the SAE's ``d_in``."""
    d_in = sae.cfg.d_in
    if batch.x.shape[-1] != d_in:
        raise SAEError(
            f"The SAE takes width d_in={d_in}{sae_origin(sae)}, but the activations "
            f"({batch.where}) have width {batch.x.shape[-1]}; pass activations of the "
            "model and layer the SAE was trained on."
        )


def _accumulate(
    sae: SparseAutoencoder,
    source: ActivationSource,
    *,
    max_tokens: int | None,
    batch_size: int,
    total: int | None,
    progress: bool,
) -> _MetricSums:
    """One pass over ``source`` (checking width and finiteness of every batch) into sums."""
    device = sae.W_enc.device
    sums = _MetricSums.zeros(sae.cfg.d_in, sae.cfg.d_sae, device)
    bar = tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc="SAE metrics",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for batch in _iter_source(source, batch_size, max_tokens):
            _check_width(sae, batch)
            if batch.x.shape[0] == 0:
                continue
            _check_finite(batch)
            sums.add(sae, batch.x.to(device))
            bar.update(batch.x.shape[0])
    finally:
        bar.close()
    return sums


def _metrics_from_sums(
    sae: SparseAutoencoder,
    sums: _MetricSums,
    *,
    dense_threshold: float,
    hist_bins: int,
    hist_range: tuple[float, float],
) -> dict[str, Any]:
    """The JSON-able result of :func:`activation_metrics` from the sums of a non-empty pass."""
    n, d_sae = sums.n, sae.cfg.d_sae
    var_sum, err_sum = float(sums.m2), float(sums.sq_err)
    nmse = err_sum / var_sum if var_sum > 0 else (0.0 if err_sum == 0 else math.inf)
    freq = sums.counts.to("cpu", torch.float64) / n
    n_dead = int((sums.counts == 0).sum())
    n_dense = int((freq > dense_threshold).sum())
    lo, hi = hist_range
    return {
        "n_tokens": n,
        "d_in": sae.cfg.d_in,
        "d_sae": d_sae,
        "k": sae.cfg.k,
        "architecture": sae.cfg.architecture,
        "nmse": nmse,
        "fve": 1.0 - nmse,
        "mse": err_sum / n,
        "variance": var_sum / n,
        "l0": float(sums.l0_sum) / n,
        "n_dead": n_dead,
        "dead_fraction": n_dead / d_sae,
        "n_dense": n_dense,
        "dense_fraction": n_dense / d_sae,
        "dense_threshold": dense_threshold,
        "firing_frequency": freq.tolist(),
        "firing_histogram": firing_histogram(sums.counts, n, bins=hist_bins, lo=lo, hi=hi),
        "mean_activation": sums.mean.to("cpu", torch.float64).tolist(),
    }


@torch.no_grad()
def activation_metrics(
    sae: SparseAutoencoder,
    source: ActivationSource,
    *,
    max_tokens: int | None = None,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
    hist_bins: int = 50,
    hist_range: tuple[float, float] = (-8.0, 0.0),
    progress: bool = True,
) -> dict[str, Any]:
    """Reconstruction and sparsity metrics of ``sae`` on held-out activations, streamed.

    Args:
        sae: the SAE; runs on its own device and dtype.
        source: an :class:`ActivationStore` (read shard by shard, in order), one ``[n, d_in]``
            tensor, or an iterable of ``[b, d_in]`` tensors (read once, so a generator is fine).
        max_tokens: evaluate only the first ``max_tokens`` tokens.
        batch_size: tokens per SAE call; memory is O(batch_size * (d_in + d_sae)) plus one shard.
        dense_threshold: a latent is "dense" when it fires on more than this fraction of tokens.
        hist_bins, hist_range: the log10 firing-frequency histogram (see :func:`firing_histogram`).
        progress: show a tqdm bar (stderr).

    Returns:
        A JSON-able dict: ``n_tokens``; ``nmse``, ``fve`` (= 1 - nmse); ``mse`` (mean over
        tokens of ||x - x̂||², squared activation units); ``variance`` (mean over tokens of
        ||x - μ||²); ``l0`` (mean non-zero latents per token); ``n_dead``/``dead_fraction``;
        ``n_dense``/``dense_fraction``/``dense_threshold``; ``firing_frequency`` (``[d_sae]``
        fractions of tokens); ``firing_histogram``; ``mean_activation`` (``[d_in]``, μ).

    Raises:
        SAEError: width or layer mismatch, non-finite activations (how many, where), no tokens.
    """
    if batch_size < 1:
        raise SAEError(f"batch_size must be at least 1, got {batch_size}.")
    if max_tokens is not None and max_tokens < 1:
        raise SAEError(f"max_tokens must be at least 1 (or None for all), got {max_tokens}.")
    total = _expected_tokens(sae, source, max_tokens)
    sums = _accumulate(
        sae, source, max_tokens=max_tokens, batch_size=batch_size, total=total, progress=progress
    )
    if sums.n == 0:
        raise SAEError(
            "No activations to evaluate: the store or batches are empty"
            + (f" (max_tokens={max_tokens})" if max_tokens is not None else "")
            + "; harvest held-out texts first."
        )
    return _metrics_from_sums(
        sae, sums, dense_threshold=dense_threshold, hist_bins=hist_bins, hist_range=hist_range
    )


# --- spliced-in LM loss ------------------------------------------------------------------------


def _text_of(item: Any, i: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping) and isinstance(item.get("text"), str):
        return str(item["text"])
    text = getattr(item, "text", None)
    if isinstance(text, str):
        return text
    raise SAEError(
        f"Text {i} is a {type(item).__name__}; pass strings, dicts with a 'text' key, or objects "
        "with a .text attribute."
    )


@dataclass(frozen=True)
class _Prepared:
    ids: list[int]
    keep: list[int]  # positions spliced
    scored: list[int]  # positions whose next-token prediction counts


def _prepare(
    tokenizer: Any,
    texts: Sequence[Any],
    *,
    chat: bool,
    system_prompt: str | None,
    keep: Keep,
    max_length: int | None,
) -> list[_Prepared]:
    """Tokenize like the harvest; return the prompts with at least one counted prediction."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out: list[_Prepared] = []
    for i, item in enumerate(texts):
        enc = encode_prompt(
            tokenizer,
            _text_of(item, i),
            chat=chat,
            system_prompt=system_prompt,
            max_length=max_length,
        )
        kept = enc.keep_positions(keep, special)
        n = len(enc.input_ids)
        scored = [t for t in kept if t + 1 < n]
        if not scored:
            continue
        out.append(_Prepared(list(enc.input_ids), kept, scored))
    return out


def _ce_sum(logits: Tensor, ids: Tensor, scored: Tensor) -> tuple[float, int]:
    """Summed next-token CE (nats) over ``scored [B, T]`` positions, and their count."""
    rows, cols = scored.nonzero(as_tuple=True)
    rows, cols = rows.to(logits.device), cols.to(logits.device)
    picked = logits[rows, cols].float()
    targets = ids.to(logits.device)[rows, cols + 1]
    ce = F.cross_entropy(picked, targets, reduction="sum")
    return float(ce.double()), int(rows.numel())


def _check_splice_args(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    texts: Sequence[Any],
    layer: int,
    *,
    keep: Keep,
    batch_size: int,
) -> int:
    """The checked 0-based ``layer`` of :func:`spliced_lm_loss`'s arguments.

    Raises, in this order: LayerError for a layer the model lacks; SAEError for an SAE that
    does not fit the model or layer, an unknown keep rule, ``batch_size < 1``, or no texts.
    """
    layer = check_layer(loaded.model, layer)
    check_sae_fits(sae, loaded=loaded, layer=layer, other_layer="error", check_weights=False)
    if keep not in KEEP_CHOICES:
        raise SAEError(f"Unknown keep rule '{keep}'; use one of {', '.join(KEEP_CHOICES)}.")
    if batch_size < 1:
        raise SAEError(f"batch_size must be at least 1, got {batch_size}.")
    if not texts:
        raise SAEError("No texts for the spliced-in LM loss: the text list is empty.")
    return layer


def _mean_vector(mean_activation: Tensor | Sequence[float] | None, d_in: int) -> Tensor | None:
    """``mean_activation`` as a flat ``[d_in]`` tensor (None stays None); SAEError for another
    length or a non-finite entry."""
    if mean_activation is None:
        return None
    mean_vec = torch.as_tensor(mean_activation).detach().flatten()
    if mean_vec.numel() != d_in:
        raise SAEError(
            f"mean_activation has {mean_vec.numel()} entries; the residual width is {d_in}."
        )
    if not bool(torch.isfinite(mean_vec).all()):
        raise SAEError("mean_activation holds NaN or Inf values.")
    return mean_vec


@dataclass(frozen=True)
class _Padded:
    """One right-padded batch of prepared prompts; every tensor is ``[B, T]`` on the CPU."""

    ids: Tensor  # token ids, 0 at pads
    attn: Tensor  # attention mask: 1 at real tokens
    kept: Tensor  # bool: positions spliced
    scored: Tensor  # bool: positions whose next-token prediction counts


def _pad(prepared: Sequence[_Prepared], batch: Sequence[int]) -> _Padded:
    """The prompts ``prepared[j] for j in batch``, right-padded to the longest of them."""
    width = max(len(prepared[j].ids) for j in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    attn = torch.zeros(len(batch), width, dtype=torch.long)
    kept = torch.zeros(len(batch), width, dtype=torch.bool)
    scored = torch.zeros(len(batch), width, dtype=torch.bool)
    for r, j in enumerate(batch):  # right padding: real tokens keep positions 0..n-1
        p = prepared[j]
        ids[r, : len(p.ids)] = torch.tensor(p.ids)
        attn[r, : len(p.ids)] = 1
        kept[r, p.keep] = True
        scored[r, p.scored] = True
    return _Padded(ids, attn, kept, scored)


def _splice_for(
    cond: str, mask: Tensor, sae: SparseAutoencoder, mean_vec: Tensor | None
) -> Callable[[Tensor], Tensor]:
    """The residual edit of condition ``cond`` ("sae", "zero" or "mean") at ``mask [B, T]``:
    returns a copy of ``h [B, T, d]`` with ``h[mask]`` replaced, in ``h``'s device and dtype."""
    sae_device = sae.W_enc.device
    sae_dtype = sae.W_enc.dtype

    def splice(h: Tensor) -> Tensor:
        out = h.clone()
        m = mask.to(h.device)
        if cond == "sae":
            sel = h[m].to(sae_device, sae_dtype)
            out[m] = sae(sel).to(h.device, h.dtype)
        elif cond == "zero":
            out[m] = 0
        else:
            assert mean_vec is not None
            out[m] = mean_vec.to(h.device, h.dtype)
        return out

    return splice


def _logits(
    model: Any,
    layer: int,
    ids: Tensor,
    attn: Tensor,
    splice: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """``[B, T, vocab]`` logits of the model on ``ids``, with ``splice`` (if any) editing the
    output of ``layer``."""
    if splice is None:
        return model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    with edit_residual(model, layer, splice):
        return model(input_ids=ids, attention_mask=attn, use_cache=False).logits


@dataclass
class _CETotals:
    """Summed next-token CE (nats) per condition, in condition order, over all batches."""

    sums: dict[str, float]
    n_scored: int = 0  # counted predictions (the same in every condition)
    n_spliced: int = 0  # spliced positions

    def means(self, spec: str, layer: int) -> dict[str, float]:
        """Mean CE (nats per counted token) per condition; SAEError when one is not finite."""
        ce = {cond: total / self.n_scored for cond, total in self.sums.items()}
        bad = [cond for cond, v in ce.items() if not math.isfinite(v)]
        if bad:
            raise SAEError(
                f"The cross-entropy is not finite in condition(s) {', '.join(bad)} on {spec} "
                f"layer {layer}; check the model dtype (fp16 overflows) and the SAE weights."
            )
        return ce


def _ce_totals(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    prepared: Sequence[_Prepared],
    layer: int,
    mean_vec: Tensor | None,
    *,
    batch_size: int,
    progress: bool,
) -> _CETotals:
    """CE of every prepared prompt in the conditions clean, sae, zero (and mean, given
    ``mean_vec``), in batches of ``batch_size`` prompts, longest first (ties by index)."""
    model = loaded.model
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(prepared)), key=lambda j: (-len(prepared[j].ids), j))
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    conditions = ["clean", "sae", "zero"] + ([] if mean_vec is None else ["mean"])
    totals = _CETotals(dict.fromkeys(conditions, 0.0))
    bar = tqdm(
        total=len(conditions) * len(batches),
        unit="batch",
        desc=f"spliced loss layer {layer}",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for batch in batches:
            padded = _pad(prepared, batch)
            totals.n_spliced += int(padded.kept.sum())
            ids_d, attn_d = padded.ids.to(device), padded.attn.to(device)
            for cond in conditions:
                splice = None if cond == "clean" else _splice_for(cond, padded.kept, sae, mean_vec)
                logits = _logits(model, layer, ids_d, attn_d, splice)
                total, count = _ce_sum(logits, padded.ids, padded.scored)
                del logits
                totals.sums[cond] += total
                if cond == "clean":
                    totals.n_scored += count
                bar.update(1)
    finally:
        bar.close()
    return totals


def _loss_numbers(ce: Mapping[str, float]) -> dict[str, float | None]:
    """CE per condition (``ce_mean`` None without a mean condition), the CE increase, and the
    loss recovered against zero and mean ablation (percent; None when undefined)."""

    def recovered(ablated: float | None) -> float | None:
        if ablated is None or ablated == ce["clean"]:
            return None
        return 100.0 * (ablated - ce["sae"]) / (ablated - ce["clean"])

    ce_mean = ce.get("mean")
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "ce_mean": ce_mean,
        "ce_increase": ce["sae"] - ce["clean"],
        "loss_recovered_zero": recovered(ce["zero"]),
        "loss_recovered_mean": recovered(ce_mean),
    }


@torch.inference_mode()
def spliced_lm_loss(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    texts: Sequence[Any],
    layer: int,
    *,
    chat: bool | None = None,
    system_prompt: str | None = None,
    keep: Keep = "no-prefix",
    max_length: int | None = 512,
    batch_size: int = 4,
    mean_activation: Tensor | Sequence[float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Next-token cross-entropy with layer ``layer``'s output spliced, in four conditions.

    Texts are formatted and tokenized exactly like the harvest (:func:`encode_prompt`, same
    ``chat``/``system_prompt``/``max_length``), and the ``keep`` rule picks the positions K of
    each prompt that are replaced: the SAE never saw the others (BOS, chat prefix), whose
    massive activations it cannot reconstruct, so they stay clean. Conditions:

    - ``clean``: no edit;
    - ``sae``: ``h[K] <- sae(h[K])``;
    - ``zero``: ``h[K] <- 0``;
    - ``mean``: ``h[K] <- mean_activation`` (skipped when it is None).

    Which predictions count: see :data:`CE_POSITIONS` (position t in K with a real token at
    t+1). Batches are right-padded with an attention mask; pads are never spliced or counted.

    Args:
        loaded: the model and tokenizer.
        sae: an SAE with ``d_in`` equal to the model's residual width (and ``cfg.layer``, when
            set, equal to ``layer``).
        texts: strings, dicts with "text", or objects with ``.text``.
        layer: 0-based decoder layer whose output is replaced.
        chat: wrap each text in the chat template; None: when the tokenizer has one.
        system_prompt, keep, max_length: as in the harvest.
        batch_size: prompts per forward pass (memory is about batch * seq * vocab logits).
        mean_activation: ``[d_in]`` mean activation for mean ablation, e.g. from
            :func:`activation_metrics`.
        progress: show a tqdm bar (stderr).

    Returns:
        A JSON-able dict: ``ce_clean``, ``ce_sae``, ``ce_zero``, ``ce_mean`` (nats per counted
        token; ``ce_mean`` None without ``mean_activation``); ``loss_recovered_zero`` =
        100 * (CE_zero - CE_sae) / (CE_zero - CE_clean) and ``loss_recovered_mean`` likewise
        (percent; None when the denominator is 0 or the mean is missing); ``ce_increase`` =
        CE_sae - CE_clean; ``n_tokens`` (counted predictions), ``n_texts``, ``n_texts_skipped``
        (no counted prediction), ``n_spliced_positions`` and the settings used.

    Raises:
        SAEError: SAE width or layer mismatch, no texts, no countable token, non-finite CE.
    """
    layer = _check_splice_args(loaded, sae, texts, layer, keep=keep, batch_size=batch_size)
    use_chat = has_chat_template(loaded.tokenizer) if chat is None else chat
    prepared = _prepare(
        loaded.tokenizer,
        texts,
        chat=use_chat,
        system_prompt=system_prompt,
        keep=keep,
        max_length=max_length,
    )
    if not prepared:
        raise SAEError(
            f"None of the {len(texts)} texts has a token to score under keep='{keep}' (each needs "
            "a kept position followed by another token); use longer texts or a wider keep rule."
        )
    mean_vec = _mean_vector(mean_activation, sae.cfg.d_in)
    totals = _ce_totals(
        loaded, sae, prepared, layer, mean_vec, batch_size=batch_size, progress=progress
    )
    return {
        **_loss_numbers(totals.means(loaded.spec, layer)),
        "n_tokens": totals.n_scored,
        "n_texts": len(prepared),
        "n_texts_skipped": len(texts) - len(prepared),
        "n_spliced_positions": totals.n_spliced,
        "model": loaded.spec,
        "layer": layer,
        "chat": use_chat,
        "system_prompt": system_prompt,
        "keep": keep,
        "max_length": max_length,
        "units": "nats per counted token; loss_recovered_* in percent",
        "positions": CE_POSITIONS,
    }


# --- evaluate and write ------------------------------------------------------------------------


def _plot(hist: dict[str, Any], path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # only when installed (not a dependency)

    edges = hist["log10_edges"]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.stairs(hist["counts"], edges, fill=True)
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} (dead latents: {hist['n_dead']})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def _check_same_weights(
    st: ActivationStore, identity: Mapping[str, Any], loaded: LoadedModel
) -> None:
    """SAEError when the store records weights other than ``loaded``'s (unknown ones pass)."""
    store_weights = identity.get("weights_id") or st.index.get("model", {}).get("weights_id")
    if store_weights not in (None, "", "unknown") and store_weights != loaded.weights_id:
        raise SAEError(
            f"The store {st.directory} was harvested from {st.index['model'].get('spec')} "
            f"(weights {store_weights}), but the model given is {loaded.spec} (weights "
            f"{loaded.weights_id}); splice into the model the activations came from."
        )


def _lm_texts(
    st: ActivationStore, lm_texts: Sequence[Any] | None, max_lm_texts: int | None
) -> Sequence[Any]:
    """``lm_texts``, or the store's own texts; at most ``max_lm_texts`` of them, evenly spaced.

    Raises SAEError when ``lm_texts`` is None and the store records no texts.
    """
    texts: Sequence[Any] = st.texts() if lm_texts is None else lm_texts
    if lm_texts is None and not texts:
        raise SAEError(
            f"The store {st.directory} records no texts (it was written from raw "
            "activations), so there is nothing to splice into; pass lm_texts."
        )
    if max_lm_texts is not None and len(texts) > max_lm_texts:
        # evenly spaced, so every source in the store is represented
        texts = [texts[(i * len(texts)) // max_lm_texts] for i in range(max_lm_texts)]
    return texts


def _store_spliced_loss(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    st: ActivationStore,
    metrics: Mapping[str, Any],
    *,
    lm_texts: Sequence[Any] | None,
    max_lm_texts: int | None,
    lm_batch_size: int,
    progress: bool,
) -> tuple[dict[str, Any], list[str]]:
    """:func:`spliced_lm_loss` at the store's layer with its harvest settings, mean-ablating
    with ``metrics["mean_activation"]``, and the warnings for ``eval.json`` (one when the store
    records no harvest settings).

    Raises:
        SAEError: ``loaded`` is not the store's model, no texts, or as :func:`spliced_lm_loss`.
    """
    identity: dict[str, Any] = st.index.get("identity", {})
    _check_same_weights(st, identity, loaded)
    texts = _lm_texts(st, lm_texts, max_lm_texts)
    warnings: list[str] = []
    if "keep" not in identity:
        warnings.append(
            "The store records no harvest settings (chat, keep, max_length); the spliced "
            "loss used chat=tokenizer default, keep='no-prefix', max_length=512."
        )
    spliced = spliced_lm_loss(
        loaded,
        sae,
        texts,
        st.layer,
        chat=identity.get("chat"),
        system_prompt=identity.get("system_prompt"),
        keep=identity.get("keep", "no-prefix"),
        max_length=identity.get("max_length", 512),
        batch_size=lm_batch_size,
        mean_activation=torch.tensor(metrics["mean_activation"], dtype=torch.float64),
        progress=progress,
    )
    spliced["mean_source"] = f"mean of the {metrics['n_tokens']} evaluated store activations"
    return spliced, warnings


def _plot_fields(
    plot: bool, sae: SparseAutoencoder, st: ActivationStore, hist: dict[str, Any], out: Path
) -> dict[str, str | None]:
    """Write ``out/firing_histogram.png`` when ``plot`` and matplotlib is importable; return
    ``eval.json``'s ``plot`` (the file name or None) and ``plot_note`` (why none, or None)."""
    if plot and importlib.util.find_spec("matplotlib") is not None:
        title = f"SAE d_sae={sae.cfg.d_sae}, layer {st.layer}"
        _plot(hist, out / PLOT_FILE, title)
        return {"plot": PLOT_FILE, "plot_note": None}
    note = "plot turned off" if not plot else "matplotlib is not installed; no plot was made"
    return {"plot": None, "plot_note": note}


def _write_vectors(out: Path, metrics: Mapping[str, Any]) -> None:
    """Write ``out/firing_frequency.json``: the ``[d_sae]`` and ``[d_in]`` vectors, n_tokens."""
    vectors = {
        "firing_frequency": metrics["firing_frequency"],
        "mean_activation": metrics["mean_activation"],
        "n_tokens": metrics["n_tokens"],
    }
    write_bytes_atomic(out / FREQUENCY_FILE, (json.dumps(vectors) + "\n").encode())


def evaluate_sae(
    sae: SparseAutoencoder,
    store: ActivationStore | str | Path,
    out_dir: str | Path,
    *,
    loaded: LoadedModel | None = None,
    lm_texts: Sequence[Any] | None = None,
    max_lm_texts: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4096,
    lm_batch_size: int = 4,
    dense_threshold: float = 0.1,
    hist_bins: int = 50,
    hist_range: tuple[float, float] = (-8.0, 0.0),
    plot: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``sae`` on a held-out activation store (and, given a model, by splicing).

    Runs :func:`activation_metrics` on ``store``; then, when ``loaded`` is given,
    :func:`spliced_lm_loss` at the store's layer on ``lm_texts`` (default: the store's own
    texts, ``max_lm_texts`` of them evenly spaced), formatted with the store's harvest settings
    (chat, system prompt, keep rule, max length), mean-ablating with the store's mean
    activation. Writes into ``out_dir``:

    - ``eval.json``: everything returned except the two vectors below;
    - ``firing_frequency.json``: ``firing_frequency [d_sae]`` and ``mean_activation [d_in]``;
    - ``firing_histogram.png``: only when matplotlib is importable and ``plot``; ``eval.json``
      says in ``plot`` / ``plot_note`` whether one was made.

    Returns:
        ``{"activation": ..., "spliced": ... or None, "sae": cfg, "store": ..., ...}``, with the
        vectors included.

    Raises:
        SAEError: as the two functions above, or a model that is not the store's.
    """
    st = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
    out = Path(out_dir)
    check_sae_fits(sae, store=st)
    metrics = activation_metrics(
        sae,
        st,
        max_tokens=max_tokens,
        batch_size=batch_size,
        dense_threshold=dense_threshold,
        hist_bins=hist_bins,
        hist_range=hist_range,
        progress=progress,
    )
    identity: dict[str, Any] = st.index.get("identity", {})
    spliced: dict[str, Any] | None = None
    warnings: list[str] = []
    if loaded is not None:
        spliced, warnings = _store_spliced_loss(
            loaded,
            sae,
            st,
            metrics,
            lm_texts=lm_texts,
            max_lm_texts=max_lm_texts,
            lm_batch_size=lm_batch_size,
            progress=progress,
        )
    if sae.cfg.keep is not None and sae.cfg.keep != identity.get("keep", sae.cfg.keep):
        warnings.append(
            f"The SAE was trained with keep='{sae.cfg.keep}' but the store uses "
            f"keep='{identity.get('keep')}'."
        )

    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "format": "steerlex-sae-eval",
        "format_version": 1,
        "sae": sae.cfg.to_dict(),
        "store": {
            "directory": str(st.directory),
            "model": st.index.get("model", {}).get("spec"),
            "layer": st.layer,
            "n_tokens": st.n_tokens,
            "keep": identity.get("keep"),
        },
        "activation": {
            k: v for k, v in metrics.items() if k not in ("firing_frequency", "mean_activation")
        },
        "spliced": spliced,
        "spliced_note": (
            "no model given: the spliced-in LM loss was not computed" if loaded is None else None
        ),
        "vectors_file": FREQUENCY_FILE,
        "warnings": warnings,
        **_plot_fields(plot, sae, st, metrics["firing_histogram"], out),
    }
    _write_vectors(out, metrics)
    write_json_atomic(out / EVAL_FILE, result)
    return {**result, "activation": metrics}
