"""The static feature browser: one self-contained ``browser.html`` for a run directory.

Everything the page shows is embedded in it as JSON (``<script type="application/json"
id="data">``) and drawn by a small vanilla-JavaScript program in the same file: no server, no
network, no external scripts, fonts or styles. Open it straight from disk.

What it reads from the run directory (each optional; a missing one is shown as "not run"):
``features.json`` (:func:`steerlex.report.features.feature_stats`), ``explanations/<method>.jsonl``,
``explanations/metrics.json`` (per-feature faithfulness) and ``selected_<concept>.json``. The
built-in concepts come from :mod:`steerlex.steer.concepts`.

The start page (an empty query) leads with the most faithful features (ranked as in the
report, :func:`steerlex.report.faithfulness.faithfulness_ranking`, the AUROC beside each:
``#faithful .result[data-feature][data-faithfulness]``), then the selections with the evidence
of their best features, then the concepts.

Routes (linkable): ``#q=WORD`` searches, ``#feature=ID`` shows a feature. Queries: a word
(matched, case-insensitively and without surrounding punctuation, against every method's words
and LogitLens tokens; a prefix match when nothing matches exactly), a number (that feature),
``concept:NAME`` (or just a concept's name: features whose words include any of the concept's
seed words) and ``selected:NAME`` (the features selected for that concept, best first).
Stable hooks for tests: ``#search``, ``.result[data-feature]``, ``#feature-title``,
``.method-words[data-method] .word .w``, ``.context mark``, ``#histogram svg``,
``#feature-selected``, ``#faithful``, ``#feature-faithfulness``.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any

import steerlex
from steerlex.core.io import write_bytes_atomic
from steerlex.explain.method import EXPLANATION_METHODS, method_names
from steerlex.explain.metrics import ranked_features
from steerlex.explain.run import read_explanations
from steerlex.report.common import (
    NOT_RUN,
    esc,
    json_for_script,
    page,
    read_json_optional,
)
from steerlex.report.faithfulness import SIDES, faithfulness_ranking
from steerlex.report.features import STATS_FILE, read_feature_stats
from steerlex.steer.concepts import PRESETS
from steerlex.steer.select import FeatureSelection

__all__ = ["BROWSER_FILE", "browser_data", "build_browser"]

BROWSER_FILE = "browser.html"


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def _run_name(run_dir: Path) -> str:
    config = read_json_optional(run_dir / "config.json", "run config") or {}
    name = config.get("name")
    return str(name) if isinstance(name, str) and name else run_dir.resolve().name


def _explanation_words(
    run_dir: Path, n_words: int
) -> tuple[list[str], dict[int, dict[str, list[list[Any]]]]]:
    """Methods found, and per feature ``{method: [[word, score], ...]}``."""
    found: list[str] = []
    words: dict[int, dict[str, list[list[Any]]]] = {}
    for method in method_names():
        path = run_dir / "explanations" / f"{method}.jsonl"
        if not path.is_file():
            continue
        found.append(method)
        for e in read_explanations(path):
            scores = list(e.scores) + [None] * (len(e.words) - len(e.scores))
            words.setdefault(e.feature, {})[method] = [
                [w, None if s is None else _round(s)]
                for w, s in zip(e.words[:n_words], scores[:n_words], strict=True)
            ]
    return found, words


def _selections(run_dir: Path) -> dict[str, FeatureSelection]:
    out = {}
    for path in sorted(run_dir.glob("selected_*.json")):
        selection = FeatureSelection.load(path)
        out[path.stem.removeprefix("selected_")] = selection
    return out


def _concepts(selections: dict[str, FeatureSelection]) -> dict[str, dict[str, Any]]:
    concepts = {
        name: {"description": c.description, "words": list(c.words), "builtin": True}
        for name, c in PRESETS.items()
    }
    for sel in selections.values():
        c = sel.concept
        if c.name not in concepts and c.words:
            concepts[c.name] = {"description": c.description, "words": list(c.words)}
    return concepts


def _stats_record(rec: dict[str, Any]) -> dict[str, Any]:
    contexts = [
        {
            "tokens": c.get("tokens") or [],
            "acts": c.get("acts") or [],
            "focus": c.get("focus"),
            "activation": c.get("activation"),
            "source": c.get("source"),
            "text_id": c.get("text_id"),
        }
        for c in rec.get("contexts") or []
    ]
    return {
        "count": rec.get("count"),
        "freq": rec.get("frequency"),
        "max": rec.get("max"),
        "hist_range": rec.get("hist_range"),
        "hist": rec.get("hist") or [],
        "contexts": contexts,
    }


#: Features the start page lists, most faithful first.
N_FAITHFUL = 20


def _faithfulness(
    run_dir: Path, features: dict[int, dict[str, Any]]
) -> tuple[dict[str, Any] | None, str | None]:
    """The start page's ranking (``None`` and a note without per-feature metrics); every
    scored feature gets ``faith: {method: {side: AUROC}}``."""
    metrics = read_json_optional(run_dir / "explanations" / "metrics.json", "explanation metrics")
    for side in SIDES:
        block = (metrics or {}).get(f"{side}_faithfulness")
        for method in block if isinstance(block, dict) else {}:
            for fid, value in ranked_features(metrics or {}, method, side):
                faith = features.setdefault(fid, {}).setdefault("faith", {})
                faith.setdefault(method, {})[side] = _round(value)
    ranking = faithfulness_ranking(metrics)
    if ranking is None:
        what = "is missing" if metrics is None else "has no per-feature AUROCs"
        return None, f"{NOT_RUN}: explanations/metrics.json {what} (explain-metrics)"
    return {
        "method": ranking.method,
        "side": ranking.side,
        "label": ranking.label,
        "ranked": [[f, _round(v)] for f, v in ranking.scores],
    }, None


def browser_data(run_dir: str | Path, *, n_words: int = 20) -> dict[str, Any]:
    """The JSON the browser page embeds (see the module docstring for what is read).

    Raises:
        SteerlexError: a file that exists but is malformed (the message names it).
    """
    root = Path(run_dir)
    methods, words = _explanation_words(root, n_words)
    stats_path = root / STATS_FILE
    stats = read_feature_stats(stats_path) if stats_path.exists() else None
    selections = _selections(root)
    features: dict[int, dict[str, Any]] = {}
    if stats is not None:
        for rec in stats["features"]:
            features[int(rec["id"])] = _stats_record(rec)
    for fid, by_method in words.items():
        features.setdefault(fid, {})["words"] = by_method
    selected: dict[str, list[int]] = {}
    for name, sel in selections.items():
        selected[name] = sel.ids
        for rank, f in enumerate(sel.features, start=1):
            features.setdefault(f.id, {}).setdefault("selected", []).append(
                {"concept": name, "rank": rank, "score": _round(f.score), "reason": f.reason}
            )
    selected = dict(sorted(selected.items(), key=lambda kv: (kv[0] != "safety", kv[0])))
    faithfulness, faith_note = _faithfulness(root, features)
    notes = {
        "faithfulness": faith_note,
        "stats": None
        if stats is not None
        else f"{NOT_RUN}: {STATS_FILE} is missing (feature statistics not computed)",
        "explanations": None
        if methods
        else f"{NOT_RUN}: no explanations/<method>.jsonl in the run directory",
        "selected": None if selections else f"{NOT_RUN}: no selected_<concept>.json",
        "contexts": None if stats is None else stats.get("contexts_note"),
    }
    return {
        "title": _run_name(root),
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "steerlex_version": steerlex.__version__,
        "methods": methods,
        "method_labels": {m: EXPLANATION_METHODS.get(m).label or m for m in methods},
        "n_tokens": None if stats is None else stats.get("n_tokens"),
        "n_features": len(features),
        "features": {str(k): features[k] for k in sorted(features)},
        "concepts": _concepts(selections),
        "selected": selected,
        "faithfulness": faithfulness,
        "n_faithful": N_FAITHFUL,
        "notes": notes,
    }


def build_browser(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the self-contained feature browser for ``run_dir`` (default
    ``run_dir/browser.html``) and return its path.

    Raises:
        SteerlexError: a malformed input file (the message names it).
    """
    root = Path(run_dir)
    target = Path(out) if out is not None else root / BROWSER_FILE
    data = browser_data(root)
    parts = {"TITLE": esc(data["title"]), "DATA": json_for_script(data), "SCRIPT": SCRIPT}
    body = re.sub(r"\{\{(TITLE|DATA|SCRIPT)\}\}", lambda m: parts[m.group(1)], BODY)
    text = page(f"steerlex features: {data['title']}", body, extra_head=f"<style>{CSS}</style>\n")
    write_bytes_atomic(target, text.encode("utf-8"))
    return target


CSS = """
header.bar { position: sticky; top: 0; background: white; border-bottom: 1px solid var(--line);
             padding: 10px 24px; display: flex; gap: 16px; align-items: center; z-index: 2; }
header.bar h1 { font-size: 1.1em; margin: 0; white-space: nowrap; }
#search { flex: 1; max-width: 520px; font-size: 1em; padding: 6px 10px; border: 1px solid #bbb;
          border-radius: 4px; }
#status { color: var(--muted); font-size: 0.9em; }
.result { display: block; padding: 8px 10px; border: 1px solid var(--line); border-radius: 4px;
          margin: 6px 0; text-decoration: none; color: inherit; }
.result:hover { background: var(--bg2); }
.result .rid { font-weight: 600; color: var(--accent); margin-right: 8px; }
.result .why { color: var(--muted); font-size: 0.85em; }
.method-words { margin: 6px 0 12px; }
.method-words h3 { margin: 0 0 4px; font-size: 0.95em; }
.word { display: inline-block; margin: 2px 4px 2px 0; padding: 1px 6px; background: var(--bg2);
        border-radius: 3px; font-size: 0.88em; }
.word .score { color: var(--muted); font-size: 0.8em; margin-left: 3px; }
.context { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace;
           font-size: 0.85em; background: var(--bg2); padding: 6px 8px; margin: 6px 0;
           border-radius: 4px; }
.context .cmeta { color: var(--muted); font-size: 0.85em; display: block; margin-bottom: 2px; }
.context mark.focus { outline: 1px solid #b35c00; }
.selected-box { border: 1px solid #9fd3a8; background: #eefaf0; padding: 6px 10px;
                border-radius: 4px; margin: 8px 0; }
.grid2 { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 24px; }
nav.pager a { margin-right: 12px; }
"""

BODY = """<header class="bar"><h1>steerlex · {{TITLE}}</h1>
<input id="search" type="search" autocomplete="off" spellcheck="false"
 placeholder="word, feature id, concept:safety, selected:harm">
<span id="status"></span></header>
<main>
<div id="results-view"><p id="results-info"></p><div id="results"></div></div>
<div id="feature-view" hidden>
 <nav class="pager"><a id="back" href="#q=">&larr; results</a><a id="prev" href="#">&lsaquo; previous</a>
 <a id="next" href="#">next &rsaquo;</a></nav>
 <h2 id="feature-title"></h2>
 <div id="feature-selected"></div>
 <div class="grid2">
  <div><h3>Explanations</h3><div id="feature-faithfulness"></div><div id="explanations"></div>
   <h3>Top-activating contexts</h3><div id="contexts"></div></div>
  <div><h3>Activation</h3><div id="feature-stats"></div><div id="histogram"></div></div>
 </div>
</div>
</main>
<script type="application/json" id="data">{{DATA}}</script>
<script>{{SCRIPT}}</script>"""

SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const FEATURES = DATA.features;
const IDS = Object.keys(FEATURES).map(Number).sort((a, b) => a - b);
const $ = (id) => document.getElementById(id);
let lastQuery = "";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function norm(w) {
  return String(w).toLowerCase().trim().replace(/^[^\p{L}\p{N}]+|[^\p{L}\p{N}]+$/gu, "");
}

// word -> [[feature id, method, rank], ...]
const INDEX = new Map();
for (const id of IDS) {
  const words = FEATURES[id].words || {};
  for (const [method, list] of Object.entries(words)) {
    list.forEach(([w], rank) => {
      const key = norm(w);
      if (!key) return;
      if (!INDEX.has(key)) INDEX.set(key, []);
      INDEX.get(key).push([id, method, rank]);
    });
  }
}

function fmtPct(x) {
  if (x === null || x === undefined) return "–";
  return (100 * x).toPrecision(3) + "%";
}
function fmtAuc(x) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(3);
}
function fmtNum(x) {
  if (x === null || x === undefined) return "–";
  return Number(x).toPrecision(4);
}

function collect(keys) {
  // keys: normalized words; returns ranked [{id, score, why: Set}]
  const hits = new Map();
  for (const key of keys) {
    for (const [id, method, rank] of INDEX.get(key) || []) {
      if (!hits.has(id)) hits.set(id, {id: id, score: 0, methods: new Set(), words: new Set()});
      const h = hits.get(id);
      h.score += 1 / (rank + 1);
      h.methods.add(method);
      h.words.add(key);
    }
  }
  return [...hits.values()].sort((a, b) =>
    b.methods.size - a.methods.size || b.score - a.score || a.id - b.id);
}

function search(q) {
  const raw = q.trim();
  if (!raw) return {info: "Type a word, a feature id, concept:NAME or selected:NAME.", items: null};
  const lower = raw.toLowerCase();
  if (/^#?\d+$/.test(raw)) {
    const id = Number(raw.replace("#", ""));
    return {info: FEATURES[id] ? "Feature " + id : "No feature " + id + " in this run.",
            items: FEATURES[id] ? [{id: id, why: "feature id"}] : []};
  }
  if (lower.startsWith("selected:")) {
    const name = lower.slice(9).trim();
    const ids = DATA.selected[name];
    if (!ids) {
      const have = Object.keys(DATA.selected);
      return {info: "No selection '" + name + "'" + (have.length ? "; this run has: " +
              have.map((n) => "selected:" + n).join(", ") : "; " + (DATA.notes.selected || "")),
              items: []};
    }
    return {info: ids.length + " features selected for '" + name + "', best first.",
            items: ids.map((id, i) => ({id: id, why: "selected #" + (i + 1) + ": " +
              ((FEATURES[id].selected || []).find((s) => s.concept === name) || {}).reason}))};
  }
  let concept = null;
  if (lower.startsWith("concept:")) concept = lower.slice(8).trim();
  else if (DATA.concepts[lower]) concept = lower;
  if (concept !== null) {
    const c = DATA.concepts[concept];
    if (!c) return {info: "Unknown concept '" + concept + "'; concepts: " +
                    Object.keys(DATA.concepts).join(", "), items: []};
    const hits = collect(c.words.map(norm));
    return {info: hits.length + " features whose words include a seed word of the concept '" +
            concept + "' (" + c.words.join(", ") + ")",
            items: hits.map((h) => ({id: h.id, why: "words: " + [...h.words].join(", ") +
              " · in " + [...h.methods].join(", ")}))};
  }
  const key = norm(raw);
  let hits = collect([key]);
  let how = "exactly";
  if (!hits.length && key.length >= 3) {
    hits = collect([...INDEX.keys()].filter((k) => k.startsWith(key)));
    how = "by prefix";
  }
  return {info: hits.length + " features whose words match '" + raw + "' " + how,
          items: hits.map((h) => ({id: h.id, why: "in " + [...h.methods].join(", ") +
            (how === "exactly" ? "" : " · " + [...h.words].join(", "))}))};
}

function preview(id, prefer) {
  const words = FEATURES[id].words || {};
  const method = (prefer && words[prefer]) ? prefer : (DATA.methods.find((m) => words[m]) || null);
  if (!method) return "";
  return method + ": " + words[method].slice(0, 8).map((p) => p[0].trim()).join(", ");
}

function showResults(q) {
  $("feature-view").hidden = true;
  $("results-view").hidden = false;
  lastQuery = q;
  $("back").setAttribute("href", "#q=" + encodeURIComponent(q));
  if ($("search").value !== q && document.activeElement !== $("search")) $("search").value = q;
  const res = search(q);
  $("results-info").textContent = res.info;
  const box = $("results");
  box.replaceChildren();
  if (res.items === null) {
    startPage(box);
    return;
  }
  for (const item of res.items.slice(0, 300)) {
    if (!FEATURES[item.id]) continue;
    box.append(resultLink(item.id, item.why));
  }
  if (res.items.length > 300) box.append(el("p", {class: "note"}, "… " + (res.items.length - 300) + " more"));
}

function resultLink(id, why, attrs, method) {
  return el("a", Object.assign({class: "result", href: "#feature=" + id, "data-feature": id}, attrs || {}),
    el("span", {class: "rid"}, "Feature " + id),
    el("span", {class: "why"}, why || ""), el("br"),
    el("span", {class: "words"}, preview(id, method)));
}

function startPage(box) {
  const faith = DATA.faithfulness;
  const lead = el("div", {id: "faithful"});
  if (faith) {
    const shown = faith.ranked.filter(([id]) => FEATURES[id]).slice(0, DATA.n_faithful);
    lead.append(el("h2", {}, "Most faithful explanations"),
      el("p", {class: "note"}, "The " + shown.length + " of " + faith.ranked.length +
        " scored features whose " + faith.method + " explanations are the most faithful (" +
        faith.label + ", 0.5 = no better than random words), best first."));
    for (const [id, auroc] of shown) {
      lead.append(resultLink(id, faith.label + " " + Number(auroc).toFixed(3),
        {"data-faithfulness": auroc}, faith.method));
    }
  } else {
    lead.append(el("p", {class: "not-run"}, DATA.notes.faithfulness));
  }
  box.append(lead);
  for (const [name, ids] of Object.entries(DATA.selected)) {
    box.append(el("h2", {}, "Selected for steering: " + name),
      el("p", {}, el("a", {href: "#q=" + encodeURIComponent("selected:" + name)},
        "selected:" + name), " (" + ids.length + (ids.length === 1 ? " feature" : " features") +
        "; the best, with the evidence they were chosen for)"));
    for (const id of ids.slice(0, 5)) {
      if (!FEATURES[id]) continue;
      const s = (FEATURES[id].selected || []).find((x) => x.concept === name) || {};
      box.append(resultLink(id, "#" + s.rank + ": " + (s.reason || "")));
    }
  }
  box.append(el("h2", {}, "Concepts"));
  for (const name of Object.keys(DATA.concepts)) {
    box.append(el("p", {}, el("a", {href: "#q=" + encodeURIComponent("concept:" + name)},
      "concept:" + name), " " + DATA.concepts[name].description));
  }
  for (const [key, note] of Object.entries(DATA.notes)) {
    if (note && key !== "faithfulness") box.append(el("p", {class: "not-run"}, note));
  }
}

function wordList(method, list) {
  const div = el("div", {class: "method-words", "data-method": method},
    el("h3", {}, DATA.method_labels[method] || method));
  for (const [w, s] of list) {
    div.append(el("span", {class: "word"}, el("span", {class: "w"}, w),
      s === null ? null : el("span", {class: "score"}, fmtNum(s))));
  }
  return div;
}

function contextBlock(ctx, maxAct) {
  const div = el("div", {class: "context"});
  const meta = "activation " + fmtNum(ctx.activation) + (ctx.source ? " · " + ctx.source : "") +
    (ctx.text_id ? " · " + ctx.text_id : "");
  div.append(el("span", {class: "cmeta"}, meta));
  ctx.tokens.forEach((tok, i) => {
    const a = ctx.acts[i] || 0;
    const text = tok.replace(/\n/g, "⏎\n");
    if (a > 0) {
      const alpha = Math.min(1, 0.15 + 0.85 * a / (maxAct || a));
      const m = el("mark", {style: "background: rgba(255, 140, 0, " + alpha.toFixed(3) + ")",
        title: "activation " + fmtNum(a), "data-act": a}, text);
      if (i === ctx.focus) m.classList.add("focus");
      div.append(m);
    } else {
      div.append(el("span", {}, text));
    }
  });
  return div;
}

function histogram(f) {
  const box = $("histogram");
  box.replaceChildren();
  const counts = f.hist || [];
  let last = counts.length - 1;
  while (last >= 0 && !counts[last]) last--;
  if (last < 0 || !f.hist_range) {
    box.append(el("p", {class: "note"}, "no nonzero activations"));
    return;
  }
  const shown = counts.slice(0, last + 1);
  const W = 380, H = 150, L = 44, B = 28, T = 8, R = 8;
  const width = (W - L - R) / shown.length;
  const top = Math.max(...shown);
  const binW = f.hist_range / counts.length;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  svg.setAttribute("font-size", "10"); svg.setAttribute("font-family", "sans-serif");
  add("rect", {x: 0, y: 0, width: W, height: H, fill: "white"});
  shown.forEach((c, i) => {
    const h = (H - B - T) * c / top;
    const bar = add("rect", {x: L + i * width + 0.5, y: H - B - h, width: Math.max(1, width - 1),
      height: h, fill: "#1f77b4"});
    const t = document.createElementNS(ns, "title");
    t.textContent = "(" + fmtNum(i * binW) + ", " + fmtNum((i + 1) * binW) + "]: " + c;
    bar.append(t);
  });
  add("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#444"});
  add("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#444"});
  add("text", {x: L, y: H - B + 12, "text-anchor": "start"}, "0");
  add("text", {x: W - R, y: H - B + 12, "text-anchor": "end"}, fmtNum((last + 1) * binW));
  add("text", {x: L - 4, y: T + 8, "text-anchor": "end"}, String(top));
  add("text", {x: L - 4, y: H - B, "text-anchor": "end"}, "0");
  add("text", {x: L + (W - L - R) / 2, y: H - 4, "text-anchor": "middle"}, "activation (nonzero tokens)");
  box.append(svg);
}

function showFeature(id) {
  const f = FEATURES[id];
  $("results-view").hidden = true;
  $("feature-view").hidden = false;
  if (!f) {
    $("feature-title").textContent = "No feature " + id + " in this run";
    for (const k of ["feature-selected", "feature-faithfulness", "explanations", "contexts", "feature-stats", "histogram"]) $(k).replaceChildren();
    return;
  }
  $("feature-title").textContent = "Feature " + id;
  const pos = IDS.indexOf(id);
  $("prev").setAttribute("href", "#feature=" + IDS[Math.max(0, pos - 1)]);
  $("next").setAttribute("href", "#feature=" + IDS[Math.min(IDS.length - 1, pos + 1)]);
  const sel = $("feature-selected");
  sel.replaceChildren();
  for (const s of f.selected || []) {
    sel.append(el("div", {class: "selected-box"}, el("strong", {}, "Selected for steering: " +
      s.concept + " (#" + s.rank + ", score " + fmtNum(s.score) + ")"), el("br"), s.reason));
  }
  if (!(f.selected || []).length) {
    sel.append(el("p", {class: "note"}, DATA.notes.selected || "Not selected for steering."));
  }
  const fa = $("feature-faithfulness");
  fa.replaceChildren();
  const faith = f.faith || {};
  const scored = DATA.methods.filter((m) => faith[m]);
  fa.append(el("p", {class: "note"}, scored.length ? "Faithfulness (AUROC against random words, " +
    "0.5 = chance), output / input: " + scored.map((m) => m + " " + fmtAuc(faith[m].output) +
    " / " + fmtAuc(faith[m].input)).join("; ") : "Faithfulness: not sampled by explain-metrics."));
  const ex = $("explanations");
  ex.replaceChildren();
  const words = f.words || {};
  for (const m of DATA.methods) if (words[m]) ex.append(wordList(m, words[m]));
  if (!DATA.methods.length) ex.append(el("p", {class: "not-run"}, DATA.notes.explanations));
  const stats = $("feature-stats");
  stats.replaceChildren();
  const ctx = $("contexts");
  ctx.replaceChildren();
  if (DATA.notes.stats) {
    stats.append(el("p", {class: "not-run"}, DATA.notes.stats));
    ctx.append(el("p", {class: "not-run"}, DATA.notes.stats));
    $("histogram").replaceChildren();
    return;
  }
  stats.append(el("table", {},
    el("tr", {}, el("th", {}, "firing frequency"), el("td", {id: "frequency"}, fmtPct(f.freq) +
      " (" + (f.count ?? "–") + " of " + DATA.n_tokens + " tokens)")),
    el("tr", {}, el("th", {}, "max activation"), el("td", {id: "max-activation"}, fmtNum(f.max)))));
  histogram(f);
  if (DATA.notes.contexts) ctx.append(el("p", {class: "note"}, DATA.notes.contexts));
  const contexts = f.contexts || [];
  if (!contexts.length && !DATA.notes.contexts) ctx.append(el("p", {class: "note"}, "never fires"));
  const maxAct = Math.max(0, ...contexts.map((c) => c.activation || 0));
  for (const c of contexts) ctx.append(contextBlock(c, maxAct));
}

function route() {
  let h = location.hash.replace(/^#/, "");
  try { h = decodeURIComponent(h); } catch (e) { /* keep the raw hash */ }
  if (h.startsWith("feature=")) showFeature(Number(h.slice(8)));
  else showResults(h.startsWith("q=") ? h.slice(2) : "");
  $("status").textContent = IDS.length + " features · " + DATA.methods.length + " methods";
}

$("search").addEventListener("input", (ev) => {
  const q = ev.target.value;
  const target = "#q=" + encodeURIComponent(q);
  try { history.replaceState(null, "", target); route(); } catch (e) { location.hash = target; }
});
window.addEventListener("hashchange", route);
route();
"""
