"""The defences an evaluation compares: one kind per module, registered in :data:`DEFENCES`.

- ``none`` (:mod:`.none`): the model as it is.
- ``self-reminder`` (:mod:`.self_reminder`): a system prompt and a reminder after the user's
  message.
- ``dense`` (:mod:`.dense`): the refusal-direction baseline
  (:class:`~steerlex.steer.strategies.DenseDirection`; no SAE).
- ``amplify`` / ``calibrate`` (:mod:`.amplify`, :mod:`.calibrate`): SAE steering
  (:mod:`steerlex.steer.strategies`), optionally conditional on harm features (:mod:`.sae`).

Every steering defence runs through :class:`~steerlex.steer.runtime.SteeredModel`, so all of
them edit the same positions (the user's text onwards; never padding or the chat-template
prefix), at prefill and at every decoding step. How to add a kind: :mod:`.base`.
"""

from steerlex.evaluate.defences.base import (
    DEFENCES,
    Condition,
    Defence,
    NoOptions,
    option_names,
    sae_kinds,
)

__all__ = ["DEFENCES", "Condition", "Defence", "NoOptions", "option_names", "sae_kinds"]
