"""``steerlex train-sae``, ``steerlex eval-sae`` and ``steerlex sae convert``."""

from __future__ import annotations

import argparse
from typing import Any

from steerlex.cli.options import add_options, add_quiet, config_from_args, context_from_args
from steerlex.jobs.sae import EvalSAEConfig, TrainSAEConfig, eval_sae_job, train_sae_job
from steerlex.sae.formats import WRITABLE_FORMATS, convert_sae

__all__ = ["register", "register_utilities"]


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def cmd_train_sae(args: argparse.Namespace) -> int:
    r = train_sae_job(config_from_args(TrainSAEConfig, args), context_from_args(args))
    if r.rank == 0:
        c, o = r.sae.cfg, r.options
        saved = "" if c.architecture == o.architecture else f", saved as {c.architecture}"
        print(
            f"Trained a {o.architecture} SAE (d_in {c.d_in}, d_sae {c.d_sae}, k {o.k}{saved}) on "
            f"{r.n_tokens:,} stored tokens of {r.store_model} layer {r.store_layer} in "
            f"{r.seconds:.0f}s; saved to {r.out} (training log: {r.out}/train_log.jsonl)"
        )
    return 0


def cmd_eval_sae(args: argparse.Namespace) -> int:
    r = eval_sae_job(config_from_args(EvalSAEConfig, args), context_from_args(args))
    act, spl = r.result["activation"], r.result["spliced"]
    lines = [
        f"held-out tokens {act['n_tokens']:,}: NMSE {act['nmse']:.4f}, FVE {act['fve']:.4f}, "
        f"L0 {act['l0']:.1f}, dead {act['dead_fraction']:.2%}, dense {act['dense_fraction']:.2%}",
    ]
    if spl:
        lines.append(
            f"next-token CE on {spl['n_tokens']:,} tokens of {spl['n_texts']} texts: clean "
            f"{spl['ce_clean']:.4f}, SAE {spl['ce_sae']:.4f}, zero {spl['ce_zero']:.4f}, mean "
            f"{_num(spl['ce_mean'], '.4f')}; loss recovered "
            f"{_num(spl['loss_recovered_zero'], '.1f')}% (vs zero), "
            f"{_num(spl['loss_recovered_mean'], '.1f')}% (vs mean)"
        )
    lines.append(f"written to {r.out}/eval.json")
    print("\n".join(lines))
    return 0


def cmd_sae_convert(args: argparse.Namespace) -> int:
    path = convert_sae(
        args.src, args.dst, to=args.to, k=args.k, overwrite=args.overwrite, dtype=args.dtype
    )
    print(f"wrote {args.to} SAE to {path}")
    return 0


def register(sub: Any) -> None:
    """Add ``train-sae`` and ``eval-sae``."""
    p = sub.add_parser(
        "train-sae",
        help="train an SAE (TopK or BatchTopK) on an activation store (data-parallel under "
        "torchrun)",
        description="Train an SAE. Multi-process: torchrun --nproc_per_node N -m steerlex.cli "
        "train-sae ...",
    )
    add_options(p, TrainSAEConfig)
    add_quiet(p)
    p.set_defaults(func=cmd_train_sae)

    p = sub.add_parser(
        "eval-sae", help="evaluate an SAE on held-out activations and by splicing it into the model"
    )
    add_options(p, EvalSAEConfig)
    add_quiet(p)
    p.set_defaults(func=cmd_eval_sae)


def register_utilities(sub: Any) -> None:
    """Add ``sae convert``."""
    sae_cmd = sub.add_parser("sae", help="SAE file utilities")
    sae_sub = sae_cmd.add_subparsers(dest="sae_command", required=True, metavar="SUBCOMMAND")
    p = sae_sub.add_parser(
        "convert",
        help="convert an SAE between formats (SAELens layout, eai-sparsify, the paper's .pth)",
    )
    p.add_argument("src", help="SAE directory or .pth file (format detected)")
    p.add_argument("dst", help="output directory")
    p.add_argument(
        "--to", choices=WRITABLE_FORMATS, default="saelens", help="output format (default saelens)"
    )
    p.add_argument("--k", type=int, help="k for a TopK .pth that does not record it")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a different SAE already at DST"
    )
    p.add_argument("--dtype", help="output dtype (default: keep)")
    p.set_defaults(func=cmd_sae_convert)
