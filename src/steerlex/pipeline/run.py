"""``steerlex run``: harvest → train-sae → eval-sae → explain → explain-metrics → select →
eval → features → examples → report, into one run directory.

Each stage calls its job (:mod:`steerlex.jobs`) with one shared :class:`RunContext`, so the
model is loaded once for the whole run. A stage records itself in ``stages/<stage>.json``
when it finishes; a rerun skips finished stages whose outputs are still there and
continues an interrupted one from what it left (activation shards, SAE checkpoints and
cached generations are kept by the jobs themselves). The run ends with a short summary
(:func:`steerlex.report.headline.summary_lines`): the headline numbers and the two files to
open, or what is still missing. A run directory belongs to one
config: ``config.json`` holds it with every default written out, and a different config
is refused rather than mixed. A failed stage raises :class:`StageError` (its name, the
cause and the command that resumes the run); Ctrl-C raises :class:`RunInterrupted` with
the same advice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from steerlex.core.errors import PipelineError, RunInterrupted, StageError, SteerlexError
from steerlex.core.io import LOCK_NAME, dir_lock, read_json_object, write_json_atomic
from steerlex.core.paths import check_output_dir
from steerlex.jobs.context import RunContext
from steerlex.pipeline.config import RunConfig, config_dict, config_fingerprint, config_from_dict
from steerlex.pipeline.stages import STAGES, Stage, StageConfigs, stage_configs
from steerlex.report.headline import summary_lines

__all__ = ["claim_run_dir", "resume_command", "resumed_config", "run_pipeline"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: data}


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``."""
    return f"steerlex run --resume {run_dir}"


def resumed_config(run_dir: Path) -> RunConfig:
    """The config the run in ``run_dir`` was started with (its ``config.json``), named after
    the directory."""
    saved = read_json_object(
        run_dir / "config.json", what="run config", error=PipelineError,
        fix=f"{run_dir} is not a run directory of this steerlex; start a new run",
    )  # fmt: skip
    data = saved.get("config")
    if not isinstance(data, dict):
        raise PipelineError(f"{run_dir / 'config.json'} holds no 'config' object.")
    return config_from_dict({**data, "name": run_dir.name})


def claim_run_dir(cfg: RunConfig, runs_dir: Path) -> Path:
    """``runs_dir/<name>``, created with ``config.json``; an existing one must hold the same
    config (else a :class:`PipelineError` names the differing keys and a free name)."""
    d = runs_dir / cfg.name
    if runs_dir.exists() and not runs_dir.is_dir():
        raise PipelineError(f"--runs-dir {runs_dir} is a file; pass a directory.")
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
    elif d.exists() and any(p.name != LOCK_NAME for p in d.iterdir()):
        raise PipelineError(
            f"{d} exists and is not a steerlex run directory (no config.json); choose another "
            "--name or move it away."
        )
    else:
        write_json_atomic(cfg_path, {"fingerprint": fp, "config": resolved})
    return d


def _done(d: Path, stage: Stage, configs: StageConfigs) -> bool:
    return (d / "stages" / f"{stage.name}.json").is_file() and all(
        (d / m).exists() for m in stage.makes(configs)
    )


def _run_stage(stage: Stage, configs: StageConfigs, d: Path, ctx: RunContext) -> None:
    """Run one stage; its failure or an interruption is reported with the resume command."""
    resume = resume_command(d)
    try:
        stage.run(configs, d, ctx)
    except SteerlexError as exc:
        raise StageError(stage.name, exc, resume) from exc
    except KeyboardInterrupt:
        raise RunInterrupted(
            f"stage {stage.name} was stopped; finished stages and the work this stage "
            f"finished are kept. Resume with: {resume}"
        ) from None
    except Exception:
        ctx.say(
            f"steerlex run: stage {stage.name} failed with an unexpected error (traceback "
            f"below; please report it). Finished stages are kept; resume with: {resume}"
        )
        raise
    missing = [m for m in stage.makes(configs) if not (d / m).exists()]
    if missing:
        raise PipelineError(f"Stage {stage.name} finished without writing {missing}.")


def run_pipeline(
    cfg: RunConfig,
    runs_dir: str | Path = "runs",
    *,
    only: Sequence[str] | None = None,
    log: TextIO | str | None = "stderr",
    ctx: RunContext | None = None,
) -> Path:
    """Run every stage (or ``only`` these, in pipeline order) not yet finished; return the
    run directory. Interrupt at any time: a rerun continues. Progress lines go to ``log``
    (standard error as it is at call time by default; None: quiet). ``ctx`` may hold
    models already loaded (notebooks); by default a fresh context is used."""
    names = [s.name for s in STAGES]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise PipelineError(f"Unknown stage(s) {unknown}; the stages are: {', '.join(names)}.")
    if ctx is None:
        ctx = RunContext(log=log)
    runs = Path(runs_dir)
    if runs.exists() and not runs.is_dir():
        raise PipelineError(f"--runs-dir {runs} is a file; pass a directory.")
    _preflight(cfg, runs / cfg.name, only, ctx)
    with dir_lock(runs / cfg.name, what="run directory", error=PipelineError):
        return _run_claimed(cfg, claim_run_dir(cfg, runs), only, ctx)


def _todo(cfg: RunConfig, only: Sequence[str] | None) -> list[Stage]:
    """The stages to run, in order: ``only`` these, else all (explain-metrics with
    ``features`` 0 never)."""
    todo = [s for s in STAGES if only is None or s.name in only]
    if cfg.explain_metrics.features <= 0:
        todo = [s for s in todo if s.name != "explain-metrics"]
    return todo


def _preflight(cfg: RunConfig, d: Path, only: Sequence[str] | None, ctx: RunContext) -> None:
    """Everything checked before anything is written or any stage runs: the run directory
    ``d`` can be created or written, every stage's options (:func:`stage_configs`, the
    output paths included), and each stage still to run's own ``check`` (the layer against
    the model's layer count)."""
    check_output_dir(d, "The run directory (--runs-dir/--name)", PipelineError)
    configs = stage_configs(cfg, d)
    for stage in _todo(cfg, only):
        if stage.check is not None and not (only is None and _done(d, stage, configs)):
            stage.check(configs, ctx)


def _run_claimed(cfg: RunConfig, d: Path, only: Sequence[str] | None, ctx: RunContext) -> Path:
    """:func:`run_pipeline` in the locked and claimed run directory ``d``."""
    configs = stage_configs(cfg, d)
    todo = _todo(cfg, only)
    run_path = d / "run.json"
    record: dict[str, Any] = {"stages": {}}
    if run_path.is_file():
        record = read_json_object(
            run_path, what="the run's record", fix=f"delete {run_path}", error=PipelineError
        )
    started = time.perf_counter()
    loads_before = len(ctx.model_loads)
    for i, stage in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {stage.name}"
        if _done(d, stage, configs) and only is None:
            _say(ctx, f"{head}: done earlier, kept ({stage.help})")
            continue
        for path, maker in stage.needs(configs):
            if not (d / path).exists():
                raise PipelineError(
                    f"Stage {stage.name} needs {d / path}, which stage {maker} makes; run "
                    f"`steerlex run --resume {d} --stage {maker}` first, or run without "
                    "--stage to do every stage in order."
                )
        _say(ctx, f"{head}: {stage.help} ...")
        t0 = time.perf_counter()
        _run_stage(stage, configs, d, ctx)
        seconds = round(time.perf_counter() - t0, 1)
        info = {"seconds": seconds, "finished": _now()}
        write_json_atomic(d / "stages" / f"{stage.name}.json", info)
        record.setdefault("stages", {})[stage.name] = info
        loads = ctx.model_loads[loads_before:]
        record["model_loads"] = len(loads)
        record["models_loaded"] = [asdict(m) for m in loads]
        write_json_atomic(run_path, record)
        _say(ctx, f"{head}: finished in {seconds:.0f} s")
    n_loads = len(ctx.model_loads) - loads_before
    spent = (
        f"{time.perf_counter() - started:.0f} s ({n_loads} model load{'s' if n_loads != 1 else ''})"
    )
    skipped = {"explain-metrics"} if cfg.explain_metrics.features <= 0 else set()
    missing = [s.name for s in STAGES if s.name not in skipped and not _done(d, s, configs)]
    if missing:
        _say(ctx, f"stages {', '.join(t.name for t in todo)} of {d} done in {spent}; not run "
                  f"yet: {', '.join(missing)} (`{resume_command(d)}` runs them)")  # fmt: skip
    else:
        _say(ctx, f"run {d} complete in {spent}: open {d / 'report.html'}")
    _summary(ctx, d)
    return d


def _summary(ctx: RunContext, d: Path) -> None:
    """The run's headline numbers and the files to open (what exists; what is missing)."""
    first, *rest = summary_lines(d)
    _say(ctx, first)
    for line in rest:
        ctx.say(line)


def _say(ctx: RunContext, msg: str) -> None:
    ctx.say(f"steerlex run: {msg}")
