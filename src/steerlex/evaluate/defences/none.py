"""``none``: the model as it is (the baseline every other defence is compared with)."""

from __future__ import annotations

from steerlex.evaluate.config import DefenceConfig
from steerlex.evaluate.defences.base import DEFENCES, Condition, Defence
from steerlex.evaluate.setup import EvalSetup

__all__ = ["NO_DEFENCE", "NoDefence"]

NO_DEFENCE = Condition("none", "none", None, key={"kind": "none"})
"""The unchanged model, whatever the config names it: the selection split's reference for the
strength choice and the KL reference."""


@DEFENCES.register("none", order=10)
class NoDefence(Defence):
    """No defence: prompts as they are, nothing edited."""

    is_baseline = True

    @classmethod
    def conditions(cls, entry: DefenceConfig, setup: EvalSetup) -> list[Condition]:
        return [Condition(entry.label, entry.kind, None, key={"kind": "none"})]
