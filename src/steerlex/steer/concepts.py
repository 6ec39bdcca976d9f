"""Concepts that features are selected for: built-in presets and user-defined ones.

A :class:`Concept` is a name, a one-line description and a few seed words. The semantic
selector (:mod:`steerlex.steer.select`) compares explanation words with the seed words
(and the description); the LLM judge asks whether a word list belongs to one of the
concept's ``categories``. Two presets ship with steerlex:

- ``safety``: defensive, protective and refusal-related meanings; features to *push up*,
  so they are matched against output-side explanations (what a feature promotes). Its
  categories are the paper's defence categories.
- ``harm``: weapons, violence, drugs, hacking, fraud...; features that *detect* harmful
  requests, matched against input-side explanations (what makes a feature fire).

Seed words are single, unambiguous words: a seed that is also an everyday function word
("cannot", "help") makes every generic feature look like a match.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from steerlex.core.errors import ConceptError
from steerlex.explain.method import Side

SIDES: tuple[Side, ...] = ("output", "input")

#: The paper's defence categories (Wu et al., arXiv 2502.15576, Steering).
DEFENCE_CATEGORIES: tuple[str, ...] = (
    "physical",
    "cyber",
    "legal",
    "financial",
    "privacy",
    "ethical and safe behaviour",
    "victim support",
)


@dataclass(frozen=True)
class Concept:
    """What to select features for.

    ``side`` is where explanations should describe it: ``"output"`` for features to push
    up (what a feature promotes), ``"input"`` for detectors (what makes a feature fire).
    ``categories`` are the labels the LLM judge may give a matching word list; by default
    just the concept's name.
    """

    name: str
    description: str
    words: tuple[str, ...] = ()
    side: Side = "output"
    categories: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise ConceptError("A concept needs a name, e.g. 'safety' or 'medicine'.")
        if not self.description.strip() and not self.words:
            raise ConceptError(
                f"Concept '{self.name}' has neither a description nor words; give at least "
                "one (--concept-text 'what it means' and/or --concept-words w1,w2,...)."
            )
        if self.side not in SIDES:
            raise ConceptError(
                f"Concept '{self.name}' has side {self.side!r}; use one of {', '.join(SIDES)}."
            )

    @property
    def labels(self) -> tuple[str, ...]:
        """The LLM judge's labels for a match: ``categories``, or the name when there are none."""
        return self.categories or (self.name,)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "words": list(self.words),
            "side": self.side,
            "categories": list(self.categories),
        }


SAFETY = Concept(
    name="safety",
    description=(
        "Refusing or declining harmful requests; safety, protection and security; law, "
        "legality and ethics; warnings, caution and preventing harm; privacy; support "
        "for victims"
    ),
    words=(
        "refuse",
        "decline",
        "sorry",
        "apologize",
        "safe",
        "safety",
        "protect",
        "protection",
        "secure",
        "security",
        "defend",
        "guard",
        "law",
        "legal",
        "illegal",
        "ethical",
        "moral",
        "responsible",
        "prevent",
        "prevention",
        "warn",
        "warning",
        "caution",
        "careful",
        "privacy",
        "consent",
        "comply",
        "regulation",
        "prohibited",
        "forbidden",
        "harmless",
        "victim",
    ),
    side="output",
    categories=DEFENCE_CATEGORIES,
)

HARM = Concept(
    name="harm",
    description=(
        "Harmful and criminal acts: weapons, violence, killing, drugs, hacking and malware, "
        "fraud, theft, explosives, poison, abuse and terrorism"
    ),
    words=(
        "weapon",
        "gun",
        "violence",
        "violent",
        "kill",
        "murder",
        "attack",
        "assault",
        "bomb",
        "explosive",
        "poison",
        "toxic",
        "drug",
        "cocaine",
        "hack",
        "hacker",
        "malware",
        "fraud",
        "scam",
        "steal",
        "theft",
        "abuse",
        "torture",
        "terrorism",
        "crime",
        "criminal",
        "harm",
        "harassment",
        "kidnap",
        "smuggle",
    ),
    side="input",
    categories=(
        "violence and weapons",
        "cybercrime",
        "drugs",
        "fraud and theft",
        "abuse and harassment",
        "terrorism",
    ),
)

PRESETS: dict[str, Concept] = {c.name: c for c in (SAFETY, HARM)}


def parse_words(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Seed words from ``"w1, w2,w3"`` (or a list): stripped, lower-cased, de-duplicated."""
    if text is None:
        return ()
    parts = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for p in parts:
        if not isinstance(p, str):
            raise ConceptError(f"Concept words must be strings; got {type(p).__name__}.")
        w = " ".join(p.split()).lower()
        if w and w not in out:
            out.append(w)
    return tuple(out)


def get_concept(
    name: str,
    *,
    description: str | None = None,
    words: str | Sequence[str] | None = None,
    side: Side | None = None,
) -> Concept:
    """The concept ``name``: a preset, or one defined by ``description`` and/or ``words``.

    Given a preset's name with a ``description`` or ``words``, those replace the preset's
    own (its side and categories stay). An unknown name without either raises
    :class:`ConceptError` listing the presets.
    """
    name = (name or "").strip()
    seeds = parse_words(words)
    preset = PRESETS.get(name.lower())
    if preset is None and not (description and description.strip()) and not seeds:
        close = difflib.get_close_matches(name.lower(), list(PRESETS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConceptError(
            f"Unknown concept '{name}'.{hint} Built-in concepts: {', '.join(PRESETS)}. "
            "To define your own, pass a description and/or seed words "
            "(--concept-text 'medicine and health care' --concept-words doctor,drug,patient)."
        )
    if preset is not None and description is None and not seeds and side is None:
        return preset
    return Concept(
        name=name,
        description=(description or "").strip() or (preset.description if preset else ""),
        words=seeds or (preset.words if preset else ()),
        side=side or (preset.side if preset else "output"),
        categories=preset.categories if preset else (),
    )


def concept_from_dict(data: Mapping[str, Any]) -> Concept:
    """A concept from ``{"name", "description", "words", ["side"], ["categories"]}``
    (e.g. the ``concept`` block of a saved selection)."""
    if not isinstance(data, Mapping) or "name" not in data:
        raise ConceptError(
            'A concept dict needs at least "name" and a "description" or "words"; got '
            f"{data!r:.80}."
        )
    side = data.get("side") or "output"
    if side not in SIDES:
        raise ConceptError(f"Concept side {side!r} is not one of {', '.join(SIDES)}.")
    return Concept(
        name=str(data["name"]),
        description=str(data.get("description") or ""),
        words=parse_words(data.get("words") or ()),
        side=side,
        categories=tuple(str(c) for c in data.get("categories") or ()),
    )


__all__ = [
    "DEFENCE_CATEGORIES",
    "HARM",
    "PRESETS",
    "SAFETY",
    "SIDES",
    "Concept",
    "ConceptError",
    "Side",
    "concept_from_dict",
    "get_concept",
    "parse_words",
]
