"""Train a TopK or BatchTopK SAE on an activation store: single process or data-parallel.

``architecture`` picks how latents are selected during training (any registered
architecture whose class is ``trainable``): ``"topk"`` keeps the ``k`` largest latents of
every token; ``"batchtopk"`` keeps the ``k * n`` largest of each batch of ``n`` tokens
(per data stream) and is saved as a JumpReLU SAE with the threshold it learned (see
:mod:`steerlex.sae.architectures.batchtopk`). Everything else is the same for both.

The loss is the normalised MSE ``mean_rows ||x - x̂||² / var(x)`` with ``var(x)`` a
constant measured once on an initial sample, plus ``auxk_coef`` times an AuxK loss
that lets dead latents (no firing for ``dead_tokens`` tokens) reconstruct the
residual. ``k`` can be annealed linearly from ``k_start`` to ``k`` (the paper:
200 → 20). Adam with linear warm-up and a linear decay over the last part.

Data: the store's shards are split into ``streams`` (shard ``i`` goes to stream
``i % streams``); each step takes ``batch_size / streams`` rows from every stream.
Under ``torchrun`` with W processes there are W streams and rank r reads only
stream r's shards; gradients, firing counts and the AuxK normaliser (and BatchTopK's
threshold minimum) are all-reduced, and BatchTopK selects within each stream's rows, so W
processes compute what one process with ``streams=W`` computes.

Checkpoints (``checkpoints/step_XXXXXXX.pt``, the two latest kept) hold weights (and the
architecture's buffers, e.g. BatchTopK's running threshold), optimizer, RNG state, stream
positions and firing counters, so a killed run resumes exactly. A checkpoint written before
an option existed resumes with that option's default (e.g. ``architecture="topk"``). A
non-finite batch or loss stops the run, names the step, and leaves the last good
checkpoint in place.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import steerlex
from steerlex.activations.store import ActivationStore
from steerlex.core.config import from_dict_strict, option
from steerlex.core.errors import SAEError, TrainingDiverged
from steerlex.core.io import atomic_path, write_json_atomic
from steerlex.sae.base import SAEConfig, SparseAutoencoder, trainable_architectures
from steerlex.sae.formats import save_sae

CHECKPOINTS = "checkpoints"
LOG = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Training options; every field is saved with the SAE (``training.json``)."""

    architecture: str = option(
        "topk", choices=trainable_architectures,
        help="topk (k largest latents per token) or batchtopk (k * batch largest per batch; "
        "saved as JumpReLU with the learned threshold)",
    )  # fmt: skip
    d_sae: int = option(4096, help="number of latents")
    k: int = option(32, help="active latents per token")
    k_start: int | None = option(
        None, help="anneal k linearly from this value (paper: 200 -> 20; default: no annealing)"
    )
    k_anneal_steps: int = option(0, help="steps over which k is annealed")
    tied: bool = option(False, help="tie the decoder to the encoder (the paper's variant)")
    b_dec_init: str = option(
        "mean", choices=("mean", "geometric_median", "zeros"), help="decoder bias init"
    )
    normalize_activations: bool = option(
        True, help="scale inputs to mean squared norm d_in (stored in the SAE)"
    )
    lr: float = option(5e-4, help="Adam learning rate")
    warmup_steps: int = option(100, help="linear warm-up steps")
    decay_fraction: float = option(0.2, help="share of steps at the end with linear decay to 0")
    batch_size: int = option(1024, help="tokens per optimizer step (all processes together)")
    tokens: int | None = option(None, help="training tokens (default: one pass over the store)")
    auxk_coef: float = option(1 / 32, help="weight of the AuxK loss for dead latents")
    auxk_k: int | None = option(None, help="latents used by AuxK (default: d_in / 2)")
    dead_tokens: int = option(
        200_000, help="a latent is dead after this many tokens without firing"
    )
    seed: int = option(0, help="random seed")
    streams: int = option(1, help="data streams (set by torchrun to the number of processes)")
    shards_in_memory: int = option(4, help="shards mixed in memory when shuffling")
    init_sample_tokens: int = option(
        16_384, help="tokens used to set b_dec, the scale and the variance"
    )
    checkpoint_every: int = option(500, help="steps between checkpoints")
    log_every: int = option(25, help="steps between log lines")
    device: str = option("cpu", help="torch device")

    def validate(self, d_in: int) -> None:
        trainable = trainable_architectures()
        if self.architecture not in trainable:
            raise SAEError(
                f"steerlex trains {', '.join(trainable)} SAEs, not {self.architecture!r}; "
                f"choose architecture (CLI: --architecture) {' or '.join(trainable)}."
            )
        if self.d_sae < 1:
            raise SAEError(
                f"d_sae={self.d_sae} must be at least 1 (the number of latents; CLI: --d-sae)."
            )
        if self.k < 1 or self.k > self.d_sae:
            raise SAEError(f"k={self.k} must be between 1 and d_sae={self.d_sae}.")
        if self.k_start is not None and not self.k <= self.k_start <= self.d_sae:
            raise SAEError(
                f"k_start={self.k_start} must be between k={self.k} and d_sae={self.d_sae}."
            )
        if self.b_dec_init not in ("mean", "geometric_median", "zeros"):
            raise SAEError(
                f"b_dec_init '{self.b_dec_init}' is not one of mean, geometric_median, zeros."
            )
        if self.batch_size < 1 or self.batch_size % self.streams:
            raise SAEError(
                f"batch_size={self.batch_size} must be a positive multiple of the number of "
                f"streams/processes ({self.streams})."
            )
        if not self.lr > 0 or not 0 <= self.decay_fraction < 1:  # NaN fails lr > 0
            raise SAEError(
                f"lr={self.lr} must be a positive number and decay_fraction={self.decay_fraction} "
                "in [0, 1)."
            )
        if self.tokens is not None and self.tokens < self.batch_size:
            raise SAEError(f"tokens={self.tokens} is less than one batch ({self.batch_size}).")
        if d_in < 1:
            raise SAEError("The activation store has width 0.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict_strict(cls, data, "training options", SAEError)


# --- data --------------------------------------------------------------------------


class Stream:
    """Endless shuffled batches from a subset of shards, with a resumable position."""

    def __init__(
        self, store: ActivationStore, shards: list[int], rows: int, seed: int, cfg: TrainConfig
    ) -> None:
        self.store, self.shards, self.rows, self.seed, self.cfg = store, shards, rows, seed, cfg
        self.epoch, self.batch = 0, 0
        self._it: Iterator[torch.Tensor] | None = None

    def _epoch_iter(self) -> Iterator[torch.Tensor]:
        return self.store.iter_batches(
            self.rows,
            seed=self.seed * 1_000_003 + self.epoch,
            shards_in_memory=self.cfg.shards_in_memory,
            drop_last=True,
            dtype=torch.float32,
            shards=self.shards,
        )

    def seek(self, epoch: int, batch: int) -> None:
        """Position the stream so the next batch is batch ``batch`` of epoch ``epoch``."""
        self.epoch, self.batch = epoch, 0
        self._it = self._epoch_iter()
        for _ in range(batch):
            next(self._it)
            self.batch += 1

    def next(self) -> torch.Tensor:
        if self._it is None:
            self.seek(self.epoch, self.batch)
        assert self._it is not None
        for _ in range(2):
            try:
                out = next(self._it)
                self.batch += 1
                return out
            except StopIteration:
                self.epoch, self.batch = self.epoch + 1, 0
                self._it = self._epoch_iter()
        raise SAEError(
            f"Shards {self.shards} hold fewer than {self.rows} tokens: lower the batch size or harvest more text."
        )


# --- initialisation ------------------------------------------------------------------


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to the rows of ``x``."""
    median = x.mean(dim=0)
    for _ in range(iters):
        dist_ = (x - median).norm(dim=1).clamp_min(1e-8)
        w = 1.0 / dist_
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - median).norm() <= tol * max(1.0, float(median.norm())):
            return new
        median = new
    return median


@dataclass
class InitStats:
    norm_scale: float
    b_dec: torch.Tensor
    data_var: float  # mean ||x - mean||² of raw activations


def init_stats(store: ActivationStore, cfg: TrainConfig) -> InitStats:
    """Scale, decoder bias and variance from the first ``init_sample_tokens`` tokens."""
    sample = store.activations(max_tokens=cfg.init_sample_tokens).float()
    if sample.shape[0] == 0:
        raise SAEError(f"The activation store {store.directory} holds no tokens.")
    bad = (~torch.isfinite(sample)).sum().item()
    if bad:
        raise TrainingDiverged(
            f"The activation store {store.directory} has {bad} NaN/Inf values in its first "
            f"{sample.shape[0]} tokens; rebuild it (`steerlex harvest`) before training."
        )
    d_in = sample.shape[1]
    scale = (
        math.sqrt(d_in / float(sample.pow(2).sum(1).mean())) if cfg.normalize_activations else 1.0
    )
    if cfg.b_dec_init == "mean":
        b_dec = sample.mean(0)
    elif cfg.b_dec_init == "geometric_median":
        b_dec = geometric_median(sample)
    else:
        b_dec = torch.zeros(d_in)
    data_var = float((sample - sample.mean(0)).pow(2).sum(1).mean())
    return InitStats(scale, b_dec * scale, data_var)


# --- schedule ---------------------------------------------------------------------------


def k_at(step: int, cfg: TrainConfig) -> int:
    if cfg.k_start is None or cfg.k_anneal_steps <= 0 or step >= cfg.k_anneal_steps:
        return cfg.k
    return round(cfg.k_start + (cfg.k - cfg.k_start) * step / cfg.k_anneal_steps)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_start = total * (1 - cfg.decay_fraction)
    if cfg.decay_fraction > 0 and step >= decay_start:
        return warm * max(0.0, (total - step) / (total - decay_start))
    return warm


# --- distributed helpers --------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


# --- the loop -----------------------------------------------------------------------------------


@dataclass
class _Training:
    """One training run in progress: the SAE, its optimizer, counters and this rank's streams.

    ``since_fired [d_sae]`` counts the tokens (all ranks) since each latent last fired; ``step``
    is the number of completed optimizer steps.
    """

    cfg: TrainConfig
    store: ActivationStore
    out: Path
    device: torch.device
    rank: int
    world: int
    total_steps: int
    stats: InitStats
    sae: SparseAutoencoder
    opt: torch.optim.Optimizer
    sched: Any
    since_fired: torch.Tensor
    streams: dict[int, Stream]
    auxk_k: int
    step: int = 0

    @property
    def ckpt_dir(self) -> Path:
        return self.out / CHECKPOINTS


def _check_enough_shards(store: ActivationStore, cfg: TrainConfig) -> None:
    """SAEError when the store has fewer shards than data streams (processes)."""
    n_shards = len(store.shards)
    if n_shards < cfg.streams:
        raise SAEError(
            f"The store has {n_shards} shard(s) but training uses {cfg.streams} streams/processes; "
            "harvest with a smaller --texts-per-shard so every process gets at least one shard."
        )


def _load_resume_checkpoint(
    ckpt_dir: Path, cfg: TrainConfig, store: ActivationStore
) -> dict[str, Any] | None:
    """The latest checkpoint in ``ckpt_dir`` (loaded on the CPU), or None when there is none.

    Raises SAEError when it was made with other options or another store.
    """
    resume = _latest_checkpoint(ckpt_dir)
    if resume is None:
        return None
    ckpt: dict[str, Any] = torch.load(resume, map_location="cpu", weights_only=True)
    _check_same_run(ckpt, cfg, store, resume)
    return ckpt


def _new_sae(
    store: ActivationStore, cfg: TrainConfig, stats: InitStats, device: torch.device
) -> SparseAutoencoder:
    """A freshly initialised SAE for ``store`` (weights from ``cfg.seed``, ``b_dec`` and
    ``norm_scale`` from ``stats``), on ``device``."""
    sae_cfg = SAEConfig(
        architecture=cfg.architecture,
        d_in=store.d_model,
        d_sae=cfg.d_sae,
        k=cfg.k,
        tied=cfg.tied,
        norm_scale=stats.norm_scale,
        model_spec=store.index["model"]["spec"],
        weights_id=store.index["model"]["weights_id"],
        layer=store.layer,
        hf_hook_name=store.index["model"]["hook_name"],
        keep=store.index.get("identity", {}).get("keep"),
    )
    sae = SparseAutoencoder(sae_cfg, device=device)
    sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        sae.b_dec.copy_(stats.b_dec.to(device))
    return sae


def _optimizer(
    sae: SparseAutoencoder, cfg: TrainConfig, total_steps: int, device: torch.device
) -> tuple[torch.optim.Optimizer, Any]:
    """Adam over the SAE's parameters and its warm-up/decay schedule (:func:`lr_factor`)."""
    # fused Adam: one kernel over all parameters (about 20% of a CPU step is the optimizer)
    fused = device.type in ("cpu", "cuda")
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
    return opt, sched


def _rank_streams(
    store: ActivationStore, cfg: TrainConfig, rank: int, world: int
) -> dict[int, Stream]:
    """This rank's data streams by stream number: stream ``s`` reads shards ``s, s + streams,
    ...`` in batches of ``batch_size / streams`` rows; under torchrun each rank has one."""
    my_streams = [rank] if world > 1 else list(range(cfg.streams))
    rows = cfg.batch_size // cfg.streams
    n_shards = len(store.shards)
    return {
        s: Stream(store, list(range(s, n_shards, cfg.streams)), rows, cfg.seed + 7919 * s, cfg)
        for s in my_streams
    }


def _start(
    store: ActivationStore,
    cfg: TrainConfig,
    out: Path,
    ckpt: dict[str, Any] | None,
    device: torch.device,
    rank: int,
    world: int,
) -> _Training:
    """Seed, initialise the SAE, optimizer and streams, then restore ``ckpt`` when given."""
    total_steps = max(1, (cfg.tokens or store.n_tokens) // cfg.batch_size)
    torch.manual_seed(cfg.seed)
    stats = init_stats(store, cfg)
    sae = _new_sae(store, cfg, stats, device)
    opt, sched = _optimizer(sae, cfg, total_steps, device)
    run = _Training(
        cfg=cfg,
        store=store,
        out=out,
        device=device,
        rank=rank,
        world=world,
        total_steps=total_steps,
        stats=stats,
        sae=sae,
        opt=opt,
        sched=sched,
        since_fired=torch.zeros(cfg.d_sae, dtype=torch.long, device=device),
        streams=_rank_streams(store, cfg, rank, world),
        auxk_k=cfg.auxk_k or max(1, store.d_model // 2),
    )
    if ckpt is not None:
        _restore(run, ckpt)
    return run


def _restore(run: _Training, ckpt: dict[str, Any]) -> None:
    """Load weights, optimizer, schedule, counters, RNG state, stream positions and step."""
    run.sae.load_state_dict(ckpt["sae"])
    run.opt.load_state_dict(ckpt["optim"])
    run.sched.load_state_dict(ckpt["sched"])
    run.since_fired.copy_(ckpt["since_fired"])
    torch.set_rng_state(ckpt["torch_rng"])
    for s, stream in run.streams.items():
        epoch, batch = ckpt["streams"][s]
        stream.seek(epoch, batch)
    run.step = int(ckpt["step"])


def _next_batch(run: _Training) -> torch.Tensor:
    """The next ``[rows of this rank, d_in]`` batch on the training device.

    Raises TrainingDiverged when any rank's batch holds NaN/Inf.
    """
    x = torch.cat([run.streams[s].next() for s in run.streams]).to(run.device)
    n_bad = int((~torch.isfinite(x)).sum())
    if _all_reduce_sum(torch.tensor([n_bad], device=run.device)).item():
        raise TrainingDiverged(
            f"The activation batch of step {run.step} holds NaN/Inf values; the store is damaged "
            f"or the model overflowed. Check it with ActivationStore.verify(). "
            f"{_last_good(run.ckpt_dir)}"
        )
    return x


def _step(run: _Training, x: torch.Tensor) -> dict[str, float]:
    """One optimizer step and schedule step on ``x``; the step's metrics (:func:`_train_step`).

    Raises TrainingDiverged when the loss is not finite (the schedule is not stepped then).
    """
    metrics = _train_step(
        run.sae,
        run.opt,
        x,
        k_at(run.step, run.cfg),
        run.cfg,
        run.stats,
        run.since_fired,
        run.auxk_k,
        run.world,
        len(run.streams),
    )
    if not math.isfinite(metrics["loss"]):
        raise TrainingDiverged(
            f"The loss became {metrics['loss']} at step {run.step} (lr {run.sched.get_last_lr()[0]:.2e}); "
            f"lower --lr or check the data. {_last_good(run.ckpt_dir)}"
        )
    run.sched.step()
    run.step += 1
    return metrics


def _log(run: _Training, metrics: dict[str, float], tokens_per_s: float, bar: tqdm) -> None:
    """Append the step's record to ``train_log.jsonl`` (rank 0) and show it on the bar."""
    cfg, step = run.cfg, run.step
    record = {
        "step": step,
        "tokens": step * cfg.batch_size,
        "k": k_at(step - 1, cfg),
        "lr": run.sched.get_last_lr()[0],
        "tokens_per_s": tokens_per_s,
        "dead_fraction": float((run.since_fired > cfg.dead_tokens).float().mean()),
        **metrics,
    }
    if run.rank == 0:
        with (run.out / LOG).open("a") as f:
            f.write(json.dumps(record) + "\n")
    bar.set_postfix(
        nmse=f"{record['nmse']:.3f}",
        L0=f"{record['l0']:.1f}",
        dead=f"{record['dead_fraction']:.1%}",
        tok_s=f"{record['tokens_per_s']:.0f}",
    )


def _checkpoint(run: _Training) -> None:
    """Gather the stream positions of all ranks; rank 0 writes ``step_XXXXXXX.pt``."""
    streams_pos = _gather_positions(run.streams, run.cfg.streams, run.world, run.device)
    if run.rank == 0:
        _save_checkpoint(
            run.ckpt_dir,
            run.step,
            run.sae,
            run.opt,
            run.sched,
            run.since_fired,
            streams_pos,
            run.cfg,
            run.store,
        )


def _run_steps(run: _Training, *, progress: bool, on_step: Callable[[int], None] | None) -> None:
    """Train from ``run.step`` to ``run.total_steps``: log every ``log_every`` steps and
    checkpoint every ``checkpoint_every`` steps (and both at the last step)."""
    cfg = run.cfg
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        desc="train-sae",
        unit="step",
        disable=not progress or run.rank != 0,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    t_last, tokens_last = time.perf_counter(), 0
    try:
        while run.step < run.total_steps:
            metrics = _step(run, _next_batch(run))
            tokens_last += cfg.batch_size
            if run.step % cfg.log_every == 0 or run.step == run.total_steps:
                now = time.perf_counter()
                _log(run, metrics, tokens_last / max(now - t_last, 1e-9), bar)
                t_last, tokens_last = now, 0
            bar.update(1)
            if run.step % cfg.checkpoint_every == 0 or run.step == run.total_steps:
                _checkpoint(run)
            if on_step is not None:
                on_step(run.step)
    finally:
        bar.close()


def _save_trained(run: _Training) -> None:
    """Write the SAE (SAELens layout) and ``training.json`` into ``run.out``."""
    cfg = run.cfg
    save_sae(run.sae, run.out, overwrite=True)
    write_json_atomic(
        run.out / "training.json",
        {
            "train_config": asdict(cfg),
            "store": str(run.store.directory),
            "store_identity": run.store.index.get("identity"),
            "steps": run.total_steps,
            "tokens": run.total_steps * cfg.batch_size,
            "norm_scale": run.stats.norm_scale,
            "data_var": run.stats.data_var,
            "steerlex_version": steerlex.__version__,
        },
    )


def train_sae(
    store: ActivationStore,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> SparseAutoencoder:
    """Train (or resume training) an SAE on ``store``; save it in ``out_dir``.

    ``on_step(step)`` runs after each completed step and checkpoint (tests use it to
    simulate a kill). Returns the trained SAE in its inference form (``for_inference()``:
    JumpReLU for BatchTopK), with ``norm_scale`` set; the saved file holds the folded,
    raw-space form of the same SAE.
    """
    rank, world = _world()
    if world > 1 and cfg.streams != world:
        cfg = TrainConfig(**{**asdict(cfg), "streams": world})
    cfg.validate(store.d_model)
    out = Path(out_dir)
    if rank == 0:
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    _check_enough_shards(store, cfg)
    ckpt = _load_resume_checkpoint(out / CHECKPOINTS, cfg, store)
    run = _start(store, cfg, out, ckpt, device, rank, world)
    _run_steps(run, progress=progress, on_step=on_step)
    if rank == 0:
        _save_trained(run)
    return run.sae.for_inference()


def _train_step(
    sae: SparseAutoencoder,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    k: int,
    cfg: TrainConfig,
    stats: InitStats,
    since_fired: torch.Tensor,
    auxk_k: int,
    world: int,
    groups: int,
) -> dict[str, float]:
    """One optimizer step on ``x`` (``groups`` data-stream blocks of rows); returns metrics."""
    pre = sae.pre_acts(x)
    values, indices = sae.training_codes(pre, k, groups=groups)
    recon = sae.decode_sparse(values, indices)
    err = x - recon
    sq = err.pow(2).sum(-1)
    loss = sq.mean() / stats.data_var

    # firing counters (global across ranks)
    fired = torch.zeros_like(since_fired)
    fired.scatter_add_(0, indices.reshape(-1), (values.reshape(-1) > 0).long())
    _all_reduce_sum(fired)
    since_fired += x.shape[0] * world
    since_fired[fired > 0] = 0

    dead = since_fired > cfg.dead_tokens
    aux = torch.zeros((), device=x.device)
    n_dead = int(dead.sum())
    if cfg.auxk_coef > 0 and n_dead > 0:
        masked = pre.masked_fill(~dead, float("-inf"))
        atop = torch.topk(masked, min(auxk_k, n_dead), dim=-1, sorted=False)
        avals = torch.relu(atop.values)
        ahat = sae.decode_sparse(avals, atop.indices) - sae.b_dec / sae.cfg.norm_scale
        target = err.detach()
        norm = _all_reduce_sum(torch.stack([target.pow(2).sum(), torch.tensor(float(x.shape[0]))]))
        aux = (target - ahat).pow(2).sum(-1).mean() / (norm[0] / norm[1]).clamp_min(1e-12)
    total = loss + cfg.auxk_coef * aux

    opt.zero_grad(set_to_none=True)
    total.backward()
    if world > 1:
        for p in sae.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world
    sae.remove_parallel_decoder_grad()
    opt.step()
    sae.normalize_decoder()
    learned = sae.observe_training_codes(values, _all_reduce_min)

    with torch.no_grad():
        stat = _all_reduce_sum(
            torch.stack(
                [
                    sq.sum().detach(),
                    (x - x.mean(0)).pow(2).sum(),
                    (values > 0).sum().float(),
                    torch.tensor(float(x.shape[0])),
                    total.detach() * x.shape[0],
                    aux.detach() * x.shape[0],
                ]
            )
        )
    n = float(stat[3])
    return {
        "loss": float(stat[4]) / n,
        "nmse": float(stat[0] / stat[1]),
        "l0": float(stat[2]) / n,
        "auxk_loss": float(stat[5]) / n,
        **learned,
    }


# --- checkpoints ---------------------------------------------------------------------------------


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob("step_*.pt")) if ckpt_dir.is_dir() else []
    return found[-1] if found else None


def _last_good(ckpt_dir: Path) -> str:
    last = _latest_checkpoint(ckpt_dir)
    return f"The last good checkpoint is {last}." if last else "No checkpoint was written yet."


def _gather_positions(
    streams: dict[int, Stream], n_streams: int, world: int, device: torch.device
) -> list[list[int]]:
    pos = torch.zeros(n_streams, 2, dtype=torch.long, device=device)
    for s, st in streams.items():
        pos[s, 0], pos[s, 1] = st.epoch, st.batch
    _all_reduce_sum(pos)
    return [[int(a), int(b)] for a, b in pos.tolist()]


def _save_checkpoint(
    ckpt_dir: Path,
    step: int,
    sae: SparseAutoencoder,
    opt: torch.optim.Optimizer,
    sched: Any,
    since_fired: torch.Tensor,
    streams_pos: list[list[int]],
    cfg: TrainConfig,
    store: ActivationStore,
) -> None:
    state = {
        "step": step,
        "sae": sae.state_dict(),
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "since_fired": since_fired.cpu(),
        "torch_rng": torch.get_rng_state(),
        "streams": streams_pos,
        "train_config": asdict(cfg),
        "store_identity_sha": _store_fingerprint(store),
    }
    path = ckpt_dir / f"step_{step:07d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in sorted(ckpt_dir.glob("step_*.pt"))[:-2]:
        old.unlink(missing_ok=True)


def _store_fingerprint(store: ActivationStore) -> str:
    return json.dumps([store.index["model"]["spec"], store.layer, [s.sha256 for s in store.shards]])


def _check_same_run(
    ckpt: dict[str, Any], cfg: TrainConfig, store: ActivationStore, path: Path
) -> None:
    # options added after the checkpoint was written take their defaults (architecture: topk)
    old = {**asdict(TrainConfig()), **ckpt["train_config"]}
    now = asdict(cfg)
    diffs = [
        k
        for k in sorted(set(old) | set(now))
        if k not in ("checkpoint_every", "log_every") and old.get(k) != now.get(k)
    ]
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {now.get(k)!r}" for k in diffs)
        raise SAEError(
            f"The checkpoint {path} was made with other training options ({detail}); use another "
            "--out, or the same options to resume."
        )
    if ckpt["store_identity_sha"] != _store_fingerprint(store):
        raise SAEError(
            f"The checkpoint {path} was trained on another activation store; use another --out "
            "or resume with the same --activations."
        )
