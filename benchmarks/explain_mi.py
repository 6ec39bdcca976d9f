"""Explaining features: ``mi_scores`` vs the bare matrix product it is built on, on CPU.

``mi_scores`` needs every affinity ``S = features @ words.T`` once; everything else
(softmaxes, column normalisers, scores, top-K) is extra. The baseline is that product
alone, done the same way ``mi_scores`` does it: ``torch.mm`` of the same feature chunks
against the same word slabs into a preallocated buffer, nothing else. Ratios are taken
against the baseline measured in the same process, with the methods interleaved in each
repeat (the development machine has 2 cores and shares them with other jobs, so absolute
times drift; the ratio from the same run is the number to read). Medians of ``--repeats``.

Cases:

- ``default``: C = 4,096 features, M = 5,000 words, d = 896 (Qwen2.5-0.5B's width):
  random Gaussian feature and word vectors (fixed seed), the features scaled so that ``S``
  has std 3, like real final-norm affinities (std 3.6 on Qwen2.5-Coder-0.5B). Timed:
  ``mi_scores(score="mi", top_k=50)``, ``score="paper"`` and the bare product.
  ``--sae DIR`` takes the feature vectors from a real SAE instead (``load_sae`` +
  ``feature_vectors(transform="identity")``, rescaled to the same std of ``S``; the words
  stay random, since loading the language model for its unembedding costs more than the
  benchmark). ``--profile`` prints a ``torch.profiler`` table of one ``mi`` call.
- ``scale`` (``--scale``): C = 65,536 × M = 50,000 × d = 896 (about 2.9 T multiply-adds),
  each side in its own subprocess so that its peak RSS (``VmHWM`` read at the end inside
  the child, and ``ru_maxrss``) is its own. Target: ``mi_scores`` under 4 GB. It takes
  minutes on 2 cores; the parent prints the elapsed time while it waits.

    .venv/bin/python benchmarks/explain_mi.py                      # default case, 7 repeats
    .venv/bin/python benchmarks/explain_mi.py --repeats 11 --profile
    .venv/bin/python benchmarks/explain_mi.py --scale --repeats 5  # adds the 65k x 50k case
    git show HEAD:src/steerlex/explain/mi.py > /tmp/mi_before.py   # before vs after, same run
    .venv/bin/python benchmarks/explain_mi.py --reference-impl /tmp/mi_before.py

Prints a table and writes benchmarks/results/explain_mi.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from steerlex.explain.mi import mi_scores

RESULTS = Path(__file__).parent / "results" / "explain_mi.json"
S_STD = 3.0
TOP_K = 50
FEATURE_CHUNK = 4096  # mi_scores' defaults, used by the bare product too
WORD_CHUNK = 8192
MAX_SLAB = 1 << 25


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def make_inputs(
    n_features: int, n_words: int, d: int, seed: int, sae: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature and word vectors, features scaled so that ``S`` has std :data:`S_STD`."""
    gen = torch.Generator().manual_seed(seed)
    if sae is not None:
        from steerlex.explain.mi import feature_vectors
        from steerlex.sae.formats import load_sae

        feats = feature_vectors(load_sae(sae, dtype=torch.float32), transform="identity")
        d = feats.shape[1]
    else:
        feats = torch.randn(n_features, d, generator=gen)
    words = torch.randn(n_words, d, generator=gen)
    probe = feats[: min(256, feats.shape[0])] @ words.T
    feats = feats * (S_STD / float(probe.std()))
    return feats.contiguous(), words.contiguous()


def bare_product(
    feats: torch.Tensor, words: torch.Tensor, progress: Callable[[int, int], None] | None = None
) -> None:
    """``feats @ words.T`` in ``mi_scores``' feature chunks and word slabs, into one buffer."""
    n_feat, n_words = feats.shape[0], words.shape[0]
    width = max(1, min(WORD_CHUNK, n_words, MAX_SLAB // n_feat))
    buf = torch.empty(n_feat * width, dtype=torch.float32)
    with torch.no_grad():
        for w0 in range(0, n_words, width):
            w1 = min(n_words, w0 + width)
            slab = buf[: n_feat * (w1 - w0)].view(n_feat, w1 - w0)
            vocab_t = words[w0:w1].T
            for f0 in range(0, n_feat, FEATURE_CHUNK):
                torch.mm(feats[f0 : f0 + FEATURE_CHUNK], vocab_t, out=slab[f0 : f0 + FEATURE_CHUNK])
            if progress is not None:
                progress(w1, n_words)


# --- default case ---------------------------------------------------------------------------


def run_default(args: argparse.Namespace) -> dict[str, Any]:
    feats, words = make_inputs(args.features, args.words, args.d, args.seed, args.sae)
    methods: dict[str, Callable[[], object]] = {
        "bare": lambda: bare_product(feats, words),
        "mi": lambda: mi_scores(feats, words, score="mi", top_k=TOP_K),
        "paper": lambda: mi_scores(feats, words, score="paper", top_k=TOP_K),
    }
    if args.reference_impl:
        ref = _load_module(args.reference_impl)
        methods["mi_ref"] = lambda: ref.mi_scores(feats, words, score="mi", top_k=TOP_K)
        methods["paper_ref"] = lambda: ref.mi_scores(feats, words, score="paper", top_k=TOP_K)
        for score in ("mi", "paper"):  # same words chosen by both implementations?
            a = ref.mi_scores(feats, words, score=score, top_k=TOP_K)
            b = mi_scores(feats, words, score=score, top_k=TOP_K)
            rel = ((a[0] - b[0]).abs() / a[0].abs().clamp_min(1e-30)).max()
            print(
                f"{score}: same indices as --reference-impl: {torch.equal(a[1], b[1])}, "
                f"max relative value difference {float(rel):.1e}",
                file=sys.stderr,
            )
    for fn in methods.values():  # warm-up: allocator, MKL, lazy init
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for rep in range(args.repeats):
        for name in order if rep % 2 == 0 else order[::-1]:  # ABC CBA ...
            t0 = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t0)
    per_repeat_ratio = {
        name: [t / b for t, b in zip(times[name], times["bare"], strict=True)]
        for name in methods
        if name != "bare"
    }
    summary = {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "ratio_of_medians": statistics.median(ts) / statistics.median(times["bare"]),
            "median_of_ratios": statistics.median(per_repeat_ratio[name])
            if name != "bare"
            else 1.0,
        }
        for name, ts in times.items()
    }
    out: dict[str, Any] = {
        "case": "default",
        "features": feats.shape[0],
        "words": words.shape[0],
        "d": feats.shape[1],
        "source": f"sae:{args.sae}" if args.sae else "random",
        "s_std": S_STD,
        "top_k": TOP_K,
        "repeats": args.repeats,
        "seconds": times,
        "summary": summary,
    }
    if args.profile:
        out["profile"] = profile_mi(feats, words)
    return out


def profile_mi(feats: torch.Tensor, words: torch.Tensor) -> list[dict[str, Any]]:
    """Self CPU time per aten op over 3 ``mi`` calls (printed, and returned for the JSON)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            mi_scores(feats, words, score="mi", top_k=TOP_K)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    table = [
        {
            "op": e.key,
            "calls": e.count // 3,
            "ms_per_call_of_mi": e.self_cpu_time_total / 3 / 1000,
            "share": e.self_cpu_time_total / total,
        }
        for e in rows[:12]
    ]
    print("\nprofile of one mi_scores call (self CPU time, mean of 3):", file=sys.stderr)
    for row in table:
        print(
            f"  {row['op']:<24} {row['ms_per_call_of_mi']:8.1f} ms  {100 * row['share']:5.1f}%"
            f"  ({row['calls']} calls)",
            file=sys.stderr,
        )
    return table


def _load_module(path: str) -> Any:
    """Import another copy of ``steerlex/explain/mi.py`` (e.g. from ``git show``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("explain_mi_reference", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


# --- scale case (subprocesses) ----------------------------------------------------------------


def scale_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(cfg["threads"])
    t_gen = time.perf_counter()
    feats, words = make_inputs(cfg["features"], cfg["words"], cfg["d"], cfg["seed"])
    t_gen = time.perf_counter() - t_gen
    rss_inputs = _vm_hwm_mib()
    last = [time.perf_counter()]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 30:
            print(f"  bare: {done}/{total} words", file=sys.stderr, flush=True)
            last[0] = now

    t0 = time.perf_counter()
    if cfg["method"] == "bare":
        bare_product(feats, words, progress)
        extra: dict[str, Any] = {}
    else:
        scores, idx = mi_scores(feats, words, score=cfg["method"], top_k=TOP_K)
        extra = {"finite": bool(torch.isfinite(scores).all()), "shape": list(idx.shape)}
    seconds = time.perf_counter() - t0
    return {
        "method": cfg["method"],
        "seconds": seconds,
        "input_seconds": t_gen,
        "vm_hwm_mib": _vm_hwm_mib(),
        "vm_hwm_after_inputs_mib": rss_inputs,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def run_scale_child(cfg: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker-config", json.dumps(cfg)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    while True:
        try:
            stdout, _ = proc.communicate(timeout=60)
            break
        except subprocess.TimeoutExpired:
            print(
                f"  scale {cfg['method']}: {time.perf_counter() - t0:.0f} s elapsed, load {_load()}",
                file=sys.stderr,
                flush=True,
            )
    if proc.returncode != 0:
        raise SystemExit(f"scale worker {cfg['method']} failed (exit {proc.returncode})")
    result = dict(json.loads(stdout.strip().splitlines()[-1]))
    result["children_ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def run_scale(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {
        "features": args.scale_features,
        "words": args.scale_words,
        "d": args.d,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
    }
    runs = []
    for method in args.scale_methods.split(","):
        print(f"scale case: {method} ...", file=sys.stderr, flush=True)
        runs.append(run_scale_child({**cfg, "method": method}))
        print(f"  done in {runs[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    by = {r["method"]: r for r in runs}
    out: dict[str, Any] = {"case": "scale", **cfg, "top_k": TOP_K, "runs": runs}
    if "bare" in by:
        out["ratios"] = {m: by[m]["seconds"] / by["bare"]["seconds"] for m in by if m != "bare"}
    return out


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--words", type=int, default=5000)
    parser.add_argument("--d", type=int, default=896)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sae", help="take the feature vectors from this SAE (load_sae)")
    parser.add_argument("--profile", action="store_true", help="profile one mi call")
    parser.add_argument(
        "--reference-impl",
        help="another mi.py (e.g. `git show HEAD:src/steerlex/explain/mi.py > FILE`) timed "
        "in the same run as mi_ref / paper_ref",
    )
    parser.add_argument("--scale", action="store_true", help="also run the 65k x 50k case")
    parser.add_argument("--scale-features", type=int, default=65_536)
    parser.add_argument("--scale-words", type=int, default=50_000)
    parser.add_argument("--scale-methods", default="mi,bare", help="comma list: mi,paper,bare")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_config:
        print(json.dumps(scale_worker(json.loads(args.worker_config))))
        return

    load_start = _load()
    default = run_default(args)
    s = default["summary"]
    print(
        f"\nC={default['features']:,} M={default['words']:,} d={default['d']} "
        f"({default['source']}), top_k={TOP_K}, {default['repeats']} repeats, "
        f"{torch.get_num_threads()} threads"
    )
    print("| method | median s | min s | x bare (ratio of medians) | x bare (median of ratios) |")
    print("|---|---:|---:|---:|---:|")
    for name in s:
        print(
            f"| {name} | {s[name]['median_s']:.3f} | {s[name]['min_s']:.3f} "
            f"| {s[name]['ratio_of_medians']:.2f}x | {s[name]['median_of_ratios']:.2f}x |"
        )
    result: dict[str, Any] = {
        "default": default,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "load_average_start": load_start,
    }
    if args.scale:
        scale = run_scale(args)
        result["scale"] = scale
        print(
            f"\nscale: C={scale['features']:,} M={scale['words']:,} d={scale['d']}, "
            f"each method in its own process"
        )
        print("| method | seconds | peak RSS (VmHWM) MiB | after inputs MiB | x bare |")
        print("|---|---:|---:|---:|---:|")
        for run in scale["runs"]:
            ratio = scale.get("ratios", {}).get(run["method"])
            print(
                f"| {run['method']} | {run['seconds']:.1f} | {run['vm_hwm_mib']:,.0f} "
                f"| {run['vm_hwm_after_inputs_mib']:,.0f} "
                f"| {'' if ratio is None else f'{ratio:.2f}x'} |"
            )
    result["load_average_end"] = _load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
