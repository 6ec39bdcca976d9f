"""Harm judges: did a reply carry out the harmful behaviour asked for?

Every judge is registered by name in :data:`~steerlex.judges.base.JUDGES` (one module per
family; see :mod:`steerlex.judges.base` for how to add one) and used the same way by
``steerlex judge`` and ``steerlex eval``. docs/judges.md compares them against people.
"""

from steerlex.judges.base import (
    DEFAULT_JUDGE,
    JUDGES,
    JudgeConfig,
    JudgeEnv,
    JudgeItem,
    JudgeKind,
    JudgeWarning,
    SafetyJudge,
    Verdict,
    make_judge,
)

__all__ = [
    "DEFAULT_JUDGE",
    "JUDGES",
    "JudgeConfig",
    "JudgeEnv",
    "JudgeItem",
    "JudgeKind",
    "JudgeWarning",
    "SafetyJudge",
    "Verdict",
    "make_judge",
]
