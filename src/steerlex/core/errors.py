"""Every error a user can cause: a :class:`SteerlexError` (or a subclass) whose message
names the bad input and says what to do. The CLI prints it as one line, never as a
traceback. The kinds live here, in one module with no heavy imports, so that any
module can raise them without importing the stage that usually does.
"""

from __future__ import annotations


class SteerlexError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class ModelSpecError(SteerlexError):
    """A model spec that cannot be resolved or loaded."""


class MissingPackageError(SteerlexError):
    """A pip package that steerlex needs for this operation is not installed."""

    def __init__(self, package: str, install: str, purpose: str) -> None:
        self.package = package
        self.install = install
        super().__init__(
            f"{purpose} needs the pip package '{package}', which is not installed. "
            f"Install it with: {install}"
        )


class IntegrityError(SteerlexError):
    """A file whose hash or structure does not match what was expected."""


class SourceError(SteerlexError):
    """A text or prompt source that cannot be read."""


class StoreError(SteerlexError):
    """An activation store that cannot be written or read as asked."""


class LayerError(SteerlexError):
    """A decoder layer that cannot be found, indexed or hooked as asked."""


class SAEError(SteerlexError):
    """An SAE that cannot be built, loaded or used as asked."""


class TrainingDiverged(SAEError):
    """Training met NaN/Inf data or a non-finite loss and stopped."""


class ExplainError(SteerlexError):
    """Bad input to an explainer (shapes, temperatures, K, non-finite values, models)."""


class VocabularyError(SteerlexError):
    """A vocabulary that cannot be built, read or embedded as asked."""


class SummaryError(SteerlexError):
    """A summary back end that is configured wrongly, or a bad argument to a summary call."""


class BackendError(SummaryError):
    """A back end call that failed.

    ``fatal``: retrying cannot help (a 4xx answer such as a bad API key or model name),
    so :func:`~steerlex.explain.summaries.summarize` stops calling the back end for the
    rest of the run.
    """

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class ConceptError(SteerlexError):
    """A concept (what to select features for) that is not defined well enough."""


class SelectionError(SteerlexError):
    """Features that cannot be selected as asked (bad input, or nothing matches)."""


class SteeringError(SteerlexError):
    """A steering strategy, feature set or steered generation that cannot be used as asked."""


class EvalError(SteerlexError):
    """An evaluation that cannot run as configured (bad set, template, config or judge)."""


class ReportError(SteerlexError):
    """A run directory whose files cannot be read into a report."""


class ConfigError(SteerlexError):
    """A config (file, section or option) with an unknown key, a wrong type or a bad value."""


class PipelineError(SteerlexError):
    """A bad run config, a run directory of another config, or a stage without its input."""


class StageError(PipelineError):
    """A stage of ``steerlex run`` that failed; the message names the stage, the cause and
    the command that resumes the run."""

    def __init__(self, stage: str, cause: BaseException, resume: str) -> None:
        self.stage = stage
        self.cause = cause
        self.resume = resume
        super().__init__(
            f"stage {stage} failed: {cause}\nFinished stages are kept; fix the cause, then "
            f"resume with: {resume}"
        )


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``steerlex run``: the message names the stage and how to resume."""
