"""``steerlex run``: harvest → train-sae → eval-sae → explain → explain-metrics → select →
eval → features → examples → report, into one run directory.

Each stage runs the same code as its own command and records itself in
``stages/<stage>.json`` when it finishes; a rerun skips finished stages whose outputs are
still there and continues an interrupted one from what it left (activation shards, SAE
checkpoints and cached generations are kept by the stages themselves). A run directory
belongs to one config: ``config.json`` holds it with every default written out, and a
different config is refused rather than mixed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from steerlex.core.errors import PipelineError
from steerlex.core.io import read_json_object, write_json_atomic
from steerlex.pipeline.config import RunConfig, config_dict, config_fingerprint, eval_section

__all__ = ["STAGES", "Stage", "run_pipeline", "stage_names"]


@dataclass(frozen=True)
class Stage:
    """One step: what it needs (run-relative paths, each with the stage that makes it),
    what it makes, and how."""

    name: str
    needs: tuple[tuple[str, str], ...]
    makes: tuple[str, ...]
    run: Callable[[RunConfig, Path], None]
    help: str


def _cli(argv: list[str]) -> None:
    from steerlex.cli import main

    rc = main(argv)
    if rc != 0:
        raise PipelineError(
            f"`steerlex {' '.join(argv)}` failed (exit {rc}; its error is printed above)."
        )


def _harvest(cfg: RunConfig, d: Path) -> None:
    h = cfg.harvest
    base = ["harvest", "--model", cfg.model, "--layer", str(cfg.layer), "--device", cfg.device]
    for s in h.sources:
        base += ["--source", s]
    if h.limit is not None:
        base += ["--limit", str(h.limit)]
    base += ["--heldout-fraction", str(h.heldout_fraction), "--max-length", str(h.max_length)]
    base += ["--batch-size", str(h.batch_size)]
    for split in ("train", "heldout"):
        _cli([*base, "--split", split, "--out", str(d / f"acts-{split}")])


def _train(cfg: RunConfig, d: Path) -> None:
    s = cfg.sae
    _cli(["train-sae", "--activations", str(d / "acts-train"), "--out", str(d / "sae"),
          "--d-sae", str(s.d_sae), "--k", str(s.k), "--tokens", str(s.tokens), "--lr", str(s.lr),
          "--warmup-steps", str(s.warmup_steps), "--batch-size", str(s.batch_size),
          "--seed", str(s.seed), "--device", cfg.device])  # fmt: skip


def _eval_sae(cfg: RunConfig, d: Path) -> None:
    _cli(["eval-sae", "--sae", str(d / "sae"), "--activations", str(d / "acts-heldout"),
          "--max-lm-texts", str(cfg.sae.eval_lm_texts), "--device", cfg.device])  # fmt: skip


def _explain(cfg: RunConfig, d: Path) -> None:
    argv = ["explain", "--sae", str(d / "sae"), "--activations", str(d / "acts-train"),
            "--vocab-size", str(cfg.explain.vocab_size), "--out", str(d / "explanations"),
            "--device", cfg.device, "--show", "3"]  # fmt: skip
    for m in cfg.explain.methods:
        argv += ["--method", m]
    _cli(argv)


def _explain_metrics(cfg: RunConfig, d: Path) -> None:
    e = cfg.explain
    argv = ["explain-metrics", "--sae", str(d / "sae"), "--explanations", str(d / "explanations"),
            "--features", str(e.metrics_features), "--device", cfg.device, "--strengths",
            *(str(x) for x in e.metrics_strengths)]  # fmt: skip
    if not e.levels:
        argv.append("--no-levels")
    _cli(argv)


def _select(cfg: RunConfig, d: Path) -> None:
    for concept, method, top_n in (
        ("safety", "mi", cfg.select.safety_top_n),
        ("harm", "mi-input", cfg.select.harm_top_n),
    ):
        _cli(["select", "--sae", str(d / "sae"), "--concept", concept,
              "--explanations", str(d / "explanations"), "--explanation-method", method,
              "--top-n", str(top_n), "--out", str(d / f"selected_{concept}.json"),
              "--show", "5"])  # fmt: skip


def _eval(cfg: RunConfig, d: Path) -> None:
    data = eval_section(
        cfg,
        sae=str(d / "sae"),
        safety=str(d / "selected_safety.json"),
        harm=str(d / "selected_harm.json"),
    )
    data["out"] = str(d / "eval")
    path = d / "eval_config.json"
    write_json_atomic(path, data)
    _cli(["eval", "--config", str(path)])


def _features(cfg: RunConfig, d: Path) -> None:
    from steerlex.activations.store import ActivationStore
    from steerlex.models.loading import load_model
    from steerlex.report import feature_stats, token_decoder, write_feature_stats
    from steerlex.sae.formats import load_sae

    sae = load_sae(str(d / "sae"), device=cfg.device)
    store = ActivationStore.open(d / "acts-train")
    decode = token_decoder(load_model(cfg.model).tokenizer)
    r = cfg.report
    stats = feature_stats(sae, store, decode, top_k=r.top_contexts, max_tokens=r.max_tokens)
    write_feature_stats(d / "features.json", stats)


def _examples(cfg: RunConfig, d: Path) -> None:
    from steerlex.models.loading import load_model
    from steerlex.report import conversation_examples, write_examples
    from steerlex.sae.formats import load_sae
    from steerlex.steer.select import FeatureSelection

    sae = load_sae(str(d / "sae"), device=cfg.device)
    loaded = load_model(cfg.model, device=cfg.device)
    ids = FeatureSelection.load(d / "selected_safety.json").ids
    rows = conversation_examples(
        loaded, sae, cfg.layer, d / "eval" / "generations.jsonl", cfg.report.example_defence,
        ids, n=cfg.report.examples,
    )  # fmt: skip
    write_examples(d / "examples.json", rows)


def _report(cfg: RunConfig, d: Path) -> None:
    from steerlex.report.browser import build_browser
    from steerlex.report.html import build_report

    build_browser(d)
    build_report(d)


STAGES: tuple[Stage, ...] = (
    Stage("harvest", (), ("acts-train/index.json", "acts-heldout/index.json"), _harvest,
          "layer-L activations of the texts, train and held-out"),
    Stage("train-sae", (("acts-train/index.json", "harvest"),), ("sae/cfg.json",), _train,
          "a TopK SAE on the train activations"),
    Stage("eval-sae", (("sae/cfg.json", "train-sae"), ("acts-heldout/index.json", "harvest")),
          ("sae/eval/eval.json",), _eval_sae, "held-out FVE, L0, dead latents, spliced loss"),
    Stage("explain", (("sae/cfg.json", "train-sae"), ("acts-train/index.json", "harvest")),
          ("explanations/mi.jsonl", "explanations/mi-input.jsonl"), _explain,
          "word lists for every feature by every method"),
    Stage("explain-metrics", (("explanations/mi.jsonl", "explain"),),
          ("explanations/metrics.json",), _explain_metrics,
          "faithfulness, frequency bias and levels of the explanations"),
    Stage("select", (("explanations/mi.jsonl", "explain"),
                     ("explanations/mi-input.jsonl", "explain")),
          ("selected_safety.json", "selected_harm.json"), _select,
          "safety features and harm detectors chosen from their explanations"),
    Stage("eval", (("selected_safety.json", "select"), ("selected_harm.json", "select"),
                   ("sae/cfg.json", "train-sae")),
          ("eval/scores.json",), _eval, "the safety evaluation of every defence"),
    Stage("features", (("sae/cfg.json", "train-sae"), ("acts-train/index.json", "harvest")),
          ("features.json",), _features, "top contexts and activation histograms"),
    Stage("examples", (("eval/scores.json", "eval"), ("selected_safety.json", "select")),
          ("examples.json",), _examples, "conversations with and without steering"),
    Stage("report", (), ("report.html", "browser.html"), _report,
          "report.html and the feature browser"),
)  # fmt: skip


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: data}


def claim_run_dir(cfg: RunConfig, runs_dir: Path) -> Path:
    """``runs_dir/<name>``, created with ``config.json``; an existing one must hold the same
    config (else a :class:`PipelineError` names the differing keys and a free name)."""
    d = runs_dir / cfg.name
    resolved = config_dict(cfg)
    fp = config_fingerprint(cfg)
    cfg_path = d / "config.json"
    if cfg_path.is_file():
        old = read_json_object(
            cfg_path, what="the run's config", fix=f"delete {d} to start over", error=PipelineError
        )
        if old.get("fingerprint") != fp:
            a, b = _flat(old.get("config", {})), _flat(resolved)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "name")
            free = next(
                f"{cfg.name}-{i}"
                for i in range(2, 1000)
                if not (runs_dir / f"{cfg.name}-{i}").exists()
            )
            raise PipelineError(
                f"{d} was made by another config (differs in {', '.join(diff[:8]) or 'its fingerprint'}"
                f"{' …' if len(diff) > 8 else ''}); results of two configs are never mixed. Run with "
                f"--name {free} for a new run directory, or delete {d} to start over."
            )  # fmt: skip
    elif d.exists() and any(d.iterdir()):
        raise PipelineError(
            f"{d} exists and is not a steerlex run directory (no config.json); choose another "
            "--name or move it away."
        )
    else:
        write_json_atomic(cfg_path, {"fingerprint": fp, "config": resolved})
    return d


def _done(d: Path, stage: Stage) -> bool:
    return (d / "stages" / f"{stage.name}.json").is_file() and all(
        (d / m).exists() for m in stage.makes
    )


def run_pipeline(
    cfg: RunConfig,
    runs_dir: str | Path = "runs",
    *,
    only: Sequence[str] | None = None,
    log: TextIO | str | None = "stderr",
) -> Path:
    """Run every stage (or ``only`` these, in pipeline order) not yet finished; return the
    run directory. Interrupt at any time: a rerun continues. Progress lines go to ``log``
    (standard error as it is at call time by default; None: quiet)."""
    if isinstance(log, str):
        log = sys.stderr
    names = stage_names()
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise PipelineError(f"Unknown stage(s) {unknown}; the stages are: {', '.join(names)}.")
    d = claim_run_dir(cfg, Path(runs_dir))
    todo = [s for s in STAGES if only is None or s.name in only]
    if cfg.explain.metrics_features <= 0:
        todo = [s for s in todo if s.name != "explain-metrics"]
    run_path = d / "run.json"
    record: dict[str, Any] = {"stages": {}}
    if run_path.is_file():
        record = read_json_object(
            run_path, what="the run's record", fix=f"delete {run_path}", error=PipelineError
        )
    started = time.perf_counter()
    for i, stage in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {stage.name}"
        if _done(d, stage) and only is None:
            _say(log, f"{head}: done earlier, kept ({stage.help})")
            continue
        for path, maker in stage.needs:
            if not (d / path).exists():
                raise PipelineError(
                    f"Stage {stage.name} needs {d / path}, which stage {maker} makes; run "
                    f"`steerlex run --stage {maker}` (with the same config and --name) first, "
                    "or run without --stage to do every stage in order."
                )
        _say(log, f"{head}: {stage.help} ...")
        t0 = time.perf_counter()
        stage.run(cfg, d)
        missing = [m for m in stage.makes if not (d / m).exists()]
        if missing:
            raise PipelineError(f"Stage {stage.name} finished without writing {missing}.")
        seconds = round(time.perf_counter() - t0, 1)
        info = {"seconds": seconds, "finished": _now()}
        write_json_atomic(d / "stages" / f"{stage.name}.json", info)
        record.setdefault("stages", {})[stage.name] = info
        write_json_atomic(run_path, record)
        _say(log, f"{head}: finished in {seconds:.0f} s")
    _say(
        log, f"run {d} complete in {time.perf_counter() - started:.0f} s: open {d / 'report.html'}"
    )
    return d


def _say(log: TextIO | None, msg: str) -> None:
    if log is not None:
        print(f"steerlex run: {msg}", file=log, flush=True)
