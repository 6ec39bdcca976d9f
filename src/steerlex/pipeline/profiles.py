"""The built-in profiles of ``steerlex run`` (and of ``steerlex eval --profile``, which
takes a profile's ``eval`` section): plain config objects in the run config's layout,
each on top of the stages' own defaults. One table; nothing else names a profile's
values."""

from __future__ import annotations

import json
from typing import Any

from steerlex.core.config import merge
from steerlex.models.embedded import SMALL_MODEL

__all__ = ["PROFILES", "profile"]

_DEFAULT: dict[str, Any] = {
    # The README's main job: the default model on 2 CPU cores (see docs/results.md for
    # the measured wall time).
    "name": "default",
    "layer": 8,
    # Every text of the sets whose texts are long enough to be cheap per token (a short
    # request costs the chat template's ~30 prefix tokens for its ~20 stored ones), stored
    # as float16; a 4,096-latent SAE on about seven passes over them.
    # The model runs in bfloat16 where it only reads activations or writes replies (harvest,
    # eval): 2.2x faster on the long texts on a CPU with avx512_bf16, at a squared error of
    # 1e-4 of the activations' variance (docs/results.md); the explanation stages and the
    # judge stay float32.
    "harvest": {
        "sources": ["benign", "harmbench", "strongreject", "jailbreak-wild", "dan"],
        "limit": None,
        "max_length": 384,
        "dtype": "float16",
        "model_dtype": "bfloat16",
    },
    "train_sae": {
        "d_sae": 4096,
        "k": 32,
        "tokens": 1638400,
        "lr": 1e-3,  # 5e-4 gave held-out FVE 0.849, 1e-3 0.866 on the same store (results.md)
        "warmup_steps": 25,
        "batch_size": 1024,
    },
    "eval_sae": {"max_lm_texts": 16},
    "explain_metrics": {"features": 48, "strengths": [1.0]},
    "select": {"safety": {"top_n": 10}, "harm": {"top_n": 10}},
    "eval": {
        "dtype": "bfloat16",
        "sets": {
            "n_jailbreak": 24,
            "n_harmful": 12,
            "n_benign": 24,
            "n_selection": 8,
            "n_tuning": 32,
        },
        "generation": {"max_new_tokens": 32, "batch_size": 8},
        # One strength each (no tuning generations), where the full-size run
        # (docs/results.md, "A defence built on the probe gate") saw the defences act; the
        # arms that did nothing there (amplify 3, dense-conditional) are left to that run.
        "defences": [
            {"kind": "none"},
            {"kind": "dense", "strengths": [0.2]},
            {"kind": "amplify", "strengths": [1.5]},
            {"kind": "amplify", "name": "amplify-data", "strengths": [1.0], "features": "data"},
            # gated by the harm probe: the explanation-selected features that raise refusal
            # when measured one by one
            {
                "kind": "amplify",
                "name": "amplify-ranked-conditional",
                "conditional": True,
                "rank": True,
                "strengths": [3.0],
            },
        ],
    },
}

_QUICK: dict[str, Any] = merge(
    _DEFAULT,
    {
        # The whole chain on the small packaged model in a few minutes (what CI runs).
        "name": "quick",
        "model": SMALL_MODEL,
        "layer": 10,
        # float32 throughout: the 135M model is quick anyway, and one model load serves
        # every stage
        "harvest": {
            "sources": ["benign", "harmbench"],
            "limit": 48,
            "max_length": 96,
            "model_dtype": "float32",
        },
        "train_sae": {"d_sae": 512, "k": 16, "tokens": 32768, "batch_size": 256, "lr": 5e-4},
        "eval_sae": {"max_lm_texts": 4},
        "explain": {"vocab_size": 1000},
        "explain_metrics": {"features": 4, "levels": False},
        "select": {"safety": {"top_n": 4}, "harm": {"top_n": 4}},
        "features": {"top_contexts": 4},
        "examples": {"n": 2},
        "eval": {
            "dtype": "float32",
            "sets": {
                "n_jailbreak": 4,
                "n_harmful": 4,
                "n_benign": 4,
                "n_selection": 2,
                "n_tuning": 8,
                "template_budget": 96,
            },
            "generation": {"max_new_tokens": 8, "batch_size": 8},
            # the rules judge: the default judge runs the default model, a second load here
            "judge": {"name": "rules"},
            "defences": [
                {"kind": "none"},
                {"kind": "dense", "strengths": [0.2]},
                {"kind": "amplify", "strengths": [2.0]},
                {"kind": "calibrate", "conditional": True, "strengths": [5.0]},
            ],
        },
    },
)

_SMOKE: dict[str, Any] = merge(
    _QUICK,
    {
        # Checks that everything runs: the quick chain with the two defences that need no
        # SAE features; as `steerlex eval --profile smoke`, a few prompts and 8 tokens.
        "name": "smoke",
        "examples": {"defence": "dense"},
        "eval": {
            "sets": {"template_budget": 384},
            "defences": [{"kind": "none"}, {"kind": "dense", "strengths": [0.2]}],
        },
    },
)

PROFILES: dict[str, dict[str, Any]] = {"default": _DEFAULT, "quick": _QUICK, "smoke": _SMOKE}


def profile(name: str) -> dict[str, Any]:
    """A fresh copy of the profile ``name`` (KeyError when there is none)."""
    return json.loads(json.dumps(PROFILES[name]))
