"""Explain every feature of an SAE with one method and write the result as JSONL.

Methods available so far: ``mi`` and ``paper`` (vocabulary word lists scored by
mutual information on the output side, see docs/mi.md), ``mi-input`` (the same on the
input side: what makes a feature fire, see docs/mi_input.md), ``logitlens`` (top
unembedding tokens) and ``topact`` (words of the top-activating contexts in an
activation store: the corpus-based baseline).
Each output line is one :class:`Explanation`:
``{"feature": c, "method": m, "words": [...], "scores": [...], "summary": null}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import steerlex
from steerlex.activations.store import ActivationStore
from steerlex.core.errors import ExplainError
from steerlex.core.io import write_bytes_atomic, write_json_atomic
from steerlex.explain.logitlens import logit_lens
from steerlex.explain.mi import Score, Side, Transform, feature_vectors, mi_scores
from steerlex.explain.mi_input import cached_word_activations, input_mi_scores
from steerlex.explain.topact import top_activations, topact_words
from steerlex.explain.vocabulary import Vocabulary, word_vectors
from steerlex.models.cache import cache_root
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder
from steerlex.sae.compat import check_sae_fits

METHODS = ("mi", "paper", "mi-input", "logitlens", "topact")


@dataclass(frozen=True)
class Explanation:
    """The ranked words (or tokens) of one feature under one method."""

    feature: int
    method: str
    words: tuple[str, ...]
    scores: tuple[float, ...]
    summary: str | None = None


def explain_sae(
    sae: SparseAutoencoder,
    loaded: LoadedModel,
    method: str,
    *,
    vocab: Vocabulary | None = None,
    top_k: int = 50,
    alpha: float = 1.0,
    beta: float = 1.0,
    transform: str = "final_norm",
    side: str = "decoder",
    features: Sequence[int] | None = None,
    store: ActivationStore | None = None,
    progress: bool = True,
) -> list[Explanation]:
    """Explanations of ``features`` (default: all) of ``sae`` by ``method``.

    ``mi-input`` runs every vocabulary word through the model in a few neutral
    templates (to layer L only) and caches the word-by-feature activation matrix
    under the steerlex cache; its temperatures are set from that matrix's spread.
    ``topact`` needs ``store`` (top-activating contexts, de-duplicated; see
    docs/topact.md); its explanations carry words without scores.
    """
    if method not in METHODS:
        raise ExplainError(
            f"Unknown explanation method '{method}'; available: {', '.join(METHODS)}."
        )
    model = loaded.model
    check_sae_fits(sae, loaded=loaded)
    ids = list(range(sae.cfg.d_sae)) if features is None else [int(f) for f in features]
    bad = [f for f in ids if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise ExplainError(
            f"Feature ids {bad[:5]} are out of range; this SAE has features 0..{sae.cfg.d_sae - 1}."
        )
    if method == "logitlens":
        found = logit_lens(
            sae,
            model,
            loaded.tokenizer,
            top_k=top_k,
            transform=cast(Transform, transform),
            side=cast(Side, side),
            features=ids,
        )
        return [
            Explanation(ft.feature, method, tuple(ft.tokens), tuple(float(s) for s in ft.scores))
            for ft in found
        ]
    if method == "topact":
        if store is None:
            raise ExplainError(
                "The 'topact' method needs an activation store of the SAE's model and layer (--activations)."
            )
        spans = top_activations(
            sae, store, features=ids, tokenizer=loaded.tokenizer, progress=progress
        )
        return [
            Explanation(
                c, method, tuple(topact_words(spans.get(c, []), loaded.tokenizer, top_k=top_k)), ()
            )
            for c in ids
        ]
    if vocab is None:
        raise ExplainError(
            f"The '{method}' method needs a vocabulary (see steerlex.explain.vocabulary)."
        )
    if method == "mi-input":
        if sae.cfg.layer is None:
            raise ExplainError(
                "The 'mi-input' method needs the SAE's layer; this SAE does not record one."
            )
        words = list(vocab.words)
        acts = cached_word_activations(
            loaded, sae, sae.cfg.layer, words, cache_root() / "word_activations", progress=progress
        )
        scores, idx = input_mi_scores(acts, top_k=top_k)
        return [
            Explanation(
                c,
                method,
                tuple(words[i] for i in idx[c].tolist()),
                tuple(float(v) for v in scores[c].tolist()),
            )
            for c in ids
        ]
    wv = word_vectors(vocab, loaded)
    fv = feature_vectors(sae, model, side=cast(Side, side), transform=cast(Transform, transform))
    scores, idx = mi_scores(
        fv, wv.vectors, score=cast(Score, method), alpha=alpha, beta=beta, top_k=top_k
    )
    return [
        Explanation(
            c,
            method,
            tuple(wv.words[i] for i in idx[c].tolist()),
            tuple(float(s) for s in scores[c].tolist()),
        )
        for c in ids
    ]


def write_explanations(
    explanations: Sequence[Explanation], out_dir: str | Path, method: str, settings: dict[str, Any]
) -> Path:
    """Write ``<method>.jsonl`` (one explanation a line) and ``<method>.json`` (settings)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blob = "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in explanations).encode()
    path = out / f"{method}.jsonl"
    write_bytes_atomic(path, blob)
    write_json_atomic(
        out / f"{method}.json",
        {
            "method": method,
            "n_features": len(explanations),
            "steerlex_version": steerlex.__version__,
            **settings,
        },
    )
    return path


def read_explanations(path: str | Path) -> list[Explanation]:
    """Read a ``<method>.jsonl`` file written by :func:`write_explanations`.

    Raises:
        ExplainError: a missing file or a line that is not an explanation record.
    """
    p = Path(path)
    if not p.is_file():
        raise ExplainError(
            f"Explanations file {p} does not exist; run `steerlex explain` to write it."
        )
    out: list[Explanation] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.append(
                Explanation(
                    feature=int(rec["feature"]),
                    method=str(rec["method"]),
                    words=tuple(str(w) for w in rec["words"]),
                    scores=tuple(float(s) for s in rec.get("scores") or ()),
                    summary=rec.get("summary"),
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ExplainError(
                f"{p} line {n} is not an explanation record "
                f'({{"feature", "method", "words", ...}}): {exc}'
            ) from exc
    return out


def neuronpedia_records(
    explanations: Sequence[Explanation],
    *,
    model_id: str,
    source_id: str,
    explanation_model: str | None = None,
    n_words: int = 10,
) -> list[dict[str, Any]]:
    """One record per explanation in Neuronpedia's explanation schema.

    ``description`` is the summary when there is one, else the first ``n_words`` words;
    ``typeName`` names the method (``steerlex-mi``, ``steerlex-topact``, ...);
    ``explanationModelName`` is the summary back end, or ``"none"`` for bare word lists.
    ``source_id`` is Neuronpedia's SAE id within the model, e.g. ``8-steerlex-res-4k``.
    """
    if not model_id or not source_id:
        raise ExplainError("neuronpedia_records needs a model_id and a source_id.")
    out = []
    for e in explanations:
        if e.summary:
            description, author = e.summary, explanation_model or "unknown"
        else:
            description, author = ", ".join(e.words[:n_words]), "none"
        if not description:
            continue
        out.append(
            {
                "modelId": model_id,
                "layer": source_id,
                "index": str(e.feature),
                "description": description,
                "typeName": f"steerlex-{e.method}",
                "explanationModelName": author,
            }
        )
    return out
