"""Integrity on every load (store shards, SAE weights), directory locks, and file modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import SENTENCES, make_tiny_loaded, save_tiny_model
from steerlex.activations import ActivationStore, HarvestOptions, harvest
from steerlex.cli import main
from steerlex.core.errors import PipelineError, SAEError, StoreError
from steerlex.core.io import LOCK_NAME, dir_lock, write_json_atomic
from steerlex.models import cache as cache_mod
from steerlex.pipeline import run as prun
from steerlex.pipeline.config import resolve_config
from steerlex.sae import SAEConfig, SparseAutoencoder, load_sae, save_sae
from steerlex.sae.foreign import save_sparsify
from steerlex.sae.formats import SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_SIDECAR, SPARSIFY_WEIGHTS


def flip_tail(path: Path, n: int = 64) -> None:
    """Invert the last ``n`` bytes of ``path`` (tensor data in a safetensors file)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - n, len(data)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def small_sae(seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=32, k=4, architecture="topk", layer=1))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.5)
    return sae


# --------------------------------------------------------------------------- SAE weights


def test_flipped_saelens_weights_are_refused(tmp_path: Path) -> None:
    out = save_sae(small_sae(), tmp_path / "sae")
    assert "tensors_sha256" in json.loads((out / SAELENS_CFG).read_text())["metadata"]["steerlex"]
    load_sae(out)  # sound
    flip_tail(out / SAELENS_WEIGHTS)
    with pytest.raises(SAEError) as info:
        load_sae(out)
    msg = str(info.value)
    assert str(out / SAELENS_WEIGHTS) in msg and "does not match the sha256" in msg
    assert "steerlex train-sae" in msg  # says how to rebuild it


def test_sparsify_keeps_steerlex_block_out_of_cfg(tmp_path: Path) -> None:
    """sparsify warns about every cfg.json key it does not know: the block goes beside it."""
    sae = small_sae()
    out = save_sparsify(sae, tmp_path / "sp")
    cfg = json.loads((out / SAELENS_CFG).read_text())
    assert "steerlex" not in cfg
    side = json.loads((out / SPARSIFY_SIDECAR).read_text())
    assert side["config"]["layer"] == 1 and side["tensors_sha256"].startswith("sha256:")
    back = load_sae(out)
    assert back.cfg.layer == 1
    x = torch.randn(5, 8)
    torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5)
    flip_tail(out / SPARSIFY_WEIGHTS)
    with pytest.raises(
        SAEError, match=r"sae\.safetensors does not match the sha256.*steerlex\.json"
    ):
        load_sae(out)


def test_sparsify_reads_the_old_in_cfg_block(tmp_path: Path) -> None:
    out = save_sparsify(small_sae(), tmp_path / "sp")
    cfg = json.loads((out / SAELENS_CFG).read_text())
    cfg["steerlex"] = json.loads((out / SPARSIFY_SIDECAR).read_text())
    (out / SPARSIFY_SIDECAR).unlink()
    (out / SAELENS_CFG).write_text(json.dumps(cfg))
    assert load_sae(out).cfg.layer == 1


def test_sparsify_loads_the_steerlex_copy_without_warnings(tmp_path: Path) -> None:
    sparsify = pytest.importorskip("sparsify")
    out = save_sparsify(small_sae(), tmp_path / "sp")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sparsify.SparseCoder.load_from_disk(str(out))
    assert not [w for w in seen if "steerlex" in str(w.message)]


def test_sae_without_recorded_hash_warns(tmp_path: Path) -> None:
    out = save_sae(small_sae(), tmp_path / "sae")
    cfg = json.loads((out / SAELENS_CFG).read_text())
    del cfg["metadata"]["steerlex"]  # as SAELens or another tool writes it
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_post"
    (out / SAELENS_CFG).write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="no sha256 recorded by steerlex"):
        load_sae(out)


def test_saving_again_records_the_same_hash(tmp_path: Path) -> None:
    sae = small_sae()
    a = save_sae(sae, tmp_path / "a")
    b = save_sae(sae, tmp_path / "b")
    assert (a / SAELENS_CFG).read_bytes() == (b / SAELENS_CFG).read_bytes()
    save_sae(sae, a)  # the same SAE again: a no-op, not "a different SAE"


# --------------------------------------------------------------------------- store shards


@pytest.fixture
def store_run(tmp_path: Path, cache_dir: Path) -> dict[str, Path]:
    model_dir = save_tiny_model(tmp_path / "tiny")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES * 4) + "\n")
    acts = tmp_path / "acts"
    code = main(["harvest", "--model", str(model_dir), "--layer", "1", "--source", str(texts),
                 "--out", str(acts), "--texts-per-shard", "12", "--quiet"])  # fmt: skip
    assert code == 0
    return {"acts": acts, "root": tmp_path}


TRAIN = ["--d-sae", "32", "--k", "4", "--batch-size", "32", "--tokens", "256",
         "--warmup-steps", "1", "--init-sample-tokens", "64", "--quiet"]  # fmt: skip


def test_flipped_shard_is_refused_by_train_and_eval(
    store_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    acts, root = store_run["acts"], store_run["root"]
    assert main(["train-sae", "--activations", str(acts), "--out", str(root / "sae"), *TRAIN]) == 0
    flip_tail(acts / "shard_00001.safetensors")
    capsys.readouterr()
    code = main(["train-sae", "--activations", str(acts), "--out", str(root / "sae2"), *TRAIN])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "shard_00001.safetensors" in err and "damaged" in err and "steerlex harvest" in err
    code = main(["eval-sae", "--sae", str(root / "sae"), "--activations", str(acts), "--no-lm",
                 "--quiet"])  # fmt: skip
    assert code == 2 and "shard_00001.safetensors" in capsys.readouterr().err
    # --no-verify uses the store as it is (the flipped floats are still readable)
    code = main(["train-sae", "--activations", str(acts), "--out", str(root / "sae3"), *TRAIN,
                 "--no-verify"])  # fmt: skip
    assert code == 0


def test_flipped_shard_is_rebuilt_by_the_same_harvest(store_run: dict[str, Path]) -> None:
    acts = store_run["acts"]
    good = (acts / "shard_00001.safetensors").read_bytes()
    flip_tail(acts / "shard_00001.safetensors")
    with pytest.raises(StoreError, match="shard_00001"):
        ActivationStore.open(acts).require_intact()
    index = json.loads((acts / "index.json").read_text())
    args = ["harvest", "--model", index["model"]["spec"], "--layer", "1", "--source",
            str(store_run["root"] / "texts.txt"), "--out", str(acts), "--texts-per-shard", "12",
            "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert (acts / "shard_00001.safetensors").read_bytes() == good
    ActivationStore.open(acts).require_intact()


def test_verification_hashes_each_unchanged_shard_once(
    store_run: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    real = cache_mod.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(cache_mod, "sha256_file", counting)
    store = ActivationStore.open(store_run["acts"])
    store.require_intact()
    first = len(hashed)
    assert first == len(store.shards)
    ActivationStore.open(store_run["acts"]).require_intact()
    assert len(hashed) == first  # memoised by size and mtime


# --------------------------------------------------------------------------- locks


HOLD = """
import sys, time
from pathlib import Path
from steerlex.core.errors import StoreError
from steerlex.core.io import dir_lock
with dir_lock(Path(sys.argv[1]), what="activation store", error=StoreError):
    print("held", flush=True)
    time.sleep(60)
"""


def _hold(directory: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    proc = _hold(tmp_path / "store")
    try:
        with (
            pytest.raises(StoreError) as info,
            dir_lock(tmp_path / "store", what="activation store", error=StoreError),
        ):
            pass
        msg = str(info.value)
        assert f"pid {proc.pid}" in msg and "being written by another steerlex process" in msg
    finally:
        proc.kill()
        proc.wait()
    # the kernel drops the lock with its holder: the directory is free again
    with dir_lock(tmp_path / "store", what="activation store", error=StoreError):
        assert (tmp_path / "store" / LOCK_NAME).read_text().startswith(f"pid {os.getpid()}")
    assert (tmp_path / "store" / LOCK_NAME).read_text() == ""  # an unheld lock names no one


def test_harvest_into_a_locked_store_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    loaded = make_tiny_loaded()

    class Item:
        def __init__(self, i: int, text: str) -> None:
            self.text, self.id, self.source = text, f"t{i}", "test"

    items = [Item(i, s) for i, s in enumerate(SENTENCES)]
    proc = _hold(tmp_path / "store")
    try:
        with pytest.raises(StoreError, match=f"pid {proc.pid}"):
            harvest(loaded, items, tmp_path / "store", HarvestOptions(layer=1), progress=False)
    finally:
        proc.kill()
        proc.wait()
    store = harvest(loaded, items, tmp_path / "store", HarvestOptions(layer=1), progress=False)
    assert store.n_tokens > 0  # the lock file does not make the directory "not empty"


def test_a_locked_run_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    stage = prun.Stage(
        "only", lambda c: (), lambda c: ("x.txt",), lambda c, d, ctx: ran.append("x"), "one"
    )
    monkeypatch.setattr(prun, "STAGES", (stage,))
    cfg = resolve_config("quick", overrides={"name": "r"})
    proc = _hold(tmp_path / "runs" / "r")
    try:
        with pytest.raises(PipelineError, match=f"run directory .*pid {proc.pid}"):
            prun.run_pipeline(cfg, tmp_path / "runs", log=None)
        assert ran == [] and not (tmp_path / "runs" / "r" / "config.json").exists()
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        sae_dir = save_sae(small_sae(), tmp_path / "sae")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sae_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in (SAELENS_CFG, SAELENS_WEIGHTS):
        assert (sae_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask
