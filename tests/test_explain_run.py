"""steerlex explain on a tiny saved model: JSONL output, vocabulary, bad inputs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import WORDS, save_tiny_model
from steerlex.cli import main
from steerlex.core.errors import ExplainError, SAEError
from steerlex.explain.run import explain_sae
from steerlex.explain.vocabulary import vocabulary_from_file
from steerlex.models.loading import load_model
from steerlex.sae import SAEConfig, SparseAutoencoder, save_sae


@pytest.fixture
def setup(tmp_path: Path, cache_dir: Path) -> dict[str, Path]:
    model_dir = save_tiny_model(tmp_path / "tiny")
    weights_id = load_model(str(model_dir)).weights_id
    sae = SparseAutoencoder(
        SAEConfig(d_in=32, d_sae=24, k=4, model_spec=str(model_dir), weights_id=weights_id, layer=1)
    )
    save_sae(sae, tmp_path / "sae")
    vocab = tmp_path / "words.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    return {"model": model_dir, "sae": tmp_path / "sae", "vocab": vocab, "root": tmp_path}


def test_explain_cli_writes_jsonl(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = setup["root"] / "expl"
    code = main(["explain", "--sae", str(setup["sae"]), "--method", "mi", "--method", "paper",
                 "--method", "logitlens", "--method", "mi-input", "--vocab", str(setup["vocab"]), "--top-k", "5", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert "mi: 24 features explained" in capsys.readouterr().out
    for method in ("mi", "paper", "logitlens", "mi-input"):
        rows = [json.loads(line) for line in (out / f"{method}.jsonl").read_text().splitlines()]
        assert [r["feature"] for r in rows] == list(range(24))
        assert all(
            len(r["words"]) == 5 and len(r["scores"]) == 5 and r["method"] == method for r in rows
        )
        settings = json.loads((out / f"{method}.json").read_text())
        assert settings["n_features"] == 24 and settings["top_k"] == 5
    mi_rows = [json.loads(line) for line in (out / "mi.jsonl").read_text().splitlines()]
    vocab_words = set(json.loads((out / "vocabulary.json").read_text())["words"])
    assert all(set(r["words"]) <= vocab_words for r in mi_rows)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in mi_rows)


def test_explain_bad_inputs(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_model(str(setup["model"]))
    vocab = vocabulary_from_file(setup["vocab"])
    sae = SparseAutoencoder(
        SAEConfig(
            d_in=32, d_sae=24, k=4, weights_id="sha256:other", model_spec="elsewhere", layer=1
        )
    )
    with pytest.raises(SAEError, match=r"trained on elsewhere \(sha256:other\)"):
        explain_sae(sae, loaded, "mi", vocab=vocab)
    ok = SparseAutoencoder(SAEConfig(d_in=32, d_sae=24, k=4, layer=1))
    with pytest.raises(ExplainError, match=r"Feature ids \[30\] are out of range"):
        explain_sae(ok, loaded, "mi", vocab=vocab, features=[30])
    with pytest.raises(ExplainError, match="needs a vocabulary"):
        explain_sae(ok, loaded, "mi")
    with pytest.raises(ExplainError, match="Unknown explanation method 'n2g'"):
        explain_sae(ok, loaded, "n2g", vocab=vocab)
    wide = SparseAutoencoder(SAEConfig(d_in=48, d_sae=24, k=4, layer=1))
    code = main(["explain", "--sae", str(setup["root"] / "nope"), "--method", "mi"])
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    save_sae(wide, setup["root"] / "wide")
    code = main(["explain", "--sae", str(setup["root"] / "wide"), "--model", str(setup["model"]), "--method", "mi",
                 "--vocab", str(setup["vocab"])])  # fmt: skip
    assert code == 2
    assert "d_in=48" in capsys.readouterr().err


def test_explain_topact_from_a_harvested_store(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import SENTENCES

    texts = setup["root"] / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    acts = setup["root"] / "acts"
    assert main(["harvest", "--model", str(setup["model"]), "--layer", "1", "--source", str(texts),
                 "--out", str(acts), "--quiet"]) == 0  # fmt: skip
    out = setup["root"] / "expl"
    code = main(["explain", "--sae", str(setup["sae"]), "--method", "topact", "--activations", str(acts),
                 "--top-k", "5", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (out / "topact.jsonl").read_text().splitlines()]
    assert [r["feature"] for r in rows] == list(range(24))
    words_in_texts = set(" ".join(SENTENCES).split()) | {
        "end",
        "assistant",
    }  # chat-template tokens after the text
    assert any(r["words"] for r in rows)
    extra = {w for r in rows for w in r["words"]} - words_in_texts
    assert not extra, extra
    assert not (out / "vocabulary.json").exists()
    capsys.readouterr()
    code = main(["explain", "--sae", str(setup["sae"]), "--method", "topact", "--out", str(out)])
    assert code == 2 and "needs an activation store" in capsys.readouterr().err


def test_explain_metrics_and_neuronpedia_cli(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = setup["root"] / "expl"
    assert main(["explain", "--sae", str(setup["sae"]), "--method", "mi", "--method", "logitlens",
                 "--vocab", str(setup["vocab"]), "--top-k", "8", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    code = main(["explain-metrics", "--sae", str(setup["sae"]), "--explanations", str(out),
                 "--features", "6", "--no-levels", "--quiet"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| mi |" in printed and "| logitlens |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"] == ["logitlens", "mi"] and len(metrics["features"]) == 6
    for side in ("output_faithfulness", "input_faithfulness"):
        for m in ("mi", "logitlens"):
            assert 0.0 <= metrics[side][m]["auroc_mean"] <= 1.0
    assert "superficial" in metrics["frequency_bias"]["skipped"]  # 54 words, all top-250
    md = (out / "metrics.md").read_text()
    assert md.startswith("| method |") and "6 sampled features side by side" in md
    assert f"| {metrics['features'][0]} | " in md

    assert main(["export-neuronpedia", "--sae", str(setup["sae"]), "--explanations", str(out),
                 "--model-id", "tiny", "--method", "mi"]) == 0  # fmt: skip
    batch = out / "neuronpedia" / "tiny" / "1-steerlex-res-24" / "explanations" / "batch-0.jsonl.gz"
    records = [json.loads(x) for x in gzip.decompress(batch.read_bytes()).splitlines()]
    assert len(records) == 24  # tests/test_neuronpedia_export.py checks the whole export
    first = records[0]
    assert first["modelId"] == "tiny" and first["layer"] == "1-steerlex-res-24"
    assert first["index"] == "0" and first["typeName"] == "steerlex-mi"
    assert first["explanationModelName"] is None and first["description"]


def test_read_explanations_errors(tmp_path: Path) -> None:
    from steerlex.explain.run import Explanation, read_explanations, write_explanations

    with pytest.raises(ExplainError, match="does not exist"):
        read_explanations(tmp_path / "none.jsonl")
    e = Explanation(3, "mi", ("cat", "dog"), (0.5, 0.25), "pets")
    path = write_explanations([e], tmp_path, "mi", {})
    assert read_explanations(path) == [e]
    path.write_text('{"feature": 1}\n')
    with pytest.raises(ExplainError, match="line 1 is not an explanation record"):
        read_explanations(path)


def test_explain_metrics_cli_without_files(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    empty = setup["root"] / "empty"
    empty.mkdir()
    code = main(["explain-metrics", "--sae", str(setup["sae"]), "--explanations", str(empty)])
    assert code == 2 and "run `steerlex explain` first" in capsys.readouterr().err


def test_explain_cli_with_summaries(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from test_explain_summaries import FakeLLM

    llm = FakeLLM()
    try:
        out = setup["root"] / "expl-s"
        code = main(["explain", "--sae", str(setup["sae"]), "--method", "mi", "--vocab", str(setup["vocab"]),
                     "--top-k", "5", "--out", str(out), "--quiet", "--summaries", "openai",
                     "--llm-base-url", llm.base_url, "--llm-model", "fake"])  # fmt: skip
    finally:
        llm.close()
    assert code == 0
    assert "summaries: 24 described" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "mi.jsonl").read_text().splitlines()]
    assert all(r["summary"] for r in rows)
    settings = json.loads((out / "mi.json").read_text())
    assert settings["summaries"]["summarized"] == 24
    code = main(["explain", "--sae", str(setup["sae"]), "--method", "mi", "--summaries", "openai"])
    assert code == 2 and "needs base_url" in capsys.readouterr().err
