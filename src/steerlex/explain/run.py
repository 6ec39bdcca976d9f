"""Explain every feature of an SAE with one method and write the result as JSONL.

The methods are the entries of :data:`steerlex.explain.method.EXPLANATION_METHODS` (built
in: ``mi`` and ``paper``, output-side mutual information, docs/mi.md; ``mi-input``, the
input side, docs/mi_input.md; ``logitlens``; ``topact``, the corpus-based baseline).
Each output line is one :class:`Explanation`:
``{"feature": c, "method": m, "words": [...], "scores": [...], "summary": null}``.

The ``neuronpedia_*`` functions turn explanations (and TopAct spans) into rows of
Neuronpedia's database tables for ``steerlex export-neuronpedia`` (docs/formats.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import steerlex
from steerlex.activations.store import ActivationStore
from steerlex.core.errors import ExplainError
from steerlex.core.io import write_bytes_atomic, write_json_atomic
from steerlex.explain.method import Explanation, MethodOptions, get_method, method_names
from steerlex.explain.topact import Span
from steerlex.explain.vocabulary import Vocabulary
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder
from steerlex.sae.compat import check_sae_fits

__all__ = [
    "NEURONPEDIA_AUTHOR_ID",
    "NEURONPEDIA_BATCH",
    "Explanation",
    "check_neuronpedia_id",
    "explain_sae",
    "neuronpedia_activation_rows",
    "neuronpedia_feature_rows",
    "neuronpedia_model_id",
    "neuronpedia_model_type_row",
    "neuronpedia_records",
    "neuronpedia_row_id",
    "neuronpedia_source_id",
    "neuronpedia_source_rows",
    "neuronpedia_source_set",
    "neuronpedia_type_rows",
    "neuronpedia_width",
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


# --------------------------------------------------------------------------- Neuronpedia
#
# Rows for the tables of Neuronpedia's database, in the form its importer reads
# (docs/formats.md, "Neuronpedia export"). The facts are from hijohnnylin/neuronpedia at
# commit ebb8426f: apps/webapp/prisma/schema.prisma (the tables, which fields are required)
# and apps/webapp/lib/db/import.ts (a raw ``INSERT ... SELECT FROM jsonb_to_recordset``
# over the columns named by the first row of a batch file: Prisma's client-side
# ``@default(cuid())`` never runs, so every row carries its own ``id``, and every row of a
# file has the same keys).

NEURONPEDIA_AUTHOR_ID = "clkht01d40000jv08hvalcvly"
"""The bot user that Neuronpedia's ``prisma/seed.ts`` creates. It is the webapp's
``DEFAULT_CREATOR_USER_ID`` and one of its ``PUBLIC_ACTIVATIONS_USER_IDS`` (activations
other users created are not shown), so rows it owns import into a fresh instance and show."""

NEURONPEDIA_BATCH = 1024
"""Rows (features, explanations) or features (activations) per ``batch-N.jsonl.gz``, as in
Neuronpedia's own ``utils/neuronpedia-utils/neuronpedia_utils/export-data.py``."""

_NP_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_NP_WIDTH_UNITS = ((1_000_000, 1 << 20, "m"), (1000, 1024, "k"))


def neuronpedia_width(d_sae: int) -> str:
    """Neuronpedia's label of an SAE width: ``16k`` for 16384 latents, ``65k`` for 65536,
    ``1m`` for 2**20 (Gemma Scope's convention: thousands or millions, rounded down).

    Only whole multiples of 1000 or 1024 (10**6 or 2**20 for ``m``) get a unit; any other
    width is written out (``512``, ``1536``), so a small SAE is never labelled ``1k``.
    """
    if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
        raise ExplainError(f"An SAE width must be a positive integer, got {d_sae!r}.")
    for unit, binary, suffix in _NP_WIDTH_UNITS:
        if d_sae >= unit and (d_sae % unit == 0 or d_sae % binary == 0):
            return f"{d_sae // unit}{suffix}"
    return str(d_sae)


def neuronpedia_source_id(layer: int, d_sae: int, set_name: str = "steerlex-res") -> str:
    """The default Neuronpedia source (SAE) id: ``<layer>-<set>-<width>``, e.g.
    ``8-steerlex-res-2k``; the part after the layer is the source set."""
    return f"{int(layer)}-{set_name}-{neuronpedia_width(d_sae)}"


def neuronpedia_source_set(source_id: str) -> str:
    """The source set of a Neuronpedia source id: the text after ``<layer>-`` and before
    an optional ``__<extra>`` (Neuronpedia's ``getSourceSetNameFromSource``).

    Raises:
        ExplainError: an id that is not ``<layer>-<set>[__<extra>]`` with an integer layer
            (or ``e``, the embedding), or that holds characters other than letters,
            digits, ``.``, ``_`` and ``-``.
    """
    layer, _, rest = source_id.partition("-")
    set_name = rest.split("__")[0]
    if not _NP_ID.match(source_id) or not (layer.isdigit() or layer == "e") or not set_name:
        raise ExplainError(
            f"The Neuronpedia source id {source_id!r} must be <layer>-<source set>, e.g. "
            "8-steerlex-res-2k (letters, digits, '.', '_' and '-')."
        )
    return set_name


def neuronpedia_model_id(spec: str) -> str:
    """A Neuronpedia model id from a steerlex model spec: the model's own name (the
    hub repo's, the directory's or the GGUF file's), lower-cased, with any character
    other than letters, digits, ``.``, ``_`` and ``-`` turned into ``-``."""
    name = spec.strip().removeprefix("embedded:").rstrip("/\\")
    name = re.split(r"[/\\]", name)[-1]
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    name = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-")
    if not name:
        raise ExplainError(f"Cannot make a Neuronpedia model id from {spec!r}; pass --model-id.")
    return name


def check_neuronpedia_id(value: str, what: str) -> str:
    """``value`` when it is usable as one URL path segment of Neuronpedia, else ExplainError."""
    if not _NP_ID.match(value or ""):
        raise ExplainError(
            f"The Neuronpedia {what} {value!r} may hold only letters, digits, '.', '_' and '-'."
        )
    return value


def neuronpedia_row_id(*parts: object) -> str:
    """A stable row id: ``c`` and 24 hex digits of the sha256 of ``parts`` (shaped like the
    cuids Neuronpedia's schema declares, so its ``z.string().cuid()`` checks accept it)."""
    key = "\x1f".join(str(p) for p in parts)
    return "c" + hashlib.sha256(key.encode()).hexdigest()[:24]


def neuronpedia_records(
    explanations: Sequence[Explanation],
    *,
    model_id: str,
    source_id: str,
    author_id: str = NEURONPEDIA_AUTHOR_ID,
    explanation_model: str | None = None,
    n_words: int = 10,
) -> list[dict[str, Any]]:
    """Rows of Neuronpedia's ``Explanation`` table, one per explanation with words.

    ``description`` is the summary when there is one, else the first ``n_words`` words;
    ``typeName`` names the method (``steerlex-mi``, ...; rows of ``ExplanationType`` from
    :func:`neuronpedia_type_rows`); ``explanationModelName`` is ``explanation_model`` for
    a summary written by an LLM, else null. ``id`` is :func:`neuronpedia_row_id` of model,
    source, feature and method. ``embedding`` is null and the ``umap_*`` columns hold the
    database's defaults (0): steerlex computes neither.
    """
    if not model_id or not source_id:
        raise ExplainError("neuronpedia_records needs a model_id and a source_id.")
    out = []
    for e in explanations:
        if e.summary:
            description, llm = e.summary, explanation_model or None
        else:
            description, llm = ", ".join(e.words[:n_words]), None
        if not description:
            continue
        index = str(e.feature)
        out.append(
            {
                "id": neuronpedia_row_id("explanation", model_id, source_id, index, e.method),
                "modelId": model_id,
                "layer": source_id,
                "index": index,
                "description": description,
                "authorId": author_id,
                "typeName": f"steerlex-{e.method}",
                "explanationModelName": llm,
                "embedding": None,
                "umap_x": 0.0,
                "umap_y": 0.0,
                "umap_cluster": 0,
                "umap_log_feature_sparsity": 0.0,
            }
        )
    return out


def neuronpedia_activation_rows(
    spans: Mapping[int, Sequence[Span]],
    *,
    model_id: str,
    source_id: str,
    author_id: str = NEURONPEDIA_AUTHOR_ID,
) -> list[dict[str, Any]]:
    """Rows of Neuronpedia's ``Activation`` table from TopAct spans
    (:func:`steerlex.explain.topact.top_activations` with a tokenizer and per-token
    activations): ``tokens`` and ``values`` of the window, ``maxValue`` and
    ``maxValueTokenIndex`` (its first maximum), ``minValue``; features in id order, each
    feature's spans best first.

    Raises:
        ExplainError: a span without decoded tokens or per-token activations.
    """
    out = []
    for feature in sorted(spans):
        for sp in spans[feature]:
            if sp.tokens is None or sp.activations is None:
                raise ExplainError(
                    f"A TopAct span of feature {feature} has no decoded tokens or per-token "
                    "activations; call top_activations with a tokenizer and span_activations."
                )
            values = [float(v) for v in sp.activations]
            if len(values) != len(sp.tokens) or not values:
                raise ExplainError(
                    f"A TopAct span of feature {feature} has {len(sp.tokens)} tokens but "
                    f"{len(values)} activations."
                )
            top = max(values)
            index = str(feature)
            out.append(
                {
                    "id": neuronpedia_row_id(
                        "activation", model_id, source_id, index, sp.text_index, sp.position
                    ),
                    "modelId": model_id,
                    "layer": source_id,
                    "index": index,
                    "tokens": list(sp.tokens),
                    "values": values,
                    "maxValue": top,
                    "maxValueTokenIndex": values.index(top),
                    "minValue": min(values),
                    "creatorId": author_id,
                }
            )
    return out


def neuronpedia_feature_rows(
    d_sae: int,
    *,
    model_id: str,
    source_id: str,
    author_id: str = NEURONPEDIA_AUTHOR_ID,
    max_activation: Mapping[int, float] | None = None,
) -> list[dict[str, Any]]:
    """Rows of Neuronpedia's ``Neuron`` table: one per latent ``0..d_sae-1`` (explanations
    and activations refer to them), ``maxActApprox`` from ``max_activation`` (0 without)."""
    acts = max_activation or {}
    set_name = neuronpedia_source_set(source_id)
    return [
        {
            "modelId": model_id,
            "layer": source_id,
            "index": str(c),
            "sourceSetName": set_name,
            "creatorId": author_id,
            "maxActApprox": float(acts.get(c, 0.0)),
            "hasVector": False,
        }
        for c in range(d_sae)
    ]


def neuronpedia_type_rows(
    methods: Sequence[str], *, author_id: str = NEURONPEDIA_AUTHOR_ID, creator_name: str
) -> list[dict[str, Any]]:
    """Rows of Neuronpedia's ``ExplanationType`` table, one per method (``steerlex-<m>``);
    ``featured`` is false, as Neuronpedia cannot run these methods itself."""
    out = []
    for m in methods:
        method = get_method(m)
        about = re.sub(r"\s*\(needs --[^)]*\)", "", method.help)  # CLI advice
        out.append(
            {
                "name": f"steerlex-{m}",
                "displayName": f"steerlex {m}",
                "description": f"steerlex {m}: {method.label}, {about}",
                "featured": False,
                "isAttention": False,
                "creatorName": creator_name,
                "creatorId": author_id,
            }
        )
    return out


def neuronpedia_model_type_row(name: str, *, creator_name: str) -> dict[str, Any]:
    """The ``ExplanationModelType`` row of the LLM that wrote the summaries."""
    return {
        "name": name,
        "displayName": name,
        "description": f"LLM that summarised steerlex word lists ({name})",
        "featured": False,
        "creatorName": creator_name,
    }


def neuronpedia_source_rows(
    *,
    model_id: str,
    source_id: str,
    author_id: str = NEURONPEDIA_AUTHOR_ID,
    creator_name: str,
    d_sae: int,
    d_in: int,
    layers: int,
    neurons_per_layer: int,
    owner: str,
    notes: str,
) -> dict[str, dict[str, Any]]:
    """The ``Model``, ``SourceSet`` and ``Source`` rows (``model``, ``sourceset``,
    ``source``). The importer hands them to Prisma's ``create``, so they hold only fields
    of those tables. Visibility is ``PUBLIC`` (a private row is hidden from a local
    instance's anonymous user); inference search is off (no inference server knows the SAE).
    """
    set_name = neuronpedia_source_set(source_id)
    width = neuronpedia_width(d_sae)
    return {
        "model": {
            "id": model_id,
            "displayName": model_id,
            "displayNameShort": model_id,
            "creatorId": author_id,
            "layers": int(layers),
            "neuronsPerLayer": int(neurons_per_layer),
            "dimension": int(d_in),
            "owner": owner,
            "instruct": model_id.endswith("-it") or "instruct" in model_id,
            "visibility": "PUBLIC",
        },
        "sourceset": {
            "modelId": model_id,
            "name": set_name,
            "description": f"steerlex SAE - {width}",
            "type": "",
            "creatorName": creator_name,
            "creatorId": author_id,
            "urls": [],
            "visibility": "PUBLIC",
            "hasDashboards": True,
            "allowInferenceSearch": False,
        },
        "source": {
            "id": source_id,
            "modelId": model_id,
            "setName": set_name,
            "creatorId": author_id,
            "visibility": "PUBLIC",
            "hasDashboards": True,
            "inferenceEnabled": False,
            "notes": notes,
        },
    }
