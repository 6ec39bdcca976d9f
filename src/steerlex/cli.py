"""The ``steerlex`` command: one subcommand per pipeline stage.

Errors a user can cause (a SteerlexError) are printed as one clear message with
exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from steerlex import __version__
from steerlex.core.errors import SteerlexError


def _print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_models(args: argparse.Namespace) -> int:
    from steerlex.models.embedded import DEFAULT_MODEL, EMBEDDED, converted_dir, package_dir

    rows = []
    for m in EMBEDDED.values():
        installed = all(package_dir(p.module) is not None for p in m.parts)
        cached = (converted_dir(m.gguf_name, m.sha256) / "steerlex-model.json").is_file()
        status = "cached" if cached else ("installed" if installed else "not installed")
        default = " (default)" if m.spec == DEFAULT_MODEL else ""
        rows.append((m.spec + default, m.architecture, status, m.description))
    if args.json:
        out = [
            {
                "spec": m.spec,
                "description": m.description,
                "upstream": m.upstream,
                "licence": m.licence,
                "install": m.install,
                "sha256": m.sha256,
                "status": r[2],
            }
            for m, r in zip(EMBEDDED.values(), rows, strict=True)
        ]
        print(json.dumps(out, indent=2))
        return 0
    _print_table(rows, ("spec", "arch", "status", "description"))
    print()
    for m in EMBEDDED.values():
        print(f"{m.spec}: upstream {m.upstream}; install: {m.install}")
    print(
        "\nOther specs: a path to a .gguf file, a directory saved by transformers, "
        "or a Hugging Face hub id (Org/Model; needs network)."
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k.ljust(width)}  {v}")
    return 0


def model_info(spec: str) -> dict[str, Any]:
    """Describe a model without loading its weights (a meta-device skeleton gives the layout)."""
    import torch
    from transformers import AutoModelForCausalLM

    from steerlex.models.chat import has_chat_template
    from steerlex.models.hooks import decoder_layers, hook_name, num_layers, residual_width
    from steerlex.models.loading import load_config

    config, tokenizer, resolved, source, weights_id = load_config(spec)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    path, _ = decoder_layers(skeleton)
    n = num_layers(skeleton)
    text_config = config.get_text_config()
    return {
        "spec": spec,
        "kind": resolved.kind,
        "architecture": (config.architectures or [type(skeleton).__name__])[0],
        "model_type": config.model_type,
        "layers": n,
        "valid_layers": f"0..{n - 1}",
        "width (d_model)": residual_width(skeleton),
        "vocab_size": getattr(text_config, "vocab_size", None),
        "parameters": sum(p.numel() for p in skeleton.parameters()),
        "tied_embeddings": bool(getattr(text_config, "tie_word_embeddings", False)),
        "hook_names": f"{path}.0 .. {hook_name(skeleton, n - 1)}",
        "chat_template": has_chat_template(tokenizer),
        "weights_source": source,
        "weights_id": weights_id,
    }


def cmd_sources(args: argparse.Namespace) -> int:
    from steerlex.data import load_texts, named_sets

    rows = []
    for s in named_sets():
        try:
            size = str(len(load_texts(s.name)))
        except SteerlexError:
            size = "not installed"
        rows.append((s.name, size, s.description))
    _print_table(rows, ("name", "size", "description"))
    print(
        "\nAlso: a local .txt/.jsonl/.json/.csv file (with --column), or hf:DATASET[:CONFIG]:SPLIT."
    )
    return 0


def cmd_harvest(args: argparse.Namespace) -> int:
    from steerlex.activations.harvest import HarvestOptions, harvest
    from steerlex.activations.stats import activation_stats
    from steerlex.data import load_texts
    from steerlex.data.split import select_split
    from steerlex.models.hooks import check_layer
    from steerlex.models.loading import load_model

    items: list[Any] = []
    for spec in args.source:
        text_set = load_texts(spec, column=args.column, limit=args.limit)
        print(
            f"source {text_set.name}: {len(text_set)} texts ({text_set.provenance})",
            file=sys.stderr,
        )
        items.extend(text_set.items)
    if args.split != "all":
        items = select_split(items, args.split, args.heldout_fraction)
        print(
            f"split {args.split} (held-out fraction {args.heldout_fraction}, by text id): {len(items)} texts",
            file=sys.stderr,
        )
    options = HarvestOptions(
        layer=args.layer,
        chat=args.chat,
        system_prompt=args.system_prompt,
        keep=args.keep,
        max_length=args.max_length,
        batch_size=args.batch_size,
        texts_per_shard=args.texts_per_shard,
        dtype=args.dtype,
    )
    options.validate()
    t0 = time.perf_counter()
    auto = args.device == "auto"
    loaded = load_model(
        args.model,
        dtype=args.model_dtype,
        device=None if auto else args.device,
        device_map="auto" if auto else None,
    )
    check_layer(loaded.model, args.layer)
    print(
        f"model {loaded.spec} loaded in {time.perf_counter() - t0:.1f}s ({loaded.source})",
        file=sys.stderr,
    )
    t1 = time.perf_counter()
    store = harvest(loaded, items, args.out, options, progress=not args.quiet)
    elapsed = time.perf_counter() - t1
    summary = store.summary()
    summary["seconds"] = round(elapsed, 1)
    summary.update(activation_stats(store))
    print(json.dumps(summary, indent=2) if args.json else _format_summary(summary))
    return 0


def cmd_train_sae(args: argparse.Namespace) -> int:
    import os

    import torch.distributed as dist

    from steerlex.activations.store import ActivationStore
    from steerlex.sae.train import TrainConfig, train_sae

    options = {f: getattr(args, f) for f in _train_fields()}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = options["device"].startswith("cuda")
        if cuda:
            options["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        cfg = TrainConfig.from_dict(options)
        store = ActivationStore.open(args.activations)
        t0 = time.perf_counter()
        sae = train_sae(store, cfg, args.out, progress=not args.quiet)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"Trained a TopK SAE (d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}, k {sae.cfg.k}) on "
            f"{store.n_tokens:,} stored tokens of {store.index['model']['spec']} layer {store.layer} "
            f"in {time.perf_counter() - t0:.0f}s; saved to {args.out} (training log: {args.out}/train_log.jsonl)"
        )
    return 0


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def cmd_eval_sae(args: argparse.Namespace) -> int:
    from pathlib import Path

    from steerlex.activations.store import ActivationStore
    from steerlex.models.loading import load_model
    from steerlex.sae.evaluate import evaluate_sae
    from steerlex.sae.formats import load_sae

    sae = load_sae(args.sae, device=args.device)
    store = ActivationStore.open(args.activations)
    loaded = None
    if not args.no_lm:
        loaded = load_model(args.model or store.index["model"]["spec"], device=args.device)
    out = Path(args.out) if args.out else Path(args.sae) / "eval"
    result = evaluate_sae(
        sae,
        store,
        out,
        loaded=loaded,
        max_lm_texts=args.max_lm_texts,
        max_tokens=args.max_tokens,
        lm_batch_size=args.lm_batch_size,
        dense_threshold=args.dense_threshold,
        progress=not args.quiet,
    )
    act, spl = result["activation"], result["spliced"]
    lines = [
        f"held-out tokens {act['n_tokens']:,}: NMSE {act['nmse']:.4f}, FVE {act['fve']:.4f}, "
        f"L0 {act['l0']:.1f}, dead {act['dead_fraction']:.2%}, dense {act['dense_fraction']:.2%}",
    ]
    if spl:
        lines.append(
            f"next-token CE on {spl['n_tokens']:,} tokens of {spl['n_texts']} texts: clean {spl['ce_clean']:.4f}, "
            f"SAE {spl['ce_sae']:.4f}, zero {spl['ce_zero']:.4f}, mean {_num(spl['ce_mean'], '.4f')}; loss "
            f"recovered {_num(spl['loss_recovered_zero'], '.1f')}% (vs zero), "
            f"{_num(spl['loss_recovered_mean'], '.1f')}% (vs mean)"
        )
    lines.append(f"written to {out}/eval.json")
    print("\n".join(lines))
    return 0


def cmd_sae_convert(args: argparse.Namespace) -> int:
    from steerlex.sae.formats import convert_sae

    path = convert_sae(
        args.src, args.dst, to=args.to, k=args.k, overwrite=args.overwrite, dtype=args.dtype
    )
    print(f"wrote {args.to} SAE to {path}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from steerlex.activations.store import ActivationStore
    from steerlex.explain.run import explain_sae, write_explanations
    from steerlex.explain.vocabulary import (
        Vocabulary,
        vocabulary_from_file,
        vocabulary_from_wordfreq,
    )
    from steerlex.models.loading import load_model
    from steerlex.sae.formats import load_sae

    sae = load_sae(args.sae)
    spec = args.model or sae.cfg.model_spec
    if not spec:
        raise SteerlexError(f"The SAE in {args.sae} does not record its model; pass --model.")
    loaded = load_model(spec, device=args.device)
    out = Path(args.out) if args.out else Path(args.sae) / "explanations"
    store = ActivationStore.open(args.activations) if args.activations else None
    vocab: Vocabulary | None = None
    if any(m not in ("logitlens", "topact") for m in args.method):
        vocab = (
            vocabulary_from_file(args.vocab)
            if args.vocab
            else vocabulary_from_wordfreq(args.vocab_size)
        )
        out.mkdir(parents=True, exist_ok=True)
        vocab.save(out / "vocabulary.json")
    from steerlex.explain.summaries import backend_from_options, skipped_report, summarize

    backend = (
        backend_from_options(args.summaries, base_url=args.llm_base_url, model=args.llm_model)
        if args.summaries
        else None
    )
    for method in args.method:
        t0 = time.perf_counter()
        found = explain_sae(
            sae, loaded, method, vocab=vocab, top_k=args.top_k, alpha=args.alpha, beta=args.beta,
            transform=args.transform, side=args.side, progress=not args.quiet, store=store,
        )  # fmt: skip
        settings = {
            "sae": str(args.sae), "model": spec, "top_k": args.top_k, "alpha": args.alpha, "beta": args.beta,
            "transform": args.transform, "side": args.side,
            "vocabulary": None if vocab is None or method in ("logitlens", "topact") else vocab.source,
            "activations": args.activations if method == "topact" else None,
        }  # fmt: skip
        if backend is not None:
            found, report = summarize(
                found, backend, n_words=args.summary_words, progress=not args.quiet
            )
        else:
            report = skipped_report()
        settings["summaries"] = report.to_json()
        print(f"{method}: {report.describe()}")
        path = write_explanations(found, out, method, settings)
        print(
            f"{method}: {len(found)} features explained in {time.perf_counter() - t0:.1f}s -> {path}"
        )
        for e in found[: args.show]:
            shown = (
                e.words[:10]
                if method != "logitlens"
                else [json.dumps(w, ensure_ascii=False) for w in e.words[:10]]
            )
            print(f"  feature {e.feature}: {', '.join(shown)}")
    return 0


def _read_method_files(expl_dir: Any, methods: Sequence[str] | None) -> dict[str, list[Any]]:
    """``{method: [Explanation]}`` from ``<method>.jsonl`` files in ``expl_dir``."""
    from pathlib import Path

    from steerlex.explain.run import METHODS, read_explanations

    d = Path(expl_dir)
    wanted = list(methods) if methods else [m for m in METHODS if (d / f"{m}.jsonl").is_file()]
    if not wanted:
        raise SteerlexError(
            f"No explanation files (<method>.jsonl) in {d}; run `steerlex explain` first."
        )
    return {m: read_explanations(d / f"{m}.jsonl") for m in wanted}


def cmd_explain_metrics(args: argparse.Namespace) -> int:
    from pathlib import Path

    from steerlex.core.io import write_bytes_atomic, write_json_atomic
    from steerlex.explain.metrics import evaluate_explanations, examples_table, metrics_table
    from steerlex.explain.vocabulary import Vocabulary, vocabulary_from_wordfreq
    from steerlex.models.loading import load_model
    from steerlex.sae.formats import load_sae

    sae = load_sae(args.sae)
    expl_dir = Path(args.explanations) if args.explanations else Path(args.sae) / "explanations"
    found = _read_method_files(expl_dir, args.method)
    spec = args.model or sae.cfg.model_spec
    if not spec:
        raise SteerlexError(f"The SAE in {args.sae} does not record its model; pass --model.")
    vocab = (
        Vocabulary.load(expl_dir / "vocabulary.json")
        if (expl_dir / "vocabulary.json").is_file()
        else vocabulary_from_wordfreq(5000)
    )
    loaded = load_model(spec, device=args.device)
    t0 = time.perf_counter()
    result = evaluate_explanations(
        loaded, sae, {m: {e.feature: list(e.words) for e in es} for m, es in found.items()},
        list(vocab.words), n_features=args.features, seed=args.seed, strengths=args.strengths,
        n_words=args.n_words, generate_tokens=args.generate_tokens, levels=not args.no_levels,
        progress=not args.quiet,
    )  # fmt: skip
    result["settings"] = {
        "sae": str(args.sae), "model": spec, "explanations": str(expl_dir),
        "vocabulary": vocab.source, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    out = Path(args.out) if args.out else expl_dir / "metrics.json"
    write_json_atomic(out, result)
    table = metrics_table(result)
    lists = {m: {e.feature: list(e.words) for e in es} for m, es in found.items()}
    shown = result["features"][: args.examples]
    examples = examples_table(lists, shown)
    write_bytes_atomic(
        out.with_suffix(".md"),
        f"{table}\n## {len(shown)} sampled features side by side\n\n{examples}".encode(),
    )
    print(table)
    print(
        f"metrics of {len(result['features'])} features -> {out} (table: {out.with_suffix('.md')})"
    )
    return 0


def cmd_export_neuronpedia(args: argparse.Namespace) -> int:
    from pathlib import Path

    from steerlex.core.io import write_bytes_atomic
    from steerlex.explain.run import neuronpedia_records
    from steerlex.sae.formats import load_sae

    sae = load_sae(args.sae)
    expl_dir = Path(args.explanations) if args.explanations else Path(args.sae) / "explanations"
    found = _read_method_files(expl_dir, args.method)
    model_id = args.model_id or (sae.cfg.model_spec or "model").split(":")[-1]
    layer = sae.cfg.layer if sae.cfg.layer is not None else "x"
    source_id = args.source_id or f"{layer}-steerlex-res-{max(1, sae.cfg.d_sae // 1024)}k"
    records = [
        r
        for es in found.values()
        for r in neuronpedia_records(
            es, model_id=model_id, source_id=source_id, explanation_model=args.explanation_model
        )
    ]
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    out = Path(args.out) if args.out else expl_dir / "neuronpedia.jsonl"
    write_bytes_atomic(out, blob)
    print(f"{len(records)} Neuronpedia explanation records ({model_id} / {source_id}) -> {out}")
    return 0


def _train_fields() -> dict[str, tuple[type, Any, str]]:
    """TrainConfig fields as CLI options: name -> (type, default, help)."""
    from dataclasses import fields

    from steerlex.sae.train import TrainConfig

    helps = {
        "d_sae": "number of latents",
        "k": "active latents per token",
        "k_start": "anneal k linearly from this value (paper: 200 -> 20)",
        "k_anneal_steps": "steps over which k is annealed",
        "tied": "tie the decoder to the encoder (the paper's variant)",
        "b_dec_init": "decoder bias init: mean, geometric_median or zeros",
        "normalize_activations": "scale inputs to mean squared norm d_in (stored in the SAE)",
        "lr": "Adam learning rate",
        "warmup_steps": "linear warm-up steps",
        "decay_fraction": "share of steps at the end with linear decay to 0",
        "batch_size": "tokens per optimizer step (all processes together)",
        "tokens": "training tokens (default: one pass over the store)",
        "auxk_coef": "weight of the AuxK loss for dead latents",
        "auxk_k": "latents used by AuxK (default d_in / 2)",
        "dead_tokens": "a latent is dead after this many tokens without firing",
        "seed": "random seed",
        "streams": "data streams (set by torchrun to the number of processes)",
        "shards_in_memory": "shards mixed in memory when shuffling",
        "init_sample_tokens": "tokens used to set b_dec, the scale and the variance",
        "checkpoint_every": "steps between checkpoints",
        "log_every": "steps between log lines",
        "device": "torch device",
    }
    types = {"k_start": int, "tokens": int, "auxk_k": int}
    out = {}
    for f in fields(TrainConfig):
        default = f.default
        out[f.name] = (types.get(f.name, type(default)), default, helps.get(f.name, ""))
    return out


def _format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"Stored {s['n_tokens']:,} tokens from {s['n_texts']:,} texts in {s['n_shards']} shard(s) "
        f"({s['bytes'] / 2**20:.1f} MiB, {s['dtype']}) at {s['directory']}",
        f"model {s['model']}, layer {s['layer']} ({s['hook_name']}), width {s['d_model']}",
        f"token norm: mean {s['norm_mean']:.2f}, median {s['norm_median']:.2f}, "
        f"p99 {s['norm_p99']:.2f}, max {s['norm_max']:.2f}",
        f"this run: {s['seconds']}s",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steerlex",
        description="Explain SAE features with mutual-information word lists and steer LLMs with them.",
    )
    parser.add_argument("--version", action="version", version=f"steerlex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the embedded models and the other model spec forms")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "info", help="describe a model: architecture, layers, width, chat template, weights"
    )
    p.add_argument("model", help="model spec, e.g. embedded:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sources", help="list the named text and prompt sets")
    p.set_defaults(func=cmd_sources)

    from steerlex.models.chat import KEEP_CHOICES
    from steerlex.models.embedded import DEFAULT_MODEL

    p = sub.add_parser("harvest", help="store layer-L residual activations of texts")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    p.add_argument(
        "--layer", type=int, required=True, help="decoder layer L (0-based); its output is stored"
    )
    p.add_argument(
        "--source",
        action="append",
        required=True,
        help="named set (see `steerlex sources`), a local file, or hf:DATASET[:CONFIG]:SPLIT; repeatable",
    )
    p.add_argument("--column", help="column/field holding the text in csv/jsonl/json/hf sources")
    p.add_argument(
        "--split",
        choices=("all", "train", "heldout"),
        default="all",
        help="keep only the train or held-out part of the texts (fixed by a hash of each text id)",
    )
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.1,
        help="share of texts in the held-out part (default 0.1)",
    )
    p.add_argument("--limit", type=int, help="use at most the first N texts of each source")
    p.add_argument(
        "--out", required=True, help="store directory (created; resumed if it holds the same run)"
    )
    chat = p.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="wrap texts in the chat template",
    )
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="use raw texts")
    p.add_argument(
        "--system-prompt", help="system prompt for chat formatting (default: the template's own)"
    )
    p.add_argument(
        "--keep",
        choices=KEEP_CHOICES,
        default="no-prefix",
        help="positions to store: all; no-bos; no-prefix (drop BOS, system prompt and role header: default); "
        "content (only the user's text)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="truncate texts to this many tokens (default 512)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    p.add_argument(
        "--texts-per-shard", type=int, default=256, help="texts per shard file (default 256)"
    )
    p.add_argument("--dtype", default="float32", help="storage dtype: float32, float16, bfloat16")
    p.add_argument(
        "--model-dtype", default="float32", help="model dtype: float32, float16, bfloat16"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cpu, cuda, cuda:1, or auto to spread the model over GPUs (default cpu)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_harvest)

    p = sub.add_parser(
        "train-sae",
        help="train a TopK SAE on an activation store (data-parallel under torchrun)",
        description="Train a TopK SAE. Multi-process: torchrun --nproc_per_node N -m steerlex.cli train-sae ...",
    )
    p.add_argument(
        "--activations", required=True, help="activation store directory (from `steerlex harvest`)"
    )
    p.add_argument(
        "--out", required=True, help="output directory: SAE (SAELens layout), log, checkpoints"
    )
    for name, (typ, default, text) in _train_fields().items():
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            p.add_argument(flag, type=typ, default=default, help=f"{text} (default {default})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_sae)

    p = sub.add_parser(
        "eval-sae", help="evaluate an SAE on held-out activations and by splicing it into the model"
    )
    p.add_argument(
        "--sae", required=True, help="SAE directory (SAELens layout, sparsify, or a .pth)"
    )
    p.add_argument("--activations", required=True, help="held-out activation store")
    p.add_argument("--model", help="model spec for the spliced loss (default: the store's model)")
    p.add_argument("--no-lm", action="store_true", help="skip the spliced language-model loss")
    p.add_argument(
        "--max-lm-texts",
        type=int,
        default=64,
        help="held-out texts for the spliced loss (default 64)",
    )
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many stored tokens")
    p.add_argument(
        "--lm-batch-size", type=int, default=4, help="texts per forward pass (default 4)"
    )
    p.add_argument(
        "--dense-threshold", type=float, default=0.1, help="a latent firing on more tokens is dense"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", help="output directory (default SAE_DIR/eval)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval_sae)

    p = sub.add_parser(
        "explain", help="explain every SAE feature with vocabulary words (mi, paper) or tokens"
    )
    p.add_argument("--sae", required=True, help="SAE directory (or any format load_sae reads)")
    p.add_argument(
        "--method", action="append", choices=("mi", "paper", "mi-input", "logitlens", "topact"), required=True,
        help="mi: output-side mutual information; paper: the authors' released scoring; mi-input: "
        "input-side mutual information (what makes a feature fire); logitlens; topact (needs --activations); "
        "repeatable",
    )  # fmt: skip
    p.add_argument("--model", help="model spec (default: the one the SAE records)")
    p.add_argument("--activations", help="activation store for topact (the SAE's model and layer)")
    p.add_argument(
        "--vocab-size", type=int, default=5000, help="wordfreq English top-N words (default 5000)"
    )
    p.add_argument(
        "--vocab",
        help="a word-list file instead of wordfreq (one word per line, optional frequency)",
    )
    p.add_argument("--top-k", type=int, default=50, help="words per feature (default 50)")
    p.add_argument("--alpha", type=float, default=1.0, help="temperature of p(w|c) (default 1)")
    p.add_argument("--beta", type=float, default=1.0, help="temperature of p(c|w) (default 1)")
    p.add_argument("--transform", choices=("final_norm", "identity"), default="final_norm")
    p.add_argument("--side", choices=("decoder", "encoder"), default="decoder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--show", type=int, default=5, help="print the words of the first N features")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--summaries", choices=("openai", "transformers"),
        help="write a one-line summary of each word list with an LLM: openai (any "
        "OpenAI-compatible server; key from STEERLEX_LLM_API_KEY or OPENAI_API_KEY) or "
        "transformers (a local chat model); default: skipped",
    )  # fmt: skip
    p.add_argument(
        "--llm-base-url", help="API root for --summaries openai, e.g. http://localhost:8000/v1"
    )
    p.add_argument(
        "--llm-model", help="served model name (openai) or steerlex model spec (transformers)"
    )
    p.add_argument(
        "--summary-words", type=int, default=15, help="words shown to the LLM (default 15)"
    )
    p.add_argument("--out", help="output directory (default SAE_DIR/explanations)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "explain-metrics",
        help="score explanations: output- and input-side faithfulness, frequency bias, levels",
    )
    p.add_argument("--sae", required=True, help="SAE directory the explanations describe")
    p.add_argument(
        "--explanations", help="directory of <method>.jsonl files (default SAE_DIR/explanations)"
    )
    p.add_argument(
        "--method", action="append", choices=("mi", "paper", "mi-input", "logitlens", "topact"),
        help="methods to compare (default: every <method>.jsonl present); repeatable",
    )  # fmt: skip
    p.add_argument("--model", help="model spec (default: the one the SAE records)")
    p.add_argument(
        "--features", type=int, default=100, help="features sampled for all methods (default 100)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every sample (default 0)")
    p.add_argument(
        "--strengths", type=float, nargs="+", default=[0.5, 1.0],
        help="added direction norms as multiples of the mean residual norm (default 0.5 1.0)",
    )  # fmt: skip
    p.add_argument("--n-words", type=int, default=10, help="explanation words scored (default 10)")
    p.add_argument(
        "--generate-tokens", type=int, default=0,
        help="also check N-token greedy steered continuations for explanation words (default 0: off)",
    )  # fmt: skip
    p.add_argument("--no-levels", action="store_true", help="skip the linguistic-level classifier")
    p.add_argument(
        "--examples", type=int, default=10,
        help="sampled features shown side by side in the .md (default 10)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", help="output JSON (default EXPLANATIONS/metrics.json; .md beside it)")
    p.set_defaults(func=cmd_explain_metrics)

    p = sub.add_parser(
        "export-neuronpedia", help="write explanations in Neuronpedia's explanation schema (JSONL)"
    )
    p.add_argument("--sae", required=True, help="SAE directory the explanations describe")
    p.add_argument(
        "--explanations", help="directory of <method>.jsonl files (default SAE_DIR/explanations)"
    )
    p.add_argument(
        "--method", action="append", choices=("mi", "paper", "mi-input", "logitlens", "topact"),
        help="methods to export (default: all present); repeatable",
    )  # fmt: skip
    p.add_argument("--model-id", help="Neuronpedia model id (default: from the SAE's model spec)")
    p.add_argument(
        "--source-id", help="Neuronpedia SAE id, e.g. 8-steerlex-res-4k (default: from the SAE)"
    )
    p.add_argument("--explanation-model", help="name of the LLM that wrote the summaries, if any")
    p.add_argument("--out", help="output JSONL (default EXPLANATIONS/neuronpedia.jsonl)")
    p.set_defaults(func=cmd_export_neuronpedia)

    from steerlex.evaluate.cli import add_eval_parser
    from steerlex.pipeline.cli import add_run_parser
    from steerlex.steer.cli import add_steer_parsers
    from steerlex.steer.select_cli import add_select_parser

    add_select_parser(sub)
    add_steer_parsers(sub)
    add_eval_parser(sub)
    add_run_parser(sub)

    sae_cmd = sub.add_parser("sae", help="SAE file utilities")
    sae_sub = sae_cmd.add_subparsers(dest="sae_command", required=True, metavar="SUBCOMMAND")
    p = sae_sub.add_parser(
        "convert",
        help="convert an SAE between formats (SAELens layout, eai-sparsify, the paper's .pth)",
    )
    p.add_argument("src", help="SAE directory or .pth file (format detected)")
    p.add_argument("dst", help="output directory")
    p.add_argument(
        "--to",
        choices=("saelens", "sparsify"),
        default="saelens",
        help="output format (default saelens)",
    )
    p.add_argument("--k", type=int, help="k for a TopK .pth that does not record it")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a different SAE already at DST"
    )
    p.add_argument("--dtype", help="output dtype (default: keep)")
    p.set_defaults(func=cmd_sae_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SteerlexError as exc:
        print(f"steerlex {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"steerlex {args.command}: interrupted; finished work is kept, rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
