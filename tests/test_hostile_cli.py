"""Hostile input to the CLI is refused before any work, with one message that names the
input and says what to do, never with a traceback: output paths that are files, under
files or not creatable; NaN and infinite numbers; a run's bad options and layer (before the
harvest); a dry run's feature ids and decoding settings; garbage SAE files; blank texts. Each
case runs ``steerlex`` in-process on the tiny random Llama of conftest."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SENTENCES, save_tiny_model
from steerlex.cli import main
from steerlex.data import BlankTextsWarning, load_texts
from steerlex.jobs.context import RunContext
from steerlex.pipeline import run as prun
from steerlex.pipeline.config import resolve_config

HAS_PROC = Path("/proc/self").is_dir()
PROC = "/proc/steerlex-hostile/x"  # /proc accepts no new directories, even for root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A tiny model directory, texts, a train store, a trained SAE, a garbage .pth, a plain
    file, and a run config and an eval config on them."""
    root = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEERLEX_CACHE", str(root / "cache"))
        model = save_tiny_model(root / "tiny")
        texts = root / "texts.txt"
        texts.write_text("\n".join(SENTENCES * 8) + "\n")
        acts, sae = root / "acts", root / "sae"
        assert main(["harvest", "--model", str(model), "--layer", "1", "--source", str(texts),
                     "--out", str(acts), "--texts-per-shard", "12", "--quiet"]) == 0  # fmt: skip
        assert main(["train-sae", "--activations", str(acts), "--out", str(sae), "--d-sae", "64",
                     "--k", "4", "--batch-size", "64", "--tokens", "256", "--warmup-steps", "1",
                     "--init-sample-tokens", "128", "--quiet"]) == 0  # fmt: skip
        garbage = root / "garbage" / "sae.pth"
        garbage.parent.mkdir()
        garbage.write_bytes(bytes(range(256)) * 16)  # random-looking bytes named sae.pth
        plain = root / "afile"
        plain.write_text("not a directory\n")
        blank = root / "blank.csv"
        blank.write_text("id,text\n1,   \n2,\t\n")
        run_cfg = root / "run.json"
        run_cfg.write_text(
            json.dumps({"model": str(model), "layer": 1, "harvest": {"sources": [str(texts)]}})
        )
        eval_cfg = root / "eval.json"
        eval_cfg.write_text(
            json.dumps(
                {
                    "sets": {"n_jailbreak": 2, "n_harmful": 2, "n_benign": 2, "n_selection": 2},
                    "generation": {"max_new_tokens": 2},
                    "defences": [{"kind": "none"}, {"kind": "amplify", "strengths": [1.0]}],
                }
            )
        )
        yield {
            "root": str(root), "model": str(model), "texts": str(texts), "acts": str(acts),
            "sae": str(sae), "garbage": str(garbage), "file": str(plain), "blank": str(blank),
            "run": str(run_cfg), "eval": str(eval_cfg),
        }  # fmt: skip


def _steerlex(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``steerlex ARGV`` in-process: (exit status, standard error). A usage error exits
    through argparse (SystemExit 2); any other exception fails the test as it is."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


HARVEST = "harvest --model {model} --layer 1 --source {texts} --quiet"
TRAIN = "train-sae --activations {acts} --d-sae 64 --k 4 --batch-size 64 --quiet"
EVAL_SAE = "eval-sae --sae {sae} --activations {acts} --max-lm-texts 2 --quiet"
EXPLAIN = "explain --sae {sae} --method topact --activations {acts} --quiet"
EVAL = "eval --config {eval} --model {model} --sae {sae} --quiet"
RUN = "run {run} --profile quick --runs-dir {root}/runs"

OUT_COMMANDS = {
    "harvest": (HARVEST, "--out"),
    "train-sae": (TRAIN, "--out"),
    "eval-sae": (EVAL_SAE, "--out"),
    "explain": (EXPLAIN, "--out"),
    "eval": (EVAL, "--out"),
    "run": ("run {run} --profile quick", "--runs-dir"),
}
BAD_OUTS = {
    "a-file": ("{file}", "is a file"),
    "under-a-file": ("{file}/sub", "is a file"),
    "not-creatable": (PROC, "accepts no new directories"),
}

NO_PROC = pytest.mark.skipif(not HAS_PROC, reason="no /proc")
OUT_CASES = [
    pytest.param(
        f"{base} {flag} {out}",
        2,
        (flag, needle),
        id=f"1-{cmd}-out-{kind}",
        marks=[NO_PROC] if kind == "not-creatable" else [],
    )
    for cmd, (base, flag) in OUT_COMMANDS.items()
    for kind, (out, needle) in BAD_OUTS.items()
]
OTHER_CASES = [
    pytest.param("explain-metrics --sae {sae} --out {root}", 2, ("--out", "is a directory"),
                 id="1-explain-metrics-out-a-directory"),
    pytest.param("explain-metrics --sae {sae} --out {file}/m.json", 2, ("--out", "not a directory"),
                 id="1-explain-metrics-out-under-a-file"),
    pytest.param("select --sae {sae} --concept safety --out {file}/s.json", 2,
                 ("--out", "not a directory"), id="1-select-out-under-a-file"),
    pytest.param("eval --config {eval} --out {root}/e --cache {root} --quiet", 2, ("--cache", "is a directory"),
                 id="1-eval-cache-a-directory"),
    # 2: NaN and infinities, on the command line and in a run's config (JSON NaN/Infinity)
    pytest.param(f"{TRAIN} --out {{root}}/t --lr nan", 2, ("--lr", "finite number"),
                 id="2-train-sae-lr-nan"),
    pytest.param(f"{TRAIN} --out {{root}}/t --auxk-coef inf", 2, ("--auxk-coef", "finite"),
                 id="2-train-sae-auxk-coef-inf"),
    pytest.param(f"{HARVEST} --out {{root}}/h --heldout-fraction nan", 2,
                 ("--heldout-fraction", "finite"), id="2-harvest-heldout-fraction-nan"),
    pytest.param("explain-metrics --sae {sae} --strengths 1 inf", 2, ("--strengths", "finite"),
                 id="2-explain-metrics-strength-inf"),
    pytest.param(f"{EVAL} --max-overrefusal-increase nan --dry-run", 2,
                 ("--max-overrefusal-increase", "finite"), id="2-eval-float-nan"),
    pytest.param(f"{RUN} --name nan --set train_sae.lr=NaN", 2, ("'train_sae.lr'", "finite"),
                 id="2-run-lr-nan"),
    pytest.param(f"{RUN} --name inf --set eval.max_overrefusal_increase=Infinity", 2,
                 ("'eval.max_overrefusal_increase'", "finite"), id="2-run-float-infinity"),
    # 3: every stage's options and the layer checked before the harvest runs
    pytest.param(f"{RUN} --name layer --set layer=99", 2, ("'layer'", "valid layers are 0..3"),
                 id="3-run-layer-99"),
    pytest.param(f"{RUN} --name dsae --set train_sae.d_sae=0", 2, ("d_sae=0", "at least 1"),
                 id="3-run-d-sae-0"),
    pytest.param(f"{RUN} --name mnt --set eval.generation.max_new_tokens=0", 2,
                 ("'eval'", "max_new_tokens", "at least 1"), id="3-run-max-new-tokens-0"),
    pytest.param(f"{RUN} --name topk --set explain.top_k=0", 2, ("top_k", "at least 1"),
                 id="3-run-explain-top-k-0"),
    # 4: a dry run checks what the run checks
    pytest.param(f"{EVAL} --out {{root}}/e --features 999 --dry-run", 2,
                 ("features", "999", "out of range", "d_sae=64"), id="4-dry-run-feature-999"),
    pytest.param(f"{EVAL} --out {{root}}/e --features 3,3 --dry-run", 2,
                 ("features", "more than once"), id="4-dry-run-feature-twice"),
    pytest.param(f"{EVAL} --out {{root}}/e --max-new-tokens 0 --dry-run", 2,
                 ("max_new_tokens", "at least 1"), id="4-dry-run-max-new-tokens-0"),
    # 6: a source of nothing but blank texts
    pytest.param(f"{HARVEST} --out {{root}}/b".replace("{texts}", "{blank}"), 2,
                 ("no non-empty texts", "whitespace only"), id="6-harvest-only-blank-texts"),
    # 7: a garbage .pth
    pytest.param("eval-sae --sae {garbage} --activations {acts} --out {root}/g --quiet", 2,
                 ("sae.pth is not a valid torch checkpoint", "damaged"), id="7-eval-sae-garbage-pth"),
    pytest.param("explain --sae {garbage} --method mi --quiet", 2,
                 ("sae.pth is not a valid torch checkpoint", "damaged"), id="7-explain-garbage-pth"),
]  # fmt: skip
CASES = [*OUT_CASES, *OTHER_CASES]


@pytest.mark.parametrize(("argv", "code", "needles"), CASES)
def test_hostile_input_is_refused_before_work(
    world: dict[str, str],
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    argv: str,
    code: int,
    needles: tuple[str, ...],
) -> None:
    before = sorted(p.name for p in Path(world["root"]).iterdir())
    got, err = _steerlex(argv.format(**world).split(), capsys)
    assert got == code, err
    assert "Traceback" not in err
    assert "error:" in err.strip().splitlines()[-1], err  # one message, last (after usage)
    for needle in needles:
        assert needle in err, (needle, err)
    # refused before any work: nothing new next to the inputs, no stage started
    assert sorted(p.name for p in Path(world["root"]).iterdir()) == before, err
    assert "[1/" not in err


def test_report_of_an_empty_run_names_the_missing_outputs(
    world: dict[str, str], cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*RUN.format(**world).split(), "--name", "empty", "--stage", "report"]
    code, err = _steerlex(argv, capsys)
    assert code == 0 and "Traceback" not in err
    assert "partial report: the outputs of 9 earlier stage(s) are missing" in err
    assert "harvest (acts-train/index.json, acts-heldout/index.json)" in err
    assert "train-sae (sae/cfg.json)" in err and "eval (eval/scores.json)" in err
    assert "--stage report" in err and "complete" not in err
    assert re.search(r"not run yet: harvest, train-sae, .*examples", err)


def test_a_stage_whose_outputs_are_gone_is_not_called_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(name: str):  # type: ignore[no-untyped-def]
        def run(c: object, d: Path, ctx: object) -> None:
            (d / f"{name}.txt").write_text(name)

        return prun.Stage(name, lambda c: (), lambda c: (f"{name}.txt",), run, name)

    monkeypatch.setattr(prun, "STAGES", (make("a"), make("b")))
    cfg = resolve_config("quick", overrides={"name": "gone"})
    d = prun.run_pipeline(cfg, tmp_path, log=None)
    (d / "b.txt").unlink()  # its stage record stays
    log = io.StringIO()
    prun.run_pipeline(cfg, tmp_path, only=["a"], ctx=RunContext(log=log))
    assert "not run yet: b" in log.getvalue() and "complete" not in log.getvalue()


def test_blank_texts_are_dropped_with_a_warning(
    world: dict[str, str], tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "some-blank.jsonl"
    path.write_text('"first"\n"   "\n"second"\n"\\t"\n"third"\n')
    with pytest.warns(BlankTextsWarning, match=r"dropped 2 of 5 texts .*file:2, file:4"):
        texts = load_texts(str(path))
    assert texts.texts() == ["first", "second", "third"] and texts.dropped == 2
    argv = HARVEST.format(**world).split()
    argv[argv.index("--source") + 1] = str(path)
    with pytest.warns(BlankTextsWarning, match="dropped 2 of 5"):
        code, err = _steerlex([*argv, "--out", str(tmp_path / "acts")], capsys)
    assert code == 0 and "Traceback" not in err
