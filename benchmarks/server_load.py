"""Server load: ``steerlex serve`` under concurrent chat requests, steered vs unsteered.

Starts the server in-process (port 0, localhost) on the SAE's model, fires ``--requests``
concurrent chat requests of ``--new-tokens`` tokens each from threads (plain urllib, no openai
package needed), once with steering off (``"steerlex": {"steer": false}``) and once on, in the
same run on the same loaded model. EOS is switched off in the generation config, so every
request decodes exactly ``--new-tokens`` tokens (the reply is still cut at the first EOS token,
so ``completion_tokens`` can be fewer). Per phase: requests/s, decoded tokens/s (``ok *
new_tokens / wall``) and reply tokens/s (``completion_tokens / wall``) over the wall time of the
wave, p50/p95 latency of the successful requests, and how many got 429 (queue full).

The server runs one generation at a time, so a wave of N requests takes about N single-request
times; latency percentiles mostly measure queueing. Keep runs short on shared machines.

    .venv/bin/python benchmarks/server_load.py                       # runs/quality/sae-l8
    .venv/bin/python benchmarks/server_load.py --sae DIR --requests 32 --max-queue 8

Prints a table and writes benchmarks/results/server_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

# the same prompts and SAE default as the steering-latency benchmark beside this script
from steering_latency import DEFAULT_SAE, PROMPTS
from steerlex.models.loading import load_model
from steerlex.sae import load_sae
from steerlex.steer import SteeredModel, make_strategy
from steerlex.steer.features import parse_feature_list
from steerlex.steer.server import ServerLimits, SteeringServer, make_server

RESULTS = Path(__file__).parent / "results" / "server_load.json"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sae", default=str(DEFAULT_SAE), help=f"SAE directory (default {DEFAULT_SAE})"
    )
    ap.add_argument("--model", help="model spec (default: the SAE's)")
    ap.add_argument(
        "--features", default="0,1,2,3,4,5,6,7",
        help="feature ids to steer, or a selected_features.json (default 0-7)",
    )  # fmt: skip
    ap.add_argument("--strategy", default="calibrate", help="amplify|calibrate|clamp|ablate")
    ap.add_argument("--requests", type=int, default=16, help="concurrent requests per phase")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=16, help="server queue bound")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(RESULTS))
    return ap


def _ask(server: SteeringServer, i: int, steer: bool, new_tokens: int) -> tuple[int, float, int]:
    """One chat request: ``(HTTP status, latency s, completion tokens)``."""
    body = {
        "model": server.model_name,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": new_tokens,
        "steerlex": {"steer": steer},
    }
    req = urllib.request.Request(
        f"{server.url}/v1/chat/completions", data=json.dumps(body).encode(), method="POST"
    )
    req.add_header("Content-Type", "application/json")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            data = json.loads(resp.read())
        return 200, time.perf_counter() - start, int(data["usage"]["completion_tokens"])
    except urllib.error.HTTPError as err:
        return err.code, time.perf_counter() - start, 0


def _wave(server: SteeringServer, steer: bool, n: int, new_tokens: int) -> dict[str, Any]:
    """``n`` concurrent requests, and what they measured."""
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: _ask(server, i, steer, new_tokens), range(n)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r[0] == 200]
    lat = sorted(r[1] for r in ok)
    tokens = sum(r[2] for r in ok)
    return {
        "phase": "steered" if steer else "unsteered",
        "requests": n,
        "ok": len(ok),
        "http_429": sum(r[0] == 429 for r in results),
        "other_errors": sum(r[0] not in (200, 429) for r in results),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "decoded_tokens_per_s": len(ok) * new_tokens / wall,
        "reply_tokens_per_s": tokens / wall,
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else None,
        "completion_tokens": tokens,
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = ("phase", "ok", "429", "wall s", "req/s", "decoded tok/s", "p50 s", "p95 s")
    table = [
        (
            r["phase"],
            f"{r['ok']}/{r['requests']}",
            str(r["http_429"]),
            f"{r['wall_s']:.1f}",
            f"{r['requests_per_s']:.2f}",
            f"{r['decoded_tokens_per_s']:.1f}",
            f"{r['latency_p50_s']:.2f}" if r["latency_p50_s"] is not None else "-",
            f"{r['latency_p95_s']:.2f}" if r["latency_p95_s"] is not None else "-",
        )
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *table, strict=True)]
    for line in [header, tuple("-" * w for w in widths), *table]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not Path(args.sae).exists():
        print(f"SAE {args.sae} not found; pass --sae DIR (an SAE trained on the model)")
        return 2
    sae = load_sae(args.sae, device=args.device)
    features = parse_feature_list(args.features, sae=sae)
    spec = args.model or sae.cfg.model_spec
    if not spec:
        print(f"the SAE {args.sae} does not record its model; pass --model")
        return 2
    t0 = time.perf_counter()
    loaded = load_model(spec, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    loaded.model.generation_config.eos_token_id = None  # fixed-length replies
    steered = SteeredModel(loaded, sae, make_strategy(args.strategy, features.ids))
    limits = ServerLimits(max_tokens=max(args.new_tokens, 16), max_queue=args.max_queue)
    server = make_server(steered, host="127.0.0.1", port=0, limits=limits)
    server.start()
    print(f"serving {server.model_name} at {server.url} (model loaded in {load_s:.1f} s)")
    try:
        _ask(server, 0, True, args.new_tokens)  # warm-up
        _ask(server, 0, False, args.new_tokens)
        rows = []
        for steer in (False, True):
            rows.append(_wave(server, steer, args.requests, args.new_tokens))
            print(f"{rows[-1]['phase']} done", file=sys.stderr)
    finally:
        server.shutdown()
    _print_table(rows)
    result = {
        "benchmark": "server_load",
        "model": spec,
        "sae": str(args.sae),
        "layer": steered.layer,
        "strategy": steered.describe(),
        "features": list(features.ids),
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "max_queue": args.max_queue,
        "device": str(loaded.device),
        "device_name": torch.cuda.get_device_name() if loaded.device.type == "cuda" else None,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "note": "one wave of concurrent requests per phase (unsteered first), one generation at "
        "a time on the server; EOS off so every request decodes new_tokens tokens "
        "(completion_tokens counts the reply up to its first EOS); shared machine, single run",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
