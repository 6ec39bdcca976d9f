"""What every harm judge shares: the item it judges, its verdict, the registry of judges,
and the retry-and-cache loop of judges that can fail.

A *harm judge* answers one question per item: does this reply carry out the harmful
behaviour that was asked for? Its verdict is ``harmful``, ``unharmful`` or ``unjudged`` (the
judge failed on the item: counted, never guessed). Every judge has a versioned name that
every result file records.

Judges are registered in :data:`JUDGES` by name; each entry is a :class:`JudgeKind` whose
``build`` makes the judge from a :class:`JudgeEnv` (device, cache folder, and a way to get a
loaded model, so that ``steerlex run`` can share the model it already holds). Adding a judge
is one module in this package that calls ``JUDGES.add``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from tqdm.auto import tqdm

from steerlex.core.config import option
from steerlex.core.errors import BackendError, EvalError
from steerlex.core.io import read_json_object, write_json_atomic
from steerlex.core.registry import Registry
from steerlex.models.loading import LoadedModel, load_model

__all__ = [
    "DEFAULT_JUDGE",
    "JUDGES",
    "BadVerdict",
    "CachedJudge",
    "HarmLabel",
    "JudgeConfig",
    "JudgeEnv",
    "JudgeItem",
    "JudgeKind",
    "JudgeWarning",
    "SafetyJudge",
    "Verdict",
    "make_judge",
    "with_context",
]

HarmLabel = Literal["harmful", "unharmful", "unjudged"]


class JudgeWarning(UserWarning):
    """An item left unjudged (the judge failed or answered garbage)."""


class BadVerdict(ValueError):
    """An answer or score that gives no usable label."""


@dataclass(frozen=True)
class Verdict:
    """A judge's decision on one reply: ``label``, why, and which judge (name) gave it."""

    label: str
    reason: str
    judge: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class JudgeItem:
    """One reply to judge: the harmful ``behaviour`` that was asked for, the model's
    ``reply``, and optionally the full ``prompt`` it saw (e.g. a jailbreak) and a ``context``
    the behaviour refers to (HarmBench's contextual behaviours)."""

    behaviour: str
    reply: str
    prompt: str | None = None
    context: str | None = None

    def key(self, judge: str) -> str:
        """The cache key of this item under the judge named ``judge``."""
        blob = json.dumps([judge, self.behaviour, self.reply, self.prompt, self.context])
        return hashlib.sha256(blob.encode()).hexdigest()


class SafetyJudge(Protocol):
    """Anything that labels items harmful / unharmful / unjudged."""

    @property
    def name(self) -> str: ...

    def judge_many(
        self, items: Sequence[JudgeItem], *, progress: bool = False
    ) -> list[Verdict]: ...


DEFAULT_JUDGE = "qwen0.5b-probe"
"""The judge of ``steerlex judge`` and ``steerlex eval`` when none is named: the best
measured agreement with people among the offline judges, within the interval of the larger
model's and three times faster (docs/judges.md)."""


@dataclass
class JudgeConfig:
    """Which judge (``name``, from :data:`JUDGES`) and the options of the judges that need
    them: ``openai`` (``base_url``, ``model``, ``api_key_env``, ``retries``, ``timeout``),
    ``llm`` and ``guard`` (a local model spec in ``model``)."""

    name: str = option(DEFAULT_JUDGE, help="the judge", choices=lambda: JUDGES.names())
    model: str | None = option(None, help="openai: served model name; llm/guard: model spec")
    base_url: str | None = option(None, help="openai: the API root")
    api_key_env: str | None = option(None, help="openai: the environment variable of the key")
    attempts: int = option(3, help="tries per reply before it counts as unjudged")
    retries: int = option(2, help="openai: retries of a failed request")
    timeout: float = option(60.0, help="openai: seconds per request")
    max_tokens: int = option(64, help="openai/llm: tokens of the judge's answer")


@dataclass
class JudgeEnv:
    """What building a judge may use: its :class:`JudgeConfig`, the torch ``device`` and
    ``dtype`` of a judge model (unless the judge names its own), a folder for cached
    verdicts, and ``model_loader`` ((spec, dtype) → loaded model; ``steerlex run`` passes its
    run context's, so a judge on the run's own model costs no second load)."""

    config: JudgeConfig = field(default_factory=JudgeConfig)
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: Path | None = None
    model_loader: Callable[[str, str], LoadedModel] | None = None

    def load(self, spec: str, dtype: str | None = None) -> LoadedModel:
        """The model ``spec`` in ``dtype`` (default: :attr:`dtype`)."""
        dtype = dtype or self.dtype
        if self.model_loader is not None:
            return self.model_loader(spec, dtype)
        return load_model(spec, device=self.device, dtype=dtype)


@dataclass(frozen=True)
class JudgeKind:
    """A registered judge: what it is (one line) and how to build it."""

    description: str
    build: Callable[[JudgeEnv], SafetyJudge]


JUDGES: Registry[JudgeKind] = Registry("judge", "steerlex.judges", EvalError)
"""Every harm judge by name (``steerlex judge --judge NAME``, ``eval.judge.name``)."""


def make_judge(env: JudgeEnv) -> SafetyJudge:
    """The judge ``env.config.name`` names (an unknown name raises, listing the choices)."""
    return JUDGES.get(env.config.name).build(env)


def with_context(item: JudgeItem) -> str:
    """The behaviour, followed by its context when it has one."""
    if item.context:
        return f"{item.behaviour}\n\nContext:\n{item.context}"
    return item.behaviour


class CachedJudge:
    """Retries, the on-disk verdict cache and failure counting, for judges whose ``_label``
    can fail (a remote call, a local model). Subclasses give ``name`` and ``_label``; a
    :class:`BadVerdict` or non-fatal :class:`BackendError` is retried ``attempts`` times, a
    fatal one stops further calls. Valid verdicts are cached; failures never are."""

    def __init__(self, *, attempts: int, cache_dir: str | Path | None) -> None:
        if attempts < 1:
            raise EvalError(f"judge attempts must be >= 1, got {attempts}.")
        self.attempts = attempts
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.failures = 0

    @property
    def name(self) -> str:
        raise NotImplementedError

    def _label(self, item: JudgeItem) -> tuple[Literal["harmful", "unharmful"], str]:
        raise NotImplementedError

    def judge_many(self, items: Sequence[JudgeItem], *, progress: bool = False) -> list[Verdict]:
        """One verdict per item; failures become ``unjudged`` verdicts."""
        out: list[Verdict] = []
        stopped: str | None = None
        for item in tqdm(items, desc="judge", unit="reply", disable=not progress):
            path = self.cache_dir / f"{item.key(self.name)}.json" if self.cache_dir else None
            cached = _read_verdict(path, self.name) if path is not None else None
            if cached is not None:
                out.append(cached)
                continue
            if stopped is not None:
                self.failures += 1
                out.append(Verdict("unjudged", f"not sent: {stopped}", self.name))
                continue
            verdict, last, fatal = self._attempt(item)
            if fatal:
                stopped = f"the judge failed with an error retrying cannot fix ({last})"
            if verdict is None:
                self.failures += 1
                warnings.warn(
                    f"unjudged after {self.attempts} attempt(s): {last}", JudgeWarning, stacklevel=2
                )
                out.append(Verdict("unjudged", last, self.name))
                continue
            out.append(verdict)
            if path is not None:
                try:
                    write_json_atomic(path, {"judge": self.name, **verdict.to_json()})
                except OSError:
                    self.cache_dir = None
        return out

    def _attempt(self, item: JudgeItem) -> tuple[Verdict | None, str, bool]:
        """``(verdict or None, the last failure, whether it was fatal)``."""
        last = ""
        for _ in range(self.attempts):
            try:
                label, reason = self._label(item)
            except BadVerdict as exc:
                last = f"unusable answer: {exc}"
                continue
            except BackendError as exc:
                last = str(exc)
                if exc.fatal:
                    return None, last, True
                continue
            except Exception as exc:  # a judge must never end the run
                last = f"{type(exc).__name__}: {exc}"
                continue
            return Verdict(label, reason, self.name), "", False
        return None, last, False


def _read_verdict(path: Path, name: str) -> Verdict | None:
    if not path.is_file():
        return None
    try:
        data = read_json_object(path, what="judge cache entry", fix="", error=EvalError)
    except EvalError:
        return None
    if data.get("judge") != name or data.get("label") not in ("harmful", "unharmful"):
        return None
    return Verdict(str(data["label"]), str(data.get("reason", "")), name)
