"""Safety evaluation: jailbreak attack success, over-refusal and utility of defences.

See docs/evaluation.md. Entry points: :func:`~steerlex.evaluate.run.run_eval` and the
``steerlex eval`` command (:func:`~steerlex.evaluate.cli.add_eval_parser`).
"""

from steerlex.core.errors import EvalError
from steerlex.evaluate.config import EvalConfig, config_from_dict, load_config
from steerlex.evaluate.run import EvalResult, run_eval

__all__ = ["EvalConfig", "EvalError", "EvalResult", "config_from_dict", "load_config", "run_eval"]
