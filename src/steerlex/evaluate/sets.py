"""Evaluation prompts: harmful behaviours, jailbreak attacks, benign and utility prompts, split
into a *selection* part (for tuning) and a *test* part (for headline numbers).

Promises (docs/evaluation.md has the full rules):

- **Splits by text id.** An item is in the test part when ``unit_hash(id, salt) < test_fraction``
  (:func:`steerlex.data.split.select_split`), so adding texts to a source never moves others. A
  jailbreak prompt is in the test part only when both its behaviour and its template are.
- **Deterministic sampling.** Within a part, items are ordered by ``unit_hash(id, f"{salt}/{seed}")``
  and the first ``n`` are taken; the same seed always gives the same prompts.
- **Jailbreak composition.** ``{generator.name}`` becomes ``model_name`` and ``[TARGETLANGUAGE]``
  becomes ``English``. The behaviour replaces every prompt slot (see :data:`PROMPT_SLOT`, e.g.
  ``[INSERT PROMPT HERE]``); a template with no slot gets the behaviour appended after a blank
  line (``template.rstrip() + "\\n\\n" + behaviour``) when ``append`` is on, else
  :class:`EvalError`.
- **Token budget.** A template longer than ``template_budget`` tokens (the model's tokenizer,
  before composition) keeps its first ``template_budget`` tokens; when the cut removes its slot,
  the behaviour is appended instead (composition ``append-truncated``). The behaviour itself is
  never cut.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from steerlex.core.errors import EvalError, SourceError
from steerlex.data import TextItem, load_texts
from steerlex.data.files import decode_utf8, parse_json, parse_jsonl, read_bytes
from steerlex.data.split import select_split, unit_hash

__all__ = [
    "KINDS",
    "PROMPT_SLOT",
    "EvalError",
    "EvalPrompt",
    "EvalSets",
    "SourceSpec",
    "Template",
    "build_sets",
    "compose_attack",
    "find_slots",
    "load_source",
    "order_by_seed",
    "split_part",
]

Kind = Literal["jailbreak", "harmful", "benign", "utility"]
KINDS: tuple[Kind, ...] = ("jailbreak", "harmful", "benign", "utility")
Part = Literal["selection", "test"]

PROMPT_SLOT = re.compile(
    r"\\?[\[{]\s*(?:insert[ _](?:your[ _])?prompt(?:[ _]here)?|your[ _]prompt[ _]here|prompt)"
    r"\s*\\?[\]}]|insert prompt here",
    re.IGNORECASE,
)
"""Where a template asks for the request: ``[INSERT PROMPT HERE]`` (with ``{}`` or escaped
brackets too), ``[insert your prompt here]``, ``[Insert prompt]``, ``[Your prompt here]``,
``[PROMPT]``, ``{INSERT_YOUR_PROMPT_HERE}`` and the bare words ``INSERT PROMPT HERE``."""

NAME_PLACEHOLDER = "{generator.name}"
LANGUAGE_PLACEHOLDER = "[TARGETLANGUAGE]"


@dataclass(frozen=True)
class SourceSpec:
    """A text source (named set, file or ``hf:`` spec) with an optional text column and a
    filter: ``where={"label": "safe"}`` keeps items whose meta field ``label`` equals ``safe``
    (for XSTest's safe prompts)."""

    source: str
    column: str | None = None
    where: dict[str, str] | None = None

    def describe(self) -> str:
        out = self.source
        if self.column:
            out += f" (column {self.column})"
        if self.where:
            out += " where " + ", ".join(f"{k}={v}" for k, v in sorted(self.where.items()))
        return out


@dataclass(frozen=True)
class EvalPrompt:
    """One user message to evaluate.

    ``id`` is unique within a run (``kind:...``); ``behaviour`` is the plain harmful request
    (for jailbreaks and plain harmful prompts; empty for benign ones); ``part`` is
    ``selection`` or ``test``; ``meta`` holds ``composition``, ``template``, ``reference`` and
    source fields, all strings.
    """

    id: str
    kind: Kind
    text: str
    part: Part
    behaviour: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "part": self.part,
            "text": self.text,
            "behaviour": self.behaviour,
            "meta": dict(self.meta),
        }


@dataclass(frozen=True)
class Template:
    """A jailbreak template: its id, text and the prompt slots found in it."""

    id: str
    text: str
    source: str

    @property
    def slots(self) -> list[str]:
        return find_slots(self.text)


@dataclass
class EvalSets:
    """Every prompt of a run, by part and kind, and where they came from."""

    prompts: list[EvalPrompt]
    provenance: dict[str, str]
    settings: dict[str, Any]
    tuning: dict[str, list[str]] = field(default_factory=dict)
    """Selection-part texts for the refusal direction and data-driven features:
    ``{"harmful": [...], "benign": [...]}``."""

    def of(self, kind: Kind, part: Part) -> list[EvalPrompt]:
        return [p for p in self.prompts if p.kind == kind and p.part == part]

    def counts(self) -> dict[str, dict[str, int]]:
        return {part: {k: len(self.of(k, part)) for k in KINDS} for part in ("selection", "test")}

    def split_record(self) -> dict[str, Any]:
        """What is saved next to the results: settings, provenance and every prompt id by part."""
        return {
            "settings": self.settings,
            "provenance": self.provenance,
            "counts": self.counts(),
            "selection": [p.id for p in self.prompts if p.part == "selection"],
            "test": [p.id for p in self.prompts if p.part == "test"],
        }


# --------------------------------------------------------------------------- loading


def load_source(spec: str | SourceSpec) -> tuple[list[TextItem], str]:
    """The non-empty items of ``spec`` and its provenance.

    Besides everything :func:`steerlex.data.load_texts` reads, a ``.jsonl``/``.json`` file of
    objects with a ``turns`` list (MT-Bench) gives one item per object: its first turn, with
    ``reference`` (the first reference answer, when present) and ``category`` in ``meta``.

    Raises:
        EvalError / SourceError: unreadable, empty or malformed source, or a filter that keeps
            nothing.
    """
    s = SourceSpec(spec) if isinstance(spec, str) else spec
    turns = _load_turns(s)
    if turns is not None:
        items, provenance = turns
    else:
        text_set = load_texts(s.source, column=s.column)
        items, provenance = list(text_set.items), text_set.provenance
    if s.where:
        kept = [it for it in items if all(it.meta.get(k) == v for k, v in s.where.items())]
        if not kept:
            fields = sorted({k for it in items[:20] for k in it.meta})
            raise EvalError(
                f"The filter where={s.where} keeps none of the {len(items)} texts of "
                f"{s.source}; its fields are {fields or 'none'}. Fix the filter."
            )
        items = kept
    return items, provenance


def _load_turns(s: SourceSpec) -> tuple[list[TextItem], str] | None:
    path = Path(s.source).expanduser()
    if path.suffix.lower() not in (".jsonl", ".json") or not path.is_file():
        return None
    text = decode_utf8(read_bytes(path), str(path))
    if not text.strip():
        raise SourceError(f"{path} is empty. Put at least one text in it.")
    if path.suffix.lower() == ".jsonl":
        records = parse_jsonl(text, str(path))
    else:
        value = parse_json(text, str(path))
        if not isinstance(value, list):
            return None
        records = list(enumerate(value, 1))
    first = records[0][1] if records else None
    if not (isinstance(first, dict) and isinstance(first.get("turns"), list)):
        return None
    if s.column is not None:
        raise EvalError(
            f"{path} holds multi-turn records ('turns'); the first turn is the prompt, so "
            f"column={s.column!r} does not apply. Leave column unset."
        )
    items = []
    for pos, rec in records:
        turns = rec.get("turns") if isinstance(rec, dict) else None
        if (
            not isinstance(rec, dict)
            or not isinstance(turns, list)
            or not turns
            or not isinstance(turns[0], str)
        ):
            raise SourceError(
                f"{path}, record {pos}: 'turns' must be a non-empty list of strings like the "
                "first record's."
            )
        meta = {
            k: str(v)
            for k, v in rec.items()
            if k not in ("turns", "reference") and isinstance(v, (str, int, float))
        }
        ref = rec.get("reference")
        if isinstance(ref, list) and ref and isinstance(ref[0], str) and ref[0].strip():
            meta["reference"] = ref[0]
        qid = rec.get("question_id", rec.get("id", pos))
        if turns[0].strip():
            items.append(
                TextItem(text=turns[0], id=f"{path.name}:{qid}", source=str(path), meta=meta)
            )
    if not items:
        raise SourceError(f"{path} contains no non-empty first turns.")
    return items, f"local file {path.resolve()} (first turns of 'turns' records)"


# --------------------------------------------------------------------------- splits


def split_part(
    items: Sequence[TextItem], part: Part, test_fraction: float, salt: str
) -> list[TextItem]:
    """The items of ``part``: ``test`` = the held-out side of
    :func:`~steerlex.data.split.select_split` with ``test_fraction`` and ``salt``."""
    try:
        return select_split(
            items, "heldout" if part == "test" else "train", test_fraction, salt=salt
        )
    except SourceError as exc:
        raise EvalError(f"test_fraction: {exc}") from None


def order_by_seed(items: Sequence[TextItem], seed: int, salt: str) -> list[TextItem]:
    """``items`` in a fixed pseudo-random order given by ``seed`` (independent of the others)."""
    return sorted(items, key=lambda it: (unit_hash(it.id, f"{salt}/{seed}"), it.id))


# --------------------------------------------------------------------------- composition


def find_slots(text: str) -> list[str]:
    """The distinct prompt slots in ``text``, in order of appearance."""
    out: list[str] = []
    for m in PROMPT_SLOT.finditer(text):
        if m.group(0) not in out:
            out.append(m.group(0))
    return out


TokenCounter = Callable[[str], list[int]]
"""Character end offsets of each token of a text (its length is the token count)."""


def token_ends(tokenizer: Any) -> TokenCounter:
    """A :data:`TokenCounter` from a Hugging Face fast tokenizer (no special tokens)."""

    def ends(text: str) -> list[int]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [int(e) for _s, e in enc["offset_mapping"]]

    return ends


def _word_ends(text: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\S+", text)]


def compose_attack(
    template: Template,
    behaviour: str,
    *,
    append: bool = True,
    model_name: str = "ChatGPT",
    budget: int | None = None,
    token_ends_of: TokenCounter | None = None,
) -> tuple[str, dict[str, str]]:
    """The jailbreak prompt for ``behaviour`` in ``template`` and how it was made.

    Returns ``(text, meta)`` with ``meta["composition"]`` one of ``slot``, ``append`` and
    ``append-truncated`` and ``meta["truncated"]`` ``"true"``/``"false"``. See the module
    docstring for the rules; ``token_ends_of`` counts tokens (default: whitespace words).

    Raises:
        EvalError: the template has no slot (or lost it to the budget) and ``append`` is off.
    """
    if not behaviour.strip():
        raise EvalError("the behaviour to compose into a jailbreak template is empty.")
    text = template.text.replace(NAME_PLACEHOLDER, model_name).replace(
        LANGUAGE_PLACEHOLDER, "English"
    )
    truncated = False
    if budget is not None:
        ends = (token_ends_of or _word_ends)(text)
        if len(ends) > budget:
            text = text[: ends[budget - 1]]
            truncated = True
    slots = find_slots(text)
    if slots:
        out = text
        for slot in slots:
            out = out.replace(slot, behaviour)
        how = "slot"
    elif append:
        out = text.rstrip() + "\n\n" + behaviour
        how = "append-truncated" if truncated and find_slots(template.text) else "append"
    else:
        lost = (
            " after truncation to the token budget"
            if truncated and find_slots(template.text)
            else ""
        )
        raise EvalError(
            f"jailbreak template {template.id} ({template.source}) has no prompt slot such as "
            f"[INSERT PROMPT HERE]{lost} and appending is off; set sets.append to true (the "
            "behaviour then follows the template after a blank line), or drop the template."
        )
    return out, {
        "composition": how,
        "template": template.id,
        "truncated": "true" if truncated else "false",
    }


# --------------------------------------------------------------------------- building


def _items_of(
    specs: Sequence[str | SourceSpec], what: str
) -> tuple[list[TextItem], dict[str, str]]:
    items: list[TextItem] = []
    provenance: dict[str, str] = {}
    seen: set[str] = set()
    for spec in specs:
        got, prov = load_source(spec)
        name = spec if isinstance(spec, str) else spec.describe()
        provenance[f"{what}: {name}"] = prov
        for it in got:
            if it.id in seen:  # two files give "file:N" ids: make them unique by source
                it = TextItem(it.text, f"{Path(it.source).name}:{it.id}", it.source, it.meta)
            seen.add(it.id)
            items.append(it)
    return items, provenance


@dataclass
class _Pools:
    """Every item an evaluation draws from, and how a part of a pool is taken."""

    behaviours: list[TextItem]
    templates: list[TextItem]  # unique texts
    reformulated: list[list[TextItem]]  # one pool per source
    benign: list[TextItem]
    utility: list[TextItem]
    provenance: dict[str, str]
    test_fraction: float
    seed: int
    salt: str

    def take(self, pool: list[TextItem], part: Part, n: int, what: str, key: str) -> list[TextItem]:
        """The ``part`` of ``pool`` in its seeded order (at least ``n`` items, else an error
        naming ``sets.<key>``)."""
        got = order_by_seed(
            split_part(pool, part, self.test_fraction, self.salt), self.seed, self.salt
        )
        if len(got) < n:
            raise EvalError(
                f"The {part} part of the {what} has {len(got)} items but {n} are needed; lower "
                f"sets.{key}, add sources or change test_fraction."
            )
        return got


def _load_pools(
    harmful: Sequence[str | SourceSpec],
    templates: Sequence[str | SourceSpec],
    benign: Sequence[str | SourceSpec],
    utility: Sequence[str | SourceSpec],
    reformulated: Sequence[str | SourceSpec],
    *,
    test_fraction: float,
    seed: int,
    salt: str,
) -> _Pools:
    provenance: dict[str, str] = {}
    behaviours, prov = _items_of(harmful, "harmful")
    provenance.update(prov)
    template_items: list[TextItem] = []
    if templates:
        template_items, prov = _items_of(templates, "templates")
        provenance.update(prov)
    benign_items, prov = _items_of(benign, "benign")
    provenance.update(prov)
    utility_items: list[TextItem] = []
    if utility:
        utility_items, prov = _items_of(utility, "utility")
        provenance.update(prov)
    by_source: dict[str, list[TextItem]] = {}
    if reformulated:
        got, prov = _items_of(reformulated, "reformulated")
        provenance.update(prov)
        for it in got:
            by_source.setdefault(it.source, []).append(it)
    reformulated_items = list(by_source.values())
    unique: dict[str, TextItem] = {}
    for it in template_items:
        unique.setdefault(it.text, it)
    return _Pools(
        behaviours, list(unique.values()), reformulated_items, benign_items, utility_items,
        provenance, test_fraction, seed, salt,
    )  # fmt: skip


def _jailbreaks(
    pools: _Pools, part: Part, beh: list[TextItem], n_jb: int, compose: dict[str, Any]
) -> list[EvalPrompt]:
    """``n_jb`` jailbreaks of ``part``: behaviour ``i mod B`` in template ``(i + i div B) mod T``."""
    order_t = pools.take(pools.templates, part, 1, "jailbreak templates", "n_jailbreak")
    out = []
    for i in range(n_jb):
        b = beh[i % len(beh)]
        t = order_t[(i + i // len(beh)) % len(order_t)]
        text, meta = compose_attack(Template(t.id, t.text, t.source), b.text, **compose)
        meta.update(behaviour_id=b.id, source=t.source, family=t.source)
        out.append(EvalPrompt(f"jailbreak:{b.id}|{t.id}", "jailbreak", text, part, b.text, meta))
    return out


def _reformulations(pools: _Pools, part: Part, n: int) -> list[EvalPrompt]:
    """``n`` reformulated requests of ``part``, taken from the sources in turn (the request
    is its own behaviour; its family is its source)."""
    if not n:
        return []
    if not pools.reformulated:
        raise EvalError(
            "sets.n_reformulated is above 0 but sets.reformulated names no source; add one "
            "(e.g. past-tense, future-tense) or set n_reformulated to 0."
        )
    counts = [n // len(pools.reformulated) + (i < n % len(pools.reformulated))
              for i in range(len(pools.reformulated))]  # fmt: skip
    out = []
    for pool, count in zip(pools.reformulated, counts, strict=True):
        for it in pools.take(pool, part, count, "reformulated requests", "n_reformulated")[:count]:
            meta = {"composition": "reformulated", "behaviour_id": it.id, "source": it.source,
                    "family": it.source}  # fmt: skip
            out.append(EvalPrompt(f"jailbreak:{it.id}", "jailbreak", it.text, part, it.text, meta))
    return out


def _part_prompts(
    pools: _Pools, part: Part, n: tuple[int, int, int, int, int], compose: dict[str, Any]
) -> list[EvalPrompt]:
    """The plain harmful, jailbreak, benign and utility prompts of ``part``; ``n`` holds how
    many template jailbreaks, harmful, benign, utility and reformulated prompts."""
    n_jb, n_harm, n_ben, n_util, n_ref = n
    key = "n_selection" if part == "selection" else "n_harmful"
    beh = pools.take(
        pools.behaviours, part, max(n_harm, 1 if n_jb else 0), "harmful behaviours", key
    )
    prompts: list[EvalPrompt] = []
    for it in beh[:n_harm]:
        meta = {"behaviour_id": it.id, "source": it.source}
        prompts.append(EvalPrompt(f"harmful:{it.id}", "harmful", it.text, part, it.text, meta))
    if n_jb:
        prompts += _jailbreaks(pools, part, beh, n_jb, compose)
    prompts += _reformulations(pools, part, n_ref)
    for kind, pool, count in (("benign", pools.benign, n_ben), ("utility", pools.utility, n_util)):
        if not count:
            continue
        key = "n_selection" if part == "selection" else f"n_{kind}"
        for it in pools.take(pool, part, count, f"{kind} prompts", key)[:count]:
            meta = {"source": it.source}
            if "reference" in it.meta:
                meta["reference"] = it.meta["reference"]
            kind_l: Kind = "benign" if kind == "benign" else "utility"
            prompts.append(EvalPrompt(f"{kind}:{it.id}", kind_l, it.text, part, "", meta))
    return prompts


def build_sets(
    *,
    harmful: Sequence[str | SourceSpec],
    templates: Sequence[str | SourceSpec],
    benign: Sequence[str | SourceSpec],
    utility: Sequence[str | SourceSpec] = (),
    reformulated: Sequence[str | SourceSpec] = (),
    n_jailbreak: int,
    n_reformulated: int = 0,
    n_harmful: int,
    n_benign: int,
    n_utility: int = 0,
    n_selection: int,
    n_tuning: int = 64,
    test_fraction: float = 0.5,
    seed: int = 0,
    salt: str = "steerlex-eval",
    append: bool = True,
    model_name: str = "ChatGPT",
    template_budget: int | None = 384,
    tokenizer: Any = None,
) -> EvalSets:
    """Every prompt of an evaluation (see the module docstring for the rules).

    Test part: ``n_jailbreak`` jailbreaks, ``n_harmful`` plain behaviours (the first behaviours
    of the jailbreaks, so both see the same requests), ``n_reformulated`` reformulated
    requests (kind ``jailbreak``, split evenly over the ``reformulated`` sources, e.g. past- and
    future-tense rewrites; each is its own behaviour), ``n_benign`` benign and ``n_utility``
    utility prompts. Every jailbreak's ``meta["family"]`` is its template's or reformulation's
    source. Selection part: ``n_selection`` each of jailbreak, harmful and benign (for
    tuning), and up to ``n_tuning`` selection-part harmful and benign texts in
    :attr:`EvalSets.tuning` (for the refusal direction and data-driven features). Template
    duplicates (same text) are dropped. Jailbreak ``i`` pairs behaviour ``i mod B`` with
    template ``(i + i div B) mod T`` of the part's seeded orders. ``tokenizer`` counts
    template tokens for the budget (default: whitespace words).

    Raises:
        EvalError: a part has too few items for the sizes asked, or a template cannot be used.
    """
    sizes = {
        "n_jailbreak": n_jailbreak,
        "n_harmful": n_harmful,
        "n_benign": n_benign,
        "n_utility": n_utility,
        "n_reformulated": n_reformulated,
        "n_selection": n_selection,
        "n_tuning": n_tuning,
    }
    for name, n in sizes.items():
        if n < 0:
            raise EvalError(f"sets.{name} must be >= 0, got {n}.")
    if template_budget is not None and template_budget < 1:
        raise EvalError(f"sets.template_budget must be >= 1 or null, got {template_budget}.")
    pools = _load_pools(
        harmful, templates, benign, utility, reformulated,
        test_fraction=test_fraction, seed=seed, salt=salt,
    )  # fmt: skip
    compose = {
        "append": append,
        "model_name": model_name,
        "budget": template_budget,
        "token_ends_of": token_ends(tokenizer) if tokenizer is not None else None,
    }
    sel = (n_selection, n_selection, n_selection, 0, 0)
    prompts = _part_prompts(pools, "selection", sel, compose)
    test = (n_jailbreak, n_harmful, n_benign, n_utility, n_reformulated)
    prompts += _part_prompts(pools, "test", test, compose)
    harm_sel = pools.take(pools.behaviours, "selection", 1, "harmful behaviours", "n_tuning")
    benign_sel = pools.take(pools.benign, "selection", 1, "benign prompts", "n_tuning")
    tuning = {
        "harmful": [it.text for it in harm_sel[:n_tuning]],
        "benign": [it.text for it in benign_sel[:n_tuning]],
    }
    ids = [p.id for p in prompts]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:  # more jailbreaks than behaviour x template pairs
        raise EvalError(
            f"Jailbreak prompt {dupes[0]} would be used twice: the part has too few behaviours "
            "and templates for sets.n_jailbreak; lower it or add sources."
        )
    settings = {
        "harmful": [_spec_json(s) for s in harmful],
        "templates": [_spec_json(s) for s in templates],
        "benign": [_spec_json(s) for s in benign],
        "utility": [_spec_json(s) for s in utility],
        "reformulated": [_spec_json(s) for s in reformulated],
        **sizes,
        "test_fraction": test_fraction,
        "seed": seed,
        "salt": salt,
        "append": append,
        "model_name": model_name,
        "template_budget": template_budget,
        "template_budget_unit": "model tokens" if tokenizer is not None else "whitespace words",
    }
    return EvalSets(prompts, pools.provenance, settings, tuning)


def _spec_json(s: str | SourceSpec) -> Any:
    if isinstance(s, str):
        return s
    return json.loads(json.dumps({"source": s.source, "column": s.column, "where": s.where}))
