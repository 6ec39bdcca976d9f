"""Explain every feature of an SAE with one method and write the result as JSONL.

The methods are the entries of :data:`steerlex.explain.method.EXPLANATION_METHODS` (built
in: ``mi`` and ``paper``, output-side mutual information, docs/mi.md; ``mi-input``, the
input side, docs/mi_input.md; ``logitlens``; ``topact``, the corpus-based baseline).
Each output line is one :class:`Explanation`:
``{"feature": c, "method": m, "words": [...], "scores": [...], "summary": null}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import steerlex
from steerlex.activations.store import ActivationStore
from steerlex.core.errors import ExplainError
from steerlex.core.io import write_bytes_atomic, write_json_atomic
from steerlex.explain.method import Explanation, MethodOptions, get_method, method_names
from steerlex.explain.vocabulary import Vocabulary
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder
from steerlex.sae.compat import check_sae_fits

__all__ = [
    "Explanation",
    "explain_sae",
    "neuronpedia_records",
    "read_explanations",
    "read_method_files",
    "write_explanations",
]


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
    """Explanations of ``features`` (default: all) of ``sae`` by the registered ``method``.

    ``mi-input`` runs every vocabulary word through the model in a few neutral
    templates (to layer L only) and caches the word-by-feature activation matrix
    under the steerlex cache; its temperatures are set from that matrix's spread.
    ``topact`` needs ``store`` (top-activating contexts, de-duplicated; see
    docs/topact.md); its explanations carry words without scores.
    """
    explainer = get_method(method)
    if explainer.needs_vocabulary and vocab is None:
        raise ExplainError(
            f"The '{method}' method needs a vocabulary (see steerlex.explain.vocabulary)."
        )
    if explainer.needs_store and store is None:
        raise ExplainError(
            f"The '{method}' method needs an activation store of the SAE's model and layer "
            "(--activations)."
        )
    check_sae_fits(sae, loaded=loaded)
    ids = list(range(sae.cfg.d_sae)) if features is None else [int(f) for f in features]
    bad = [f for f in ids if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise ExplainError(
            f"Feature ids {bad[:5]} are out of range; this SAE has features 0..{sae.cfg.d_sae - 1}."
        )
    options = MethodOptions(
        vocab=vocab, top_k=top_k, alpha=alpha, beta=beta, transform=transform, side=side,
        store=store, progress=progress,
    )  # fmt: skip
    return explainer.explain(sae, loaded, ids, options)


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


def read_method_files(
    directory: str | Path, methods: Sequence[str] | None = None
) -> dict[str, list[Explanation]]:
    """``{method: explanations}`` from the ``<method>.jsonl`` files in ``directory``: the
    ``methods`` asked for, or every registered method whose file is there (display order).

    Raises:
        ExplainError: no file to read, or a file that is missing or malformed.
    """
    d = Path(directory)
    wanted = (
        list(methods) if methods else [m for m in method_names() if (d / f"{m}.jsonl").is_file()]
    )
    if not wanted:
        raise ExplainError(
            f"No explanation files (<method>.jsonl) in {d}; run `steerlex explain` first."
        )
    return {m: read_explanations(d / f"{m}.jsonl") for m in wanted}


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
