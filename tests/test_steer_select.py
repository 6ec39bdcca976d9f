"""Feature selection: concepts, semantic / llm / data / manual methods, JSON, CLI, bad input."""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from conftest import save_tiny_model
from steerlex.cli import main
from steerlex.core.errors import BackendError, ConceptError, SAEError, SelectionError, SteerlexError
from steerlex.explain.run import Explanation, write_explanations
from steerlex.explain.summaries import BadAnswer, SummaryWarning
from steerlex.models.hooks import forward_to_layer
from steerlex.models.loading import LoadedModel, load_model
from steerlex.sae import SAEConfig, SparseAutoencoder, save_sae
from steerlex.steer.concepts import (
    DEFENCE_CATEGORIES,
    HARM,
    PRESETS,
    SAFETY,
    Concept,
    concept_from_dict,
    get_concept,
    parse_words,
)
from steerlex.steer.select import (
    DEFAULT_METHOD,
    METHOD_OPTIONS,
    METHODS,
    DataSelection,
    FeatureSelection,
    LLMSelection,
    ManualSelection,
    SemanticSelection,
    generic_words,
    mean_activations,
    parse_category,
    parse_ids,
    select_features,
    semantic_scores,
)

# --------------------------------------------------------------------------- fakes

MEANINGS = {
    "safe": ("protect", "secure", "safe", "guard", "safety", "shield"),
    "fruit": ("banana", "apple", "fruit", "pear", "cherry"),
    "harm": ("weapon", "bomb", "poison", "kill", "steal"),
}
GROUP = {w: g for g, ws in MEANINGS.items() for w in ws}


class FakeEncoder:
    """Bag of words: one dimension per meaning group, plus a smaller word-specific one."""

    name = "fake-bag-of-words"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> Tensor:
        self.calls += 1
        groups = list(MEANINGS)
        out = torch.zeros(len(texts), len(groups) + 97)
        for i, text in enumerate(texts):
            for tok in re.findall(r"[a-z]+", text.lower()):
                if tok in GROUP:
                    out[i, groups.index(GROUP[tok])] += 1.0
                out[i, len(groups) + zlib.crc32(tok.encode()) % 97] += 0.5
        return torch.nn.functional.normalize(out, dim=1)


SAFE = Concept("safe-things", "", ("safe", "guard"))


def fake(**options: object) -> SemanticSelection:
    """Semantic options with the bag-of-words encoder."""
    return SemanticSelection(encoder=FakeEncoder(), **options)  # type: ignore[arg-type]


def expl(feature: int, words: str, method: str = "mi", summary: str | None = None) -> Explanation:
    ws = tuple(w.strip() for w in words.split(","))
    return Explanation(feature, method, ws, tuple(1.0 for _ in ws), summary)


@pytest.fixture
def four() -> list[Explanation]:
    return [
        expl(0, "banana, apple, fruit"),
        expl(1, "protect, secure, safe, guard"),
        expl(2, "protect, banana, table"),
        expl(3, "chair, table, lamp"),
    ]


def small_sae(d_sae: int = 8, d_in: int = 32, **cfg: object) -> SparseAutoencoder:
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=2, **cfg))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- concepts


def test_presets_and_custom_concepts() -> None:
    assert set(PRESETS) == {"safety", "harm"}
    assert SAFETY.side == "output" and HARM.side == "input"
    assert SAFETY.categories == DEFENCE_CATEGORIES and "privacy" in SAFETY.labels
    assert {"refuse", "protect", "illegal", "privacy"} <= set(SAFETY.words)
    assert {"weapon", "poison", "malware", "fraud"} <= set(HARM.words)
    assert get_concept("Safety") is SAFETY
    own = get_concept("medicine", description="health care", words="Doctor, nurse,, doctor")
    assert own.words == ("doctor", "nurse") and own.side == "output" and own.labels == ("medicine",)
    replaced = get_concept("harm", words=["gun"])
    assert replaced.words == ("gun",) and replaced.side == "input"
    assert replaced.description == HARM.description
    assert concept_from_dict(own.to_json()) == own
    assert parse_words(" a ,B, ,a") == ("a", "b")
    with pytest.raises(ConceptError, match=r"Unknown concept 'safty'.*Did you mean 'safety'"):
        get_concept("safty")
    with pytest.raises(ConceptError, match="neither a description nor words"):
        Concept("x", "  ")
    with pytest.raises(ConceptError, match="needs at least"):
        concept_from_dict({"description": "no name"})


# --------------------------------------------------------------------------- method options


def test_method_options_defaults_and_help() -> None:
    assert tuple(METHOD_OPTIONS) == METHODS
    assert all(cls.name == name for name, cls in METHOD_OPTIONS.items())
    for cls in METHOD_OPTIONS.values():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    sem = SemanticSelection()
    assert (sem.scoring, sem.top_m, sem.generic_share, sem.encoder) == ("words", 3, 0.02, None)
    assert sem == DEFAULT_METHOD
    judge = FakeJudge()
    llm = LLMSelection(judge)  # type: ignore[arg-type]
    assert llm.backend is judge and llm.cache_dir is None
    data = DataSelection(["a", "b"], ["c"])
    assert data.harmful == ("a", "b") and data.benign == ("c",)  # lists are stored as tuples
    assert (data.direction, data.layer, data.batch_size, data.max_length) == (
        "harmful", None, 8, 256,
    )  # fmt: skip
    manual = ManualSelection([3, 1, 3])
    assert manual.ids == (3, 1) and ManualSelection(parse_ids("4, 2")).ids == (4, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sem.top_m = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SemanticSelection(scoring="bogus"), "Unknown scoring 'bogus'"),  # type: ignore[arg-type]
        (lambda: SemanticSelection(top_m=0), "top_m=0 must be an integer of at least 1"),
        (lambda: SemanticSelection(generic_share=0.0), r"generic_share=0.0 must be in \(0, 1\]"),
        (lambda: SemanticSelection(generic_share=1.5), "generic_share=1.5"),
        (lambda: LLMSelection(None), "'llm' method needs a judge back end"),  # type: ignore[arg-type]
        (lambda: DataSelection([], ["b"]), "needs harmful and benign prompts"),
        (lambda: DataSelection("a harmful prompt", ["b"]), "harmful must be a list of prompt"),
        (lambda: DataSelection(["a"], ["b"], direction="up"), "Unknown direction 'up'"),  # type: ignore[arg-type]
        (lambda: DataSelection(["a"], ["b"], batch_size=0), "batch_size=0 and max_length=256"),
        (lambda: DataSelection(["a"], ["b"], max_length=0), "max_length=0 must be >= 1"),
        (lambda: DataSelection(["a"], ["b"], layer=-1), "layer=-1 must be a 0-based layer"),
        (lambda: ManualSelection([]), "No feature ids given; pass ids like --ids 12,40,7"),
        (lambda: ManualSelection([1, -2]), "Feature id -2 is not a non-negative integer"),
        (lambda: ManualSelection([True]), "Feature id True is not a non-negative integer"),
    ],
)
def test_method_options_refuse_bad_values(make: object, message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        make()  # type: ignore[operator]


# --------------------------------------------------------------------------- semantic


def test_semantic_ranking_threshold_and_top_n(four: list[Explanation]) -> None:
    enc = FakeEncoder()
    scored = {f.id: f for f in semantic_scores(four, SAFE, enc, top_m=2, progress=False)}
    assert scored[1].score > scored[2].score > scored[0].score
    assert scored[3].score == pytest.approx(0.0, abs=0.2)
    assert "via words: " in scored[1].reason and "guard" in scored[1].reason
    assert scored[1].details["evidence"][0][1] == pytest.approx(1.0, abs=1e-5)

    words2 = SemanticSelection(top_m=2, encoder=enc)
    sel = select_features(four, SAFE, words2, threshold=0.5, progress=False)
    assert sel.ids[0] == 1 and 0 not in sel.ids and 3 not in sel.ids
    assert sel.side == "output" and sel.method == "semantic"
    assert sel.settings["encoder"] == "fake-bag-of-words" and sel.settings["threshold"] == 0.5
    top = select_features(four, SAFE, words2, top_n=2, progress=False)
    assert top.ids == [1, 2] and top.settings["threshold"] is None
    both = select_features(
        four, SAFE, SemanticSelection(encoder=enc), threshold=0.5, top_n=1, progress=False
    )
    assert both.ids == [1]
    assert [f.score for f in top.features] == sorted((f.score for f in top.features), reverse=True)


def test_semantic_no_match_says_so(four: list[Explanation]) -> None:
    with pytest.raises(SelectionError) as err:
        select_features(four, SAFE, fake(), threshold=0.99, progress=False)
    msg = str(err.value)
    assert "No feature matches concept 'safe-things' at threshold 0.99" in msg
    assert "best score is" in msg and "feature 1" in msg and "lower threshold" in msg


def test_generic_words_are_ignored() -> None:
    # "safe" sits in every list: it says nothing about any one feature.
    es = [expl(i, f"safe, word{chr(97 + i % 26)}{i}") for i in range(40)]
    es.append(expl(40, "safe, guard, shield"))
    assert generic_words(es, share=0.02) == {"safe"}
    sel = select_features(es, SAFE, fake(top_m=2), top_n=1, progress=False)
    assert sel.ids == [40] and "safe," not in sel.features[0].reason
    scored = {f.id: f for f in semantic_scores(es, SAFE, FakeEncoder(), progress=False)}
    assert scored[0].score < 0.3


def test_text_scoring_uses_the_summary() -> None:
    es = [
        expl(0, "table, chair", summary="Keeping people safe and guarding them"),
        expl(1, "banana, apple", summary=None),
    ]
    sel = select_features(es, SAFE, fake(scoring="text"), top_n=1, progress=False)
    assert sel.ids == [0] and "summary 'Keeping people safe" in sel.features[0].reason


def test_real_encoder_prefers_on_concept_words(cache_dir: Path) -> None:
    concept = "safety"
    es = [
        expl(0, "banana, apple, fruit, pear"),
        expl(1, "protect, safe, secure, guard"),
        expl(2, "table, chair, window, floor"),
    ]
    sel = select_features(es, concept, top_n=3, progress=False)
    scores = {f.id: f.score for f in sel.features}
    assert sel.ids[0] == 1 and scores[1] > scores[0] + 0.2 and scores[1] > scores[2] + 0.2
    assert sel.settings["encoder"].startswith("all-MiniLM-L6-v2")
    assert scores[1] >= 0.7  # the default threshold keeps a clear match
    assert list((cache_dir / "word_vectors").glob("*.safetensors"))
    again = select_features(es, concept, top_n=3, progress=False)  # from the word cache
    assert again.ids == sel.ids
    assert [f.score for f in again.features] == pytest.approx([f.score for f in sel.features])


def test_sides_and_explanation_checks(four: list[Explanation]) -> None:
    enc = fake()
    harm_words = [expl(0, "weapon, bomb, poison"), expl(1, "banana, apple")]
    with pytest.warns(UserWarning, match="detectors.*'mi' explanations describe the output"):
        sel = select_features(harm_words, "harm", enc, top_n=1, progress=False)
    assert sel.ids == [0] and sel.side == "output"
    inputs = [expl(0, "weapon, bomb, poison", method="mi-input"), expl(1, "banana", "mi-input")]
    assert select_features(inputs, "harm", enc, top_n=1, progress=False).side == "input"
    with pytest.raises(SelectionError, match="describe the input side; pass mi or paper"):
        select_features(inputs, SAFE, enc, side="output", progress=False)
    with pytest.raises(SelectionError, match="hold no features"):
        select_features([], SAFE, enc, progress=False)
    with pytest.raises(SelectionError, match="mix explanation methods"):
        select_features([four[0], inputs[0]], SAFE, enc, progress=False)
    with pytest.raises(SelectionError, match=r"ids \[9\].*features 0..3 \(d_sae=4\)"):
        select_features([*four, expl(9, "safe")], SAFE, enc, sae=small_sae(4))
    with pytest.raises(SelectionError, match="None of the explanations has words"):
        select_features([Explanation(0, "mi", (), ())], SAFE, enc, progress=False)
    with pytest.raises(SelectionError, match="Unknown selection method 'magic'.*ManualSelection"):
        select_features(four, SAFE, "magic")  # type: ignore[arg-type]
    with pytest.raises(SelectionError, match="'semantic' method needs explanations"):
        select_features(None, SAFE, enc)
    with pytest.raises(SelectionError, match="top_n must be at least 1"):
        select_features(four, SAFE, enc, top_n=0)
    with pytest.raises(SelectionError, match="threshold must be a finite number"):
        select_features(four, SAFE, enc, threshold=float("nan"))
    with pytest.raises(SelectionError, match="n_words=0"):
        select_features(four, SAFE, enc, n_words=0)


# --------------------------------------------------------------------------- manual


def test_manual_ids(four: list[Explanation]) -> None:
    sae = small_sae(8)
    sel = select_features(four, SAFE, ManualSelection(parse_ids("3, 1,3")), sae=sae, sae_path="x")
    assert sel.ids == [3, 1] and sel.features[1].words == ("protect", "secure", "safe", "guard")
    assert sel.features[0].reason == "chosen by hand" and sel.sae is not None
    assert sel.sae["d_sae"] == 8 and sel.sae["path"] == "x"
    assert sel.settings == {"threshold": None, "top_n": None, "n_selected": 2}
    assert select_features(None, SAFE, ManualSelection([7]), sae=sae).ids == [7]
    with pytest.raises(SelectionError, match=r"\[8, 12\] are out of range.*0..7"):
        select_features(None, SAFE, ManualSelection([1, 8, 12]), sae=sae)
    with pytest.raises(SelectionError, match="not a non-negative integer"):
        parse_ids("1,-2")
    with pytest.raises(SelectionError, match="needs the SAE"):
        select_features(None, SAFE, ManualSelection([1]))
    for limit in ({"threshold": 0.5}, {"top_n": 1}):
        with pytest.raises(SelectionError, match="threshold and top_n do not apply"):
            select_features(None, SAFE, ManualSelection([1]), sae=sae, **limit)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- JSON


def test_json_round_trip(tmp_path: Path, four: list[Explanation]) -> None:
    sae = small_sae(8, model_spec="tiny", weights_id="sha256:abc", layer=1)
    sel = select_features(
        four, SAFE, fake(), top_n=2, sae=sae, sae_path="runs/sae",
        explanations_path="runs/sae/explanations/mi.jsonl", progress=False,
    )  # fmt: skip
    path = sel.save(tmp_path / "sub" / "selected.json")
    raw = json.loads(path.read_text())
    assert set(raw) >= {"concept", "method", "side", "explanations", "sae", "settings",
                        "features", "steerlex_version"}  # fmt: skip
    assert raw["sae"] == {"path": "runs/sae", "weights_id": "sha256:abc", "model_spec": "tiny",
                          "layer": 1, "d_sae": 8}  # fmt: skip
    assert raw["explanations"] == {"path": "runs/sae/explanations/mi.jsonl", "method": "mi"}
    assert [f["id"] for f in raw["features"]] == sel.ids
    assert set(raw["features"][0]) >= {"id", "score", "reason", "words", "evidence"}
    back = FeatureSelection.load(path)
    assert back == sel
    (tmp_path / "bad.json").write_text('{"concept": {"name": "x", "words": ["a"]}, "features": []}')
    with pytest.raises(SelectionError, match="not a feature selection"):
        FeatureSelection.load(tmp_path / "bad.json")
    with pytest.raises(SelectionError, match="does not exist"):
        FeatureSelection.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------- LLM judge


class FakeJudge:
    name = "fake-judge"

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls = 0
        self.fail_on = fail_on

    def complete(self, system: str, user: str) -> str:
        self.calls += 1
        if self.fail_on and self.fail_on in user:
            raise BackendError("server down")
        if "lamp" in user:
            return "I think these are lamps and chairs"
        if "protect" in user:
            return "Answer: privacy"
        if "weapon" in user:
            return "physical."
        return "none"


@pytest.mark.filterwarnings("ignore:The LLM judge gave no usable answer")
@pytest.mark.filterwarnings("ignore:No judgement for feature 3")
def test_llm_judge_labels_caches_and_survives_failures(tmp_path: Path) -> None:
    es = [
        expl(0, "banana, apple"),
        expl(1, "protect, secure"),
        expl(2, "weapon, guard"),
        expl(3, "chair, lamp"),
        Explanation(4, "mi", (), ()),
    ]
    judge = FakeJudge()
    with pytest.warns(SummaryWarning, match="feature 3"):
        sel = select_features(es, "safety", LLMSelection(judge, cache_dir=tmp_path))
    assert sel.ids == [1, 2]
    assert [f.details["category"] for f in sel.features] == ["privacy", "physical"]
    report = sel.settings["judge"]
    assert report["matched"] == 2 and report["none"] == 1 and report["failed"] == 1
    assert report["no_words"] == 1 and judge.calls == 4
    again = FakeJudge()
    with pytest.warns(SummaryWarning):  # feature 3's garbage answer is not cached
        sel2 = select_features(es, "safety", LLMSelection(again, cache_dir=tmp_path))
    assert sel2.ids == [1, 2] and again.calls == 1 and sel2.settings["judge"]["cached"] == 3

    failing = FakeJudge(fail_on="protect")
    with pytest.warns(SummaryWarning, match="server down"):
        sel3 = select_features(es, "safety", LLMSelection(failing, cache_dir=tmp_path / "b"))
    assert sel3.ids == [2] and sel3.settings["judge"]["failed"] == 2
    judged = LLMSelection(judge, cache_dir=tmp_path)
    with pytest.raises(SelectionError, match="labelled"):
        select_features(es[:1], "safety", judged)
    with pytest.raises(SelectionError, match="threshold does not apply to the 'llm' method"):
        select_features(es, "safety", judged, threshold=0.5)
    with pytest.raises(SelectionError, match="'llm' method needs explanations"):
        select_features(None, "safety", judged)
    top = select_features(es, "safety", judged, top_n=1, n_words=1)
    assert top.ids == [1] and top.features[0].words == ("protect",)
    assert top.settings["n_words"] == 1 and top.settings["top_n"] == 1


def test_parse_category() -> None:
    labels = DEFENCE_CATEGORIES
    assert parse_category("Cyber", labels) == "cyber"
    assert parse_category("ethical", labels) == "ethical and safe behaviour"
    assert parse_category("Victim support.", labels) == "victim support"
    assert parse_category("<think>hmm</think>\nNone", labels) == "none"
    assert parse_category("none of these", labels) == "none"
    with pytest.raises(BadAnswer):
        parse_category("cyber and financial", labels)
    with pytest.raises(BadAnswer):
        parse_category("cooking", labels)


# --------------------------------------------------------------------------- data


HARMFUL = ["fire car bike", "car fire fire", "bike car"]
BENIGN = ["cat dog rain", "rain sun tree", "dog tree cat"]


def planted_sae(
    loaded: LoadedModel, layer: int, feature: int, d_sae: int = 16
) -> SparseAutoencoder:
    """A random SAE whose ``feature`` fires on the harmful prompts' tokens only."""
    from steerlex.models.chat import encode_prompt

    sae = SparseAutoencoder(
        SAEConfig(d_in=32, d_sae=d_sae, k=3, weights_id=loaded.weights_id, layer=layer)
    )
    rows, labels = [], []
    for texts, y in ((HARMFUL, 1.0), (BENIGN, -1.0)):
        for t in texts:
            e = encode_prompt(loaded.tokenizer, t, chat=True)
            with torch.no_grad():
                h = forward_to_layer(loaded.model, torch.tensor([e.input_ids]), layer=layer)
            rows.append(h[0, e.content_start : e.content_end])
            labels += [y] * (e.content_end - e.content_start)
    X, y_t = torch.cat(rows), torch.tensor(labels)
    w = torch.linalg.pinv(X) @ y_t  # X w = +1 on harmful tokens, -1 on benign ones
    with torch.no_grad():
        sae.W_enc[:, feature] = 50.0 * w
    return sae


def test_data_selection_finds_the_planted_feature(tiny_loaded: LoadedModel) -> None:
    sae = planted_sae(tiny_loaded, layer=1, feature=5)
    sel = select_features(
        [expl(5, "fire, car")], "harm", DataSelection(HARMFUL, BENIGN, batch_size=2),
        sae=sae, loaded=tiny_loaded, top_n=3, progress=False,
    )  # fmt: skip
    top = sel.features[0]
    assert top.id == 5 and top.words == ("fire", "car")
    assert top.details["mean_harmful"] > 10 and top.details["mean_benign"] == 0.0
    assert top.details["difference"] == pytest.approx(top.score)
    assert "on harmful vs 0 on benign prompts" in top.reason
    assert sel.side == "input" and sel.settings["direction"] == "harmful"
    assert sel.settings["layer"] == 1 and sel.settings["positions"] == "content"
    assert sel.settings["batch_size"] == 2 and sel.settings["n_harmful"] == 3
    reverse = select_features(
        None, "safety", DataSelection(HARMFUL, BENIGN, direction="benign"), sae=sae,
        loaded=tiny_loaded, progress=False,
    )  # fmt: skip
    assert 5 not in reverse.ids and reverse.settings["top_n"] == 20  # the data default
    with pytest.raises(SelectionError, match="side='output' does not apply"):
        select_features(None, "harm", DataSelection(HARMFUL, BENIGN), sae=sae, side="output")
    with pytest.raises(SelectionError, match="needs the SAE and its model"):
        select_features(None, "harm", DataSelection(HARMFUL, BENIGN), sae=sae)
    # per-prompt means do not depend on batching (right padding, content positions only)
    one = mean_activations(tiny_loaded, sae, HARMFUL, layer=1, batch_size=1, progress=False)
    three = mean_activations(tiny_loaded, sae, HARMFUL, layer=1, batch_size=3, progress=False)
    torch.testing.assert_close(one, three, atol=1e-4, rtol=1e-4)


def test_data_selection_rejects_a_mismatched_sae(tiny_loaded: LoadedModel) -> None:
    data = DataSelection(HARMFUL, BENIGN)
    with pytest.raises(SteerlexError, match="d_in=48 does not match layer 1 width 32"):
        select_features(None, "harm", data, sae=small_sae(8, d_in=48, layer=1), loaded=tiny_loaded)
    other = small_sae(8, layer=1, weights_id="sha256:other", model_spec="elsewhere")
    with pytest.raises(SAEError, match="use the model it was trained on"):
        select_features(None, "harm", data, sae=other, loaded=tiny_loaded)
    with pytest.raises(SelectionError, match="does not record its layer"):
        select_features(None, "harm", data, sae=small_sae(8), loaded=tiny_loaded)


# --------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    """``steerlex select ...`` through the main CLI."""
    return main(["select", *argv])


@pytest.fixture
def saved(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    import steerlex.text_embed

    monkeypatch.setattr(steerlex.text_embed, "load_sentence_encoder", lambda: FakeEncoder())
    model_dir = save_tiny_model(tmp_path / "tiny")
    loaded = load_model(str(model_dir))
    sae = planted_sae(loaded, layer=1, feature=5)
    sae.cfg.model_spec = str(model_dir)
    save_sae(sae, tmp_path / "sae")
    es = [expl(i, "table, chair") for i in range(16)]
    es[3] = expl(3, "protect, secure, safe")
    es[5] = expl(5, "weapon, bomb, poison", method="mi")
    write_explanations(es, tmp_path / "sae" / "explanations", "mi", {"model": str(model_dir)})
    write_explanations(
        [Explanation(e.feature, "mi-input", e.words, e.scores) for e in es],
        tmp_path / "sae" / "explanations", "mi-input", {"model": str(model_dir)},
    )  # fmt: skip
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL * 4) + "\n")
    (tmp_path / "benign.txt").write_text("\n".join(BENIGN * 4) + "\n")
    return {"root": tmp_path, "sae": tmp_path / "sae", "model": model_dir}


def test_cli_semantic_manual_and_data(
    saved: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    sae = str(saved["sae"])
    assert run_cli(["--sae", sae, "--concept", "safety", "--top-n", "2"]) == 0
    out = capsys.readouterr()
    assert re.search(r"^3\s+1\.000\s+protect, secure, safe\s+semantic match", out.out, re.M)
    written = json.loads((saved["sae"] / "selected_safety.json").read_text())
    assert written["features"][0]["id"] == 3 and written["explanations"]["method"] == "mi"
    assert written["sae"]["d_sae"] == 16 and written["sae"]["path"] == sae

    assert run_cli(["--sae", sae, "--concept", "harm", "--threshold", "0.5",
                    "--out", str(saved["root"] / "h.json")]) == 0  # fmt: skip
    h = FeatureSelection.load(saved["root"] / "h.json")
    assert h.ids == [5] and h.side == "input" and h.explanations is not None
    assert h.explanations["method"] == "mi-input"

    assert run_cli(["--sae", sae, "--concept", "guards", "--concept-words", "guard,shield",
                    "--concept-text", "guarding", "--top-n", "1"]) == 0  # fmt: skip
    custom = FeatureSelection.load(saved["sae"] / "selected_guards.json")
    assert custom.concept.words == ("guard", "shield") and custom.ids == [3]

    assert run_cli(["--sae", sae, "--concept", "safety", "--method", "manual", "--ids", "2,9"]) == 0
    assert FeatureSelection.load(saved["sae"] / "selected_safety.json").ids == [2, 9]

    assert run_cli(["--sae", sae, "--concept", "harm", "--method", "data", "--quiet",
                    "--harmful", str(saved["root"] / "harmful.txt"),
                    "--benign", str(saved["root"] / "benign.txt"), "--split", "all",
                    "--top-n", "3", "--out", str(saved["root"] / "d.json")]) == 0  # fmt: skip
    d = json.loads((saved["root"] / "d.json").read_text())
    assert d["features"][0]["id"] == 5 and d["features"][0]["mean_benign"] == 0.0
    assert d["settings"]["split"] == "all" and d["settings"]["n_harmful"] == 12
    assert d["features"][0]["words"] == ["weapon", "bomb", "poison"]


def test_cli_bad_inputs(saved: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    sae = str(saved["sae"])
    cases = [
        (["--concept", "nonsense"], "Unknown concept 'nonsense'"),
        (["--concept", "fruit", "--concept-words", "banana"], "lower threshold"),
        (["--concept", "safety", "--method", "manual", "--ids", "1,99"], "out of range"),
        (["--concept", "safety", "--method", "manual"], "No feature ids given"),
        (["--concept", "safety", "--explanation-method", "paper"], "has: mi, mi-input"),
    ]
    for argv, message in cases:
        assert run_cli(["--sae", sae, *argv]) == 2, argv
        printed = capsys.readouterr()
        assert message in printed.out + printed.err
    # explanations of a bigger SAE
    big = [expl(i, "safe") for i in range(40)]
    write_explanations(big, saved["root"] / "big", "mi", {"n_features": 40})
    assert run_cli(["--sae", sae, "--concept", "safety", "--explanations",
                    str(saved["root"] / "big")]) == 2  # fmt: skip
    assert "belong to another SAE" in "".join(capsys.readouterr())
    write_explanations(big[:3], saved["root"] / "other", "mi", {"model": "someone-else"})
    assert run_cli(["--sae", sae, "--concept", "safety", "--explanations",
                    str(saved["root"] / "other")]) == 2  # fmt: skip
    assert "written with model someone-else" in "".join(capsys.readouterr())
