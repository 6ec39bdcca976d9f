"""Summary statistics of an activation store (streamed shard by shard)."""

from __future__ import annotations

import torch

from steerlex.activations.store import ActivationStore


def activation_stats(store: ActivationStore) -> dict[str, float]:
    """Token-norm statistics: mean, median, 99th percentile and max of ||x||_2.

    Only one shard's activations are in memory at a time; the per-token norms of
    the whole store are kept (4 bytes a token).
    """
    norms = [
        store.load_shard(i)["activations"].float().norm(dim=-1) for i in range(len(store.shards))
    ]
    if not norms or sum(n.numel() for n in norms) == 0:
        return {"norm_mean": 0.0, "norm_median": 0.0, "norm_p99": 0.0, "norm_max": 0.0}
    all_norms = torch.cat(norms)
    return {
        "norm_mean": float(all_norms.mean()),
        "norm_median": float(all_norms.median()),
        "norm_p99": float(torch.quantile(all_norms, 0.99))
        if all_norms.numel() <= 16_000_000
        else float("nan"),
        "norm_max": float(all_norms.max()),
    }
