"""SAE training: steerlex's trainer vs eai-sparsify on the same activations, on CPU.

Both trainers fit a TopK SAE (untied decoder, unit-norm decoder rows) with the same
``d_sae``, ``k``, tokens per step and token budget, on the same batches of the same
activation store in the same order, with the same number of torch threads. Each
then keeps its *own* defaults for everything that is part of "the trainer": init,
optimizer, learning rate and schedule, input scaling, auxiliary loss.

steerlex: ``train_sae(store, TrainConfig(d_sae, k, batch_size, tokens, seed))`` as a
user runs it (Adam 5e-4, 100 warm-up steps, linear decay over the last 20%, inputs
scaled to mean squared norm d_in, AuxK 1/32 on latents dead for 200k tokens).

sparsify: its real ``sparsify.Trainer.fit()`` (eai-sparsify, imported as ``sparsify``)
with ``loss_fn="fvu"``. ``Trainer`` hooks a language model and reads a tokenized
dataset; here the "model" is a stub whose single hooked layer returns the next
precomputed activation batch, so sparsify's own code does everything else: seeding
and ``SparseCoder`` init (``nn.Linear`` encoder, ``W_dec`` = its unit-normed copy),
``b_dec`` = mean of the first batch, unit-norming ``W_dec`` before every forward, the
fused TopK encoder + sparse decoder forward (``fvu`` = SSE / batch variance, AuxK if
``auxk_alpha`` > 0, off by default), removal of the gradient component parallel to
the decoder rows, its optimizer (default ``signum``: ``ScheduleFreeWrapper(SignSGD)``,
momentum 0.95, lr 5e-3 / sqrt(d_sae / 2^14); ``--methods ...,sparsify-adam``: Adam,
lr 2e-4 / sqrt(d_sae / 2^14), linear warm-up ``--sparsify-adam-warmup`` then linear
decay), dead-latent bookkeeping, and the final checkpoint (which switches the
schedule-free optimizer to its averaged "eval" weights before saving them). Left
out: the language-model forward, tokenization and its DataLoader of sequences
(replaced by one "sequence" of ``batch`` tokens per step), wandb, DDP, exclude_tokens.

Fairness: both read their batches from ``steerlex.sae.train.Stream`` with the same
seed (a fingerprint of the batches proves the order matched); both write one final
checkpoint (weights + optimizer state) inside the timed region and no intermediate
ones; neither shows a progress bar; one-time lazy imports (``torch._dynamo``, which the
first ``torch.optim`` optimizer pulls in, and sparsify's package) happen before the
clock starts. Each measurement runs in its own subprocess so its peak RSS
(``ru_maxrss``, read right after training, before evaluation) is its own; the RSS
growth during training is reported too, since the sparsify process also carries
transformers/datasets. Methods alternate (ABBA across repeats) and medians are
reported. Timings: ``tokens_per_s`` is the whole training call (init, loop, final
save); ``compute_tokens_per_s``/``step_ms`` are the loop (first batch fetch to the
start of the final save) minus the time spent fetching batches (the same code on
both sides). Both final SAEs are loaded from disk with
``steerlex.sae.formats.load_sae`` and scored with the same
``steerlex.sae.evaluate.activation_metrics`` on the held-out store; as a cross-check
the sparsify SAE is also scored with its own ``SparseCoder`` encode/decode, and the
steerlex SAE in its in-memory (unfolded) form.

    .venv/bin/python benchmarks/sae_training.py                   # runs/quality stores, 256 steps, 2 repeats
    .venv/bin/python benchmarks/sae_training.py --synthetic       # small random stores, quick smoke test
    .venv/bin/python benchmarks/sae_training.py --tokens 32768 --repeats 1 --methods steerlex,sparsify,sparsify-adam

Prints a table and writes benchmarks/results/sae_training.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from steerlex.activations.store import ActivationStore

RESULTS = Path(__file__).parent / "results" / "sae_training.json"
METHODS = ("steerlex", "steerlex-short", "sparsify", "sparsify-adam")
REAL_DEFAULTS = {"d_sae": 4096, "k": 32, "batch_size": 1024, "tokens": 262_144}
SYNTHETIC_DEFAULTS = {"d_sae": 512, "k": 16, "batch_size": 256, "tokens": 65_536}
SCALAR_METRICS = ("n_tokens", "nmse", "fve", "mse", "variance", "l0", "n_dead", "dead_fraction")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- data timing (identical on both sides) ------------------------------------------------


class DataTimer:
    """Wraps ``Stream.next``: time spent fetching batches, first-fetch time, batch fingerprint."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.first_start: float | None = None
        self.digest = hashlib.sha256()

    def install(self) -> None:
        from steerlex.sae import train as train_mod

        original = train_mod.Stream.next
        timer = self

        def timed_next(stream: Any) -> torch.Tensor:
            t0 = time.perf_counter()
            if timer.first_start is None:
                timer.first_start = t0
            x = original(stream)
            timer.digest.update(x[0].numpy().tobytes())
            timer.digest.update(x[-1].numpy().tobytes())
            timer.calls += 1
            timer.seconds += time.perf_counter() - t0
            return x

        train_mod.Stream.next = timed_next  # type: ignore[method-assign,assignment]


# --- steerlex -----------------------------------------------------------------------------------


def train_steerlex(
    store: ActivationStore, cfg: dict[str, Any], out_dir: Path, marks: dict[str, float]
) -> tuple[Path, Any, dict[str, Any]]:
    """Run steerlex's ``train_sae``; return (saved dir, in-memory SAE, extra info)."""
    from steerlex.sae import train as train_mod

    steps = cfg["tokens"] // cfg["batch_size"]
    original_save = train_mod._save_checkpoint

    def marked_save(*args: Any, **kwargs: Any) -> None:
        marks.setdefault("save_start", time.perf_counter())
        original_save(*args, **kwargs)

    train_mod._save_checkpoint = marked_save
    tcfg = train_mod.TrainConfig(
        d_sae=cfg["d_sae"],
        k=cfg["k"],
        batch_size=cfg["batch_size"],
        tokens=steps * cfg["batch_size"],
        seed=cfg["seed"],
        checkpoint_every=steps + 1,  # only the final checkpoint, like the sparsify side
        **{key: cfg[key] for key in ("lr", "warmup_steps") if key in cfg},
    )
    sae = train_mod.train_sae(store, tcfg, out_dir, progress=False)
    logged = [
        json.loads(line)["tokens_per_s"]
        for line in (out_dir / train_mod.LOG).read_text().splitlines()
        if line.strip()
    ]
    extra = {
        "optimizer": "adam",
        "lr": tcfg.lr,
        "warmup_steps": tcfg.warmup_steps,
        "decay_fraction": tcfg.decay_fraction,
        "auxk_coef": tcfg.auxk_coef,
        "normalize_activations": tcfg.normalize_activations,
        "train_log_tokens_per_s_median": statistics.median(logged) if logged else None,
    }
    return out_dir, sae, extra


# --- sparsify ------------------------------------------------------------------------------------


def _stub_model(n_layers: int, layer: int, d_model: int, feed: Callable[[], torch.Tensor]) -> Any:
    """A stand-in for a HF model: ``layers.{layer}`` outputs the next activation batch.

    sparsify's Trainer needs ``config.num_hidden_layers``, ``base_model`` with exactly one
    ModuleList of that length, ``device``, ``dummy_inputs`` (to find the width) and a forward;
    its forward hook on ``layers.{layer}`` then trains the SAE on what that layer returns.
    """
    import torch
    from torch import nn

    class FeedLayer(nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            if input_ids.numel() and int(input_ids.reshape(-1)[0]) < 0:  # dummy_inputs
                return torch.zeros(*input_ids.shape, d_model)
            return feed().unsqueeze(0)  # [1 "sequence", batch tokens, d_model]

    class StubLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=n_layers)
            self.layers = nn.ModuleList(
                [FeedLayer() if i == layer else nn.Identity() for i in range(n_layers)]
            )

        @property
        def base_model(self) -> nn.Module:
            return self

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

        @property
        def dummy_inputs(self) -> dict[str, torch.Tensor]:
            return {"input_ids": torch.full((1, 1), -1, dtype=torch.long)}

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.layers[layer](input_ids)
            return out

    return StubLM()


def train_sparsify(
    store: ActivationStore,
    cfg: dict[str, Any],
    out_dir: Path,
    marks: dict[str, float],
    optimizer: str,
) -> tuple[Path, Any, dict[str, Any]]:
    """Run ``sparsify.Trainer.fit()`` on the store's batches; return (saved dir, SAE, info)."""
    import torch
    from torch.utils.data import Dataset

    from steerlex.sae import train as train_mod

    with contextlib.redirect_stdout(sys.stderr):  # sparsify prints; stdout carries our JSON
        import sparsify.trainer
        from sparsify import SparseCoderConfig, Trainer
        from sparsify import TrainConfig as SparsifyTrainConfig

    # No progress bar on either side: Trainer.fit passes disable= explicitly, so TQDM_DISABLE
    # does not reach it; give its module a tqdm that is always disabled.
    bar = sparsify.trainer.tqdm

    def quiet_tqdm(*args: Any, **kwargs: Any) -> Any:
        return bar(*args, **{**kwargs, "disable": True})

    sparsify.trainer.tqdm = quiet_tqdm

    steps, batch = cfg["tokens"] // cfg["batch_size"], cfg["batch_size"]
    # Same stream as train_sae with streams=1: all shards, seed cfg.seed, same shuffle window.
    stream = train_mod.Stream(
        store,
        list(range(len(store.shards))),
        batch,
        cfg["seed"],
        train_mod.TrainConfig(seed=cfg["seed"], batch_size=batch),
    )

    class Steps(Dataset[dict[str, torch.Tensor]]):
        """One item per optimizer step: a "sequence" of ``batch`` placeholder token ids."""

        def __len__(self) -> int:
            return int(steps)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": torch.zeros(batch, dtype=torch.long)}

    layer = store.layer
    model = _stub_model(layer + 1, layer, store.d_model, stream.next)
    sp_cfg = SparsifyTrainConfig(
        SparseCoderConfig(num_latents=cfg["d_sae"], k=cfg["k"]),
        batch_size=1,  # sequences per step; each sequence is `batch` tokens
        optimizer=optimizer,
        lr_warmup_steps=cfg["sparsify_adam_warmup"],
        auxk_alpha=cfg["sparsify_auxk_alpha"],
        layers=[layer],
        save_every=steps + 2,  # only the final save (fit saves once after the loop)
        log_to_wandb=False,
        save_dir=str(out_dir),
        run_name="run",
        init_seeds=[cfg["seed"]],
    )
    with contextlib.redirect_stdout(sys.stderr):
        trainer = Trainer(sp_cfg, Steps(), model)
        original_save = trainer.save

        def marked_save() -> None:
            marks.setdefault("save_start", time.perf_counter())
            original_save()

        trainer.save = marked_save
        trainer.fit()
    group = trainer.optimizers[0].param_groups[0]
    extra = {
        "optimizer": "signum (ScheduleFreeWrapper(SignSGD), momentum 0.95)"
        if optimizer == "signum"
        else "adam (torch.optim.Adam, linear warm-up + linear decay)",
        "lr": group.get("initial_lr", group.get("lr_max", group["lr"])),
        "lr_warmup_steps": cfg["sparsify_adam_warmup"] if optimizer == "adam" else None,
        "auxk_alpha": cfg["sparsify_auxk_alpha"],
        "normalize_activations": False,
    }
    return out_dir / "run" / f"layers.{layer}", None, extra


def sparsify_own_metrics(
    sae_dir: Path, heldout: ActivationStore, variance: float, max_tokens: int | None
) -> dict[str, Any]:
    """Held-out NMSE and L0 computed with sparsify's own ``SparseCoder`` encode/decode.

    ``variance`` is ``activation_metrics``' mean ||x - μ||², so the NMSE has the same
    denominator and differs only by the reconstruction code.
    """
    import torch

    with contextlib.redirect_stdout(sys.stderr):
        from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(sae_dir)
    n, err, l0 = 0, 0.0, 0.0
    with torch.no_grad():
        for batch in heldout.iter_batches(4096, shuffle=False, dtype=torch.float32):
            x = batch if max_tokens is None else batch[: max_tokens - n]
            if x.shape[0] == 0:
                break
            enc = sae.encode(x)
            recon = sae.decode(enc.top_acts, enc.top_indices)
            err += float((x.double() - recon.double()).pow(2).sum())
            l0 += float((enc.top_acts > 0).sum())
            n += x.shape[0]
    nmse = err / (variance * n)
    return {"nmse": nmse, "fve": 1 - nmse, "l0": l0 / n, "n_tokens": n}


# --- one measurement (subprocess) -------------------------------------------------------------


def worker(method: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train with ``method`` in this process, evaluate, return the numbers."""
    import torch

    torch.set_num_threads(cfg["threads"])
    from steerlex.activations.store import ActivationStore
    from steerlex.sae.evaluate import activation_metrics
    from steerlex.sae.formats import load_sae

    if method.startswith("sparsify"):
        with contextlib.redirect_stdout(sys.stderr):
            import sparsify  # noqa: F401  (import cost outside the timed region)

    # One-time lazy imports outside the clock on both sides: the first torch.optim optimizer
    # imports torch._dynamo (about a second), which sparsify's package import already did.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    store = ActivationStore.open(cfg["train"])
    heldout = ActivationStore.open(cfg["heldout"])
    out_dir = Path(cfg["work"]) / f"{method}-r{cfg['repeat']}"
    timer = DataTimer()
    timer.install()
    marks: dict[str, float] = {}
    rss_before = _maxrss_mib()
    t0 = time.perf_counter()
    if method.startswith("steerlex"):
        if method == "steerlex-short":  # a short-budget setting: higher lr, short warm-up
            cfg = {**cfg, "lr": 2e-3, "warmup_steps": 25}
        sae_dir, own_sae, extra = train_steerlex(store, cfg, out_dir, marks)
    else:
        optimizer = "adam" if method == "sparsify-adam" else "signum"
        sae_dir, own_sae, extra = train_sparsify(store, cfg, out_dir, marks, optimizer)
    t_end = time.perf_counter()
    peak = _maxrss_mib()

    steps = cfg["tokens"] // cfg["batch_size"]
    tokens = steps * cfg["batch_size"]
    assert timer.first_start is not None and timer.calls == steps, (timer.calls, steps)
    loop = marks["save_start"] - timer.first_start
    compute = loop - timer.seconds

    loaded = load_sae(sae_dir)
    metrics = activation_metrics(loaded, heldout, max_tokens=cfg["eval_tokens"], progress=False)
    scalars = {key: metrics[key] for key in SCALAR_METRICS}
    if own_sae is not None:
        own = activation_metrics(own_sae, heldout, max_tokens=cfg["eval_tokens"], progress=False)
        cross = {"how": "in-memory steerlex SAE (unfolded)", "nmse": own["nmse"], "l0": own["l0"]}
    else:
        own = sparsify_own_metrics(sae_dir, heldout, metrics["variance"], cfg["eval_tokens"])
        cross = {"how": "sparsify SparseCoder encode/decode", "nmse": own["nmse"], "l0": own["l0"]}
    return {
        "method": method,
        "repeat": cfg["repeat"],
        "steps": steps,
        "tokens": tokens,
        "seconds": t_end - t0,
        "init_seconds": timer.first_start - t0,
        "loop_seconds": loop,
        "data_seconds": timer.seconds,
        "compute_seconds": compute,
        "save_seconds": t_end - marks["save_start"],
        "tokens_per_s": tokens / (t_end - t0),
        "loop_tokens_per_s": tokens / loop,
        "compute_tokens_per_s": tokens / compute,
        "step_ms": 1000 * compute / steps,
        "peak_rss_mib": peak,
        "rss_growth_mib": peak - rss_before,
        "data_fingerprint": timer.digest.hexdigest()[:16],
        "heldout": scalars,
        "crosscheck": cross,
        "trainer": extra,
        "torch_threads": torch.get_num_threads(),
    }


def run_worker(method: str, cfg: dict[str, Any]) -> dict[str, Any]:
    threads = str(cfg["threads"])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TQDM_DISABLE": "1",  # no progress bar on either side
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, __file__, "--worker", method, "--worker-config", json.dumps(cfg)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{method} worker failed (exit {done.returncode})")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# --- synthetic stores ----------------------------------------------------------------------------


def make_synthetic(root: Path, d: int, train_tokens: int, heldout_tokens: int, seed: int) -> None:
    """Small stores of sparse combinations of 4d random unit directions plus noise."""
    import torch

    from steerlex.activations.store import create_store

    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(4 * d, d, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=gen)

    def sample(n: int) -> torch.Tensor:
        idx = torch.randint(0, atoms.shape[0], (n, 8), generator=gen)
        coef = torch.rand(n, 8, generator=gen).mul(3).exp()
        x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=coef, mode="sum")
        return x + offset + 0.1 * torch.randn(n, d, generator=gen)

    per = 4096
    create_store(
        root / "train",
        [sample(min(per, train_tokens - i)) for i in range(0, train_tokens, per)],
        model_spec="synthetic",
    )
    create_store(root / "heldout", [sample(heldout_tokens)], model_spec="synthetic")


# --- main -----------------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(r) for r in runs)

    return {
        "tokens_per_s": med(lambda r: r["tokens_per_s"]),
        "compute_tokens_per_s": med(lambda r: r["compute_tokens_per_s"]),
        "step_ms": med(lambda r: r["step_ms"]),
        "nmse": med(lambda r: r["heldout"]["nmse"]),
        "nmse_range": [
            min(r["heldout"]["nmse"] for r in runs),
            max(r["heldout"]["nmse"] for r in runs),
        ],
        "fve": med(lambda r: r["heldout"]["fve"]),
        "l0": med(lambda r: r["heldout"]["l0"]),
        "dead_fraction": med(lambda r: r["heldout"]["dead_fraction"]),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "rss_growth_mib": max(r["rss_growth_mib"] for r in runs),
        "crosscheck_nmse": runs[0]["crosscheck"].get("nmse"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=Path, default=Path("runs/quality/acts-train"))
    parser.add_argument("--heldout", type=Path, default=Path("runs/quality/acts-heldout"))
    parser.add_argument("--synthetic", action="store_true", help="use small random stores")
    parser.add_argument("--d-sae", type=int, help="latents (default 4096; synthetic 512)")
    parser.add_argument("--k", type=int, help="TopK k (default 32; synthetic 16)")
    parser.add_argument(
        "--batch-size", type=int, help="tokens per step (default 1024; synthetic 256)"
    )
    parser.add_argument(
        "--tokens", type=int, help="training tokens (default 262144; synthetic 65536)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods", default="steerlex,steerlex-short,sparsify", help=f"from {', '.join(METHODS)}"
    )
    parser.add_argument("--sparsify-adam-warmup", type=int, default=1000, help="sparsify's default")
    parser.add_argument("--sparsify-auxk-alpha", type=float, default=0.0, help="sparsify's default")
    parser.add_argument("--eval-tokens", type=int, help="score only the first N held-out tokens")
    parser.add_argument("--keep-saes", type=Path, help="keep the trained SAEs in this directory")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.worker_config))))
        return

    import torch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    defaults = SYNTHETIC_DEFAULTS if args.synthetic else REAL_DEFAULTS
    sizes = {key: getattr(args, key) or value for key, value in defaults.items()}
    if sizes["tokens"] < sizes["batch_size"]:
        parser.error("--tokens must be at least one batch")

    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sae-bench-")))
        if args.synthetic:
            make_synthetic(tmp / "stores", 64, max(32_768, sizes["tokens"]), 4096, args.seed)
            train, heldout = tmp / "stores" / "train", tmp / "stores" / "heldout"
        else:
            train, heldout = args.train.resolve(), args.heldout.resolve()
        if args.keep_saes and args.keep_saes.exists() and any(args.keep_saes.iterdir()):
            parser.error(f"--keep-saes {args.keep_saes} is not empty (steerlex would resume)")
        work = args.keep_saes.resolve() if args.keep_saes else tmp / "saes"
        work.mkdir(parents=True, exist_ok=True)
        from steerlex.activations.store import ActivationStore

        store_info = ActivationStore.open(train).summary()
        heldout_info = ActivationStore.open(heldout).summary()
        base = {
            **sizes,
            "train": str(train),
            "heldout": str(heldout),
            "work": str(work),
            "threads": args.threads,
            "seed": args.seed,
            "eval_tokens": args.eval_tokens,
            "sparsify_adam_warmup": args.sparsify_adam_warmup,
            "sparsify_auxk_alpha": args.sparsify_auxk_alpha,
        }
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for rep in range(args.repeats):
            for method in methods if rep % 2 == 0 else methods[::-1]:
                r = run_worker(method, {**base, "repeat": rep})
                runs[method].append(r)
                print(
                    f"  {method} #{rep}: {r['tokens_per_s']:.0f} tok/s "
                    f"({r['step_ms']:.1f} ms/step excl. data), NMSE {r['heldout']['nmse']:.4f}, "
                    f"peak {r['peak_rss_mib']:.0f} MiB",
                    file=sys.stderr,
                )

    fingerprints = {r["data_fingerprint"] for rs in runs.values() for r in rs}
    if len(fingerprints) != 1:
        print(f"WARNING: the methods saw different batches: {fingerprints}", file=sys.stderr)
    summary = {m: summarize(rs) for m, rs in runs.items()}
    ratio = None
    if "steerlex" in summary and "sparsify" in summary:
        a, b = summary["steerlex"], summary["sparsify"]
        ratio = {
            key: a[key] / b[key] if b[key] else math.nan
            for key in (
                "tokens_per_s",
                "compute_tokens_per_s",
                "step_ms",
                "nmse",
                "peak_rss_mib",
                "rss_growth_mib",
            )
        }

    header = (
        f"{'method':<14} {'tok/s':>8} {'step tok/s':>10} {'ms/step':>8} {'NMSE':>7} "
        f"{'FVE':>7} {'L0':>6} {'dead %':>7} {'peak MiB':>9} {'growth MiB':>10}"
    )
    print(header)
    print("-" * len(header))
    for m, s in summary.items():
        print(
            f"{m:<14} {s['tokens_per_s']:>8.0f} {s['compute_tokens_per_s']:>10.0f} "
            f"{s['step_ms']:>8.1f} {s['nmse']:>7.4f} {s['fve']:>7.4f} {s['l0']:>6.1f} "
            f"{100 * s['dead_fraction']:>7.2f} {s['peak_rss_mib']:>9.0f} {s['rss_growth_mib']:>10.0f}"
        )
    if ratio is not None:
        print(
            f"{'steerlex/spars':<14} {ratio['tokens_per_s']:>7.2f}x {ratio['compute_tokens_per_s']:>9.2f}x "
            f"{ratio['step_ms']:>7.2f}x {ratio['nmse']:>6.2f}x {'':>7} {'':>6} {'':>7} "
            f"{ratio['peak_rss_mib']:>8.2f}x {ratio['rss_growth_mib']:>9.2f}x"
        )
    for m, s in summary.items():
        if s["crosscheck_nmse"] is not None:
            print(
                f"  cross-check {m}: NMSE {s['crosscheck_nmse']:.5f} "
                f"({runs[m][0]['crosscheck']['how']}) vs {runs[m][0]['heldout']['nmse']:.5f}",
                file=sys.stderr,
            )

    from importlib.metadata import version

    result = {
        "benchmark": "sae_training",
        "synthetic": args.synthetic,
        "train_store": store_info,
        "heldout_store": heldout_info,
        **sizes,
        "steps": sizes["tokens"] // sizes["batch_size"],
        "repeats": args.repeats,
        "seed": args.seed,
        "methods": methods,
        "sparsify_adam_warmup": args.sparsify_adam_warmup,
        "sparsify_auxk_alpha": args.sparsify_auxk_alpha,
        "eval_tokens": args.eval_tokens,
        "same_batches": len(fingerprints) == 1,
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "eai_sparsify": version("eai-sparsify"),
        "summary": summary,
        "steerlex_over_sparsify": ratio,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
