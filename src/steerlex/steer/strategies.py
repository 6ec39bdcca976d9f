"""Steering strategies: pure edits of the residual stream, through an SAE's features or along
a dense direction.

A strategy maps ``(h [B, T, d], sae, mask [B, T] bool)`` to a new ``h`` of the same shape, dtype
and device. The feature set and the parameters live in the (frozen) strategy object; nothing else
is read or kept, so the same call with the same inputs always gives the same output. The SAE
strategies (:class:`SAEFeatureStrategy`: Amplification, Calibration, Clamp, Ablate) need the SAE
their feature ids belong to; :class:`DenseDirection` needs none (``sae`` may be ``None``).

Shared promises:

- **Masked positions are untouched.** Where ``mask`` is False the output is bit-identical to
  ``h``. The runtime uses the mask to keep left padding and the chat-template prefix (BOS, system
  prompt, role header) out: those positions carry massive activations the SAE never saw.
- **The SAE's reconstruction error is kept.** An edit only *adds* to ``h``: feature directions
  (Amplification, Calibration), ``decode(edited) - decode(original)`` (Clamp, Ablate) or a fixed
  direction (DenseDirection). ``h`` is never replaced by the SAE's reconstruction.
- **Work happens in the SAE's dtype** (usually float32) and the result is cast back to ``h``'s.

Units. ``alpha`` (Amplification) is a length in the raw residual space: ``alpha`` times a sum of
*unit* decoder directions is added. ``target`` (Calibration) and ``value`` (Clamp) are SAE
activation levels: they move along the raw-space decoder rows ``W_dec[s] / norm_scale``, so that
adding ``c`` times a row raises the decoded latent ``s`` by ``c`` — exactly what
``decode(a + c e_s) - decode(a)`` adds.

Conditional steering. Amplification and Calibration take an optional :class:`Gate`: a set of
*harm* features and a threshold. ``mode="prompt"`` decides once per sequence, from the prompt's
editable positions; ``mode="token"`` decides at every position. A closed gate leaves the
positions untouched.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from steerlex.core.errors import SteeringError
from steerlex.sae.base import SparseAutoencoder
from steerlex.steer.probe import LinearProbe

__all__ = [
    "DEFAULT_GATE_THRESHOLD",
    "DEFAULT_TARGET",
    "GATE_MODES",
    "GATE_TOP_K",
    "STRATEGY_NAMES",
    "Ablate",
    "Amplification",
    "Calibration",
    "Clamp",
    "DenseDirection",
    "Gate",
    "GateMode",
    "SAEFeatureStrategy",
    "SteeringError",
    "SteeringStrategy",
    "check_feature_ids",
    "feature_pre_acts",
    "make_strategy",
]

DEFAULT_TARGET = 2.5
"""Calibration's target activation level ``m`` (the value in the paper authors' code)."""

DEFAULT_GATE_THRESHOLD = 0.1
"""The conditional gate opens when the harm features' mean positive activation reaches this
(the authors' gate)."""

GateMode = Literal["prompt", "token"]
GATE_MODES: tuple[GateMode, ...] = ("prompt", "token")
GATE_TOP_K = 8
"""Prompt-mode pooling: the harm score of a prompt is the mean of its ``GATE_TOP_K``
highest-scoring positions (benchmarks/detectors.py: inside jailbreak templates the mean over
every position is blind, AUROC 0.41; the top 8 reach 0.998)."""


# --- validation helpers ------------------------------------------------------------------------


def _feature_ids(features: Iterable[Any], what: str) -> tuple[int, ...]:
    if isinstance(features, (str, bytes)):
        raise SteeringError(
            f"{what} must be a sequence of feature ids (ints), got the string {features!r}; "
            "parse comma-separated ids first, e.g. [3, 17, 42]."
        )
    try:
        items = list(features)
    except TypeError:
        raise SteeringError(
            f"{what} must be a sequence of feature ids (ints), got {type(features).__name__}."
        ) from None
    if not items:
        raise SteeringError(f"{what} is empty; give at least one feature id.")
    out: list[int] = []
    for f in items:
        if isinstance(f, (bool, float)):
            fid = None
        else:
            try:
                fid = operator.index(f)
            except TypeError:
                fid = None
        if fid is None:
            raise SteeringError(
                f"{what} must hold integer feature ids, got {f!r} ({type(f).__name__})."
            )
        if fid < 0:
            raise SteeringError(f"{what} holds the negative id {fid}; feature ids are >= 0.")
        out.append(fid)
    dupes = sorted({f for f in out if out.count(f) > 1})
    if dupes:
        raise SteeringError(f"{what} lists feature id(s) {dupes} more than once; list each once.")
    return tuple(out)


def _finite(value: Any, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SteeringError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    v = float(value)
    if not math.isfinite(v):
        raise SteeringError(f"{name} must be a finite number, got {v}.")
    if positive and v <= 0:
        raise SteeringError(f"{name} must be > 0, got {v}.")
    if nonnegative and v < 0:
        raise SteeringError(f"{name} must be >= 0, got {v}.")
    return v


def _check_in_range(features: Sequence[int], sae: SparseAutoencoder, what: str) -> None:
    bad = [f for f in features if f >= sae.d_sae]
    if bad:
        raise SteeringError(
            f"{what} holds id(s) {bad[:5]} out of range for this SAE with d_sae={sae.d_sae}; "
            f"valid ids are 0..{sae.d_sae - 1}. Was the feature list made for another SAE?"
        )


def check_feature_ids(
    features: Iterable[Any], sae: SparseAutoencoder | None, what: str
) -> tuple[int, ...]:
    """``features`` as ids, checked as a strategy checks them when it is built: integers,
    none negative, each once, and (with ``sae``) each below its ``d_sae``; a SteeringError
    names ``what`` otherwise. For checking a config before any model is loaded."""
    ids = _feature_ids(features, what)
    if sae is not None:
        _check_in_range(ids, sae, what)
    return ids


def _check_call(h: Tensor, mask: Tensor, width: int, what: str) -> None:
    if h.dim() != 3 or h.shape[-1] != width:
        raise SteeringError(
            f"a strategy takes h of shape [batch, seq, {width}] ({what}), got {tuple(h.shape)}."
        )
    if mask.shape != h.shape[:2] or mask.dtype != torch.bool:
        raise SteeringError(
            f"mask must be a bool tensor of shape {tuple(h.shape[:2])} [batch, seq], got "
            f"{mask.dtype} of shape {tuple(mask.shape)}."
        )


# --- SAE views --------------------------------------------------------------------------------


def feature_pre_acts(sae: SparseAutoencoder, h: Tensor, features: Sequence[int]) -> Tensor:
    """Encoder pre-activations ``[..., len(features)]`` of raw ``h [..., d_in]`` for ``features``.

    The same numbers as ``sae.pre_acts(h)[..., features]`` (``(s*h - b_dec) W_enc[:, S] +
    b_enc[S]``), computed for the selected columns only. Returned in the SAE's dtype.
    """
    idx = torch.as_tensor(list(features), device=sae.W_enc.device, dtype=torch.long)
    w = sae.W_enc.index_select(1, idx)
    b = sae.b_enc.index_select(0, idx)
    if sae.cfg.apply_b_dec_to_input:
        b = b - sae.b_dec @ w
    x = h.to(device=w.device, dtype=w.dtype) * sae.cfg.norm_scale
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], len(features))


def _decoder_rows(sae: SparseAutoencoder, features: Sequence[int]) -> Tensor:
    """Raw-space decoder rows ``W_dec[S] / norm_scale``: ``[len(S), d_in]``."""
    idx = torch.as_tensor(list(features), device=sae.W_enc.device, dtype=torch.long)
    return sae.W_dec.index_select(0, idx) / sae.cfg.norm_scale


def _unit_rows(sae: SparseAutoencoder, features: Sequence[int]) -> Tensor:
    """Unit-norm decoder directions of ``features`` in raw space: ``[len(S), d_in]``."""
    rows = _decoder_rows(sae, features)
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _keep_norm(edited: Tensor, original: Tensor) -> Tensor:
    """``edited`` rescaled to ``original``'s norm at each position (zero vectors stay as they are)."""
    new = edited.norm(dim=-1, keepdim=True)
    scale = torch.where(new > 0, original.norm(dim=-1, keepdim=True) / new.clamp_min(1e-12), 1.0)
    return edited * scale


def _merge(h: Tensor, edited: Tensor, mask: Tensor) -> Tensor:
    """``edited`` where ``mask``, ``h`` itself (bit-identical) elsewhere; in ``h``'s dtype."""
    return torch.where(mask.unsqueeze(-1), edited.to(h.dtype), h)


# --- the conditional gate ---------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """Steer only where the *harm* features fire (or a harm probe does).

    The harm score of a position is the mean over ``features`` of ``relu(pre-activation)``;
    with a ``probe`` (:class:`~steerlex.steer.probe.LinearProbe`, and no features) it is the
    probe's logit, which needs no SAE and may be negative (``threshold`` 0: "harmful" more
    likely than not; use ``top_k=None``, the mean the probe was fitted on).

    - ``mode="prompt"``: the gate of a sequence opens when the prompt's harm score is
      ``>= threshold``: the mean over its :data:`GATE_TOP_K` highest-scoring editable positions
      (``top_k=None``: over every editable position, the gate before issue 13); the runtime
      decides once, after prefill, and keeps the decision for every decoding step of that
      sequence.
    - ``mode="token"``: the gate opens at each position whose own harm score is ``>= threshold``
      (prompt positions and every decoding step).

    ``threshold`` defaults to 0.1, the paper authors' gate.
    """

    features: tuple[int, ...]
    threshold: float = DEFAULT_GATE_THRESHOLD
    mode: GateMode = "prompt"
    top_k: int | None = GATE_TOP_K
    probe: LinearProbe | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) < 1):
            raise SteeringError(
                f"gate top_k must be a positive integer or None, got {self.top_k!r}."
            )
        if self.probe is not None:
            if tuple(self.features):
                raise SteeringError("a gate reads harm features or a harm probe, not both.")
            object.__setattr__(self, "features", ())
            object.__setattr__(self, "threshold", _finite(self.threshold, "harm threshold"))
        else:
            object.__setattr__(self, "features", _feature_ids(self.features, "harm features"))
            object.__setattr__(
                self, "threshold", _finite(self.threshold, "harm threshold", nonnegative=True)
            )
        if self.mode not in GATE_MODES:
            raise SteeringError(
                f"gate mode must be one of {', '.join(GATE_MODES)}, got {self.mode!r}."
            )

    @property
    def needs_sae(self) -> bool:
        """Whether the harm score reads SAE features (a probe gate needs no SAE)."""
        return self.probe is None

    def describe(self) -> str:
        """E.g. ``prompt top-8 >= 0.1 on 10 harm features`` or ``prompt mean >= 0 on probe ...``."""
        pool = ""
        if self.mode == "prompt":
            pool = " mean" if self.top_k is None else f" top-{self.top_k}"
        on = (
            f"harm probe {self.probe.fingerprint[7:19]}"
            if self.probe is not None
            else f"{len(self.features)} harm features"
        )
        return f"{self.mode}{pool} >= {self.threshold:g} on {on}"

    def check(self, sae: SparseAutoencoder | None) -> None:
        if self.probe is not None:
            if sae is not None and sae.d_in != self.probe.d_model:
                raise SteeringError(
                    f"the gate's harm probe has width {self.probe.d_model} but the SAE's d_in "
                    f"is {sae.d_in}; fit the probe on the SAE's layer."
                )
            return
        if sae is None:
            raise SteeringError("a gate on harm features needs the SAE they belong to.")
        _check_in_range(self.features, sae, "harm features")

    def scores(self, h: Tensor, sae: SparseAutoencoder | None) -> Tensor:
        """Harm score ``[B, T]`` of every position (SAE dtype; float32 for a probe)."""
        if self.probe is not None:
            return self.probe.scores(h)
        assert sae is not None  # check() refuses a feature gate without an SAE
        return F.relu(feature_pre_acts(sae, h, self.features)).mean(dim=-1)

    def prompt_score(self, h: Tensor, sae: SparseAutoencoder | None, mask: Tensor) -> Tensor:
        """Harm score ``[B]`` of each row: the mean over its ``top_k`` highest-scoring
        ``mask`` positions (all of them when it has fewer, or when ``top_k`` is ``None``);
        0 for a row with none."""
        s = self.scores(h, sae)
        m = mask.to(s.dtype)
        if self.top_k is None:
            return (s * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        k = min(int(self.top_k), s.shape[1])
        vals = s.masked_fill(~mask.bool(), float("-inf")).topk(k, dim=1).values
        valid = torch.isfinite(vals)
        return vals.where(valid, 0.0).sum(dim=1) / valid.sum(dim=1).clamp_min(1).to(s.dtype)

    def prompt_gate(self, h: Tensor, sae: SparseAutoencoder | None, mask: Tensor) -> Tensor:
        """``[B]`` bool: the prompt-mode decision for each row (closed if it has no position)."""
        return (self.prompt_score(h, sae, mask) >= self.threshold) & mask.any(dim=1)

    def token_gate(self, h: Tensor, sae: SparseAutoencoder | None) -> Tensor:
        """``[B, T]`` bool: the token-mode decision at each position."""
        return self.scores(h, sae) >= self.threshold


# --- strategies -------------------------------------------------------------------------------


class SteeringStrategy:
    """Base of every strategy: frozen parameters, applied by ``__call__``.

    ``features`` are the SAE features a strategy steers (empty for one that needs no SAE) and
    ``gate`` its conditional gate (``None``: always on); the runtime watches both for its
    reports. ``needs_sae``: whether ``__call__`` needs the SAE the feature ids belong to.
    """

    name: ClassVar[str] = "strategy"
    strength_name: ClassVar[str] = "strength"
    needs_sae: ClassVar[bool] = False

    features: tuple[int, ...] = ()
    gate: Gate | None = None

    # Subclasses override these.
    def _edit(
        self, h: Tensor, sae: SparseAutoencoder | None, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(edited h in the working dtype, positions actually edited [B, T])``."""
        raise NotImplementedError

    def _width(self, sae: SparseAutoencoder | None) -> tuple[int, str]:
        """The residual width ``h`` must have, and what fixes it (for messages)."""
        raise NotImplementedError

    @property
    def strength(self) -> float:
        """The main knob: Amplification's alpha, Calibration's target, Clamp's value."""
        raise NotImplementedError

    def with_strength(self, value: float) -> SteeringStrategy:
        """A copy with another :attr:`strength`."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line, e.g. ``calibrate target=2.5 on 12 features, gate prompt top-8 >= 0.1 on 4``."""
        out = f"{self.name} {self.strength_name}={self.strength:g} on {len(self.features)} features"
        if self.gate is not None:
            out += f", gate {self.gate.describe()}"
        return out

    def check(self, sae: SparseAutoencoder | None, d_model: int | None = None) -> None:
        """Raise :class:`SteeringError` unless the strategy can run with ``sae`` (``None``: no
        SAE) on a residual stream of width ``d_model`` (``None``: not checked)."""
        raise NotImplementedError

    def __call__(
        self,
        h: Tensor,
        sae: SparseAutoencoder | None,
        mask: Tensor,
        *,
        gate_open: Tensor | None = None,
    ) -> Tensor:
        """The edited ``h`` (same shape/dtype/device); masked positions bit-identical.

        ``gate_open`` (``[B]`` bool, prompt-mode gate only) is a decision already taken for
        each row, e.g. at prefill; without it a prompt-mode gate decides from ``h`` at the
        ``mask`` positions. A token-mode gate always decides per position from ``h``.
        """
        _check_call(h, mask, *self._width(sae))
        self.check(sae)
        gate = self.gate
        if gate is not None:
            if gate.mode == "token":
                mask = mask & gate.token_gate(h, sae).to(mask.device)
            else:
                rows = gate.prompt_gate(h, sae, mask) if gate_open is None else gate_open
                if rows.shape != (h.shape[0],):
                    raise SteeringError(
                        f"gate_open must be a [batch] bool tensor of shape ({h.shape[0]},), got "
                        f"{tuple(rows.shape)}."
                    )
                mask = mask & rows.to(mask.device).unsqueeze(1)
        edited, where = self._edit(h, sae, mask)
        return _merge(h, edited, mask & where)


@dataclass(frozen=True)
class SAEFeatureStrategy(SteeringStrategy):
    """A strategy that edits through the features ``features`` of an SAE (which it needs)."""

    needs_sae: ClassVar[bool] = True

    features: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", _feature_ids(self.features, "features"))

    def _edit(
        self, h: Tensor, sae: SparseAutoencoder | None, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self._edit_features(h, self._sae(sae), mask)

    def _edit_features(
        self, h: Tensor, sae: SparseAutoencoder, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(edited h in the SAE's dtype, positions actually edited [B, T])``."""
        raise NotImplementedError

    def _sae(self, sae: SparseAutoencoder | None) -> SparseAutoencoder:
        if sae is None:
            raise SteeringError(
                f"the {self.name} strategy steers SAE features and needs the SAE they belong "
                "to; pass sae= (the CLI: --sae)."
            )
        return sae

    def _width(self, sae: SparseAutoencoder | None) -> tuple[int, str]:
        return self._sae(sae).d_in, "the SAE's d_in"

    def check(self, sae: SparseAutoencoder | None, d_model: int | None = None) -> None:
        """Raise :class:`SteeringError` unless there is an SAE and every feature id exists in
        it (``d_model`` is the SAE's business: :func:`~steerlex.sae.compat.check_sae_fits`)."""
        sae = self._sae(sae)
        _check_in_range(self.features, sae, "features")
        if self.gate is not None:
            self.gate.check(sae)


@dataclass(frozen=True)
class Amplification(SAEFeatureStrategy):
    """Push the chosen features up: ``h + alpha * sum_s w_s * d_s`` at every editable position.

    ``d_s`` is the unit decoder direction of feature ``s`` in raw space, ``w_s`` its weight (1 by
    default), ``alpha`` a length in residual units (negative pushes down; 0 is the identity).
    ``keep_norm`` rescales each edited position back to its original norm.
    """

    name: ClassVar[str] = "amplify"
    strength_name: ClassVar[str] = "alpha"

    alpha: float = 1.0
    weights: tuple[float, ...] | None = None
    keep_norm: bool = False
    gate: Gate | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "alpha", _finite(self.alpha, "alpha"))
        if self.weights is not None:
            weights = tuple(_finite(w, "each feature weight") for w in self.weights)
            if len(weights) != len(self.features):
                raise SteeringError(
                    f"weights has {len(weights)} entries but there are {len(self.features)} "
                    "features; give one weight per feature, or none for equal weights."
                )
            object.__setattr__(self, "weights", weights)

    @property
    def strength(self) -> float:
        return self.alpha

    def with_strength(self, value: float) -> Amplification:
        return replace(self, alpha=value)

    def _edit_features(
        self, h: Tensor, sae: SparseAutoencoder, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.alpha == 0.0:  # exactly the identity, also with keep_norm
            return h, torch.zeros_like(mask)
        dirs = _unit_rows(sae, self.features)
        if self.weights is not None:
            dirs = dirs * torch.tensor(self.weights, dtype=dirs.dtype, device=dirs.device)[:, None]
        x = h.to(device=dirs.device, dtype=dirs.dtype)
        edited = x + self.alpha * dirs.sum(dim=0)
        if self.keep_norm:
            edited = _keep_norm(edited, x)
        return edited.to(h.device), torch.ones_like(mask)


@dataclass(frozen=True)
class Calibration(SAEFeatureStrategy):
    """Raise the chosen features towards level ``target`` (the paper authors' rule).

    With ``a_S`` the features' encoder pre-activations at a position:
    ``v = relu(target - relu(a_S))``; ``h~ = h + target * sum_s (v_s / sum v) * d_s`` with
    ``d_s`` the raw-space decoder row; with ``keep_norm`` (default) ``h' = h~ * |h| / |h~|``.
    Positions where every feature already reaches ``target`` (``sum v = 0``) are left as they are.
    """

    name: ClassVar[str] = "calibrate"
    strength_name: ClassVar[str] = "target"

    target: float = DEFAULT_TARGET
    keep_norm: bool = True
    gate: Gate | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "target", _finite(self.target, "target", positive=True))

    @property
    def strength(self) -> float:
        return self.target

    def with_strength(self, value: float) -> Calibration:
        return replace(self, target=value)

    def _edit_features(
        self, h: Tensor, sae: SparseAutoencoder, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        a = feature_pre_acts(sae, h, self.features)  # [B, T, S]
        v = F.relu(self.target - F.relu(a))
        total = v.sum(dim=-1, keepdim=True)
        needed = total.squeeze(-1) > 0
        share = v / total.clamp_min(torch.finfo(v.dtype).tiny)  # 0 where total == 0: no NaN
        rows = _decoder_rows(sae, self.features)
        x = h.to(device=rows.device, dtype=rows.dtype)
        edited = x + self.target * (share @ rows)
        if self.keep_norm:
            edited = _keep_norm(edited, x)
        return edited.to(h.device), needed.to(mask.device)


@dataclass(frozen=True)
class Clamp(SAEFeatureStrategy):
    """Set the chosen features' SAE activations to ``value``: ``h + sum_s (value - a_s) W_dec[s]``.

    ``a_s`` is the SAE's actual activation (after TopK for a TopK SAE; ``W_dec`` in raw space), so
    the added vector is ``decode(edited) - decode(original)`` restricted to the features and the
    reconstruction error stays in ``h``.
    """

    name: ClassVar[str] = "clamp"
    strength_name: ClassVar[str] = "value"

    value: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "value", _finite(self.value, "clamp value"))

    @property
    def strength(self) -> float:
        return self.value

    def with_strength(self, value: float) -> Clamp:
        return replace(self, value=value)

    def _edit_features(
        self, h: Tensor, sae: SparseAutoencoder, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(list(self.features), device=sae.W_enc.device, dtype=torch.long)
        a = sae.encode(h.to(sae.W_enc.device)).index_select(-1, idx)  # [B, T, S]
        rows = _decoder_rows(sae, self.features)
        x = h.to(device=rows.device, dtype=rows.dtype)
        edited = x + (self.value - a) @ rows
        return edited.to(h.device), torch.ones_like(mask)


@dataclass(frozen=True)
class Ablate(Clamp):
    """Switch the chosen features off: :class:`Clamp` to 0."""

    name: ClassVar[str] = "ablate"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.value != 0.0:
            raise SteeringError(f"Ablate always clamps to 0, got value={self.value}; use Clamp.")

    def with_strength(self, value: float) -> Clamp:
        raise SteeringError("Ablate has no strength to set; use Clamp(features, value) instead.")

    def describe(self) -> str:
        return f"ablate {len(self.features)} features"


@dataclass(frozen=True)
class DenseDirection(SteeringStrategy):
    """Add ``alpha * scale * u`` at every editable position, ``u`` the unit ``direction``.

    Needs no SAE (unless its ``gate`` reads SAE features) and steers no SAE features; a
    conditional one takes a :class:`Gate`, typically a harm probe. ``direction``
    (``[d_model]``, any norm) is, for
    the refusal-direction baseline, the difference of mean layer-L activations (harmful −
    benign prompts, :func:`steerlex.evaluate.tuning.refusal_direction`) and ``scale`` the mean
    residual norm there, so ``alpha`` is a fraction of a typical residual vector's length.
    The sum is done in float32 and cast back to ``h``'s dtype.
    """

    name: ClassVar[str] = "dense"
    strength_name: ClassVar[str] = "alpha"

    direction: Tensor = field(compare=False, repr=False)
    scale: float = 1.0
    alpha: float = 0.0
    gate: Gate | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.direction, Tensor) or self.direction.dim() != 1:
            raise SteeringError("DenseDirection needs a 1-d direction tensor [d_model].")
        unit = self.direction.detach().float().cpu()
        norm = float(unit.norm())
        if not norm > 0:
            raise SteeringError("the refusal direction is zero; the two prompt groups agree.")
        object.__setattr__(self, "direction", unit / norm)

    @property
    def strength(self) -> float:
        return self.alpha

    def with_strength(self, value: float) -> DenseDirection:
        return replace(self, alpha=float(value))

    def describe(self) -> str:
        out = f"dense alpha={self.alpha:g} x mean residual norm {self.scale:.3g}"
        return out + (f", gate {self.gate.describe()}" if self.gate is not None else "")

    def _width(self, sae: SparseAutoencoder | None) -> tuple[int, str]:
        return self.direction.shape[0], "the direction's width"

    def check(self, sae: SparseAutoencoder | None, d_model: int | None = None) -> None:
        """Raise :class:`SteeringError` unless the direction has the residual width (``d_model``
        and, when given, the SAE's ``d_in``)."""
        width = self.direction.shape[0]
        for other in (d_model, sae.d_in if sae is not None else None):
            if other is not None and width != other:
                raise SteeringError(
                    f"the direction has width {width} but the layer has {other}; compute it "
                    "on this model's layer."
                )
        if self.gate is not None:
            self.gate.check(sae)
            probe = self.gate.probe
            if probe is not None and probe.d_model != width:
                raise SteeringError(
                    f"the gate's harm probe has width {probe.d_model} but the direction "
                    f"{width}; fit both on the same layer."
                )

    def _edit(
        self, h: Tensor, sae: SparseAutoencoder | None, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.alpha == 0.0:
            return h, torch.zeros_like(mask)
        add = (self.alpha * self.scale) * self.direction.to(device=h.device, dtype=torch.float32)
        return (h.float() + add).to(h.device), torch.ones_like(mask)


STRATEGY_NAMES: tuple[str, ...] = ("amplify", "calibrate", "clamp", "ablate")
"""The SAE strategies :func:`make_strategy` builds by name (the CLI's ``--strategy``)."""


def make_strategy(
    name: str,
    features: Sequence[int],
    *,
    alpha: float | None = None,
    target: float | None = None,
    value: float | None = None,
    keep_norm: bool | None = None,
    gate: Gate | None = None,
) -> SAEFeatureStrategy:
    """Build an SAE strategy by name (``amplify``, ``calibrate``, ``clamp``, ``ablate``).

    Parameters that do not apply to the strategy raise :class:`SteeringError` (so a typo in a
    config does not pass silently); unset ones take the strategy's defaults.
    """
    given = {
        "alpha": alpha,
        "target": target,
        "value": value,
        "keep_norm": keep_norm,
        "gate": gate,
    }
    allowed = {
        "amplify": {"alpha", "keep_norm", "gate"},
        "calibrate": {"target", "keep_norm", "gate"},
        "clamp": {"value"},
        "ablate": set(),
    }
    if name not in allowed:
        raise SteeringError(
            f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}."
        )
    extra = sorted(k for k, v in given.items() if v is not None and k not in allowed[name])
    if extra:
        raise SteeringError(
            f"strategy {name!r} does not take {', '.join(extra)}; it takes "
            f"{', '.join(sorted(allowed[name])) or 'no parameters'}."
        )
    kw: dict[str, Any] = {k: v for k, v in given.items() if v is not None and k != "gate"}
    feats = tuple(features)
    if name == "amplify":
        return Amplification(feats, gate=gate, **kw)
    if name == "calibrate":
        return Calibration(feats, gate=gate, **kw)
    if name == "clamp":
        return Clamp(feats, **kw)
    return Ablate(feats)
