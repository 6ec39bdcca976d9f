"""The explanation jobs: explain every feature (``explain``), score the explanations
(``explain-metrics``) and export them for Neuronpedia (``export-neuronpedia``)."""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import steerlex
from steerlex.core.config import inherit, option
from steerlex.core.errors import ExplainError, SteerlexError
from steerlex.core.io import read_json_object, write_bytes_atomic, write_json_atomic
from steerlex.core.paths import check_output_dir, check_output_file
from steerlex.explain.method import EXPLANATION_METHODS, Explanation, get_method, method_names
from steerlex.explain.metrics import evaluate_explanations, examples_table, metrics_table
from steerlex.explain.run import (
    NEURONPEDIA_AUTHOR_ID,
    NEURONPEDIA_BATCH,
    check_neuronpedia_id,
    explain_sae,
    neuronpedia_activation_rows,
    neuronpedia_feature_rows,
    neuronpedia_model_id,
    neuronpedia_model_type_row,
    neuronpedia_records,
    neuronpedia_source_id,
    neuronpedia_source_rows,
    neuronpedia_source_set,
    neuronpedia_type_rows,
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
from steerlex.explain.topact import top_activations
from steerlex.explain.vocabulary import (
    Vocabulary,
    vocabulary_from_file,
    vocabulary_from_wordfreq,
)
from steerlex.jobs.context import RunContext
from steerlex.models.loading import load_config, resolve_spec
from steerlex.sae.base import SparseAutoencoder

__all__ = [
    "NEURONPEDIA_CONFIG_FILES",
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
        if self.out:
            check_output_dir(self.out, "--out", ExplainError)
        else:
            default = sae_dir(self.sae) / "explanations"
            check_output_dir(default, "--out (default SAE_DIR/explanations)", ExplainError)


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
    out = Path(cfg.out) if cfg.out else sae_dir(cfg.sae) / "explanations"
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
        if self.out:
            check_output_file(self.out, "--out", ExplainError)
        else:
            expl = (
                Path(self.explanations) if self.explanations else sae_dir(self.sae) / "explanations"
            )
            check_output_file(
                expl / "metrics.json", "--out (default EXPLANATIONS/metrics.json)", ExplainError
            )


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
    expl_dir = Path(cfg.explanations) if cfg.explanations else sae_dir(cfg.sae) / "explanations"
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

NEURONPEDIA_CONFIG_FILES = (
    "explanation_model_type.jsonl",
    "explanation_type.jsonl",
    "explanation_score_model.jsonl",
    "explanation_score_type.jsonl",
    "eval_type.jsonl",
)
"""The files under ``config/`` that Neuronpedia's ``importConfigFromS3`` reads, each
required (an absent one fails the import); steerlex fills the first two."""


@dataclass(frozen=True)
class NeuronpediaConfig:
    """``steerlex export-neuronpedia``: the explanations, the SAE's features and its TopAct
    examples as a Neuronpedia dataset export (the layout of its ``neuronpedia-datasets``
    bucket under ``v1/``, which its admin import reads)."""

    sae: str | None = inherit(ExplainMetricsConfig, "sae")
    explanations: str | None = inherit(ExplainMetricsConfig, "explanations")
    methods: list[str] = option(
        factory=list, flag="method", repeat=True, choices=method_names,
        help="methods to export (default: all present); repeatable",
    )  # fmt: skip
    model: str | None = inherit(ExplainMetricsConfig, "model")
    model_id: str | None = option(
        None, help="Neuronpedia model id (default: the model's name, lower-cased)"
    )
    source_id: str | None = option(
        None,
        help="Neuronpedia source (SAE) id <layer>-<source set>, e.g. 8-steerlex-res-2k "
        "(default: <layer>-steerlex-res-<width>)",
    )
    author_id: str = option(
        NEURONPEDIA_AUTHOR_ID,
        help="Neuronpedia user id that owns every row (default: the bot user Neuronpedia's "
        "prisma/seed.ts creates, whose activations its webapp shows)",
    )
    creator_name: str = option(
        "steerlex", help="creator name on the source set and the explanation types"
    )
    explanation_model: str | None = option(
        None, help="name of the LLM that wrote the summaries, if any"
    )
    activations: str | None = option(
        None,
        help="activation store for the TopAct examples (activation rows; default: the store "
        "the run's topact.json names, else none)",
    )
    examples: int = option(20, help="TopAct examples per feature (0: no activation rows)")
    device: str = inherit(ExplainMetricsConfig, "device")
    out: str | None = option(
        None,
        help="output root, laid out like Neuronpedia's dataset bucket v1/ "
        "(default EXPLANATIONS/neuronpedia)",
    )

    def validate(self) -> None:
        if not self.sae:
            raise ExplainError("No SAE given; pass --sae DIR.")
        for m in self.methods:
            get_method(m)
        if self.examples < 0:
            raise ExplainError(f"examples must be at least 0, got {self.examples}.")
        check_neuronpedia_id(self.author_id, "author id")
        if not self.creator_name.strip():
            raise ExplainError("creator_name is empty; pass --creator-name NAME.")
        if self.model_id is not None:
            check_neuronpedia_id(self.model_id, "model id")
        if self.source_id is not None:
            neuronpedia_source_set(self.source_id)


@dataclass(frozen=True)
class NeuronpediaResult:
    """What was written for which Neuronpedia model and source: the export root, the
    source's directory, the row counts, every file written, and why there are no
    activation rows (``note``; empty when there are)."""

    model_id: str
    source_id: str
    root: Path
    path: Path
    explanations: int
    features: int
    activations: int
    files: list[Path]
    note: str = ""


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    try:
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    except ValueError as exc:  # NaN or infinity: Postgres' jsonb has no such numbers
        raise ExplainError(f"A Neuronpedia row holds a non-finite number: {exc}") from exc
    return text.encode()


def _read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ExplainError(f"{path} line {n} is not JSON ({exc}); remove the file.") from exc
        if not isinstance(row, dict) or "name" not in row:
            raise ExplainError(f"{path} line {n} is not a row with a name; remove the file.")
        rows.append(row)
    return rows


def _write_config(root: Path, rows: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """Merge ``rows`` by name into ``root/config/<file>`` (rows of other exports to the
    same root stay); create the config files the importer needs that are missing."""
    written = []
    for name in NEURONPEDIA_CONFIG_FILES:
        path = root / "config" / name
        new = rows.get(name, [])
        if path.is_file() and not new:
            continue
        merged = {r["name"]: r for r in (_read_jsonl_rows(path) if path.is_file() else [])}
        merged.update({r["name"]: r for r in new})
        write_bytes_atomic(path, _jsonl([merged[k] for k in sorted(merged)]))
        written.append(path)
    return written


def _write_batches(directory: Path, batches: dict[int, list[dict[str, Any]]]) -> list[Path]:
    """``directory/batch-N.jsonl.gz`` per non-empty batch (gzip without a timestamp, so
    the bytes are reproducible); stale ``batch-*.jsonl.gz`` files there are removed."""
    written = []
    for b in sorted(batches):
        if batches[b]:
            path = directory / f"batch-{b}.jsonl.gz"
            write_bytes_atomic(path, gzip.compress(_jsonl(batches[b]), compresslevel=6, mtime=0))
            written.append(path)
    if directory.is_dir():
        for old in directory.glob("batch-*.jsonl.gz"):
            if old not in written:
                old.unlink()
        if not any(directory.iterdir()):
            directory.rmdir()
    return written


def _chunks(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    return {
        b: rows[b * NEURONPEDIA_BATCH : (b + 1) * NEURONPEDIA_BATCH]
        for b in range((len(rows) + NEURONPEDIA_BATCH - 1) // NEURONPEDIA_BATCH)
    }


def _topact_store(cfg: NeuronpediaConfig, expl_dir: Path) -> tuple[str | None, str]:
    """The store to take TopAct examples from, or None and why there are none."""
    if cfg.examples == 0:
        return None, "no activation rows (--examples 0)"
    if cfg.activations:
        return cfg.activations, ""
    settings = expl_dir / "topact.json"
    if not settings.is_file():
        return None, (
            f"no activation rows: the run in {expl_dir} has no TopAct examples (no topact.json);"
            " pass --activations STORE to add them"
        )
    recorded = read_json_object(
        settings, what="TopAct settings", fix="run `steerlex explain --method topact` again.",
        error=ExplainError,
    ).get("activations")  # fmt: skip
    if not recorded or not Path(str(recorded)).is_dir():
        return None, (
            f"no activation rows: the activation store {recorded!r} that {settings} names is "
            "not there; pass --activations STORE to add them"
        )
    return str(recorded), ""


def _model_facts(spec: str | None) -> tuple[int, int, str]:
    """(layers, MLP neurons per layer, owner) of the model for its Neuronpedia row; zeros
    and no owner when its config cannot be read (the row matters only to an instance
    that does not know the model yet)."""
    if not spec:
        return 0, 0, ""
    try:
        resolved = resolve_spec(spec)
        config = load_config(spec)[0]
    except (SteerlexError, OSError, ValueError):
        return 0, 0, ""
    owner = resolved.location.split("/")[0] if resolved.kind == "hub" else ""
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    neurons = int(getattr(config, "intermediate_size", 0) or 0)
    return layers, neurons, owner


def export_neuronpedia_job(cfg: NeuronpediaConfig, ctx: RunContext) -> NeuronpediaResult:
    """Write ``cfg``'s explanations, the SAE's features and (with an activation store)
    its TopAct examples as a Neuronpedia export: ``OUT/<model>/<source>/{model,sourceset,
    source}.jsonl``, ``.../{features,explanations,activations}/batch-N.jsonl.gz`` and
    ``OUT/config/*.jsonl`` (docs/formats.md, "Neuronpedia export"). Every file is
    written atomically; ids are stable, so the same input gives the same bytes."""
    cfg.validate()
    assert cfg.sae is not None
    sae = ctx.sae(cfg.sae, device=cfg.device)
    expl_dir = Path(cfg.explanations) if cfg.explanations else sae_dir(cfg.sae) / "explanations"
    if not expl_dir.is_dir():
        raise ExplainError(
            f"The explanations directory {expl_dir} does not exist; run `steerlex explain "
            f"--sae {cfg.sae}` first or pass --explanations DIR."
        )
    found = read_method_files(expl_dir, cfg.methods or None)
    d_sae = int(sae.cfg.d_sae)
    bad = sorted({e.feature for es in found.values() for e in es if not 0 <= e.feature < d_sae})
    if bad:
        raise ExplainError(
            f"The explanations in {expl_dir} name features {bad[:5]}, but the SAE {cfg.sae} "
            f"has features 0..{d_sae - 1}; they explain another SAE."
        )
    spec = cfg.model or sae.cfg.model_spec
    if cfg.model_id:
        model_id = cfg.model_id
    elif spec:
        model_id = neuronpedia_model_id(spec)
    else:
        raise ExplainError(f"The SAE in {cfg.sae} does not record its model; pass --model-id.")
    if cfg.source_id:
        source_id = cfg.source_id
    elif sae.cfg.layer is not None:
        source_id = neuronpedia_source_id(sae.cfg.layer, d_sae)
    else:
        raise ExplainError(f"The SAE in {cfg.sae} does not record its layer; pass --source-id.")
    author = cfg.author_id
    explanations = sorted(
        (
            r
            for es in found.values()
            for r in neuronpedia_records(
                es,
                model_id=model_id,
                source_id=source_id,
                author_id=author,
                explanation_model=cfg.explanation_model,
            )
        ),
        key=lambda r: (int(r["index"]), r["typeName"]),
    )
    if not explanations:
        raise ExplainError(
            f"The explanations in {expl_dir} ({', '.join(found)}) hold no words or summaries "
            "to export; run `steerlex explain` again."
        )

    store_path, note = _topact_store(cfg, expl_dir)
    activations: list[dict[str, Any]] = []
    if store_path is not None:
        if not spec:
            raise ExplainError(
                f"The SAE in {cfg.sae} does not record its model, whose tokenizer the "
                "activation rows need; pass --model."
            )
        spans = top_activations(
            sae, ctx.store(store_path), per_feature=cfg.examples, tokenizer=ctx.tokenizer(spec),
            progress=ctx.progress,
        )  # fmt: skip
        activations = neuronpedia_activation_rows(
            spans, model_id=model_id, source_id=source_id, author_id=author
        )
        if not activations:
            note = f"no activation rows: no feature fires in the activation store {store_path}"
    max_act: dict[int, float] = {}
    for r in activations:
        c = int(r["index"])
        max_act[c] = max(max_act.get(c, 0.0), r["maxValue"])
    features = neuronpedia_feature_rows(
        d_sae, model_id=model_id, source_id=source_id, author_id=author, max_activation=max_act
    )

    layers, neurons, owner = _model_facts(spec)
    arch = f"{sae.cfg.architecture}, k={sae.cfg.k}" if sae.cfg.k else sae.cfg.architecture
    meta = neuronpedia_source_rows(
        creator_name=cfg.creator_name, d_sae=d_sae, d_in=int(sae.cfg.d_in), layers=layers,
        neurons_per_layer=neurons, owner=owner,
        notes=f"steerlex {steerlex.__version__} SAE ({arch}, d_sae={d_sae}) on "
        f"{sae.cfg.hf_hook_name or f'layer {sae.cfg.layer}'} of {model_id}",
        model_id=model_id, source_id=source_id, author_id=author,
    )  # fmt: skip

    root = Path(cfg.out) if cfg.out else expl_dir / "neuronpedia"
    src = root / model_id / source_id
    files = []
    for name, row in meta.items():
        write_bytes_atomic(src / f"{name}.jsonl", _jsonl([row]))
        files.append(src / f"{name}.jsonl")
    files += _write_batches(src / "features", _chunks(features))
    by_range: dict[int, list[dict[str, Any]]] = {}
    for r in activations:
        by_range.setdefault(int(r["index"]) // NEURONPEDIA_BATCH, []).append(r)
    files += _write_batches(src / "activations", by_range)
    files += _write_batches(src / "explanations", _chunks(explanations))
    models = sorted({r["explanationModelName"] for r in explanations} - {None})
    config_rows = {
        "explanation_type.jsonl": neuronpedia_type_rows(
            [m for m in found if f"steerlex-{m}" in {r["typeName"] for r in explanations}],
            author_id=author,
            creator_name=cfg.creator_name,
        ),
        "explanation_model_type.jsonl": [
            neuronpedia_model_type_row(m, creator_name=cfg.creator_name) for m in models
        ],
    }
    files += _write_config(root, config_rows)
    return NeuronpediaResult(
        model_id, source_id, root, src, len(explanations), len(features), len(activations),
        files, note,
    )  # fmt: skip
