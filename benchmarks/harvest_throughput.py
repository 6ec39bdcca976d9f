"""Harvest throughput: steerlex (stops after layer L) vs a full transformers forward.

Both sides see the same texts, the same chat formatting, the same batches of 8
and store the same positions; the baseline runs the whole model with
``output_hidden_states=True`` and picks ``hidden_states[L + 1]`` (and writes
nothing to disk, which favours it). Each measurement runs in its own
subprocess so its peak RSS is its own; the two methods alternate, and the
median of the repeats is reported.

    .venv/bin/python benchmarks/harvest_throughput.py            # default model, layers 6 and 12
    .venv/bin/python benchmarks/harvest_throughput.py --texts 16 --repeats 1 --model embedded:smollm2-135m-instruct

Prints a table and writes benchmarks/results/harvest_throughput.json.
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
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "harvest_throughput.json"


def worker(
    method: str, model_spec: str, layer: int, n_texts: int, batch_size: int
) -> dict[str, Any]:
    import torch

    from steerlex.activations import HarvestOptions, harvest
    from steerlex.data import load_texts
    from steerlex.models.chat import encode_prompt
    from steerlex.models.loading import load_model

    torch.manual_seed(0)
    loaded = load_model(model_spec)
    items = list(load_texts("benign", limit=n_texts).items)
    options = HarvestOptions(layer=layer, batch_size=batch_size, texts_per_shard=10_000)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "steerlex":
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            store = harvest(loaded, items, Path(tmp) / "s", options, progress=False)
            seconds = time.perf_counter() - t0
            tokens = store.n_tokens
    else:
        tok, model = loaded.tokenizer, loaded.model
        enc = [encode_prompt(tok, t.text, chat=True, max_length=options.max_length) for t in items]
        order = sorted(range(len(enc)), key=lambda j: (-len(enc[j].input_ids), j))
        tokens = 0
        kept: list[torch.Tensor] = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                batch = order[b : b + batch_size]
                width = max(len(enc[j].input_ids) for j in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for r, j in enumerate(batch):
                    ids[r, : len(enc[j].input_ids)] = torch.tensor(enc[j].input_ids)
                    mask[r, : len(enc[j].input_ids)] = 1
                out = model(
                    input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
                )
                hidden = out.hidden_states[layer + 1]
                for r, j in enumerate(batch):
                    rows = hidden[r, enc[j].content_start : len(enc[j].input_ids)].clone()
                    kept.append(rows)
                    tokens += rows.shape[0]
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method,
        "layer": layer,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mib": peak / 1024,
        "rss_growth_mib": (peak - rss_before) / 1024,
    }


def run_worker(method: str, args: argparse.Namespace, layer: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--model",
        args.model,
        "--layer-one",
        str(layer),
        "--texts",
        str(args.texts),
        "--batch-size",
        str(args.batch_size),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--layers", default="6,12")
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--layer-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(worker(args.worker, args.model, args.layer_one, args.texts, args.batch_size))
        )
        return

    import torch

    rows = []
    for layer in [int(x) for x in args.layers.split(",")]:
        runs: dict[str, list[dict[str, Any]]] = {"steerlex": [], "transformers": []}
        for _ in range(args.repeats):
            for method in ("steerlex", "transformers"):
                runs[method].append(run_worker(method, args, layer))
                r = runs[method][-1]
                print(
                    f"  layer {layer} {method}: {r['tokens_per_s']:.0f} tok/s, peak {r['peak_rss_mib']:.0f} MiB",
                    file=sys.stderr,
                )
        med = {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in runs.items()}
        peak = {m: max(r["peak_rss_mib"] for r in rs) for m, rs in runs.items()}
        assert runs["steerlex"][0]["tokens"] == runs["transformers"][0]["tokens"]
        rows.append(
            {
                "layer": layer,
                "tokens": runs["steerlex"][0]["tokens"],
                "steerlex_tok_s": med["steerlex"],
                "transformers_tok_s": med["transformers"],
                "speedup": med["steerlex"] / med["transformers"],
                "steerlex_peak_rss_mib": peak["steerlex"],
                "transformers_peak_rss_mib": peak["transformers"],
                "runs": runs,
            }
        )

    header = f"{'layer':>5} {'tokens':>7} {'steerlex tok/s':>15} {'HF full tok/s':>14} {'speedup':>8} {'steerlex MiB':>13} {'HF full MiB':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['layer']:>5} {r['tokens']:>7} {r['steerlex_tok_s']:>15.0f} {r['transformers_tok_s']:>14.0f} "
            f"{r['speedup']:>7.2f}x {r['steerlex_peak_rss_mib']:>13.0f} {r['transformers_peak_rss_mib']:>12.0f}"
        )
    result = {
        "benchmark": "harvest_throughput",
        "model": args.model,
        "texts": args.texts,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
