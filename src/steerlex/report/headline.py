"""A run's headline numbers, read from its directory: what ``steerlex run`` prints at the end
and the report shows at the top.

- SAE quality (``sae/eval/eval.json``): held-out FVE, loss recovered, dead latents;
- the best explanation method by output-side faithfulness (``explanations/metrics.json``);
- the best defence (``eval/scores.json``): the headline row with the lowest jailbreak attack
  success among those whose over-refusal stays within the run's budget of no defence's (the
  rule the evaluation picks strengths by, ``eval.max_overrefusal_increase``), with its
  over-refusal and the judge that counted it;
- the two files to open: ``report.html`` and ``eval/results.md``.

A missing file is a stage that has not run: its line says so and names the stage; a file that
cannot be read says that, too. Nothing here raises on a partial or damaged run directory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlex.core.errors import SteerlexError
from steerlex.evaluate.metrics import Rate
from steerlex.evaluate.scores import rate
from steerlex.explain.metrics import best_method
from steerlex.report.common import dig, read_json_optional
from steerlex.report.faithfulness import fmt_auroc, method_auroc, verdict

__all__ = ["Headline", "best_defence", "run_headlines", "summary_lines"]

#: The over-refusal a defence may add to no defence's when the run's config does not say.
DEFAULT_BUDGET = 0.05
#: The files a user opens, relative to the run directory, with the stage that writes each.
OPEN_FILES = (("report.html", "report"), ("eval/results.md", "eval"))
_UNREADABLE = (SteerlexError, OSError, ValueError, TypeError, KeyError, AttributeError)


@dataclass(frozen=True)
class Headline:
    """One line of the summary: ``text`` when its input exists, else ``missing`` says what
    is missing (and which stage writes it)."""

    label: str
    text: str | None = None
    missing: str | None = None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------- SAE quality


def sae_text(data: Mapping[str, Any]) -> str:
    """``held-out FVE 0.705, loss recovered 93.1% (vs zero ablation), 5 of 2048 latents dead
    (0.24%)`` from an ``eval.json``."""
    act = data.get("activation") or {}
    fve = _num(dig(act, "fve"))
    parts = [f"held-out FVE {fve:.3f}" if fve is not None else "FVE not computed"]
    rec = _num(dig(data, "spliced", "loss_recovered_zero"))
    parts.append(
        f"loss recovered {rec:.1f}% (vs zero ablation)"
        if rec is not None
        else "loss recovered not computed"
    )
    dead, d_sae, share = act.get("n_dead"), act.get("d_sae"), _num(act.get("dead_fraction"))
    if isinstance(dead, int):
        of = f" of {d_sae}" if isinstance(d_sae, int) else ""
        pct = f" ({share:.2%})" if share is not None else ""
        parts.append(f"{dead}{of} latents dead{pct}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- explanations


def explanations_text(metrics: Mapping[str, Any]) -> str | None:
    """The best method by output-side faithfulness with its AUROC and interval against random
    words and the runner-up, then the best on the input side (often another method: ``mi``
    explains what a feature writes, ``mi-input`` what makes it fire); ``None`` when no method
    was scored."""
    best = best_method(metrics, "output")
    if best is None:
        return None
    out = method_auroc(metrics, best, "output")
    text = f"{best}, output AUROC {fmt_auroc(out)} vs 0.5 for random words ({verdict(out)})"
    others = [
        (v[0], m)
        for m in metrics.get("methods") or []
        if m != best and (v := method_auroc(metrics, m, "output")) is not None
    ]
    if others:
        mean, name = max(others)
        text += f", next {name} {mean:.3f}"
    best_in = best_method(metrics, "input")
    if best_in is not None:
        inp = method_auroc(metrics, best_in, "input")
        text += f"; input side: {best_in}, AUROC {fmt_auroc(inp)} ({verdict(inp)})"
    return f"{text}; {len(metrics.get('features') or [])} features"


# --------------------------------------------------------------------------- defences


def _over_refusal(row: Mapping[str, Any]) -> float:
    return rate(row.get("metrics") or {}, "benign", "over_refusal") or 0.0


def _judged(row: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The harm judge's jailbreak attack success of ``row`` (``{k, n, ...}``), if it judged any."""
    m = dig(row, "metrics", "jailbreak", "judge", "attack_success")
    return m if isinstance(m, Mapping) and m.get("n") else None


def _rules(row: Mapping[str, Any]) -> Mapping[str, Any] | None:
    m = dig(row, "metrics", "jailbreak", "attack_success")
    return m if isinstance(m, Mapping) and m.get("n") else None


def _share(m: Mapping[str, Any] | None) -> float | None:
    return None if m is None else int(m["k"]) / int(m["n"])


def best_defence(
    scores: Mapping[str, Any], budget: float = DEFAULT_BUDGET
) -> tuple[dict[str, Any], dict[str, Any] | None, bool] | None:
    """``(best, no_defence, within_budget)`` among the headline rows of ``scores``: the
    defence with the lowest attack success whose over-refusal is at most no defence's plus
    ``budget`` (ties: lower over-refusal, then name); when none is within the budget, the
    lowest attack success overall and ``within_budget`` False. Attack success is the harm
    judge's (``eval.judge``, the one measured against people) when it judged every
    candidate, else the rules judge's. ``None`` without a headline defence that has an
    attack success."""
    rows = [r for r in scores.get("conditions") or [] if isinstance(r, dict) and r.get("headline")]
    base = next((r for r in rows if r.get("kind") == "none" or r.get("defence") == "none"), None)
    judged = bool(rows) and all(_judged(r) is not None for r in rows if r is not base)
    read = _judged if judged else _rules
    candidates = [r for r in rows if r is not base and read(r) is not None]
    if not candidates:
        return None
    limit = (_over_refusal(base) if base is not None else 0.0) + budget + 1e-12
    within = [r for r in candidates if _over_refusal(r) <= limit]
    pool = within or candidates
    best = min(pool, key=lambda r: (_share(read(r)), _over_refusal(r), str(r.get("defence"))))
    return best, base, bool(within)


def _rate_text(m: Any, ci: bool = True) -> str:
    if not isinstance(m, Mapping) or not m.get("n"):
        return "–"
    return Rate(int(m["k"]), int(m["n"])).text(ci)


def _condition(row: Mapping[str, Any]) -> str:
    st = row.get("strength")
    return f"{row.get('defence')} @ {st:g}" if isinstance(st, (int, float)) else str(row["defence"])


def defence_text(scores: Mapping[str, Any], budget: float) -> str | None:
    """The best defence's attack success by the harm judge (no defence's beside it), its
    over-refusal, and the rules judge's attack success for comparison (the rules judge's
    alone when the harm judge judged nothing)."""
    found = best_defence(scores, budget)
    if found is None:
        return None
    best, base, within = found
    rules_name = dig(scores, "judges", "rules") or "the rules judge"
    judge = dig(scores, "judges", "judge")
    judged = _judged(best) is not None and (base is None or _judged(base) is not None)
    first, second = (_judged, _rules) if judged else (_rules, None)

    def asr(read: Callable[[Mapping[str, Any]], Mapping[str, Any] | None]) -> str:
        text = _rate_text(read(best))
        if base is not None:
            text += f" (no defence {_rate_text(read(base), ci=False)})"
        return text

    text = f"{_condition(best)}: attack success {asr(first)}"
    text += f" by {judge if judged else rules_name}"
    over = _rate_text(dig(best, "metrics", "benign", "over_refusal"), ci=False)
    text += f", over-refusal {over}"
    if base is not None:
        text += (
            f" (no defence {_rate_text(dig(base, 'metrics', 'benign', 'over_refusal'), ci=False)})"
        )
    if second is not None:
        text += f"; rules judge {rules_name}: attack success {asr(second)}"
    if not within:
        text += f"; no defence stayed within {budget:.0%} added over-refusal"
    return text


# --------------------------------------------------------------------------- the lines


def _budget(root: Path) -> float:
    try:
        config = read_json_optional(root / "config.json", "run config")
    except _UNREADABLE:
        return DEFAULT_BUDGET
    value = _num(dig(config, "config", "eval", "max_overrefusal_increase"))
    return DEFAULT_BUDGET if value is None else value


@dataclass(frozen=True)
class _Source:
    label: str
    relative: str
    what: str
    stage: str


_SAE = _Source("SAE quality", "sae/eval/eval.json", "SAE evaluation", "eval-sae")
_METRICS = _Source(
    "best explanations", "explanations/metrics.json", "explanation metrics", "explain-metrics"
)
_SCORES = _Source("best defence", "eval/scores.json", "evaluation scores", "eval")


def _headline(
    root: Path, source: _Source, render: Callable[[dict[str, Any]], str | None]
) -> Headline:
    label, relative, stage = source.label, source.relative, source.stage
    try:
        data = read_json_optional(root / relative, source.what)
        if data is None:
            return Headline(label, missing=f"{relative} (stage {stage})")
        text = render(data)
    except _UNREADABLE as exc:
        return Headline(label, missing=f"{relative} is unreadable: {exc}")
    if text is None:
        return Headline(label, missing=f"nothing scored in {relative} (stage {stage})")
    return Headline(label, text)


def run_headlines(run_dir: str | Path) -> list[Headline]:
    """SAE quality, the best explanation method, the best defence (see the module docstring),
    each with its text or what is missing."""
    root = Path(run_dir)
    budget = _budget(root)
    return [
        _headline(root, _SAE, sae_text),
        _headline(root, _METRICS, explanations_text),
        _headline(root, _SCORES, lambda scores: defence_text(scores, budget)),
    ]


def _block(label: str, values: Sequence[str], width: int) -> list[str]:
    head = f"  {label + ':':<{width}} "
    return [head + values[0], *(" " * len(head) + v for v in values[1:])]


def summary_lines(run_dir: str | Path) -> list[str]:
    """The terminal summary of the run in ``run_dir``: its headline numbers, the files to
    open, and what is missing (never raises on a partial run)."""
    root = Path(run_dir)
    headlines = run_headlines(root)
    files = [str(root / rel) for rel, _ in OPEN_FILES if (root / rel).is_file()]
    missing = [f"{h.label}: {h.missing}" for h in headlines if h.missing is not None]
    missing += [f"{rel} (stage {stage})" for rel, stage in OPEN_FILES if not (root / rel).is_file()]
    width = max(len(h.label) for h in headlines) + 1
    lines = [f"summary of {root}"]
    for h in headlines:
        if h.text is not None:
            lines += _block(h.label, [h.text], width)
    if files:
        lines += _block("open", files, width)
    if missing:
        lines += _block("missing", missing, width)
    return lines
