"""train-sae, eval-sae and sae convert through the CLI, on a tiny saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SENTENCES, save_tiny_model
from steerlex.cli import main
from steerlex.sae import load_sae


@pytest.fixture
def run(tmp_path: Path, cache_dir: Path) -> dict[str, Path]:
    model_dir = save_tiny_model(tmp_path / "tiny")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES * 8) + "\n")
    acts = tmp_path / "acts"
    code = main(["harvest", "--model", str(model_dir), "--layer", "1", "--source", str(texts),
                 "--out", str(acts), "--texts-per-shard", "12", "--quiet"])  # fmt: skip
    assert code == 0
    return {"model": model_dir, "texts": texts, "acts": acts, "root": tmp_path}


def test_train_eval_convert(run: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    sae_dir = run["root"] / "sae"
    code = main(["train-sae", "--activations", str(run["acts"]), "--out", str(sae_dir), "--d-sae", "64",
                 "--k", "4", "--batch-size", "64", "--tokens", "1280", "--warmup-steps", "2", "--lr", "0.005",
                 "--init-sample-tokens", "256", "--quiet"])  # fmt: skip
    assert code == 0
    assert "Trained a topk SAE (d_in 32, d_sae 64, k 4)" in capsys.readouterr().out
    sae = load_sae(sae_dir)
    assert sae.cfg.layer == 1 and sae.cfg.k == 4 and sae.cfg.model_spec == str(run["model"])

    code = main(
        [
            "eval-sae",
            "--sae",
            str(sae_dir),
            "--activations",
            str(run["acts"]),
            "--max-lm-texts",
            "8",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "FVE" in out and "loss recovered" in out
    result = json.loads((sae_dir / "eval" / "eval.json").read_text())
    assert 0.0 < result["activation"]["fve"] <= 1.0
    assert result["spliced"]["n_texts"] == 8

    sp = run["root"] / "sparsify"
    assert main(["sae", "convert", str(sae_dir), str(sp), "--to", "sparsify"]) == 0
    back = load_sae(sp)
    x = torch.randn(5, 32)
    torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5)


def test_bad_inputs(run: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train-sae", "--activations", str(run["acts"]), "--out", str(run["root"] / "s"),
                 "--d-sae", "16", "--k", "32", "--quiet"])  # fmt: skip
    assert code == 2
    assert "k=32 must be between 1 and d_sae=16" in capsys.readouterr().err
    code = main(
        [
            "train-sae",
            "--activations",
            str(run["root"] / "nothing"),
            "--out",
            str(run["root"] / "s2"),
            "--quiet",
        ]
    )
    assert code == 2
    assert "No activation store" in capsys.readouterr().err
    # an SAE of another width against this store
    from steerlex.sae import SAEConfig, SparseAutoencoder, save_sae

    other = run["root"] / "other"
    save_sae(
        SparseAutoencoder(SAEConfig(d_in=48, d_sae=64, k=4, model_spec="elsewhere", layer=1)), other
    )
    code = main(
        ["eval-sae", "--sae", str(other), "--activations", str(run["acts"]), "--no-lm", "--quiet"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "48" in err and "32" in err and "Traceback" not in err
