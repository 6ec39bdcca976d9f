"""Server load: ``steerlex serve`` under concurrent chat requests, batched vs one at a time.

Starts the server in-process (port 0, localhost) on the SAE's model and fires waves of
concurrent chat requests (``--clients``, default 1, 4, 16 and 64) of ``--new-tokens`` tokens each
from threads (plain urllib), in three modes on the same loaded model:

- ``unsteered``: ``"steerlex": {"steer": false}``;
- ``steered``: the strategy (``--strategy`` on ``--features``) on every request;
- ``guarded``: the same strategy behind a harm gate on ``--harm`` features (conditional
  steering, ``guard="steer"``): the detector runs on every prompt and the reply is steered
  only where the gate opens. The gate's threshold (``--harm-threshold``) defaults to the
  median harm score of the prompts, so it opens on about half of them. (``guard="abort"``
  is not timed here: its throughput is set by how often it cuts replies short, which on a
  random SAE means nothing.)

Each mode runs against two servers in the same run: the batched one (``--max-batch`` rows
decoded together, continuous batching) and the one-at-a-time one (``max_batch=1``: one
generation at a time, as the server decoded before batching). ``speedup_vs_sequential`` is a
row's requests/s over the one-at-a-time server's at the same mode and concurrency.

EOS is switched off in the generation config, so every request decodes ``--new-tokens``
tokens; ``decoded_tokens_per_s`` counts the tokens the replies really
have (``completion_tokens``) over the wave's wall time. A wave larger than the server takes
(``max_queue`` waiting + ``max_batch`` running) gets 429s for the rest: ``lost`` counts requests
that got neither a reply nor a 429. After the waves, a second 64-client wave on the batched
server checks that resident memory stays flat, and a 4-client wave runs beside a client that
sends its request headers one byte a second for ``--slow-s`` seconds.

    .venv/bin/python benchmarks/server_load.py --sae DIR
    .venv/bin/python benchmarks/server_load.py --random-sae 4096 --layer 8   # no SAE at hand

Throughput does not depend on what the SAE learned, so ``--random-sae`` (a random TopK SAE on
the model, nothing saved) measures the same thing when no trained SAE is at hand; the gate
then opens on whichever prompts the random harm features happen to fire on most.

Prints a table and writes benchmarks/results/server_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

# the same prompts and SAE default as the steering-latency benchmark beside this script
from steering_latency import DEFAULT_SAE, PROMPTS, load_sae_and_model
from steerlex.models.loading import LoadedModel, load_model
from steerlex.sae import SAEConfig, SparseAutoencoder
from steerlex.steer import SteeredModel, make_strategy
from steerlex.steer.features import parse_feature_list
from steerlex.steer.server import ServerLimits, SteeringServer, make_server
from steerlex.steer.strategies import Gate

RESULTS = Path(__file__).parent / "results" / "server_load.json"
#: the server's earlier one-at-a-time decoder (http.server, before batching), 16 clients,
#: 16 tokens, steered, on this model: benchmarks/results/server_load.json at commit 84f0027
EARLIER_16_CLIENTS_STEERED = {"requests_per_s": 0.221, "latency_p95_s": 68.0}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sae", default=str(DEFAULT_SAE), help=f"SAE directory (default {DEFAULT_SAE})"
    )
    ap.add_argument("--random-sae", type=int, metavar="D_SAE",
                    help="use a random TopK SAE with this many latents instead of --sae")  # fmt: skip
    ap.add_argument("--layer", type=int, default=8, help="the random SAE's layer (default 8)")
    ap.add_argument("--model", help="model spec (default: the SAE's; the default model with "
                    "--random-sae)")  # fmt: skip
    ap.add_argument(
        "--features", default="0,1,2,3,4,5,6,7",
        help="feature ids to steer, or a selected_features.json (default 0-7)",
    )  # fmt: skip
    ap.add_argument("--harm", default="8,9,10,11",
                    help="harm feature ids of the guarded mode's gate (default 8-11)")  # fmt: skip
    ap.add_argument("--harm-threshold", type=float,
                    help="the gate's threshold (default: the median harm score of the prompts)")  # fmt: skip
    ap.add_argument("--strategy", default="calibrate", help="amplify|calibrate (default calibrate)")
    ap.add_argument("--clients", default="1,4,16,64", help="concurrency levels (comma-separated)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=16, help="server queue bound")
    ap.add_argument("--max-batch", type=int, default=8, help="the batched server's rows")
    ap.add_argument("--slow-s", type=float, default=30.0,
                    help="how long the slow client dribbles its headers (0: skip)")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(RESULTS))
    return ap


def _rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _ask(server: SteeringServer, i: int, steer: bool, new_tokens: int) -> dict[str, Any]:
    """One chat request: HTTP status, latency, completion tokens and the reply's action."""
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
        with urllib.request.urlopen(req, timeout=900) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return {"status": err.code, "latency": time.perf_counter() - start}
    except OSError as err:  # reset or refused: a lost request
        return {"status": -1, "latency": time.perf_counter() - start, "error": repr(err)}
    field = data["choices"][0].get("steerlex") or {}
    return {
        "status": 200,
        "latency": time.perf_counter() - start,
        "tokens": int(data["usage"]["completion_tokens"]),
        "action": field.get("action"),
        "gate_open": field.get("gate_open"),
    }


def _wave(server: SteeringServer, steer: bool, n: int, new_tokens: int) -> dict[str, Any]:
    """``n`` concurrent requests, and what they measured."""
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: _ask(server, i, steer, new_tokens), range(n)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    lat = sorted(r["latency"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": n,
        "ok": len(ok),
        "http_429": sum(r["status"] == 429 for r in results),
        "lost": sum(r["status"] not in (200, 429) for r in results),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "decoded_tokens_per_s": tokens / wall,
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else None,
        "completion_tokens": tokens,
        "actions": dict(Counter(str(r["action"]) for r in ok)),
        "gate_opened": sum(bool(r.get("gate_open")) for r in ok),
        "rss_mb_after": _rss_mb(),
    }


def _slow_client(server: SteeringServer, seconds: float, out: dict[str, Any]) -> None:
    """Send a request line, then one header byte a second for ``seconds``; record what the
    server answered (its read deadline closes the connection)."""
    host, port = server.server_address[:2]
    start = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=seconds + 30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            sent = 0
            while time.perf_counter() - start < seconds:
                sock.sendall(b"X-Slow: y\r\n"[sent % 11 : sent % 11 + 1])
                sent += 1
                time.sleep(1.0)
            out["reply"] = sock.recv(64).decode("latin-1").split("\r\n")[0]
    except OSError as err:
        out["reply"] = f"connection closed by the server ({type(err).__name__})"
    out["held_s"] = time.perf_counter() - start


def _random_sae(loaded: LoadedModel, d_sae: int, layer: int) -> SparseAutoencoder:
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=int(loaded.model.config.hidden_size), d_sae=d_sae, k=32, layer=layer,
                    model_spec=loaded.spec, weights_id=loaded.weights_id)  # fmt: skip
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return sae.to(loaded.device)


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = ("server", "mode", "clients", "ok", "429", "lost", "req/s", "tok/s", "speedup",
              "p50 s", "p95 s", "RSS MB")  # fmt: skip

    def num(v: Any, f: str) -> str:
        return format(v, f) if isinstance(v, (int, float)) else "-"

    table = [
        (
            r["server"],
            r["mode"],
            str(r["clients"]),
            f"{r['ok']}/{r['requests']}",
            str(r["http_429"]),
            str(r["lost"]),
            num(r["requests_per_s"], ".3f"),
            num(r["decoded_tokens_per_s"], ".1f"),
            num(r.get("speedup_vs_sequential"), ".2f"),
            num(r["latency_p50_s"], ".1f"),
            num(r["latency_p95_s"], ".1f"),
            num(r["rss_mb_after"], ".0f"),
        )
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *table, strict=True)]
    for line in [header, tuple("-" * w for w in widths), *table]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    t0 = time.perf_counter()
    if args.random_sae:
        loaded = load_model(args.model or "embedded:qwen2.5-coder-0.5b-instruct",
                            device=args.device, dtype=args.dtype)  # fmt: skip
        sae = _random_sae(loaded, args.random_sae, args.layer)
        sae_name = f"random TopK d_sae={args.random_sae} k=32 at layer {args.layer}"
    else:
        found = load_sae_and_model(args.sae, args.model, args.device, args.dtype)
        if found is None:
            print("(or pass --random-sae D_SAE)")
            return 2
        sae, loaded = found
        sae_name = str(args.sae)
    load_s = time.perf_counter() - t0
    loaded.model.generation_config.eos_token_id = None  # fixed-length replies
    features = parse_feature_list(args.features, sae=sae)
    harm = parse_feature_list(args.harm, what="--harm", sae=sae)
    plain = make_strategy(args.strategy, features.ids)
    threshold = args.harm_threshold
    if threshold is None:  # the median prompt: the gate opens on about half the prompts
        probe = SteeredModel(loaded, sae, make_strategy(args.strategy, features.ids,
                                                        gate=Gate(harm.ids, 0.0)))  # fmt: skip
        scores = [r.report.harm_score for r in probe.generate(PROMPTS, max_new_tokens=1)]
        threshold = float(statistics.median(s for s in scores if s is not None))
    gated = make_strategy(args.strategy, features.ids, gate=Gate(harm.ids, threshold))
    print(f"model {loaded.spec} loaded in {load_s:.1f} s; SAE {sae_name}", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    for batch in (args.max_batch, 1):
        server_name = "batched" if batch > 1 else "one-at-a-time"
        for strategy, modes in ((plain, ("unsteered", "steered")), (gated, ("guarded",))):
            limits = ServerLimits(max_tokens=max(args.new_tokens, 16), max_queue=args.max_queue,
                                  max_batch=batch)  # fmt: skip
            server = make_server(SteeredModel(loaded, sae, strategy), host="127.0.0.1", port=0,
                                 limits=limits)  # fmt: skip
            server.start()
            try:
                _ask(server, 0, True, args.new_tokens)  # warm-up
                for mode in modes:
                    for n in clients:
                        row = _wave(server, mode != "unsteered", n, args.new_tokens)
                        rows.append({"server": server_name, "max_batch": batch, "mode": mode,
                                     "steered": mode != "unsteered", "clients": n, **row})  # fmt: skip
                        print(f"{server_name} {mode} x{n}: {row['requests_per_s']:.3f} req/s",
                              file=sys.stderr)  # fmt: skip
                if batch > 1 and strategy is plain:
                    extra["second_wave_64"] = _wave(server, True, 64, args.new_tokens)
                    if args.slow_s > 0:
                        slow: dict[str, Any] = {}
                        thread = threading.Thread(target=_slow_client,
                                                  args=(server, args.slow_s, slow))  # fmt: skip
                        thread.start()
                        time.sleep(1.0)
                        extra["beside_slow_client"] = _wave(server, True, 4, args.new_tokens)
                        thread.join()
                        extra["slow_client"] = slow
                with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as resp:
                    metrics = resp.read().decode()
                extra.setdefault("metrics", {})[f"{server_name}/{strategy.describe()}"] = [
                    line for line in metrics.splitlines() if line and not line.startswith("#")
                ]
            finally:
                server.shutdown()

    sequential = {(r["mode"], r["clients"]): r["requests_per_s"] for r in rows
                  if r["max_batch"] == 1}  # fmt: skip
    for r in rows:
        base = sequential.get((r["mode"], r["clients"]))
        r["speedup_vs_sequential"] = r["requests_per_s"] / base if base else None
    batched = {(r["mode"], r["clients"]): r for r in rows if r["max_batch"] > 1}
    steered_vs_unsteered = {
        str(n): batched[("steered", n)]["requests_per_s"] / batched[("unsteered", n)]["requests_per_s"]
        for n in clients
        if batched[("unsteered", n)]["requests_per_s"] > 0
    }  # fmt: skip
    _print_table(rows)
    print(f"steered / unsteered requests/s on the batched server: {steered_vs_unsteered}")
    for key in ("second_wave_64", "beside_slow_client"):
        if key in extra:
            w = extra[key]
            print(f"{key}: {w['ok']}/{w['requests']} ok, {w['http_429']} 429, {w['lost']} lost, "
                  f"p95 {w['latency_p95_s']:.1f} s, RSS {w['rss_mb_after']:.0f} MB")  # fmt: skip
    if "slow_client" in extra:
        print(f"slow client: {extra['slow_client']}")
    result = {
        "benchmark": "server_load",
        "model": loaded.spec,
        "sae": sae_name,
        "layer": sae.cfg.layer,
        "strategy": plain.describe(),
        "guarded_strategy": gated.describe() + ", guard=steer",
        "harm_threshold": threshold,
        "features": list(features.ids),
        "harm_features": list(harm.ids),
        "clients": clients,
        "new_tokens": args.new_tokens,
        "max_queue": args.max_queue,
        "max_batch": args.max_batch,
        "device": str(loaded.device),
        "device_name": torch.cuda.get_device_name() if loaded.device.type == "cuda" else None,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "note": "one wave per (server, mode, clients), batched server first; EOS off so every "
        "reply decodes new_tokens tokens; the one-at-a-time server is "
        "the same server with max_batch=1; shared machine, single run",
        "earlier_server_16_clients_steered": EARLIER_16_CLIENTS_STEERED,
        "steered_over_unsteered_batched": steered_vs_unsteered,
        "rows": rows,
        **extra,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
