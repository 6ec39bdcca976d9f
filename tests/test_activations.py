"""Harvesting into the activation store: correctness, resume, atomicity, bad inputs."""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from conftest import SENTENCES
from steerlex.activations import ActivationStore, HarvestOptions, harvest
from steerlex.activations import store as store_mod
from steerlex.core.errors import LayerError, StoreError
from steerlex.models.chat import encode_prompt
from steerlex.models.loading import LoadedModel


@dataclass(frozen=True)
class Item:
    text: str
    id: str
    source: str = "test"


TEXTS = [Item(s, f"t{i}") for i, s in enumerate(SENTENCES * 2)]
OPTS = HarvestOptions(layer=1, batch_size=3, texts_per_shard=4)


def store_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_harvest_matches_unpadded_forward(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    store = harvest(tiny_loaded, TEXTS, tmp_path / "s", OPTS, progress=False)
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    expected_tokens = 0
    for i in range(len(store.shards)):
        shard = store.load_shard(i)
        for t in shard["text_index"].unique().tolist():
            enc = encode_prompt(tok, TEXTS[t].text, chat=True, max_length=OPTS.max_length)
            with torch.no_grad():
                hs = model(torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states
            rows = shard["text_index"] == t
            want = hs[OPTS.layer + 1][0, enc.content_start :]
            torch.testing.assert_close(shard["activations"][rows], want, rtol=1e-4, atol=1e-5)
            assert shard["position"][rows].tolist() == list(
                range(enc.content_start, len(enc.input_ids))
            )
            assert shard["token_ids"][rows].tolist() == enc.input_ids[enc.content_start :]
    for t in TEXTS:
        enc = encode_prompt(tok, t.text, chat=True)
        expected_tokens += len(enc.input_ids) - enc.content_start
    assert store.n_tokens == expected_tokens  # pads never stored, prefix dropped
    assert store.index["complete"] and store.layer == 1 and store.d_model == 32
    assert [t["id"] for t in store.texts()] == [t.id for t in TEXTS]


@pytest.mark.parametrize("keep", ["all", "no-bos", "no-prefix", "content"])
def test_keep_rules(tiny_loaded: LoadedModel, tmp_path: Path, keep: str) -> None:
    store = harvest(
        tiny_loaded, TEXTS[:3], tmp_path / keep, replace(OPTS, keep=keep), progress=False
    )  # type: ignore[arg-type]
    shard = store.load_shard(0)
    tok = tiny_loaded.tokenizer
    first = shard["text_index"] == 0
    ids = shard["token_ids"][first].tolist()
    words = tok.convert_ids_to_tokens(ids)
    content = SENTENCES[0].split()
    if keep == "all":
        assert words[0] == "[BOS]" and words[1] == "<|user|>"
    elif keep == "no-bos":
        assert words[0] == "<|user|>"
    elif keep == "no-prefix":
        assert words == [*content, "<|end|>", "<|assistant|>"]
    else:
        assert words == content


def test_raw_text_mode(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    store = harvest(
        tiny_loaded,
        TEXTS[:2],
        tmp_path / "raw",
        replace(OPTS, chat=False, keep="no-bos"),
        progress=False,
    )
    words = tiny_loaded.tokenizer.convert_ids_to_tokens(store.load_shard(0)["token_ids"].tolist())
    assert "[BOS]" not in words and "<|user|>" not in words
    assert store.index["identity"]["chat"] is False


def test_resume_after_kill_is_byte_identical(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    harvest(tiny_loaded, TEXTS, fresh, OPTS, progress=False)

    killed = tmp_path / "killed"

    def kill_after_second(i: int) -> None:
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest(tiny_loaded, TEXTS, killed, OPTS, progress=False, on_shard=kill_after_second)
    partial = ActivationStore.open(killed, allow_incomplete=True)
    assert len(partial.shards) == 2 and not partial.index["complete"]
    with pytest.raises(StoreError, match="unfinished"):
        ActivationStore.open(killed)

    calls: list[int] = []
    harvest(tiny_loaded, TEXTS, killed, OPTS, progress=False, on_shard=calls.append)
    assert calls == [2, 3, 4]  # finished shards were skipped
    assert store_bytes(killed) == store_bytes(fresh)


def test_half_written_shard_is_never_read(
    tiny_loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "s"
    real_save = store_mod.save_file
    count = {"n": 0}

    def dying_save(tensors: dict[str, torch.Tensor], path: str) -> None:
        count["n"] += 1
        if count["n"] == 3:  # the third shard dies half-way through its write
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt
        real_save(tensors, path)

    monkeypatch.setattr(store_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        harvest(tiny_loaded, TEXTS, out, OPTS, progress=False)
    assert sorted(p.name for p in out.glob("shard_*")) == [
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]
    assert not list(out.glob(".*.tmp"))
    partial = ActivationStore.open(out, allow_incomplete=True)
    assert [s.file for s in partial.shards] == [
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]

    monkeypatch.setattr(store_mod, "save_file", real_save)
    harvest(tiny_loaded, TEXTS, out, OPTS, progress=False)
    fresh = tmp_path / "fresh"
    harvest(tiny_loaded, TEXTS, fresh, OPTS, progress=False)
    assert store_bytes(out) == store_bytes(fresh)


def test_disk_full_is_a_clear_error(
    tiny_loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(tensors: dict[str, torch.Tensor], path: str) -> None:
        Path(path).write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "save_file", full)
    with pytest.raises(StoreError, match="No space left on device.*Free disk space"):
        harvest(tiny_loaded, TEXTS, tmp_path / "s", OPTS, progress=False)
    assert not list((tmp_path / "s").glob("shard_*")) and not list((tmp_path / "s").glob(".*.tmp"))


def test_damaged_shard_is_detected_and_rebuilt(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "s"
    store = harvest(tiny_loaded, TEXTS, out, OPTS, progress=False)
    good = store_bytes(out)
    (out / "shard_00002.safetensors").write_bytes(b"garbage")
    assert store.verify() == ["shard_00002.safetensors"]
    with pytest.raises(StoreError, match="shard_00002.*damaged"):
        store.load_shard(2)
    harvest(tiny_loaded, TEXTS, out, OPTS, progress=False)  # rerun rebuilds only that shard
    assert store_bytes(out) == good


def test_refuses_to_mix_stores(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "s"
    harvest(tiny_loaded, TEXTS, out, OPTS, progress=False)
    with pytest.raises(StoreError, match=r"layer: store has 1, this run 2.*another --out"):
        harvest(tiny_loaded, TEXTS, out, replace(OPTS, layer=2), progress=False)
    other = LoadedModel(
        **{**tiny_loaded.__dict__, "spec": "tiny:other", "weights_id": "sha256:other"}
    )
    with pytest.raises(StoreError, match="model_spec"):
        harvest(other, TEXTS, out, OPTS, progress=False)
    with pytest.raises(StoreError, match="texts_sha256"):
        harvest(tiny_loaded, TEXTS[:5], out, OPTS, progress=False)


def test_bad_inputs(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(LayerError, match=r"0\.\.3"):
        harvest(tiny_loaded, TEXTS, tmp_path / "a", replace(OPTS, layer=7), progress=False)
    with pytest.raises(StoreError, match="No texts"):
        harvest(tiny_loaded, [], tmp_path / "b", OPTS, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and holds no activation store"):
        harvest(tiny_loaded, TEXTS, tmp_path / "junk", OPTS, progress=False)
    with pytest.raises(StoreError, match="storage dtype 'int8'"):
        harvest(tiny_loaded, TEXTS, tmp_path / "c", replace(OPTS, dtype="int8"), progress=False)
    with pytest.raises(StoreError, match="No activation store"):
        ActivationStore.open(tmp_path / "nowhere")


def test_iter_batches_covers_every_token_once(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    store = harvest(tiny_loaded, TEXTS, tmp_path / "s", OPTS, progress=False)
    everything = store.activations()
    batches = list(store.iter_batches(7, seed=3, shards_in_memory=2))
    assert all(b.shape == (7, 32) for b in batches[:-1])
    got = torch.cat(batches)
    assert got.shape == everything.shape
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, everything.tolist()))
    again = torch.cat(list(store.iter_batches(7, seed=3, shards_in_memory=2)))
    assert torch.equal(again, got)  # deterministic
    other = torch.cat(list(store.iter_batches(7, seed=4, shards_in_memory=2)))
    assert not torch.equal(other, got)
    ordered = torch.cat(list(store.iter_batches(7, shuffle=False)))
    assert torch.equal(ordered, everything)
    assert sum(b.shape[0] for b in store.iter_batches(7, drop_last=True)) == 7 * (
        store.n_tokens // 7
    )


def test_iter_shards_in_order_with_a_token_limit(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    store = harvest(tiny_loaded, TEXTS, tmp_path / "s", OPTS, progress=False)
    assert len(store.shards) > 1
    everything = store.activations()
    parts = list(store.iter_shards())
    sizes = [int(t["activations"].shape[0]) for _, t in parts]
    assert [o for o, _ in parts] == [sum(sizes[:i]) for i in range(len(sizes))]
    assert torch.equal(torch.cat([t["activations"] for _, t in parts]), everything)
    cut = int(parts[0][1]["activations"].shape[0]) + 1  # one token into the second shard
    limited = list(store.iter_shards(cut))
    assert len(limited) == 2 and int(limited[1][1]["token_ids"].shape[0]) == 1
    assert torch.equal(torch.cat([t["activations"] for _, t in limited]), everything[:cut])


def test_float16_storage(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    store = harvest(
        tiny_loaded, TEXTS[:4], tmp_path / "s", replace(OPTS, dtype="float16"), progress=False
    )
    assert store.load_shard(0)["activations"].dtype == torch.float16
    assert next(store.iter_batches(4, dtype=torch.float32)).dtype == torch.float32
