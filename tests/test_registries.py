"""Adding a kind is one module: a toy explanation method and a toy defence, registered here
as a plug-in would register them, are accepted by the CLI, the run config, the selection side
table and the report (the evaluation itself runs toy defences in test_evaluate_defences.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import save_tiny_model
from steerlex.cli import build_parser, main
from steerlex.core.errors import ExplainError, PipelineError, SteerlexError
from steerlex.core.registry import Registry
from steerlex.evaluate.config import DefenceConfig
from steerlex.evaluate.defences import DEFENCES, Condition, Defence
from steerlex.evaluate.setup import EvalSetup
from steerlex.explain.method import (
    EXPLANATION_METHODS,
    Explanation,
    ExplanationMethod,
    MethodOptions,
    default_method,
    method_names,
    register_method,
)
from steerlex.models.loading import LoadedModel, load_model
from steerlex.pipeline.config import config_from_dict, resolve_config
from steerlex.report import build_browser
from steerlex.sae import SAEConfig, SparseAutoencoder, save_sae
from steerlex.sae.base import SAE_ARCHITECTURES
from steerlex.steer.select import explanation_side


class FirstLetters(ExplanationMethod):
    """A toy method: the letters of the alphabet, one per feature (input side)."""

    label = "first letters (a toy)"
    help = "a toy method for the registry test"
    describes = "input"
    needs_vocabulary = False

    def explain(
        self,
        sae: SparseAutoencoder,
        loaded: LoadedModel,
        features: Sequence[int],
        options: MethodOptions,
    ) -> list[Explanation]:
        return [Explanation(c, self.name, (chr(97 + c % 26),), (1.0,)) for c in features]


@dataclass(frozen=True)
class EchoOptions:
    word: str = "thanks"


class Echo(Defence):
    """A toy prompt defence: one word after the user's message."""

    options = EchoOptions

    @classmethod
    def conditions(cls, entry: DefenceConfig, setup: EvalSetup) -> list[Condition]:
        word = entry.options.word
        return [Condition(entry.label, entry.kind, None, suffix=f" {word}", key={"echo": word})]


@pytest.fixture
def toys() -> Iterator[None]:
    register_method("letters", order=90)(FirstLetters)
    DEFENCES.add("echo", Echo, order=300)
    try:
        yield
    finally:
        EXPLANATION_METHODS.remove("letters")
        DEFENCES.remove("echo")


def _choices(command: str, flag: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices[command]  # type: ignore[attr-defined]
    action = next(a for a in parser._actions if flag in a.option_strings)
    return list(action.choices or [])


def test_a_registered_method_is_everywhere(
    toys: None, tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "letters" in method_names() and "letters" in method_names("input")
    assert explanation_side("letters") == "input" and default_method("input") == "mi-input"
    assert "letters" in _choices("explain", "--method")
    assert "letters" in _choices("select", "--explanation-method")
    # the CLI runs it
    model_dir = save_tiny_model(tmp_path / "tiny")
    sae = SparseAutoencoder(
        SAEConfig(d_in=32, d_sae=6, k=2, model_spec=str(model_dir), layer=1,
                  weights_id=load_model(str(model_dir)).weights_id)
    )  # fmt: skip
    save_sae(sae, tmp_path / "run" / "sae")
    out = tmp_path / "run" / "explanations"
    assert main(["explain", "--sae", str(tmp_path / "run" / "sae"), "--method", "letters",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "letters: 6 features explained" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "letters.jsonl").read_text().splitlines()]
    assert [r["words"] for r in rows[:3]] == [["a"], ["b"], ["c"]]
    # the run config accepts it, and a selection may read it
    cfg = config_from_dict(
        {"explain": {"methods": ["mi", "mi-input", "letters"]},
         "select": {"harm": {"explanation_method": "letters"}}}
    )  # fmt: skip
    assert "letters" in cfg.explain.methods
    assert "letters" in resolve_config("quick").explain.methods  # every method by default
    # the browser labels it
    browser = build_browser(tmp_path / "run").read_text()
    assert "first letters (a toy)" in browser


def test_an_unregistered_method_is_refused_everywhere(tmp_path: Path) -> None:
    assert "letters" not in method_names()
    with pytest.raises(PipelineError, match="letters"):
        config_from_dict({"explain": {"methods": ["mi", "mi-input", "letters"]}})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["explain", "--sae", "x", "--method", "letters"])
    with pytest.raises(ExplainError, match="Unknown explanation method 'letters'"):
        EXPLANATION_METHODS.get("letters")


def test_a_registered_defence_is_accepted(toys: None, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_from_dict({"eval": {"defences": [{"kind": "none"}, {"kind": "echo"},
                                                  {"kind": "echo", "name": "e2", "word": "ok"}]}})  # fmt: skip
    assert cfg.eval.defences is not None
    assert [d.label for d in cfg.eval.defences] == ["none", "echo", "e2"]
    assert cfg.eval.defences[2].options == EchoOptions("ok")
    with pytest.raises(PipelineError, match="unknown key 'alpha' for a echo defence"):
        config_from_dict({"eval": {"defences": [{"kind": "echo", "alpha": 2}]}})
    # `steerlex eval --defences` lists and takes it (its default entry)
    assert main(["eval", "--defences", "echo,none", "--dry-run", "--quiet", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown defence" not in err and "nope" in err  # got past the defence check


def test_registry_rules() -> None:
    reg: Registry[int] = Registry("toy thing")
    reg.add("b", 2, order=20)
    reg.add("a", 1, order=10)
    assert reg.names() == ("a", "b") and reg.get("b") == 2 and "a" in reg
    with pytest.raises(SteerlexError, match="registered twice"):
        reg.add("a", 3)
    reg.add("a", 3, replace=True)
    assert reg.get("a") == 3
    with pytest.raises(SteerlexError, match="Unknown toy thing 'c'; choose one of a, b"):
        reg.get("c")
    assert SAE_ARCHITECTURES.names()[:1] == ("topk",)
