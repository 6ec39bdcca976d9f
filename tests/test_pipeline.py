"""`steerlex run`: the config (strict keys, profiles), the run directory guard, stage order,
resume after an interruption and the missing-input errors, on fake stages (the real chain
runs in test_pipeline_quick.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steerlex.cli import main
from steerlex.core.errors import PipelineError
from steerlex.pipeline import run as prun
from steerlex.pipeline.config import (
    PROFILES,
    RunConfig,
    config_dict,
    config_fingerprint,
    config_from_dict,
    eval_section,
    resolve_config,
)


def test_profiles_resolve_and_round_trip() -> None:
    for name in PROFILES:
        cfg = resolve_config(name)
        again = config_from_dict(config_dict(cfg))
        assert config_fingerprint(again) == config_fingerprint(cfg)
    assert resolve_config("quick").model != resolve_config("default").model


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"harvest": {"limt": 3}}, "limt"),
        ({"sae": {"d_sae": "big"}}, "'sae.d_sae' must be an integer"),
        ({"layer": 2.5}, "'layer' must be an integer"),
        ({"eval": {"sets": {"n_benign": "x"}}}, "'eval.sets.n_benign'"),
        ({"eval": {"bogus": 1}}, "bogus"),
        ({"eval": {"sae": "x"}}, "eval.sae"),
        ({"explain": {"methods": ["mi", "paper"]}}, "mi-input"),
        ({"explain": {"methods": ["mi", "mi-input", "nope"]}}, "nope"),
        ({"name": "../x"}, "plain directory name"),
    ],
)
def test_bad_config_names_the_key(data: dict, needle: str) -> None:
    with pytest.raises(PipelineError, match=None) as info:
        config_from_dict(data)
    assert needle in str(info.value)


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(PipelineError, match="not valid JSON"):
        resolve_config("default", bad)
    with pytest.raises(PipelineError, match="does not exist"):
        resolve_config("default", tmp_path / "missing.json")
    with pytest.raises(PipelineError, match="Unknown profile"):
        resolve_config("huge")


def test_eval_section_fills_features() -> None:
    cfg = config_from_dict(
        {"eval": {"defences": [
            {"kind": "none"},
            {"kind": "amplify", "strengths": [1.0]},
            {"kind": "amplify", "name": "a-data", "features": "data"},
            {"kind": "calibrate", "conditional": True},
        ]}}
    )  # fmt: skip
    data = eval_section(cfg, sae="S", safety="safe.json", harm="harm.json")
    d = data["defences"]
    assert "features" not in d[0]
    assert d[1]["features"] == "safe.json" and "harm_features" not in d[1]
    assert d[2]["features"] is None  # the evaluation's data-selected features
    assert d[3]["features"] == "safe.json" and d[3]["harm_features"] == "harm.json"
    assert (data["sae"], data["layer"], data["model"]) == ("S", cfg.layer, cfg.model)


def _fake_stages(calls: list[str], fail: set[str]) -> tuple[prun.Stage, ...]:
    def make(name: str, out: str):  # type: ignore[no-untyped-def]
        def run(cfg: RunConfig, d: Path) -> None:
            calls.append(name)
            if name in fail:
                raise KeyboardInterrupt
            (d / out).write_text(name)

        return run

    return (
        prun.Stage("a", (), ("a.txt",), make("a", "a.txt"), "first"),
        prun.Stage("b", (("a.txt", "a"),), ("b.txt",), make("b", "b.txt"), "second"),
        prun.Stage("c", (("b.txt", "b"),), ("c.txt",), make("c", "c.txt"), "third"),
    )


def test_resume_after_interrupt_keeps_finished_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    fail = {"b"}
    monkeypatch.setattr(prun, "STAGES", _fake_stages(calls, fail))
    cfg = config_from_dict({"name": "r"})
    with pytest.raises(KeyboardInterrupt):
        prun.run_pipeline(cfg, tmp_path, log=None)
    assert calls == ["a", "b"]
    fail.clear()
    d = prun.run_pipeline(cfg, tmp_path, log=None)
    assert calls == ["a", "b", "b", "c"]  # a was kept
    record = json.loads((d / "run.json").read_text())
    assert set(record["stages"]) == {"a", "b", "c"}
    saved = json.loads((d / "config.json").read_text())
    assert saved["fingerprint"] == config_fingerprint(cfg)
    assert saved["config"]["sae"]["d_sae"] == cfg.sae.d_sae  # every default written out
    # a deleted output makes its stage run again
    (d / "c.txt").unlink()
    prun.run_pipeline(cfg, tmp_path, log=None)
    assert calls[-1] == "c" and calls.count("a") == 1


def test_missing_input_names_the_stage_to_run_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prun, "STAGES", _fake_stages([], set()))
    cfg = config_from_dict({"name": "m"})
    with pytest.raises(PipelineError, match=r"needs .*b\.txt.*stage b makes.*--stage b"):
        prun.run_pipeline(cfg, tmp_path, only=["c"], log=None)
    with pytest.raises(PipelineError, match="Unknown stage"):
        prun.run_pipeline(cfg, tmp_path, only=["zz"], log=None)


def test_run_dir_of_another_config_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prun, "STAGES", _fake_stages([], set()))
    prun.run_pipeline(config_from_dict({"name": "x"}), tmp_path, log=None)
    other = config_from_dict({"name": "x", "sae": {"d_sae": 4096}})
    with pytest.raises(PipelineError, match=r"another config .*sae\.d_sae.*--name x-2"):
        prun.run_pipeline(other, tmp_path, log=None)
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not a steerlex run directory"):
        prun.run_pipeline(config_from_dict({"name": "y"}), tmp_path, log=None)


def test_cli_print_config_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--profile", "quick", "--name", "n1", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "n1" and out["eval"]["sets"]["n_benign"] == 4
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"sae": {"nope": 1}}))
    assert main(["run", str(cfg), "--runs-dir", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_reference_is_current() -> None:
    from steerlex.cli_reference import cli_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert doc.read_text(encoding="utf-8") == cli_reference(), (
        "docs/cli.md is stale: python -m steerlex.cli_reference > docs/cli.md"
    )
