"""The selection job: choose the SAE features to steer (or to gate on) for a concept."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlex.core.config import inherit, option
from steerlex.core.errors import SelectionError
from steerlex.core.paths import check_output_file
from steerlex.data.split import SPLITS, Split
from steerlex.explain.method import Explanation, Side, default_method, method_names
from steerlex.explain.run import read_explanations
from steerlex.explain.summaries import BACKEND_KINDS, backend_from_options
from steerlex.jobs.context import RunContext
from steerlex.jobs.explain import ExplainMetricsConfig, sae_dir
from steerlex.steer.concepts import PRESETS, Concept, get_concept
from steerlex.steer.select import (
    METHOD_OPTIONS,
    DataSelection,
    Direction,
    FeatureSelection,
    LLMSelection,
    ManualSelection,
    Scoring,
    SelectionMethod,
    SemanticSelection,
    check_explanation_settings,
    parse_ids,
    read_explanation_settings,
    select_features,
    selection_prompts,
)

__all__ = ["SelectConfig", "SelectResult", "concept_side", "select_job"]


def _concept_help() -> str:
    return (
        f"a built-in concept ({', '.join(PRESETS)}) or a name for your own (then give "
        "--concept-text and/or --concept-words)"
    )


@dataclass(frozen=True)
class SelectConfig:
    """``steerlex select``: features for a concept, by their explanations (semantic, llm),
    by data (harmful vs benign activations, the baseline) or by hand."""

    sae: str | None = option(
        None, required=True, help="SAE directory (or any format load_sae reads)"
    )
    concept: str | None = option(None, required=True, help=_concept_help)
    concept_text: str | None = option(None, help="what the concept means, in a phrase or sentence")
    concept_words: str | None = option(
        None, help="seed words, comma-separated: doctor,nurse,medicine"
    )
    concept_side: Side | None = option(
        None, choices=("output", "input"),
        help="for your own concept: output (features to push up; default) or input (detectors)",
    )  # fmt: skip
    method: str = option(
        "semantic", choices=tuple(METHOD_OPTIONS),
        help="semantic: sentence-encoder match between the concept and each feature's "
        "explanation words; llm: an LLM judge labels each word list; data: features whose "
        "mean activation differs most between harmful and benign prompts; manual: --ids",
    )  # fmt: skip
    explanations: str | None = inherit(ExplainMetricsConfig, "explanations")
    explanation_method: str | None = option(
        None, choices=method_names,
        help="which explanation file to read (default: the first method describing the "
        "concept's side: mi for output-side concepts such as safety, mi-input for input-side "
        "ones such as harm)",
    )  # fmt: skip
    threshold: float | None = option(
        None,
        help="keep features scoring at least this (semantic default 0.7 with --scoring words, "
        "0.5 with text, unless only --top-n is given; data: a minimum activation difference)",
    )
    top_n: int | None = option(None, help="keep at most the N best (data default 20)")
    scoring: Scoring = inherit(SemanticSelection, "scoring")
    top_m: int = inherit(SemanticSelection, "top_m")
    generic_share: float = inherit(SemanticSelection, "generic_share")
    n_words: int = option(10, help="explanation words used")
    ids: str | None = option(None, help="manual: feature ids, comma-separated")
    llm: str = option(
        "openai", choices=BACKEND_KINDS,
        help="llm: judge back end, an OpenAI-compatible server or a local chat model",
    )  # fmt: skip
    llm_base_url: str | None = option(None, help="llm: API root, e.g. http://localhost:8000/v1")
    llm_model: str | None = option(
        None, help="llm: served model name (openai) or steerlex model spec (transformers)"
    )
    model: str | None = option(None, help="data: model spec (default: the one the SAE records)")
    harmful: list[str] = option(
        factory=lambda: ["harmbench"], repeat=True, help="data: harmful prompt source, repeatable"
    )
    benign: list[str] = option(
        factory=lambda: ["benign"], repeat=True, help="data: benign prompt source, repeatable"
    )
    split: Split = option(
        "train", choices=SPLITS,
        help="data: part of each source to use, by text id (train keeps the held-out part for "
        "evaluating the steering)",
    )  # fmt: skip
    heldout_fraction: float = option(0.1, help="data: held-out share")
    limit: int = option(200, help="data: prompts per source")
    direction: Direction = inherit(DataSelection, "direction")
    layer: int | None = inherit(DataSelection, "layer")
    batch_size: int = inherit(DataSelection, "batch_size")
    max_length: int = inherit(DataSelection, "max_length")
    device: str = option("cpu", help="data / llm transformers: torch device")
    out: str | None = option(None, help="output JSON (default SAE_DIR/selected_<concept>.json)")

    def validate(self) -> None:
        if not self.sae or not self.concept:
            raise SelectionError("select needs --sae (an SAE) and --concept (what to select).")
        if self.out:
            check_output_file(self.out, "--out", SelectionError)


def _concept(cfg: SelectConfig) -> Concept:
    assert cfg.concept is not None
    return get_concept(
        cfg.concept, description=cfg.concept_text, words=cfg.concept_words, side=cfg.concept_side
    )


def concept_side(cfg: SelectConfig) -> Side:
    """The side of a feature ``cfg``'s concept selects (output: features to push up;
    input: detectors)."""
    return _concept(cfg).side


@dataclass(frozen=True)
class SelectResult:
    """The selection, where it was written, and which explanation file it read."""

    selection: FeatureSelection
    path: Path
    explanation_method: str | None

    @property
    def features(self) -> list[Any]:
        return self.selection.features

    @property
    def method(self) -> str:
        return self.selection.method


def _explanations(
    cfg: SelectConfig, concept: Concept, sae: Any
) -> tuple[list[Explanation] | None, Path, str]:
    assert cfg.sae is not None
    expl_dir = Path(cfg.explanations) if cfg.explanations else sae_dir(cfg.sae) / "explanations"
    method = cfg.explanation_method or default_method(concept.side)
    path = expl_dir / f"{method}.jsonl"
    needs_words = cfg.method in ("semantic", "llm")
    if not path.is_file():
        if not needs_words:
            return None, path, method
        present = sorted(q.stem for q in expl_dir.glob("*.jsonl")) if expl_dir.is_dir() else []
        hint = (
            f" {expl_dir} has: {', '.join(present)}; pick one with --explanation-method."
            if present
            else f" Run `steerlex explain --sae {cfg.sae} --method {method}` first."
        )
        raise SelectionError(f"No {method} explanations at {path}.{hint}")
    explanations = read_explanations(path)
    check_explanation_settings(
        read_explanation_settings(path), sae, source=f"The explanations in {path}"
    )
    return explanations, path, method


def _method(
    cfg: SelectConfig, ctx: RunContext, sae: Any
) -> tuple[SelectionMethod, Any, dict[str, Any]]:
    """The method's options, the model it needs (data) and what to record about them."""
    if cfg.method == "llm":
        if cfg.llm == "transformers":
            if not cfg.llm_model:
                raise SelectionError("--llm transformers needs --llm-model (a model spec).")
            backend = backend_from_options(
                "transformers", loaded=ctx.model(cfg.llm_model, device=cfg.device)
            )
        else:
            backend = backend_from_options(cfg.llm, base_url=cfg.llm_base_url, model=cfg.llm_model)
        return LLMSelection(backend), None, {}
    if cfg.method == "data":
        spec = cfg.model or sae.cfg.model_spec
        if not spec:
            raise SelectionError(f"The SAE in {cfg.sae} does not record its model; pass --model.")
        split: dict[str, Any] = dict(
            split=cfg.split, heldout_fraction=cfg.heldout_fraction, limit=cfg.limit
        )
        method = DataSelection(
            harmful=selection_prompts(cfg.harmful, **split),
            benign=selection_prompts(cfg.benign, **split),
            direction=cfg.direction, layer=cfg.layer, batch_size=cfg.batch_size,
            max_length=cfg.max_length,
        )  # fmt: skip
        extra = dict(harmful_sources=list(cfg.harmful), benign_sources=list(cfg.benign), **split)
        return method, ctx.model(spec, device=cfg.device), extra
    if cfg.method == "manual":
        return ManualSelection(parse_ids(cfg.ids or "")), None, {}
    return (
        SemanticSelection(scoring=cfg.scoring, top_m=cfg.top_m, generic_share=cfg.generic_share),
        None,
        {},
    )


def select_job(cfg: SelectConfig, ctx: RunContext) -> SelectResult:
    """Select features for ``cfg.concept`` and write them as JSON (``cfg.out``, default
    ``SAE_DIR/selected_<concept>.json``)."""
    cfg.validate()
    assert cfg.sae is not None
    concept = _concept(cfg)
    sae = ctx.sae(cfg.sae, device=cfg.device)
    explanations, expl_path, expl_method = _explanations(cfg, concept, sae)
    method, loaded, extra = _method(cfg, ctx, sae)
    selection = select_features(
        explanations, concept, method, threshold=cfg.threshold, top_n=cfg.top_n,
        n_words=cfg.n_words, sae=sae, loaded=loaded, sae_path=str(cfg.sae),
        explanations_path=str(expl_path) if explanations is not None else None,
        extra_settings=extra, progress=ctx.progress,
    )  # fmt: skip
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", concept.name).strip("_") or "concept"
    out = Path(cfg.out) if cfg.out else sae_dir(cfg.sae) / f"selected_{name}.json"
    selection.save(out)
    return SelectResult(selection, out, expl_method if explanations is not None else None)
