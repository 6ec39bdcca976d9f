"""What the defences of one evaluation are built from: the model, the SAE, the layer and the
selection split, and what is computed from them the first time a defence asks (the refusal
direction, the data-selected features, the gate calibration, the harm probe).

Everything computed is recorded in :attr:`EvalSetup.info` (it becomes ``scores.json``'s
``tuning`` block), so the choices a run made can be read back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TextIO

from torch import Tensor

from steerlex.core.errors import EvalError
from steerlex.evaluate.cache import EvalCache
from steerlex.evaluate.config import EvalConfig
from steerlex.evaluate.ranking import (
    COMPLIANCE,
    RANK_MAX_TOKENS,
    RANK_PROMPTS,
    REFUSAL,
    rank_by_refusal,
)
from steerlex.evaluate.sets import EvalSets
from steerlex.evaluate.tuning import (
    calibrate_gate,
    direction_fingerprint,
    gate_means,
    gate_scores,
    refusal_direction,
    sae_fingerprint,
)
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder
from steerlex.steer.features import parse_feature_list
from steerlex.steer.probe import LinearProbe, fit_probe
from steerlex.steer.runtime import SteeredModel
from steerlex.steer.select import data_scores, mean_activations
from steerlex.steer.strategies import Gate, GateMode, SteeringStrategy

__all__ = ["DETECTORS", "PROBE_FILE", "EvalSetup", "RefusalDirection", "say"]

DETECTORS = ("probe", "features")
"""What a conditional defence's gate reads (``detector``): the harm probe (default) or SAE
harm features."""
PROBE_FILE = "gate_probe.safetensors"
"""Where an evaluation writes the harm probe it fitted (usable as ``steerlex generate --harm``)."""
PROBE_MAX_LENGTH = 1024
"""Tokens per prompt when fitting the probe (jailbreak templates are long)."""


def say(log: TextIO | None, msg: str) -> None:
    """Print one progress line to ``log`` (nothing when it is ``None``)."""
    if log is not None:
        print(msg, file=log, flush=True)


@dataclass(frozen=True)
class RefusalDirection:
    """``vector`` ``[d_model]`` (harmful mean − benign mean, float32), ``scale`` (the mean
    residual norm there) and ``fingerprint`` (:func:`~steerlex.evaluate.tuning.direction_fingerprint`)."""

    vector: Tensor
    scale: float
    fingerprint: str


class EvalSetup:
    """The inputs every defence kind builds its conditions from (module docstring).

    ``sae`` is ``None`` in an evaluation without SAE defences. The selection split's tuning
    prompts are ``sets.tuning["harmful"]`` / ``["benign"]``; the batch size and prompt length
    of the tuning passes come from the config.
    """

    def __init__(
        self,
        cfg: EvalConfig,
        loaded: LoadedModel,
        sae: SparseAutoencoder | None,
        layer: int,
        sets: EvalSets,
        *,
        progress: bool = True,
        log: TextIO | None = sys.stderr,
        cache: EvalCache | None = None,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self.loaded = loaded
        self.sae = sae
        self.layer = layer
        self.sets = sets
        self.progress = progress
        self.log = log
        self.info: dict[str, Any] = {"features": {}}
        self._direction: RefusalDirection | None = None
        self._data_ids: list[int] | None = None
        self._thresholds: dict[tuple[int, ...], float] = {}
        self._probe: LinearProbe | None = None

    @cached_property
    def sae_id(self) -> str | None:
        """The SAE's fingerprint (part of every SAE defence's cache key); ``None`` without one."""
        return sae_fingerprint(self.sae) if self.sae is not None else None

    def _tuning_kw(self) -> dict[str, Any]:
        """The batch size and prompt length of every tuning pass."""
        return {
            "batch_size": self.cfg.generation.batch_size,
            "max_length": self.cfg.tuning_max_length,
        }

    def _need_sae(self, what: str) -> SparseAutoencoder:
        if self.sae is None:
            raise EvalError(f"{what} needs an SAE; set 'sae' (an SAE directory of this layer).")
        return self.sae

    def refusal_direction(self) -> RefusalDirection:
        """The refusal direction on the tuning prompts (computed once)."""
        if self._direction is None:
            tuning = self.sets.tuning
            say(
                self.log,
                f"refusal direction from {len(tuning['harmful'])} harmful and "
                f"{len(tuning['benign'])} benign selection prompts at layer {self.layer}",
            )
            vec, scale = refusal_direction(
                self.loaded, self.layer, tuning["harmful"], tuning["benign"], **self._tuning_kw()
            )
            self._direction = RefusalDirection(vec, scale, direction_fingerprint(vec, scale))
            self.info["refusal_direction"] = {
                "layer": self.layer,
                "difference_norm": float(vec.norm()),
                "mean_residual_norm": scale,
                "fingerprint": self._direction.fingerprint,
                "harmful_prompts": len(tuning["harmful"]),
                "benign_prompts": len(tuning["benign"]),
            }
        return self._direction

    def data_features(self) -> list[int]:
        """The ``feature_top_n`` features most more active on harmful than on benign tuning
        prompts (computed once)."""
        if self._data_ids is None:
            sae = self._need_sae("data-selected features")
            kw = {**self._tuning_kw(), "layer": self.layer, "progress": self.progress}
            tuning = self.sets.tuning
            mh = mean_activations(self.loaded, sae, tuning["harmful"], desc="harmful", **kw)
            mb = mean_activations(self.loaded, sae, tuning["benign"], desc="benign", **kw)
            scored = sorted(data_scores(mh, mb), key=lambda f: (-f.score, f.id))
            if not scored:
                raise EvalError("No SAE feature is more active on harmful than benign prompts.")
            top = scored[: self.cfg.feature_top_n]
            self._data_ids = [f.id for f in top]
            self.info["data_features"] = {
                "ids": self._data_ids,
                "rule": "top feature_top_n by mean activation difference "
                "(harmful - benign) on the selection split's tuning prompts",
                "scores": [f.score for f in top],
            }
        return self._data_ids

    def feature_ids(
        self, spec: str | list[int] | None, what: Literal["features", "harm_features"]
    ) -> list[int]:
        """The ids of ``spec`` (ids or a ``selected_*.json``), else of the config's top-level
        ``features``/``harm_features``, else the data-selected features."""
        if spec is None:
            spec = self.cfg.features if what == "features" else self.cfg.harm_features
        if spec is None:
            return self.data_features()
        if isinstance(spec, list):
            if not spec:
                raise EvalError(f"Config key '{what}' is an empty list; give feature ids.")
            return list(spec)
        return list(parse_feature_list(spec, what=what, sae=self.sae).ids)

    def gate_threshold(self, harm: tuple[int, ...]) -> float:
        """The gate threshold from the selection split (Youden's J), once per feature set."""
        if harm not in self._thresholds:
            sae = self._need_sae("the conditional gate")
            kw = {**self._tuning_kw(), "layer": self.layer}
            tuning = self.sets.tuning
            hs = gate_scores(self.loaded, sae, tuning["harmful"], harm, **kw)
            bs = gate_scores(self.loaded, sae, tuning["benign"], harm, **kw)
            threshold, j = calibrate_gate(hs, bs)
            self._thresholds[harm] = threshold
            self.info.setdefault("gate_calibration", []).append(
                {
                    "harm_features": list(harm),
                    "threshold": threshold,
                    "youden_j": j,
                    "harmful_scores": hs,
                    "benign_scores": bs,
                    "rule": "threshold maximising TPR - FPR on the selection split's "
                    "tuning prompts (prompt-mode harm score)",
                }
            )
        return self._thresholds[harm]

    def gate(self, opts: Any) -> Gate | None:
        """The gate of a defence's options (a
        :class:`~steerlex.evaluate.defences.sae.ConditionalOptions`; ``None`` unless
        conditional): the harm probe with threshold 0 and mean pooling, or the harm features
        with the calibrated threshold and top-k pooling."""
        if not opts.conditional:
            return None
        mode: GateMode = "token" if opts.gate_mode == "token" else "prompt"
        if opts.detector == "probe":
            if opts.harm_features is not None:
                raise EvalError(
                    "harm_features is set but detector is 'probe'; set detector to "
                    "'features' to gate on them."
                )
            threshold = 0.0 if opts.gate_threshold is None else opts.gate_threshold
            return Gate((), threshold, mode, top_k=None, probe=self.harm_probe())
        harm = tuple(self.feature_ids(opts.harm_features, "harm_features"))
        threshold = opts.gate_threshold
        if threshold is None:
            threshold = self.gate_threshold(harm)
        return Gate(harm, threshold, mode)

    def harm_probe(self) -> LinearProbe:
        """The logistic harm probe of the gate (fitted once, written to ``OUT/gate_probe.safetensors``):
        the selection split's tuning harmful prompts and jailbreaks against its tuning benign
        prompts, each a mean over the gate's positions."""
        if self._probe is None:
            harmful = list(self.sets.tuning["harmful"])
            jailbreaks = [p.text for p in self.sets.of("jailbreak", "selection")]
            benign = list(self.sets.tuning["benign"])
            say(
                self.log,
                f"harm probe from {len(harmful)} harmful + {len(jailbreaks)} jailbreak vs "
                f"{len(benign)} benign selection prompts at layer {self.layer}",
            )
            kw = {"layer": self.layer, "batch_size": self.cfg.generation.batch_size,
                  "max_length": PROBE_MAX_LENGTH}  # fmt: skip
            pos = gate_means(self.loaded, harmful + jailbreaks, **kw)
            neg = gate_means(self.loaded, benign, **kw)
            probe = fit_probe(
                pos, neg, layer=self.layer, model=self.loaded.weights_id,
                model_name=self.loaded.name,
            )  # fmt: skip
            path = Path(self.cfg.out) / PROBE_FILE
            probe.save(path)
            pos_s = [float(probe.scores(x)) for x in pos]
            neg_s = [float(probe.scores(x)) for x in neg]
            self.info["harm_probe"] = {
                "file": str(path),
                "fingerprint": probe.fingerprint,
                "layer": self.layer,
                "positive_prompts": len(pos),
                "negative_prompts": len(neg),
                "fit_accuracy": (sum(s >= 0 for s in pos_s) + sum(s < 0 for s in neg_s))
                / (len(pos_s) + len(neg_s)),
                "rule": "logistic regression (L2 on standardised inputs) of mean residuals "
                "over the gate's positions: selection-split harmful prompts and jailbreaks vs "
                "benign prompts; threshold 0 (P(harmful) = 0.5)",
            }
            self._probe = probe
        return self._probe

    def ranked_features(
        self,
        label: str,
        candidates: list[int],
        strategy_of: Callable[[int], SteeringStrategy],
        strength: float,
    ) -> list[int]:
        """``candidates`` that raise the refusal margin when steered alone, best first
        (:func:`~steerlex.evaluate.ranking.rank_by_refusal`; the single best when none
        does); the measurements go to ``info["ranking"][label]``."""
        sae = self._need_sae("ranking features")
        tok = self.loaded.tokenizer
        prompts = [  # short ones: HarmBench's contextual behaviours run to 1,000 tokens
            t
            for t in self.sets.tuning["harmful"]
            if len(tok(t, add_special_tokens=False)["input_ids"]) <= RANK_MAX_TOKENS
        ] or list(self.sets.tuning["harmful"])
        say(
            self.log,
            f"{label}: ranking {len(candidates)} candidate features by their effect on refusal "
            f"over {min(len(prompts), RANK_PROMPTS)} harmful selection prompts",
        )
        steered = SteeredModel(self.loaded, sae, None, layer=self.layer, enabled=True)
        effects, base = rank_by_refusal(
            steered, candidates, strategy_of, prompts,
            batch_size=self.cfg.generation.batch_size, progress=self.progress,
            cache=self.cache, context={"sae": self.sae_id, "layer": self.layer},
        )  # fmt: skip
        kept = [e.id for e in effects if e.effect > 0] or [effects[0].id]
        self.info.setdefault("ranking", {})[label] = {
            "candidates": list(candidates),
            "effects": {str(e.id): e.effect for e in effects},
            "kept": kept,
            "strength": strength,
            "unsteered_margin": base,
            "rule": f"each candidate alone at strength {strength:g}: mean change of log "
            f"P({REFUSAL!r}) - log P({COMPLIANCE!r}) over the selection split's first "
            f"{RANK_PROMPTS} harmful tuning prompts of at most {RANK_MAX_TOKENS} tokens; kept if "
            "positive, best first",
        }
        return kept

    def note_features(self, label: str, features: list[int], gate: Gate | None) -> None:
        """Record the features a defence steers (and its gate's) in ``info["features"]``."""
        self.info["features"][label] = {
            "features": features,
            "harm_features": list(gate.features) if gate and gate.probe is None else None,
            "gate": gate.describe() if gate else None,
        }
