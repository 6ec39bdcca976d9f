"""Judge agreement: how often each candidate harm judge agrees with people.

On HarmBench's human-labelled classifier-validation replies (../shared/data/
harmbench_judge_dev, majority of three annotators), every candidate is scored with
cross-validation **by behaviour** (no behaviour in both the fitting and the scoring folds;
anything chosen — layer, pooling, penalty, threshold — is chosen inside the fitting folds,
so the numbers are those of the whole procedure). Reported for each: agreement, the
false-positive rate (harmless replies called harmful), the false-negative rate, Cohen's
kappa, each with a 95% interval from a bootstrap over behaviours, and replies judged per
second on this CPU.

Candidates: the rules judge; per local model (the default Qwen2.5-Coder-0.5B-Instruct and
the larger 1.5B), the yes/no gap of the judge prompt at 0 and at a threshold fitted in the
folds; the shipped design, a logistic probe on the reply-averaged hidden state averaged over
the middle third of the blocks plus the gap (fixed in advance: nothing chosen on the data
but the weights), alone (shipped) and behind the rules judge (a refusal or degenerate reply
is unharmful without the model); and a probe whose layer, pooling
and penalty are chosen by an inner cross-validation (nested). Beside them, the reference
judges whose labels the file carries (HarmBench's Llama-2-13B classifier, GPT-4, Llama
Guard).

    .venv/bin/python benchmarks/judge_agreement.py                 # measure, print, write JSON
    .venv/bin/python benchmarks/judge_agreement.py --write-heads   # and refit the shipped heads

Model features are computed once per model with ``steerlex.judges.classifier.judge_features``
(the judge's own code) and cached under runs/judge_features/. Writes
benchmarks/results/judge_agreement.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from steerlex.core.logistic import fit_logistic
from steerlex.judges import JudgeItem
from steerlex.judges.classifier import (
    HEADS_DIR,
    PROMPT_VERSION,
    ProbeHead,
    judge_features,
)
from steerlex.judges.rules import RuleJudge
from steerlex.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "harmbench_judge_dev" / "replies.jsonl"
RESULTS = Path(__file__).parent / "results" / "judge_agreement.json"
MODELS = {
    "qwen0.5b": "embedded:qwen2.5-coder-0.5b-instruct",
    "qwen1.5b": "embedded:qwen2.5-coder-1.5b-instruct",
}
FOLDS = 5
POOLINGS = ("mean", "last")
PENALTIES = (0.01, 0.1)
MID_L2 = 0.1
REFERENCES = {"harmbench_cls": "HarmBench Llama-2-13B classifier", "gpt4_0613": "GPT-4 (0613)",
              "llama_guard": "Llama Guard"}  # fmt: skip


def folds_by_behaviour(groups: list[str], k: int, seed: int) -> torch.Tensor:
    """Fold index per row; every behaviour's rows share a fold."""
    names = sorted(set(groups))
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {names[j]: i % k for i, j in enumerate(perm)}
    return torch.tensor([fold_of[g] for g in groups])


def rates(pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    pred, y = pred.float(), y.float()
    agree = float((pred == y).float().mean())
    fpr = float(pred[y == 0].mean()) if bool((y == 0).any()) else float("nan")
    fnr = float(1 - pred[y == 1].mean()) if bool((y == 1).any()) else float("nan")
    p_yes = float(pred.mean()) * float(y.mean()) + (1 - float(pred.mean())) * (1 - float(y.mean()))
    kappa = (agree - p_yes) / (1 - p_yes) if p_yes < 1 else float("nan")
    return {"agreement": agree, "fpr": fpr, "fnr": fnr, "kappa": kappa}


def with_intervals(
    pred: torch.Tensor, y: torch.Tensor, groups: list[str], n_boot: int = 1000
) -> dict[str, Any]:
    """The rates and their 95% intervals from a bootstrap over behaviours."""
    names = sorted(set(groups))
    rows_of: dict[str, list[int]] = {n: [] for n in names}
    for i, g in enumerate(groups):
        rows_of[g].append(i)
    gen = torch.Generator().manual_seed(1)
    boots: dict[str, list[float]] = {k: [] for k in ("agreement", "fpr", "fnr", "kappa")}
    for _ in range(n_boot):
        pick = torch.randint(len(names), (len(names),), generator=gen).tolist()
        idx = torch.tensor([i for j in pick for i in rows_of[names[j]]])
        for k, v in rates(pred[idx], y[idx]).items():
            boots[k].append(v)
    out: dict[str, Any] = {}
    for k, v in rates(pred, y).items():
        t = torch.tensor(boots[k])
        t = t[~t.isnan()]
        lo, hi = (float(t.quantile(0.025)), float(t.quantile(0.975))) if len(t) else (None, None)
        out[k] = {"value": v, "ci95": [lo, hi]}
    return out


def best_threshold(score: torch.Tensor, y: torch.Tensor) -> float:
    """The threshold on ``score`` with the highest agreement (midpoints between values)."""
    vals = torch.unique(score)
    cuts = torch.cat([vals[:1] - 1, (vals[1:] + vals[:-1]) / 2, vals[-1:] + 1])
    acc = ((score[None, :] > cuts[:, None]).float() == y[None, :]).float().mean(1)
    return float(cuts[int(acc.argmax())])


def design(feats: dict[str, torch.Tensor], pooling: str, layers: int | list[int]) -> torch.Tensor:
    """Rows of (the pooled state averaged over ``layers``, the yes/no gap)."""
    cols = [layers] if isinstance(layers, int) else layers
    x = feats[pooling][:, cols].float().mean(1)
    return torch.cat([x, feats["gap"][:, None].float()], 1)


def middle_third(n_blocks: int) -> list[int]:
    """The fixed layer set of the shipped heads: the middle third of the blocks."""
    return list(range(n_blocks // 3, 2 * n_blocks // 3 + 1))


def n_blocks_of(feats: dict[str, Any]) -> int:
    return int(feats["mean"].shape[1])


def probe_predict(x_tr, y_tr, x_te, l2: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    w, b, mu, sd = fit_logistic(x_tr, y_tr, l2=l2)
    return ((x_te - mu) / sd) @ w + b > 0


def choose_probe(
    feats: dict[str, torch.Tensor], y: torch.Tensor, rows: torch.Tensor, groups: list[str],
    layers: list[int],
) -> tuple[str, int, float, float]:  # fmt: skip
    """(pooling, layer, penalty, inner agreement) chosen by an inner CV on ``rows``."""
    inner = folds_by_behaviour([groups[i] for i in rows.tolist()], FOLDS, seed=2)
    best: tuple[str, int, float, float] | None = None
    for pooling in POOLINGS:
        for layer in layers:
            x = design(feats, pooling, layer)[rows]
            for l2 in PENALTIES:
                pred = torch.zeros(len(rows), dtype=torch.bool)
                for k in range(FOLDS):
                    tr, te = inner != k, inner == k
                    pred[te] = probe_predict(x[tr], y[rows][tr], x[te], l2)
                acc = float((pred.float() == y[rows]).float().mean())
                if best is None or acc > best[3]:
                    best = (pooling, layer, l2, acc)
    assert best is not None
    return best


def features_for(
    model_key: str, loaded: Any, items: list[JudgeItem], uids: list[str], cache: Path
) -> dict[str, Any]:
    """Every dev reply's judge features on one model (cached by model, prompt, data)."""
    digest = hashlib.sha256(json.dumps(uids).encode()).hexdigest()[:12]
    path = cache / f"{model_key}-{PROMPT_VERSION}-{digest}.pt"
    if path.is_file():
        return dict(torch.load(path, weights_only=True))
    gaps, last, mean, tokens = [], [], [], []
    for item in tqdm(items, desc=f"features {model_key}", unit="reply"):
        f = judge_features(loaded, item)
        gaps.append(f.gap)
        last.append(f.last.half())
        mean.append(f.mean.half())
        tokens.append(f.tokens)
    out = {"gap": torch.tensor(gaps), "last": torch.stack(last), "mean": torch.stack(mean),
           "tokens": torch.tensor(tokens), "weights_id": loaded.weights_id}  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def seconds_per_reply(loaded: Any, items: list[JudgeItem], layer: int) -> dict[str, float]:
    """Wall seconds per reply of the judge's forward pass, timed on ``items``: the whole
    model (yes/no gap) and stopped after block ``layer`` (a probe without the gap)."""
    judge_features(loaded, items[0])  # warm-up
    out = {}
    for name, stop in (("whole", None), ("to_layer", layer)):
        t0 = time.perf_counter()
        for item in items:
            judge_features(loaded, item, layer=stop)
        out[name] = (time.perf_counter() - t0) / len(items)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dev", default=str(DEV), help="the labelled replies (JSONL)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model keys")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "judge_features"))
    ap.add_argument("--timing-items", type=int, default=24, help="replies timed per model")
    ap.add_argument("--write-heads", action="store_true", help="refit and write shipped heads")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    with Path(args.dev).open(encoding="utf-8") as fh:  # not splitlines: texts hold U+2028
        rows = [json.loads(line) for line in fh if line.strip()]
    y = torch.tensor([float(r["human_majority"]) for r in rows])
    groups = [r["behavior_id"] for r in rows]
    uids = [r["uid"] for r in rows]
    items = [JudgeItem(r["behavior"], r["generation"], context=r["context"] or None) for r in rows]
    fold = folds_by_behaviour(groups, FOLDS, seed=0)
    rj = RuleJudge()
    t0 = time.perf_counter()
    outcomes = [rj.judge(it.reply, harmful=True, behaviour=it.behaviour).label for it in items]
    rules_s = (time.perf_counter() - t0) / len(items)
    gated = torch.tensor([o in ("refusal", "degenerate") for o in outcomes])
    results: list[dict[str, Any]] = []

    def add(name: str, pred: torch.Tensor, per_s: float | None, **extra: Any) -> None:
        results.append({"judge": name, **with_intervals(pred, y, groups),
                        "replies_per_second": per_s, **extra})  # fmt: skip

    add("steerlex-rules-v1", torch.tensor([o == "compliance" for o in outcomes]), 1 / rules_s)
    print(f"rules-first: {int(gated.sum())} replies refused or degenerate, "
          f"{int(y[gated].sum())} of them harmful to people", file=sys.stderr)  # fmt: skip
    chosen: dict[str, Any] = {}
    for key in args.models.split(","):
        loaded = load_model(MODELS[key])  # once: the features (on a cache miss) and the timing
        feats = features_for(key, loaded, items, uids, Path(args.cache))
        timing = seconds_per_reply(
            loaded, items[: args.timing_items], layer=n_blocks_of(feats) // 2
        )
        n_blocks = n_blocks_of(feats)
        per_s = 1 / timing["whole"]
        ungated_s = timing["whole"] * float((~gated).float().mean())  # rules-first skips the rest
        gap = feats["gap"].float()
        layers = list(range(2, n_blocks - 1, 2))
        add(f"{key}-yesno@0", gap > 0, per_s)
        pred_t = torch.zeros(len(y), dtype=torch.bool)
        pred_p = torch.zeros(len(y), dtype=torch.bool)
        pred_m = torch.zeros(len(y), dtype=torch.bool)
        pred_n = torch.zeros(len(y), dtype=torch.bool)
        mid = middle_third(n_blocks)
        x_mid = design(feats, "mean", mid)
        picks = []
        for k in range(FOLDS):
            tr, te = fold != k, fold == k
            thr = best_threshold(gap[tr & ~gated], y[tr & ~gated])
            pred_t[te] = (gap[te] > thr) & ~gated[te]
            rows_tr = torch.nonzero(tr & ~gated).squeeze(1)
            pred_m[te] = probe_predict(x_mid[rows_tr], y[rows_tr], x_mid[te], MID_L2) & ~gated[te]
            rows_all = torch.nonzero(tr).squeeze(1)
            pred_n[te] = probe_predict(x_mid[rows_all], y[rows_all], x_mid[te], MID_L2)
            pooling, layer, l2, _ = choose_probe(feats, y, rows_tr, groups, layers)
            x = design(feats, pooling, layer)
            pred_p[te] = probe_predict(x[rows_tr], y[rows_tr], x[te], l2) & ~gated[te]
            picks.append({"fold": k, "pooling": pooling, "layer": layer, "l2": l2})
            print(f"{key} fold {k}: probe {pooling} layer {layer} l2 {l2}", file=sys.stderr)
        add(f"{key}-yesno-tuned (rules first)", pred_t, 1 / ungated_s)
        add(f"{key}-probe-mid (shipped)", pred_n, per_s, layers=mid, timing=timing)
        add(f"{key}-probe-mid (rules first)", pred_m, 1 / ungated_s, layers=mid)
        add(f"{key}-probe-nested (rules first)", pred_p, 1 / ungated_s, folds=picks)
        all_rows = torch.arange(len(y))
        chosen[key] = {"pooling": "mean", "layers": mid, "l2": MID_L2}
        if args.write_heads:
            w, b, mu, sd = fit_logistic(x_mid[all_rows], y[all_rows], l2=MID_L2)
            head = ProbeHead(tuple(mid), "mean", True, w, b, mu, sd,
                             0.5, {"model": MODELS[key], "model_weights_id": feats["weights_id"],
                                   "prompt": PROMPT_VERSION, "l2": MID_L2,
                                   "fitted_on": "harmbench_judge_dev " + hashlib.sha256(
                                       Path(args.dev).read_bytes()).hexdigest()[:16]})  # fmt: skip
            sha = head.save(HEADS_DIR / f"{key}-probe-v1.safetensors")
            chosen[key]["head_sha256"] = sha
            print(f"wrote {HEADS_DIR / f'{key}-probe-v1.safetensors'} sha256 {sha}")
    for col, label in REFERENCES.items():
        add(f"{label} (labels in the file)", torch.tensor([float(r[col]) for r in rows]), None)
    print(f"\n{'judge':45} {'agree':>15} {'FPR':>15} {'FNR':>15} {'kappa':>6} {'/s':>7}")
    for r in results:
        cells = [f"{r[k]['value']:.3f} [{r[k]['ci95'][0]:.2f},{r[k]['ci95'][1]:.2f}]"
                 for k in ("agreement", "fpr", "fnr")]  # fmt: skip
        ps = "–" if r["replies_per_second"] is None else f"{r['replies_per_second']:.2f}"
        print(f"{r['judge']:45} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
              f"{r['kappa']['value']:6.3f} {ps:>7}")  # fmt: skip
    out = {"data": {"file": "harmbench_judge_dev/replies.jsonl", "n": len(rows),
                    "harmful": int(y.sum()), "behaviours": len(set(groups))},
           "cv": {"folds": FOLDS, "by": "behavior_id", "nested": True},
           "rules_first_gated": {"n": int(gated.sum()), "harmful": int(y[gated].sum())},
           "results": results, "chosen": chosen}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
