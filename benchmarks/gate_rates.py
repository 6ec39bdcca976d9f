"""Gate rates: on which test prompts of a finished evaluation the conditional gate opens.

Reads an eval directory (``scores.json`` for the harm features and the calibrated threshold,
``generations.jsonl`` for the test prompts answered without a defence), recomputes the
prompt-mode harm score of every test prompt with the SAE, and prints the share of jailbreak,
plain harmful and benign prompts whose score reaches the threshold.

    .venv/bin/python benchmarks/gate_rates.py --eval runs/quality/runs/eval-gpu \\
        --sae runs/quality/sae-l8

Prints a table and writes benchmarks/results/gate_rates.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steerlex.evaluate.tuning import gate_scores
from steerlex.models.loading import load_model
from steerlex.sae import load_sae

RESULTS = Path(__file__).parent / "results" / "gate_rates.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", required=True, help="eval output directory (steerlex eval --out)")
    ap.add_argument("--sae", required=True, help="the SAE the evaluation steered with")
    ap.add_argument("--max-length", type=int, default=1024, help="prompt tokens scored")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    eval_dir = Path(args.eval)
    scores = json.loads((eval_dir / "scores.json").read_text())
    calibration = scores["tuning"].get("gate_calibration")
    if not calibration:
        print(f"{eval_dir} has no calibrated gate (no conditional defence without a threshold)")
        return 2
    harm = calibration[0]["harm_features"]
    threshold = float(calibration[0]["threshold"])
    prompts: dict[str, list[str]] = {}
    with (eval_dir / "generations.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["defence"] == "none" and row["part"] == "test":
                prompts.setdefault(row["prompt_kind"], []).append(row["prompt"])
    sae = load_sae(args.sae, device=args.device)
    loaded = load_model(scores["model"]["spec"], device=args.device)
    layer = int(scores["layer"])
    out: dict[str, dict[str, float]] = {}
    for kind, texts in sorted(prompts.items()):
        s = gate_scores(
            loaded, sae, texts, harm, layer=layer, batch_size=args.batch_size,
            max_length=args.max_length,
        )  # fmt: skip
        out[kind] = {
            "n": len(s),
            "open": sum(x >= threshold for x in s) / len(s),
            "mean_score": sum(s) / len(s),
        }
    print(f"harm features {harm}, threshold {threshold:.4f}, layer {layer}")
    print(f"{'prompts':<10} {'n':>4} {'gate open':>10} {'mean score':>11}")
    for kind, r in out.items():
        print(f"{kind:<10} {r['n']:>4} {r['open']:>10.0%} {r['mean_score']:>11.4f}")
    result = {
        "eval": str(eval_dir), "sae": args.sae, "harm_features": harm, "threshold": threshold,
        "max_length": args.max_length, "rates": out,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
