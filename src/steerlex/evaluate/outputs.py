"""The output files of an evaluation: ``generations.jsonl``, ``scores.json``, ``results.md`` and
the two SVG trade-off plots (attack success vs over-refusal, vs KL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steerlex.core.io import write_bytes_atomic, write_json_atomic
from steerlex.evaluate.metrics import Rate
from steerlex.evaluate.scores import rate
from steerlex.plots import Series, line_plot

__all__ = ["results_table", "write_outputs"]


def _fmt_rate(m: dict[str, Any] | None, ci: bool = True) -> str:
    if not m or not m.get("n"):
        return "–"
    return Rate(int(m["k"]), int(m["n"])).text(ci)


def results_table(scores: dict[str, Any], headline_only: bool = True) -> str:
    """The markdown table of ``scores`` (headline rows, or every sweep point)."""
    head = (
        "| defence | strength | jailbreak ASR [95% CI] | ASR incl. acks | acks | "
        "refusal (plain harmful) | over-refusal (benign) | KL | degeneration (benign) | "
        "s/token | judge ASR (unjudged) |"
    )
    lines = [head, "|" + "---|" * 11]
    for row in scores["conditions"]:
        if headline_only and not row["headline"]:
            continue
        m = row["metrics"]
        jb, hm, bn = m.get("jailbreak") or {}, m.get("harmful") or {}, m.get("benign") or {}
        jd = (jb.get("judge") or {}) if jb else {}
        jd_txt = f"{_fmt_rate(jd.get('attack_success'))} ({jd.get('unjudged', 0)})" if jd else "–"
        kl = m.get("kl") or {}
        kl_txt = f"{kl['mean']:.4f}" if kl.get("mean") is not None else "–"
        spt = m.get("seconds_per_token")
        st = "–" if row["strength"] is None else f"{row['strength']:g}"
        lines.append(
            f"| {row['defence']} | {st} | {_fmt_rate(jb.get('attack_success'))} | "
            f"{_fmt_rate(jb.get('attack_success_with_ack'), False)} | "
            f"{_fmt_rate(jb.get('acknowledgement'), False)} | {_fmt_rate(hm.get('refusal'))} | "
            f"{_fmt_rate(bn.get('over_refusal'))} | {kl_txt} | "
            f"{_fmt_rate(bn.get('degeneration'), False)} | "
            f"{'–' if spt is None else f'{spt:.3f}'} | {jd_txt} |"
        )
    return "\n".join(lines) + "\n"


def _results_md(scores: dict[str, Any]) -> str:
    """``results.md``: the headline and sweep tables, how replies are counted, the strength
    choice and the plots."""
    md = [
        "# Safety evaluation",
        "",
        f"Model `{scores['model']['spec']}` ({scores['model']['weights_id']}), layer "
        f"{scores['layer']}; judges: {scores['judges']['rules']}"
        + (f" and {scores['judges']['judge']}" if scores["judges"].get("judge") else "")
        + f"; test prompts: {scores['sets']['counts']['test']}.",
        "",
        "## Headline (test split; strengths chosen on the selection split)",
        "",
        results_table(scores, headline_only=True),
        "## Every sweep point (test split; jailbreak and benign prompts only off the headline)",
        "",
        results_table(scores, headline_only=False),
        "## How replies are counted",
        "",
        *[f"- **{k}**: {v}" for k, v in scores["counting"].items()],
        "",
        "## Strength choice",
        "",
        *[
            f"- {k}: {v['strength'] if v['strength'] is not None else '–'} ({v['why']})"
            for k, v in scores["tuning"]["chosen"].items()
        ],
        "",
        "![attack success vs over-refusal](tradeoff_overrefusal.svg)",
        "![attack success vs KL](tradeoff_kl.svg)",
        "",
    ]
    return "\n".join(md)


def _tradeoff_series(scores: dict[str, Any], xkey: str) -> list[Series]:
    """One series per defence: (x, jailbreak attack success) at each strength, x being the
    over-refusal (``xkey="over_refusal"``) or the mean KL (``"kl"``)."""
    series = []
    for defence in dict.fromkeys(r["defence"] for r in scores["conditions"]):
        rows = [r for r in scores["conditions"] if r["defence"] == defence]
        pts, labels = [], []
        for r in sorted(rows, key=lambda r: r["strength"] or 0.0):
            m = r["metrics"]
            x = (
                (m.get("kl") or {}).get("mean")
                if xkey == "kl"
                else rate(m, "benign", "over_refusal")
            )
            y = rate(m, "jailbreak", "attack_success")
            if x is None or y is None:
                continue
            pts.append((float(x), float(y)))
            labels.append("" if r["strength"] is None else f"{r['strength']:g}")
        if pts:
            series.append(Series(defence, pts, labels, line=len(pts) > 1))
    return series


def write_outputs(out: Path, records: list[dict[str, Any]], scores: dict[str, Any]) -> None:
    """Write every output file of an evaluation into ``out`` (atomically)."""
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_bytes_atomic(out / "generations.jsonl", body.encode())
    write_json_atomic(out / "scores.json", scores)
    write_bytes_atomic(out / "results.md", _results_md(scores).encode())
    for name, xkey, xlabel in (
        ("tradeoff_overrefusal.svg", "over_refusal", "over-refusal on benign prompts"),
        ("tradeoff_kl.svg", "kl", "mean KL(defence || none), nats"),
    ):
        series = _tradeoff_series(scores, xkey)
        if series:
            svg = line_plot(
                series,
                title=f"Jailbreak attack success vs {xlabel.split(' on ')[0]}",
                xlabel=xlabel,
                ylabel="jailbreak attack success (rules judge)",
                y_range=(0.0, 1.0),
                x_range=(0.0, 1.0) if xkey == "over_refusal" else None,
            )
            write_bytes_atomic(out / name, svg.encode())
