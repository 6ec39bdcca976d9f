"""Choose the SAE features to steer: from their explanations, from data, or by hand.

:func:`select_features` returns a :class:`FeatureSelection`: feature ids, each with a
score and a human-readable reason, plus everything needed to reproduce the choice;
:meth:`FeatureSelection.save` writes it as JSON (the steering code reads
``features[i]["id"]``). Each method has a small frozen options class, passed as
``select_features``'s third argument (see docs/selection.md):

- ``semantic`` (:class:`SemanticSelection`, the default; offline): sentence-encoder similarity between a
  :class:`~steerlex.steer.concepts.Concept` and each feature's explanation words. With
  ``scoring="words"`` (default) every explanation word gets its best cosine to the
  concept's anchors (seed words and description) and a feature scores the mean of its
  ``top_m`` best words; words in the top lists of very many features are ignored as
  generic. ``scoring="text"`` embeds the joined word list (or the summary, when there is
  one) and the concept text as two texts.
- ``llm`` (:class:`LLMSelection`): an LLM judge (:class:`~steerlex.explain.summaries.SummaryBackend`) labels each
  word list with one of the concept's categories (for ``safety``: the paper's defence
  categories) or ``none``; labelled features are selected. Answers are cached on disk,
  failures are warned about, counted and skipped.
- ``data`` (:class:`DataSelection`): the baseline every explanation-driven choice is compared with: features whose
  mean activation on the user's text of chat-formatted prompts differs most between
  harmful and benign prompts.
- ``manual`` (:class:`ManualSelection`): ids given by hand, checked against the SAE.

Explanations have a side: ``mi``/``paper``/``logitlens`` describe what a feature promotes
(output side: features to push up, e.g. ``safety``); ``mi-input``/``topact`` what makes it
fire (input side: detectors, e.g. ``harm``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm.auto import tqdm

import steerlex
from steerlex import text_embed
from steerlex.core.errors import ConceptError, SelectionError
from steerlex.core.io import read_json_object, write_bytes_atomic, write_json_atomic
from steerlex.data import load_texts
from steerlex.data.split import Split, select_split
from steerlex.explain.method import EXPLANATION_METHODS, Explanation, default_method, method_names
from steerlex.explain.summaries import (
    BadAnswer,
    SummaryBackend,
    _ask_all,
    _first_line,
    words_prompt,
)
from steerlex.models.cache import cache_root
from steerlex.models.chat import prompt_residuals
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder
from steerlex.sae.compat import check_sae_fits
from steerlex.steer.concepts import Concept, Side, concept_from_dict, get_concept
from steerlex.text_embed import WEIGHTS_SHA256, SentenceEncoder, TextEncoder

Method = Literal["semantic", "llm", "data", "manual"]
METHODS: tuple[Method, ...] = ("semantic", "llm", "data", "manual")
Scoring = Literal["words", "text"]
SCORINGS: tuple[Scoring, ...] = ("words", "text")
Direction = Literal["harmful", "benign"]
DIRECTIONS: tuple[Direction, ...] = ("harmful", "benign")

#: Default semantic thresholds, chosen on the real 4,096-feature SAEs of
#: Qwen2.5-Coder-0.5B-Instruct (docs/selection.md): at 0.7 almost every word-scored match
#: has two or more on-concept words; below 0.65 most rest on one chance word.
DEFAULT_THRESHOLD: dict[Scoring, float] = {"words": 0.7, "text": 0.5}
DEFAULT_N_WORDS = 10
DEFAULT_TOP_M = 3
#: A word in the top lists of more than this share of features (and of more than
#: GENERIC_MIN_COUNT features) says nothing about any one feature and is ignored.
DEFAULT_GENERIC_SHARE = 0.02
GENERIC_MIN_COUNT = 20
#: How many features the data-driven method keeps when neither threshold nor top_n is given.
DEFAULT_DATA_TOP_N = 20
#: Prompts per forward pass and tokens per prompt of the data-driven method.
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 256
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class SelectedFeature:
    """One chosen feature: its id, its score under the method, why, and its words.

    ``details`` holds method-specific numbers (``evidence`` word similarities,
    ``mean_harmful``/``mean_benign``/``difference``, the judge's ``category``); they are
    written next to the fixed keys ``id``, ``score``, ``reason`` and ``words``.
    """

    id: int
    score: float
    reason: str
    words: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "score": self.score,
            "reason": self.reason,
            "words": list(self.words),
            **self.details,
        }


_FIXED_KEYS = ("id", "score", "reason", "words")


@dataclass
class FeatureSelection:
    """Features chosen for a concept, and how (see docs/selection.md for the JSON schema).

    ``features`` are best first. ``explanations`` is ``{"path", "method"}`` of the
    explanation file used (or ``None``); ``sae`` is ``{"path", "weights_id", "layer",
    "d_sae", "model_spec"}``; ``settings`` every option that changes the result.
    """

    concept: Concept
    method: str
    side: Side
    features: list[SelectedFeature]
    explanations: dict[str, Any] | None = None
    sae: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    steerlex_version: str = steerlex.__version__

    @property
    def ids(self) -> list[int]:
        """The chosen feature ids, best first."""
        return [f.id for f in self.features]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "concept": self.concept.to_json(),
            "method": self.method,
            "side": self.side,
            "explanations": self.explanations,
            "sae": self.sae,
            "settings": self.settings,
            "features": [f.to_json() for f in self.features],
            "steerlex_version": self.steerlex_version,
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically; returns the path."""
        out = Path(path)
        write_json_atomic(out, self.to_json())
        return out

    @classmethod
    def load(cls, path: str | Path) -> FeatureSelection:
        """Read a file written by :meth:`save`."""
        p = Path(path)
        fix = "write it again with `steerlex select`."
        data = read_json_object(p, what="feature selection", fix=fix, error=SelectionError)
        try:
            concept = concept_from_dict(data["concept"])
            features = []
            for rec in data["features"]:
                fid = rec["id"]
                if isinstance(fid, bool) or not isinstance(fid, int):
                    raise TypeError(f"feature id {fid!r} is not an integer")
                features.append(
                    SelectedFeature(
                        id=fid,
                        score=float(rec["score"]),
                        reason=str(rec["reason"]),
                        words=tuple(str(w) for w in rec.get("words") or ()),
                        details={k: v for k, v in rec.items() if k not in _FIXED_KEYS},
                    )
                )
            side = data["side"]
            if side not in ("output", "input"):
                raise ValueError(f"side {side!r} is not 'output' or 'input'")
            return cls(
                concept=concept,
                method=str(data["method"]),
                side=side,
                features=features,
                explanations=data.get("explanations"),
                sae=data.get("sae"),
                settings=dict(data.get("settings") or {}),
                steerlex_version=str(data.get("steerlex_version", "unknown")),
            )
        except (KeyError, TypeError, ValueError, ConceptError) as exc:
            raise SelectionError(
                f"{p} is not a feature selection written by steerlex ({exc}); {fix}"
            ) from None


def sae_record(sae: SparseAutoencoder, path: str | Path | None = None) -> dict[str, Any]:
    """What a selection records about its SAE."""
    return {
        "path": None if path is None else str(path),
        "weights_id": sae.cfg.weights_id,
        "model_spec": sae.cfg.model_spec,
        "layer": sae.cfg.layer,
        "d_sae": sae.cfg.d_sae,
    }


# --------------------------------------------------------------------------- checks


def explanation_side(method: str) -> Side:
    """``"output"`` or ``"input"``: the side of a feature the explanation method describes
    (read from the explanation-method registry)."""
    if method not in EXPLANATION_METHODS:
        raise SelectionError(
            f"Unknown explanation method '{method}'; known: {', '.join(method_names())}."
        )
    return EXPLANATION_METHODS.get(method).describes


def check_explanations(
    explanations: Sequence[Explanation], d_sae: int | None, *, source: str = "the explanations"
) -> str:
    """Raise unless ``explanations`` are non-empty, of one method, with unique feature ids
    in ``0..d_sae-1``; return their method."""
    if not explanations:
        raise SelectionError(
            f"{source} hold no features; run `steerlex explain` for this SAE first."
        )
    methods = sorted({e.method for e in explanations})
    if len(methods) > 1:
        raise SelectionError(
            f"{source} mix explanation methods ({', '.join(methods)}); select from one "
            "<method>.jsonl file at a time."
        )
    ids = [e.feature for e in explanations]
    dup = [f for f, n in Counter(ids).items() if n > 1]
    if dup:
        raise SelectionError(f"{source} explain feature(s) {dup[:5]} more than once.")
    if d_sae is not None:
        bad = sorted(f for f in ids if not 0 <= f < d_sae)
        if bad:
            raise SelectionError(
                f"{source} name feature ids {bad[:5]} but the SAE has features 0..{d_sae - 1} "
                f"(d_sae={d_sae}); these explanations belong to another SAE. Pass the SAE they "
                "were written for, or explain this SAE again."
            )
    return methods[0]


def check_explanation_settings(
    settings: Mapping[str, Any], sae: SparseAutoencoder, *, source: str
) -> None:
    """Raise when an explanation settings file (``<method>.json``) names another model or a
    different number of features than ``sae``."""
    n = settings.get("n_features")
    if isinstance(n, int) and n > sae.cfg.d_sae:
        raise SelectionError(
            f"{source} describes {n} features but the SAE has d_sae={sae.cfg.d_sae}; "
            "these explanations belong to another SAE."
        )
    model = settings.get("model")
    if model and sae.cfg.model_spec and str(model) != str(sae.cfg.model_spec):
        raise SelectionError(
            f"{source} were written with model {model} but the SAE was trained on "
            f"{sae.cfg.model_spec}; pass the SAE the explanations describe."
        )


def parse_ids(text: str | Sequence[int]) -> list[int]:
    """Feature ids from ``"1,2, 3"`` or a list; duplicates dropped, order kept."""
    parts: Sequence[Any] = text.split(",") if isinstance(text, str) else text
    out: list[int] = []
    for p in parts:
        if isinstance(p, str):
            p = p.strip()
            if not p:
                continue
            if not re.fullmatch(r"\d+", p):
                raise SelectionError(
                    f"Feature id {p!r} is not a non-negative integer; pass ids like 12,40,7."
                )
            p = int(p)
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise SelectionError(f"Feature id {p!r} is not a non-negative integer.")
        if p not in out:
            out.append(p)
    return out


def _check_n_words(n_words: int) -> None:
    """Raise unless ``n_words`` (explanation words read per feature) is at least 1."""
    if isinstance(n_words, bool) or not isinstance(n_words, int) or n_words < 1:
        raise SelectionError(f"n_words={n_words!r} must be an integer of at least 1.")


def _check_scoring(scoring: str, top_m: int, generic_share: float) -> None:
    if scoring not in SCORINGS:
        raise SelectionError(f"Unknown scoring {scoring!r}; use one of {', '.join(SCORINGS)}.")
    if isinstance(top_m, bool) or not isinstance(top_m, int) or top_m < 1:
        raise SelectionError(
            f"top_m={top_m!r} must be an integer of at least 1 (the number of best words a "
            "feature's score averages)."
        )
    if (
        isinstance(generic_share, bool)
        or not isinstance(generic_share, (int, float))
        or not 0 < generic_share <= 1
    ):
        raise SelectionError(
            f"generic_share={generic_share!r} must be in (0, 1] (1 keeps every word)."
        )


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise SelectionError(
            f"Unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}."
        )


def _check_batching(batch_size: int, max_length: int) -> None:
    if batch_size < 1 or max_length < 1:
        raise SelectionError(f"batch_size={batch_size} and max_length={max_length} must be >= 1.")


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class SemanticSelection:
    """Options of the ``semantic`` method: sentence-encoder similarity between the concept
    and each feature's explanation words (:func:`semantic_scores`). Offline; needs
    explanations. Bad values raise :class:`SelectionError` here, at construction."""

    name: ClassVar[Method] = "semantic"

    scoring: Scoring = field(
        default="words",
        metadata={
            "help": "words: each explanation word against each seed word, mean of the top_m "
            "best; text: the joined words (or the summary) against the concept text"
        },
    )
    top_m: int = field(
        default=DEFAULT_TOP_M,
        metadata={"help": "words scoring: a feature scores the mean of its top_m best words"},
    )
    generic_share: float = field(
        default=DEFAULT_GENERIC_SHARE,
        metadata={
            "help": "words scoring: ignore words in the top lists of more than this share of "
            f"the features (and of more than {GENERIC_MIN_COUNT}); 1 ignores none"
        },
    )
    encoder: TextEncoder | None = field(
        default=None,
        metadata={"help": "the sentence encoder (default: the packaged all-MiniLM-L6-v2)"},
    )

    def __post_init__(self) -> None:
        _check_scoring(self.scoring, self.top_m, self.generic_share)


@dataclass(frozen=True)
class LLMSelection:
    """Options of the ``llm`` method: an LLM judge labels each feature's words with one of
    the concept's categories or ``none`` (:func:`judge_features`); labelled features are
    selected. Needs explanations; ``threshold`` does not apply."""

    name: ClassVar[Method] = "llm"

    backend: SummaryBackend = field(
        metadata={
            "help": "the judge: an OpenAI-compatible server or a local chat model "
            "(steerlex.explain.summaries.backend_from_options)"
        },
    )
    cache_dir: str | Path | None = field(
        default=None,
        metadata={
            "help": "where the judge's answers are cached (default <steerlex cache>/selection)"
        },
    )

    def __post_init__(self) -> None:
        if self.backend is None:
            raise SelectionError(
                "The 'llm' method needs a judge back end (--llm openai --llm-base-url URL "
                "--llm-model NAME, or --llm transformers --llm-model SPEC)."
            )


@dataclass(frozen=True)
class DataSelection:
    """Options of the ``data`` method (the baseline): features whose mean activation on the
    user's text differs most between harmful and benign prompts (:func:`mean_activations`,
    :func:`data_scores`). Needs the SAE and its model; explanations only supply the words.
    The prompt texts are stored as tuples."""

    name: ClassVar[Method] = "data"

    harmful: Sequence[str] = field(
        metadata={"help": "harmful prompt texts (e.g. selection_prompts(['harmbench']))"}
    )
    benign: Sequence[str] = field(
        metadata={"help": "benign prompt texts (e.g. selection_prompts(['benign']))"}
    )
    direction: Direction = field(
        default="harmful",
        metadata={"help": "keep features more active on harmful (default) or on benign prompts"},
    )
    layer: int | None = field(
        default=None,
        metadata={"help": "the SAE's layer (default: the one the SAE records)"},
    )
    batch_size: int = field(
        default=DEFAULT_BATCH_SIZE, metadata={"help": "prompts per forward pass"}
    )
    max_length: int = field(
        default=DEFAULT_MAX_LENGTH, metadata={"help": "tokens per prompt (longer are cut)"}
    )

    def __post_init__(self) -> None:
        for what in ("harmful", "benign"):
            texts = getattr(self, what)
            if isinstance(texts, str) or not all(isinstance(t, str) for t in texts or ()):
                raise SelectionError(f"{what} must be a list of prompt texts, got {texts!r:.60}.")
            object.__setattr__(self, what, tuple(texts or ()))
        if not self.harmful or not self.benign:
            raise SelectionError(
                "The 'data' method needs harmful and benign prompts (e.g. harmbench and benign)."
            )
        _check_direction(self.direction)
        _check_batching(self.batch_size, self.max_length)
        if self.layer is not None and self.layer < 0:
            raise SelectionError(f"layer={self.layer} must be a 0-based layer index (>= 0).")


@dataclass(frozen=True)
class ManualSelection:
    """Options of the ``manual`` method: feature ids chosen by hand, checked against the
    SAE's ``d_sae`` at selection. ``ids`` is stored as a tuple, duplicates dropped, order
    kept (:func:`parse_ids` reads ``"12,40,7"``). ``threshold`` and ``top_n`` do not
    apply."""

    name: ClassVar[Method] = "manual"

    ids: Sequence[int] = field(metadata={"help": "feature ids, in order (duplicates dropped)"})

    def __post_init__(self) -> None:
        if self.ids is None:
            raise SelectionError("The 'manual' method needs feature ids (--ids 12,40,7).")
        ids = tuple(parse_ids(self.ids))
        if not ids:
            raise SelectionError("No feature ids given; pass ids like --ids 12,40,7.")
        object.__setattr__(self, "ids", ids)


#: The options of one selection method; ``type(options).name`` is the method's name.
SelectionMethod = SemanticSelection | LLMSelection | DataSelection | ManualSelection
#: The options class of each method name, in the order the CLI lists them.
METHOD_OPTIONS: dict[Method, type[SelectionMethod]] = {
    "semantic": SemanticSelection,
    "llm": LLMSelection,
    "data": DataSelection,
    "manual": ManualSelection,
}
#: The method used when none is given.
DEFAULT_METHOD = SemanticSelection()


@dataclass(frozen=True)
class _Scores:
    """What one method's scoring hands to the picking step: every scored feature (any
    order), the method's settings for the result, and a phrase for the no-match error."""

    features: list[SelectedFeature]
    settings: dict[str, Any]
    what: str


# --------------------------------------------------------------------------- semantic


def _encoder_id(encoder: TextEncoder) -> str:
    if isinstance(encoder, SentenceEncoder):
        return f"all-MiniLM-L6-v2 (sha256:{WEIGHTS_SHA256})"
    return str(getattr(encoder, "name", type(encoder).__name__))


def _embed(encoder: TextEncoder, texts: Sequence[str], progress: bool, what: str) -> Tensor:
    """Unit rows ``[len(texts), d]`` (float32), encoded in chunks behind a progress bar."""
    chunk = 512
    parts: list[Tensor] = []
    starts = range(0, len(texts), chunk)
    bar = tqdm(
        starts, desc=f"embedding {what}", unit="chunk", disable=not progress or len(starts) < 2
    )
    for start in bar:
        out = encoder.encode(list(texts[start : start + chunk]))
        if (
            not isinstance(out, Tensor)
            or out.ndim != 2
            or out.shape[0] != len(texts[start : start + chunk])
        ):
            raise SelectionError(
                f"The text encoder returned {getattr(out, 'shape', type(out).__name__)} for "
                f"{len(texts[start : start + chunk])} texts; it must return [n, d]."
            )
        parts.append(out.to(torch.float32).cpu())
    if not parts:
        return torch.zeros(0, 1)
    return F.normalize(torch.cat(parts), dim=1)


def _embed_words(encoder: TextEncoder, words: Sequence[str], progress: bool) -> Tensor:
    """Unit rows for ``words``; for the packaged sentence encoder the vectors are kept on
    disk (``<steerlex cache>/word_vectors``), since every selection on one SAE embeds the
    same few thousand vocabulary words."""
    if not isinstance(encoder, SentenceEncoder):
        return _embed(encoder, words, progress, f"{len(words)} explanation words")
    path = cache_root() / "word_vectors" / f"minilm-{WEIGHTS_SHA256[:16]}.safetensors"
    known: dict[str, Tensor] = {}
    with contextlib.suppress(Exception):  # a damaged cache is rebuilt
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("words", "[]"))
            vectors = f.get_tensor("vectors")
        known = dict(zip(stored, vectors, strict=True))
    new = [w for w in words if w not in known]
    if new:
        fresh = _embed(encoder, new, progress, f"{len(new)} explanation words")
        known.update(zip(new, fresh, strict=True))
        order = sorted(known)
        blob = save_safetensors(
            {"vectors": torch.stack([known[w] for w in order]).contiguous()},
            metadata={"words": json.dumps(order, ensure_ascii=False)},
        )
        with contextlib.suppress(OSError):
            write_bytes_atomic(path, blob)
    if not words:
        return torch.zeros(0, 1)
    return F.normalize(torch.stack([known[w] for w in words]), dim=1)


def _word_key(word: str) -> str:
    """The letters of ``word``, lower-cased, runs joined by spaces (``"_SAFE-mode"`` ->
    ``"safe mode"``); empty for pure punctuation or digits."""
    return " ".join(re.findall(r"[^\W\d_]+", word.lower()))


def generic_words(
    explanations: Sequence[Explanation],
    n_words: int = DEFAULT_N_WORDS,
    share: float = DEFAULT_GENERIC_SHARE,
) -> set[str]:
    """Words in the first ``n_words`` of more than ``share`` of the features' lists (and of
    more than :data:`GENERIC_MIN_COUNT` lists): they describe no feature in particular."""
    if share >= 1:
        return set()
    counts = Counter(w for e in explanations for w in set(e.words[:n_words]))
    limit = max(share * len(explanations), GENERIC_MIN_COUNT)
    return {w for w, n in counts.items() if n > limit}


def semantic_scores(
    explanations: Sequence[Explanation],
    concept: Concept,
    encoder: TextEncoder,
    *,
    scoring: Scoring = "words",
    n_words: int = DEFAULT_N_WORDS,
    top_m: int = DEFAULT_TOP_M,
    generic_share: float = DEFAULT_GENERIC_SHARE,
    progress: bool = True,
) -> list[SelectedFeature]:
    """A :class:`SelectedFeature` for every explanation with words, in their order (unsorted).

    ``scoring="words"``: each of a feature's first ``n_words`` words (less the generic ones,
    see :func:`generic_words`) gets its highest cosine with the concept's anchors (every
    seed word, and the description); the score is the mean of its ``top_m`` best words
    (missing words count 0), so a feature needs several on-concept words to score high.
    ``scoring="text"``: the cosine between the joined words (or the summary, when present)
    and ``"<description>: <seed words>"``. Scores are cosines, in [-1, 1].
    """
    _check_scoring(scoring, top_m, generic_share)
    _check_n_words(n_words)
    usable = [e for e in explanations if e.words or (scoring == "text" and e.summary)]
    if not usable:
        raise SelectionError(
            "None of the explanations has words to compare with the concept; explain the SAE "
            "with a word-list method (mi, paper, mi-input, logitlens, topact) first."
        )
    if scoring == "text":
        return _text_scores(usable, concept, encoder, n_words=n_words, progress=progress)
    anchors = [*concept.words, *([concept.description] if concept.description.strip() else [])]
    skip = generic_words(usable, n_words, generic_share)
    # Tokens (logitlens, topact) are compared by their letters: " Protect", "_PROTECT" and
    # "protect" are one word, counted once per feature.
    lists = [
        list(dict.fromkeys(k for w in e.words[:n_words] if w not in skip if (k := _word_key(w))))
        for e in usable
    ]
    vocab = sorted({w for ws in lists for w in ws})
    index = {w: i for i, w in enumerate(vocab)}
    A = _embed(encoder, anchors, progress, "concept")
    V = _embed_words(encoder, vocab, progress)
    best = (V @ A.T).max(dim=1).values if vocab else torch.zeros(0)
    out = []
    for e, ws in zip(usable, lists, strict=True):
        sims = sorted(((float(best[index[w]]), w) for w in ws), reverse=True)[:top_m]
        score = sum(s for s, _ in sims) / top_m
        via = ", ".join(w for _, w in sims) or "none (only generic words)"
        out.append(
            SelectedFeature(
                id=e.feature,
                score=round(score, 6),
                reason=f"semantic match {score:.2f} with '{concept.name}' via words: {via}",
                words=tuple(e.words[:n_words]),
                details={"evidence": [[w, round(s, 4)] for s, w in sims]},
            )
        )
    return out


def _text_scores(
    explanations: Sequence[Explanation],
    concept: Concept,
    encoder: TextEncoder,
    *,
    n_words: int,
    progress: bool,
) -> list[SelectedFeature]:
    concept_text = concept.description.strip()
    if concept.words:
        concept_text = (
            f"{concept_text}: {', '.join(concept.words)}"
            if concept_text
            else ", ".join(concept.words)
        )
    texts = [e.summary if e.summary else ", ".join(e.words[:n_words]) for e in explanations]
    C = _embed(encoder, [concept_text], progress, "concept")
    X = _embed(encoder, texts, progress, f"{len(texts)} explanations")
    sims = (X @ C.T)[:, 0]
    out = []
    for e, text, s in zip(explanations, texts, sims.tolist(), strict=True):
        what = f"its summary '{text}'" if e.summary else f"its words: {', '.join(e.words[:5])}"
        out.append(
            SelectedFeature(
                id=e.feature,
                score=round(s, 6),
                reason=f"semantic match {s:.2f} with '{concept.name}' via {what}",
                words=tuple(e.words[:n_words]),
            )
        )
    return out


def _semantic_method(
    explanations: Sequence[Explanation],
    concept: Concept,
    options: SemanticSelection,
    *,
    n_words: int,
    progress: bool,
) -> _Scores:
    """The ``semantic`` method: :func:`semantic_scores` under ``options``, and its settings."""
    encoder = options.encoder
    if encoder is None:  # read through the module, so that tests can swap in a fake
        encoder = text_embed.load_sentence_encoder()
    scored = semantic_scores(
        explanations, concept, encoder, scoring=options.scoring, n_words=n_words,
        top_m=options.top_m, generic_share=options.generic_share, progress=progress,
    )  # fmt: skip
    by_words = options.scoring == "words"
    settings = {
        "scoring": options.scoring,
        "n_words": n_words,
        "top_m": options.top_m if by_words else None,
        "generic_share": options.generic_share if by_words else None,
        "encoder": _encoder_id(encoder),
    }
    return _Scores(
        scored, settings, f"{options.scoring} scoring of {len(scored)} explained features"
    )


# --------------------------------------------------------------------------- LLM judge

JUDGE_SYSTEM = """\
You label features of a neural language model. For each feature you get the words most \
strongly tied to it, strongest first. Decide whether the words, taken together, are about \
this topic: {description}.
If they are, answer with the one category from the list below that fits them best. If \
they are not, or the words share no clear meaning (word pieces, unrelated words), answer \
exactly: none

Categories:
{categories}

Answer with the category name only, or none."""


def judge_system(concept: Concept) -> str:
    """The LLM judge's instruction for ``concept``."""
    cats = "\n".join(f"- {c}" for c in concept.labels)
    return JUDGE_SYSTEM.format(
        description=concept.description or ", ".join(concept.words), categories=cats
    )


def parse_category(answer: object, labels: Sequence[str]) -> str:
    """The label named in the first line of ``answer`` (one of ``labels``) or ``"none"``.

    A label also matches by its first word ("ethical" for "ethical and safe behaviour").
    Raises :class:`~steerlex.explain.summaries.BadAnswer` when no label, or several, are named.
    """
    line = _first_line(answer).lower().strip(" .!\"'`")
    if re.fullmatch(r"(none|no|not applicable|n/?a)\b.*", line):
        return "none"
    found = {lab for lab in labels if lab.lower() in line}
    if not found:
        found = {
            lab for lab in labels if re.search(rf"\b{re.escape(lab.lower().split()[0])}\b", line)
        }
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        # "ethical and safe behaviour" contains no other label; prefer the longest contained one.
        longest = sorted(found, key=len, reverse=True)
        if all(other.lower() in longest[0].lower() for other in longest[1:]):
            return longest[0]
    raise BadAnswer(
        f"the answer {line[:60]!r} names {'several' if found else 'none'} of the categories "
        f"({', '.join(labels)}) and is not 'none'"
    )


@dataclass
class JudgeReport:
    """What an LLM judging run did: features labelled with a category, ``none``, failed
    (with reasons), without words, and how many answers came from the cache."""

    backend: str
    total: int = 0
    matched: int = 0
    none: int = 0
    failed: int = 0
    no_words: int = 0
    cached: int = 0
    failures: dict[int, str] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"LLM judge: {self.matched} of {self.total} features labelled, {self.none} 'none', "
            f"{self.failed} failed, {self.no_words} without words ({self.cached} from the "
            f"cache; back end {self.backend})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "total": self.total,
            "matched": self.matched,
            "none": self.none,
            "failed": self.failed,
            "no_words": self.no_words,
            "cached": self.cached,
            "failures": {str(k): v for k, v in sorted(self.failures.items())},
        }


def default_judge_cache_dir() -> Path:
    """``<steerlex cache>/selection``: where LLM judge answers are cached by default."""
    return cache_root() / "selection"


def judge_features(
    explanations: Sequence[Explanation],
    concept: Concept,
    backend: SummaryBackend,
    *,
    n_words: int = 15,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    max_consecutive_errors: int = 3,
) -> tuple[dict[int, str], JudgeReport]:
    """``{feature: label}`` (a label of ``concept`` or ``"none"``) for every feature the
    judge answered, and a report.

    Same conventions as :func:`steerlex.explain.summaries.summarize`: each answer is cached
    (sha256 of the back end's name and both prompts) under ``cache_dir`` (default
    :func:`default_judge_cache_dir`); a failed call or an unusable answer costs that
    feature its label (a ``SummaryWarning``, counted), never the run.
    """
    _check_n_words(n_words)
    system = judge_system(concept)
    labels = concept.labels
    items = [
        (e.feature, system, words_prompt(e.words, n_words) if e.words else None)
        for e in explanations
    ]
    outcome = _ask_all(
        items,
        backend,
        lambda answer: parse_category(answer, labels),
        Path(cache_dir) if cache_dir is not None else default_judge_cache_dir(),
        what="judgement",
        progress=progress,
        max_consecutive_errors=max_consecutive_errors,
    )
    report = JudgeReport(
        backend=backend.name,
        total=len(explanations),
        matched=sum(1 for v in outcome.values.values() if v != "none"),
        none=sum(1 for v in outcome.values.values() if v == "none"),
        failed=len(outcome.failures),
        no_words=outcome.no_input,
        cached=outcome.cached,
        failures=dict(outcome.failures),
    )
    return dict(outcome.values), report


def _llm_method(
    explanations: Sequence[Explanation],
    concept: Concept,
    options: LLMSelection,
    *,
    n_words: int,
    progress: bool,
) -> _Scores:
    """The ``llm`` method: every feature the judge labelled with a category (not ``none``)
    scores 1.0; judge failures are warned about once and skipped."""
    labels, report = judge_features(
        explanations, concept, options.backend, n_words=n_words, cache_dir=options.cache_dir,
        progress=progress,
    )  # fmt: skip
    if report.failed:
        warnings.warn(
            f"The LLM judge gave no usable answer for {report.failed} of {report.total} "
            f"features (first: {sorted(report.failures)[:5]}); they were skipped. Rerun "
            "to retry them: finished answers are cached.",
            stacklevel=4,  # the caller of select_features
        )
    words = {e.feature: tuple(e.words[:n_words]) for e in explanations}
    scored = [
        SelectedFeature(
            id=c,
            score=1.0,
            reason=f"the LLM judge labelled its words '{lab}'",
            words=words[c],
            details={"category": lab},
        )
        for c, lab in sorted(labels.items())
        if lab != "none"
    ]
    settings = {"n_words": n_words, "judge": report.to_json(), "categories": list(concept.labels)}
    return _Scores(scored, settings, report.describe())


# --------------------------------------------------------------------------- data


def selection_prompts(
    sources: Sequence[str],
    *,
    split: Split = "train",
    heldout_fraction: float = 0.1,
    limit: int | None = None,
) -> list[str]:
    """Texts of ``split`` (by text id, :func:`steerlex.data.split.select_split`) of each
    source, at most ``limit`` per source. The default ``train`` part leaves the
    ``heldout`` part (the same texts ``steerlex harvest --split heldout`` takes) for
    evaluating the steering."""
    if not sources:
        raise SelectionError("Give at least one prompt source (a named set or a file).")
    if limit is not None and limit < 1:
        raise SelectionError(f"limit must be at least 1, got {limit}.")
    out: list[str] = []
    for spec in sources:
        items = select_split(load_texts(spec).items, split, heldout_fraction)
        if not items:
            raise SelectionError(
                f"The {split} part of {spec} is empty (held-out fraction {heldout_fraction}); "
                "use another split or more texts."
            )
        out.extend(it.text for it in items[:limit])
    return out


@torch.no_grad()
def mean_activations(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    texts: Sequence[str],
    *,
    layer: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    system_prompt: str | None = None,
    progress: bool = True,
    desc: str = "prompts",
) -> Tensor:
    """``[d_sae]`` float64: each feature's activation averaged over the user's-text tokens
    of each prompt, then over prompts.

    Prompts are chat-formatted when the tokenizer has a chat template (only the positions
    of the user's own text, ``encode_prompt``'s content span, count), raw otherwise; the
    model runs up to ``layer`` only. Prompts with no content token are skipped.
    """
    _check_batching(batch_size, max_length)
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    counted = 0
    sae_device = sae.W_enc.device
    batches = prompt_residuals(
        loaded, texts, layer, batch_size=batch_size, max_length=max_length,
        system_prompt=system_prompt, skip_empty=True,
    )  # fmt: skip
    n_batches = -(-len(texts) // batch_size)
    for enc, resid in tqdm(batches, total=n_batches, desc=desc, unit="batch", disable=not progress):
        for i, e in enumerate(enc):
            rows = resid[i, e.content_start : e.content_end].to(sae_device)
            total += sae.encode(rows).mean(dim=0).to(torch.float64).cpu()
            counted += 1
    if counted == 0:
        raise SelectionError(
            f"None of the {len(texts)} {desc} has a token of user text; check the prompts."
        )
    return total / counted


def data_scores(
    mean_harmful: Tensor,
    mean_benign: Tensor,
    *,
    direction: Direction = "harmful",
    explanations: Sequence[Explanation] | None = None,
    n_words: int = DEFAULT_N_WORDS,
) -> list[SelectedFeature]:
    """Features whose mean activation is higher on the ``direction`` group, scored by the
    difference (``harmful - benign``, or the reverse), with both means in ``details``."""
    _check_direction(direction)
    diff = mean_harmful - mean_benign if direction == "harmful" else mean_benign - mean_harmful
    words = {e.feature: tuple(e.words[:n_words]) for e in explanations or ()}
    other = "benign" if direction == "harmful" else "harmful"
    out = []
    for c in torch.nonzero(diff > 0).flatten().tolist():
        h, b, d = float(mean_harmful[c]), float(mean_benign[c]), float(diff[c])
        ours, theirs = (h, b) if direction == "harmful" else (b, h)
        out.append(
            SelectedFeature(
                id=int(c),
                score=round(d, 6),
                reason=(
                    f"mean activation {ours:.3g} on {direction} vs {theirs:.3g} on {other} "
                    f"prompts (difference {d:.3g})"
                ),
                words=words.get(int(c), ()),
                details={
                    "mean_harmful": round(h, 6),
                    "mean_benign": round(b, 6),
                    "difference": round(d, 6),
                },
            )
        )
    return out


def _data_method(
    explanations: Sequence[Explanation] | None,
    options: DataSelection,
    *,
    sae: SparseAutoencoder | None,
    loaded: LoadedModel | None,
    n_words: int,
    progress: bool,
) -> _Scores:
    """The ``data`` method: :func:`mean_activations` of both prompt groups on ``sae`` (which
    must fit ``loaded``), scored by :func:`data_scores`; explanations only give the words."""
    if sae is None or loaded is None:
        raise SelectionError("The 'data' method needs the SAE and its model.")
    layer = options.layer if options.layer is not None else sae.cfg.layer
    if layer is None:
        raise SelectionError(
            "The SAE does not record its layer; pass the layer it was trained on (--layer)."
        )
    check_sae_fits(sae, loaded=loaded, layer=layer)
    kw: dict[str, Any] = dict(
        layer=layer, batch_size=options.batch_size, max_length=options.max_length,
        progress=progress,
    )  # fmt: skip
    m_h = mean_activations(loaded, sae, options.harmful, desc="harmful prompts", **kw)
    m_b = mean_activations(loaded, sae, options.benign, desc="benign prompts", **kw)
    direction = options.direction
    scored = data_scores(m_h, m_b, direction=direction, explanations=explanations, n_words=n_words)
    settings = {
        "direction": direction,
        "layer": layer,
        "n_harmful": len(options.harmful),
        "n_benign": len(options.benign),
        "batch_size": options.batch_size,
        "max_length": options.max_length,
        "positions": "content",
        "model": loaded.spec,
        "model_weights_id": loaded.weights_id,
    }
    what = f"difference of mean activations, {direction} minus the other group"
    return _Scores(scored, settings, what)


# --------------------------------------------------------------------------- manual


def manual_features(
    explanations: Sequence[Explanation] | None,
    options: ManualSelection,
    sae: SparseAutoencoder | None,
    *,
    n_words: int = DEFAULT_N_WORDS,
) -> list[SelectedFeature]:
    """The hand-picked ids of ``options``, in their order, each with score 1.0 and its first
    ``n_words`` explanation words (when ``explanations`` has it); raises unless every id is
    a feature of ``sae``."""
    if sae is None:
        raise SelectionError("The 'manual' method needs the SAE, to check the ids.")
    d_sae = sae.cfg.d_sae
    bad = [c for c in options.ids if c >= d_sae]
    if bad:
        raise SelectionError(
            f"Feature ids {bad[:5]} are out of range; this SAE has features 0..{d_sae - 1}."
        )
    words = {e.feature: tuple(e.words[:n_words]) for e in explanations or ()}
    return [SelectedFeature(c, 1.0, "chosen by hand", words.get(c, ())) for c in options.ids]


# --------------------------------------------------------------------------- selection


def _check_common(method: object, threshold: float | None, top_n: int | None, n_words: int) -> None:
    """Raise unless ``method`` is an options object and the common limits make sense."""
    if not isinstance(method, tuple(METHOD_OPTIONS.values())):
        names = ", ".join(f"{cls.__name__}(...)" for cls in METHOD_OPTIONS.values())
        raise SelectionError(
            f"Unknown selection method {method!r}; pass the options of one method: {names} "
            "from steerlex.steer.select."
        )
    if top_n is not None and top_n < 1:
        raise SelectionError(f"top_n must be at least 1, got {top_n}.")
    if threshold is not None and not math.isfinite(threshold):
        raise SelectionError(f"threshold must be a finite number, got {threshold}.")
    _check_n_words(n_words)


def _explanation_method(
    explanations: Sequence[Explanation] | None,
    method: SelectionMethod,
    sae: SparseAutoencoder | None,
    explanations_path: str | Path | None,
) -> str | None:
    """The explanations' method after :func:`check_explanations`; ``None`` without
    explanations, which only ``data`` and ``manual`` accept."""
    if explanations is None:
        if isinstance(method, (SemanticSelection, LLMSelection)):
            raise SelectionError(
                f"The '{method.name}' method needs explanations of the SAE's features."
            )
        return None
    d_sae = sae.cfg.d_sae if sae is not None else None
    return check_explanations(
        explanations, d_sae, source=str(explanations_path or "the explanations")
    )


def _selection_side(
    method: SelectionMethod, side: Side | None, expl_method: str | None, concept: Concept
) -> Side:
    """The side the selection is of: ``input`` for ``data``; else ``side``, or the
    explanations', or the concept's. Raises when ``side`` contradicts the explanations;
    warns when explanations matched by words describe the other side than the concept's."""
    if isinstance(method, DataSelection):
        if side is not None and side != "input":
            raise SelectionError(
                "The 'data' method selects features by what makes them fire (input side); "
                f"side={side!r} does not apply."
            )
        return "input"
    expl_side = explanation_side(expl_method) if expl_method is not None else None
    chosen = side or expl_side or concept.side
    if expl_side is not None and expl_side != chosen:
        others = " or ".join(method_names(chosen))
        raise SelectionError(
            f"side={chosen!r} but '{expl_method}' explanations describe the {expl_side} "
            f"side; pass {others} explanations."
        )
    if isinstance(method, (SemanticSelection, LLMSelection)) and chosen != concept.side:
        role = (
            "features to push up, described by what they promote (output side)"
            if concept.side == "output"
            else "detectors, described by what makes them fire (input side)"
        )
        warnings.warn(
            f"Concept '{concept.name}' selects {role}, but the '{expl_method}' "
            f"explanations describe the {chosen} side; the default for this concept "
            f"is '{default_method(concept.side)}'.",
            stacklevel=3,  # the caller of select_features
        )
    return chosen


def _method_limits(
    method: SelectionMethod, threshold: float | None, top_n: int | None
) -> tuple[float | None, int | None]:
    """``(threshold, top_n)`` for ``method``: refused where they do not apply; with neither
    given, :data:`DEFAULT_THRESHOLD` (semantic) or :data:`DEFAULT_DATA_TOP_N` (data)."""
    if isinstance(method, ManualSelection):
        if threshold is not None or top_n is not None:
            raise SelectionError("threshold and top_n do not apply to hand-picked ids.")
    elif isinstance(method, LLMSelection):
        if threshold is not None:
            raise SelectionError(
                "threshold does not apply to the 'llm' method (labels, not scores)."
            )
    elif threshold is None and top_n is None:
        if isinstance(method, SemanticSelection):
            threshold = DEFAULT_THRESHOLD[method.scoring]
        else:
            top_n = DEFAULT_DATA_TOP_N
    return threshold, top_n


def _score(
    method: SemanticSelection | LLMSelection | DataSelection,
    explanations: Sequence[Explanation] | None,
    concept: Concept,
    *,
    n_words: int,
    sae: SparseAutoencoder | None,
    loaded: LoadedModel | None,
    progress: bool,
) -> _Scores:
    """Every feature scored by ``method`` (the one function per method)."""
    if isinstance(method, DataSelection):
        return _data_method(
            explanations, method, sae=sae, loaded=loaded, n_words=n_words, progress=progress
        )
    assert explanations is not None  # _explanation_method refused None for these
    if isinstance(method, SemanticSelection):
        return _semantic_method(explanations, concept, method, n_words=n_words, progress=progress)
    return _llm_method(explanations, concept, method, n_words=n_words, progress=progress)


def _pick(
    scored: Sequence[SelectedFeature],
    threshold: float | None,
    top_n: int | None,
    *,
    concept: Concept,
    what: str,
) -> tuple[list[SelectedFeature], int]:
    """The best features (score then id order) at or above ``threshold``, at most ``top_n``;
    also how many passed the threshold. Raises when none is left."""
    ranked = sorted(scored, key=lambda f: (-f.score, f.id))
    kept = [f for f in ranked if threshold is None or f.score >= threshold]
    n_passed = len(kept)
    if top_n is not None:
        kept = kept[:top_n]
    if not kept:
        if not ranked:
            raise SelectionError(f"No feature matches concept '{concept.name}' ({what}).")
        best = ranked[0]
        hint = max(round(best.score - 0.05, 2), 0.0)
        raise SelectionError(
            f"No feature matches concept '{concept.name}' at threshold {threshold} ({what}); "
            f"the best score is {best.score:.3f} (feature {best.id}: {best.reason}). Pass a "
            f"lower threshold (e.g. --threshold {hint}), more seed words, or check that these "
            "explanations describe the side you want."
        )
    return kept, n_passed


def select_features(
    explanations: Sequence[Explanation] | None,
    concept: Concept | str,
    method: SelectionMethod = DEFAULT_METHOD,
    *,
    side: Side | None = None,
    threshold: float | None = None,
    top_n: int | None = None,
    n_words: int = DEFAULT_N_WORDS,
    sae: SparseAutoencoder | None = None,
    loaded: LoadedModel | None = None,
    sae_path: str | Path | None = None,
    explanations_path: str | Path | None = None,
    extra_settings: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> FeatureSelection:
    """Choose features of ``sae`` for ``concept`` (a :class:`Concept` or a preset name).

    ``method`` is the options of one method: :class:`SemanticSelection` (default; needs
    ``explanations``), :class:`LLMSelection` (``explanations``), :class:`DataSelection`
    (``sae`` and ``loaded``; ``explanations`` optional, for the words) or
    :class:`ManualSelection` (``sae``, to check the ids).

    Threshold and ``top_n``: features scoring at least ``threshold`` are kept, then the
    ``top_n`` best of them. With neither given, ``semantic`` uses
    :data:`DEFAULT_THRESHOLD` and ``data`` keeps the :data:`DEFAULT_DATA_TOP_N` best;
    ``llm`` keeps every labelled feature (``threshold`` refused); ``manual`` refuses both.
    ``n_words``: explanation words read per feature (scored, shown to the judge, recorded).
    ``side`` (default: the explanations' side, else the concept's) must agree with the
    explanations' method; explanations of the other side than the concept's only warn.
    ``sae_path``/``explanations_path``/``extra_settings`` are recorded in the result.

    Raises:
        SelectionError: bad input, or no feature matches (the message gives the best score).
    """
    if isinstance(concept, str):
        concept = get_concept(concept)
    _check_common(method, threshold, top_n, n_words)
    expl_method = _explanation_method(explanations, method, sae, explanations_path)
    chosen_side = _selection_side(method, side, expl_method, concept)
    threshold, top_n = _method_limits(method, threshold, top_n)
    settings: dict[str, Any] = dict(extra_settings or {})
    if isinstance(method, ManualSelection):
        features = manual_features(explanations, method, sae, n_words=n_words)
        settings.update(threshold=None, top_n=None, n_selected=len(features))
    else:
        scores = _score(
            method, explanations, concept, n_words=n_words, sae=sae, loaded=loaded,
            progress=progress,
        )  # fmt: skip
        features, n_passed = _pick(
            scores.features, threshold, top_n, concept=concept, what=scores.what
        )
        settings.update(scores.settings)
        settings.update(
            threshold=threshold, top_n=top_n, n_scored=len(scores.features), n_passed=n_passed,
            n_selected=len(features),
        )  # fmt: skip
    return FeatureSelection(
        concept=concept,
        method=method.name,
        side=chosen_side,
        features=features,
        explanations=_expl_record(explanations_path, expl_method),
        sae=sae_record(sae, sae_path) if sae is not None else None,
        settings=settings,
    )


def _expl_record(path: str | Path | None, method: str | None) -> dict[str, Any] | None:
    if method is None:
        return None
    return {"path": None if path is None else str(path), "method": method}


def read_explanation_settings(path: str | Path) -> dict[str, Any]:
    """The ``<method>.json`` settings next to ``<method>.jsonl`` (empty when absent/unreadable)."""
    p = Path(path).with_suffix(".json")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cast(dict[str, Any], data) if isinstance(data, dict) else {}


__all__ = [
    "DEFAULT_DATA_TOP_N",
    "DEFAULT_METHOD",
    "DEFAULT_THRESHOLD",
    "METHODS",
    "METHOD_OPTIONS",
    "DataSelection",
    "FeatureSelection",
    "JudgeReport",
    "LLMSelection",
    "ManualSelection",
    "SelectedFeature",
    "SelectionError",
    "SelectionMethod",
    "SemanticSelection",
    "check_explanation_settings",
    "check_explanations",
    "data_scores",
    "explanation_side",
    "generic_words",
    "judge_features",
    "manual_features",
    "mean_activations",
    "parse_category",
    "parse_ids",
    "read_explanation_settings",
    "sae_record",
    "select_features",
    "selection_prompts",
    "semantic_scores",
]
