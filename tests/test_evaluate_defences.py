"""The defence registry: the built-in kinds, strict flat configs, and kinds added from outside."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import test_evaluate_run as run_tests
from steerlex.core.config import config_to_dict
from steerlex.evaluate import (
    DEFENCES,
    Condition,
    Defence,
    DefenceConfig,
    EvalError,
    config_from_dict,
    plan_defences,
    run_eval,
)
from steerlex.evaluate.config import FLAT_KEYS, default_defences
from steerlex.evaluate.defences import option_names, sae_kinds
from steerlex.evaluate.defences.sae import SAESteeringOptions
from steerlex.evaluate.defences.self_reminder import SelfReminderOptions
from steerlex.evaluate.setup import EvalSetup
from steerlex.models.loading import LoadedModel
from steerlex.steer.strategies import DenseDirection

sources = run_tests.sources  # the same prompt files as the end-to-end tests


# --- two toy kinds, registered by the tests that use them ------------------------------------------


@dataclass(frozen=True)
class ShoutOptions:
    word: str = "please"


class Shout(Defence):
    """A prompt defence: one word after the user's message."""

    options = ShoutOptions

    @classmethod
    def validate(cls, entry: DefenceConfig, where: str) -> None:
        if not entry.options.word.strip():
            raise EvalError(f"{where}: word is empty")

    @classmethod
    def conditions(cls, entry: DefenceConfig, setup: EvalSetup) -> list[Condition]:
        word = entry.options.word
        key = {"kind": "shout", "word": word}
        return [Condition(entry.label, entry.kind, None, suffix=f" {word}", key=key)]


class Nudge(Defence):
    """A steering kind without an SAE: a push along the first residual axis."""

    sweeps = True
    defaults = ()

    @classmethod
    def conditions(cls, entry: DefenceConfig, setup: EvalSetup) -> list[Condition]:
        axis = torch.zeros(setup.loaded.model.config.hidden_size)
        axis[0] = 1.0
        base = DenseDirection(direction=axis, scale=1.0)
        return [
            Condition(entry.label, entry.kind, st, base.with_strength(st), key=_key(st, setup))
            for st in entry.sweep()
        ]


def _key(strength: float, setup: EvalSetup) -> dict[str, Any]:
    return {"kind": "nudge", "alpha": strength, "layer": setup.layer}


@pytest.fixture
def toy_kinds() -> Iterator[None]:
    DEFENCES.add("shout", Shout, order=200)
    DEFENCES.add("nudge", Nudge, order=210)
    try:
        yield
    finally:
        DEFENCES.remove("shout")
        DEFENCES.remove("nudge")


# --- the built-in kinds ----------------------------------------------------------------------------


def test_builtin_kinds_and_defaults() -> None:
    assert DEFENCES.names() == ("none", "self-reminder", "dense", "amplify", "calibrate")
    assert sae_kinds() == ("amplify", "calibrate")
    assert [DEFENCES.get(k).sweeps for k in DEFENCES.names()] == [False, False, True, True, True]
    labels = [d.label for d in default_defences(True)]
    assert labels == ["none", "self-reminder", "dense", "amplify", "calibrate",
                      "calibrate-conditional"]  # fmt: skip
    assert [d.label for d in default_defences(False)] == ["none", "self-reminder", "dense"]
    # every entry is written with the common keys and its own kind's keys only
    for d in config_to_dict(default_defences(True)):
        own = set(option_names(DEFENCES.get(d["kind"]).options))
        assert set(d) == {"kind", "name", "strengths", "strength", *own}


def test_flat_config_round_trip() -> None:
    data = {"defences": [
        {"kind": "calibrate", "conditional": True, "gate_mode": "token", "strengths": [1.0, 2.0]},
        {"kind": "self-reminder", "suffix": " ok?"},
        {"kind": "none", "conditional": False, "gate_mode": "prompt", "features": None},
    ]}  # fmt: skip
    cfg = config_from_dict(data)
    assert cfg.defences is not None
    cal, rem, none = cfg.defences
    assert cal.options == SAESteeringOptions(conditional=True, gate_mode="token")
    assert cal.label == "calibrate-conditional" and cal.sweep() == [1.0, 2.0]
    assert rem.options == SelfReminderOptions(suffix=" ok?")
    assert none.label == "none"
    written = config_to_dict(cfg)["defences"]
    assert written[0]["conditional"] is True and written[1]["suffix"] == " ok?"
    assert written[2] == {"kind": "none", "name": None, "strengths": None, "strength": None}
    # a config written by an earlier steerlex (every entry with every flat key) still reads
    old = {"defences": [{"kind": "none", "name": None, "strengths": None, "strength": None,
                         **FLAT_KEYS}]}  # fmt: skip
    assert config_from_dict(old).defences == [cfg.defences[2]]
    again = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert again.defences == cfg.defences


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"kind": "dense", "strengths": [0.1], "suffix": "x"},
         r"defences\[0\]: unknown key 'suffix' for a dense defence; it takes kind, name, "
         r"strengths, strength, conditional, detector, harm_features, gate_threshold, gate_mode\."),
        ({"kind": "none", "conditional": True}, "unknown key 'conditional' for a none defence"),
        ({"kind": "amplify", "strengths": [1.0], "system_prompt": "hi"},
         "it takes kind, name, strengths, strength, conditional, detector, harm_features"),
        ({"kind": "shield"}, "unknown kind 'shield'; choose one of none, self-reminder"),
        ({"strengths": [1.0]}, r"missing defences\[0\]\.kind"),
        ({"kind": "calibrate", "conditional": "yes"}, r"'defences\[0\]\.conditional' must be"),
        ({"kind": "dense", "strengths": "0.1"}, r"'defences\[0\]\.strengths' must be a list"),
        # NaN / Infinity (Python's JSON reads them) are refused when the config is read
        ({"kind": "dense", "strength": float("nan")},
         r"'defences\[0\]\.strength' must be a finite number, got nan"),
        ({"kind": "dense", "strengths": [0.1, float("inf")]},
         r"'defences\[0\]\.strengths\[1\]' must be a finite number, got inf"),
    ],
)  # fmt: skip
def test_bad_entries_name_the_key_and_the_kinds_keys(entry: dict[str, Any], match: str) -> None:
    with pytest.raises(EvalError, match=match):
        config_from_dict({"defences": [entry]})


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"kind": "calibrate", "gate_mode": "sometimes", "strengths": [1.0]},
         "gate_mode must be prompt or token"),
        ({"kind": "self-reminder", "strengths": [1.0]}, "takes no strengths"),
        ({"kind": "amplify", "strengths": [1.0]}, "needs an SAE"),
    ],
)  # fmt: skip
def test_plan_checks_each_kind(entry: dict[str, Any], match: str) -> None:
    cfg = config_from_dict({"defences": [entry]})
    with pytest.raises(EvalError, match=match):
        plan_defences(cfg, with_sae=match != "needs an SAE")


# --- a kind added from outside ---------------------------------------------------------------------


@pytest.mark.usefixtures("toy_kinds")
def test_added_kind_is_configured_and_planned_like_a_builtin() -> None:
    assert DEFENCES.names()[-2:] == ("shout", "nudge")
    assert [d.label for d in default_defences(False)][-1] == "shout"  # its defaults: one entry
    cfg = config_from_dict({"defences": [
        {"kind": "shout", "word": "now"}, {"kind": "nudge", "name": "push", "strengths": [1.0]},
    ]})  # fmt: skip
    planned = plan_defences(cfg, with_sae=False)
    assert [d.label for d in planned] == ["shout", "push"]
    assert planned[0].options == ShoutOptions("now")
    assert config_to_dict(planned[0])["word"] == "now"
    with pytest.raises(EvalError, match="unknown key 'volume' for a shout defence; it takes "
                       "kind, name, strengths, strength, word"):  # fmt: skip
        config_from_dict({"defences": [{"kind": "shout", "volume": 11}]})
    with pytest.raises(EvalError, match="word is empty"):
        plan_defences(config_from_dict({"defences": [{"kind": "shout", "word": " "}]}),
                      with_sae=False)  # fmt: skip
    with pytest.raises(EvalError, match="give 'strengths'"):
        plan_defences(config_from_dict({"defences": [{"kind": "nudge"}]}), with_sae=False)


@pytest.mark.usefixtures("toy_kinds")
def test_added_kind_runs_through_run_eval(
    tiny_loaded: LoadedModel, sources: dict[str, str], tmp_path: Path
) -> None:
    defences = [{"kind": "none"}, {"kind": "shout", "word": "now"},
                {"kind": "nudge", "strengths": [0.0, 3.0]}]  # fmt: skip
    data = run_tests.cfg_dict(sources, tmp_path / "out", defences=defences)
    result = run_eval(config_from_dict(data), loaded=tiny_loaded, progress=False, log=None)
    rows = result.scores["conditions"]
    assert [(r["defence"], r["kind"], r["strength"]) for r in rows] == [
        ("none", "none", None), ("shout", "shout", None),
        ("nudge", "nudge", 0.0), ("nudge", "nudge", 3.0),
    ]  # fmt: skip
    chosen = result.scores["tuning"]["chosen"]
    assert chosen["shout"]["strength"] is None and chosen["nudge"]["strength"] in (0.0, 3.0)
    kl = {r["strength"]: r["metrics"]["kl"]["mean"] for r in rows if r["kind"] == "nudge"}
    assert kl[0.0] == pytest.approx(0.0, abs=1e-6) and kl[3.0] > 1e-4
    shouted = [r for r in result.records if r["defence"] == "shout"]
    assert shouted and all(r["kind"] == "shout" for r in shouted)
    lines = (result.out / "cache" / "generations.jsonl").read_text().splitlines()
    keys = [json.loads(line).get("defence") for line in lines]  # KL lines have none
    assert {"kind": "shout", "word": "now"} in keys
    assert "| shout |" in (result.out / "results.md").read_text()
