"""Training: learning, determinism, exact resume, annealing, bad data, distributed equivalence."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlex.activations.store import ActivationStore, create_store
from steerlex.core.errors import SAEError, TrainingDiverged
from steerlex.sae.train import TrainConfig, geometric_median, k_at, lr_factor, train_sae

D, D_SAE, K = 24, 96, 4


def synthetic(n: int, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of 48 ground-truth directions plus an offset and a little noise."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(48, D, generator=torch.Generator().manual_seed(123))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, 48)
    idx = torch.randint(0, 48, (n, 3), generator=g)
    codes.scatter_(1, idx, torch.rand(n, 3, generator=g) * 3 + 0.5)
    return codes @ dictionary + 2.0 + 0.01 * torch.randn(n, D, generator=g)


@pytest.fixture
def store(tmp_path: Path) -> ActivationStore:
    x = synthetic(4096)
    return create_store(
        tmp_path / "acts",
        list(x.split(512)),
        model_spec="synthetic",
        layer=3,
        hook_name="model.layers.3",
    )


CFG = TrainConfig(
    d_sae=D_SAE,
    k=K,
    batch_size=128,
    lr=3e-3,
    warmup_steps=5,
    tokens=128 * 60,
    checkpoint_every=10,
    log_every=5,
    dead_tokens=2000,
    init_sample_tokens=2048,
    shards_in_memory=2,
)


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "sae_weights.safetensors"))


def test_training_learns(store: ActivationStore, tmp_path: Path) -> None:
    sae = train_sae(
        store, replace(CFG, lr=1e-2, tokens=128 * 120), tmp_path / "sae", progress=False
    )
    log = [
        json.loads(line) for line in (tmp_path / "sae" / "train_log.jsonl").read_text().splitlines()
    ]
    assert log[0]["nmse"] > log[-1]["nmse"]
    assert log[-1]["nmse"] < 0.25, log[-1]
    assert all(r["l0"] <= K for r in log)
    x = store.activations()
    nmse = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert nmse < 0.25
    assert (
        sae.cfg.model_spec == "synthetic"
        and sae.cfg.layer == 3
        and sae.cfg.hf_hook_name == "model.layers.3"
    )
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert (tmp_path / "sae" / "cfg.json").is_file() and (
        tmp_path / "sae" / "training.json"
    ).is_file()


def test_deterministic_and_exact_resume(store: ActivationStore, tmp_path: Path) -> None:
    train_sae(store, CFG, tmp_path / "a", progress=False)
    train_sae(store, CFG, tmp_path / "b", progress=False)
    wa = weights(tmp_path / "a")
    assert all(torch.equal(wa[k], v) for k, v in weights(tmp_path / "b").items())

    def kill(step: int) -> None:
        if step == 27:  # after the step-20 checkpoint, mid-way to step 30
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(store, CFG, tmp_path / "c", progress=False, on_step=kill)
    assert sorted(p.name for p in (tmp_path / "c" / "checkpoints").iterdir()) == [
        "step_0000010.pt",
        "step_0000020.pt",
    ]
    assert not (tmp_path / "c" / "sae_weights.safetensors").exists()
    train_sae(store, CFG, tmp_path / "c", progress=False)
    wc = weights(tmp_path / "c")
    assert all(torch.equal(wa[k], v) for k, v in wc.items())


def test_resume_refuses_other_options(store: ActivationStore, tmp_path: Path) -> None:
    def kill(step: int) -> None:
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(store, CFG, tmp_path / "s", progress=False, on_step=kill)
    with pytest.raises(SAEError, match=r"other training options \(k: checkpoint 4, now 5\)"):
        train_sae(store, replace(CFG, k=5), tmp_path / "s", progress=False)


def test_tied_and_geometric_median(store: ActivationStore, tmp_path: Path) -> None:
    cfg = replace(CFG, tied=True, b_dec_init="geometric_median", tokens=128 * 20)
    sae = train_sae(store, cfg, tmp_path / "t", progress=False)
    assert sae.W_dec_free is None and torch.equal(sae.W_dec, sae.W_enc.T)
    saved = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert json.dumps(saved).count("trained_tied") >= 1


def test_geometric_median_resists_outliers() -> None:
    x = torch.zeros(101, 3)
    x[:, 0] = torch.linspace(-1, 1, 101)
    x[-5:] = 1000.0
    assert geometric_median(x).abs().max() < 0.5
    assert x.mean(0).abs().max() > 40


def test_schedules() -> None:
    cfg = replace(CFG, k=20, k_start=200, k_anneal_steps=100, warmup_steps=10, decay_fraction=0.2)
    assert [k_at(s, cfg) for s in (0, 50, 100, 500)] == [200, 110, 20, 20]
    assert lr_factor(0, 1000, cfg) == pytest.approx(0.1)
    assert lr_factor(500, 1000, cfg) == 1.0
    assert lr_factor(900, 1000, cfg) == pytest.approx(0.5)


def test_annealed_l0_in_log(store: ActivationStore, tmp_path: Path) -> None:
    cfg = replace(CFG, k_start=32, k_anneal_steps=30, tokens=128 * 40)
    train_sae(store, cfg, tmp_path / "k", progress=False)
    log = [
        json.loads(line) for line in (tmp_path / "k" / "train_log.jsonl").read_text().splitlines()
    ]
    assert log[0]["k"] > K and log[-1]["k"] == K
    assert log[0]["l0"] > K and log[-1]["l0"] <= K


def test_nan_in_data_stops_and_keeps_checkpoint(tmp_path: Path) -> None:
    x = synthetic(4096)
    x[3000:3010, 2] = float("nan")  # only in a late shard: the init sample is clean
    store = create_store(tmp_path / "acts", list(x.split(512)))
    with pytest.raises(
        TrainingDiverged,
        match=r"step \d+ holds NaN/Inf.*(last good checkpoint is .*step_|No checkpoint)",
    ):
        train_sae(store, replace(CFG, shards_in_memory=1), tmp_path / "sae", progress=False)


def test_nonfinite_loss_names_the_step(
    store: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steerlex.sae import train as train_mod

    real = train_mod._train_step
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 15:
            out["loss"] = float("nan")
        return out

    monkeypatch.setattr(train_mod, "_train_step", sometimes_nan)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 14.*step_0000010\.pt"):
        train_sae(store, CFG, tmp_path / "sae", progress=False)
    assert (tmp_path / "sae" / "checkpoints" / "step_0000010.pt").is_file()


def test_bad_options(store: ActivationStore, tmp_path: Path) -> None:
    with pytest.raises(SAEError, match=r"k=200 must be between 1 and d_sae=96"):
        train_sae(store, replace(CFG, k=200), tmp_path / "x", progress=False)
    with pytest.raises(SAEError, match="multiple of the number of streams"):
        train_sae(store, replace(CFG, streams=3, batch_size=128), tmp_path / "y", progress=False)
    with pytest.raises(SAEError, match="Unknown training options"):
        TrainConfig.from_dict({"d_sae": 4, "learning_rate": 1})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_two_process_gloo_matches_single_process(
    store: ActivationStore, tmp_path: Path, architecture: str
) -> None:
    cfg = replace(CFG, tokens=128 * 30, architecture=architecture)
    single = tmp_path / "single"
    train_sae(store, replace(cfg, streams=2), single, progress=False)
    ddp = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "steerlex.cli", "train-sae", "--activations", str(store.directory), "--out", str(ddp),
        "--d-sae", str(D_SAE), "--k", str(K), "--batch-size", "128", "--lr", str(cfg.lr),
        "--warmup-steps", "5", "--tokens", str(cfg.tokens), "--dead-tokens", "2000",
        "--init-sample-tokens", "2048", "--shards-in-memory", "2", "--checkpoint-every", "10", "--quiet",
        "--architecture", architecture,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ws, wd = weights(single), weights(ddp)
    for name in ws:
        torch.testing.assert_close(wd[name], ws[name], rtol=1e-4, atol=1e-5)
    training = json.loads((ddp / "training.json").read_text())
    assert training["train_config"]["streams"] == 2


# --- BatchTopK ---------------------------------------------------------------------------------

BATCHTOPK = replace(CFG, architecture="batchtopk")


def test_batchtopk_learns_and_is_saved_as_jumprelu(store: ActivationStore, tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    from steerlex.sae import load_sae
    from steerlex.sae.architectures import JumpReLUSAE
    from steerlex.sae.evaluate import activation_metrics

    cfg = replace(BATCHTOPK, lr=1e-2, tokens=128 * 120)
    sae = train_sae(store, cfg, tmp_path / "b", progress=False)
    assert isinstance(sae, JumpReLUSAE) and sae.cfg.extra["training_architecture"] == "batchtopk"
    log = [
        json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    ]
    assert log[-1]["nmse"] < 0.25 and log[-1]["l0"] == pytest.approx(K)  # k per token on average
    assert log[-1]["threshold"] > 0
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), log[-1]["threshold"]))
    m = activation_metrics(sae, store, progress=False)
    assert m["fve"] > 0.75, m["fve"]
    assert K / 2 < m["l0"] < 2 * K, m["l0"]  # the learned threshold keeps about k latents
    saved = json.loads((tmp_path / "b" / "cfg.json").read_text())
    assert saved["architecture"] == "jumprelu"
    assert (
        json.loads((tmp_path / "b" / "training.json").read_text())["train_config"]["architecture"]
        == "batchtopk"
    )
    loaded = load_sae(tmp_path / "b")
    assert isinstance(loaded, JumpReLUSAE)
    x = store.activations(max_tokens=256)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-4, atol=1e-4)
        sl = sae_lens.SAE.load_from_disk(str(tmp_path / "b"), device="cpu")
        assert sl.cfg.architecture() == "jumprelu"
        torch.testing.assert_close(sl.encode(x), loaded.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sl.decode(sl.encode(x)), loaded(x), rtol=1e-4, atol=1e-4)


def test_batchtopk_resumes_exactly(store: ActivationStore, tmp_path: Path) -> None:
    cfg = replace(BATCHTOPK, k_start=12, k_anneal_steps=20)
    train_sae(store, cfg, tmp_path / "a", progress=False)

    def kill(step: int) -> None:
        if step == 27:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(store, cfg, tmp_path / "c", progress=False, on_step=kill)
    ckpt = torch.load(tmp_path / "c" / "checkpoints" / "step_0000020.pt", weights_only=True)
    assert int(ckpt["sae"]["threshold_updates"]) == 20
    train_sae(store, cfg, tmp_path / "c", progress=False)
    wa, wc = weights(tmp_path / "a"), weights(tmp_path / "c")
    assert set(wa) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    assert all(torch.equal(wa[k], v) for k, v in wc.items())


def test_checkpoint_from_before_architecture_resumes_as_topk(
    store: ActivationStore, tmp_path: Path
) -> None:
    train_sae(store, CFG, tmp_path / "a", progress=False)

    def kill(step: int) -> None:
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(store, CFG, tmp_path / "old", progress=False, on_step=kill)
    path = tmp_path / "old" / "checkpoints" / "step_0000010.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["train_config"]["architecture"]  # as written before the option existed
    torch.save(ckpt, path)
    train_sae(store, CFG, tmp_path / "old", progress=False)
    assert all(
        torch.equal(weights(tmp_path / "a")[k], v) for k, v in weights(tmp_path / "old").items()
    )
    with pytest.raises(SAEError, match=r"architecture: checkpoint 'topk', now 'batchtopk'"):
        train_sae(store, replace(BATCHTOPK, tokens=128 * 90), tmp_path / "old", progress=False)


def test_architecture_option_is_checked(store: ActivationStore, tmp_path: Path) -> None:
    for bad in ("relu", "gated"):
        with pytest.raises(SAEError, match=rf"trains topk, batchtopk SAEs, not '{bad}'"):
            train_sae(store, replace(CFG, architecture=bad), tmp_path / bad, progress=False)


def test_cli_trains_batchtopk(store: ActivationStore, tmp_path: Path) -> None:
    from steerlex.cli import main
    from steerlex.sae import load_sae
    from steerlex.sae.architectures import JumpReLUSAE

    out = tmp_path / "cli"
    rc = main([
        "train-sae", "--activations", str(store.directory), "--out", str(out),
        "--architecture", "batchtopk", "--d-sae", str(D_SAE), "--k", str(K),
        "--batch-size", "128", "--tokens", str(128 * 10), "--warmup-steps", "2",
        "--init-sample-tokens", "1024", "--quiet",
    ])  # fmt: skip
    assert rc == 0
    assert isinstance(load_sae(out), JumpReLUSAE)
    assert json.loads((out / "training.json").read_text())["train_config"]["architecture"] == (
        "batchtopk"
    )
