"""`steerlex run`: the config (strict keys, sections that are the stages' configs, owned
keys, profiles), the run directory guard, stage order, resume after an interruption or a
failed stage, and the missing-input errors, on fake stages (the real chain runs in
test_pipeline_quick.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from steerlex.cli import main
from steerlex.cli.reference import cli_reference, config_reference
from steerlex.cli.run import parse_set
from steerlex.core.errors import PipelineError, RunInterrupted, StageError, StoreError
from steerlex.jobs.context import RunContext
from steerlex.jobs.evaluate import plan_run_defences
from steerlex.jobs.harvest import HarvestConfig
from steerlex.pipeline import run as prun
from steerlex.pipeline.config import (
    PROFILES,
    RunConfig,
    config_dict,
    config_fingerprint,
    config_from_dict,
    resolve_config,
)
from steerlex.pipeline.stages import StageConfigs, stage_configs
from steerlex.report.headline import summary_lines
from steerlex.sae.train import TrainConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_profiles_resolve_and_round_trip() -> None:
    for name in PROFILES:
        cfg = resolve_config(name)
        again = config_from_dict(config_dict(cfg))
        assert config_fingerprint(again) == config_fingerprint(cfg)
    assert resolve_config("quick").model != resolve_config("default").model


def test_sections_are_the_stage_configs_with_their_defaults() -> None:
    cfg = resolve_config("quick", overrides={"train_sae": {"tied": True, "auxk_k": 64}})
    assert isinstance(cfg.harvest, HarvestConfig) and isinstance(cfg.train_sae, TrainConfig)
    # every training option can be set; the ones not given keep TrainConfig's defaults
    assert cfg.train_sae.tied and cfg.train_sae.auxk_k == 64
    assert cfg.train_sae.k_start is TrainConfig().k_start
    assert cfg.train_sae.dead_tokens == TrainConfig().dead_tokens
    written = config_dict(cfg)
    assert "k_start" in written["train_sae"] and "architecture" in written["train_sae"]
    # keys the run owns are never written out
    assert "out" not in written["harvest"] and "layer" not in written["harvest"]
    assert "sae" not in written["eval"] and "device" not in written["train_sae"]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"harvest": {"limt": 3}}, "limt"),
        ({"train_sae": {"d_sae": "big"}}, "'train_sae.d_sae' must be an integer"),
        ({"layer": 2.5}, "'layer' must be an integer"),
        ({"eval": {"sets": {"n_benign": "x"}}}, "'eval.sets.n_benign'"),
        ({"eval": {"bogus": 1}}, "bogus"),
        ({"eval": {"sae": "x"}}, "eval.sae"),
        ({"harvest": {"layer": 3}}, "harvest.layer"),
        ({"select": {"safety": {"out": "x.json"}}}, "select.safety.out"),
        ({"explain": {"methods": ["mi", "paper"]}}, "mi-input"),
        ({"explain": {"methods": ["mi", "mi-input", "nope"]}}, "nope"),
        ({"eval": {"defences": [{"kind": "dense", "suffix": "x"}]}}, "suffix"),
        ({"sae": {"d_sae": 64}}, "sae"),
        ({"name": "../x"}, "plain directory name"),
    ],
)
def test_bad_config_names_the_key(data: dict, needle: str) -> None:
    with pytest.raises(PipelineError) as info:
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


def test_stage_configs_fill_what_the_run_owns(tmp_path: Path) -> None:
    cfg = resolve_config("quick", overrides={"device": "cpu"})
    c = stage_configs(cfg, tmp_path / "r")
    assert c.harvest["train"].split == "train" and c.harvest["heldout"].split == "heldout"
    assert c.harvest["train"].layer == cfg.layer == c.examples.layer
    assert c.train_sae.activations == str(tmp_path / "r" / "acts-train")
    assert c.train_sae.d_sae == cfg.train_sae.d_sae
    assert c.eval_sae.activations == str(tmp_path / "r" / "acts-heldout")
    assert c.explain.methods == cfg.explain.methods
    assert c.select["harm"].concept == "harm" and c.select["safety"].top_n == 4
    assert c.eval.model == cfg.model and c.eval.sae == str(tmp_path / "r" / "sae")
    bad = resolve_config("quick", overrides={"harvest": {"sources": []}})
    with pytest.raises(StoreError, match="No text source"):
        stage_configs(bad, tmp_path / "r")


def test_run_defences_get_the_selected_features() -> None:
    cfg = config_from_dict(
        {"eval": {"defences": [
            {"kind": "none"},
            {"kind": "amplify", "strengths": [1.0]},
            {"kind": "amplify", "name": "a-data", "features": "data", "strengths": [1.0]},
            {"kind": "calibrate", "conditional": True, "strengths": [2.0]},
            {"kind": "calibrate", "name": "c-feat", "conditional": True, "detector": "features",
             "strengths": [2.0]},
            {"kind": "dense", "conditional": True, "detector": "features", "strengths": [0.1]},
        ]}}
    )  # fmt: skip
    e = plan_run_defences(
        cfg.eval, model="M", device="cpu", sae="S", layer=3, out="o", safety="s.json",
        harm="h.json",
    )  # fmt: skip
    assert e.defences is not None
    none, amp, data, cal, cal_feat, dense = (d.options for d in e.defences)
    assert not hasattr(none, "features")
    assert amp.features == "s.json" and amp.harm_features is None
    assert data.features is None  # the evaluation's data-selected features
    # the default gate is the probe: no harm features; a features gate gets the run's
    assert cal.features == "s.json" and cal.harm_features is None and cal.detector == "probe"
    assert cal_feat.harm_features == "h.json" and dense.harm_features == "h.json"
    assert (e.model, e.sae, e.layer, e.out) == ("M", "S", 3, "o")


def _stages(calls: list[str], fail: dict[str, BaseException]) -> tuple[prun.Stage, ...]:
    def make(name: str, out: str):  # type: ignore[no-untyped-def]
        def run(c: StageConfigs, d: Path, ctx: object) -> None:
            calls.append(name)
            if name in fail:
                raise fail[name]
            (d / out).write_text(name)

        return run

    def fixed(*paths: str):  # type: ignore[no-untyped-def]
        return lambda c: paths

    return (
        prun.Stage("a", fixed(), fixed("a.txt"), make("a", "a.txt"), "first"),
        prun.Stage("b", fixed(("a.txt", "a")), fixed("b.txt"), make("b", "b.txt"), "second"),
        prun.Stage("c", fixed(("b.txt", "b")), fixed("c.txt"), make("c", "c.txt"), "third"),
    )


def _quick(name: str, **over: object) -> RunConfig:
    return resolve_config("quick", overrides={"name": name, **over})


def test_resume_after_interrupt_keeps_finished_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    fail: dict[str, BaseException] = {"b": KeyboardInterrupt()}
    monkeypatch.setattr(prun, "STAGES", _stages(calls, fail))
    cfg = _quick("r")
    with pytest.raises(RunInterrupted) as info:
        prun.run_pipeline(cfg, tmp_path, log=None)
    assert "stage b was stopped" in str(info.value)
    assert f"steerlex run --resume {tmp_path / 'r'}" in str(info.value)
    assert calls == ["a", "b"]
    fail.clear()
    d = prun.run_pipeline(cfg, tmp_path, log=None)
    assert calls == ["a", "b", "b", "c"]  # a was kept
    record = json.loads((d / "run.json").read_text())
    assert set(record["stages"]) == {"a", "b", "c"} and record["model_loads"] == 0
    saved = json.loads((d / "config.json").read_text())
    assert saved["fingerprint"] == config_fingerprint(cfg)
    assert saved["config"]["train_sae"]["d_sae"] == cfg.train_sae.d_sae  # defaults written out
    # a deleted output makes its stage run again
    (d / "c.txt").unlink()
    prun.run_pipeline(cfg, tmp_path, log=None)
    assert calls[-1] == "c" and calls.count("a") == 1


def test_a_failed_stage_names_itself_and_the_resume_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    fail: dict[str, BaseException] = {"b": StoreError("the store is broken")}
    monkeypatch.setattr(prun, "STAGES", _stages(calls, fail))
    with pytest.raises(StageError) as info:
        prun.run_pipeline(_quick("f"), tmp_path, log=None)
    assert info.value.stage == "b" and isinstance(info.value.cause, StoreError)
    assert str(info.value).startswith("stage b failed: the store is broken")
    assert f"steerlex run --resume {tmp_path / 'f'}" in str(info.value)
    # through the CLI: one message, exit status 2; the resume command continues the run
    assert main(["run", "--profile", "quick", "--name", "f", "--runs-dir", str(tmp_path)]) == 2
    assert "steerlex run: error: stage b failed" in capsys.readouterr().err
    fail.clear()
    assert main(["run", "--resume", str(tmp_path / "f")]) == 0
    assert calls == ["a", "b", "b", "b", "c"]
    fail["c"] = KeyboardInterrupt()
    (tmp_path / "f" / "c.txt").unlink()
    assert main(["run", "--resume", str(tmp_path / "f")]) == 130
    assert "stage c was stopped" in capsys.readouterr().err


def test_resumed_config_reads_the_run_and_takes_the_directory_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prun, "STAGES", _stages([], {}))
    cfg = _quick("orig", train_sae={"d_sae": 512})
    d = prun.run_pipeline(cfg, tmp_path, log=None)
    moved = d.rename(tmp_path / "moved")
    back = prun.resumed_config(moved)
    assert back.name == "moved" and back.train_sae.d_sae == 512
    assert config_dict(back) == {**config_dict(cfg), "name": "moved"}
    (moved / "config.json").write_text(json.dumps({"config": [1]}))
    with pytest.raises(PipelineError, match="holds no 'config' object"):
        prun.resumed_config(moved)
    with pytest.raises(PipelineError, match=r"absent.config\.json does not exist"):
        prun.resumed_config(tmp_path / "absent")


def test_missing_input_names_the_stage_to_run_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prun, "STAGES", _stages([], {}))
    cfg = _quick("m")
    with pytest.raises(PipelineError, match=r"needs .*b\.txt.*stage b makes.*--stage b"):
        prun.run_pipeline(cfg, tmp_path, only=["c"], log=None)
    with pytest.raises(PipelineError, match="Unknown stage"):
        prun.run_pipeline(cfg, tmp_path, only=["zz"], log=None)


def test_run_dir_of_another_config_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prun, "STAGES", _stages([], {}))
    prun.run_pipeline(_quick("x"), tmp_path, log=None)
    other = _quick("x", train_sae={"d_sae": 4096})
    with pytest.raises(PipelineError, match=r"another config .*train_sae\.d_sae.*--name x-2"):
        prun.run_pipeline(other, tmp_path, log=None)
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not a steerlex run directory"):
        prun.run_pipeline(_quick("y"), tmp_path, log=None)


def test_parse_set() -> None:
    assert parse_set(["train_sae.tied=true", "name=x", "harvest.limit=null"]) == {
        "train_sae": {"tied": True},
        "name": "x",
        "harvest": {"limit": None},
    }
    assert parse_set(['harvest.sources=["benign"]']) == {"harvest": {"sources": ["benign"]}}
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(PipelineError, match="KEY=VALUE"):
            parse_set([bad])


def test_cli_print_config_set_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--profile", "quick", "--name", "n1", "--print-config"]
    assert main([*argv, "--set", "train_sae.architecture=batchtopk"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "n1" and out["eval"]["sets"]["n_benign"] == 4
    assert out["train_sae"]["architecture"] == "batchtopk"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train_sae": {"nope": 1}}))
    assert main(["run", str(cfg), "--runs-dir", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["run", "--set", "train_sae.architecture=dense", "--print-config"]) == 2
    assert "batchtopk" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--profile", "quick"]) == 2
    assert "--resume continues a run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("doc", "make", "command"),
    [("cli.md", cli_reference, "cli"), ("config.md", config_reference, "config")],
)
def test_reference_docs_are_current(doc: str, make: object, command: str) -> None:
    assert callable(make)
    assert (DOCS / doc).read_text(encoding="utf-8") == make(), (
        f"docs/{doc} is stale: python -m steerlex.cli.reference {command} > docs/{doc}"
    )


def test_a_partial_run_says_which_stages_are_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prun, "STAGES", _stages([], {}))
    log = io.StringIO()
    prun.run_pipeline(_quick("p"), tmp_path, only=["a"], ctx=RunContext(log=log))
    assert "not run yet: b, c" in log.getvalue() and "complete" not in log.getvalue()
    log = io.StringIO()
    prun.run_pipeline(_quick("p"), tmp_path, ctx=RunContext(log=log))
    assert f"run {tmp_path / 'p'} complete" in log.getvalue()


def test_a_run_ends_with_its_summary_even_when_outputs_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prun, "STAGES", _stages([], {}))
    log = io.StringIO()
    prun.run_pipeline(_quick("s"), tmp_path, only=["a"], ctx=RunContext(log=log))
    lines = log.getvalue().splitlines()
    start = lines.index(f"steerlex run: summary of {tmp_path / 's'}")
    tail = "\n".join(lines[start:])
    # the toy stages write none of the real outputs: each headline says what is missing
    assert "missing:" in tail and "sae/eval/eval.json (stage eval-sae)" in tail
    assert "eval/scores.json (stage eval)" in tail and "report.html (stage report)" in tail
    assert "complete" not in log.getvalue()
    assert lines[start + 1 :] == summary_lines(tmp_path / "s")[1:]
