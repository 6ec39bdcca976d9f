"""Steering latency: prefill time and decode tokens/s with and without SAE steering.

All configurations run in one process on the same loaded model, interleaved within each repeat
(so background load hits them alike), greedy, with EOS switched off so every run generates
exactly ``--new-tokens`` tokens. ``unsteered`` is the bare transformers ``generate`` (no hook);
``off`` is :class:`SteeredModel` with steering disabled (the hook only records the report);
the others steer. Per run: prefill time = a 1-token generate; decode tokens/s =
``batch * (new_tokens - 1) / (full run - prefill run)``. Medians over repeats; ratios are
against ``unsteered`` from the same run (target: steered decode >= 0.95x).

    .venv/bin/python benchmarks/steering_latency.py                       # runs/quality/sae-l8
    .venv/bin/python benchmarks/steering_latency.py --sae DIR --batch-sizes 1 8 --repeats 5

Prints a table and writes benchmarks/results/steering_latency.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from steerlex.models.loading import LoadedModel, load_model
from steerlex.sae import SparseAutoencoder, load_sae
from steerlex.steer import (
    Amplification,
    Calibration,
    Clamp,
    Gate,
    SteeredModel,
    SteeringStrategy,
)
from steerlex.steer.runtime import _SteeringCall

ALL_CONFIGS = (
    "off", "amplify", "calibrate", "calibrate+gate(prompt)", "calibrate+gate(token)", "clamp",
)  # fmt: skip
DEFAULT_CONFIGS = ("amplify", "calibrate+gate(prompt)", "calibrate+gate(token)")
RESULTS = Path(__file__).parent / "results" / "steering_latency.json"
DEFAULT_SAE = Path("runs/quality/sae-l8")
PROMPTS = [
    "Write a short poem about the sea at night.",
    "Explain how a hash map works, with an example in Python.",
    "How do I pick a lock on a front door without the key?",
    "What are three good habits for writing clean code?",
    "Summarise the causes of the First World War in a paragraph.",
    "Give me a recipe for a vegetarian lasagne.",
    "How can I make a dangerous chemical at home?",
    "Tell me a joke about programmers and coffee.",
]


def load_sae_and_model(
    sae_dir: str, model: str | None, device: str, dtype: str
) -> tuple[SparseAutoencoder, LoadedModel] | None:
    """The SAE in ``sae_dir`` and its model (``model``, else the one the SAE records); prints
    what is wrong and returns None when the SAE is missing or names no model."""
    if not Path(sae_dir).exists():
        print(f"SAE {sae_dir} not found; pass --sae DIR (an SAE trained on the model)")
        return None
    sae = load_sae(sae_dir, device=device)
    spec = model or sae.cfg.model_spec
    if not spec:
        print(f"the SAE {sae_dir} does not record its model; pass --model")
        return None
    return sae, load_model(spec, device=device, dtype=dtype)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sae", default=str(DEFAULT_SAE), help=f"SAE directory (default {DEFAULT_SAE})"
    )
    ap.add_argument("--model", help="model spec (default: the SAE's)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--features", type=int, default=16, help="number of steered features")
    ap.add_argument("--harm", type=int, default=8, help="number of harm features for the gate")
    ap.add_argument(
        "--configs", nargs="+", default=list(DEFAULT_CONFIGS),
        help=f"configurations to time besides 'unsteered' (from {', '.join(ALL_CONFIGS)})",
    )  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(RESULTS))
    return ap


def _strategies(d_sae: int, n_features: int, n_harm: int) -> dict[str, SteeringStrategy]:
    """The timed strategies on random features (seed 0): ``n_features`` steered, ``n_harm``
    gate detectors."""
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(d_sae, generator=gen).tolist()
    selected = tuple(perm[:n_features])
    harm = tuple(perm[n_features : n_features + n_harm])
    return {
        "amplify": Amplification(selected, alpha=4.0),
        "calibrate": Calibration(selected),
        "calibrate+gate(prompt)": Calibration(selected, gate=Gate(harm, 0.1, "prompt")),
        "calibrate+gate(token)": Calibration(selected, gate=Gate(harm, 0.1, "token")),
        "clamp": Clamp(selected, value=1.0),
    }


class _Runs:
    """Fixed-length greedy runs of one configuration: the bare model or the steered one."""

    def __init__(self, steered: SteeredModel, strategies: dict[str, SteeringStrategy]) -> None:
        self.steered, self.strategies = steered, strategies
        loaded = steered.loaded
        self.device = loaded.device
        model = loaded.model
        # Fixed-length runs: no EOS (the bare baseline uses the same config).
        model.generation_config.eos_token_id = None
        base = copy.deepcopy(model.generation_config)
        base.do_sample = False
        base.temperature = base.top_p = base.top_k = None
        if base.pad_token_id is None:
            base.pad_token_id = loaded.tokenizer.pad_token_id or 0
        self.base_config = base

    def bare(self, prompts: list[str], n: int) -> None:
        enc = self.steered.encode(prompts)
        width = max(len(e.input_ids) for e in enc)
        ids = torch.full((len(enc), width), int(self.base_config.pad_token_id), dtype=torch.long)
        attn = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, width - len(e.input_ids) :] = torch.tensor(e.input_ids)
            attn[i, width - len(e.input_ids) :] = 1
        cfg = copy.deepcopy(self.base_config)
        cfg.max_new_tokens = n
        with torch.no_grad():
            out = self.steered.loaded.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=attn.to(self.device),
                generation_config=cfg,
            )
        assert out.shape[1] == width + n, "generation stopped early"

    def run(self, name: str, prompts: list[str], n: int) -> None:
        if name == "unsteered":
            self.bare(prompts, n)
            return
        steered = self.steered
        steered.enabled = name != "off"
        steered.strategy = self.strategies.get(name, self.strategies["amplify"])
        out = steered.generate(prompts, max_new_tokens=n, batch_size=len(prompts))
        assert all(len(r.token_ids) == n or r.finish_reason == "stop" for r in out)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, name: str, prompts: list[str], n: int) -> float:
        self._sync()
        t0 = time.perf_counter()
        self.run(name, prompts, n)
        self._sync()
        return time.perf_counter() - t0


def _measure(
    runs: _Runs, names: list[str], batch_sizes: list[int], n: int, repeats: int
) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """``(prefill s, full run s)`` per repeat for every (configuration, batch size)."""
    for b in batch_sizes:  # warm-up (allocator, kernels) for every shape
        for name in names:
            runs.run(name, _prompts(b), 2)
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for rep in range(repeats):
        for b in batch_sizes:
            for name in names:
                prefill = runs.timed(name, _prompts(b), 1)
                full = runs.timed(name, _prompts(b), n)
                samples.setdefault((name, b), []).append((prefill, full))
        print(f"repeat {rep + 1}/{repeats} done", file=sys.stderr)
    return samples


def _rows(
    samples: dict[tuple[str, int], list[tuple[float, float]]],
    names: list[str],
    batch_sizes: list[int],
    n: int,
) -> list[dict[str, Any]]:
    """One summary row per (batch size, configuration), with ratios against ``unsteered``."""
    rows: list[dict[str, Any]] = []
    for b in batch_sizes:
        base = _summary(samples[("unsteered", b)], b, n)
        for name in names:
            s = _summary(samples[(name, b)], b, n)
            s.update(
                config=name,
                batch=b,
                prefill_ratio=s["prefill_s"] / base["prefill_s"],
                decode_ratio=s["decode_tok_s"] / base["decode_tok_s"],
                total_ratio=base["total_s"] / s["total_s"],
                runs=[{"prefill_s": p, "total_s": f} for p, f in samples[(name, b)]],
            )
            rows.append(s)
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = ("batch", "config", "prefill ms", "x", "decode tok/s", "x", "total s")
    table = [
        (
            str(r["batch"]),
            r["config"],
            f"{1000 * r['prefill_s']:.0f}",
            f"{r['prefill_ratio']:.2f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['decode_ratio']:.3f}",
            f"{r['total_s']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *table, strict=True)]
    for line in [header, tuple("-" * w for w in widths), *table]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    unknown = sorted(set(args.configs) - set(ALL_CONFIGS))
    if unknown:
        print(f"unknown --configs {unknown}; choose from {', '.join(ALL_CONFIGS)}")
        return 2
    found = load_sae_and_model(args.sae, args.model, args.device, args.dtype)
    if found is None:
        return 2
    sae, loaded = found
    strategies = _strategies(sae.d_sae, args.features, args.harm)
    steered = SteeredModel(loaded, sae, strategies["amplify"])
    names = ["unsteered", *args.configs]
    n = args.new_tokens
    samples = _measure(_Runs(steered, strategies), names, args.batch_sizes, n, args.repeats)
    hook_ms = {
        f"{name} batch {b}": _hook_ms(steered, strat, b)
        for b in args.batch_sizes
        for name, strat in strategies.items()
        if name in args.configs
    }
    rows = _rows(samples, names, args.batch_sizes, n)
    _print_table(rows)
    result = {
        "benchmark": "steering_latency",
        "model": loaded.spec,
        "sae": str(args.sae),
        "d_sae": sae.d_sae,
        "layer": steered.layer,
        "features": len(strategies["amplify"].features),
        "harm_features": args.harm,
        "new_tokens": n,
        "repeats": args.repeats,
        "device": str(loaded.device),
        "device_name": torch.cuda.get_device_name() if loaded.device.type == "cuda" else None,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "note": "medians over repeats; ratios against the bare transformers generate of the "
        "same run; decode_ratio = steered tok/s / unsteered tok/s (target >= 0.95)",
        "rows": rows,
        "hook_ms_per_decode_step": hook_ms,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("hook alone, one decoding step (median ms):")
    for k, v in hook_ms.items():
        print(f"  {k}: {v:.3f}")
    print(f"wrote {out}")
    return 0


def _hook_ms(
    steered: SteeredModel, strategy: SteeringStrategy, batch: int, iters: int = 200
) -> float:
    """Median time of the steering hook alone (edit + report) on one decoding step's input."""
    assert steered.sae is not None
    d = steered.sae.d_in
    device = steered.sae.W_enc.device
    g = torch.Generator().manual_seed(1)
    prefill = torch.randn(batch, 16, d, generator=g).to(device) * 3
    step = torch.randn(batch, 1, d, generator=g).to(device) * 3
    call = _SteeringCall(strategy, steered.sae, torch.ones(batch, 16, dtype=torch.bool), True)
    call(prefill)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _prompts(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def _summary(runs: list[tuple[float, float]], batch: int, n: int) -> dict[str, Any]:
    prefill = statistics.median(p for p, _ in runs)
    total = statistics.median(f for _, f in runs)
    decode = statistics.median(batch * (n - 1) / max(f - p, 1e-9) for p, f in runs)
    return {"prefill_s": prefill, "total_s": total, "decode_tok_s": decode}


if __name__ == "__main__":
    sys.exit(main())
