"""What every defence kind is: a :class:`Defence` class registered in :data:`DEFENCES`, turning
one config entry into the evaluation's :class:`Condition` objects.

A kind declares

- ``needs_sae``: it steers through SAE features (an evaluation without an SAE refuses it);
- ``sweeps``: it takes strengths (a sweep, ``strengths``, and/or a fixed ``strength``);
- ``options``: the dataclass of its own config keys (beside the common ``kind``, ``name``,
  ``strengths`` and ``strength``), with their defaults;
- ``defaults``: its entries in the default defences (:func:`~steerlex.evaluate.config.default_defences`);
- :meth:`~Defence.validate`, :meth:`~Defence.label` and :meth:`~Defence.conditions`.

Adding a kind is adding one module to this package (or a plug-in module, see
:mod:`steerlex.core.registry`) whose class registers itself with ``@DEFENCES.register(kind)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from steerlex.core.errors import EvalError
from steerlex.core.registry import Registry

if TYPE_CHECKING:  # type hints only: the config imports this module, and stays light
    from steerlex.evaluate.config import DefenceConfig
    from steerlex.evaluate.setup import EvalSetup
    from steerlex.steer.strategies import SteeringStrategy

__all__ = ["DEFENCES", "Condition", "Defence", "NoOptions", "option_names", "sae_kinds"]


@dataclass(frozen=True)
class Condition:
    """One defence at one strength: how prompts are wrapped and what the runtime edits.

    ``key`` holds every parameter that changes the model's replies (not the display name), so it
    keys the generation cache.
    """

    defence: str
    kind: str
    strength: float | None
    strategy: SteeringStrategy | None = None
    system_prompt: str | None = None
    suffix: str = ""
    key: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.defence if self.strength is None else f"{self.defence}@{self.strength:g}"

    def wrap(self, text: str) -> str:
        return text + self.suffix


@dataclass(frozen=True)
class NoOptions:
    """The options of a kind that has none."""


def option_names(options: type[Any]) -> tuple[str, ...]:
    """The config keys of an options dataclass, in declaration order."""
    return tuple(f.name for f in fields(options))


class Defence:
    """One defence kind (subclass it and register the subclass; module docstring).

    Methods are classmethods: a kind is a set of rules, not a stateful object. The entry
    they get is a :class:`~steerlex.evaluate.config.DefenceConfig` whose ``options`` is an
    instance of the kind's ``options`` class.
    """

    needs_sae: ClassVar[bool] = False
    sweeps: ClassVar[bool] = False
    is_baseline: ClassVar[bool] = False
    """The model as it is: its replies are the KL reference and its KL is 0 (``none``)."""
    options: ClassVar[type[Any]] = NoOptions
    defaults: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    @classmethod
    def validate(cls, entry: DefenceConfig, where: str) -> None:
        """Raise :class:`EvalError` (prefixed with ``where``) for a bad option value."""

    @classmethod
    def label(cls, entry: DefenceConfig) -> str:
        """The display name when the entry gives none (default: its kind)."""
        return entry.kind

    @classmethod
    def conditions(cls, entry: DefenceConfig, setup: EvalSetup) -> list[Condition]:
        """The entry's conditions: one per strength of :meth:`DefenceConfig.sweep` for a
        sweeping kind, else exactly one (strength ``None``)."""
        raise NotImplementedError


DEFENCES: Registry[type[Defence]] = Registry(
    "defence", package="steerlex.evaluate.defences", error=EvalError
)
"""Every defence kind by name, in display order (the built-in ones are this package's
modules)."""


def sae_kinds() -> Sequence[str]:
    """The kinds that steer through SAE features."""
    return tuple(name for name, kind in DEFENCES.items() if kind.needs_sae)
