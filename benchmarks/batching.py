"""Batched decoding: N differently-steered requests one by one vs together in one BatchDecoder.

"one by one" is what the server did before batching: each request through
``SteeredModel.generate`` alone. "together" is ``BatchDecoder(max_batch=N).run`` on the same
requests (every other one steered at another strength, every fourth one with steering off),
greedy, so both give the same token ids (checked). Tokens/s = generated tokens / wall time;
medians over repeats, both measured in the same run, interleaved.

    .venv/bin/python benchmarks/batching.py                      # default model if cached, else tiny
    .venv/bin/python benchmarks/batching.py --model tiny --sizes 1 4 8 --new-tokens 32

``--model auto`` uses the packaged default model (embedded:qwen2.5-coder-0.5b-instruct) when it
is already converted in the local cache and a tiny random Llama otherwise; the JSON says which.
Prints a table and writes benchmarks/results/batching.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from steerlex.models.embedded import DEFAULT_MODEL, EMBEDDED, MARKER, converted_dir
from steerlex.models.loading import LoadedModel, load_model
from steerlex.sae.base import SAEConfig, SparseAutoencoder
from steerlex.steer import Amplification, SteeredModel
from steerlex.steer.batching import BatchDecoder, DecodeRequest

RESULTS = Path(__file__).parent / "results" / "batching.json"
TESTS = Path(__file__).resolve().parent.parent / "tests"
PROMPTS = [
    "Write a short poem about the sea at night.",
    "Explain how a hash map works, with an example in Python.",
    "What are three good habits for writing clean code?",
    "Give me a recipe for a vegetarian lasagne.",
    "Tell me a joke about programmers and coffee.",
    "Summarise the causes of the First World War in a paragraph.",
    "How do I reverse a list in Python?",
    "Describe a sunrise in the mountains.",
]
TINY_PROMPTS = [
    "tell me a short story about the cat",
    "write a poem about rain",
    "how can you help me with python code",
    "explain why the sun is hot",
    "what is a tree",
    "make a list of one two three four",
    "who wrote the book about the dog and the car",
    "please explain music",
]


def default_cached() -> bool:
    model = EMBEDDED[DEFAULT_MODEL.removeprefix("embedded:")]
    return (converted_dir(model.gguf_name, model.sha256) / MARKER).is_file()


def tiny_model() -> LoadedModel:
    """A random 4-layer Llama (width 256) with the tests' word-level chat tokenizer."""
    sys.path.insert(0, str(TESTS))
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(
        model=model,
        tokenizer=tok,
        spec="tiny:llama-256",
        kind="local",
        source="random init (benchmark)",
        weights_id="sha256:tiny-llama-256-seed0",
        path=None,
    )


def random_sae(loaded: LoadedModel, layer: int, d_sae: int) -> SparseAutoencoder:
    width = int(loaded.model.config.hidden_size)
    cfg = SAEConfig(
        d_in=width,
        d_sae=d_sae,
        k=32,
        layer=layer,
        model_spec=loaded.spec,
        weights_id=loaded.weights_id,
    )
    sae = SparseAutoencoder(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    return sae


def requests_for(prompts: list[str], n: int, new_tokens: int) -> list[DecodeRequest]:
    features = (1, 5, 9, 13)
    # two strategy objects shared across requests, as a server with a few configured strengths
    strengths = (Amplification(features, alpha=6.0), Amplification(features, alpha=2.0))
    out = []
    for i in range(n):
        strategy = strengths[i % 2]
        out.append(
            DecodeRequest(
                prompts[i % len(prompts)],
                max_new_tokens=new_tokens,
                strategy=strategy,
                enabled=i % 4 != 3,
            )
        )
    return out


def one_by_one(steered: SteeredModel, requests: list[DecodeRequest]) -> list[Any]:
    out = []
    for r in requests:
        steered.strategy = r.strategy  # type: ignore[assignment]
        with steered.steering(bool(r.enabled)):
            out.extend(steered.generate([r.prompt], max_new_tokens=r.max_new_tokens))  # type: ignore[list-item]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["auto", "tiny", "default"], default="auto")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    use_default = args.model == "default" or (args.model == "auto" and default_cached())
    if use_default:
        loaded, prompts, layer, d_sae = load_model(DEFAULT_MODEL), PROMPTS, 8, 4096
    else:
        loaded, prompts, layer, d_sae = tiny_model(), TINY_PROMPTS, 2, 1024
    steered = SteeredModel(loaded, random_sae(loaded, layer, d_sae))
    rows = []
    for n in args.sizes:
        requests = requests_for(prompts, n, args.new_tokens)
        BatchDecoder(steered, max_batch=n).run(requests[:1])  # warm-up
        seq_s, bat_s, tokens, same = [], [], 0, True
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            solo = one_by_one(steered, requests)
            t1 = time.perf_counter()
            together = BatchDecoder(steered, max_batch=n).run(requests)
            t2 = time.perf_counter()
            seq_s.append(t1 - t0)
            bat_s.append(t2 - t1)
            tokens = sum(len(r.token_ids) for r in together)
            same &= [r.token_ids for r in solo] == [r.token_ids for r in together]
        seq, bat = statistics.median(seq_s), statistics.median(bat_s)
        rows.append(
            {
                "requests": n,
                "tokens": tokens,
                "one_by_one_s": seq,
                "together_s": bat,
                "one_by_one_tok_s": tokens / seq,
                "together_tok_s": tokens / bat,
                "ratio": seq / bat,
                "identical_ids": same,
                "runs": {"one_by_one_s": seq_s, "together_s": bat_s},
            }
        )

    model_name = DEFAULT_MODEL if use_default else f"{loaded.spec} (random, tiny stand-in)"
    print(f"model: {model_name}; {args.new_tokens} new tokens per request, greedy")
    print(f"{'N':>3} {'tokens':>7} {'1-by-1 tok/s':>13} {'together tok/s':>15} {'ratio':>6} same")
    for r in rows:
        print(
            f"{r['requests']:>3} {r['tokens']:>7} {r['one_by_one_tok_s']:>13.1f} "
            f"{r['together_tok_s']:>15.1f} {r['ratio']:>5.2f}x {r['identical_ids']}"
        )
    result = {
        "benchmark": "batching",
        "model": model_name,
        "default_model_cached": use_default,
        "layer": layer,
        "d_sae": d_sae,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "device": str(loaded.device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "note": "one_by_one = SteeredModel.generate per request; together = BatchDecoder.run "
        "with max_batch=N; medians over repeats; ratio = together tok/s / one-by-one tok/s",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
