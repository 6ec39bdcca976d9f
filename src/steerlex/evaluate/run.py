"""Run a safety evaluation: every defence on the same prompts, judged the same way.

:func:`run_eval` does, in order:

1. load the model (and the SAE, when one is configured) and build the prompt sets with their
   selection / test split (:mod:`steerlex.evaluate.sets`);
2. build every defence's conditions through the defence registry
   (:mod:`steerlex.evaluate.defences`); what they need from the selection split only (the
   refusal direction, data-driven SAE features when none are given, the gate threshold) is
   computed on first use (:class:`~steerlex.evaluate.setup.EvalSetup`);
3. choose each sweeping defence's headline strength on the selection split (the lowest
   attack success among strengths whose over-refusal stays within ``max_overrefusal_increase``
   of no defence; else the weakest strength; :mod:`steerlex.evaluate.plan`);
4. on the test split: every strength of every defence on the jailbreak and benign prompts (the
   trade-off curves), plus the plain harmful and utility prompts at the headline strength;
5. judges, metrics, KL, and the output files: ``generations.jsonl``, ``scores.json``,
   ``results.md``, ``split.json``, ``config.json`` and two SVG trade-off plots
   (:mod:`steerlex.evaluate.outputs`).

Generations go through :class:`~steerlex.evaluate.cache.EvalCache`, so reruns and added defences
only cost what is new, and a killed run resumes where it stopped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from steerlex.core.io import write_json_atomic
from steerlex.evaluate.cache import EvalCache
from steerlex.evaluate.config import DefenceConfig, EvalConfig, config_to_dict
from steerlex.evaluate.defences.base import DEFENCES
from steerlex.evaluate.defences.none import NO_DEFENCE
from steerlex.evaluate.generation import GenerationRunner
from steerlex.evaluate.kl import cached_kl
from steerlex.evaluate.metrics import mean_or_none
from steerlex.evaluate.outputs import results_table, write_outputs
from steerlex.evaluate.plan import (
    Estimate,
    EvalPlan,
    Headlines,
    check_feature_specs,
    choose_headlines,
    estimate,
    make_plan,
    plan_defences,
)
from steerlex.evaluate.scores import COUNTING, condition_metrics
from steerlex.evaluate.sets import EvalSets, build_sets
from steerlex.evaluate.setup import EvalSetup, say
from steerlex.judges import JudgeEnv, JudgeItem, SafetyJudge, make_judge
from steerlex.judges.rules import RuleJudge
from steerlex.models.embedded import DEFAULT_MODEL
from steerlex.models.hooks import check_layer, num_layers
from steerlex.models.loading import LoadedModel, load_model
from steerlex.sae import load_sae
from steerlex.sae.base import SparseAutoencoder
from steerlex.steer.runtime import SteeredModel

__all__ = ["EvalInputs", "EvalResult", "load_inputs", "plan_defences", "results_table", "run_eval"]


@dataclass
class EvalResult:
    """What :func:`run_eval` wrote: the output directory and the scores dict."""

    out: Path
    scores: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EvalInputs:
    """What an evaluation runs on: the model, the SAE (``None`` without one), the layer, the
    model steered there (no strategy yet), the checked defences and the harm judge
    (``cfg.judge``; the rules judge always runs beside it)."""

    loaded: LoadedModel
    sae: SparseAutoencoder | None
    layer: int
    steered: SteeredModel
    defences: list[DefenceConfig]
    judge: SafetyJudge


def judge_env(
    cfg: EvalConfig, loaded: LoadedModel, loader: Callable[[str, str], LoadedModel] | None = None
) -> JudgeEnv:
    """The judge's build environment: verdicts cached beside the generation cache, and the
    evaluated model reused when the judge runs on the same spec in the same dtype; other
    models come from ``loader`` ((spec, dtype) → model; default: loaded from disk)."""
    cache_dir = (Path(cfg.cache).parent if cfg.cache else Path(cfg.out) / "cache") / "judge"

    def model_for(spec: str, dtype: str) -> LoadedModel:
        if spec == loaded.spec and dtype == cfg.dtype:
            return loaded
        if loader is not None:
            return loader(spec, dtype)
        return load_model(spec, device=cfg.device, dtype=dtype)

    return JudgeEnv(cfg.judge, cfg.device, cfg.dtype, cache_dir, model_for)


def load_inputs(
    cfg: EvalConfig,
    *,
    loaded: LoadedModel | None = None,
    sae: SparseAutoencoder | None = None,
    judge: SafetyJudge | None = None,
    log: TextIO | None = sys.stderr,
) -> EvalInputs:
    """The model, SAE, layer, defences and judge of ``cfg`` (the given ones are used as they
    are). Everything that can fail on the config fails here, before any generation."""
    cfg.validate()
    if sae is None and cfg.sae:
        sae = load_sae(cfg.sae, device=cfg.device)
    defences = plan_defences(cfg, with_sae=sae is not None)
    check_feature_specs(cfg, defences, sae)
    if loaded is None:
        spec = cfg.model or (sae.cfg.model_spec if sae is not None else None) or DEFAULT_MODEL
        say(log, f"loading {spec} ...")
        loaded = load_model(spec, device=cfg.device, dtype=cfg.dtype)
    if judge is None:
        judge = make_judge(judge_env(cfg, loaded))
    layer = cfg.layer
    if layer is None and sae is not None:
        layer = sae.cfg.layer
    if layer is None:
        layer = num_layers(loaded.model) // 3
        say(log, f"layer: {layer} (no SAE and no 'layer' given: a third of the depth)")
    layer = check_layer(loaded.model, layer)
    steered = SteeredModel(loaded, sae, None, layer=layer, enabled=False)  # checks the SAE fits
    return EvalInputs(loaded, sae, layer, steered, defences, judge)


def _build_sets(cfg: EvalConfig, tokenizer: Any) -> EvalSets:
    s = cfg.sets
    return build_sets(
        harmful=s.harmful,
        templates=s.templates,
        benign=s.benign,
        utility=s.utility,
        reformulated=s.reformulated,
        n_jailbreak=s.n_jailbreak,
        n_reformulated=s.n_reformulated,
        n_harmful=s.n_harmful,
        n_benign=s.n_benign,
        n_utility=s.n_utility,
        n_selection=s.n_selection,
        n_tuning=s.n_tuning,
        test_fraction=s.test_fraction,
        seed=cfg.seed,
        salt=s.salt,
        append=s.append,
        model_name=s.model_name,
        template_budget=s.template_budget,
        tokenizer=tokenizer,
    )


class _EvalRun:
    """One evaluation after its inputs are loaded: the steps of :func:`run_eval` in order."""

    def __init__(
        self,
        cfg: EvalConfig,
        inputs: EvalInputs,
        sets: EvalSets,
        *,
        progress: bool,
        log: TextIO | None,
    ) -> None:
        self.cfg, self.inputs, self.sets = cfg, inputs, sets
        self.progress, self.log = progress, log
        self.cache_path = (
            Path(cfg.cache) if cfg.cache else Path(cfg.out) / "cache" / "generations.jsonl"
        )
        loaded = inputs.loaded
        self.cache = EvalCache(self.cache_path, loaded.weights_id or loaded.spec)
        self.rules = RuleJudge()
        self.runner = GenerationRunner(inputs.steered, self.cache, cfg.generation, self.rules)
        self.setup = EvalSetup(
            cfg, loaded, inputs.sae, inputs.layer, sets, progress=progress, log=log,
            cache=self.cache,
        )  # fmt: skip
        self.plan: EvalPlan = make_plan(inputs.defences, self.setup)

    def generate(self, total: int) -> Headlines:
        """Every generation of the plan: the tuning jobs, the strength choice, the sweep, and
        the headline conditions on the harmful and utility prompts."""
        runner, plan = self.runner, self.plan
        runner.bar = tqdm(
            total=total,
            desc="generate",
            unit="reply",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            runner.run(plan.tuning_jobs)
            headlines = choose_headlines(plan, runner, self.cfg.max_overrefusal_increase)
            runner.run(plan.sweep_jobs)
            runner.run(
                [(headlines.conditions[d.label], plan.headline_prompts) for d in plan.defences]
            )
        finally:
            runner.bar.close()
        return headlines

    def judged_records(
        self, headlines: Headlines
    ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """Every judged record (test split, then the selection split's tuning replies), and
        the test records by condition label; the LLM judge (if any) on the test split's
        jailbreak and harmful replies."""
        plan, runner = self.plan, self.runner
        records: list[dict[str, Any]] = []
        by_cond: dict[str, list[dict[str, Any]]] = {}
        for d in plan.defences:
            for c in plan.conditions[d.label]:
                head = c is headlines.conditions[d.label]
                ps = plan.sweep_prompts + (plan.headline_prompts if head else [])
                by_cond[c.label] = runner.records(c, ps)
                records += by_cond[c.label]
        for c, selection in plan.tuning_jobs:
            records += runner.records(c, selection)
        judge = self.inputs.judge
        todo = [
            r
            for r in records
            if r["part"] == "test" and r["prompt_kind"] in ("jailbreak", "harmful")
        ]
        say(self.log, f"judge {judge.name} on {len(todo)} replies")
        items = [JudgeItem(r["behaviour"], r["reply"], prompt=r["prompt"]) for r in todo]
        for r, v in zip(todo, judge.judge_many(items, progress=self.progress), strict=True):
            r["judges"]["judge"] = v.to_json()
        return records, by_cond

    def kl(self, headlines: Headlines) -> dict[str, list[float | None]]:
        """Each condition's KL values on the benign (and utility) test prompts; 0 for the
        baseline kind (``none``), whose headline replies are the reference."""
        items = self.plan.kl_prompts
        if not self.cfg.kl or not items:
            return {}
        defences, conditions = self.plan.defences, self.plan.conditions
        baseline = [d.label for d in defences if DEFENCES.get(d.kind).is_baseline]
        reference = headlines.conditions[baseline[0]] if baseline else NO_DEFENCE
        conds = [c for d in defences if d.label not in baseline for c in conditions[d.label]]
        kl, refs = cached_kl(
            self.runner,
            conds,
            NO_DEFENCE,
            reference,
            items,
            max_tokens=self.cfg.generation.max_new_tokens,
            progress=self.progress,
        )
        for label in baseline:
            for c in conditions[label]:
                kl[c.label] = [0.0 if r.strip() else None for r in refs]
        return kl

    def _rows(
        self,
        headlines: Headlines,
        by_cond: dict[str, list[dict[str, Any]]],
        kl: dict[str, list[float | None]],
    ) -> list[dict[str, Any]]:
        """``scores.json``'s ``conditions``: one row of test-split metrics per condition."""
        rows = []
        for d in self.plan.defences:
            for c in self.plan.conditions[d.label]:
                m = condition_metrics(by_cond[c.label])
                vals = [v for v in kl.get(c.label, []) if v is not None]
                m["kl"] = {"mean": mean_or_none(vals), "n": len(vals)} if c.label in kl else None
                rows.append(
                    {
                        "defence": d.label,
                        "kind": d.kind,
                        "strength": c.strength,
                        "headline": c is headlines.conditions[d.label],
                        "part": "test",
                        "metrics": m,
                    }
                )
        return rows

    def scores(
        self,
        headlines: Headlines,
        by_cond: dict[str, list[dict[str, Any]]],
        kl: dict[str, list[float | None]],
        cached_at_start: int,
    ) -> dict[str, Any]:
        """The whole ``scores.json``."""
        loaded, judge, layer = self.inputs.loaded, self.inputs.judge, self.inputs.layer
        sae_block = {"path": self.cfg.sae, "fingerprint": self.setup.sae_id, "layer": layer}
        return {
            "model": {"spec": loaded.spec, "weights_id": loaded.weights_id},
            "sae": sae_block if self.inputs.sae is not None else None,
            "layer": layer,
            "judges": {"rules": self.rules.name, "judge": judge.name},
            "counting": COUNTING,
            "sets": {
                "counts": self.sets.counts(),
                "settings": self.sets.settings,
                "provenance": self.sets.provenance,
            },
            "generation": self.runner.gen,
            "tuning": {
                "chosen": {k: {"strength": v[0], "why": v[1]} for k, v in headlines.chosen.items()},
                "sweeps": headlines.sweeps,
                **self.setup.info,
            },
            "conditions": self._rows(headlines, by_cond, kl),
            "cache": {
                "path": str(self.cache_path),
                "cached_at_start": cached_at_start,
                "written": self.cache.written,
                "other_model_records": sum(self.cache.other_models.values()),
            },
        }


def run_eval(
    cfg: EvalConfig,
    *,
    loaded: LoadedModel | None = None,
    sae: SparseAutoencoder | None = None,
    progress: bool = True,
    log: TextIO | None = sys.stderr,
    dry_run: bool = False,
    judge: SafetyJudge | None = None,
) -> EvalResult:
    """Run the evaluation ``cfg`` describes and write its outputs under ``cfg.out``.

    ``loaded``/``sae`` may be given already loaded (tests, notebooks); otherwise ``cfg.model``
    (default: the SAE's model, else the embedded default model) and ``cfg.sae`` are loaded.
    ``judge`` overrides ``cfg.judge``. ``dry_run`` stops after printing the plan.

    Raises:
        EvalError (a SteerlexError): bad config, sets, defences or judge.
    """
    out = Path(cfg.out)
    inputs = load_inputs(cfg, loaded=loaded, sae=sae, judge=judge, log=log)
    sets = _build_sets(cfg, inputs.loaded.tokenizer)
    counts = sets.counts()
    say(log, f"prompts: selection {counts['selection']}, test {counts['test']}")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "split.json", sets.split_record())
    write_json_atomic(out / "config.json", config_to_dict(cfg))
    run = _EvalRun(cfg, inputs, sets, progress=progress, log=log)
    est: Estimate = estimate(run.plan, run.runner)
    say(log, est.message(run.plan, run.cache_path))
    if dry_run:
        plan = {"tuning": est.tuning, "sweep": est.sweep, "headline": est.headline}
        return EvalResult(out, {"plan": plan})
    headlines = run.generate(est.total)
    records, by_cond = run.judged_records(headlines)
    kl = run.kl(headlines)
    scores = run.scores(headlines, by_cond, kl, est.cached)
    write_outputs(out, records, scores)
    say(log, f"wrote {out}/results.md, scores.json, generations.jsonl and the plots")
    return EvalResult(out, scores, records)
