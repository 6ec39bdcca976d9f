"""The explanation jobs: explain every feature (``explain``), score the explanations
(``explain-metrics``) and export them for Neuronpedia (``export-neuronpedia``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlex.core.config import inherit, option
from steerlex.core.errors import ExplainError
from steerlex.core.io import write_bytes_atomic, write_json_atomic
from steerlex.explain.method import EXPLANATION_METHODS, Explanation, get_method, method_names
from steerlex.explain.metrics import evaluate_explanations, examples_table, metrics_table
from steerlex.explain.run import (
    explain_sae,
    neuronpedia_records,
    read_method_files,
    write_explanations,
)
from steerlex.explain.summaries import (
    BACKEND_KINDS,
    SummaryBackend,
    backend_from_options,
    skipped_report,
    summarize,
)
from steerlex.explain.vocabulary import (
    Vocabulary,
    vocabulary_from_file,
    vocabulary_from_wordfreq,
)
from steerlex.jobs.context import RunContext
from steerlex.sae.base import SparseAutoencoder

__all__ = [
    "ExplainConfig",
    "ExplainMetricsConfig",
    "ExplainResult",
    "MethodResult",
    "MetricsResult",
    "NeuronpediaConfig",
    "NeuronpediaResult",
    "explain_job",
    "explain_metrics_job",
    "export_neuronpedia_job",
    "sae_dir",
]


def _methods_help() -> str:
    listed = "; ".join(f"{n}: {cls.help}" for n, cls in EXPLANATION_METHODS.items())
    return f"explanation method, repeatable ({listed})"


def sae_dir(sae: str) -> Path:
    """The directory of an SAE given as a directory or as a file inside one."""
    p = Path(sae)
    return p.parent if p.is_file() else p


def _model_spec(sae: SparseAutoencoder, given: str | None, where: str) -> str:
    spec = given or sae.cfg.model_spec
    if not spec:
        raise ExplainError(f"The SAE in {where} does not record its model; pass --model.")
    return spec


# --------------------------------------------------------------------------- explain


@dataclass(frozen=True)
class ExplainConfig:
    """``steerlex explain``: word lists for every feature of an SAE, by one or more methods."""

    sae: str | None = option(
        None, required=True, help="SAE directory (or any format load_sae reads)"
    )
    methods: list[str] = option(
        factory=list, flag="method", repeat=True, required=True, choices=method_names,
        help=_methods_help,
    )  # fmt: skip
    model: str | None = option(None, help="model spec (default: the one the SAE records)")
    activations: str | None = option(
        None, help="activation store for topact (the SAE's model and layer)"
    )
    vocab_size: int = option(5000, help="wordfreq English top-N words")
    vocab: str | None = option(
        None, help="a word-list file instead of wordfreq (one word per line, optional frequency)"
    )
    top_k: int = option(50, help="words per feature")
    alpha: float = option(1.0, help="temperature of p(w|c)")
    beta: float = option(1.0, help="temperature of p(c|w)")
    transform: str = option(
        "final_norm", choices=("final_norm", "identity"),
        help="a feature's direction goes through the model's final norm, or as it is",
    )  # fmt: skip
    side: str = option(
        "decoder", choices=("decoder", "encoder"),
        help="which SAE matrix gives a feature's direction",
    )  # fmt: skip
    device: str = option("cpu", help="torch device")
    summaries: str | None = option(
        None, choices=BACKEND_KINDS,
        help="write a one-line summary of each word list with an LLM: openai (any "
        "OpenAI-compatible server; key from STEERLEX_LLM_API_KEY or OPENAI_API_KEY) or "
        "transformers (a local chat model); default: skipped",
    )  # fmt: skip
    llm_base_url: str | None = option(
        None, help="API root for --summaries openai, e.g. http://localhost:8000/v1"
    )
    llm_model: str | None = option(
        None, help="served model name (openai) or steerlex model spec (transformers)"
    )
    summary_words: int = option(15, help="words shown to the LLM")
    out: str | None = option(None, help="output directory (default SAE_DIR/explanations)")

    def validate(self) -> None:
        if not self.sae:
            raise ExplainError("No SAE given; pass --sae DIR.")
        if not self.methods:
            raise ExplainError(
                f"No explanation method given; pass --method (one of {', '.join(method_names())})."
            )
        for m in self.methods:
            get_method(m)
        for name in ("vocab_size", "top_k", "summary_words"):
            if getattr(self, name) < 1:
                raise ExplainError(f"{name} must be at least 1, got {getattr(self, name)}.")


@dataclass(frozen=True)
class MethodResult:
    """One method's explanations, where they were written, how long they took, and what
    the summary back end did."""

    explanations: list[Explanation]
    path: Path
    seconds: float
    summaries: str
    words_are_tokens: bool


@dataclass(frozen=True)
class ExplainResult:
    """The output directory and each method's result, in the order asked for."""

    out: Path
    methods: dict[str, MethodResult] = field(default_factory=dict)


def _vocabulary(cfg: ExplainConfig, out: Path) -> Vocabulary | None:
    if not any(get_method(m).needs_vocabulary for m in cfg.methods):
        return None
    vocab = (
        vocabulary_from_file(cfg.vocab) if cfg.vocab else vocabulary_from_wordfreq(cfg.vocab_size)
    )
    out.mkdir(parents=True, exist_ok=True)
    vocab.save(out / "vocabulary.json")
    return vocab


def _summary_backend(cfg: ExplainConfig, ctx: RunContext) -> SummaryBackend | None:
    if not cfg.summaries:
        return None
    if cfg.summaries == "transformers":
        if not cfg.llm_model:
            raise ExplainError("--summaries transformers needs --llm-model (a model spec).")
        return backend_from_options(
            "transformers", loaded=ctx.model(cfg.llm_model, device=cfg.device)
        )
    return backend_from_options(cfg.summaries, base_url=cfg.llm_base_url, model=cfg.llm_model)


def explain_job(cfg: ExplainConfig, ctx: RunContext) -> ExplainResult:
    """Explain every feature of ``cfg.sae`` by each of ``cfg.methods``; write
    ``<method>.jsonl`` and ``<method>.json`` (and ``vocabulary.json``) into the output."""
    cfg.validate()
    assert cfg.sae is not None
    sae = ctx.sae(cfg.sae, device=cfg.device)
    spec = _model_spec(sae, cfg.model, cfg.sae)
    loaded = ctx.model(spec, device=cfg.device)
    out = Path(cfg.out) if cfg.out else Path(cfg.sae) / "explanations"
    store = ctx.store(cfg.activations) if cfg.activations else None
    vocab = _vocabulary(cfg, out)
    backend = _summary_backend(cfg, ctx)
    result = ExplainResult(out)
    for name in cfg.methods:
        method = get_method(name)
        t0 = time.perf_counter()
        found = explain_sae(
            sae, loaded, name, vocab=vocab, top_k=cfg.top_k, alpha=cfg.alpha, beta=cfg.beta,
            transform=cfg.transform, side=cfg.side, progress=ctx.progress, store=store,
        )  # fmt: skip
        settings: dict[str, Any] = {
            "sae": str(cfg.sae), "model": spec, "top_k": cfg.top_k, "alpha": cfg.alpha,
            "beta": cfg.beta, "transform": cfg.transform, "side": cfg.side,
            "vocabulary": vocab.source if vocab is not None and method.needs_vocabulary else None,
            "activations": cfg.activations if method.needs_store else None,
        }  # fmt: skip
        if backend is not None:
            found, report = summarize(
                found, backend, n_words=cfg.summary_words, progress=ctx.progress
            )
        else:
            report = skipped_report()
        settings["summaries"] = report.to_json()
        path = write_explanations(found, out, name, settings)
        result.methods[name] = MethodResult(
            found, path, time.perf_counter() - t0, report.describe(), method.words_are_tokens
        )
    return result


def shown_words(result: MethodResult, e: Explanation, n: int = 10) -> str:
    """The first ``n`` words of ``e`` for printing (tokens quoted, as JSON strings)."""
    words = e.words[:n]
    if result.words_are_tokens:
        return ", ".join(json.dumps(w, ensure_ascii=False) for w in words)
    return ", ".join(words)


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class ExplainMetricsConfig:
    """``steerlex explain-metrics``: output- and input-side faithfulness, frequency bias and
    linguistic levels of the explanations, on the same sampled features for every method."""

    sae: str | None = option(None, required=True, help="SAE directory the explanations describe")
    explanations: str | None = option(
        None, help="directory of <method>.jsonl files (default SAE_DIR/explanations)"
    )
    methods: list[str] = option(
        factory=list, flag="method", repeat=True, choices=method_names,
        help="methods to compare (default: every <method>.jsonl present); repeatable",
    )  # fmt: skip
    model: str | None = option(None, help="model spec (default: the one the SAE records)")
    features: int = option(100, help="features sampled for all methods")
    seed: int = option(0, help="seed of every sample")
    strengths: list[float] = option(
        factory=lambda: [0.5, 1.0],
        help="added direction norms as multiples of the mean residual norm",
    )
    n_words: int = option(10, help="explanation words scored")
    generate_tokens: int = option(
        0, help="also check N-token greedy steered continuations for explanation words (0: off)"
    )
    levels: bool = option(True, help="classify each explanation's linguistic level")
    examples: int = option(10, help="sampled features shown side by side in the .md")
    device: str = option("cpu", help="torch device")
    out: str | None = option(
        None, help="output JSON (default EXPLANATIONS/metrics.json; .md beside it)"
    )

    def validate(self) -> None:
        if not self.sae:
            raise ExplainError("No SAE given; pass --sae DIR.")
        for m in self.methods:
            get_method(m)
        if self.features < 1:
            raise ExplainError(f"features must be at least 1, got {self.features}.")
        if not self.strengths:
            raise ExplainError("strengths is empty; give at least one (e.g. 0.5 1.0).")


@dataclass(frozen=True)
class MetricsResult:
    """The metrics dict (also written as JSON), its path and the markdown table."""

    metrics: dict[str, Any]
    path: Path
    table: str


def explain_metrics_job(cfg: ExplainMetricsConfig, ctx: RunContext) -> MetricsResult:
    """Score the explanations in ``cfg.explanations``; write metrics.json and metrics.md."""
    cfg.validate()
    assert cfg.sae is not None
    sae = ctx.sae(cfg.sae, device=cfg.device)
    expl_dir = Path(cfg.explanations) if cfg.explanations else Path(cfg.sae) / "explanations"
    found = read_method_files(expl_dir, cfg.methods or None)
    spec = _model_spec(sae, cfg.model, cfg.sae)
    vocab = (
        Vocabulary.load(expl_dir / "vocabulary.json")
        if (expl_dir / "vocabulary.json").is_file()
        else vocabulary_from_wordfreq(5000)
    )
    loaded = ctx.model(spec, device=cfg.device)
    lists = {m: {e.feature: list(e.words) for e in es} for m, es in found.items()}
    t0 = time.perf_counter()
    result = evaluate_explanations(
        loaded, sae, lists, list(vocab.words), n_features=cfg.features, seed=cfg.seed,
        strengths=cfg.strengths, n_words=cfg.n_words, generate_tokens=cfg.generate_tokens,
        levels=cfg.levels, progress=ctx.progress,
    )  # fmt: skip
    result["settings"] = {
        "sae": str(cfg.sae), "model": spec, "explanations": str(expl_dir),
        "vocabulary": vocab.source, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    out = Path(cfg.out) if cfg.out else expl_dir / "metrics.json"
    write_json_atomic(out, result)
    table = metrics_table(result)
    shown = result["features"][: cfg.examples]
    md = f"{table}\n## {len(shown)} sampled features side by side\n\n{examples_table(lists, shown)}"
    write_bytes_atomic(out.with_suffix(".md"), md.encode())
    return MetricsResult(result, out, table)


# --------------------------------------------------------------------------- Neuronpedia


@dataclass(frozen=True)
class NeuronpediaConfig:
    """``steerlex export-neuronpedia``: explanations in Neuronpedia's explanation schema."""

    sae: str | None = inherit(ExplainMetricsConfig, "sae")
    explanations: str | None = inherit(ExplainMetricsConfig, "explanations")
    methods: list[str] = option(
        factory=list, flag="method", repeat=True, choices=method_names,
        help="methods to export (default: all present); repeatable",
    )  # fmt: skip
    model_id: str | None = option(
        None, help="Neuronpedia model id (default: from the SAE's model spec)"
    )
    source_id: str | None = option(
        None, help="Neuronpedia SAE id, e.g. 8-steerlex-res-4k (default: from the SAE)"
    )
    explanation_model: str | None = option(
        None, help="name of the LLM that wrote the summaries, if any"
    )
    out: str | None = option(None, help="output JSONL (default EXPLANATIONS/neuronpedia.jsonl)")


@dataclass(frozen=True)
class NeuronpediaResult:
    """How many records were written where, for which Neuronpedia model and SAE ids."""

    records: int
    model_id: str
    source_id: str
    path: Path


def export_neuronpedia_job(cfg: NeuronpediaConfig, ctx: RunContext) -> NeuronpediaResult:
    """Write ``cfg``'s explanations as Neuronpedia explanation records (JSONL)."""
    if not cfg.sae:
        raise ExplainError("No SAE given; pass --sae DIR.")
    sae = ctx.sae(cfg.sae)
    expl_dir = Path(cfg.explanations) if cfg.explanations else Path(cfg.sae) / "explanations"
    found = read_method_files(expl_dir, cfg.methods or None)
    model_id = cfg.model_id or (sae.cfg.model_spec or "model").split(":")[-1]
    layer = sae.cfg.layer if sae.cfg.layer is not None else "x"
    source_id = cfg.source_id or f"{layer}-steerlex-res-{max(1, sae.cfg.d_sae // 1024)}k"
    records = [
        r
        for es in found.values()
        for r in neuronpedia_records(
            es, model_id=model_id, source_id=source_id, explanation_model=cfg.explanation_model
        )
    ]
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    out = Path(cfg.out) if cfg.out else expl_dir / "neuronpedia.jsonl"
    write_bytes_atomic(out, blob)
    return NeuronpediaResult(len(records), model_id, source_id, out)
