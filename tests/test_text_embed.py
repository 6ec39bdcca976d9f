"""The packaged all-MiniLM-L6-v2 sentence encoder: shape, norms, meaning, integrity."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import steerlex.text_embed as text_embed
from steerlex.core.errors import IntegrityError, MissingPackageError, SteerlexError
from steerlex.core.io import sha256_file
from steerlex.text_embed import (
    DIM,
    INSTALL,
    WEIGHTS_SHA256,
    SentenceEncoder,
    load_sentence_encoder,
    packaged_model_dir,
)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentenceEncoder]:
    with pytest.MonkeyPatch.context() as mp:  # keep the hash memo out of the user's cache
        mp.setenv("STEERLEX_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_sentence_encoder()


def test_pinned_hash_matches_installed_file() -> None:
    assert sha256_file(packaged_model_dir() / "model.safetensors") == WEIGHTS_SHA256


def test_shape_dtype_unit_norm(encoder: SentenceEncoder) -> None:
    out = encoder.encode(["dog", "a longer sentence about the weather", ""])
    assert out.shape == (3, DIM) == (3, 384)
    assert out.dtype == torch.float32
    assert out.device.type == "cpu"
    assert not out.requires_grad
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_meaning(encoder: SentenceEncoder) -> None:
    dog, puppy, tax = encoder.encode(["dog", "puppy", "tax"])
    assert float(dog @ puppy) > float(dog @ tax) + 0.2


def test_deterministic_and_batch_independent(encoder: SentenceEncoder) -> None:
    texts = ["dog", "puppy", "tax", "the quick brown fox jumps over the lazy dog"]
    a = encoder.encode(texts)
    assert torch.equal(a, encoder.encode(texts))
    torch.testing.assert_close(encoder.encode(texts, batch_size=1), a, atol=1e-5, rtol=0)


def test_empty_and_bad_input(encoder: SentenceEncoder) -> None:
    assert encoder.encode([]).shape == (0, DIM)
    with pytest.raises(SteerlexError, match="not one string"):
        encoder.encode("dog")
    with pytest.raises(SteerlexError, match="batch_size"):
        encoder.encode(["dog"], batch_size=0)
    with pytest.raises(SteerlexError, match="item 1"):
        encoder.encode(["dog", 3])  # type: ignore[list-item]


def test_loader_is_cached(encoder: SentenceEncoder) -> None:
    assert load_sentence_encoder() is encoder


def test_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_embed, "package_dir", lambda module: None)
    with pytest.raises(MissingPackageError) as info:
        packaged_model_dir()
    assert INSTALL in str(info.value)
    assert "--no-deps" in str(info.value)


def _fake_model_dir(tmp_path: Path, weights: bytes) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(weights)
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    return d


def test_hash_mismatch_raises(tmp_path: Path, cache_dir: Path) -> None:
    d = _fake_model_dir(tmp_path, b"not the model")
    with pytest.raises(IntegrityError, match="sha256"):
        SentenceEncoder(d)


def test_missing_files_raise(tmp_path: Path, cache_dir: Path) -> None:
    d = _fake_model_dir(tmp_path, b"x")
    (d / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match=r"tokenizer\.json"):
        SentenceEncoder(d)
