"""What the defences of one evaluation are built from: the model, the SAE, the layer and the
selection split, and what is computed from them the first time a defence asks (the refusal
direction, the data-selected features, the gate calibration).

Everything computed is recorded in :attr:`EvalSetup.info` (it becomes ``scores.json``'s
``tuning`` block), so the choices a run made can be read back.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, TextIO

from torch import Tensor

from steerlex.core.errors import EvalError
from steerlex.evaluate.config import EvalConfig
from steerlex.evaluate.sets import EvalSets
from steerlex.evaluate.tuning import (
    calibrate_gate,
    direction_fingerprint,
    gate_scores,
    refusal_direction,
    sae_fingerprint,
)
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder
from steerlex.steer.features import parse_feature_list
from steerlex.steer.select import data_scores, mean_activations
from steerlex.steer.strategies import Gate

__all__ = ["EvalSetup", "RefusalDirection", "say"]


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
    ) -> None:
        self.cfg = cfg
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

    def note_features(self, label: str, features: list[int], gate: Gate | None) -> None:
        """Record the features a defence steers (and its gate's) in ``info["features"]``."""
        self.info["features"][label] = {
            "features": features,
            "harm_features": list(gate.features) if gate else None,
        }
