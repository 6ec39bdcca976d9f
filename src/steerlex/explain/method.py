"""What an explanation method is, and the registry of them.

An :class:`ExplanationMethod` turns an SAE (and its model) into one :class:`Explanation`
per feature: ranked words (or tokens) with scores. Each method is one class in one module
of :mod:`steerlex.explain.methods`, registered in :data:`EXPLANATION_METHODS`; the CLI's
choices, the run config's validation, feature selection (which side a method describes),
the report and the feature browser all read the registry. To add a method, add a module
there (or in your own package, imported before use or declared in the ``steerlex.plugins``
entry-point group) with::

    @register_method("my-method", order=60)
    class MyMethod(ExplanationMethod):
        label = "my words"
        help = "what it does, in one line"
        describes = "output"       # the words say what the feature promotes
        needs_vocabulary = False   # True: it ranks the fixed vocabulary's words

        def explain(self, sae, loaded, features, options):
            return [Explanation(c, self.name, words, scores) for c in features]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, TypeVar

from steerlex.core.errors import ExplainError
from steerlex.core.registry import Registry

if TYPE_CHECKING:
    from steerlex.activations.store import ActivationStore
    from steerlex.explain.vocabulary import Vocabulary
    from steerlex.models.loading import LoadedModel
    from steerlex.sae.base import SparseAutoencoder

__all__ = [
    "EXPLANATION_METHODS",
    "Explanation",
    "ExplanationMethod",
    "MethodOptions",
    "Side",
    "default_method",
    "get_method",
    "method_names",
    "register_method",
]

Side = Literal["output", "input"]
"""``output``: the words say what a feature promotes (features to push up);
``input``: what makes it fire (detectors)."""


@dataclass(frozen=True)
class Explanation:
    """The ranked words (or tokens) of one feature under one method."""

    feature: int
    method: str
    words: tuple[str, ...]
    scores: tuple[float, ...]
    summary: str | None = None


@dataclass(frozen=True)
class MethodOptions:
    """What a method may read besides the SAE and the model (each method uses its own).

    ``vocab``: the fixed vocabulary (methods with ``needs_vocabulary``). ``top_k``: words
    per feature. ``alpha``/``beta``: the two temperatures of the MI scores. ``transform``
    (``final_norm``/``identity``) and ``side`` (``decoder``/``encoder``): how a feature
    becomes a vector in the output space. ``store``: an activation store of the SAE's
    model and layer (methods with ``needs_store``).
    """

    vocab: Vocabulary | None = None
    top_k: int = 50
    alpha: float = 1.0
    beta: float = 1.0
    transform: str = "final_norm"
    side: str = "decoder"
    store: ActivationStore | None = None
    progress: bool = True


class ExplanationMethod:
    """One way to explain SAE features; subclasses set the class attributes and ``explain``.

    ``name`` is set by :func:`register_method`. ``label`` names the method in the report
    and the browser, ``help`` in the CLI. ``describes``: the side of a feature its words
    describe. ``needs_vocabulary`` / ``needs_store``: :func:`~steerlex.explain.run.explain_sae`
    refuses to call ``explain`` without ``options.vocab`` / ``options.store``.
    ``words_are_tokens``: the "words" are raw model tokens (printed quoted).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    help: ClassVar[str] = ""
    describes: ClassVar[Side] = "output"
    needs_vocabulary: ClassVar[bool] = True
    needs_store: ClassVar[bool] = False
    words_are_tokens: ClassVar[bool] = False

    def explain(
        self,
        sae: SparseAutoencoder,
        loaded: LoadedModel,
        features: Sequence[int],
        options: MethodOptions,
    ) -> list[Explanation]:
        """One explanation per id in ``features`` (in that order)."""
        raise NotImplementedError


EXPLANATION_METHODS: Registry[type[ExplanationMethod]] = Registry(
    "explanation method", package="steerlex.explain.methods", error=ExplainError
)


M = TypeVar("M", bound=type[ExplanationMethod])


def register_method(name: str, *, order: int = 100) -> Callable[[M], M]:
    """Class decorator: register an :class:`ExplanationMethod` subclass as ``name``."""

    def add(cls: M) -> M:
        cls.name = name
        EXPLANATION_METHODS.add(name, cls, order=order)
        return cls

    return add


def get_method(name: str) -> ExplanationMethod:
    """An instance of the registered method ``name`` (ExplainError naming the choices)."""
    return EXPLANATION_METHODS.get(name)()


def method_names(side: Side | None = None) -> tuple[str, ...]:
    """Registered method names in display order (only those describing ``side``)."""
    return tuple(
        n for n, cls in EXPLANATION_METHODS.items() if side is None or cls.describes == side
    )


def default_method(side: Side) -> str:
    """The method read by default for a concept of ``side``: the first of that side."""
    names = method_names(side)
    if not names:
        raise ExplainError(f"No explanation method describes the {side} side.")
    return names[0]
