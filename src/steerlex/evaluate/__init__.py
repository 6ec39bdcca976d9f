"""Safety evaluation: jailbreak attack success, over-refusal and utility of defences.

See docs/evaluation.md. Entry points: :func:`~steerlex.evaluate.run.run_eval` and the
``steerlex eval`` command (:func:`~steerlex.evaluate.cli.add_eval_parser`); the defence kinds
are the registry :data:`~steerlex.evaluate.defences.DEFENCES`.
"""

from steerlex.core.errors import EvalError
from steerlex.evaluate.config import DefenceConfig, EvalConfig, config_from_dict, load_config
from steerlex.evaluate.defences import DEFENCES, Condition, Defence
from steerlex.evaluate.plan import plan_defences
from steerlex.evaluate.run import EvalResult, run_eval

__all__ = [
    "DEFENCES",
    "Condition",
    "Defence",
    "DefenceConfig",
    "EvalConfig",
    "EvalError",
    "EvalResult",
    "config_from_dict",
    "load_config",
    "plan_defences",
    "run_eval",
]
