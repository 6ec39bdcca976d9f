"""The run report: one self-contained ``report.html`` for a run directory.

Inline CSS, inline SVG charts (drawn here, or the evaluation's trade-off SVGs embedded as
``data:`` images, which a browser renders without running scripts or fetching anything), no
external resource of any kind: open it from disk. Every text that comes from a user, a data set
or a model is escaped.

Sections, each "not run" when its input is missing (a malformed input is an error naming the
file): the headline numbers ("at a glance", :mod:`steerlex.report.headline`); run summary and
provenance (``config.json``, ``run.json``, the SAE's ``cfg.json``, the stores' ``index.json``);
SAE quality (``sae/eval/eval.json``, the firing-frequency histogram on log10 bins with the dead
latents apart); explanations of the same features by every method side by side
(``explanations/*.jsonl``), most faithful first, after a panel on how good they are
(:mod:`steerlex.report.faithfulness`); explanation metrics (``explanations/metrics.json``); the
selected features with their evidence (``selected_*.json``); the defence tables and trade-off
plots (``eval/``); example conversations (``examples.json``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import steerlex
from steerlex.core.errors import ReportError
from steerlex.core.io import write_bytes_atomic
from steerlex.evaluate.run import results_table
from steerlex.explain.method import method_names
from steerlex.explain.run import read_explanations
from steerlex.plots import PALETTE, frequency_histogram
from steerlex.report.browser import BROWSER_FILE
from steerlex.report.common import FIX, NOT_RUN, dig, esc, page, read_json_optional
from steerlex.report.examples import EXAMPLES_FILE, read_examples
from steerlex.report.faithfulness import Ranking, faithfulness_ranking, quality_panel
from steerlex.report.headline import run_headlines
from steerlex.steer.select import FeatureSelection

__all__ = ["REPORT_FILE", "build_report", "markdown_table_html"]

REPORT_FILE = "report.html"
N_SIDE_BY_SIDE = 8
N_WORDS = 8
LEVELS = ("semantic", "lexical", "morphological", "unclear")


class Html(str):
    """A string that is already HTML (not escaped again by :func:`_cell`)."""


def _cell(value: object) -> str:
    if isinstance(value, Html):
        return value
    if value is None:
        return "–"
    if isinstance(value, float):
        return esc(_fmt(value))
    return esc(value)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 10**-digits):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def _row_attrs(attrs: Mapping[str, object] | None) -> str:
    return "".join(f' {esc(k)}="{esc(v)}"' for k, v in (attrs or {}).items())


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    cls: str = "",
    row_attrs: Sequence[Mapping[str, object]] | None = None,
) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    attrs = list(row_attrs or []) + [{}] * (len(rows) - len(row_attrs or []))
    body = "".join(
        f"<tr{_row_attrs(a)}>"
        + "".join(
            f'<td class="num">{_cell(v)}</td>'
            if isinstance(v, (int, float))
            else f"<td>{_cell(v)}</td>"
            for v in row
        )
        + "</tr>"
        for row, a in zip(rows, attrs, strict=False)
    )
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(rows: Sequence[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{_cell(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _not_run(what: str) -> str:
    return f'<p class="not-run">{esc(NOT_RUN)}: {esc(what)}</p>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def _feature_link(fid: int) -> Html:
    return Html(f'<a href="{BROWSER_FILE}#feature={int(fid)}">{int(fid)}</a>')


def _words(words: Sequence[str], n: int = N_WORDS) -> str:
    return ", ".join((w.strip() or "␣") for w in words[:n]) or "–"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def markdown_table_html(markdown: str) -> str:
    """A markdown pipe table (as :func:`steerlex.evaluate.run.results_table` writes) as an
    HTML table; every cell escaped."""
    lines = [ln.strip() for ln in markdown.strip().splitlines() if ln.strip().startswith("|")]
    rows = [
        [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln.strip("|"))]
        for ln in lines
    ]
    rows = [r for r in rows if not all(re.fullmatch(r":?-+:?", c) for c in r)]
    if not rows:
        return ""
    return _table(rows[0], rows[1:])


# --------------------------------------------------------------------------- SVG charts


def _svg_open(width: int, height: int) -> str:
    return (
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
        f'font-size="11"><rect x="0" y="0" width="{width}" height="{height}" fill="white"/>'
    )


def stacked_bars_svg(rows: Sequence[tuple[str, Mapping[str, float]]], keys: Sequence[str]) -> str:
    """Horizontal 100%-stacked bars, one per ``(label, {key: share})`` row, with a legend."""
    left, bar_h, gap, width = 90, 20, 8, 620
    plot_w = width - left - 20
    height = 34 + len(rows) * (bar_h + gap) + 20
    out = [_svg_open(width, height)]
    for i, key in enumerate(keys):
        lx = left + i * 130
        out.append(
            f'<rect x="{lx}" y="8" width="12" height="12" fill="{PALETTE[i % len(PALETTE)]}"/>'
        )
        out.append(f'<text x="{lx + 16}" y="18">{esc(key)}</text>')
    for r, (label, shares) in enumerate(rows):
        y = 34 + r * (bar_h + gap)
        out.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{esc(label)}</text>')
        total = sum(max(0.0, float(shares.get(k) or 0.0)) for k in keys) or 1.0
        x = float(left)
        for i, key in enumerate(keys):
            share = max(0.0, float(shares.get(key) or 0.0)) / total
            w = share * plot_w
            if w > 0:
                out.append(
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                    f'fill="{PALETTE[i % len(PALETTE)]}"><title>{esc(label)} {esc(key)}: '
                    f"{share:.0%}</title></rect>"
                )
                if w > 28:
                    out.append(
                        f'<text x="{x + w / 2:.1f}" y="{y + 14}" text-anchor="middle" '
                        f'fill="white">{share:.0%}</text>'
                    )
            x += w
    out.append("</svg>")
    return "".join(out)


def _svg_image(path: Path, alt: str) -> str:
    """An SVG file as a ``data:`` image: rendered like an image, so nothing in it can run or
    load anything."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReportError(f"Cannot read the plot {path} ({exc}); {FIX}") from None
    if b"<svg" not in data[:4096]:
        raise ReportError(f"The plot {path} is not an SVG file; {FIX}")
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img class="plot" alt="{esc(alt)}" src="data:image/svg+xml;base64,{b64}">'


# --------------------------------------------------------------------------- sections


def _glance(root: Path) -> str:
    """The run's headline numbers (:func:`steerlex.report.headline.run_headlines`)."""
    items = "".join(
        f"<li><strong>{esc(h.label)}</strong>: "
        + (esc(h.text) if h.text is not None else f'<span class="not-run">{esc(NOT_RUN)}: '
           f"{esc(h.missing)}</span>")
        + "</li>"
        for h in run_headlines(root)
    )  # fmt: skip
    return _section("glance", "At a glance", f'<div class="panel"><ul>{items}</ul></div>')


def _summary(root: Path) -> str:
    config = read_json_optional(root / "config.json", "run config")
    run = read_json_optional(root / "run.json", "run record")
    sae_cfg = read_json_optional(root / "sae" / "cfg.json", "SAE config")
    train = read_json_optional(root / "acts-train" / "index.json", "activation index")
    heldout = read_json_optional(root / "acts-heldout" / "index.json", "activation index")
    scores = read_json_optional(root / "eval" / "scores.json", "evaluation scores")
    sx = dig(sae_cfg, "metadata", "steerlex", "config") or {}
    model = (
        dig(config, "model")
        or sx.get("model_spec")
        or dig(train, "model", "spec")
        or dig(scores, "model", "spec")
    )
    weights = (
        sx.get("weights_id")
        or dig(train, "model", "weights_id")
        or dig(scores, "model", "weights_id")
    )
    layer = sx.get("layer", dig(config, "layer"))
    rows: list[tuple[str, object]] = [
        ("run name", dig(config, "name") or root.resolve().name),
        ("model", model),
        ("weights id", weights),
        ("layer", layer),
    ]
    if sae_cfg is not None:
        rows.append(
            (
                "SAE",
                f"{sae_cfg.get('architecture')} d_in={sae_cfg.get('d_in')} "
                f"d_sae={sae_cfg.get('d_sae')}"
                + (f" k={sae_cfg['k']}" if sae_cfg.get("k") is not None else "")
                + f" (hook {dig(sae_cfg, 'metadata', 'hf_hook_name')}), written by "
                + (
                    f"steerlex {dig(sae_cfg, 'metadata', 'steerlex', 'steerlex_version')}"
                    if dig(sae_cfg, "metadata", "steerlex") is not None
                    else "another tool"
                ),
            )
        )
    else:
        rows.append(("SAE", f"{NOT_RUN} (no sae/cfg.json)"))
    for name, index in (("training activations", train), ("held-out activations", heldout)):
        rows.append(
            (
                name,
                f"{index.get('n_tokens')} tokens from {index.get('n_texts')} texts, "
                f"{index.get('n_shards')} shards ({index.get('dtype')})"
                if index is not None
                else NOT_RUN,
            )
        )
    versions: dict[str, Any] = {"steerlex (this report)": steerlex.__version__}
    if train is not None:
        versions.update(
            {
                "steerlex (harvest)": train.get("steerlex_version"),
                "torch (harvest)": train.get("torch_version"),
                "transformers (harvest)": train.get("transformers_version"),
            }
        )
    rows.append(("versions", "; ".join(f"{k} {v}" for k, v in versions.items() if v)))
    parts = [_kv_table(rows)]
    parts.append("<h3>Stage timings</h3>")
    parts.append(_timings(run, root / "run.json"))
    if config is not None:
        parts.append(
            "<details><summary>Resolved run config (config.json)</summary><pre>"
            + esc(json_pretty(config))
            + "</pre></details>"
        )
    else:
        parts.append(_not_run("config.json is missing"))
    return _section("summary", "Run summary and provenance", "\n".join(parts))


def json_pretty(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)


def _timings(run: dict[str, Any] | None, path: Path) -> str:
    if run is None:
        return _not_run("run.json is missing (no stage timings)")
    stages = run.get("stages")
    if not isinstance(stages, Mapping):
        raise ReportError(f"The run record {path} has no 'stages' object; {FIX}")
    rows: list[list[object]] = []
    total = 0.0
    for name, rec in stages.items():
        if not isinstance(rec, Mapping):
            raise ReportError(f"The run record {path}: stage {name!r} is not an object; {FIX}")
        seconds = _num(rec.get("seconds"))
        total += seconds or 0.0
        rows.append([name, seconds, rec.get("finished")])
    rows.append([Html("<strong>total</strong>"), total, ""])
    return _table(["stage", "seconds", "finished"], rows)


def _sae_quality(root: Path) -> str:
    path = root / "sae" / "eval" / "eval.json"
    data = read_json_optional(path, "SAE evaluation")
    if data is None:
        return _section("sae", "SAE quality", _not_run("sae/eval/eval.json is missing (eval-sae)"))
    act = data.get("activation")
    if not isinstance(act, Mapping):
        raise ReportError(f"The SAE evaluation {path} has no 'activation' object; {FIX}")
    sp = data.get("spliced") if isinstance(data.get("spliced"), Mapping) else {}
    rows: list[list[object]] = [
        ["fraction of variance explained (FVE)", _num(act.get("fve")), "higher is better"],
        ["normalised MSE", _num(act.get("nmse")), "1 - FVE"],
        ["L0 (active latents per token)", _num(act.get("l0")), ""],
        [
            "dead latents",
            f"{act.get('n_dead')} ({_fmt(_num(act.get('dead_fraction')))})",
            "never fire",
        ],
        [
            "dense latents",
            f"{act.get('n_dense')} ({_fmt(_num(act.get('dense_fraction')))})",
            f"fire on > {act.get('dense_threshold')} of tokens",
        ],
        ["evaluated tokens", act.get("n_tokens"), "held-out store"],
    ]
    if sp:
        rows += [
            ["loss recovered vs zero ablation (%)", _num(sp.get("loss_recovered_zero")), ""],
            ["loss recovered vs mean ablation (%)", _num(sp.get("loss_recovered_mean")), ""],
            [
                "CE clean / with SAE (nats)",
                f"{_fmt(_num(sp.get('ce_clean')))} / {_fmt(_num(sp.get('ce_sae')))}",
                "",
            ],
            ["CE increase (nats)", _num(sp.get("ce_increase")), ""],
        ]
    parts = [_table(["metric", "value", "note"], rows)]
    if not sp:
        parts.append(
            f'<p class="note">{esc(data.get("spliced_note") or "spliced LM loss not computed")}</p>'
        )
    parts.append(_firing_histogram(act.get("firing_histogram"), path))
    for w in data.get("warnings") or []:
        parts.append(f'<p class="note">warning: {esc(w)}</p>')
    return _section("sae", "SAE quality", "\n".join(parts))


def _dead_phrase(n_dead: int) -> str:
    return (
        f"{n_dead} dead latent never fires" if n_dead == 1 else f"{n_dead} dead latents never fire"
    )


def _firing_histogram(hist: Any, path: Path) -> str:
    """The latents' firing-frequency histogram (log10 bins, dead latents apart), or a note."""
    if not isinstance(hist, Mapping):
        return '<p class="note">no firing-frequency histogram in the SAE evaluation.</p>'
    try:
        n_dead = int(hist.get("n_dead") or 0)
        return frequency_histogram(
            hist["log10_edges"],
            hist["counts"],
            n_dead,
            title=f"How often the latents fire ({_dead_phrase(n_dead)})",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportError(
            f"The SAE evaluation {path} has a malformed firing_histogram ({exc}); {FIX}"
        ) from None


def _read_all_explanations(root: Path) -> dict[str, dict[int, tuple[str, ...]]]:
    out: dict[str, dict[int, tuple[str, ...]]] = {}
    for method in method_names():
        path = root / "explanations" / f"{method}.jsonl"
        if path.is_file():
            out[method] = {e.feature: e.words for e in read_explanations(path)}
    return out


def _spread_features(
    explanations: Mapping[str, Mapping[int, Sequence[str]]], metrics: Mapping[str, Any] | None
) -> list[int]:
    """Without per-feature faithfulness: the sampled features (else features spread over the
    ids every method explains), in id order."""
    common = sorted(set.intersection(*(set(v) for v in explanations.values())))
    sampled = [int(f) for f in (dig(metrics, "features") or []) if isinstance(f, int)]
    chosen = [f for f in sampled if f in set(common)][:N_SIDE_BY_SIDE]
    if len(chosen) < N_SIDE_BY_SIDE and common:
        step = max(1, len(common) // N_SIDE_BY_SIDE)
        chosen += [f for f in common[::step] if f not in chosen][: N_SIDE_BY_SIDE - len(chosen)]
    return sorted(chosen)


def _words_table(
    features: Sequence[int],
    methods: Sequence[str],
    explanations: Mapping[str, Mapping[int, Sequence[str]]],
    ranking: Ranking | None,
    first_rank: int = 1,
) -> str:
    """The side-by-side table; with a ranking, a rank and the feature's AUROC lead each row
    (``tr[data-feature][data-faithfulness]``)."""
    words: list[list[object]] = [
        [_words(explanations[m].get(f, ())) for m in methods] for f in features
    ]
    if ranking is None:
        rows = [[_feature_link(f), *w] for f, w in zip(features, words, strict=True)]
        return _table(["feature", *methods], rows, cls="words")
    score = ranking.by_feature()
    rows = [
        [first_rank + i, _feature_link(f), Html(f'<span class="faith">{score[f]:.3f}</span>'), *w]
        for i, (f, w) in enumerate(zip(features, words, strict=True))
    ]
    attrs = [{"data-feature": f, "data-faithfulness": f"{score[f]:.6g}"} for f in features]
    return _table(
        ["#", "feature", ranking.label, *methods], rows, cls="words faithful", row_attrs=attrs
    )


def _ranked_tables(
    explanations: Mapping[str, Mapping[int, Sequence[str]]],
    methods: Sequence[str],
    ranking: Ranking,
) -> str:
    """The first :data:`N_SIDE_BY_SIDE` ranked features, then the rest in a collapsed table."""
    explained = set.intersection(*(set(explanations[m]) for m in methods))
    features = [f for f, _ in ranking.scores if f in explained]
    head, rest = features[:N_SIDE_BY_SIDE], features[N_SIDE_BY_SIDE:]
    out = _words_table(head, methods, explanations, ranking)
    if rest:
        out += (
            f"<details><summary>The other {len(rest)} scored features, most faithful first"
            "</summary>"
            + _words_table(rest, methods, explanations, ranking, first_rank=len(head) + 1)
            + "</details>"
        )
    return out


def _explanations(
    root: Path,
    explanations: Mapping[str, Mapping[int, Sequence[str]]],
    metrics: Mapping[str, Any] | None,
) -> str:
    if not explanations:
        return _section(
            "explanations",
            "Explanations side by side",
            _not_run("no explanations/<method>.jsonl (explain)"),
        )
    methods = [m for m in method_names() if m in explanations]
    missing = [m for m in method_names() if m not in explanations]
    ranking = faithfulness_ranking(metrics)
    not_run = f"; methods not run: {esc(', '.join(missing))}" if missing else ""
    if ranking is not None:
        order = (
            f"Most faithful features first: ranked by the per-feature {esc(ranking.side)}-side "
            f"AUROC of {esc(ranking.method)} (the method with the best mean; "
            "explanations/metrics.json), 0.5 = no better than random words."
        )
        table = _ranked_tables(explanations, methods, ranking)
    else:
        order = (
            "No per-feature faithfulness in explanations/metrics.json (explain-metrics not "
            "run), so the features are in id order."
        )
        table = _words_table(_spread_features(explanations, metrics), methods, explanations, None)
    note = (
        f'<p class="note">{order} {N_WORDS} top words per method{not_run}. Feature ids open '
        "the feature browser.</p>"
    )
    return _section(
        "explanations",
        "Explanations side by side",
        quality_panel(metrics, methods) + note + table,
    )


def _ci(d: Any, key: str = "auroc") -> str:
    mean, ci = _num(dig(d, f"{key}_mean")), dig(d, f"{key}_ci")
    if mean is None:
        return "–"
    if isinstance(ci, list) and len(ci) == 2 and all(_num(v) is not None for v in ci):
        return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{mean:.3f}"


def _summary_ci(d: Any) -> str:
    mean = _num(dig(d, "mean"))
    lo, hi = _num(dig(d, "ci_low")), _num(dig(d, "ci_high"))
    if mean is None:
        return "–"
    return f"{mean:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def _metrics(metrics: Mapping[str, Any] | None, path: Path) -> str:
    if metrics is None:
        return _section(
            "metrics",
            "Explanation metrics",
            _not_run("explanations/metrics.json is missing (explain-metrics)"),
        )
    methods = metrics.get("methods")
    if not isinstance(methods, list):
        raise ReportError(f"The explanation metrics {path} have no 'methods' list; {FIX}")
    n = len(metrics.get("features") or [])
    out_f, in_f = metrics.get("output_faithfulness") or {}, metrics.get("input_faithfulness") or {}
    faith = [
        [
            m,
            _ci(out_f.get(m)),
            _num(dig(out_f, m, "share_above_chance")),
            _num(dig(out_f, m, "extra", "lift_nats_mean")),
            _ci(in_f.get(m)),
            _num(dig(in_f, m, "share_above_chance")),
        ]
        for m in methods
    ]
    parts = [
        f'<p class="note">{n} sampled features; AUROC 0.5 = chance, with 95% confidence '
        "intervals. Output side: does steering the feature promote its words? Input side: do "
        "its words make it fire?</p>",
        "<h3>Faithfulness</h3>",
        _table(
            [
                "method",
                "output AUROC [95% CI]",
                "output share > chance",
                "output lift (nats)",
                "input AUROC [95% CI]",
                "input share > chance",
            ],
            faith,
        ),
        "<h3>Frequency bias</h3>",
    ]
    fb = metrics.get("frequency_bias") or {}
    if isinstance(fb, Mapping) and "skipped" in fb:
        parts.append(f'<p class="note">skipped: {esc(fb["skipped"])}</p>')
    else:
        sup = metrics.get("superficial_share") or {}
        rows = []
        for m in methods:
            summ = dig(fb, "methods", m, "summary")
            listed, vocab = _num(dig(sup, m, "listed_share")), _num(dig(sup, m, "vocab_share"))
            rows.append(
                [
                    m,
                    _summary_ci(dig(summ, "diversity")),
                    _summary_ci(dig(summ, "lexical")),
                    _summary_ci(dig(summ, "dominate")),
                    "–" if listed is None else f"{listed:.2f} (vocabulary {_fmt(vocab, 2)})",
                ]
            )
        parts.append(
            '<p class="note">Diversity ↑, Lexical ↓, Dominate ↓ (mean [95% CI] over equal-size '
            "feature subsets); superficial share: listed words that are function words, frequent, "
            "short or not alphabetic, against their share of the vocabulary.</p>"
        )
        parts.append(
            _table(["method", "Diversity ↑", "Lexical ↓", "Dominate ↓", "superficial share"], rows)
        )
    levels = metrics.get("levels")
    parts.append("<h3>Linguistic level of the explanations</h3>")
    if isinstance(levels, Mapping) and levels:
        bars = [
            (m, dig(levels, m, "shares") or {})
            for m in methods
            if isinstance(dig(levels, m, "shares"), Mapping)
        ]
        parts.append(stacked_bars_svg(bars, LEVELS))
    else:
        parts.append(_not_run("levels were not computed (explain-metrics with levels off)"))
    return _section("metrics", "Explanation metrics", "\n".join(parts))


def _evidence(details: Mapping[str, Any]) -> str:
    """What a selection method recorded as its grounds: the concept-matching words with their
    similarity (semantic), both group means (data), the judge's label (llm)."""
    evidence = details.get("evidence")
    if isinstance(evidence, list):
        pairs = [
            e for e in evidence if isinstance(e, list) and len(e) == 2 and _num(e[1]) is not None
        ]
        if pairs:
            return "matching words: " + ", ".join(f"{e[0]} ({float(e[1]):.2f})" for e in pairs)
    harmful, benign = _num(details.get("mean_harmful")), _num(details.get("mean_benign"))
    if harmful is not None and benign is not None:
        return f"mean activation {harmful:.3g} on harmful vs {benign:.3g} on benign prompts"
    if details.get("category") is not None:
        return f"judge label: {details['category']}"
    return "–"


def _selection_order(paths: Sequence[Path]) -> list[Path]:
    """The selection files, safety first (the features the defences steer), then by name."""
    return sorted(paths, key=lambda p: (p.stem != "selected_safety", p.name))


def _selected(root: Path, metrics: Mapping[str, Any] | None) -> str:
    paths = _selection_order(list(root.glob("selected_*.json")))
    if not paths:
        return _section(
            "selected", "Selected features", _not_run("no selected_<concept>.json (select)")
        )
    ranking = faithfulness_ranking(metrics)
    score = ranking.by_feature() if ranking is not None else {}
    faith_head = ranking.label if ranking is not None else "faithfulness"
    parts = [
        '<p class="note">Each feature with the evidence it was chosen for; its measured '
        'faithfulness where explain-metrics sampled it ("not sampled" otherwise).</p>'
    ]
    for path in paths:
        sel = FeatureSelection.load(path)
        c = sel.concept
        parts.append(f'<h3>{esc(c.name)} <span class="muted">({esc(path.name)})</span></h3>')
        parts.append(
            f'<p class="note">{esc(c.description)}. Method: {esc(sel.method)}, '
            f"{esc(sel.side)} side; seed words: {esc(', '.join(c.words))}.</p>"
        )
        rows = [
            [
                rank,
                _feature_link(f.id),
                f.score,
                f.reason,
                _evidence(f.details),
                score.get(f.id, "not sampled"),
                _words(f.words, 10),
            ]
            for rank, f in enumerate(sel.features, start=1)
        ]
        parts.append(
            _table(["#", "feature", "score", "reason", "evidence", faith_head, "words"], rows)
        )
    return _section("selected", "Selected features", "\n".join(parts))


def _defences(root: Path) -> str:

    path = root / "eval" / "scores.json"
    scores = read_json_optional(path, "evaluation scores")
    if scores is None:
        return _section("defences", "Defences", _not_run("eval/scores.json is missing (eval)"))
    try:
        headline = results_table(scores, headline_only=True)
        sweep = results_table(scores, headline_only=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportError(
            f"The evaluation scores {path} are not what `steerlex eval` writes ({exc!r}); {FIX}"
        ) from None
    model = dig(scores, "model") or {}
    counts = dig(scores, "sets", "counts", "test")
    if isinstance(counts, Mapping):
        counts = ", ".join(f"{v} {k}" for k, v in counts.items())
    parts = [
        f'<p class="note">Model {esc(model.get("spec"))}, layer {esc(scores.get("layer"))}; '
        f"judges: {esc(dig(scores, 'judges', 'rules'))}"
        + (f" and {esc(dig(scores, 'judges', 'judge'))}" if dig(scores, "judges", "judge") else "")
        + f"; test prompts: {esc(counts)}.</p>",
        "<h3>Headline (test split; strengths chosen on the selection split)</h3>",
        markdown_table_html(headline),
        "<h3>Strength choice</h3><ul>",
    ]
    chosen = dig(scores, "tuning", "chosen") or {}
    for name, rec in chosen.items():
        st = dig(rec, "strength")
        parts.append(
            f"<li>{esc(name)}: {esc('–' if st is None else st)} ({esc(dig(rec, 'why'))})</li>"
        )
    parts.append("</ul>")
    parts.append(
        "<details><summary>Every sweep point</summary>" + markdown_table_html(sweep) + "</details>"
    )
    counting = scores.get("counting")
    if isinstance(counting, Mapping):
        items = "".join(
            f"<li><strong>{esc(k)}</strong>: {esc(v)}</li>" for k, v in counting.items()
        )
        parts.append(
            f"<details><summary>How replies are counted</summary><ul>{items}</ul></details>"
        )
    plots = []
    for name, alt in (
        ("tradeoff_overrefusal.svg", "attack success vs over-refusal"),
        ("tradeoff_kl.svg", "attack success vs KL"),
    ):
        p = root / "eval" / name
        plots.append(_svg_image(p, alt) if p.is_file() else _not_run(f"eval/{name} is missing"))
    parts.append("<h3>Trade-offs</h3>" + "\n".join(plots))
    return _section("defences", "Defences", "\n".join(parts))


def _marked_reply(side: Mapping[str, Any], features: Sequence[int]) -> str:
    tokens, acts = side.get("tokens"), side.get("activations")
    if not isinstance(tokens, list) or not isinstance(acts, list) or len(tokens) != len(acts):
        return f'<div class="tokens">{esc(side.get("reply", ""))}</div>'
    top = max([max(row) for row in acts if row] + [0.0]) or 1.0
    out = []
    for tok, row in zip(tokens, acts, strict=True):
        fired = [(f, a) for f, a in zip(features, row, strict=False) if a > 0]
        if fired:
            alpha = min(1.0, 0.2 + 0.8 * max(a for _, a in fired) / top)
            title = ", ".join(f"feature {f}: {a:.3g}" for f, a in fired)
            out.append(
                f'<mark style="background: rgba(255, 140, 0, {alpha:.2f})" '
                f'title="{esc(title)}">{esc(tok)}</mark>'
            )
        else:
            out.append(esc(tok))
    return f'<div class="tokens">{"".join(out)}</div>'


def _badges(judges: Any) -> str:
    if not isinstance(judges, Mapping) or not judges:
        return ""
    return "".join(
        f'<span class="badge {esc(label)}">{esc(name)}: {esc(label)}</span>'
        for name, label in judges.items()
    )


def _examples(root: Path) -> str:
    path = root / EXAMPLES_FILE
    if not path.exists():
        return _section("examples", "Example conversations", _not_run("examples.json is missing"))
    examples = read_examples(path)
    if not examples:
        return _section(
            "examples",
            "Example conversations",
            '<p class="note">No test prompt had replies both without a defence and with the '
            "steering defence.</p>",
        )
    parts = [
        '<p class="note">Marked tokens: a selected feature fires on them (the model\'s own '
        "residual stream, teacher-forced, before any steering edit); hover for the values. "
        "Prompts whose rules-judge label changed were chosen first (then a fixed order).</p>"
    ]
    for i, ex in enumerate(examples, start=1):
        features = [int(f) for f in ex.get("features") or []]
        st = ex.get("strength")
        defence = str(ex.get("defence"))
        if isinstance(st, (int, float)):
            defence += f" @ {st:g}"
        feats = ", ".join(_feature_link(f) for f in features) or "–"
        parts.append(
            f"<h3>{i}. {esc(ex.get('prompt_kind', ''))} prompt "
            f'<span class="muted">{esc(ex.get("prompt_id", ""))}</span></h3>'
            f'<p class="note">{esc(ex.get("chosen_because", ""))}; features: {feats}</p>'
            f'<div class="prompt">{esc(ex.get("prompt", ""))}</div>'
            '<div class="conv">'
            f"<div><h4>Without a defence {_badges(dig(ex, 'unsteered', 'judges'))}</h4>"
            f"{_marked_reply(ex['unsteered'], features)}</div>"
            f"<div><h4>With {esc(defence)} {_badges(dig(ex, 'steered', 'judges'))}</h4>"
            f"{_marked_reply(ex['steered'], features)}</div></div>"
        )
    return _section("examples", "Example conversations", "\n".join(parts))


# --------------------------------------------------------------------------- the page


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the self-contained report for ``run_dir`` (default ``run_dir/report.html``) and
    return its path.

    Raises:
        SteerlexError: a malformed input file (the message names it).
    """
    root = Path(run_dir)
    target = Path(out) if out is not None else root / REPORT_FILE
    metrics_path = root / "explanations" / "metrics.json"
    metrics = read_json_optional(metrics_path, "explanation metrics")
    explanations = _read_all_explanations(root)
    sections: list[Callable[[], str]] = [
        lambda: _glance(root),
        lambda: _summary(root),
        lambda: _sae_quality(root),
        lambda: _explanations(root, explanations, metrics),
        lambda: _metrics(metrics, metrics_path),
        lambda: _selected(root, metrics),
        lambda: _defences(root),
        lambda: _examples(root),
    ]
    name = str(
        dig(read_json_optional(root / "config.json", "run config"), "name") or root.resolve().name
    )
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    browser = f'<a href="{BROWSER_FILE}">feature browser</a>'
    toc = " · ".join(
        f'<a href="#{sid}">{esc(t)}</a>'
        for sid, t in (
            ("glance", "at a glance"),
            ("summary", "summary"),
            ("sae", "SAE quality"),
            ("explanations", "explanations"),
            ("metrics", "metrics"),
            ("selected", "selected features"),
            ("defences", "defences"),
            ("examples", "examples"),
        )
    )
    body = (
        f"<main><h1>steerlex run report: {esc(name)}</h1>"
        f'<p class="muted">Generated {esc(now)} by steerlex {esc(steerlex.__version__)} · '
        f"{browser} · {toc}</p>\n" + "\n".join(section() for section in sections) + "</main>"
    )
    write_bytes_atomic(target, page(f"steerlex report: {name}", body).encode("utf-8"))
    return target
