"""Batched decoding with per-request steering: several requests share one forward per step.

:class:`BatchDecoder` runs the requests given to it (:class:`DecodeRequest`) together on one
:class:`~steerlex.steer.runtime.SteeredModel`'s model, SAE and layer. Each row keeps its own

- steering: its strategy (strength and gate included; ``None``: no edit) and on/off switch, with
  a prompt-mode gate decided from its own prompt at its own prefill;
- sampling: greedy, or temperature/top_p with its own ``torch.Generator`` (seeded by its
  ``seed``), so what a row samples never depends on the other rows;
- ``max_new_tokens`` and end-of-sequence ids;
- a guard (``guard``), which acts on its strategy's gate:

  - ``"steer"`` (default): the strategy steers, behind its gate if it has one;
  - ``"refuse"``: when the gate opens on the prompt, nothing is generated and the reply is the
    fixed ``refusal`` text (``finish_reason`` ``"content_filter"``, ``guard`` ``"refused"``);
  - ``"abort"``: the reply is generated (steered as in ``"steer"``), and decoding stops as soon
    as the detector fires on one of the reply's own tokens — its harm score at that position,
    before any edit, reaches ``abort_threshold`` (default: the gate's threshold); the reply
    keeps the tokens up to and including that one (``finish_reason`` ``"content_filter"``,
    ``guard`` ``"aborted"``), like Goodfire's ``abort_when``;
- stop strings (``stop``): decoding ends once the reply's text holds one of them, and the text
  is cut where it starts (``finish_reason`` ``"stop"``; ``token_ids`` keep every token decoded);
- ``logprobs``: each generated token's log-probability and the ``logprobs`` most likely
  alternatives (:class:`~steerlex.steer.runtime.TokenLogprob`);
- ``on_token``: a callback given each token (and its log-probabilities) as it is decoded, on
  the thread that calls :meth:`BatchDecoder.step` (for streaming); it must not raise.

A request is dropped before it finishes with :meth:`BatchDecoder.cancel` (its row leaves the
batch at the next step).

Rows join at step boundaries (continuous batching): :meth:`BatchDecoder.step` first prefills
the waiting requests that fit (up to ``max_batch`` rows running) in one forward pass of their
own, then merges their KV cache into the running batch's, left-padding the shorter one to a
common length, and then decodes one token for every running row in one forward pass. Finished
rows leave the batch (and their cache rows) at once; cache columns that only padding uses are
dropped.

Inside a forward pass the layer hook splits the batch into groups of rows sharing one strategy
object and on/off state, calls each strategy once on its sub-batch and writes the results back
in row order, recording each row's feature activity for its own
:class:`~steerlex.steer.runtime.SteeringReport`; the same code path
(:meth:`~steerlex.steer.runtime._SteeringCall.apply`) serves :meth:`SteeredModel.generate`.

Greedy rows give the token ids :meth:`SteeredModel.generate` gives for the same prompt alone,
and a seeded sampled row samples what it samples alone; logits processors (repetition penalty,
temperature, top-k, top-p, ...) are the model's ``generation_config``'s, built by transformers
per row. Only transformers' ``DynamicCache`` with full-attention layers is supported.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from steerlex.core.errors import SteeringError
from steerlex.models.chat import EncodedPrompt, left_padded
from steerlex.models.hooks import edit_residual
from steerlex.steer.runtime import (
    FinishReason,
    GuardAction,
    SteeredModel,
    SteeredResponse,
    TokenLogprob,
    _make_response,
    _SteeringCall,
)
from steerlex.steer.strategies import SteeringStrategy

__all__ = [
    "DEFAULT_REFUSAL",
    "GUARD_MODES",
    "MAX_LOGPROBS",
    "BatchDecoder",
    "DecodeRequest",
    "GuardMode",
]

ModelDefault = Literal["model"]
GuardMode = Literal["steer", "refuse", "abort"]
GUARD_MODES: tuple[GuardMode, ...] = ("steer", "refuse", "abort")
#: The reply a ``"refuse"`` guard gives when the gate opens.
DEFAULT_REFUSAL = "I can't help with that request."
#: Most alternatives a request may ask for with ``logprobs`` (as OpenAI's ``top_logprobs``).
MAX_LOGPROBS = 20


def _forward_kwargs(model: Any) -> dict[str, Any]:
    """Keyword arguments for a cached forward pass, by what the model's ``forward`` takes:
    the cache argument's name (``cache``; ``past_key_values`` before transformers 5.24) under
    ``"_cache"``, and ``logits_to_keep=1`` where supported."""
    params = inspect.signature(model.forward).parameters
    out: dict[str, Any] = {"use_cache": True}
    out["_cache"] = "cache" if "cache" in params else "past_key_values"
    if "logits_to_keep" in params:
        out["logits_to_keep"] = 1
    return out


@dataclass(frozen=True)
class DecodeRequest:
    """One request for :class:`BatchDecoder`.

    ``prompt``: text (chat-formatted when ``chat``), token ids, or an
    :class:`~steerlex.models.chat.EncodedPrompt` (e.g. from
    :func:`~steerlex.steer.runtime.encode_chat`), as :meth:`SteeredModel.encode` takes them.
    ``strategy``: ``"model"`` (the SteeredModel's strategy when the request is submitted), a
    strategy, or ``None`` (no edit). ``enabled``: ``None`` for the SteeredModel's switch.
    ``eos_token_ids``: ``None`` for the model's; ``()`` never stops before ``max_new_tokens``.
    ``guard``, ``refusal``, ``abort_threshold``: what the request's gate does (module docs); a
    guard other than ``"steer"`` needs a strategy with a gate. ``stop``: stop strings.
    ``logprobs``: ``None`` for none, else how many alternatives (0 to :data:`MAX_LOGPROBS`) to
    give beside each token's own log-probability. ``on_token(token, logprob)``: called with each
    decoded token (``logprob`` ``None`` unless asked for).
    """

    prompt: str | Sequence[int] | EncodedPrompt
    max_new_tokens: int = 128
    strategy: SteeringStrategy | ModelDefault | None = "model"
    enabled: bool | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    system_prompt: str | None = None
    chat: bool = True
    eos_token_ids: tuple[int, ...] | None = None
    guard: GuardMode = "steer"
    refusal: str = DEFAULT_REFUSAL
    abort_threshold: float | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    on_token: Callable[[int, TokenLogprob | None], None] | None = None


@dataclass
class _Row:
    """A request's state while it is decoded."""

    ticket: int
    encoded: EncodedPrompt
    strategy: SteeringStrategy | None
    enabled: bool
    max_new_tokens: int
    eos: frozenset[int]
    processors: Any
    generator: torch.Generator | None
    call: _SteeringCall
    guard: GuardMode = "steer"
    refusal: str = DEFAULT_REFUSAL
    abort_threshold: float = 0.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    on_token: Callable[[int, TokenLogprob | None], None] | None = None
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    stopped: GuardAction | None = None
    stop_at: int | None = None  # where a stop string starts in the reply's text

    @property
    def key(self) -> tuple[int, bool]:
        """Rows with equal keys share one strategy call inside a forward pass."""
        return (id(self.strategy) if self.strategy is not None else 0, self.enabled)

    @property
    def done(self) -> bool:
        return (
            self.stopped is not None
            or self.stop_at is not None
            or len(self.tokens) >= self.max_new_tokens
            or (bool(self.tokens) and self.tokens[-1] in self.eos)
        )


class BatchDecoder:
    """Decode many requests together, each with its own steering and sampling settings.

    Use :meth:`run` for a fixed set of requests, or :meth:`submit` (from any thread) and
    :meth:`step` (from one loop) for requests that arrive while others decode: a submitted
    request joins the running batch at the next step. Steps hold the SteeredModel's lock, so
    they never overlap its own ``generate`` calls.

    Args:
        steered: the model, SAE and layer to run (its strategy/switch are only defaults).
        max_batch: most rows decoded together; more wait for a free row.

    Raises:
        SteeringError: ``max_batch`` < 1.
    """

    def __init__(self, steered: SteeredModel, *, max_batch: int = 8) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise SteeringError(f"max_batch must be an int >= 1, got {max_batch!r}.")
        self.steered = steered
        self.max_batch = max_batch
        self._waiting: deque[_Row] = deque()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._attn: Tensor | None = None  # [B, cache length] of the running rows
        self._tickets = 0
        self._kwargs = _forward_kwargs(steered.loaded.model)
        self._live: set[int] = set()  # tickets submitted and not yet given back or dropped
        self._cancelled: set[int] = set()
        self._queue_lock = threading.Lock()
        self._step_lock = threading.Lock()

    # --- queue --------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet prefilled."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows being decoded."""
        return len(self._rows)

    def submit(self, request: DecodeRequest) -> int:
        """Check and encode ``request`` and queue it; returns its ticket (given back by
        :meth:`step` with its response).

        Raises:
            SteeringError: bad settings (``max_new_tokens`` < 1, temperature, top_p), a strategy
                the SAE cannot run (e.g. feature ids past its width), an empty prompt, or one
                that does not fit the context with ``max_new_tokens``.
        """
        row = self._row(request)
        with self._queue_lock:
            row.ticket = self._tickets
            self._tickets += 1
            self._waiting.append(row)
            self._live.add(row.ticket)
        return row.ticket

    def cancel(self, ticket: int) -> bool:
        """Drop the request ``ticket`` (waiting or decoding; from any thread): its row leaves the
        batch at the next step and it never comes back from :meth:`step`. False when it is not
        live (unknown, finished or already cancelled)."""
        with self._queue_lock:
            if ticket not in self._live:
                return False
            self._live.discard(ticket)
            self._cancelled.add(ticket)
            return True

    def run(self, requests: Sequence[DecodeRequest]) -> list[SteeredResponse]:
        """Decode ``requests`` (all checked before any runs); responses in their order.

        Raises:
            SteeringError: no requests, or any :meth:`submit` refuses.
        """
        if isinstance(requests, DecodeRequest) or not isinstance(requests, Sequence):
            raise SteeringError("requests must be a list of DecodeRequest.")
        if not requests:
            raise SteeringError("requests is empty; give at least one DecodeRequest.")
        rows = [self._row(r) for r in requests]
        with self._queue_lock:
            tickets = []
            for row in rows:
                row.ticket = self._tickets
                self._tickets += 1
                tickets.append(row.ticket)
                self._waiting.append(row)
                self._live.add(row.ticket)
        wanted = set(tickets)
        done: dict[int, SteeredResponse] = {}
        while wanted - done.keys():
            for ticket, response in self.step():
                if ticket in wanted:
                    done[ticket] = response
        return [done[t] for t in tickets]

    def step(self) -> list[tuple[int, SteeredResponse]]:
        """Admit waiting requests into free rows (one prefill), then decode one token for every
        running row (one forward). Returns ``(ticket, response)`` of the rows that finished.

        If a forward pass fails, the rows being prefilled or decoded are dropped (their
        tickets never come back) and the error is raised; waiting requests stay queued."""
        with self._step_lock, self.steered._lock:
            finished: list[tuple[int, SteeredResponse]] = []
            with self._queue_lock:
                if self._cancelled:
                    self._drop_cancelled()
                free = self.max_batch - len(self._rows)
                joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            try:
                if joining:
                    finished += self._prefill(joining)
                if self._rows:
                    finished += self._decode()
            except BaseException:
                # the batch's cache may be half-updated: drop the running rows, keep the queue
                with self._queue_lock:
                    self._live -= {r.ticket for r in [*self._rows, *joining]}
                self._rows, self._cache, self._attn = [], None, None
                raise
            with self._queue_lock:
                self._live -= {ticket for ticket, _ in finished}
            return finished

    def _drop_cancelled(self) -> None:
        """Remove cancelled requests from the queue and their rows from the batch."""
        gone = self._cancelled
        self._cancelled = set()
        self._waiting = deque(r for r in self._waiting if r.ticket not in gone)
        keep = [i for i, r in enumerate(self._rows) if r.ticket not in gone]
        if len(keep) < len(self._rows):
            self._keep_rows(keep)

    # --- requests -----------------------------------------------------------------------------

    def _row(self, request: DecodeRequest) -> _Row:
        steered = self.steered
        if not isinstance(request, DecodeRequest):
            raise SteeringError(f"expected a DecodeRequest, got {type(request).__name__}.")
        n = request.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SteeringError(f"max_new_tokens must be an int >= 1, got {n!r}.")
        if request.do_sample:
            t, p = request.temperature, request.top_p
            if not (t > 0 and t < float("inf")):
                raise SteeringError(f"temperature must be > 0 and finite, got {t}.")
            if not (0 < p <= 1):
                raise SteeringError(f"top_p must be in (0, 1], got {p}.")
        strategy = (
            steered.strategy
            if isinstance(request.strategy, str) and request.strategy == "model"
            else steered._checked(request.strategy)
        )
        enabled = steered.enabled if request.enabled is None else bool(request.enabled)
        stop = _checked_stop(request.stop)
        k = request.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)
                              or not 0 <= k <= MAX_LOGPROBS):  # fmt: skip
            raise SteeringError(
                f"logprobs must be None or an int from 0 to {MAX_LOGPROBS}, got {k!r}."
            )
        if request.on_token is not None and not callable(request.on_token):
            raise SteeringError(f"on_token must be callable, got {request.on_token!r}.")
        prompts: Any = [request.prompt]
        (encoded,) = steered.encode(prompts, system_prompt=request.system_prompt, chat=request.chat)
        steered.check_fits(encoded, n)
        config = steered._generation_config(
            n, request.do_sample, request.temperature, request.top_p
        )
        eos = (
            frozenset(steered._eos_ids(config))
            if request.eos_token_ids is None
            else frozenset(int(e) for e in request.eos_token_ids)
        )
        model, device = steered.loaded.model, steered.loaded.device
        length = len(encoded.input_ids)
        # the config transformers' generate would use (it fills unset defaults, e.g. top_k=50)
        prepare = getattr(model, "_prepare_generation_config", None)
        if prepare is not None:
            config = prepare(config)[0]
        processors = model._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=length,
            encoder_input_ids=torch.tensor([encoded.input_ids], device=device),
            device=device,
            model_kwargs={"attention_mask": torch.ones(1, length, dtype=torch.long, device=device)},
        )
        generator = None
        if request.do_sample:
            seed = request.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=device).manual_seed(int(seed))
        editable = torch.zeros((1, length), dtype=torch.bool, device=device)
        editable[0, encoded.content_start :] = True
        call = _SteeringCall(strategy, steered.sae, editable, enabled)
        return _Row(
            -1, encoded, strategy, enabled, n, eos, processors, generator, call,
            guard=request.guard, refusal=request.refusal,
            abort_threshold=self._abort_threshold(request, strategy),
            stop=stop, logprobs=k, on_token=request.on_token,
        )  # fmt: skip

    def _abort_threshold(self, request: DecodeRequest, strategy: SteeringStrategy | None) -> float:
        """Check the request's guard settings; the threshold an ``"abort"`` guard uses."""
        if request.guard not in GUARD_MODES:
            raise SteeringError(
                f"guard must be one of {', '.join(GUARD_MODES)}, got {request.guard!r}."
            )
        if not isinstance(request.refusal, str) or not request.refusal.strip():
            raise SteeringError(
                "refusal must be a non-empty text (the reply a refused request gets)."
            )
        gate = strategy.gate if strategy is not None else None
        if request.guard == "steer":
            return 0.0
        if gate is None:
            raise SteeringError(
                f"guard {request.guard!r} acts on the strategy's gate, and this request's strategy "
                f"({strategy.describe() if strategy is not None else 'none'}) has none; give a "
                "conditional strategy (a harm probe or harm features), or guard 'steer'."
            )
        if gate.needs_sae and self.steered.sae is None:
            raise SteeringError(f"guard {request.guard!r}: the gate's harm features need an SAE.")
        t = gate.threshold if request.abort_threshold is None else request.abort_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise SteeringError(f"abort_threshold must be a finite number, got {t!r}.")
        return float(t)

    # --- forward passes -----------------------------------------------------------------------

    def _steer(self, h: Tensor, rows: list[_Row], mask: Tensor, prefill: bool) -> Tensor:
        """The layer edit of one forward pass: each group of rows sharing a strategy is edited
        by one call on its sub-batch; each row keeps its own gate decision and records."""
        with torch.no_grad():
            if not prefill:
                self._watch_replies(h, rows)
            groups: dict[tuple[int, bool], list[int]] = {}
            for i, row in enumerate(rows):
                groups.setdefault(row.key, []).append(i)
            whole = len(groups) == 1
            out = h if whole else torch.empty_like(h)
            width = h.shape[1]
            for members in groups.values():
                first = rows[members[0]]
                index = torch.tensor(members, device=h.device)
                sub = h if whole else h.index_select(0, index)
                sub_mask = mask if whole else mask.index_select(0, index.to(mask.device))
                call = _SteeringCall(first.strategy, self.steered.sae, sub_mask, first.enabled)
                if not prefill:
                    opened = [rows[i].call.gate_open for i in members]
                    if all(g is not None for g in opened):
                        call.gate_open = torch.cat([g for g in opened if g is not None])
                new, record = call.apply(sub, sub_mask, prefill)
                if whole:
                    out = new
                else:
                    out.index_copy_(0, index, new)
                for j, i in enumerate(members):
                    own = rows[i].call
                    if call.gate_open is not None:
                        own.gate_open = call.gate_open[j : j + 1]
                    if prefill and call.harm_score is not None:
                        own.harm_score = call.harm_score[j : j + 1]
                    start = width - len(rows[i].encoded.input_ids) if prefill else 0
                    own.keep({k: v[j : j + 1, start:] for k, v in record.items()}, prefill)
            return out

    def _watch_replies(self, h: Tensor, rows: list[_Row]) -> None:
        """``"abort"`` rows: stop those whose detector fires on the reply token now fed (its
        residual before any edit)."""
        for i, row in enumerate(rows):
            if row.guard != "abort" or row.strategy is None or row.strategy.gate is None:
                continue
            score = row.strategy.gate.scores(h[i : i + 1], self.steered.sae)
            if bool((score >= row.abort_threshold).any()):
                row.stopped = "aborted"

    def _forward(
        self,
        rows: list[_Row],
        ids: Tensor,
        attn: Tensor,
        pos: Tensor,
        mask: Tensor,
        cache: Any,
        prefill: bool,
    ) -> Tensor:
        """One forward pass of ``rows`` through the hooked model; last-position logits."""
        steered = self.steered
        model = steered.loaded.model

        def edit(h: Tensor) -> Tensor:
            return self._steer(h, rows, mask.to(h.device), prefill)

        kwargs = dict(self._kwargs)
        kwargs[kwargs.pop("_cache")] = cache
        with torch.no_grad(), edit_residual(model, steered.layer, edit):
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, **kwargs)
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)

    def _sample(self, rows: list[_Row], logits: Tensor) -> list[tuple[int, SteeredResponse]]:
        """Pick each row's next token with its own processors and generator; the rows that
        finish are returned as responses."""
        finished = []
        device = logits.device
        for i, row in enumerate(rows):
            opened = row.call.gate_open
            if (
                row.guard == "refuse"
                and not row.tokens
                and opened is not None
                and bool(opened.any())
            ):
                row.stopped = "refused"
            if row.stopped is not None:
                finished.append((row.ticket, self._response(row)))
                continue
            seen = torch.tensor([row.encoded.input_ids + row.tokens], device=device)
            scores = row.processors(seen, logits[i : i + 1])
            if row.generator is not None:
                probs = F.softmax(scores, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=row.generator).item())
            else:
                token = int(torch.argmax(scores, dim=-1).item())
            row.tokens.append(token)
            logprob = None if row.logprobs is None else _logprob(logits[i], token, row.logprobs)
            if logprob is not None:
                row.token_logprobs.append(logprob)
            if row.stop and token not in row.eos:
                row.stop_at = _find_stop(
                    self.steered.loaded.tokenizer.decode(row.tokens, skip_special_tokens=True),
                    row.stop,
                )
            if row.on_token is not None:
                row.on_token(token, logprob)
            if row.done:
                finished.append((row.ticket, self._response(row)))
        return finished

    def _response(self, row: _Row) -> SteeredResponse:
        strategy = row.strategy
        tok = self.steered.loaded.tokenizer
        (report,) = row.call.reports(
            [len(row.tokens)], strategy.describe() if strategy is not None else "no steering"
        )
        if row.stopped == "refused":
            return SteeredResponse(
                text=row.refusal,
                token_ids=tuple(tok.encode(row.refusal, add_special_tokens=False)),
                prompt_ids=tuple(row.encoded.input_ids),
                finish_reason="content_filter",
                report=report,
                guard="refused",
            )
        logprobs = tuple(row.token_logprobs) if row.logprobs is not None else None
        if row.stop_at is not None and row.stopped is None:
            text = tok.decode(row.tokens, skip_special_tokens=True)[: row.stop_at]
            return SteeredResponse(
                text=text,
                token_ids=tuple(row.tokens),
                prompt_ids=tuple(row.encoded.input_ids),
                finish_reason="stop",
                report=report,
                logprobs=logprobs,
            )
        reason: FinishReason = (
            "content_filter"
            if row.stopped == "aborted"
            else "stop"
            if row.tokens[-1] in row.eos
            else "length"
        )
        response = _make_response(tok, row.encoded, row.tokens, reason, report, row.stopped)
        return response if logprobs is None else dataclasses.replace(response, logprobs=logprobs)

    def _prefill(self, rows: list[_Row]) -> list[tuple[int, SteeredResponse]]:
        steered = self.steered
        device = steered.loaded.device
        pad = int(steered._generation_config(1, False, 1.0, 1.0).pad_token_id)
        ids, attn, _pos = left_padded([r.encoded.input_ids for r in rows], pad)
        width = ids.shape[1]
        pos = (attn.cumsum(dim=1) - 1).masked_fill(attn == 0, 1)
        editable = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            editable[i, width - len(r.encoded.input_ids) + r.encoded.content_start :] = True
        ids, attn, pos, editable = (t.to(device) for t in (ids, attn, pos, editable))
        cache = DynamicCache(config=steered.loaded.model.config)
        logits = self._forward(rows, ids, attn, pos, editable, cache, True)
        finished = self._sample(rows, logits)
        keep = [i for i, r in enumerate(rows) if not r.done]
        if keep:
            index = torch.tensor(keep, device=device)
            if len(keep) < len(rows):
                for layer in self._layers(cache):
                    layer.batch_select_indices(index)
            self._join([rows[i] for i in keep], cache, attn.index_select(0, index))
        return finished

    def _decode(self) -> list[tuple[int, SteeredResponse]]:
        rows = self._rows
        assert self._attn is not None
        device = self._attn.device
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=device)
        attn = torch.cat([self._attn, self._attn.new_ones(len(rows), 1)], dim=1)
        pos = torch.tensor(
            [[len(r.encoded.input_ids) + len(r.tokens) - 1] for r in rows], device=device
        )
        mask = torch.ones(len(rows), 1, dtype=torch.bool, device=device)
        logits = self._forward(rows, ids, attn, pos, mask, self._cache, False)
        self._attn = attn
        finished = self._sample(rows, logits)
        keep = [i for i, r in enumerate(rows) if not r.done]
        if len(keep) < len(rows):
            self._keep_rows(keep)
        return finished

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only the running rows at indices ``keep`` (and their cache rows)."""
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._attn = None
            return
        assert self._attn is not None
        index = torch.tensor(keep, device=self._attn.device)
        for layer in self._layers(self._cache):
            layer.batch_select_indices(index)
        self._attn = self._attn.index_select(0, index)
        self._trim()

    # --- the KV cache -------------------------------------------------------------------------

    @staticmethod
    def _layers(cache: Any) -> list[Any]:
        layers = list(getattr(cache, "layers", []))
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            raise SteeringError(
                "BatchDecoder needs a transformers DynamicCache with full-attention layers; this "
                f"model's cache is {type(cache).__name__} with "
                f"{sorted({type(layer).__name__ for layer in layers})}."
            )
        return layers

    def _join(self, rows: list[_Row], cache: Any, attn: Tensor) -> None:
        """Append prefilled rows (their cache and attention mask) to the running batch, left-
        padding the shorter of the two caches with masked zero columns."""
        if self._cache is None or self._attn is None:
            self._layers(cache)
            self._rows, self._cache, self._attn = list(rows), cache, attn
            return
        old, new = self._layers(self._cache), self._layers(cache)
        length = max(self._attn.shape[1], attn.shape[1])

        def padded(t: Tensor, dim: int) -> Tensor:
            missing = length - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for a, b in zip(old, new, strict=True):
            a.keys = torch.cat([padded(a.keys, 2), padded(b.keys, 2)], dim=0)
            a.values = torch.cat([padded(a.values, 2), padded(b.values, 2)], dim=0)
        self._attn = torch.cat([padded(self._attn, 1), padded(attn, 1)], dim=0)
        self._rows.extend(rows)

    def _trim(self) -> None:
        """Drop leading cache columns that are padding in every running row."""
        assert self._attn is not None
        used = self._attn.any(dim=0).nonzero()
        start = int(used[0].item()) if used.numel() else 0
        if start == 0:
            return
        for layer in self._layers(self._cache):
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]
        self._attn = self._attn[:, start:]


# --- stop strings and log-probabilities ---------------------------------------------------------


def _checked_stop(stop: object) -> tuple[str, ...]:
    """``stop`` as a tuple of distinct non-empty strings, or a SteeringError."""
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) for s in stop):
        raise SteeringError(f"stop must be a list of strings, got {stop!r}.")
    if any(not s for s in stop):
        raise SteeringError("stop has an empty string; every stop string needs a character.")
    return tuple(dict.fromkeys(stop))


def _find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first of the ``stop`` strings starts in ``text`` (None: none does)."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _logprob(logits: Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` (one row) and the ``top`` likeliest."""
    logp = F.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = torch.topk(logp, top)
        best = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), best)
