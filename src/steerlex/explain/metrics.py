"""Faithfulness of explanations: does an explanation predict what its feature does?

Two tests, run on the same sampled features for every method so the methods can be
compared (see docs/metrics.md):

- :func:`output_faithfulness` (what a feature *writes*): add feature ``c``'s unit decoder
  direction to the layer-``L`` residual stream at every position of a few neutral raw-text
  prompts, at a few strengths (multiples of the prompts' mean residual norm), and measure
  the change ``Δ = log p_steered − log p_clean`` of every next token at the last position.
  An explanation is faithful when its words' ``Δ`` beats the ``Δ`` of random vocabulary
  words: per feature, the AUROC of explanation words against random words (``0.5`` =
  no better than chance) and the lift (mean ``Δ`` difference, in nats). This is the test
  that matters for steering. Optionally (``generate_tokens > 0``) short greedy
  continuations are generated with the direction added, and the share of features whose
  continuations contain one of their explanation words is reported against random words.
- :func:`input_faithfulness` (what makes a feature *fire*): short texts made of a
  feature's explanation words against texts made of random vocabulary words; per feature,
  the AUROC of the feature's SAE activation (max over the words' tokens). Features that
  stay silent on every text of both kinds tie at ``0.5``; their share is reported.

A word is scored through the first token of its mid-sentence form (``" " + word``); words
with no such token are dropped. Confidence intervals are 95% Student-t intervals of
the mean over features.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from steerlex.core.errors import ExplainError
from steerlex.explain import bias
from steerlex.explain.bias import summarise
from steerlex.models.chat import left_padded, pad_id
from steerlex.models.hooks import check_layer, edit_residual, forward_to_layer, residual_width

__all__ = [
    "NEUTRAL_PROMPTS",
    "FaithfulnessSummary",
    "auroc",
    "best_method",
    "input_faithfulness",
    "mean_ci",
    "output_faithfulness",
    "ranked_features",
    "word_token_ids",
]

#: Raw-text prompts with no topic of their own; the next token is open.
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "The",
    "I think that",
    "Here is a short note about",
    "She said it was",
    "My favourite thing is",
    "In the end, it was all about",
    "We talked for hours about",
    "The next word is",
)

#: Lead-in of every input-side text; activations are read only after it.
INPUT_PREFIX = "Words:"


# --- small statistics --------------------------------------------------------------------


def auroc(pos: Sequence[float] | Tensor, neg: Sequence[float] | Tensor) -> float:
    """P(a positive scores above a negative), ties counting one half (Mann–Whitney).

    Raises:
        ExplainError: an empty side.
    """
    p = torch.as_tensor(pos, dtype=torch.float64).flatten()
    n = torch.as_tensor(neg, dtype=torch.float64).flatten()
    if p.numel() == 0 or n.numel() == 0:
        raise ExplainError("auroc needs at least one positive and one negative value.")
    greater = (p[:, None] > n[None, :]).sum().item()
    ties = (p[:, None] == n[None, :]).sum().item()
    return float((greater + 0.5 * ties) / (p.numel() * n.numel()))


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and a 95% t-interval (:func:`bias.summarise`).

    One value gives a zero-width interval; no values give NaNs.
    """
    if not values:
        return (math.nan, math.nan, math.nan)
    s = summarise(list(values))
    if s.ci_low is None or s.ci_high is None:
        return (s.mean, s.mean, s.mean)
    return (s.mean, s.ci_low, s.ci_high)


@dataclass
class FaithfulnessSummary:
    """One method's faithfulness over the sampled features (JSON via :meth:`to_dict`)."""

    method: str
    side: str
    n_features: int
    auroc_mean: float
    auroc_ci: tuple[float, float]
    share_above_chance: float
    n_scored: int
    extra: dict[str, Any] = field(default_factory=dict)
    per_feature: dict[int, float] = field(default_factory=dict)

    def to_dict(self, with_features: bool = True) -> dict[str, Any]:
        out = asdict(self)
        out["auroc_ci"] = list(self.auroc_ci)
        out["per_feature"] = (
            {str(k): v for k, v in self.per_feature.items()} if with_features else {}
        )
        return out


def _summary(
    method: str, side: str, n_features: int, per: dict[int, float], extra: dict[str, Any]
) -> FaithfulnessSummary:
    vals = list(per.values())
    mean, lo, hi = mean_ci(vals)
    above = sum(1 for v in vals if v > 0.5) / len(vals) if vals else math.nan
    return FaithfulnessSummary(
        method=method,
        side=side,
        n_features=n_features,
        auroc_mean=mean,
        auroc_ci=(lo, hi),
        share_above_chance=above,
        n_scored=len(vals),
        extra=extra,
        per_feature=per,
    )


# --- inputs ------------------------------------------------------------------------------


def _unpack(loaded: Any) -> tuple[nn.Module, Any]:
    if isinstance(loaded, tuple) and len(loaded) == 2:
        return loaded[0], loaded[1]
    if hasattr(loaded, "model") and hasattr(loaded, "tokenizer"):
        return loaded.model, loaded.tokenizer
    raise ExplainError(
        f"Pass a LoadedModel or a (model, tokenizer) pair, got {type(loaded).__name__}."
    )


def _check_sae(sae: Any, model: nn.Module) -> int:
    cfg = getattr(sae, "cfg", None)
    if cfg is None or not callable(getattr(sae, "encode", None)):
        raise ExplainError("The SAE has no cfg / encode; is it a steerlex SparseAutoencoder?")
    width = residual_width(model)
    if cfg.d_in != width:
        raise ExplainError(
            f"Width mismatch: the SAE takes d_in={cfg.d_in} (trained on {cfg.model_spec}) but "
            f"the model's residual width is {width}; pass the SAE trained for this model."
        )
    if cfg.layer is None:
        raise ExplainError(
            "The SAE records no layer; faithfulness needs the layer it reads and writes."
        )
    return check_layer(model, int(cfg.layer))


def _check_features(features: Sequence[int], d_sae: int) -> list[int]:
    ids = [int(f) for f in features]
    if not ids:
        raise ExplainError("No features to score; pass at least one feature id.")
    bad = [f for f in ids if not 0 <= f < d_sae]
    if bad:
        raise ExplainError(
            f"Feature ids {bad[:5]} are out of range; this SAE has features 0..{d_sae - 1}."
        )
    return ids


def _check_explanations(
    explanations: Mapping[str, Mapping[int, Sequence[str]]],
) -> dict[str, dict[int, list[str]]]:
    if not explanations:
        raise ExplainError("No explanations given; pass {method: {feature: words}}.")
    out: dict[str, dict[int, list[str]]] = {}
    for method, by_feature in explanations.items():
        out[str(method)] = {
            int(c): [w for w in words if isinstance(w, str) and w.strip()]
            for c, words in by_feature.items()
        }
    return out


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExplainError(f"{name} must be a positive integer, got {value!r}.")
    return value


def word_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int | None]:
    """The first token id of each word's mid-sentence form ``" " + word`` (None if empty)."""
    out: list[int | None] = []
    for w in words:
        ids = tokenizer.encode(" " + w.strip(), add_special_tokens=False)
        out.append(int(ids[0]) if ids else None)
    return out


def _encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    if isinstance(prompts, str) or not prompts:
        raise ExplainError("prompts must be a non-empty sequence of strings.")
    seqs = [list(tokenizer.encode(p)) for p in prompts]
    empty = [p for p, s in zip(prompts, seqs, strict=True) if not s]
    if empty:
        raise ExplainError(f"Prompt {empty[0]!r} encodes to no tokens; give non-empty prompts.")
    return seqs


def _unit_directions(sae: Any, ids: Sequence[int]) -> Tensor:
    w = sae.W_dec.detach()[list(ids)].to(torch.float32)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


# --- output side -------------------------------------------------------------------------


def _add_rows(delta: Tensor) -> Any:
    """An edit that adds row ``i`` of ``delta [B, d]`` to every position of batch row ``i``."""

    def fn(h: Tensor) -> Tensor:
        return h + delta.to(h.dtype)[:, None, :]

    return fn


def _last_logprobs(
    model: nn.Module, ids: Tensor, mask: Tensor, pos: Tensor, layer: int, delta: Tensor | None
) -> Tensor:
    with ExitStack() as stack:
        if delta is not None:
            stack.enter_context(edit_residual(model, layer, _add_rows(delta)))
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1
        )
    return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)


def _check_strengths(strengths: Sequence[float]) -> None:
    """Raise :class:`ExplainError` unless ``strengths`` is non-empty, positive and finite."""
    if not strengths or any(not math.isfinite(float(s)) or float(s) <= 0 for s in strengths):
        raise ExplainError(f"strengths must be positive numbers, got {list(strengths)!r}.")


def _random_pool(vocab_words: Sequence[str], n_random: int) -> list[str]:
    """The non-blank strings of ``vocab_words``, in order: where random words are drawn.

    Raises:
        ExplainError: fewer than ``n_random`` of them.
    """
    pool = [w for w in vocab_words if isinstance(w, str) and w.strip()]
    if len(pool) < n_random:
        raise ExplainError(
            f"vocab_words has {len(pool)} usable words but n_random={n_random}; pass a larger "
            "vocabulary or lower n_random."
        )
    return pool


def _residual_scale(model: nn.Module, ids: Tensor, mask: Tensor, layer: int) -> float:
    """Mean L2 norm of the layer-``layer`` residual over the real tokens of the prompts.

    ``ids``/``mask [P, T]`` are left-padded prompts. The first token of each prompt (an
    attention sink in many models) is left out, unless that leaves no token at all.
    """
    resid = forward_to_layer(model, ids, mask, layer=layer)
    keep = mask.bool().clone()
    first = keep.float().argmax(dim=1)
    keep[torch.arange(ids.shape[0]), first] = False
    if not bool(keep.any()):
        keep = mask.bool()
    return float(resid.float().norm(dim=-1)[keep].mean())


def _mean_deltas(
    model: nn.Module,
    prompts: tuple[Tensor, Tensor, Tensor],
    layer: int,
    clean: Tensor,
    dirs: Tensor,
    *,
    strengths: Sequence[float],
    scale: float,
    batch_size: int,
    progress: bool,
) -> Tensor:
    """``[F, V]`` float32 (CPU): mean ``Δ = log p_steered − log p_clean`` per feature.

    ``prompts``: ``(input_ids, attention_mask, position_ids)`` ``[P, T]`` of the prompts;
    ``clean [P, V]``: their unsteered next-token log-probabilities; ``dirs [F, d]``: unit
    directions, each added at every position with norm ``strength * scale`` for each of
    ``strengths``. ``Δ`` at the last position is averaged over prompts, then over
    strengths. About ``batch_size`` sequences per forward pass.
    """
    p_ids, p_mask, p_pos = prompts
    n_prompts = p_ids.shape[0]
    deltas = torch.zeros((dirs.shape[0], clean.shape[-1]), dtype=torch.float32)
    feats_per_batch = max(1, batch_size // n_prompts)
    rows = [(f, s) for f in range(dirs.shape[0]) for s in strengths]
    bar = tqdm(total=len(rows), desc="output faithfulness", unit="edit", disable=not progress)
    for r0, r1 in _batches(len(rows), feats_per_batch):
        chunk = rows[r0:r1]
        delta = torch.stack([dirs[f] * (float(s) * scale) for f, s in chunk]).repeat_interleave(
            n_prompts, dim=0
        )
        n = len(chunk)
        lp = _last_logprobs(
            model,
            p_ids.repeat(n, 1),
            p_mask.repeat(n, 1),
            p_pos.repeat(n, 1),
            layer,
            delta,
        )
        d = (lp - clean.repeat(n, 1)).view(n, n_prompts, -1).mean(dim=1).cpu()
        for j, (f, _s) in enumerate(chunk):
            deltas[f] += d[j] / len(strengths)
        bar.update(n)
    bar.close()
    return deltas


def _continuations(
    model: nn.Module,
    tok: Any,
    layer: int,
    seqs: Sequence[Sequence[int]],
    dirs: Tensor,
    norm: float,
    *,
    new_tokens: int,
    batch_size: int,
    pad: int,
    progress: bool,
) -> tuple[list[list[str]], list[str]]:
    """Greedy continuations of the prompts ``seqs``: ``(steered [F][P], clean [P])``.

    Steered: each unit direction of ``dirs [F, d]`` times ``norm`` added at every
    position; clean: nothing added. Both are empty when ``new_tokens <= 0``.
    """
    if new_tokens <= 0:
        return [], []
    clean = _steered_continuations(
        model,
        tok,
        layer,
        seqs,
        torch.zeros((1, dirs.shape[1]), dtype=dirs.dtype, device=dirs.device),
        new_tokens,
        batch_size,
        pad,
        False,
    )[0]
    texts = _steered_continuations(
        model, tok, layer, seqs, dirs * norm, new_tokens, batch_size, pad, progress
    )
    return texts, clean


@dataclass(frozen=True)
class _EditEffects:
    """What the features' edits do (:func:`_edit_effects`).

    ``scale``: the prompts' mean residual norm at the layer; ``deltas [F, V]`` float32:
    mean ``Δ`` log-probability of every next token per feature (:func:`_mean_deltas`);
    ``vocab_size``: ``V``, the width of the logits; ``texts [F][P]`` / ``clean_texts [P]``:
    steered and clean continuations (empty without ``generate_tokens``).
    """

    scale: float
    deltas: Tensor
    vocab_size: int
    texts: list[list[str]]
    clean_texts: list[str]


def _edit_effects(
    model: nn.Module,
    tok: Any,
    sae: Any,
    layer: int,
    ids: Sequence[int],
    seqs: Sequence[Sequence[int]],
    *,
    strengths: Sequence[float],
    generate_tokens: int,
    batch_size: int,
    progress: bool,
) -> _EditEffects:
    """Add each feature's unit decoder direction at ``layer`` and measure the effect.

    ``seqs``: the token ids of the prompts. The direction of feature ``ids[i]`` is added
    at every position with norm ``strength * scale`` (``scale``: the prompts' mean
    residual norm, :func:`_residual_scale`); continuations use the largest strength.
    """
    device = next(model.parameters()).device
    pad = pad_id(tok)
    p_ids, p_mask, p_pos = (t.to(device) for t in left_padded(seqs, pad))
    with torch.no_grad():
        clean = _last_logprobs(model, p_ids, p_mask, p_pos, layer, None)  # [P, V]
        scale = _residual_scale(model, p_ids, p_mask, layer)
        dirs = _unit_directions(sae, ids).to(device)
        deltas = _mean_deltas(
            model,
            (p_ids, p_mask, p_pos),
            layer,
            clean,
            dirs,
            strengths=strengths,
            scale=scale,
            batch_size=batch_size,
            progress=progress,
        )
        texts, clean_texts = _continuations(
            model,
            tok,
            layer,
            seqs,
            dirs,
            max(float(s) for s in strengths) * scale,
            new_tokens=generate_tokens,
            batch_size=batch_size,
            pad=pad,
            progress=progress,
        )
    return _EditEffects(scale, deltas, clean.shape[-1], texts, clean_texts)


class _WordTokens:
    """Sorted unique token ids of words (:func:`word_token_ids`), cached across calls.

    Words with no token, or whose token id is ``>= vocab_size`` (outside the logits),
    contribute nothing.
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._cache: dict[str, int | None] = {}

    def __call__(self, words: Sequence[str]) -> list[int]:
        missing = [w for w in words if w not in self._cache]
        for w, t in zip(missing, word_token_ids(self._tokenizer, missing), strict=True):
            self._cache[w] = t if t is not None and t < self._vocab_size else None
        return sorted({t for w in words if (t := self._cache[w]) is not None})


def _score_method(
    by_feature: Mapping[int, list[str]],
    ids: Sequence[int],
    effects: _EditEffects,
    random_words: Mapping[int, Sequence[str]],
    tokens_of: _WordTokens,
    n_words: int,
) -> tuple[dict[int, float], dict[str, Any]]:
    """One method's per-feature AUROC ``{feature: AUROC}`` and its ``extra`` statistics.

    ``effects``: the edits of the features ``ids`` (:func:`_edit_effects`; without
    continuations, no generation statistics); ``random_words[c]``: the random words of
    feature ``c``; ``n_words``: explanation words used. ``extra`` holds the lift
    (nats), the specificity, ``unscorable_features`` and, with generations, the steered
    and clean hit rates; a feature with no scorable explanation or random word is left
    out of the AUROC, lift and specificity.
    """
    deltas, texts, clean_texts = effects.deltas, effects.texts, effects.clean_texts
    per: dict[int, float] = {}
    lifts: list[float] = []
    specific: list[float] = []
    hits: list[float] = []
    clean_h: list[float] = []
    unscorable = 0
    for i, c in enumerate(ids):
        words = by_feature.get(c, [])[:n_words]
        if texts and words:
            hits.append(_hit(texts[i], words))
            clean_h.append(_hit(clean_texts, words))
        pos_t = tokens_of(words)
        neg_t = [t for t in tokens_of(random_words[c]) if t not in set(pos_t)]
        if not pos_t or not neg_t:
            unscorable += 1
            continue
        dp, dn = deltas[i, pos_t], deltas[i, neg_t]
        per[c] = auroc(dp, dn)
        lifts.append(float(dp.mean() - dn.mean()))
        if len(ids) > 1:
            # Frequency-free control: the same words under the other features' edits.
            own = deltas[i, pos_t].mean()
            others = torch.cat([deltas[:i, pos_t], deltas[i + 1 :, pos_t]]).mean(dim=1)
            specific.append(auroc(own[None], others))
    lift_mean, lift_lo, lift_hi = mean_ci(lifts)
    spec_mean, spec_lo, spec_hi = mean_ci(specific)
    extra: dict[str, Any] = {
        "lift_nats_mean": lift_mean,
        "lift_nats_ci": [lift_lo, lift_hi],
        "specificity_mean": spec_mean,
        "specificity_ci": [spec_lo, spec_hi],
        "unscorable_features": unscorable,
    }
    if texts:
        extra["generation_hit_rate"] = sum(hits) / len(hits) if hits else math.nan
        extra["generation_clean_hit_rate"] = sum(clean_h) / len(clean_h) if clean_h else math.nan
    return per, extra


def output_faithfulness(
    loaded: Any,
    sae: Any,
    explanations: Mapping[str, Mapping[int, Sequence[str]]],
    features: Sequence[int],
    vocab_words: Sequence[str],
    *,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    strengths: Sequence[float] = (0.5, 1.0),
    n_words: int = 10,
    n_random: int = 50,
    generate_tokens: int = 0,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, FaithfulnessSummary]:
    """Output-side faithfulness of each method's explanations of ``features``.

    Args:
        loaded: a LoadedModel or ``(model, tokenizer)``.
        sae: the SAE the explanations describe (its ``cfg.layer`` is where directions go).
        explanations: ``{method: {feature: ranked words}}``; the first ``n_words`` count.
        features: feature ids scored (the same for every method).
        vocab_words: where random comparison words come from (``n_random`` per feature,
            drawn with ``seed`` and shared by all methods).
        prompts: raw-text prompts (no chat template).
        strengths: added norms, as multiples of the prompts' mean residual norm at layer L
            (the first position, an attention sink in many models, is left out of the mean);
            ``Δ`` is averaged over prompts and strengths.
        generate_tokens: if > 0, greedy continuations of this many tokens at the largest
            strength, checked for explanation words (``extra["generation_hit_rate"]``,
            against ``extra["generation_random_hit_rate"]`` for the random words).

    Returns:
        ``{method: FaithfulnessSummary}`` with per-feature AUROC and, in ``extra``, the mean
        lift in nats with its interval, the count of features with no scorable word, and the
        **specificity**: the share of the other sampled features whose edit raises this
        feature's explanation words (mean ``Δ``) less than its own edit does (0.5 = chance).
        Specificity compares the same words under different edits, so it is free of word
        frequency, which the random-word AUROC is not (frequent words react differently to
        any edit). With ``generate_tokens``, ``extra["generation_clean_hit_rate"]`` is the
        same check on unsteered continuations (the control for words that appear anyway,
        such as "the").
    """
    model, tok = _unpack(loaded)
    layer = _check_sae(sae, model)
    ids = _check_features(features, sae.cfg.d_sae)
    expl = _check_explanations(explanations)
    n_words = _check_positive("n_words", n_words)
    n_random = _check_positive("n_random", n_random)
    batch_size = _check_positive("batch_size", batch_size)
    _check_strengths(strengths)
    pool = _random_pool(vocab_words, n_random)
    seqs = _encode_prompts(tok, prompts)
    effects = _edit_effects(
        model,
        tok,
        sae,
        layer,
        ids,
        seqs,
        strengths=strengths,
        generate_tokens=generate_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    rng = random.Random(seed)
    random_words = {c: rng.sample(pool, n_random) for c in ids}
    tokens_of = _WordTokens(tok, effects.vocab_size)
    out: dict[str, FaithfulnessSummary] = {}
    for method, by_feature in expl.items():
        per, extra = _score_method(by_feature, ids, effects, random_words, tokens_of, n_words)
        out[method] = _summary(method, "output", len(ids), per, extra)
    texts = effects.texts
    if texts:
        gen_random = [_hit(texts[i], random_words[c][:n_words]) for i, c in enumerate(ids)]
        rate = sum(gen_random) / len(gen_random)
        for s in out.values():
            s.extra["generation_random_hit_rate"] = rate
    settings = {
        "prompts": list(prompts),
        "strengths": [float(s) for s in strengths],
        "residual_norm": effects.scale,
        "n_words": n_words,
        "n_random": n_random,
        "seed": seed,
        "generate_tokens": generate_tokens,
    }
    for s in out.values():
        s.extra["settings"] = settings
    return out


def _words_in(text: str) -> set[str]:
    out: set[str] = set()
    cur: list[str] = []
    for ch in text.lower() + " ":
        if ch.isalpha():
            cur.append(ch)
        elif cur:
            out.add("".join(cur))
            cur = []
    return out


def _hit(continuations: Sequence[str], words: Sequence[str]) -> float:
    """1.0 if any continuation contains one of ``words`` as a whole word, else 0.0."""
    wanted = {w.strip().lower() for w in words}
    return float(any(wanted & _words_in(t) for t in continuations))


def _steered_continuations(
    model: nn.Module,
    tok: Any,
    layer: int,
    seqs: Sequence[Sequence[int]],
    deltas: Tensor,
    new_tokens: int,
    batch_size: int,
    pad: int,
    progress: bool,
) -> list[list[str]]:
    """Greedy continuations of every prompt with each row of ``deltas`` added: ``[F][P]``."""
    n_prompts = len(seqs)
    ids, mask, _pos = left_padded(seqs, pad)
    ids, mask = ids.to(deltas.device), mask.to(deltas.device)
    out: list[list[str]] = []
    bar = tqdm(total=deltas.shape[0], desc="steered generations", disable=not progress)
    for f0, f1 in _batches(deltas.shape[0], max(1, batch_size // n_prompts)):
        n = f1 - f0
        delta = deltas[f0:f1].repeat_interleave(n_prompts, dim=0)
        with edit_residual(model, layer, _add_rows(delta)):
            gen = model.generate(  # type: ignore[operator]
                input_ids=ids.repeat(n, 1),
                attention_mask=mask.repeat(n, 1),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        decoded = tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
        out.extend(decoded[j * n_prompts : (j + 1) * n_prompts] for j in range(n))
        bar.update(n)
    bar.close()
    return out


# --- input side --------------------------------------------------------------------------


def _text_tokens(tok: Any, words: Sequence[str]) -> tuple[list[int], int]:
    """Token ids of ``INPUT_PREFIX + " w1 w2 ..."`` and the number of prefix tokens."""
    prefix = list(tok.encode(INPUT_PREFIX))
    body = tok.encode("".join(" " + w.strip() for w in words), add_special_tokens=False)
    return prefix + list(body), len(prefix)


def _max_activations(
    model: nn.Module,
    sae: Any,
    layer: int,
    texts: Sequence[tuple[list[int], int]],
    batch_size: int,
    pad: int,
    progress: bool,
) -> Tensor:
    """``[T, C]``: each text's largest SAE activation of every feature after its prefix.

    Texts are right-padded (positions stay 0..n-1; causal attention keeps pads out).
    """
    device = next(model.parameters()).device
    out = torch.zeros((len(texts), sae.cfg.d_sae), dtype=torch.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i][0]))
    bar = tqdm(total=len(texts), desc="input faithfulness", unit="text", disable=not progress)
    for b0, b1 in _batches(len(order), batch_size):
        idx = order[b0:b1]
        width = max(len(texts[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        keep = torch.zeros((len(idx), width), dtype=torch.bool)
        for j, i in enumerate(idx):
            seq, n_prefix = texts[i]
            ids[j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[j, : len(seq)] = 1
            keep[j, n_prefix : len(seq)] = True
        with torch.no_grad():
            h = forward_to_layer(model, ids.to(device), mask.to(device), layer=layer)
            acts = sae.encode(h[keep.to(device)].to(sae.W_enc.dtype)).float().cpu()
        rows = keep.nonzero()[:, 0]
        best = torch.zeros((len(idx), acts.shape[1]), dtype=torch.float32)
        best.scatter_reduce_(0, rows[:, None].expand_as(acts), acts, reduce="amax")
        out[torch.tensor(idx)] = best
        bar.update(len(idx))
    bar.close()
    return out


def _sample_texts(
    rng: random.Random, words: Sequence[str], n_texts: int, per_text: int
) -> list[list[str]]:
    """``n_texts`` word lists of ``per_text`` words drawn from ``words``.

    Without replacement inside a text when there are enough words, with replacement
    otherwise.
    """
    pool = list(words)
    if len(pool) >= per_text:
        return [rng.sample(pool, per_text) for _ in range(n_texts)]
    return [[rng.choice(pool) for _ in range(per_text)] for _ in range(n_texts)]


def input_faithfulness(
    loaded: Any,
    sae: Any,
    explanations: Mapping[str, Mapping[int, Sequence[str]]],
    features: Sequence[int],
    vocab_words: Sequence[str],
    *,
    n_words: int = 10,
    texts_per_feature: int = 8,
    words_per_text: int = 5,
    n_random_texts: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, FaithfulnessSummary]:
    """Input-side faithfulness of each method's explanations of ``features``.

    For each method and feature, ``texts_per_feature`` texts ``"Words: w1 w2 ..."`` of
    ``words_per_text`` words drawn from the feature's first ``n_words`` explanation words,
    against ``n_random_texts`` texts of random ``vocab_words`` (shared by all features and
    methods; ``seed`` fixes every draw). The feature's activation on a text is its largest
    SAE activation over the words' tokens; AUROC explanation texts vs random texts.

    Returns:
        ``{method: FaithfulnessSummary}``; ``extra["silent_share"]`` is the share of scored
        features that never fired on either kind of text (they tie at AUROC 0.5) and
        ``extra["fires_share"]`` the share that fired on at least one explanation text.
    """
    model, tok = _unpack(loaded)
    layer = _check_sae(sae, model)
    ids = _check_features(features, sae.cfg.d_sae)
    expl = _check_explanations(explanations)
    n_words = _check_positive("n_words", n_words)
    texts_per_feature = _check_positive("texts_per_feature", texts_per_feature)
    words_per_text = _check_positive("words_per_text", words_per_text)
    n_random_texts = _check_positive("n_random_texts", n_random_texts)
    batch_size = _check_positive("batch_size", batch_size)
    pool = [w for w in vocab_words if isinstance(w, str) and w.strip()]
    if len(pool) < words_per_text:
        raise ExplainError(
            f"vocab_words has {len(pool)} usable words; need at least words_per_text="
            f"{words_per_text}."
        )
    rng = random.Random(seed)
    random_texts = _sample_texts(rng, pool, n_random_texts, words_per_text)
    texts: list[tuple[list[int], int]] = [_text_tokens(tok, t) for t in random_texts]
    slots: dict[tuple[str, int], tuple[int, int]] = {}
    for method, by_feature in expl.items():
        for c in ids:
            words = by_feature.get(c, [])[:n_words]
            if not words:
                continue
            start = len(texts)
            f_rng = random.Random(f"{seed}:{method}:{c}")
            texts.extend(
                _text_tokens(tok, t)
                for t in _sample_texts(f_rng, words, texts_per_feature, words_per_text)
            )
            slots[(method, c)] = (start, len(texts))
    pad = pad_id(tok)
    acts = _max_activations(model, sae, layer, texts, batch_size, pad, progress)
    neg_all = acts[:n_random_texts]
    out: dict[str, FaithfulnessSummary] = {}
    for method in expl:
        per: dict[int, float] = {}
        silent = fires = 0
        for c in ids:
            if (method, c) not in slots:
                continue
            a, b = slots[(method, c)]
            pos, neg = acts[a:b, c], neg_all[:, c]
            per[c] = auroc(pos, neg)
            silent += int(not bool((pos > 0).any()) and not bool((neg > 0).any()))
            fires += int(bool((pos > 0).any()))
        n = len(per)
        extra: dict[str, Any] = {
            "silent_share": silent / n if n else math.nan,
            "fires_share": fires / n if n else math.nan,
            "features_without_words": len(ids) - n,
            "settings": {
                "n_words": n_words,
                "texts_per_feature": texts_per_feature,
                "words_per_text": words_per_text,
                "n_random_texts": n_random_texts,
                "prefix": INPUT_PREFIX,
                "seed": seed,
            },
        }
        out[method] = _summary(method, "input", len(ids), per, extra)
    return out


# --- everything at once ------------------------------------------------------------------


def sample_features(
    explanations: Mapping[str, Mapping[int, Sequence[str]]], n: int, seed: int = 0
) -> list[int]:
    """``n`` feature ids (sorted) drawn with ``seed`` from those every method explains with
    at least one word; all of them when there are fewer."""
    if not explanations:
        raise ExplainError("No explanations given; pass {method: {feature: words}}.")
    n = _check_positive("n", n)
    common = set.intersection(
        *({c for c, words in by.items() if words} for by in explanations.values())
    )
    if not common:
        raise ExplainError(
            "No feature has words under every method; explain the same SAE with each method."
        )
    pool = sorted(common)
    return sorted(random.Random(seed).sample(pool, min(n, len(pool))))


def evaluate_explanations(
    loaded: Any,
    sae: Any,
    explanations: Mapping[str, Mapping[int, Sequence[str]]],
    vocab_words: Sequence[str],
    *,
    n_features: int = 100,
    seed: int = 0,
    strengths: Sequence[float] = (0.5, 1.0),
    n_words: int = 10,
    generate_tokens: int = 0,
    subset_size: int = 50,
    encoder: Any = None,
    levels: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Every explanation metric on the same sampled features, as one JSON-ready dict.

    Output- and input-side faithfulness (this module), the paper's frequency-bias
    metrics on equal-size random feature subsets, the superficial-word share and the
    linguistic level of each explanation (:mod:`steerlex.explain.bias`; ``levels=False``
    skips the sentence-embedding model).
    """
    features = sample_features(explanations, n_features, seed)
    out_f = output_faithfulness(
        loaded, sae, explanations, features, vocab_words, strengths=strengths,
        n_words=n_words, generate_tokens=generate_tokens, seed=seed, progress=progress,
    )  # fmt: skip
    in_f = input_faithfulness(
        loaded, sae, explanations, features, vocab_words, n_words=n_words, seed=seed,
        progress=progress,
    )  # fmt: skip
    lists = {m: {c: tuple(w) for c, w in by.items() if w} for m, by in explanations.items()}
    # Frequency bias over every feature all methods explain, in equal-size subsets.
    common = sorted(set.intersection(*(set(v) for v in lists.values())))
    size = min(subset_size, len(common))
    frequency: dict[str, Any]
    superficial: dict[str, Any]
    try:
        frequency = bias.compare_methods(
            lists, vocab_words, features=common, subset_size=size, seed=seed
        ).to_dict()
        superficial = {
            m: bias.superficial_share(lists[m], vocab_words, features=features).to_dict()
            for m in lists
        }
    except ExplainError as exc:  # e.g. a vocabulary too small to have non-superficial words
        warnings.warn(f"frequency-bias metrics skipped: {exc}", stacklevel=2)
        frequency = superficial = {"skipped": str(exc)}
    result: dict[str, Any] = {
        "features": features,
        "methods": sorted(explanations),
        "output_faithfulness": {m: s.to_dict() for m, s in out_f.items()},
        "input_faithfulness": {m: s.to_dict() for m, s in in_f.items()},
        "frequency_bias": frequency,
        "superficial_share": superficial,
    }
    if levels:
        result["levels"] = {
            m: bias.linguistic_levels(
                lists[m], vocab_words, encoder=encoder, features=features, seed=seed,
                progress=progress,
            ).to_dict()
            for m in lists
        }  # fmt: skip
    return result


# --- reading a result back: which method and which features did best ------------------------


def _finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _side_key(side: str) -> str:
    if side not in ("output", "input"):
        raise ExplainError(f"side must be 'output' or 'input', got {side!r}.")
    return f"{side}_faithfulness"


def best_method(result: Mapping[str, Any], side: str = "output") -> str | None:
    """The method of :func:`evaluate_explanations`' ``result`` (or its ``metrics.json``) with
    the highest mean ``side``-side AUROC; ties go to the first in ``result["methods"]``.
    ``None`` when no method has a finite mean on that side."""
    block = result.get(_side_key(side))
    if not isinstance(block, Mapping):
        return None
    order = [m for m in result.get("methods") or [] if m in block] or sorted(block)
    scored = [
        (mean, -i, m)
        for i, m in enumerate(order)
        if isinstance(block.get(m), Mapping)
        and (mean := _finite_number(block[m].get("auroc_mean"))) is not None
    ]
    return max(scored)[2] if scored else None


def ranked_features(
    result: Mapping[str, Any], method: str, side: str = "output"
) -> list[tuple[int, float]]:
    """``(feature, AUROC)`` of every feature ``method`` was scored on, on ``side``, most
    faithful first (ties: the lower feature id first). Features without a finite per-feature
    AUROC (``per_feature`` missing, or written without features) are left out."""
    per = _get_mapping(result, _side_key(side), method, "per_feature")
    pairs = []
    for key, value in per.items():
        v = _finite_number(value)
        if v is not None and str(key).lstrip("-").isdigit():
            pairs.append((int(key), v))
    return sorted(pairs, key=lambda p: (-p[1], p[0]))


def _get_mapping(data: Any, *keys: str) -> Mapping[str, Any]:
    """``data[k1][k2]...`` when every level is a mapping, else an empty mapping."""
    for k in keys:
        data = data.get(k) if isinstance(data, Mapping) else None
    return data if isinstance(data, Mapping) else {}


def _fmt_ci(d: Mapping[str, Any], key: str = "auroc") -> str:
    mean, ci = d.get(f"{key}_mean"), d.get(f"{key}_ci")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def metrics_table(result: Mapping[str, Any]) -> str:
    """A markdown table (one row per method) of :func:`evaluate_explanations`' result."""
    head = (
        "| method | output AUROC [95% CI] | output lift (nats) | output specificity "
        "| input AUROC [95% CI] "
        "| input silent | Diversity ↑ | Lexical ↓ | Dominate ↓ | superficial share (vocab) "
        "| levels sem / lex / morph / unclear |\n"
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|\n"
    )
    rows = []
    bias_m = result.get("frequency_bias", {}).get("methods", {})
    for m in result.get("methods", []):
        o = result.get("output_faithfulness", {}).get(m, {})
        i = result.get("input_faithfulness", {}).get(m, {})
        summ = bias_m.get(m, {}).get("summary", {})

        def metric(name: str, summ: Mapping[str, Any] = summ) -> str:
            v = summ.get(name, {}).get("mean")
            return "–" if v is None else f"{v:.3f}"

        sup = result.get("superficial_share", {}).get(m, {})
        sup_s = (
            f"{sup['listed_share']:.2f} ({sup['vocab_share']:.2f})"
            if "listed_share" in sup
            else "–"
        )
        lev = result.get("levels", {}).get(m, {}).get("shares", {})
        lev_s = (
            " / ".join(
                f"{lev.get(k, 0.0):.2f}"
                for k in ("semantic", "lexical", "morphological", "unclear")
            )
            if lev
            else "–"
        )
        lift = o.get("extra", {}).get("lift_nats_mean")
        silent = i.get("extra", {}).get("silent_share")
        rows.append(
            f"| {m} | {_fmt_ci(o)} | {'–' if lift is None else f'{lift:.3f}'} "
            f"| {_fmt_ci(o.get('extra', {}), 'specificity')} | {_fmt_ci(i)} "
            f"| {'–' if silent is None else f'{silent:.2f}'} | {metric('diversity')} "
            f"| {metric('lexical')} | {metric('dominate')} | {sup_s} | {lev_s} |"
        )
    n = len(result.get("features", []))
    return f"{head}{chr(10).join(rows)}\n\n{n} sampled features; AUROC 0.5 = chance.\n"


def examples_table(
    explanations: Mapping[str, Mapping[int, Sequence[str]]],
    features: Sequence[int],
    *,
    n_words: int = 8,
) -> str:
    """A markdown table of ``features`` explained by every method side by side."""
    methods = sorted(explanations)
    head = "| feature | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods) + "\n"
    rows = []
    for c in features:
        cells = []
        for m in methods:
            words = [w.strip().replace("|", "\\|") for w in explanations[m].get(c, [])[:n_words]]
            cells.append(", ".join(w or "␣" for w in words) or "–")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"
