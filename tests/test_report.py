"""The run report, the feature browser and their inputs (feature stats, example conversations)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_tokenizer
from report_helpers import (
    INJECTION,
    LAYER,
    METHODS,
    WORD_INJECTION,
    RunInfo,
    make_run_dir,
    output_auroc,
    tiny_sae,
    tiny_store,
)
from steerlex.activations.store import ActivationStore, create_store
from steerlex.core.errors import SAEError, SteerlexError
from steerlex.models.chat import encode_prompt
from steerlex.models.loading import LoadedModel
from steerlex.report import (
    ReportError,
    build_browser,
    build_report,
    conversation_examples,
    feature_stats,
    read_examples,
    read_feature_stats,
    token_decoder,
    write_examples,
    write_feature_stats,
)
from steerlex.report import html as report_html
from steerlex.report.faithfulness import fmt_auroc, method_auroc
from steerlex.report.features import readable_token
from steerlex.report.headline import best_defence, defence_text, summary_lines
from steerlex.report.html import markdown_table_html
from steerlex.sae.base import SAEConfig, SparseAutoencoder

# --------------------------------------------------------------------------- feature_stats


def brute_hist(values: list[float], bins: int) -> tuple[float, list[int]]:
    """Histogram of positive ``values`` over (0, 2**ceil(log2 max)] computed directly."""
    top = max(values)
    m, e = math.frexp(top)
    e = e - 1 if m == 0.5 else e
    width_range = math.ldexp(1.0, e)
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, math.ceil(v * bins / width_range) - 1))] += 1
    return width_range, counts


@pytest.fixture
def store(tiny_loaded: LoadedModel, tmp_path: Path) -> ActivationStore:
    return tiny_store(tiny_loaded, tmp_path / "acts")


def test_feature_stats_equal_a_brute_force_computation(
    tiny_loaded: LoadedModel, store: ActivationStore
) -> None:
    sae = tiny_sae(tiny_loaded)
    decode = token_decoder(tiny_loaded.tokenizer)
    stats = feature_stats(sae, store, decode, top_k=3, window=2, bins=8, batch_size=5,
                          progress=False)  # fmt: skip
    acts = store.activations()
    with torch.no_grad():
        f = sae.encode(acts).float()
    n = acts.shape[0]
    assert stats["n_tokens"] == n == store.n_tokens
    assert len(stats["features"]) == 64
    ids = torch.cat([store.load_shard(i)["token_ids"] for i in range(len(store.shards))])
    texts = torch.cat([store.load_shard(i)["text_index"] for i in range(len(store.shards))])
    checked = 0
    for rec in stats["features"]:
        c = rec["id"]
        col = f[:, c]
        pos = col[col > 0].tolist()
        assert rec["count"] == len(pos)
        assert rec["frequency"] == pytest.approx(len(pos) / n)
        if not pos:
            assert rec["hist"] == [] and rec["hist_range"] is None and rec["contexts"] == []
            continue
        assert rec["max"] == pytest.approx(max(pos), rel=1e-4)
        assert (rec["hist_range"], rec["hist"]) == brute_hist(pos, 8)
        assert rec["hist_range"] / 2 < rec["max"] <= rec["hist_range"]
        top = torch.topk(col, min(3, len(pos)))
        assert [c_["activation"] for c_ in rec["contexts"]] == pytest.approx(
            top.values.tolist(), rel=1e-4
        )
        assert [c_["row"] for c_ in rec["contexts"]] == top.indices.tolist()
        for ctx in rec["contexts"]:
            row, focus = ctx["row"], ctx["focus"]
            rows = list(range(row - focus, row - focus + len(ctx["token_ids"])))
            assert all(int(texts[r]) == int(texts[row]) for r in rows)  # same text only
            assert len(rows) <= 5 and focus <= 2
            # the window stops only at the text's edges
            if focus < 2:
                assert row - focus == 0 or int(texts[row - focus - 1]) != int(texts[row])
            assert ctx["token_ids"] == [int(ids[r]) for r in rows]
            assert ctx["tokens"] == [decode(int(ids[r])) for r in rows]
            assert ctx["acts"] == pytest.approx([float(f[r, c]) for r in rows], rel=1e-4, abs=1e-6)
            assert ctx["acts"][focus] == pytest.approx(ctx["activation"])
            assert ctx["text_id"] == f"t{ctx['text_index']}" and ctx["source"] == "tests"
            checked += 1
    assert checked > 20
    one_shot = feature_stats(sae, store, decode, top_k=3, window=2, bins=8, batch_size=10_000,
                             progress=False)  # fmt: skip
    for a, b in zip(stats["features"], one_shot["features"], strict=True):
        assert (a["count"], a["hist"], a["hist_range"]) == (b["count"], b["hist"], b["hist_range"])


def test_feature_stats_histogram_grows_exactly_and_max_tokens(tmp_path: Path) -> None:
    # feature c reads coordinate c (ReLU): values chosen so the range doubles several times
    values = [0.3, 0.01, 0.5, 1.0, 3.0, 7.9, 0.26, 64.0, 0.0, 2.5]
    x = torch.zeros(len(values), 3)
    x[:, 0] = torch.tensor(values)
    x[:, 1] = -1.0  # never fires
    x[:, 2] = 1.0
    store = create_store(tmp_path / "s", [x[:4], x[4:7], x[7:]])
    sae = SparseAutoencoder(SAEConfig(d_in=3, d_sae=3, architecture="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    stats = feature_stats(sae, store, str, top_k=2, bins=6, batch_size=2, progress=False)
    f0, f1, f2 = stats["features"]
    pos = [v for v in values if v > 0]
    assert (f0["hist_range"], f0["hist"]) == brute_hist(pos, 6)
    assert f0["hist_range"] == 64.0 and f0["count"] == 9 and f0["max"] == 64.0
    assert f1["count"] == 0 and f1["hist"] == []
    assert f2["hist_range"] == 1.0 and f2["hist"] == [0, 0, 0, 0, 0, 10]
    # a store written from bare activations has no tokens: no contexts, and a note says why
    assert stats["contexts_note"] and "no token ids" in stats["contexts_note"]
    assert f0["contexts"] == []
    first = feature_stats(sae, store, str, max_tokens=5, bins=6, progress=False)
    assert first["n_tokens"] == 5
    assert first["features"][0]["count"] == 5
    assert first["features"][0]["hist"] == brute_hist(values[:5], 6)[1]


def test_feature_stats_bad_input(tiny_loaded: LoadedModel, store: ActivationStore) -> None:
    sae = tiny_sae(tiny_loaded)
    with pytest.raises(ReportError, match="top_k"):
        feature_stats(sae, store, str, top_k=0, progress=False)
    with pytest.raises(ReportError, match="bins"):
        feature_stats(sae, store, str, bins=0, progress=False)
    wide = SparseAutoencoder(SAEConfig(d_in=16, d_sae=8, k=2))
    with pytest.raises(SAEError, match="d_in=16.*width-32"):
        feature_stats(wide, store, str, progress=False)


def test_feature_stats_round_trip_and_malformed_file(
    tiny_loaded: LoadedModel, store: ActivationStore, tmp_path: Path
) -> None:
    stats = feature_stats(tiny_sae(tiny_loaded), store, str, top_k=1, window=1, progress=False)
    path = write_feature_stats(tmp_path / "features.json", stats)
    assert read_feature_stats(path) == json.loads(json.dumps(stats))
    path.write_text("{broken")
    with pytest.raises(ReportError, match=re.escape(str(path))):
        read_feature_stats(path)
    path.write_text('{"format": "other"}')
    with pytest.raises(ReportError, match="not a feature-statistics file"):
        read_feature_stats(path)


def test_readable_tokens() -> None:
    assert readable_token("Ġhello") == " hello"
    assert readable_token("ĊĊ") == "\n\n"
    assert readable_token("Ã©t") == "ét"  # byte-level UTF-8 of é
    assert readable_token("▁the", "sentencepiece") == " the"
    assert readable_token("<0x0A>", "sentencepiece") == "\n"
    assert readable_token("cat", "word") == " cat"
    decode = token_decoder(make_tokenizer())
    tok = make_tokenizer()
    assert decode(tok.convert_tokens_to_ids("cat")) == " cat"
    assert decode(tok.convert_tokens_to_ids("<|end|>")) == "<|end|>"


# --------------------------------------------------------------------------- examples


@pytest.fixture
def run(tiny_loaded: LoadedModel, tmp_path: Path) -> RunInfo:
    return make_run_dir(tmp_path / "run", tiny_loaded)


def test_conversation_examples(tiny_loaded: LoadedModel, run: RunInfo) -> None:
    sae = tiny_sae(tiny_loaded)
    gens = run.root / "eval" / "generations.jsonl"
    feats = [run.fired, run.safety, 5]
    examples = conversation_examples(tiny_loaded, sae, LAYER, gens, "amplify", feats, n=4)
    # 2 jailbreak (the one whose label changed first) + 2 benign, test split only
    assert [e["prompt_kind"] for e in examples] == ["jailbreak", "jailbreak", "benign", "benign"]
    assert examples[0]["prompt_id"] == "jb1"
    assert examples[0]["chosen_because"] == "the rules judge's label changed"
    assert examples[0]["strength"] == 2.0 and examples[0]["defence"] == "amplify"
    assert examples[0]["steered"]["judges"] == {"rules": "refusal"}
    assert examples[0]["unsteered"]["judges"] == {"rules": "compliance"}
    assert examples[0]["steered"]["reply"] == "can you help me"  # the headline strength's reply
    assert len({e["prompt_id"] for e in examples}) == 4
    assert conversation_examples(tiny_loaded, sae, LAYER, gens, "amplify", feats, n=4) == examples

    # activations equal a full forward pass of the formatted prompt + reply
    tok = tiny_loaded.tokenizer
    for ex in examples:
        for side in ("steered", "unsteered"):
            enc = encode_prompt(tok, ex["prompt"], chat=True)
            reply_ids = tok(ex[side]["reply"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([enc.input_ids + reply_ids])
            with torch.no_grad():
                hidden = tiny_loaded.model(ids, output_hidden_states=True).hidden_states[LAYER + 1]
                want = sae.encode(hidden[0, len(enc.input_ids) :])[:, feats]
            got = ex[side]["activations"]
            assert ex[side]["token_ids"] == reply_ids
            assert ex[side]["tokens"] == [token_decoder(tok)(i) for i in reply_ids]
            assert torch.tensor(got) == pytest.approx(want, rel=1e-3, abs=1e-5)
    two = conversation_examples(tiny_loaded, sae, LAYER, gens, "amplify", feats, n=1)
    assert [e["prompt_id"] for e in two] == ["jb1"]


def test_conversation_examples_bad_input(
    tiny_loaded: LoadedModel, run: RunInfo, tmp_path: Path
) -> None:
    sae = tiny_sae(tiny_loaded)
    gens = run.root / "eval" / "generations.jsonl"
    with pytest.raises(ReportError, match=r"'calibrate'.*\['amplify', 'none'\]"):
        conversation_examples(tiny_loaded, sae, LAYER, gens, "calibrate", [1])
    with pytest.raises(ReportError, match="outside"):
        conversation_examples(tiny_loaded, sae, LAYER, gens, "amplify", [999])
    with pytest.raises(ReportError, match="does not exist"):
        conversation_examples(tiny_loaded, sae, LAYER, tmp_path / "nope.jsonl", "amplify", [1])
    bad = tmp_path / "eval" / "generations.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"defence": "none"}\nnot json\n')
    (tmp_path / "eval" / "scores.json").write_text((run.root / "eval" / "scores.json").read_text())
    with pytest.raises(ReportError, match=re.escape(f"{bad} line 2")):
        conversation_examples(tiny_loaded, sae, LAYER, bad, "amplify", [1])


def test_examples_round_trip(tmp_path: Path) -> None:
    ex = [{"prompt": "p", "steered": {"reply": "a"}, "unsteered": {"reply": "b"}}]
    path = write_examples(tmp_path / "examples.json", ex)
    assert read_examples(path) == ex
    path.write_text('{"format": "steerlex-report-examples", "examples": [{"prompt": "p"}]}')
    with pytest.raises(ReportError, match="example 0 lacks"):
        read_examples(path)


# --------------------------------------------------------------------------- report and browser


EXTERNAL = [
    r"<script[^>]*\bsrc\s*=",
    r"<link\b",
    r"@import",
    r"\b(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//",
    r"url\(\s*[\"']?\s*(?:https?:)?//",
    r"\bfetch\(",
    r"XMLHttpRequest",
    r"<iframe",
]


def assert_self_contained(text: str) -> None:
    for pattern in EXTERNAL:
        assert not re.search(pattern, text, re.IGNORECASE), pattern


def embedded_data(text: str) -> dict[str, Any]:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    assert m is not None
    data: dict[str, Any] = json.loads(m.group(1))
    return data


def test_report_from_a_full_run_dir(run: RunInfo) -> None:
    path = build_report(run.root)
    assert path == run.root / "report.html"
    text = path.read_text(encoding="utf-8")
    assert_self_contained(text)
    for sid in ("summary", "sae", "explanations", "metrics", "selected", "defences", "examples"):
        assert f'<section id="{sid}">' in text
    # provenance and timings
    assert "tiny-run" in text and "sha256:tiny-llama-seed0" in text
    assert "<td>harvest</td>" in text and "1.250" in text
    assert "config.json" in text and "&lt;i&gt;" in text  # the config, escaped
    # SAE quality from the real eval.json
    fve = json.loads((run.root / "sae" / "eval" / "eval.json").read_text())["activation"]["fve"]
    assert f"{fve:.3f}" in text
    # side by side: every method, links to the browser
    for method in ("mi", "paper", "mi-input", "logitlens", "topact"):
        assert f"<th>{method}</th>" in text
    assert f'href="browser.html#feature={run.fired}"' in text
    # metrics: AUROC with CI, frequency bias, levels plot
    assert "0.710 [0.610, 0.790]" in text and "0.370 [0.360, 0.380]" in text
    assert "<svg" in text and "semantic" in text
    # selections: reasons escaped
    assert "&lt;b&gt;refuse&lt;/b&gt;" in text and "<b>refuse</b>" not in text
    # defences: the headline table from results_table, sweep rows, plots inlined
    assert "<td>amplify</td><td>2</td><td>25% [" in text
    assert text.count("data:image/svg+xml;base64,") == 2
    # examples: prompt escaped, fired tokens marked
    assert INJECTION not in text and "&lt;script&gt;alert(" in text
    assert '<mark style="background: rgba(255, 140, 0,' in text
    assert "Without a defence" in text and "With amplify @ 2" in text
    # the only <script> tags a report could have: none
    assert "<script" not in text.lower()


def test_report_and_browser_of_an_empty_run_dir(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    text = build_report(root).read_text()
    assert text.count("not run") >= 8
    assert_self_contained(text)
    browser = build_browser(root).read_text()
    assert_self_contained(browser)
    data = embedded_data(browser)
    assert data["features"] == {}
    assert all(v and v.startswith("not run") for k, v in data["notes"].items() if k != "contexts")
    assert set(data["concepts"]) == {"safety", "harm"}


def test_missing_sections_say_not_run(run: RunInfo) -> None:
    for name in ("examples.json", "run.json"):
        (run.root / name).unlink()
    for name in ("scores.json", "tradeoff_kl.svg"):
        (run.root / "eval" / name).unlink()
    (run.root / "explanations" / "metrics.json").unlink()
    text = build_report(run.root).read_text()
    for what in ("examples.json is missing", "run.json is missing", "eval/scores.json is missing",
                 "explanations/metrics.json is missing"):  # fmt: skip
        assert f"not run: {what}" in text
    (run.root / "features.json").unlink()
    data = embedded_data(build_browser(run.root).read_text())
    assert data["notes"]["stats"].startswith("not run")
    assert "umbrella" in json.dumps(data["features"][str(run.fired)]["words"])


@pytest.mark.parametrize(
    ("relative", "content"),
    [
        ("explanations/metrics.json", "{not json"),
        ("sae/eval/eval.json", "[1, 2]"),
        ("run.json", '{"stages": [1]}'),
        ("config.json", "{"),
        ("eval/scores.json", '{"conditions": [{"x": 1}]}'),
        ("examples.json", '{"format": "nope"}'),
        ("selected_safety.json", '{"concept": 3}'),
        ("explanations/mi.jsonl", '{"feature": 1}\n'),
    ],
)
def test_malformed_file_names_the_file(run: RunInfo, relative: str, content: str) -> None:
    path = run.root / relative
    path.write_text(content)
    with pytest.raises(SteerlexError, match=re.escape(str(path))):
        build_report(run.root)


@pytest.mark.parametrize(
    ("relative", "content"),
    [
        ("features.json", "{"),
        ("explanations/topact.jsonl", "[]\n"),
        ("selected_harm.json", "{}"),
        ("config.json", "nope"),
    ],
)
def test_browser_malformed_file_names_the_file(run: RunInfo, relative: str, content: str) -> None:
    path = run.root / relative
    path.write_text(content)
    with pytest.raises(SteerlexError, match=re.escape(str(path))):
        build_browser(run.root)


def test_browser_embeds_everything_safely(run: RunInfo, tmp_path: Path) -> None:
    out = build_browser(run.root, tmp_path / "elsewhere" / "b.html")
    text = out.read_text(encoding="utf-8")
    assert_self_contained(text)
    # exactly the two script tags of the page: the data block and the program
    assert len(re.findall(r"<script\b", text)) == 2
    assert WORD_INJECTION not in text
    data = embedded_data(text)
    assert data["title"] == "tiny-run"
    assert data["methods"] == ["mi", "paper", "mi-input", "logitlens", "topact"]
    assert len(data["features"]) == 64
    fired = data["features"][str(run.fired)]
    assert fired["words"]["mi"][0] == ["umbrella", 1.0]
    assert fired["selected"] == [
        {
            "concept": "harm",
            "rank": 1,
            "score": 2.5,
            "reason": "harmful - benign mean activation 2.5",
        }
    ]
    stats = next(f for f in run.stats["features"] if f["id"] == run.fired)
    assert fired["count"] == stats["count"] and fired["hist"] == stats["hist"]
    assert fired["contexts"][0]["tokens"] == stats["contexts"][0]["tokens"]
    assert data["features"]["0"]["words"]["topact"][0][0] == WORD_INJECTION
    assert data["selected"] == {"harm": [run.fired], "safety": [run.safety]}
    assert "refuse" in data["concepts"]["safety"]["words"]
    for hook in ('id="search"', 'id="feature-title"', 'id="results"', 'id="histogram"'):
        assert hook in text


def test_markdown_table_html_escapes_cells() -> None:
    md = "| a | b |\n|---|---:|\n| <x> | 1 \\| 2 |\n"
    assert markdown_table_html(md) == (
        "<table><thead><tr><th>a</th><th>b</th></tr></thead>"
        "<tbody><tr><td>&lt;x&gt;</td><td>1 | 2</td></tr></tbody></table>"
    )


# --------------------------------------------------------------------------- leading with what works


def section(text: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', text, re.S)
    assert m is not None, sid
    return m.group(1)


def faithful_rows(text: str) -> list[tuple[int, float]]:
    rows = re.findall(r'<tr data-feature="(\d+)" data-faithfulness="([^"]+)">', text)
    return [(int(f), float(v)) for f, v in rows]


def metrics_of(run: RunInfo) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run.root / "explanations" / "metrics.json").read_text())
    return data


def test_side_by_side_leads_with_the_most_faithful_features(run: RunInfo) -> None:
    text = section(build_report(run.root).read_text(), "explanations")
    # topact has the best mean output AUROC (0.74) in the fixture: its per-feature AUROCs rank
    lead = sorted(METHODS).index("topact")
    expected = sorted(((c, output_auroc(lead, c)) for c in range(8)), key=lambda p: (-p[1], p[0]))
    rows = faithful_rows(text)
    assert rows == expected
    assert [f for f, _ in rows] != sorted(f for f, _ in rows)  # not the id order
    assert "<th>output AUROC (topact)</th>" in text
    first_feature, first_value = rows[0]
    assert f'<span class="faith">{first_value:.3f}</span>' in text
    assert f'href="browser.html#feature={first_feature}"' in text


def test_side_by_side_shows_the_rest_collapsed(
    run: RunInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_html, "N_SIDE_BY_SIDE", 3)
    text = section(build_report(run.root).read_text(), "explanations")
    head, rest = text.split("<details>")
    assert len(faithful_rows(head)) == 3 and len(faithful_rows(rest)) == 5
    values = [v for _, v in faithful_rows(text)]
    assert values == sorted(values, reverse=True)
    assert "The other 5 scored features" in rest and '<td class="num">4</td>' in rest  # ranks go on


def test_without_per_feature_metrics_the_table_keeps_id_order(run: RunInfo) -> None:
    metrics = metrics_of(run)
    for side in ("output_faithfulness", "input_faithfulness"):
        for rec in metrics[side].values():
            rec.pop("per_feature")
    (run.root / "explanations" / "metrics.json").write_text(json.dumps(metrics))
    text = section(build_report(run.root).read_text(), "explanations")
    assert faithful_rows(text) == []
    assert "No per-feature faithfulness" in text
    ids = [int(f) for f in re.findall(r'<tr><td><a href="browser.html#feature=(\d+)"', text)]
    assert ids == sorted(ids) and len(ids) == 8
    data = embedded_data(build_browser(run.root).read_text())
    assert data["faithfulness"] is None and data["notes"]["faithfulness"].startswith("not run")


def test_quality_panel_numbers_equal_the_metrics_file(run: RunInfo) -> None:
    text = build_report(run.root).read_text()
    panel = re.search(r'<div class="panel" id="explanation-quality">(.*?)</div>', text, re.S)
    assert panel is not None
    spans = re.findall(
        r'<span class="auroc" data-method="([^"]+)" data-side="([^"]+)">([^<]*)</span>',
        panel.group(1),
    )
    metrics = metrics_of(run)
    shown = {(m, side): v for m, side, v in spans}
    assert {m for m, _ in shown} == set(METHODS)
    for method in METHODS:
        for side in ("output", "input"):
            rec = metrics[f"{side}_faithfulness"][method]
            lo, hi = rec["auroc_ci"]
            assert shown[(method, side)] == f"{rec['auroc_mean']:.3f} [{lo:.3f}, {hi:.3f}]"
    assert shown[("topact", "output")] == "0.740 [0.610, 0.790]"
    assert "better than random words" in panel.group(1)  # topact's interval is above 0.5
    assert "not distinguishable from random words" in panel.group(1)  # input [0.5, 0.6]
    assert f"On the {len(metrics['features'])} features" in panel.group(1)


def test_auroc_formatting_and_missing_values() -> None:
    metrics = {"output_faithfulness": {"a": {"auroc_mean": 0.5, "auroc_ci": [None, 0.6]},
                                       "b": {"auroc_mean": None}}}  # fmt: skip
    assert fmt_auroc(method_auroc(metrics, "a", "output")) == "0.500"
    assert method_auroc(metrics, "b", "output") is None and fmt_auroc(None) == "–"
    assert method_auroc(None, "a", "input") is None


def test_selected_features_show_their_evidence_safety_first(run: RunInfo) -> None:
    text = section(build_report(run.root).read_text(), "selected")
    assert text.index("selected_safety.json") < text.index("selected_harm.json")
    assert "matching words: refuse (1.00)" in text
    assert "mean activation 3 on harmful vs 0.5 on benign prompts" in text
    assert "<th>evidence</th>" in text and "<th>output AUROC (topact)</th>" in text


def test_firing_histogram_in_the_report_counts_the_dead_latents(run: RunInfo) -> None:
    text = section(build_report(run.root).read_text(), "sae")
    hist = json.loads((run.root / "sae" / "eval" / "eval.json").read_text())["activation"][
        "firing_histogram"
    ]
    assert f'<g class="dead" data-count="{hist["n_dead"]}">' in text
    counts = [int(c) for c in re.findall(r'<rect class="bin" data-count="(\d+)"', text)]
    assert counts == hist["counts"]
    assert ">dead</text>" in text and "log10 bins" in text and ">latents</text>" in text


def test_browser_start_page_data_is_ranked_by_faithfulness(run: RunInfo) -> None:
    data = embedded_data(build_browser(run.root).read_text())
    faith = data["faithfulness"]
    lead = sorted(METHODS).index("topact")
    expected = sorted(((c, output_auroc(lead, c)) for c in range(8)), key=lambda p: (-p[1], p[0]))
    assert (faith["method"], faith["side"]) == ("topact", "output")
    assert [tuple(p) for p in faith["ranked"]] == expected
    assert data["features"]["3"]["faith"]["mi"] == {
        "output": output_auroc(sorted(METHODS).index("mi"), 3),
        "input": metrics_of(run)["input_faithfulness"]["mi"]["per_feature"]["3"],
    }
    assert list(data["selected"]) == ["safety", "harm"]


# --------------------------------------------------------------------------- the terminal summary


def test_summary_of_a_full_run(run: RunInfo) -> None:
    (run.root / "eval" / "results.md").write_text("# Safety evaluation\n")
    build_report(run.root)
    lines = summary_lines(run.root)
    text = "\n".join(lines)
    assert lines[0] == f"summary of {run.root}"
    act = json.loads((run.root / "sae" / "eval" / "eval.json").read_text())["activation"]
    assert f"held-out FVE {act['fve']:.3f}" in text
    assert f"{act['n_dead']} of {act['d_sae']} latents dead" in text
    assert "topact, output AUROC 0.740 [0.610, 0.790] vs 0.5 for random words" in text
    assert re.search(r"; input side: [\w-]+, AUROC 0\.\d{3} \[", text), text
    assert "amplify @ 2: attack success 25% [" in text and "(no defence 75%)" in text
    assert "over-refusal 0% (no defence 0%)" in text and "by steerlex-rules-v1" in text
    assert "rules judge" not in text  # no harm judge in this run: the rules judge alone
    assert str(run.root / "report.html") in text and str(run.root / "eval" / "results.md") in text
    assert "missing" not in text


def test_summary_of_a_partial_run_says_what_is_missing(run: RunInfo) -> None:
    (run.root / "eval" / "scores.json").unlink()
    (run.root / "explanations" / "metrics.json").write_text("{broken")
    lines = summary_lines(run.root)
    text = "\n".join(lines)
    assert "held-out FVE" in text  # what exists is still shown
    assert "best defence: eval/scores.json (stage eval)" in text
    assert "best explanations: explanations/metrics.json is unreadable" in text
    assert "report.html (stage report)" in text and "eval/results.md (stage eval)" in text
    assert not [ln for ln in lines if ln.strip().startswith("open:")]
    empty = summary_lines(run.root / "nowhere")
    assert len([ln for ln in empty if "(stage " in ln]) == 5


def test_best_defence_keeps_to_the_over_refusal_budget() -> None:
    def row(defence: str, asr: int, over: int) -> dict[str, Any]:
        return {"defence": defence, "kind": defence, "strength": None, "headline": True,
                "metrics": {"jailbreak": {"attack_success": {"k": asr, "n": 10, "rate": asr / 10}},
                            "benign": {"over_refusal": {"k": over, "n": 100, "rate": over / 100}}}}  # fmt: skip

    scores = {"conditions": [row("none", 6, 1), row("wall", 0, 60), row("gentle", 4, 5)]}
    found = best_defence(scores, budget=0.05)
    assert found is not None
    best, base, within = found
    assert best["defence"] == "gentle" and base is not None and within
    found = best_defence(scores, budget=0.01)
    assert found is not None and found[0]["defence"] == "wall"
    assert not found[2]  # none within the budget: the lowest attack success overall
    assert best_defence({"conditions": [row("none", 6, 1)]}) is None


def test_the_summary_reads_the_harm_judge_first_when_it_judged_every_row() -> None:
    def row(defence: str, rules: int, judged: int, over: int) -> dict[str, Any]:
        def r(k: int, n: int) -> dict[str, Any]:
            return {"k": k, "n": n, "rate": k / n}

        return {"defence": defence, "kind": defence, "strength": 1.0, "headline": True,
                "metrics": {"jailbreak": {"attack_success": r(rules, 10),
                                          "judge": {"attack_success": r(judged, 10)}},
                            "benign": {"over_refusal": r(over, 100)}}}  # fmt: skip

    # the rules judge would pick "loud" (1 of 10), the harm judge "quiet" (2 vs 5 of 10)
    rows = [row("none", 8, 6, 0), row("loud", 1, 5, 2), row("quiet", 4, 2, 3)]
    scores = {"judges": {"rules": "steerlex-rules-v1", "judge": "probe-v1"}, "conditions": rows}
    found = best_defence(scores, budget=0.05)
    assert found is not None and found[0]["defence"] == "quiet"
    text = defence_text(scores, 0.05)
    assert text is not None
    assert text.startswith("quiet @ 1: attack success 20% [") and "by probe-v1" in text
    assert (
        "(no defence 60%)" in text and "rules judge steerlex-rules-v1: attack success 40% [" in text
    )
    del rows[1]["metrics"]["jailbreak"]["judge"]  # one row unjudged: the rules judge for all
    found = best_defence(scores, budget=0.05)
    assert found is not None and found[0]["defence"] == "loud"
