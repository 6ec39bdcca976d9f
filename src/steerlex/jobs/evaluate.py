"""The evaluation job: every defence on the same prompts, judged the same way
(:func:`steerlex.evaluate.run.run_eval` with the context's model and SAE)."""

from __future__ import annotations

from dataclasses import replace

from steerlex.evaluate.config import DefenceConfig, EvalConfig, default_defences
from steerlex.evaluate.defences import DEFENCES
from steerlex.evaluate.defences.sae import ConditionalOptions
from steerlex.evaluate.plan import check_feature_specs, plan_defences
from steerlex.evaluate.run import EvalResult, judge_env, run_eval
from steerlex.jobs.context import RunContext
from steerlex.judges import SafetyJudge, make_judge
from steerlex.models.embedded import DEFAULT_MODEL

__all__ = ["eval_job", "plan_run_defences"]


def eval_job(
    cfg: EvalConfig, ctx: RunContext, *, dry_run: bool = False, judge: SafetyJudge | None = None
) -> EvalResult:
    """Run the evaluation ``cfg`` describes (``dry_run``: print the plan only); the model
    and SAE come from ``ctx`` (loaded once per run). ``judge`` overrides ``cfg.judge``.
    The config, the defences and the feature ids are checked before the model is loaded
    (the same checks with ``dry_run``)."""
    cfg.validate()
    sae = ctx.sae(cfg.sae, device=cfg.device) if cfg.sae else None
    check_feature_specs(cfg, plan_defences(cfg, with_sae=sae is not None), sae)
    spec = cfg.model or (sae.cfg.model_spec if sae is not None else None) or DEFAULT_MODEL
    loaded = ctx.model(spec, device=cfg.device, dtype=cfg.dtype)
    if judge is None:  # a judge model in its own dtype comes from the run context too
        judge = make_judge(
            judge_env(cfg, loaded, lambda s, dt: ctx.model(s, device=cfg.device, dtype=dt))
        )
    return run_eval(
        cfg, loaded=loaded, sae=sae, progress=ctx.progress, log=ctx.stream(), dry_run=dry_run,
        judge=judge,
    )  # fmt: skip


def _run_defence(d: DefenceConfig, safety: str, harm: str) -> DefenceConfig:
    """An SAE defence of the run steers the explanation-selected ``safety`` features unless it
    names its own; ``"data"`` means the evaluation's data-selected features (no explanations
    used, its gate's too). A conditional defence whose gate reads SAE features (``detector:
    features``) is gated by the ``harm`` detectors unless it names its own."""
    opts = d.options
    if DEFENCES.get(d.kind).needs_sae and opts.features == "data":
        return replace(d, options=replace(opts, features=None))
    if DEFENCES.get(d.kind).needs_sae and opts.features is None:
        opts = replace(opts, features=safety)
    if (
        isinstance(opts, ConditionalOptions)
        and opts.conditional
        and opts.detector == "features"
        and opts.harm_features is None
    ):
        opts = replace(opts, harm_features=harm)
    return replace(d, options=opts)


def plan_run_defences(
    cfg: EvalConfig,
    *,
    model: str,
    device: str,
    sae: str,
    layer: int,
    out: str,
    safety: str,
    harm: str,
) -> EvalConfig:
    """The run's eval config: ``cfg`` with the run's model, SAE, layer, device and output
    filled in, and every SAE defence pointed at the run's selections
    (:func:`_run_defence`)."""
    defences = cfg.defences if cfg.defences is not None else default_defences(with_sae=True)
    return replace(
        cfg, model=model, device=device, sae=sae, layer=layer, out=out,
        defences=[_run_defence(d, safety, harm) for d in defences],
    )  # fmt: skip
