"""``steerlex generate`` and ``steerlex chat`` on a saved tiny model and SAE."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model
from steerlex.cli import main
from steerlex.core.errors import SteeringError
from steerlex.models.loading import load_model
from steerlex.sae.base import SAEConfig, SparseAutoencoder
from steerlex.sae.formats import save_sae
from steerlex.steer.features import parse_feature_list
from steerlex.steer.probe import LinearProbe


def run(argv: Sequence[str]) -> int:
    """``steerlex ARGV`` through the main CLI."""
    return main(list(argv))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("steer-cli")
    model_dir = save_tiny_model(root / "model")
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, k=8, layer=2, model_spec=str(model_dir)))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    save_sae(sae, root / "sae")
    return model_dir, root / "sae"


def write_selection(path: Path, ids: list[int], d_sae: int = 64) -> Path:
    feats = [
        {"id": i, "score": 1.0, "reason": f"feature {i}", "words": ["cat", "dog"]} for i in ids
    ]
    path.write_text(json.dumps({"features": feats, "sae": {"d_sae": d_sae}}))
    return path


def test_generate_prints_replies_and_fired_features(
    saved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, sae_dir = saved
    sel = write_selection(tmp_path / "selected_features.json", [3, 11])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what is a tree\nwrite a poem about rain\n")
    code = run(
        ["generate", "--sae", str(sae_dir), "--features", str(sel), "--strategy", "amplify",
         "--alpha", "4", "--harm", "40,41", "--harm-threshold", "0", "--gate", "token",
         "--prompt", "tell me a story", "--prompts-file", str(prompts),
         "--max-new-tokens", "5", "--compare"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("=== prompt") == 3
    assert "=== prompt 1: tell me a story" in out and "--- unsteered:" in out
    assert "steering on: amplify alpha=4 on 2 features, gate token >= 0 on 2 harm features" in out
    assert "gate (token)" in out
    assert "(cat, dog)" in out  # labels from the selection file


def test_generate_gates_on_a_harm_probe_file(
    saved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, sae_dir = saved
    weights = load_model(str(model_dir)).weights_id
    good = tmp_path / "gate_probe.safetensors"
    LinearProbe(torch.zeros(32), 1e3, 2, weights).save(good)
    base = ["generate", "--sae", str(sae_dir), "--features", "3,11", "--strategy", "amplify",
            "--alpha", "4", "--prompt", "what is a tree", "--max-new-tokens", "3"]  # fmt: skip
    assert run([*base, "--harm", str(good)]) == 0
    out = capsys.readouterr().out
    assert "gate prompt mean >= 0 on harm probe" in out and "gate (prompt) open" in out
    other = tmp_path / "other_layer.safetensors"
    LinearProbe(torch.zeros(32), 1e3, 5, weights, meta={"model_name": "tiny"}).save(other)
    assert run([*base, "--harm", str(other)]) == 2
    err = capsys.readouterr().err
    assert "fitted on layer 5 of tiny" in err and "not layer 2" in err and "Traceback" not in err
    assert run([*base, "--harm", str(tmp_path / "none.safetensors")]) == 2
    assert "harm probe" in capsys.readouterr().err


def test_generate_json(saved: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, sae_dir = saved
    code = run(
        ["generate", "--sae", str(sae_dir), "--features", "3,11", "--strategy", "calibrate",
         "--target", "2", "--prompt", "what is a tree", "--max-new-tokens", "4", "--json"]
    )  # fmt: skip
    assert code == 0
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["prompt"] == "what is a tree"
    assert rec["report"]["steered"] is True
    assert [f["feature"] for f in rec["report"]["features"]] == [3, 11]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--features", "3,x"], "neither an existing file nor comma-separated"),
        (["--features", "3,99"], "d_sae=64"),
        (["--features", "3", "--strategy", "clamp", "--alpha", "2"], "does not take alpha"),
        (["--features", "3", "--strategy", "calibrate", "--target", "-1"], "target must be > 0"),
        (["--features", "3", "--strategy", "ablate", "--harm", "4"], "no conditional mode"),
        (["--features", "3", "--gate", "token"], "need --harm"),
        (["--features", "3", "--harm", "4", "--harm-threshold", "-1"], ">= 0"),
        (["--features", "missing.json"], "does not exist"),
    ],
)
def test_generate_bad_inputs_exit_2(
    saved: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    _, sae_dir = saved
    code = run(["generate", "--sae", str(sae_dir), "--prompt", "hi", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_generate_needs_prompts(
    saved: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, sae_dir = saved
    assert run(["generate", "--sae", str(sae_dir), "--features", "3"]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_chat_session(
    saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, sae_dir = saved
    script = "\n".join(
        [
            "tell me a story",
            "/strength",
            "/strength 3",
            "/strength abc",
            "/steer off",
            "what is a tree",
            "/steer on",
            "/reset",
            "/bogus",
            "write a poem",
            "/quit",
            "never read",
        ]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script + "\n"))
    code = run(
        ["chat", "--sae", str(sae_dir), "--features", "3,11", "--strategy", "amplify",
         "--alpha", "1", "--max-new-tokens", "4", "--system", "you help"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("steering on: amplify alpha=1 on 2 features")
    assert out.count("assistant> ") == 3
    assert "alpha = 1" in out
    assert "now: amplify alpha=3 on 2 features" in out
    assert "error: /strength takes a number" in out
    assert "steering off: amplify alpha=3" in out
    assert "steering off: amplify alpha=3 on 2 features; edited 0/" in out  # the report line
    assert "conversation cleared" in out
    assert "unknown command /bogus" in out


def test_chat_ends_at_end_of_input(
    saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, sae_dir = saved
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is a tree\n"))
    code = run(
        ["chat", "--sae", str(sae_dir), "--features", "3", "--strategy", "ablate",
         "--max-new-tokens", "3"]
    )  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.count("assistant> ") == 1


def test_parse_feature_list(tmp_path: Path) -> None:
    assert parse_feature_list(" 3, 17,42 ").ids == (3, 17, 42)
    sel = write_selection(tmp_path / "s.json", [5, 1])
    parsed = parse_feature_list(str(sel))
    assert parsed.ids == (5, 1) and parsed.labels[5] == "(cat, dog)"
    (tmp_path / "bad.json").write_text(json.dumps({"features": [{"score": 1}]}))
    with pytest.raises(SteeringError, match='no integer "id"'):
        parse_feature_list(str(tmp_path / "bad.json"))
    (tmp_path / "none.json").write_text(json.dumps({"chosen": []}))
    with pytest.raises(SteeringError, match='no "features" list'):
        parse_feature_list(str(tmp_path / "none.json"))
    other = SparseAutoencoder(SAEConfig(d_in=8, d_sae=32, k=4))
    with pytest.raises(SteeringError, match="d_sae=64.*d_sae=32"):
        parse_feature_list(str(sel), sae=other)
