"""Harm detectors: which score of a prompt tells harmful requests from benign ones, also
inside jailbreak templates?

Every detector reads the residual stream of the chat-formatted prompt at the SAE's layer,
over the positions the gate sees (the user's text to the end of the prompt), and is fitted
on the evaluation's *selection* split only (harmful behaviours and jailbreaks against benign
requests); scores are taken on the *test* split and on XSTest. Detectors:

- ``harm-features mean``: today's gate — the mean over positions of the mean
  relu(pre-activation) of the explanation-selected harm features (``selected_harm.json``);
- the same with ``max`` and ``top-8`` pooling over positions;
- ``diff-of-means``: the direction mean(harmful) − mean(benign) of the position-averaged
  residual, projected (and its max over positions);
- ``probe on SAE latents``: a logistic regression on the position-averaged latents;
- ``explanation-filtered probe``: the same on the latents whose explanations match the harm
  concept (``--candidates``, a ``steerlex select`` file with more features), weighted by data;
- ``probe on the residual``: a logistic regression on the position-averaged residual.

For each contrast (jailbreak vs benign, plain harmful vs benign, XSTest unsafe vs safe):
AUROC with a 95% bootstrap interval, and the true-positive rate at the threshold that flags
5% of the contrast's negatives.

    .venv/bin/python benchmarks/detectors.py --run runs/default \\
        --candidates runs/default/harm_candidates.json

Writes benchmarks/results/detectors.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from steerlex.core.logistic import fit_logistic
from steerlex.evaluate.sets import build_sets
from steerlex.explain.metrics import auroc
from steerlex.models.chat import prompt_residuals
from steerlex.models.loading import load_model
from steerlex.sae import load_sae
from steerlex.steer.select import FeatureSelection
from steerlex.steer.strategies import feature_pre_acts

ROOT = Path(__file__).resolve().parents[1]
XSTEST = ROOT.parent / "shared" / "data" / "xstest" / "xstest_prompts.csv"
RESULTS = Path(__file__).parent / "results" / "detectors.json"
TOP_K = 8


@torch.no_grad()
def prompt_features(
    loaded: Any, sae: Any, texts: list[str], layer: int, harm: list[int], max_length: int
) -> dict[str, Tensor]:
    """Per prompt: harm-feature scores pooled three ways, the mean SAE latents, the mean
    residual and the residual rows' max projection (filled in later) — over the positions
    from the user's text to the end of the prompt."""
    pooled: dict[str, list[Tensor]] = {k: [] for k in ("h_mean", "h_max", "h_top", "lat", "res")}
    rows_all: list[Tensor] = []
    for enc, h in tqdm(
        prompt_residuals(loaded, texts, layer, batch_size=4, max_length=max_length),
        total=(len(texts) + 3) // 4, desc="prompts", unit="batch",
    ):  # fmt: skip
        for i, e in enumerate(enc):
            rows = h[i, e.content_start : len(e.input_ids)].float()
            s = torch.relu(feature_pre_acts(sae, rows, harm)).mean(-1)
            pooled["h_mean"].append(s.mean())
            pooled["h_max"].append(s.max())
            pooled["h_top"].append(s.topk(min(TOP_K, len(s))).values.mean())
            pooled["lat"].append(sae.encode(rows).float().mean(0))
            pooled["res"].append(rows.mean(0))
            rows_all.append(rows)
    out = {k: torch.stack(v) for k, v in pooled.items()}
    out["rows"] = rows_all  # type: ignore[assignment]
    return out


def tpr_at_fpr(pos: Tensor, neg: Tensor, fpr: float = 0.05) -> float:
    """Share of ``pos`` above the score that flags ``fpr`` of ``neg``."""
    thr = torch.quantile(neg.double(), 1 - fpr)
    return float((pos.double() > thr).float().mean())


def contrast(pos: Tensor, neg: Tensor, n_boot: int = 500) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    boots = []
    for _ in range(n_boot):
        p = pos[torch.randint(len(pos), (len(pos),), generator=gen)]
        n = neg[torch.randint(len(neg), (len(neg),), generator=gen)]
        boots.append(auroc(p, n))
    b = torch.tensor(boots)
    return {"auroc": auroc(pos, neg), "auroc_ci95": [float(b.quantile(0.025)),
            float(b.quantile(0.975))], "tpr_at_5pct_fpr": tpr_at_fpr(pos, neg),
            "n_pos": len(pos), "n_neg": len(neg)}  # fmt: skip


def xstest_prompts() -> tuple[list[str], list[str]]:
    with XSTEST.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    safe = [r["prompt"] for r in rows if r["label"] == "safe"]
    unsafe = [r["prompt"] for r in rows if r["label"] == "unsafe"]
    return unsafe, safe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a steerlex run directory (sae/, selected_*)")
    ap.add_argument("--candidates", help="selection file of explanation-matched harm latents")
    ap.add_argument("--n-selection", type=int, default=48)
    ap.add_argument("--n-jailbreak", type=int, default=120)
    ap.add_argument("--n-harmful", type=int, default=60)
    ap.add_argument("--n-benign", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    run = Path(args.run)
    sae = load_sae(run / "sae")
    layer = int(sae.cfg.layer)
    loaded = load_model(sae.cfg.model_spec)
    harm = FeatureSelection.load(run / "selected_harm.json").ids
    cands = FeatureSelection.load(args.candidates).ids if args.candidates else []
    sets = build_sets(
        harmful=["harmbench"], templates=["jailbreak-wild"], benign=["benign"],
        n_jailbreak=args.n_jailbreak, n_harmful=args.n_harmful, n_benign=args.n_benign,
        n_selection=args.n_selection, n_tuning=args.n_selection, tokenizer=loaded.tokenizer,
    )  # fmt: skip
    groups: dict[str, list[str]] = {}
    for p in sets.prompts:
        groups.setdefault(f"{p.part}:{p.kind}", []).append(p.text)
    x_unsafe, x_safe = xstest_prompts()
    groups["xstest:unsafe"], groups["xstest:safe"] = x_unsafe, x_safe
    t0 = time.perf_counter()
    feats = {
        g: prompt_features(loaded, sae, t, layer, harm, args.max_length) for g, t in groups.items()
    }
    seconds = time.perf_counter() - t0
    pos_sel = ["selection:harmful", "selection:jailbreak"]
    neg_sel = ["selection:benign"]

    def cat(keys: list[str], name: str) -> Tensor:
        return torch.cat([feats[k][name] for k in keys])

    res_pos, res_neg = cat(pos_sel, "res"), cat(neg_sel, "res")
    direction = res_pos.mean(0) - res_neg.mean(0)
    y = torch.cat([torch.ones(len(res_pos)), torch.zeros(len(res_neg))])

    def probe(name: str, cols: list[int] | None) -> Any:
        x = torch.cat([cat(pos_sel, name), cat(neg_sel, name)])
        if cols is not None:
            x = x[:, cols]
        w, b, mu, sd = fit_logistic(x, y, l2=0.1)
        return lambda z: ((z if cols is None else z[:, cols]) - mu) / sd @ w + b

    lat_probe, res_probe = probe("lat", None), probe("res", None)
    cand_probe = probe("lat", cands) if cands else None
    detectors: dict[str, Any] = {
        "harm-features mean (today's gate)": lambda f: f["h_mean"],
        "harm-features max": lambda f: f["h_max"],
        f"harm-features top-{TOP_K}": lambda f: f["h_top"],
        "diff-of-means (mean)": lambda f: f["res"] @ direction,
        "diff-of-means (max)": lambda f: torch.stack([(r @ direction).max() for r in f["rows"]]),
        "probe on SAE latents": lambda f: lat_probe(f["lat"]),
        "probe on the residual": lambda f: res_probe(f["res"]),
    }
    if cand_probe is not None:
        detectors[f"explanation-filtered probe ({len(cands)} latents)"] = lambda f: cand_probe(
            f["lat"]
        )
    contrasts = {
        "jailbreak vs benign": ("test:jailbreak", "test:benign"),
        "harmful vs benign": ("test:harmful", "test:benign"),
        "XSTest unsafe vs safe": ("xstest:unsafe", "xstest:safe"),
    }
    results = []
    for name, fn in detectors.items():
        row: dict[str, Any] = {"detector": name}
        for cname, (pos, neg) in contrasts.items():
            row[cname] = contrast(fn(feats[pos]).detach(), fn(feats[neg]).detach())
        results.append(row)
    print(f"\n{'detector':42}" + "".join(f" {c:>26}" for c in contrasts))
    for row in results:
        cells = [f"{row[c]['auroc']:.3f} / {row[c]['tpr_at_5pct_fpr']:.0%}" for c in contrasts]
        print(f"{row['detector']:42}" + "".join(f" {c:>26}" for c in cells))
    print("(AUROC / share caught at 5% of negatives flagged)")
    out = {
        "run": str(run), "layer": layer, "sae_d": int(sae.cfg.d_sae), "harm_features": harm,
        "candidates": cands, "max_length": args.max_length,
        "sizes": {g: len(t) for g, t in groups.items()}, "feature_seconds": seconds,
        "fitted_on": {"positive": pos_sel, "negative": neg_sel}, "results": results,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
