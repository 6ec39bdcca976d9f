"""BatchTopK vs TopK on the data of ``steerlex run``'s default profile, at the same k and budget.

Data (what the default run harvests, pipeline/config.py and pipeline/run.py): model
``embedded:qwen2.5-coder-0.5b-instruct``, layer 8, sources benign + harmbench +
jailbreak-wild with 64 texts each, max length 256, held-out fraction 0.1, harvest batch 8;
``steerlex harvest --split train`` and ``--split heldout`` give the two stores. Pass
``--train-store`` / ``--heldout-store`` to reuse stores made that way (their identity is
recorded in the JSON), otherwise they are harvested into ``--work``.

Training (the default run's ``train-sae`` settings, everything else the TrainConfig
defaults): d_sae 2048, k 32, 131,072 tokens, lr 2e-3, 25 warm-up steps, batch 1024, seed
0; once with ``architecture="topk"`` and once with ``"batchtopk"`` (saved as JumpReLU with
the learned threshold). Each SAE is trained from scratch into ``--work/sae-<arch>``.

Evaluation, both SAEs loaded from disk as any later stage would: ``evaluate_sae`` on the
held-out store (FVE, L0, dead latents) and the spliced-in LM loss on 16 held-out texts
(loss recovered vs zero- and mean-ablation), plus the spread of per-token L0 (BatchTopK
lets it vary from token to token) and the training wall time. Because the wall times of
two runs on a shared machine are noisy, the cost of one training step of each
architecture is also timed in alternating rounds on the same batch (median ms).

    .venv/bin/python benchmarks/sae_architectures.py
    .venv/bin/python benchmarks/sae_architectures.py --train-store runs/default/acts-train \\
        --heldout-store runs/default/acts-heldout

Prints a table and writes benchmarks/results/sae_architectures.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "sae_architectures.json"
MODEL = "embedded:qwen2.5-coder-0.5b-instruct"
LAYER = 8
SOURCES = ("benign", "harmbench", "jailbreak-wild")
HARVEST = {"limit": 64, "max_length": 256, "heldout_fraction": 0.1, "batch_size": 8}
TRAIN: dict[str, Any] = {"d_sae": 2048, "k": 32, "tokens": 131072, "lr": 2e-3, "warmup_steps": 25,
         "batch_size": 1024, "seed": 0}  # fmt: skip
LM_TEXTS = 16


def harvest_store(split: str, out: Path, device: str) -> Path:
    """``steerlex harvest`` with the default run's options for ``split`` (skipped if present)."""
    from steerlex.activations.store import ActivationStore
    from steerlex.cli import main

    if (out / "index.json").is_file():
        ActivationStore.open(out)  # a complete store: reuse it
        return out
    argv = ["harvest", "--model", MODEL, "--layer", str(LAYER), "--device", device]
    for source in SOURCES:
        argv += ["--source", source]
    argv += ["--limit", str(HARVEST["limit"]), "--heldout-fraction",
             str(HARVEST["heldout_fraction"]), "--max-length", str(HARVEST["max_length"]),
             "--batch-size", str(HARVEST["batch_size"]), "--split", split, "--out", str(out)]  # fmt: skip
    if main(argv) != 0:
        raise SystemExit(f"steerlex harvest --split {split} failed")
    return out


def l0_spread(sae: Any, store: Any) -> dict[str, float]:
    """Quantiles of the number of active latents per held-out token."""
    import torch

    counts = []
    with torch.no_grad():
        for _, tensors in store.iter_shards(store.n_tokens):
            x = tensors["activations"].to(sae.W_enc.device)
            for lo in range(0, x.shape[0], 4096):
                counts.append((sae.encode(x[lo : lo + 4096]) > 0).sum(-1).float().cpu())
    c = torch.cat(counts)
    q = torch.quantile(c, torch.tensor([0.1, 0.5, 0.9]))
    return {"p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "max": float(c.max())}


def step_times(train: Any, archs: list[str], rounds: int = 6, steps: int = 8) -> dict:
    """Median wall time (ms) of one training step per architecture, rounds alternating."""
    import statistics

    import torch

    from steerlex.sae.base import SAEConfig, SparseAutoencoder

    x = train.activations(max_tokens=TRAIN["batch_size"]).float()
    x = (x - x.mean(0)) * (x.shape[1] / float(x.pow(2).sum(1).mean())) ** 0.5
    runs = {}
    for arch in archs:
        cfg = SAEConfig(d_in=x.shape[1], d_sae=TRAIN["d_sae"], k=TRAIN["k"], architecture=arch)
        sae = SparseAutoencoder(cfg)
        runs[arch] = (sae, torch.optim.Adam(sae.parameters(), lr=1e-3))
    times: dict[str, list[float]] = {arch: [] for arch in archs}
    for _ in range(rounds):
        for arch, (sae, opt) in runs.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                values, indices = sae.training_codes(sae.pre_acts(x), TRAIN["k"])
                loss = (sae.decode_sparse(values, indices) - x).pow(2).sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            times[arch].append(1000 * (time.perf_counter() - t0) / steps)
    return {arch: round(statistics.median(t[1:]), 1) for arch, t in times.items()}


def run_one(arch: str, train: Any, heldout: Any, loaded: Any, work: Path, device: str) -> dict:
    """Train ``arch`` from scratch, then evaluate the saved SAE on the held-out store."""
    from steerlex.sae.evaluate import evaluate_sae
    from steerlex.sae.formats import load_sae
    from steerlex.sae.train import TrainConfig, train_sae

    out = work / f"sae-{arch}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(architecture=arch, device=device, **TRAIN)
    t0 = time.perf_counter()
    train_sae(train, cfg, out, progress=True)
    seconds = time.perf_counter() - t0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    sae = load_sae(out, device=device)
    ev = evaluate_sae(sae, heldout, out / "eval", loaded=loaded, max_lm_texts=LM_TEXTS, plot=False)
    act, spl = ev["activation"], ev["spliced"]
    return {
        "architecture": arch,
        "saved_as": sae.cfg.architecture,
        "threshold": log[-1].get("threshold"),
        "train_seconds": round(seconds, 1),
        "train_last_log": {k: log[-1][k] for k in ("step", "nmse", "l0", "dead_fraction")},
        "heldout_fve": act["fve"],
        "heldout_nmse": act["nmse"],
        "heldout_l0": act["l0"],
        "heldout_l0_per_token": l0_spread(sae, heldout),
        "dead_fraction": act["dead_fraction"],
        "dense_fraction": act["dense_fraction"],
        "ce_clean": spl["ce_clean"],
        "ce_sae": spl["ce_sae"],
        "loss_recovered_zero": spl["loss_recovered_zero"],
        "loss_recovered_mean": spl["loss_recovered_mean"],
        "lm_tokens": spl["n_tokens"],
        "lm_texts": spl["n_texts"],
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'architecture':<12} {'saved as':<9} {'FVE':>7} {'L0':>6} {'L0 p10-p90':>11} "
            f"{'dead':>6} {'rec.zero':>9} {'rec.mean':>9} {'train s':>8}")  # fmt: skip
    print(head)
    for r in rows:
        spread = r["heldout_l0_per_token"]
        print(
            f"{r['architecture']:<12} {r['saved_as']:<9} {r['heldout_fve']:>7.4f} "
            f"{r['heldout_l0']:>6.1f} {spread['p10']:>5.0f}-{spread['p90']:<5.0f} "
            f"{r['dead_fraction']:>6.1%} {r['loss_recovered_zero']:>8.2f}% "
            f"{r['loss_recovered_mean']:>8.2f}% {r['train_seconds']:>8.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-store", help="reuse this train-split store (default: harvest)")
    ap.add_argument("--heldout-store", help="reuse this held-out store (default: harvest)")
    ap.add_argument("--work", default="runs/bench-sae-architectures", help="stores and SAEs")
    ap.add_argument("--architectures", default="topk,batchtopk")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import torch

    import steerlex
    from steerlex.activations.store import ActivationStore
    from steerlex.models.loading import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_dir = Path(args.train_store or harvest_store("train", work / "acts-train", args.device))
    held_dir = Path(
        args.heldout_store or harvest_store("heldout", work / "acts-heldout", args.device)
    )
    train, heldout = ActivationStore.open(train_dir), ActivationStore.open(held_dir)
    loaded = load_model(MODEL, device=args.device)
    archs = args.architectures.split(",")
    rows = [run_one(arch, train, heldout, loaded, work, args.device) for arch in archs]
    step_ms = step_times(train, archs)
    print(f"train store {train_dir}: {train.n_tokens:,} tokens; held-out {held_dir}: "
          f"{heldout.n_tokens:,} tokens; model {MODEL} layer {LAYER}")  # fmt: skip
    print_table(rows)
    print("one training step (median ms, alternating rounds): "
          + ", ".join(f"{a} {ms:.0f}" for a, ms in step_ms.items()))  # fmt: skip
    result = {
        "model": MODEL,
        "layer": LAYER,
        "harvest": {"sources": list(SOURCES), **HARVEST},
        "train": TRAIN,
        "lm_texts": LM_TEXTS,
        "stores": {
            name: {
                "directory": str(s.directory),
                "n_tokens": s.n_tokens,
                "n_texts": s.index.get("n_texts"),
                "identity": s.index.get("identity"),
            }
            for name, s in (("train", train), ("heldout", heldout))
        },
        "results": rows,
        "step_ms": step_ms,
        "environment": {
            "steerlex": steerlex.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
