"""Generate and chat with a steered model.

:class:`SteeredModel` wraps a :class:`~steerlex.models.loading.LoadedModel`, an SAE trained on one
of its layers (optional: a dense direction needs none) and a
:class:`~steerlex.steer.strategies.SteeringStrategy`. Each ``generate`` /
``chat`` call installs one scoped hook on that layer (removed when the call returns) that

- edits the layer's output at prefill and at every decoding step (KV cache included);
- never edits left padding or the chat-template prefix before the user's text (BOS, system
  prompt, role header); at decoding steps every row's new token is editable;
- takes a prompt-mode gate decision once per sequence at prefill and keeps it for the call;
- records what the selected and harm features did, for the :class:`SteeringReport`.

All state of a call lives in that call: requests never influence each other.

Activations in reports are ``relu`` of the SAE encoder pre-activation of each feature — what
Calibration and the gate read. TopK is not applied, so a feature may show a small positive value
without being among the ``k`` latents the SAE would keep.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from steerlex.core.errors import SteeringError
from steerlex.models.chat import (
    EncodedPrompt,
    check_text,
    encode_prompt,
    has_chat_template,
    left_padded,
)
from steerlex.models.hooks import check_layer, decoder_layers, edit_residual, residual_width
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder
from steerlex.sae.compat import check_sae_fits
from steerlex.steer.strategies import SteeringStrategy, feature_pre_acts

__all__ = [
    "ROLES",
    "ActivityStats",
    "FeatureActivity",
    "SteeredModel",
    "SteeredResponse",
    "SteeringReport",
    "TokenLogprob",
    "encode_chat",
]

ROLES: tuple[str, ...] = ("system", "user", "assistant")
_SENTINEL = "\u2063STEERLEX\u2063"


# --- reports ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivityStats:
    """Max and mean activation of one feature over a set of positions (0 and 0 when empty)."""

    max: float
    mean: float


@dataclass(frozen=True)
class FeatureActivity:
    """What one feature did in one response.

    ``prompt``/``generated``: the model's own activation at the layer, *before* the edit, over
    the prompt's editable positions and over the generated tokens fed back into the model (every
    generated token but the last). ``prompt_steered``/``generated_steered``: the same after the
    edit (equal to the former when steering is off or nothing was edited).
    """

    feature: int
    role: Literal["selected", "harm"]
    prompt: ActivityStats
    generated: ActivityStats
    prompt_steered: ActivityStats
    generated_steered: ActivityStats

    @property
    def fired(self) -> bool:
        """Whether the feature was active (> 0) anywhere, before or after the edit."""
        return max(s.max for s in self._all()) > 0

    def _all(self) -> tuple[ActivityStats, ...]:
        return (self.prompt, self.generated, self.prompt_steered, self.generated_steered)


@dataclass(frozen=True)
class SteeringReport:
    """Why a reply is what it is: what was steered, whether the gate opened, what fired.

    ``gate_open`` is the prompt-mode decision (token mode: whether any position opened; ``None``
    without a condition). ``harm_score`` is the mean harm score over the prompt's editable
    positions, compared with ``threshold`` in prompt mode (also given in token mode, for
    information). With steering off the gate is still evaluated (what it *would* have done) and
    nothing is edited.
    """

    strategy: str
    steered: bool
    gate_mode: str | None
    gate_open: bool | None
    harm_score: float | None
    threshold: float | None
    prompt_positions: int
    edited_prompt_positions: int
    generated_positions: int
    edited_generated_positions: int
    features: tuple[FeatureActivity, ...]

    def fired(self, role: str | None = None) -> list[FeatureActivity]:
        """Features that fired, strongest (by max activation anywhere) first."""
        out = [f for f in self.features if f.fired and (role is None or f.role == role)]
        return sorted(out, key=lambda f: -max(s.max for s in f._all()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self, limit: int = 8, labels: Mapping[int, str] | None = None) -> list[str]:
        """A short human-readable account: the steering line, the gate line, fired features."""
        state = "on" if self.steered else "off"
        out = [
            f"steering {state}: {self.strategy}; edited {self.edited_prompt_positions}/"
            f"{self.prompt_positions} prompt and {self.edited_generated_positions}/"
            f"{self.generated_positions} generated positions"
        ]
        if self.gate_mode is not None:
            verdict = "open" if self.gate_open else "closed"
            out.append(
                f"gate ({self.gate_mode}) {verdict}: harm score {self.harm_score:.3f} vs "
                f"threshold {self.threshold:g}"
            )
        fired = self.fired()
        for f in fired[:limit]:
            label = f" {labels[f.feature]}" if labels and f.feature in labels else ""
            out.append(
                f"  {f.role} {f.feature}{label}: prompt max {f.prompt.max:.2f} mean "
                f"{f.prompt.mean:.2f}; reply max {f.generated.max:.2f} mean {f.generated.mean:.2f}"
                + (
                    f" (steered {f.generated_steered.mean:.2f})"
                    if self.steered and f.role == "selected"
                    else ""
                )
            )
        if len(fired) > limit:
            out.append(f"  ... and {len(fired) - limit} more features fired")
        if not fired:
            out.append("  no selected or harm feature fired")
        return out


FinishReason = Literal["stop", "length", "content_filter"]
#: What a guard did to a reply (:mod:`steerlex.steer.batching`): ``"refused"`` (the gate opened
#: on the prompt, the reply is the fixed refusal) or ``"aborted"`` (the detector fired on the
#: reply's own tokens and decoding stopped there).
GuardAction = Literal["refused", "aborted"]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the (steered) model's next-token distribution,
    and the ``top`` most likely tokens there as ``(token id, log-probability)``, most likely
    first. Computed from the model's logits before any sampling processor (temperature, top-p),
    so they do not depend on how the token was picked."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SteeredResponse:
    """One reply: its text, the generated token ids (EOS included when reached), the report.

    ``finish_reason`` is ``"content_filter"`` when a guard refused or aborted the reply, and
    ``guard`` then says which. ``logprobs`` (one per generated token) when they were asked for
    (:class:`~steerlex.steer.batching.DecodeRequest` ``logprobs``)."""

    text: str
    token_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...]
    finish_reason: FinishReason
    report: SteeringReport
    guard: GuardAction | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


# --- chat encoding ----------------------------------------------------------------------------


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise SteeringError(
            'messages must be a list of {"role": ..., "content": ...} dicts, got '
            f"{type(messages).__name__}."
        )
    if not messages:
        raise SteeringError("messages is empty; give at least one user message.")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise SteeringError(f'message {i} must be a dict with "role" and "content", got {m!r}.')
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise SteeringError(f"message {i} has role {role!r}; roles are {', '.join(ROLES)}.")
        if not isinstance(content, str) or not content.strip():
            raise SteeringError(f"message {i} ({role}) has empty or non-text content {content!r}.")
        check_text(content, f"message {i} ({role})", SteeringError)
        if role == "system" and i != 0:
            raise SteeringError(f"message {i} is a system message; only the first may be one.")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise SteeringError(
            f"the last message must be from the user (the model answers it), got "
            f"{out[-1]['role']!r}."
        )
    return out


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> EncodedPrompt:
    """Tokenize a conversation with the chat template, ready for the assistant's reply.

    ``content_start`` is the first token of the first non-system message's text: everything
    before it (BOS, system prompt, the first role header) is template prefix.
    ``content_end`` is the end of the last message's text.

    Raises:
        SteeringError: bad roles or empty content; SteerlexError: no chat template.
    """
    msgs = _check_messages(messages)
    if not has_chat_template(tokenizer):
        raise SteeringError(
            "this tokenizer has no chat template, so it cannot format a conversation; use "
            "generate(..., chat=False) with raw text, or a chat model."
        )

    def fmt(ms: list[dict[str, str]]) -> str:
        return str(tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=True))

    text = fmt(msgs)
    first = next(i for i, m in enumerate(msgs) if m["role"] != "system")
    probe = fmt([*msgs[:first], {**msgs[first], "content": _SENTINEL}, *msgs[first + 1 :]])
    pos = probe.find(_SENTINEL)
    if pos >= 0 and text.startswith(probe[:pos]):
        start_char = pos
    else:  # the template rewrote the content (e.g. stripped it)
        start_char = text.find(msgs[first]["content"].strip())
        if start_char < 0:
            raise SteeringError(
                "could not locate the first message's text in the chat-formatted conversation; "
                "this chat template rewrites message content."
            )
    last = msgs[-1]["content"].strip()
    found = text.rfind(last)
    end_char = found + len(last) if found >= start_char else len(text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    start = next((i for i, (_s, e) in enumerate(offsets) if e > start_char), len(ids))
    end = max((i + 1 for i, (s, e) in enumerate(offsets) if s < end_char and e > s), default=start)
    return EncodedPrompt(ids, start, max(start, end))


# --- one call's hook --------------------------------------------------------------------------


class _SteeringCall:
    """The hook of one generate call: edits, gate decision and activity records for its batch.

    ``strategy`` may be ``None`` (nothing to edit) and ``sae`` ``None`` (no features to watch):
    the hook then only counts positions for the reports.
    """

    def __init__(
        self,
        strategy: SteeringStrategy | None,
        sae: SparseAutoencoder | None,
        prompt_mask: Tensor,
        enabled: bool,
    ) -> None:
        self.strategy = strategy
        self.sae = sae
        self.prompt_mask = prompt_mask
        self.enabled = enabled and strategy is not None
        self.gate = strategy.gate if strategy is not None else None
        self.selected = list(strategy.features) if strategy is not None else []
        self.harm = list(self.gate.features) if self.gate is not None else []
        self.watched = self.selected + self.harm
        self.calls = 0
        self.gate_open: Tensor | None = None
        self.harm_score: Tensor | None = None
        self.prompt: dict[str, Tensor] = {}
        self.steps: list[dict[str, Tensor]] = []

    def __call__(self, h: Tensor) -> Tensor:
        with torch.no_grad():
            return self._step(h)

    def _acts(self, h: Tensor, features: list[int]) -> Tensor:
        """``relu`` pre-activations ``[B, T, len(features)]`` (``[B, T, 0]`` without an SAE)."""
        if self.sae is None or not features:
            return torch.zeros(*h.shape[:2], 0, device=h.device)
        return F.relu(feature_pre_acts(self.sae, h, features))

    def _decide(self, h: Tensor, mask: Tensor, prefill: bool) -> None:
        """The gate's decision: per row at prefill; token mode opens later rows too."""
        gate, sae = self.gate, self.sae
        if gate is None or (gate.needs_sae and sae is None):
            return
        if prefill:
            self.harm_score = gate.prompt_score(h, sae, mask)
            if gate.mode == "prompt":
                self.gate_open = (self.harm_score >= gate.threshold) & mask.any(dim=1).to(
                    self.harm_score.device
                )
            else:
                self.gate_open = gate.token_gate(h, sae).to(mask.device).logical_and(mask).any(1)
        elif gate.mode == "token" and self.gate_open is not None:
            opened = gate.token_gate(h, sae).to(self.gate_open.device).any(dim=1)
            self.gate_open = self.gate_open | opened

    def _step(self, h: Tensor) -> Tensor:
        prefill = self.calls == 0
        self.calls += 1
        batch, width = h.shape[:2]
        if prefill:
            if tuple(self.prompt_mask.shape) != (batch, width):
                raise SteeringError(
                    f"the first forward pass had shape {(batch, width)}, not the prompt batch "
                    f"{tuple(self.prompt_mask.shape)}; SteeredModel needs an unchunked prefill."
                )
            mask = self.prompt_mask.to(h.device)
        else:
            mask = torch.ones(batch, width, dtype=torch.bool, device=h.device)
        new, record = self.apply(h, mask, prefill)
        self.keep(record, prefill)
        return new

    def apply(self, h: Tensor, mask: Tensor, prefill: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """Decide the gate (at ``prefill``; token mode also later), edit ``h`` at the ``mask``
        positions and return ``(edited h, record)``; the record (``before``/``after``
        activations, ``edited``, ``mask``) is what :meth:`keep` stores for the reports.

        The batched decoder (:mod:`steerlex.steer.batching`) calls this on a sub-batch of rows
        that share a strategy, with :attr:`gate_open` set to those rows' decisions."""
        self._decide(h, mask, prefill)
        before = self._acts(h, self.watched)  # [B, T, F]
        if self.enabled and self.strategy is not None:
            gate = self.gate
            gate_open = self.gate_open if gate is not None and gate.mode == "prompt" else None
            new = self.strategy(h, self.sae, mask, gate_open=gate_open)
            edited = (new != h).any(dim=-1)
            after = self._acts(new, self.selected)
        else:
            new, edited = h, torch.zeros_like(mask)
            after = before[..., : len(self.selected)]
        return new, {"before": before, "after": after, "edited": edited, "mask": mask}

    def keep(self, record: dict[str, Tensor], prefill: bool) -> None:
        """Store one forward pass's record: the prompt's at ``prefill``, else a decoding step's."""
        if prefill:
            self.prompt = record
        else:
            self.steps.append(record)

    def _host_stats(self, generated: Sequence[int]) -> dict[str, list[Any]]:
        """Per-row statistics on the host: feature max/mean over the prompt's editable and the
        generated positions, before (``p``/``g``) and after (``ps``/``gs``) the edit, and the
        position counts (``*_count``, ``*_edited``)."""
        p = self.prompt
        device = p["before"].device
        p_mask = p["mask"].to(device)
        p_stats = _stats(p["before"], p_mask), _stats(p["after"], p_mask)
        p_edited = (p["edited"].to(device) & p_mask).sum(dim=1)
        if self.steps:
            before = torch.cat([s["before"] for s in self.steps], dim=1)
            after = torch.cat([s["after"] for s in self.steps], dim=1)
            edited = torch.cat([s["edited"] for s in self.steps], dim=1).to(device)
        else:
            before = p["before"][:, :0]
            after = p["after"][:, :0]
            edited = p["edited"][:, :0].to(device)
        fed = torch.as_tensor([max(0, n - 1) for n in generated], device=device)
        g_mask = torch.arange(before.shape[1], device=device)[None, :] < fed[:, None]
        g_stats = _stats(before, g_mask), _stats(after, g_mask)
        g_edited = (edited & g_mask).sum(dim=1)
        return {
            "p_max": p_stats[0][0].tolist(), "p_mean": p_stats[0][1].tolist(),
            "ps_max": p_stats[1][0].tolist(), "ps_mean": p_stats[1][1].tolist(),
            "g_max": g_stats[0][0].tolist(), "g_mean": g_stats[0][1].tolist(),
            "gs_max": g_stats[1][0].tolist(), "gs_mean": g_stats[1][1].tolist(),
            "p_count": p_mask.sum(dim=1).tolist(), "p_edited": p_edited.tolist(),
            "g_count": g_mask.sum(dim=1).tolist(), "g_edited": g_edited.tolist(),
        }  # fmt: skip

    def _activities(self, host: dict[str, list[Any]], i: int) -> tuple[FeatureActivity, ...]:
        """What each watched feature did in row ``i``."""
        n_sel = len(self.selected)
        feats = []
        for j, fid in enumerate(self.watched):
            js = j if j < n_sel else None
            own_p = ActivityStats(host["p_max"][i][j], host["p_mean"][i][j])
            own_g = ActivityStats(host["g_max"][i][j], host["g_mean"][i][j])
            feats.append(
                FeatureActivity(
                    feature=fid,
                    role="selected" if js is not None else "harm",
                    prompt=own_p,
                    generated=own_g,
                    prompt_steered=(
                        ActivityStats(host["ps_max"][i][js], host["ps_mean"][i][js])
                        if js is not None
                        else own_p
                    ),
                    generated_steered=(
                        ActivityStats(host["gs_max"][i][js], host["gs_mean"][i][js])
                        if js is not None
                        else own_g
                    ),
                )
            )
        return tuple(feats)

    def reports(self, generated: Sequence[int], description: str) -> list[SteeringReport]:
        """One report per row; ``generated[i]`` = tokens row ``i`` generated (EOS included)."""
        if not self.prompt:
            raise SteeringError("the model never ran through the steered layer; nothing to report.")
        host = self._host_stats(generated)
        batch = len(host["p_count"])
        gate_open: list[Any] = (
            self.gate_open.tolist() if self.gate_open is not None else [None] * batch
        )
        score: list[Any] = (
            self.harm_score.tolist() if self.harm_score is not None else [None] * batch
        )
        gate = self.gate
        return [
            SteeringReport(
                strategy=description,
                steered=self.enabled,
                gate_mode=gate.mode if gate is not None else None,
                gate_open=None if gate_open[i] is None else bool(gate_open[i]),
                harm_score=None if score[i] is None else float(score[i]),
                threshold=gate.threshold if gate is not None else None,
                prompt_positions=int(host["p_count"][i]),
                edited_prompt_positions=int(host["p_edited"][i]),
                generated_positions=int(host["g_count"][i]),
                edited_generated_positions=int(host["g_edited"][i]),
                features=self._activities(host, i),
            )
            for i in range(batch)
        ]


def _preview(text: str, limit: int = 40) -> str:
    """The start of a prompt, quoted, for error messages."""
    flat = " ".join(text[: 2 * limit].split())
    shown = "".join(c if not 0xD800 <= ord(c) <= 0xDFFF else "?" for c in flat[:limit])
    return repr(shown + ("..." if len(flat) > limit or len(text) > 2 * limit else ""))


def _stats(acts: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Masked max and mean over positions: ``acts [B, T, F]``, ``mask [B, T]`` → ``[B, F]`` each."""
    if acts.shape[1] == 0:
        zero = acts.new_zeros(acts.shape[0], acts.shape[2], dtype=torch.float32)
        return zero, zero
    m = mask.to(acts.device).unsqueeze(-1)
    count = m.sum(dim=1).clamp_min(1)
    mean = (acts * m).sum(dim=1) / count
    # activations are >= 0 (relu), so 0 stands in for masked positions
    mx = torch.where(m, acts, torch.zeros((), dtype=acts.dtype, device=acts.device)).amax(dim=1)
    return mx.float(), mean.float()


# --- the steered model ------------------------------------------------------------------------

PromptInput = str | Sequence[str] | Sequence[Sequence[int]] | Sequence[EncodedPrompt]


class SteeredModel:
    """A model whose layer-``L`` residual stream is edited while it generates.

    Args:
        loaded: the model and tokenizer (:func:`~steerlex.models.loading.load_model`).
        sae: an SAE trained on ``loaded``'s layer ``layer``, moved to that layer's device; or
            ``None`` when the strategy needs none (:class:`~steerlex.steer.strategies.DenseDirection`,
            or no strategy). Without an SAE the reports list no features.
        strategy: the edit (:class:`~steerlex.steer.strategies.Amplification`, ...); ``None``
            edits nothing (set :attr:`strategy` later).
        layer: 0-based layer to edit; default: the one the SAE records (required without one).
        enabled: whether steering starts on (see :attr:`enabled`, :meth:`steering`).
        check_weights: refuse an SAE that records other model weights than ``loaded``'s.

    Raises:
        SteeringError / SAEError: no layer, the SAE does not fit the model (width, layer,
            weights), the strategy needs an SAE that is not given or its feature ids are out of
            range.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        sae: SparseAutoencoder | None = None,
        strategy: SteeringStrategy | None = None,
        *,
        layer: int | None = None,
        enabled: bool = True,
        check_weights: bool = True,
    ) -> None:
        model = loaded.model
        if layer is None and sae is not None:
            layer = sae.cfg.layer
        if layer is None:
            raise SteeringError(
                ("the SAE does not record the layer it was trained on" if sae is not None
                 else "without an SAE there is no layer to default to")
                + "; pass layer=<0-based index> (the CLI: --layer)."
            )  # fmt: skip
        self.layer = check_layer(model, layer)
        self.d_model = residual_width(model)
        if sae is not None:
            check_sae_fits(sae, loaded=loaded, layer=self.layer, check_weights=check_weights)
            block = decoder_layers(model)[1][self.layer]
            device = next(block.parameters(), None)
            if device is not None and sae.W_enc.device != device.device:
                sae.to(device.device)
        self.loaded = loaded
        self.sae = sae
        self._strategy = self._checked(strategy)
        self._enabled = bool(enabled)
        self._scopes: list[bool] = []
        # One call at a time: concurrent calls would each see the other's hook on the layer.
        self._lock = threading.Lock()

    # --- state ------------------------------------------------------------------------------

    def _checked(self, strategy: SteeringStrategy | None) -> SteeringStrategy | None:
        if strategy is None:
            return None
        if not isinstance(strategy, SteeringStrategy):
            raise SteeringError(
                f"strategy must be a SteeringStrategy (Amplification, Calibration, Clamp, "
                f"Ablate, DenseDirection) or None, got {type(strategy).__name__}."
            )
        strategy.check(self.sae, self.d_model)
        return strategy

    @property
    def strategy(self) -> SteeringStrategy | None:
        """The edit calls apply when :attr:`enabled` (``None``: none)."""
        return self._strategy

    @strategy.setter
    def strategy(self, strategy: SteeringStrategy | None) -> None:
        self._strategy = self._checked(strategy)

    def describe(self) -> str:
        """The strategy's one-line description (``"no steering"`` without one)."""
        return self._strategy.describe() if self._strategy is not None else "no steering"

    @property
    def enabled(self) -> bool:
        """Whether calls edit the model. Off, outputs are exactly the unsteered model's."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)

    @contextmanager
    def steering(self, enabled: bool = True) -> Iterator[SteeredModel]:
        """Turn steering on or off inside the ``with`` block; the previous state comes back after."""
        previous = self._enabled
        self._enabled = bool(enabled)
        try:
            yield self
        finally:
            self._enabled = previous

    def __enter__(self) -> SteeredModel:
        """``with steered: ...`` is ``with steered.steering(True): ...``."""
        self._scopes.append(self._enabled)
        self._enabled = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._enabled = self._scopes.pop()

    # --- generation -------------------------------------------------------------------------

    def encode(
        self, prompts: PromptInput, *, system_prompt: str | None = None, chat: bool = True
    ) -> list[EncodedPrompt]:
        """Encode prompts as :meth:`generate` does.

        Text is wrapped in the chat template (``chat=True``) or tokenized raw with special
        tokens; editable positions start at the user's text. Token-id lists are all editable
        except a leading special token. :class:`EncodedPrompt` objects are used as they are.
        """
        tok = self.loaded.tokenizer
        items: Sequence[Any] = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(items, Sequence) or not items:
            raise SteeringError("prompts is empty; give at least one prompt.")
        special = set(getattr(tok, "all_special_ids", []) or [])
        if system_prompt is not None:
            check_text(system_prompt, "the system prompt", SteeringError)
        out: list[EncodedPrompt] = []
        for i, p in enumerate(items):
            if isinstance(p, EncodedPrompt):
                enc = p
            elif isinstance(p, str):
                if not p.strip():
                    raise SteeringError(f"prompt {i} is empty; give non-empty prompts.")
                check_text(p, f"prompt {i}", SteeringError)
                enc = encode_prompt(tok, p, chat=chat, system_prompt=system_prompt)
            elif isinstance(p, Sequence) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p
            ):
                ids = [int(t) for t in p]
                start = 1 if ids and ids[0] in special else 0
                enc = EncodedPrompt(ids, start, len(ids))
            else:
                raise SteeringError(
                    f"prompt {i} is {type(p).__name__}; give strings, lists of token ids or "
                    "EncodedPrompt objects."
                )
            if not enc.input_ids:
                raise SteeringError(f"prompt {i} encodes to no tokens.")
            out.append(enc)
        return out

    def generate(
        self,
        prompts: PromptInput,
        *,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        system_prompt: str | None = None,
        chat: bool = True,
        batch_size: int = 8,
    ) -> list[SteeredResponse]:
        """Reply to each prompt, steered if :attr:`enabled`; one :class:`SteeredResponse` each.

        Prompts run in left-padded batches of ``batch_size``. Greedy unless ``do_sample``; with
        ``seed`` a sampled call is reproducible and leaves the global RNG as it was. Settings not
        named here come from the model's ``generation_config``. Calls on one SteeredModel run one
        at a time (a lock); do not run other hooked calls on the same model concurrently.

        Raises:
            SteeringError: bad arguments; a prompt that is empty or not valid UTF-8; a prompt
                whose tokens plus ``max_new_tokens`` exceed the model's context
                (:func:`~steerlex.models.loading.context_length`), checked for every prompt
                before any is generated.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise SteeringError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
        if max_new_tokens < 1:
            raise SteeringError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SteeringError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        if do_sample:
            if not (temperature > 0 and temperature < float("inf")):
                raise SteeringError(f"temperature must be > 0 and finite, got {temperature}.")
            if not (0 < top_p <= 1):
                raise SteeringError(f"top_p must be in (0, 1], got {top_p}.")
        encoded = self.encode(prompts, system_prompt=system_prompt, chat=chat)
        texts: Sequence[Any] = [prompts] if isinstance(prompts, str) else prompts
        for i, e in enumerate(encoded):
            what = ("the prompt" if len(encoded) == 1 else f"prompt {i}") + (
                f" ({_preview(texts[i])})" if isinstance(texts[i], str) else ""
            )
            self.check_fits(e, max_new_tokens, what)
        config = self._generation_config(max_new_tokens, do_sample, temperature, top_p)
        out: list[SteeredResponse] = []
        rng = self._rng(seed) if do_sample and seed is not None else nullcontext()
        strategy, enabled = self._strategy, self._enabled  # fixed for the whole call
        with self._lock, rng:
            for b0 in range(0, len(encoded), batch_size):
                batch = encoded[b0 : b0 + batch_size]
                out.extend(self._generate_batch(batch, config, strategy, enabled))
        return out

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> SteeredResponse:
        """The assistant's reply to a conversation (``[{"role", "content"}, ...]``, last = user).

        Roles are ``system`` (first message only), ``user`` and ``assistant``; content must be
        non-empty UTF-8 text. Positions before the first non-system message's text are never
        edited. The chat-formatted conversation plus ``max_new_tokens`` must fit the model's
        context (a SteeringError says by how much it does not).
        """
        encoded = encode_chat(self.loaded.tokenizer, messages)
        self.check_fits(
            encoded, max_new_tokens, "the conversation",
            "drop early messages (in steerlex chat: /reset forgets the conversation)",
        )  # fmt: skip
        return self.generate(
            [encoded],
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )[0]

    def check_fits(
        self, encoded: EncodedPrompt, max_new_tokens: int, what: str = "the prompt", hint: str = ""
    ) -> None:
        """Refuse a prompt whose tokens plus ``max_new_tokens`` exceed the model's context
        (:attr:`LoadedModel.context_length <steerlex.models.loading.LoadedModel.context_length>`)
        with a SteeringError that gives both numbers and how far to cut.

        Nothing is checked when the model's config names no context length. ``what`` names the
        prompt in the message; ``hint`` is added at its end.
        """
        context = self.loaded.context_length
        n = len(encoded.input_ids)
        if context is None or n + max_new_tokens <= context:
            return
        flag = "max_new_tokens (the CLI: --max-new-tokens)"
        fixes = []
        if max_new_tokens < context:
            fixes.append(f"shorten it to at most {context - max_new_tokens} tokens")
        if n < context:
            fixes.append(f"lower {flag} to at most {context - n}")
        fix = " or ".join(fixes) or f"shorten it and lower {flag}: together at most {context}"
        raise SteeringError(
            f"{what} has {n} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{n + max_new_tokens}, over the context of {self.loaded.name}, {context} tokens; "
            f"{fix}{'; ' + hint if hint else ''}."
        )

    # --- internals --------------------------------------------------------------------------

    @contextmanager
    def _rng(self, seed: int) -> Iterator[None]:
        device = self.loaded.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _generation_config(
        self, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float
    ) -> Any:
        model = self.loaded.model
        config = copy.deepcopy(model.generation_config)
        config.max_new_tokens = max_new_tokens
        config.max_length = None
        config.min_new_tokens = None
        config.do_sample = do_sample
        if do_sample:
            config.temperature, config.top_p = float(temperature), float(top_p)
        else:
            config.temperature = config.top_p = config.top_k = None
        if config.pad_token_id is None:
            pad = self.loaded.tokenizer.pad_token_id
            config.pad_token_id = pad if pad is not None else self._eos_ids(config)[0]
        return config

    def _eos_ids(self, config: Any) -> list[int]:
        eos = config.eos_token_id
        if eos is None:
            eos = self.loaded.tokenizer.eos_token_id
        if eos is None:
            return [0]
        return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    def _generate_batch(
        self,
        encoded: list[EncodedPrompt],
        config: Any,
        strategy: SteeringStrategy | None,
        enabled: bool,
    ) -> list[SteeredResponse]:
        model, tok = self.loaded.model, self.loaded.tokenizer
        device = self.loaded.device
        # Left padding (real tokens end at the last column), built here from token ids: the
        # tokenizer's own padding_side is never read or changed.
        ids, attn, _pos = left_padded([e.input_ids for e in encoded], int(config.pad_token_id))
        width = ids.shape[1]
        editable = torch.zeros((len(encoded), width), dtype=torch.bool)
        for i, e in enumerate(encoded):
            editable[i, width - len(e.input_ids) + e.content_start :] = True
        ids, attn, editable = ids.to(device), attn.to(device), editable.to(device)
        call = _SteeringCall(strategy, self.sae, editable, enabled)
        with torch.no_grad(), edit_residual(model, self.layer, call):
            seqs = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)
        eos = set(self._eos_ids(config))
        rows = seqs[:, width:].tolist()
        kept: list[list[int]] = []
        reasons: list[Literal["stop", "length"]] = []
        for row in rows:
            stop = next((j for j, t in enumerate(row) if t in eos), None)
            kept.append(row if stop is None else row[: stop + 1])
            reasons.append("length" if stop is None else "stop")
        reports = call.reports(
            [len(k) for k in kept], strategy.describe() if strategy is not None else "no steering"
        )
        return [
            _make_response(tok, e, k, reason, report)
            for e, k, reason, report in zip(encoded, kept, reasons, reports, strict=True)
        ]


def _make_response(
    tok: Any,
    encoded: EncodedPrompt,
    token_ids: Sequence[int],
    reason: FinishReason,
    report: SteeringReport,
    guard: GuardAction | None = None,
) -> SteeredResponse:
    """A :class:`SteeredResponse` from the generated ids (EOS last when ``reason`` is stop)."""
    body = list(token_ids[:-1] if reason == "stop" else token_ids)
    return SteeredResponse(
        text=tok.decode(body, skip_special_tokens=True),
        token_ids=tuple(token_ids),
        prompt_ids=tuple(encoded.input_ids),
        finish_reason=reason,
        report=report,
        guard=guard,
    )
