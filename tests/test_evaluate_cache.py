"""The generation cache: hits and misses, resume after a torn line, another model's records."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from steerlex.evaluate.cache import CacheWarning, EvalCache, cache_key


def test_key_depends_on_every_part() -> None:
    base = cache_key("m", "generation", {"prompt": "p", "defence": {"kind": "none"}})
    assert base == cache_key("m", "generation", {"defence": {"kind": "none"}, "prompt": "p"})
    assert base != cache_key("m2", "generation", {"prompt": "p", "defence": {"kind": "none"}})
    assert base != cache_key("m", "generation", {"prompt": "q", "defence": {"kind": "none"}})
    assert base != cache_key("m", "generation", {"prompt": "p", "defence": {"kind": "dense"}})


def test_hit_miss_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "c" / "gen.jsonl"
    cache = EvalCache(path, "model-a")
    assert cache.get("k1") is None
    cache.put_many([{"key": "k1", "text": "hello"}, {"key": "k2", "text": "bye"}])
    again = EvalCache(path, "model-a")
    assert again.get("k1") == {"key": "k1", "text": "hello", "model": "model-a"}
    assert "k2" in again and "k3" not in again and again.hits == 1


def test_torn_last_line_is_skipped_and_appends_continue_on_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    EvalCache(path, "m").put_many([{"key": "k1", "text": "a"}])
    with path.open("ab") as f:
        f.write(b'{"key": "k2", "text": "hal')  # killed mid-write
    with pytest.warns(CacheWarning, match="unreadable"):
        cache = EvalCache(path, "m")
    assert "k1" in cache and "k2" not in cache
    cache.put_many([{"key": "k2", "text": "whole"}])
    with pytest.warns(CacheWarning):
        resumed = EvalCache(path, "m")
    assert resumed.get("k2") is not None and resumed.get("k2")["text"] == "whole"  # type: ignore[index]


def test_records_of_another_model_are_ignored_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    EvalCache(path, "model-a").put_many([{"key": "shared-key", "text": "from a"}])
    with pytest.warns(CacheWarning, match=r"another model: model-a \(1\)"):
        cache = EvalCache(path, "model-b")
    assert cache.get("shared-key") is None  # never mixed, even with the same key
    cache.put_many([{"key": "k", "text": "from b"}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert EvalCache(path, "model-a").get("shared-key") is not None
