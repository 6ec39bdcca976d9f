"""The SAE jobs: train an SAE on a store (``train-sae``) and evaluate it (``eval-sae``)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from steerlex.core.config import narrow, option
from steerlex.core.errors import SAEError
from steerlex.core.io import dir_lock
from steerlex.core.paths import check_output_dir
from steerlex.jobs.context import RunContext
from steerlex.jobs.explain import sae_dir
from steerlex.sae.base import SparseAutoencoder
from steerlex.sae.evaluate import evaluate_sae
from steerlex.sae.train import TrainConfig, train_sae

__all__ = [
    "EvalSAEConfig",
    "EvalSAEResult",
    "TrainSAEConfig",
    "TrainSAEResult",
    "eval_sae_job",
    "train_sae_job",
]


VERIFY_HELP = (
    "check each store shard's sha256 against the store's index before use (hashed once, "
    "then memoised by size and mtime); --no-verify skips the check"
)

# --------------------------------------------------------------------------- train


@dataclass
class TrainSAEConfig(TrainConfig):
    """``steerlex train-sae``: the store to train on and where the SAE goes, plus every
    training option of :class:`~steerlex.sae.train.TrainConfig`."""

    activations: str | None = option(
        None, required=True, help="activation store directory (from `steerlex harvest`)"
    )
    out: str | None = option(
        None, required=True, help="output directory: SAE (SAELens layout), log, checkpoints"
    )
    verify: bool = option(True, help=VERIFY_HELP)

    def validate(self, d_in: int = 1) -> None:
        """The training options (for a store of width ``d_in``; training checks them again
        with the store's own width), and a store and an output directory one can write."""
        super().validate(d_in)
        if not self.activations or not self.out:
            raise SAEError("train-sae needs --activations (a store) and --out (a directory).")
        check_output_dir(self.out, "--out", SAEError)


@dataclass(frozen=True)
class TrainSAEResult:
    """The trained SAE (its inference form: BatchTopK is saved as JumpReLU), the options it
    was trained with, the store's size, the wall seconds, and whether this process is the one
    that saved it (rank 0 under torchrun)."""

    sae: SparseAutoencoder
    options: TrainConfig
    n_tokens: int
    store_model: str
    store_layer: int
    seconds: float
    out: Path
    rank: int


def train_sae_job(cfg: TrainSAEConfig, ctx: RunContext) -> TrainSAEResult:
    """Train (or resume) an SAE on ``cfg.activations`` into ``cfg.out``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is set up here (NCCL on
    CUDA, gloo on CPU) and torn down at the end; each process trains on its own shards.
    """
    cfg.validate()
    assert cfg.activations is not None and cfg.out is not None
    options = narrow(cfg, TrainConfig)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started_group = False
    if world > 1 and not dist.is_initialized():
        cuda = options.device.startswith("cuda")
        if cuda:
            options.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        started_group = True
    try:
        store = ctx.store(cfg.activations, verify=cfg.verify)
        t0 = time.perf_counter()
        with contextlib.ExitStack() as held:
            if int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes the directory
                out = Path(cfg.out)
                if out.exists() and not out.is_dir():
                    raise SAEError(f"--out {out} is a file; pass a directory for the SAE.")
                held.enter_context(dir_lock(out, what="SAE training directory", error=SAEError))
            sae = train_sae(store, options, cfg.out, progress=ctx.progress)
    finally:
        if started_group and dist.is_initialized():
            dist.destroy_process_group()
    return TrainSAEResult(
        sae=sae,
        options=options,
        n_tokens=store.n_tokens,
        store_model=str(store.index["model"]["spec"]),
        store_layer=store.layer,
        seconds=time.perf_counter() - t0,
        out=Path(cfg.out),
        rank=int(os.environ.get("RANK", "0")),
    )


# --------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class EvalSAEConfig:
    """``steerlex eval-sae``: held-out FVE, L0, dead and dense latents, and the language
    model's loss with the SAE spliced in."""

    sae: str | None = option(
        None, required=True, help="SAE directory (SAELens layout, sparsify, or a .pth)"
    )
    activations: str | None = option(None, required=True, help="held-out activation store")
    model: str | None = option(
        None, help="model spec for the spliced loss (default: the store's model)"
    )
    lm: bool = option(True, help="also measure the spliced language-model loss")
    max_lm_texts: int = option(64, help="held-out texts for the spliced loss")
    max_tokens: int | None = option(None, help="evaluate at most this many stored tokens")
    lm_batch_size: int = option(4, help="texts per forward pass")
    dense_threshold: float = option(
        0.1, help="a latent firing on a larger share of tokens is dense"
    )
    device: str = option("cpu", help="torch device")
    out: str | None = option(None, help="output directory (default SAE_DIR/eval)")
    verify: bool = option(True, help=VERIFY_HELP)

    def validate(self) -> None:
        if not self.sae or not self.activations:
            raise SAEError("eval-sae needs --sae (an SAE) and --activations (a held-out store).")
        if self.max_lm_texts < 1 or self.lm_batch_size < 1:
            raise SAEError(
                f"max_lm_texts ({self.max_lm_texts}) and lm_batch_size ({self.lm_batch_size}) "
                "must be at least 1."
            )
        if self.out:
            check_output_dir(self.out, "--out", SAEError)
        else:
            check_output_dir(sae_dir(self.sae) / "eval", "--out (default SAE_DIR/eval)", SAEError)


@dataclass(frozen=True)
class EvalSAEResult:
    """What :func:`~steerlex.sae.evaluate.evaluate_sae` returned, and where it wrote."""

    result: dict[str, Any]
    out: Path


def eval_sae_job(cfg: EvalSAEConfig, ctx: RunContext) -> EvalSAEResult:
    """Evaluate ``cfg.sae`` on ``cfg.activations``; write ``eval.json`` (and plots)."""
    cfg.validate()
    assert cfg.sae is not None and cfg.activations is not None
    sae = ctx.sae(cfg.sae, device=cfg.device)
    store = ctx.store(cfg.activations, verify=cfg.verify)
    loaded = None
    if cfg.lm:
        loaded = ctx.model(cfg.model or store.index["model"]["spec"], device=cfg.device)
    out = Path(cfg.out) if cfg.out else sae_dir(cfg.sae) / "eval"
    result = evaluate_sae(
        sae, store, out, loaded=loaded, max_lm_texts=cfg.max_lm_texts, max_tokens=cfg.max_tokens,
        lm_batch_size=cfg.lm_batch_size, dense_threshold=cfg.dense_threshold,
        progress=ctx.progress,
    )  # fmt: skip
    return EvalSAEResult(result, out)
