"""Output-side mutual-information explanations of SAE features over a fixed vocabulary.

Notation (see ``docs/mi.md``): ``C`` features, ``M`` vocabulary words, width ``d``.

- ``features [C, d]``: one vector per feature (:func:`feature_vectors`: decoder rows or
  encoder columns, by default passed through the model's final norm);
- ``words [M, d]``: one vector per word (e.g. the mean unembedding row of its tokens);
- affinity ``S[c, w] = f_c · e_w``;
- ``log p(w|c) = S/alpha − logsumexp_w(S/alpha)`` (softmax over words);
- ``log p(c|w) = S/beta − logsumexp_c(S/beta)`` (softmax over features);
- ``score="paper"``: ``p(w|c) · log p(c|w)`` (the released code's formula, kept for
  reproduction; it is ≤ 0 and ranks the *least* aligned words first);
- ``score="mi"``: ``p(w|c) · (log p(c|w) − log p(c))``, the per-pair mutual-information
  term, ``p(c)`` uniform or given as ``log_p_c``.

:func:`mi_scores` never materialises ``S`` for all ``C × M`` pairs: it walks over slabs of
words, computes the per-word normaliser over all features for the slab, scores the slab and
merges it into a running top-K per feature (see the function's docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from steerlex.core.errors import ExplainError

__all__ = [
    "AffinityStats",
    "ExplainError",
    "Score",
    "Side",
    "Transform",
    "affinity_stats",
    "effective_words",
    "feature_vectors",
    "final_norm_module",
    "mi_scores",
]

Score = Literal["mi", "paper"]
Side = Literal["decoder", "encoder"]
Transform = Literal["final_norm", "identity"]

SCORES: tuple[Score, ...] = ("mi", "paper")
SIDES: tuple[Side, ...] = ("decoder", "encoder")
TRANSFORMS: tuple[Transform, ...] = ("final_norm", "identity")

# Dotted paths of the final norm (applied before the unembedding), most specific first.
_FINAL_NORM_PATHS: tuple[str, ...] = (
    "model.norm",  # Llama, Mistral, Qwen2/3, Gemma text, Phi-3, OLMo, ...
    "model.language_model.norm",  # Gemma3ForConditionalGeneration, Llava, Qwen2-VL, ...
    "transformer.ln_f",  # GPT-2, GPT-J, Bloom, Falcon, CodeGen
    "gpt_neox.final_layer_norm",  # GPT-NeoX, Pythia
    "model.decoder.final_layer_norm",  # OPT
    "transformer.norm_f",  # MPT
    "norm",  # base models: LlamaModel, ...
    "ln_f",  # GPT2Model
    "final_layer_norm",  # GPTNeoXModel
)


# --- feature vectors -------------------------------------------------------------------


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Module) else None


def final_norm_module(model: nn.Module) -> nn.Module:
    """The model's final norm (the one applied right before the unembedding).

    Tries ``model.norm``, ``model.language_model.norm``, ``transformer.ln_f``,
    ``gpt_neox.final_layer_norm``, ``model.decoder.final_layer_norm`` and the bare-model
    variants, in that order.

    Raises:
        ExplainError: none of these paths exists.
    """
    for path in _FINAL_NORM_PATHS:
        module = _get_submodule(model, path)
        if module is not None and not isinstance(module, nn.ModuleList):
            return module
    raise ExplainError(
        f"Cannot find the final norm of {type(model).__name__} (tried "
        f"{', '.join(_FINAL_NORM_PATHS)}). Pass transform='identity' to use the raw SAE "
        "directions, or apply the model's norm yourself and call mi_scores directly."
    )


def _sae_matrix(sae: nn.Module, side: Side) -> Tensor:
    """``[C, d]`` raw-residual-space directions of ``sae`` (decoder rows or encoder columns)."""
    cfg = getattr(sae, "cfg", None)
    scale = float(getattr(cfg, "norm_scale", 1.0))
    if side == "decoder":
        w_dec = getattr(sae, "W_dec", None)
        if not isinstance(w_dec, Tensor) or w_dec.ndim != 2:
            raise ExplainError("The SAE has no 2-D W_dec [d_sae, d_in]; is it a steerlex SAE?")
        # decode(f) = (f W_dec + b_dec) / s: one unit of activation writes W_dec[c] / s.
        return w_dec.detach() / scale
    w_enc = getattr(sae, "W_enc", None)
    if not isinstance(w_enc, Tensor) or w_enc.ndim != 2:
        raise ExplainError("The SAE has no 2-D W_enc [d_in, d_sae]; is it a steerlex SAE?")
    # pre_acts(x) = s x W_enc + ...: feature c reads the raw residual along s W_enc[:, c].
    return w_enc.detach().T * scale


def feature_vectors(
    sae: nn.Module,
    model: nn.Module | None = None,
    *,
    side: Side = "decoder",
    transform: Transform = "final_norm",
    chunk: int = 4096,
) -> Tensor:
    """One vector per SAE feature, ``[C, d]`` float32 on the SAE's device.

    Args:
        sae: a :class:`~steerlex.sae.base.SparseAutoencoder` (``W_dec [C, d]``, ``W_enc [d, C]``).
        model: the language model; needed for ``transform="final_norm"``.
        side: ``"decoder"``: rows of ``W_dec`` (what the feature writes; the paper's
            choice), in raw residual units (divided by ``cfg.norm_scale``);
            ``"encoder"``: columns of ``W_enc`` (``W_enc.T``, what it reads), times
            ``cfg.norm_scale``.
        transform: ``"final_norm"``: each direction goes through the model's final norm
            as if it were a residual vector (the logit-lens view; the default, because raw
            unit-norm directions give affinities with a tiny spread, so ``p(w|c)`` is
            nearly uniform); ``"identity"``: the directions as they are.
        chunk: rows passed through the norm at a time.

    Raises:
        ExplainError: unknown ``side``/``transform``, no model for ``"final_norm"``, or no
            final norm found on the model.
    """
    if side not in SIDES:
        raise ExplainError(f"side must be one of {', '.join(SIDES)}, got {side!r}.")
    if transform not in TRANSFORMS:
        raise ExplainError(f"transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}.")
    if chunk < 1:
        raise ExplainError(f"chunk must be >= 1, got {chunk}.")
    vectors = _sae_matrix(sae, side)
    if transform == "identity":
        return vectors.to(torch.float32).contiguous()
    if model is None:
        raise ExplainError(
            "transform='final_norm' needs the language model (to find its final norm); "
            "pass model=... or use transform='identity'."
        )
    norm = final_norm_module(model)
    param = next(norm.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else vectors.device
    out = torch.empty(vectors.shape, dtype=torch.float32, device=vectors.device)
    with torch.no_grad():
        for start in range(0, vectors.shape[0], chunk):
            block = vectors[start : start + chunk].to(device, dtype)
            normed = norm(block)
            if not isinstance(normed, Tensor) or normed.shape != block.shape:
                raise ExplainError(
                    f"The final norm {type(norm).__name__} did not return a tensor of shape "
                    f"{tuple(block.shape)}; use transform='identity'."
                )
            out[start : start + chunk] = normed.to(out.device, torch.float32)
    return out


# --- input checks ----------------------------------------------------------------------


def _check_pair(features: Tensor, words: Tensor) -> tuple[int, int, int]:
    if not isinstance(features, Tensor) or not isinstance(words, Tensor):
        raise ExplainError("features and words must be torch tensors.")
    if features.ndim != 2:
        raise ExplainError(f"features must be 2-D [C, d], got shape {tuple(features.shape)}.")
    if words.ndim != 2:
        raise ExplainError(f"words must be 2-D [M, d], got shape {tuple(words.shape)}.")
    n_feat, d_feat = features.shape
    n_words, d_words = words.shape
    if n_feat == 0:
        raise ExplainError("features is empty (no features to explain).")
    if n_words == 0:
        raise ExplainError("words is empty (the vocabulary has no words).")
    if d_feat != d_words:
        raise ExplainError(
            f"Width mismatch: features have width {d_feat} but words have width {d_words}; "
            "the word vectors must come from the same model as the SAE."
        )
    if d_feat == 0:
        raise ExplainError("features and words have width 0.")
    if features.is_complex() or words.is_complex():
        raise ExplainError("features and words must be real tensors.")
    for name, tensor in (("features", features), ("words", words)):
        # min and max propagate NaN and keep ±inf: one read-only pass (no temporary),
        # instead of isfinite().all() or abs().amax().
        low, high = torch.aminmax(tensor.detach())
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ExplainError(f"{name} contain {bad} non-finite values (NaN/inf).")
    return n_feat, n_words, d_feat


def _check_temperature(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ExplainError(f"{name} must be a positive number, got {value!r}.") from None
    if not (value > 0 and math.isfinite(value)):
        raise ExplainError(f"{name} must be a positive finite temperature, got {value}.")
    return value


def _check_chunk(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExplainError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


# --- MI scores -------------------------------------------------------------------------


def _merge_topk(
    old_v: Tensor, old_i: Tensor, new_v: Tensor, new_i: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Top ``k`` of the union, ordered by (value descending, index ascending).

    ``old_*`` come from earlier word slabs, so all their indices are lower than
    ``new_*``'s; both are already ordered by (value descending, index ascending).
    """
    vals = torch.cat([old_v, new_v], dim=1)
    idx = torch.cat([old_i, new_i], dim=1)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    return vals.gather(1, order), idx.gather(1, order)


def _slab_topk(scores: Tensor, k: int, offset: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` per row of ``scores [R, n]``, ordered by (value desc, index asc), + ``offset``.

    ``torch.topk`` does not say which of several equal values it keeps, so rows where the
    ``k``-th and ``(k+1)``-th values tie, or where equal values appear inside the top ``k``,
    are re-ordered with a stable sort: the lowest word index always wins a tie.
    """
    n = scores.shape[1]
    kk = min(k + 1, n)
    vals, idx = torch.topk(scores, kk, dim=1, largest=True, sorted=True)
    tied = (vals[:, 1:] == vals[:, :-1]).any(dim=1)
    vals, idx = vals[:, :k], idx[:, :k]
    if bool(tied.any()):
        vals, idx = vals.clone(), idx.clone()
        rows = tied.nonzero().squeeze(1)
        s = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        vals[rows] = s.values[:, :k]
        idx[rows] = s.indices[:, :k]
    return vals, (idx + offset if offset else idx)


# exp() of float32 values below this underflows (smallest normal float32 is e^-87.3).
_F32_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


# Words probed for a well-conditioned row normaliser (see _slab_row_lse).
_PROBE_WORDS = 64
# Q below this (far below 1 / M) is too far out in the tail to give the normaliser exactly.
_MIN_PROBE_Q = 1e-30


def _slab_row_lse(b: Tensor, q: Tensor, ratio: float, acc: torch.dtype) -> Tensor:
    """``logsumexp_w(ratio * b)`` per row, from ``q = softmax(ratio * b)`` without a full pass.

    For any word ``j``, ``lse = ratio * b[j] − log q[j]``; ``j`` is the largest of the
    first :data:`_PROBE_WORDS` words, which is exact to float32 rounding of ``q[j]`` as
    long as ``q[j]`` is a normal number. Rows where it is not (very low temperatures,
    or non-finite affinities) use an exact ``logsumexp``.

    Raises:
        ExplainError: the affinities overflow float32.
    """
    j = b[:, :_PROBE_WORDS].argmax(dim=1, keepdim=True)
    q_j = q.gather(1, j).squeeze(1)
    lse = b.gather(1, j).squeeze(1).to(acc) * ratio - q_j.to(acc).log()
    weak = ~(q_j >= _MIN_PROBE_Q)  # also NaN (an infinite affinity)
    if bool(weak.any()):
        rows = weak.nonzero().squeeze(1)
        lse[rows] = torch.logsumexp(b[rows].to(acc) * ratio, dim=1)
    if not bool(torch.isfinite(lse).all()):
        raise ExplainError(
            "The affinities S = features @ words.T overflow float32 (or their "
            "temperatures are too low); rescale the features or words, or raise "
            "alpha and beta."
        )
    return lse


def _prior_terms(
    score: Score, log_p_c: Tensor | None, n_feat: int, dev: torch.device
) -> tuple[Tensor | None, float]:
    """The ``− log p(c)`` term of the ``mi`` score: ``(neg_log_prior, uniform_shift)``.

    ``neg_log_prior`` is ``[C]`` float32 on ``dev`` (``mi`` with a given prior only, else
    None); ``uniform_shift`` is ``log C`` for ``mi`` with a uniform prior, else 0.

    Raises:
        ExplainError: ``log_p_c`` not a ``[C]`` tensor, or non-finite.
    """
    if score != "mi":
        return None, 0.0
    if log_p_c is None:
        return None, math.log(n_feat)
    if not isinstance(log_p_c, Tensor) or tuple(log_p_c.shape) != (n_feat,):
        shape = tuple(log_p_c.shape) if isinstance(log_p_c, Tensor) else type(log_p_c)
        raise ExplainError(
            f"log_p_c must be a tensor of shape [{n_feat}] (one log prior per feature), "
            f"got {shape}."
        )
    if not bool(torch.isfinite(log_p_c).all()):
        raise ExplainError(
            "log_p_c has non-finite values (a feature that never fires gives log 0 = "
            "-inf); smooth the firing rates, e.g. log((count + 1) / (total + C))."
        )
    return -log_p_c.detach().to(dev, torch.float32), 0.0


@dataclass(frozen=True)
class _MIPlan:
    """The validated settings and inputs of one :func:`mi_scores` call.

    ``feats [C, d]`` float32 are the features divided by ``beta`` (so the matrix product
    gives ``B = S/beta`` directly) and ``vocab [M, d]`` float32 the words, both on
    ``device``; ``ratio = beta / alpha`` (``S/alpha = ratio * B``); ``fast_columns``:
    ``alpha == beta`` (column normalisers by a matrix-vector product); ``acc``: dtype of
    the normalisers and kept scores (float64, float32 on MPS); ``neg_log_prior`` and
    ``uniform_shift``: see :func:`_prior_terms`; ``underflow_margin``: log-domain margin
    below which a fast column sum may have lost 1e-6 of its mass; ``slab_width``: words
    per slab.
    """

    score: Score
    feats: Tensor
    vocab: Tensor
    device: torch.device
    acc: torch.dtype
    ratio: float
    fast_columns: bool
    top_k: int
    feature_chunk: int
    slab_width: int
    neg_log_prior: Tensor | None
    uniform_shift: float
    underflow_margin: float


def _plan(
    features: Tensor,
    words: Tensor,
    *,
    score: Score,
    alpha: float,
    beta: float,
    top_k: int,
    log_p_c: Tensor | None,
    feature_chunk: int,
    word_chunk: int,
    max_slab_elements: int,
    device: torch.device | str | None,
) -> _MIPlan:
    """Check the arguments of :func:`mi_scores` (in its order) and fix its settings.

    Raises:
        ExplainError: as listed by :func:`mi_scores` (all but the float32 overflow).
    """
    if score not in SCORES:
        raise ExplainError(f"score must be one of {', '.join(SCORES)}, got {score!r}.")
    alpha = _check_temperature("alpha", alpha)
    beta = _check_temperature("beta", beta)
    n_feat, n_words, _ = _check_pair(features, words)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_words:
        raise ExplainError(
            f"top_k must be an integer between 1 and the vocabulary size {n_words}, got {top_k!r}."
        )
    feature_chunk = _check_chunk("feature_chunk", feature_chunk)
    word_chunk = _check_chunk("word_chunk", word_chunk)
    max_slab_elements = _check_chunk("max_slab_elements", max_slab_elements)

    dev = torch.device(device) if device is not None else features.device
    # B = S / beta comes straight out of the matrix product.
    feats = features.detach().to(dev, torch.float32)
    if beta != 1.0:
        feats = feats / beta
    vocab = words.detach().to(dev, torch.float32)
    neg_log_prior, uniform_shift = _prior_terms(score, log_p_c, n_feat, dev)
    return _MIPlan(
        score=score,
        feats=feats,
        vocab=vocab,
        device=dev,
        acc=torch.float64 if dev.type != "mps" else torch.float32,
        ratio=beta / alpha,
        fast_columns=alpha == beta,
        top_k=top_k,
        feature_chunk=feature_chunk,
        slab_width=max(1, min(word_chunk, n_words, max_slab_elements // n_feat)),
        neg_log_prior=neg_log_prior,
        uniform_shift=uniform_shift,
        # Underflow bound for the matrix-vector column sums: each of the C terms loses
        # less than tiny * exp(shift) (float32 underflow of Q or of Q * weight), so a
        # column sum above C * tiny * exp(shift) * 1e6 has lost less than 1e-6 of its mass.
        underflow_margin=math.log(n_feat) + _F32_LOG_TINY + 6 * math.log(10.0),
    )


def _slab_normalisers(
    plan: _MIPlan, w0: int, slab_b: Tensor, slab_p: Tensor, slab_lse: Tensor
) -> Tensor:
    """Pass 1 over the words ``w0 : w0 + n`` (``n = slab_b.shape[1]``), for all features.

    Fills, ``feature_chunk`` rows at a time, ``slab_b [C, n]`` with ``B = S/beta``,
    ``slab_p [C, n]`` with ``Q = softmax_w(S/alpha)`` over the slab's words (one fused
    pass) and ``slab_lse [C]`` (dtype ``acc``) with ``logsumexp_w(S/alpha)`` over them
    (:func:`_slab_row_lse`). Returns the per-word normaliser ``logsumexp_c(S/beta)`` over
    all features, ``[n]`` float32: for ``alpha == beta`` ``log(Qᵀ exp(lse − max lse)) +
    max lse``, a matrix-vector product, with an exact ``logsumexp`` of the column for
    words whose sum could have lost more than 1e-6 of its mass to float32 underflow; for
    ``alpha != beta`` an exact ``logsumexp`` of every column.

    Raises:
        ExplainError: the affinities overflow float32.
    """
    n_feat, n = slab_b.shape
    vocab_t = plan.vocab[w0 : w0 + n].T
    col_lse = torch.full((n,), -math.inf, dtype=plan.acc, device=plan.device)
    top_shift = -math.inf
    for f0 in range(0, n_feat, plan.feature_chunk):
        f1 = min(n_feat, f0 + plan.feature_chunk)
        b, p = slab_b[f0:f1], slab_p[f0:f1]
        torch.mm(plan.feats[f0:f1], vocab_t, out=b)
        # Q = softmax over the slab's words of S/alpha, one fused pass.
        torch.softmax(b if plan.ratio == 1.0 else b * plan.ratio, dim=1, out=p)
        lse = _slab_row_lse(b, p, plan.ratio, plan.acc)
        slab_lse[f0:f1] = lse
        if plan.fast_columns:
            # exp(S/beta) = Q * exp(lse_c): the column sums are a matrix-vector product.
            shift = float(lse.max())
            weights = torch.exp(lse - shift).to(torch.float32)
            col = (p.T @ weights).to(plan.acc).log_() + shift
            top_shift = max(top_shift, shift)
        else:
            col = torch.logsumexp(b, dim=0).to(plan.acc)
        col_lse = torch.logaddexp(col_lse, col)
    if plan.fast_columns:
        bad = (col_lse < top_shift + plan.underflow_margin).nonzero().squeeze(1)
        if bad.numel():
            col_lse[bad] = torch.logsumexp(slab_b[:, bad], dim=0).to(plan.acc)
    return col_lse.to(torch.float32)


def _block_keys(plan: _MIPlan, b: Tensor, p: Tensor, col_lse32: Tensor, f0: int, f1: int) -> Tensor:
    """Ranking keys of the feature rows ``f0:f1`` of a slab, ``[f1 − f0, n]`` float32.

    ``b`` and ``p`` are those rows of ``B`` and ``Q``; ``col_lse32 [n]`` the per-word
    normalisers. ``mi``: ``Q · (log p(c|w) − log p(c))`` (``p(w|c)`` normalised over this
    slab's words only, a positive factor per feature), computed in place over ``b``.
    ``paper``: ``−(S/alpha + log(−log p(c|w)))`` (minus the log magnitude of the score,
    so larger means closer to 0), computed in place over ``p``.
    """
    if plan.score == "mi":
        x = b.sub_(col_lse32 - plan.uniform_shift)
        if plan.neg_log_prior is not None:
            x.add_(plan.neg_log_prior[f0:f1, None])
        return x.mul_(p)
    neg = torch.sub(col_lse32, b, out=p).clamp_min_(0.0).log_()
    return neg.add_(b, alpha=plan.ratio).neg_()


def _merge_slab(
    plan: _MIPlan,
    w0: int,
    slab_b: Tensor,
    slab_p: Tensor,
    col_lse32: Tensor,
    top_v: Tensor,
    top_i: Tensor,
    *,
    run_lse: Tensor,
    slab_lse: Tensor,
    new_lse: Tensor,
) -> None:
    """Pass 2 over the slab of words starting at ``w0``: merge its scores into the top-K.

    ``slab_b``/``slab_p [C, n]`` hold ``B`` and ``Q`` from pass 1 (overwritten here),
    ``col_lse32 [n]`` the per-word normalisers; ``run_lse``, ``slab_lse`` and ``new_lse``,
    each ``[C]`` of dtype ``acc``: ``logsumexp_w(S/alpha)`` over the words before the
    slab, in it, and both. Updates ``top_v [C, top_k]`` (dtype ``acc``) and
    ``top_i [C, top_k]`` (int64) in place, block by block, each row ordered by (key
    descending, word index ascending). ``mi`` values kept and new are rescaled to
    ``p(w|c)`` normalised over all words seen so far before each merge (positive factors
    per feature, ranking unchanged).
    """
    n_feat, n = slab_b.shape
    first = w0 == 0
    for f0 in range(0, n_feat, plan.feature_chunk):
        f1 = min(n_feat, f0 + plan.feature_chunk)
        keys = _block_keys(plan, slab_b[f0:f1], slab_p[f0:f1], col_lse32, f0, f1)
        new_v, new_i = _slab_topk(keys, min(plan.top_k, n), w0)
        if first and n >= plan.top_k:  # one slab so far: nothing to merge or rescale
            top_v[f0:f1] = new_v
            top_i[f0:f1] = new_i
            continue
        new_v = new_v.to(plan.acc)
        old_v = top_v[f0:f1]
        if plan.score == "mi" and not first:
            # Renormalise p(w|c) from the words seen before / in this slab to all
            # words seen so far (positive factors per feature, ranking unchanged).
            old_v = old_v * torch.exp(run_lse[f0:f1] - new_lse[f0:f1])[:, None]
            new_v = new_v * torch.exp(slab_lse[f0:f1] - new_lse[f0:f1])[:, None]
        v, i = _merge_topk(old_v, top_i[f0:f1], new_v, new_i, plan.top_k)
        top_v[f0:f1] = v
        top_i[f0:f1] = i


def mi_scores(
    features: Tensor,
    words: Tensor,
    *,
    score: Score = "mi",
    alpha: float = 1.0,
    beta: float = 1.0,
    top_k: int = 50,
    log_p_c: Tensor | None = None,
    feature_chunk: int = 4096,
    word_chunk: int = 8192,
    max_slab_elements: int = 1 << 25,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """The top-K words of every feature by the ``mi`` or ``paper`` score.

    Args:
        features: ``[C, d]`` feature vectors (see :func:`feature_vectors`).
        words: ``[M, d]`` word vectors.
        score: ``"mi"``: ``p(w|c) · (log p(c|w) − log p(c))``; ``"paper"``:
            ``p(w|c) · log p(c|w)`` (the released code's formula, ranked descending).
        alpha: temperature of ``p(w|c) = softmax_w(S / alpha)``.
        beta: temperature of ``p(c|w) = softmax_c(S / beta)``.
        top_k: words kept per feature, ``1 <= top_k <= M``.
        log_p_c: ``[C]`` log prior of the features for ``"mi"`` (e.g. log firing rates;
            any finite values, not renormalised); default uniform, ``log p(c) = −log C``.
            Ignored by ``"paper"``.
        feature_chunk: feature rows per block (matrix product and scoring).
        word_chunk: most words per slab.
        max_slab_elements: cap on ``C × slab width`` (two float32 slabs are kept in
            memory); the slab width is ``max(1, min(word_chunk, M, max_slab_elements // C))``.
        device: where to compute (default: ``features.device``).

    Returns:
        ``(scores [C, top_k] float32, word_indices [C, top_k] int64)`` on ``device``,
        each row ordered by score descending, ties by word index ascending.

    Algorithm (docs/mi.md, "The chunked algorithm"): two passes per slab of words, one
    matrix product in all. Pass 1 (:func:`_slab_normalisers`) computes ``B = S/beta``
    and ``Q = softmax_w(S/alpha)`` over the slab's words for all features, with the
    per-feature normaliser over the slab (combined across slabs in float64) and the
    per-word normaliser over all features. Pass 2 (:func:`_merge_slab`) scores the slab
    block by block and merges it into a running top-K per feature: ``mi`` with ``p(w|c)``
    normalised over the words seen so far (so the returned values need no final factor),
    ``paper`` on its log magnitude (exact however small ``p(w|c)`` is) and exponentiated
    at the end. Memory: two ``C × slab`` float32 slabs (at most
    ``max(C, max_slab_elements)`` elements each), ``feature_chunk × slab`` temporaries
    (``alpha != beta`` only) and the ``C × top_k`` result; never ``C × M``.

    Raises:
        ExplainError: unknown ``score``; ``alpha`` or ``beta`` not positive and finite;
            ``top_k`` outside ``[1, M]``; features/words not 2-D, empty, of different
            widths or non-finite; ``log_p_c`` of the wrong shape or non-finite; chunk
            sizes < 1; affinities that overflow float32.
    """
    plan = _plan(
        features,
        words,
        score=score,
        alpha=alpha,
        beta=beta,
        top_k=top_k,
        log_p_c=log_p_c,
        feature_chunk=feature_chunk,
        word_chunk=word_chunk,
        max_slab_elements=max_slab_elements,
        device=device,
    )
    n_feat, n_words = plan.feats.shape[0], plan.vocab.shape[0]
    dev, acc, width = plan.device, plan.acc, plan.slab_width
    buf_b = torch.empty(n_feat * width, dtype=torch.float32, device=dev)
    buf_p = torch.empty(n_feat * width, dtype=torch.float32, device=dev)
    run_lse = torch.full((n_feat,), -math.inf, dtype=acc, device=dev)  # lse_w(S/alpha)
    slab_lse = torch.empty(n_feat, dtype=acc, device=dev)  # the same over this slab's words
    top_v = torch.full((n_feat, plan.top_k), -math.inf, dtype=acc, device=dev)
    top_i = torch.full((n_feat, plan.top_k), n_words, dtype=torch.long, device=dev)
    with torch.no_grad():
        for w0 in range(0, n_words, width):
            n = min(n_words, w0 + width) - w0
            slab_b = buf_b[: n_feat * n].view(n_feat, n)
            slab_p = buf_p[: n_feat * n].view(n_feat, n)
            col_lse32 = _slab_normalisers(plan, w0, slab_b, slab_p, slab_lse)
            first = w0 == 0
            new_lse = slab_lse if first else torch.logaddexp(run_lse, slab_lse)
            _merge_slab(
                plan,
                w0,
                slab_b,
                slab_p,
                col_lse32,
                top_v,
                top_i,
                run_lse=run_lse,
                slab_lse=slab_lse,
                new_lse=new_lse,
            )
            run_lse = new_lse.clone() if first else new_lse
    # `mi` values are already normalised over all words; `paper` keys are log magnitudes.
    scores = top_v if score == "mi" else -torch.exp(-top_v - run_lse[:, None])
    return scores.to(torch.float32), top_i


# --- diagnostics -----------------------------------------------------------------------


@dataclass(frozen=True)
class AffinityStats:
    """Spread of the affinities ``S = features @ words.T`` on a sample of features.

    ``std_over_words`` (mean over sampled features of the std of ``S[c, :]``) sets the
    sharpness of ``p(w|c)``; ``std_over_features`` (mean over words of the std of
    ``S[:, w]`` within the sample) that of ``p(c|w)``.
    """

    mean: float
    std: float
    min: float
    max: float
    std_over_words: float
    std_over_features: float
    n_features: int
    n_words: int

    def suggest_temperatures(self, target_std: float = 2.0) -> tuple[float, float]:
        """``(alpha, beta)`` that give ``S/alpha`` (``S/beta``) a spread of ``target_std``."""
        if not (target_std > 0 and math.isfinite(target_std)):
            raise ExplainError(f"target_std must be positive and finite, got {target_std}.")
        alpha = self.std_over_words / target_std if self.std_over_words > 0 else 1.0
        beta = self.std_over_features / target_std if self.std_over_features > 0 else 1.0
        return alpha, beta


def affinity_stats(
    features: Tensor, words: Tensor, *, sample: int = 256, seed: int = 0
) -> AffinityStats:
    """Mean, std, range of ``S`` on ``sample`` random features (all words); deterministic.

    Use it to choose temperatures: ``p(w|c)`` is close to uniform when the per-feature
    spread of ``S`` is well below 1, and close to one-hot when it is far above ~5.
    """
    n_feat, n_words, _ = _check_pair(features, words)
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ExplainError(f"sample must be an integer >= 1, got {sample!r}.")
    if sample >= n_feat:
        rows = torch.arange(n_feat)
    else:
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n_feat, generator=gen)[:sample].sort().values
    with torch.no_grad():
        feats = features.detach()[rows.to(features.device)].to(torch.float64)
        s = feats @ words.detach().to(feats.device, torch.float64).T
        std_w = s.std(dim=1, unbiased=False).mean() if n_words > 1 else s.new_zeros(())
        std_c = s.std(dim=0, unbiased=False).mean() if s.shape[0] > 1 else s.new_zeros(())
        return AffinityStats(
            mean=float(s.mean()),
            std=float(s.std(unbiased=False)),
            min=float(s.min()),
            max=float(s.max()),
            std_over_words=float(std_w),
            std_over_features=float(std_c),
            n_features=int(s.shape[0]),
            n_words=n_words,
        )


def effective_words(
    features: Tensor,
    words: Tensor,
    *,
    alpha: float = 1.0,
    feature_chunk: int = 4096,
    word_chunk: int = 8192,
    device: torch.device | str | None = None,
) -> Tensor:
    """``exp(H(p(w|c)))`` per feature, ``[C]`` float64: how many words ``p(w|c)`` spreads over.

    ``M`` means uniform (alpha too high for the spread of ``S``), ``1`` means one word takes
    all the mass. Computed in ``feature_chunk × word_chunk`` blocks with an online
    log-sum-exp (``H = logsumexp(a) − E_p[a]`` with ``a = S/alpha``).
    """
    alpha = _check_temperature("alpha", alpha)
    n_feat, n_words, _ = _check_pair(features, words)
    feature_chunk = _check_chunk("feature_chunk", feature_chunk)
    word_chunk = _check_chunk("word_chunk", word_chunk)
    dev = torch.device(device) if device is not None else features.device
    feats = features.detach().to(dev, torch.float32)
    vocab = words.detach().to(dev, torch.float32)
    out = torch.empty(n_feat, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for f0 in range(0, n_feat, feature_chunk):
            f1 = min(n_feat, f0 + feature_chunk)
            m = torch.full((f1 - f0,), -math.inf, dtype=torch.float64, device=dev)
            z = torch.zeros(f1 - f0, dtype=torch.float64, device=dev)  # Σ exp(a − m)
            t = torch.zeros(f1 - f0, dtype=torch.float64, device=dev)  # Σ exp(a − m) a
            for w0 in range(0, n_words, word_chunk):
                a = (feats[f0:f1] @ vocab[w0 : w0 + word_chunk].T).to(torch.float64) / alpha
                new_m = torch.maximum(m, a.max(dim=1).values)
                scale = torch.where(torch.isfinite(m), torch.exp(m - new_m), torch.zeros_like(m))
                e = torch.exp(a - new_m[:, None])
                z = z * scale + e.sum(dim=1)
                t = t * scale + (e * a).sum(dim=1)
                m = new_m
            entropy = torch.log(z) + m - t / z
            out[f0:f1] = torch.exp(entropy.clamp_min(0.0))
    return out
