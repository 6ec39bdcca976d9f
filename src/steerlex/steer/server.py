"""An OpenAI-compatible HTTP API over a :class:`~steerlex.steer.runtime.SteeredModel`.

:func:`make_server` returns a :class:`SteeringServer`: a Starlette app served by uvicorn (in a
thread of its own) with these endpoints:

- ``POST /v1/chat/completions``: chat replies (``n`` choices), whole or streamed as server-sent
  events in OpenAI's ``chat.completion.chunk`` format (ending with ``data: [DONE]``). Each
  choice carries a ``steerlex`` field: whether the gate opened, the features that fired, what
  was done (``action``: steered, none, refused, aborted) and the full steering report. ``stop``
  (a string or up to 4) cuts the reply before the first one and ends generation there;
  ``logprobs``/``top_logprobs`` give each token's log-probability under the steered model.
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one served model.
- ``GET /health``: whether the model worker is up, queue depth (no authentication).
- ``GET /metrics``: counters in Prometheus text format (no authentication).

Steering is on by default. A request may override it for itself only, with the extra body field
``"steerlex": {"steer": false}``, ``{"strength": 1.5}``, ``{"guard": "refuse"}`` or
``{"refusal": "..."}`` (the openai client: ``extra_body``). The guard (server default
``guard``) says what the strategy's gate does when it opens: steer (``"steer"``), answer with
the fixed refusal (``"refuse"``), or stop when the detector fires on the reply's own tokens
(``"abort"``); see :mod:`steerlex.steer.batching`.

Concurrency: one worker thread (:class:`ModelWorker`) owns the model and decodes the running
requests together, one batched forward pass per token, each row with its own steering, guard
and sampling (continuous batching: a request joins at the next step once a row is free, of
``max_batch``); the event loop only parses, validates and waits. A greedy reply is the same
tokens ``SteeredModel.chat`` gives alone for the same settings. Waiting requests sit in a
bounded queue; when it is full a request gets 429 with ``Retry-After``. All tokenizer work runs
on the worker too (a fast tokenizer is not safe to share between threads); before queueing, the
chat template is rendered (pure Python) off the event loop to refuse, from a cheap lower bound
on its token count, a prompt that cannot fit (:class:`_PromptBound`).

Hostile input: every request has ``read_timeout`` seconds in all to send its request line,
headers and body (then 408); at most ``max_connections`` connections are served at once (more
get a prompt 503); JSON nesting, numbers, text and the ``steerlex`` override are checked before
any work. Shutdown is graceful (:meth:`SteeringServer.shutdown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import math
import queue
import re
import reprlib
import signal
import socket
import sys
import threading
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from steerlex.core.errors import SteeringError, SteerlexError
from steerlex.models.chat import check_text
from steerlex.steer.batching import (
    DEFAULT_REFUSAL,
    GUARD_MODES,
    MAX_LOGPROBS,
    BatchDecoder,
    DecodeRequest,
    GuardMode,
)
from steerlex.steer.runtime import SteeredModel, SteeredResponse, TokenLogprob, encode_chat
from steerlex.steer.strategies import SteeringStrategy

__all__ = [
    "API_KEY_ENV",
    "ModelWorker",
    "ServerLimits",
    "SteeringServer",
    "check_guard",
    "make_server",
]

API_KEY_ENV = "STEERLEX_SERVER_API_KEY"
"""Environment variable the CLI reads the API key from when ``--api-key`` is not given."""

log = logging.getLogger(__name__)

# Fields OpenAI defines that would change the reply and that steerlex cannot honour: a request
# that sets them to anything but their neutral value gets 400 rather than a silently wrong reply.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}
_OVERRIDE_KEYS = ("steer", "strength", "guard", "refusal")
MAX_REFUSAL_CHARS = 2000
"""Longest refusal text a request may set (``steerlex.refusal``)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of JSON arrays/objects a request body may have (a chat request needs 5)."""
MAX_SEED = 2**63 - 1
"""Largest ``seed``: seeds are 0 to 2**63 - 1 (a signed 64-bit integer, as OpenAI's)."""
MAX_STOP = 4
"""Most ``stop`` strings a request may give (as OpenAI)."""
MAX_STOP_CHARS = 256
"""Longest ``stop`` string, in characters."""


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; anything larger is refused with a message naming the limit.

    ``max_tokens`` caps ``max_tokens``/``max_completion_tokens``; a request without one gets
    ``default_max_tokens`` (at most ``max_tokens``). ``max_prompt_tokens`` caps the chat-formatted
    prompt; prompt plus reply must also fit the model's context (``max_position_embeddings``).
    ``max_queue`` is how many requests may wait while the batch is full (``max_batch`` rows
    run at once). ``read_timeout`` (seconds) is
    the total time a client has to send its request line, headers and body (then 408).
    ``max_connections`` caps the connections served at once (more get 503 at once; keep it above
    ``max_queue`` + ``max_batch`` or the queue never fills). ``max_strength`` bounds a request's
    ``steerlex.strength``. ``max_batch`` is how many rows (choices) are decoded together;
    ``max_n`` the most choices (``n``) one request may ask for.
    """

    max_body_bytes: int = 1 << 20
    max_messages: int = 64
    max_tokens: int = 512
    default_max_tokens: int = 256
    max_prompt_tokens: int = 4096
    max_queue: int = 16
    read_timeout: float = 30.0
    max_connections: int = 64
    max_strength: float = 1000.0
    max_batch: int = 8
    max_n: int = 4

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes", "max_messages", "max_tokens", "default_max_tokens",
            "max_prompt_tokens", "max_queue", "max_connections", "max_batch", "max_n",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SteeringError(f"server limit {name} must be an int >= 1, got {value!r}.")
        for name in ("read_timeout", "max_strength"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (value > 0 and math.isfinite(value))
            ):
                raise SteeringError(f"server limit {name} must be a number > 0, got {value!r}.")


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": err}


# --- one request --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sampling:
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None


class _Cancelled(Exception):
    """Raised inside generation to stop a request whose client left or whose server shuts down."""


class _Events:
    """What the worker thread reports to one request, delivered on the request's event loop.

    ``put`` may be called from any thread; ``get`` is awaited on ``loop``. Once the loop is
    closed (the server stopped) a put is dropped: nobody is left to read it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(self, item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self, timeout: float) -> tuple[str, Any] | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None


@dataclass
class _Job:
    """A queued request; the worker reports on ``events``.

    Events, in order: ``("start", prompt_tokens)``, then with ``stream`` any number of
    ``("delta", (index, text, logprobs))``, then one ``("done", (index, SteeredResponse,
    logprobs))`` per choice (``n`` of them, in any order); or ``("error", ApiError)`` at any
    point instead. ``logprobs`` are OpenAI's ``logprobs.content`` entries of the tokens the
    event adds (empty unless asked for).
    ``stop`` are the request's stop strings; ``logprobs`` how many alternatives per token to
    report (None: no log-probabilities); ``cancel_reason`` says why ``cancelled`` was set by the
    server (None: the client left).
    """

    messages: list[dict[str, Any]]
    sampling: _Sampling
    strategy: SteeringStrategy | None
    enabled: bool
    stream: bool
    events: _Events
    stop: tuple[str, ...] = ()
    n: int = 1
    guard: GuardMode = "steer"
    refusal: str = DEFAULT_REFUSAL
    logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None
    # the worker's bookkeeping
    tickets: list[int] = field(default_factory=list)
    left: int = 0
    generated: int = 0
    began: float = 0.0


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first of the ``stop`` strings starts in ``text`` (None: none does)."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Where the longest end of ``text`` that could still grow into a stop string starts."""
    for start in range(max(0, len(text) - max(map(len, stop)) + 1), len(text)):
        tail = text[start:]
        if any(s.startswith(tail) for s in stop):
            return start
    return len(text)


class _Pieces:
    """OpenAI's log-probability entries for tokens: each token's text and bytes (cached).

    A byte-level BPE token's bytes are read from its vocabulary string (GPT-2's byte-to-
    character map), so a token that holds part of a UTF-8 character gets its true bytes and the
    text ``"bytes:\\xe2\\x80"`` (OpenAI's convention); for other tokenizers the bytes are the
    UTF-8 of the token's decoded text. Used on the worker thread only (it calls the tokenizer).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def piece(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is not None:
            return hit
        raw: bytes | None = None
        vocab = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(vocab, str) and vocab and all(c in _BYTE_CHARS for c in vocab):
            raw = bytes(_BYTE_CHARS[c] for c in vocab)
        if raw is None:
            raw = self.tokenizer.decode([token]).encode("utf-8")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        out = (text, list(raw))
        if len(self._cache) < 200_000:
            self._cache[token] = out
        return out

    def entry(self, lp: TokenLogprob) -> dict[str, Any]:
        """One ``logprobs.content`` entry: the token, its log-probability, the alternatives."""
        text, raw = self.piece(lp.token)
        top = []
        for token, value in lp.top:
            t, b = self.piece(token)
            top.append({"token": t, "logprob": value, "bytes": b})
        return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}


class _Streamer:
    """Turns one choice's generated token ids into text deltas whose concatenation is the final
    text, each with the log-probabilities of the tokens it adds (when asked for).

    Text is released up to the last whitespace (like transformers' ``TextStreamer``), so a
    detokenizer that merges or cleans across token boundaries cannot change what was already
    sent; the rest comes with the final text. Text that could be the start of a stop string is
    held back, and nothing at or after a stop string is ever sent (the decoder ends the reply
    there).
    """

    def __init__(self, tokenizer: Any, job: _Job, index: int, pieces: _Pieces) -> None:
        self.tokenizer = tokenizer
        self.job = job
        self.index = index
        self.pieces = pieces
        self.ids: list[int] = []
        self.sent = ""
        self.pending: list[TokenLogprob] = []

    def push(self, token: int, logprob: TokenLogprob | None) -> None:
        self.ids.append(token)
        if logprob is not None:
            self.pending.append(logprob)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        stop = self.job.stop
        if stop:
            cut = _cut_at_stop(text, stop)
            text = text[:cut] if cut is not None else text[: _held_back(text, stop)]
        if text.endswith("\ufffd"):  # an unfinished multi-byte character
            return
        cut = max(text.rfind(" "), text.rfind("\n")) + 1
        self._emit(text[:cut])

    def finish(self, final: str) -> None:
        if not final.startswith(self.sent):  # should not happen; never resend text
            log.warning("streamed text %r is not a prefix of the reply %r", self.sent, final)
            return
        self._emit(final, last=True)

    def _emit(self, upto: str, last: bool = False) -> None:
        grows = len(upto) > len(self.sent) and upto.startswith(self.sent)
        if grows or (last and self.pending):
            delta = upto[len(self.sent) :] if grows else ""
            entries = [self.pieces.entry(lp) for lp in self.pending]
            self.job.events.put(("delta", (self.index, delta, entries)))
            self.pending = []
            if grows:
                self.sent = upto


# --- a cheap lower bound on a prompt's token count -----------------------------------------------

# The bound measures a text nine ways: the bytes of each of four classes (ASCII letters and
# digits "a", ASCII whitespace "s", other ASCII "o", non-ASCII "h"), all its bytes, and the runs
# (maximal stretches) of each class. One token holds at most ``most[i]`` of measure i, so a text
# measuring ``n[i]`` has at least ``ceil(n[i] / most[i])`` tokens, for every i. Measuring classes
# and runs apart keeps the bound useful when a vocabulary has a few very long tokens (runs of
# spaces or of "="): a word of letters needs a token of its own whatever its length.
_CLASS_OF = bytes(
    ord("a") if chr(b).isascii() and chr(b).isalnum()
    else ord("s") if b in b" \t\n\r\x0b\x0c"
    else ord("o") if b < 128
    else ord("h")
    for b in range(256)
)  # fmt: skip
_CLASSES = (b"a", b"s", b"o", b"h")


def _measures(data: bytes) -> tuple[int, ...]:
    """(bytes of each class, all bytes, runs of each class) of ``data``; see above."""
    kinds = data.translate(_CLASS_OF)
    counts = [kinds.count(c) for c in _CLASSES]
    runs = [
        kinds.startswith(c) + sum(kinds.count(d + c) for d in _CLASSES if d != c) for c in _CLASSES
    ]
    return (*counts, len(data), *runs)


def _most_measures(pieces: list[bytes]) -> list[int]:
    """The most of each :func:`_measures` measure any one of ``pieces`` has (in a few passes
    over all of them together, not one per piece: a vocabulary has 150,000)."""
    kinds = b"|".join(p.translate(_CLASS_OF) for p in pieces)
    runs = re.sub(rb"([asoh])\1+", rb"\1", kinds)  # each run becomes one letter
    out = []
    for text in (kinds, runs):
        for c in _CLASSES:
            others = b"".join(d for d in _CLASSES if d != c)
            out.append(max(map(len, text.translate(None, others).split(b"|"))))
    return [*out[:4], max(map(len, kinds.split(b"|"))), *out[4:]]


def _gpt2_byte_chars() -> dict[str, int]:
    """The ByteLevel pre-tokenizer's character for each byte (GPT-2's ``bytes_to_unicode``)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_CHARS = _gpt2_byte_chars()
_BYTE_TABLE = str.maketrans({c: chr(b) for c, b in _BYTE_CHARS.items()})
_Transform = Callable[[str], str]


def _drop_whitespace(text: str) -> str:
    return "".join(text.split())


def _normalizing(form: Any) -> _Transform:
    return lambda t: unicodedata.normalize(form, t)


def _replacing(old: str, new: str) -> _Transform:
    return lambda t: t.replace(old, new)


def _normalizer_steps(spec: Any, steps: list[_Transform]) -> bool:
    """Append Python equivalents of a tokenizers normalizer; False if it might drop characters."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_normalizer_steps(n, steps) for n in spec.get("normalizers", []))
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        steps.append(_normalizing(kind))
        return True
    if kind == "Lowercase":
        steps.append(str.lower)
        return True
    if kind == "Prepend":  # only adds characters: leaving it out keeps the bound low
        return True
    if kind == "Replace":
        pattern, content = (spec.get("pattern") or {}).get("String"), spec.get("content")
        if isinstance(pattern, str) and len(pattern) == 1 and isinstance(content, str):
            steps.append(_replacing(pattern, content))
            return True
    # Strip, StripAccents, BertNormalizer, Precompiled, regex Replace, ...: may drop characters
    return False


def _pre_tokenizer_steps(spec: Any, steps: list[_Transform]) -> bool | None:
    """Python equivalents of a pre-tokenizer: None if it may drop characters, else whether it
    is byte-level (tokens are then made of bytes, written as GPT-2's byte characters)."""
    if spec is None:
        return False
    kind = spec.get("type")
    if kind == "Sequence":
        parts = [_pre_tokenizer_steps(p, steps) for p in spec.get("pretokenizers", [])]
        return None if None in parts else any(parts)
    if kind == "ByteLevel":
        return True
    if kind == "Metaspace":
        replacement = spec.get("replacement", "\u2581")
        steps.append(_replacing(" ", str(replacement)))
        return False
    if kind in ("Split", "Punctuation") and spec.get("behavior") != "Removed":
        return False
    if kind in ("Digits", "UnicodeScripts"):
        return False
    return None  # Whitespace, WhitespaceSplit, BertPreTokenizer, ...: drop whitespace


@dataclass(frozen=True)
class _PromptBound:
    """A lower bound on how many tokens a text has, computed without the tokenizer.

    It holds for tokenizers whose every token stands for a known, bounded piece of the normalized
    text: BPE whose unknown characters cannot merge into one token (byte-level, byte fallback, or
    an unfused unknown token), or Unigram with byte fallback, behind normalizers and
    pre-tokenizers that never drop a character (NFC/NFKC/..., Lowercase, Prepend, one-character
    Replace; ByteLevel, Metaspace, Split, Digits, Punctuation). That covers the byte-level BPE of
    GPT-2, Llama 3 and Qwen and the SentencePiece BPE of Llama 2, Mistral and Gemma. For others
    (WordLevel or WordPiece, whose one unknown token may stand for a word of any length; a
    pre-tokenizer that drops whitespace) :meth:`of` returns None and only the worker counts.
    Where an added token strips the whitespace around it, the bound counts no whitespace.

    ``steps`` turn a text into the tokenizer's normalized form (as Python does it; where it could
    differ, the Python form never measures more); ``most[i]`` is the most of measure i (see
    :func:`_measures`) any one token covers there, at least that of one character (an unknown or
    byte-fallback token covers one). ``drop`` are bytes a byte-level vocabulary without an
    unknown token lacks: the tokenizer drops them, so they are not counted (SmolLM2 lacks 21).
    """

    steps: tuple[_Transform, ...]
    most: tuple[int, ...]
    drop: bytes = b""

    def tokens_at_least(self, text: str) -> int:
        for step in self.steps:
            text = step(text)
        data = text.encode("utf-8", "surrogatepass")
        if self.drop:
            data = data.translate(None, self.drop)
        counts = _measures(data)
        return max(-(-n // m) for n, m in zip(counts, self.most, strict=True))

    @classmethod
    def of(cls, tokenizer: Any) -> _PromptBound | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer: nothing to read the structure from
            return None
        try:
            spec = json.loads(backend.to_str())
            return cls._from_spec(spec)
        except Exception:  # an unexpected layout: no bound, the worker still counts
            log.debug("no prompt bound for this tokenizer", exc_info=True)
            return None

    @classmethod
    def _from_spec(cls, spec: Mapping[str, Any]) -> _PromptBound | None:
        steps: list[_Transform] = []
        if not _normalizer_steps(spec.get("normalizer"), steps):
            return None
        byte_level = _pre_tokenizer_steps(spec.get("pre_tokenizer"), steps)
        if byte_level is None:
            return None
        model = spec.get("model") or {}
        fallback = bool(model.get("byte_fallback"))
        drop = b""
        if model.get("type") == "BPE":
            vocab = list(model.get("vocab") or {})
            unk = model.get("unk_token")
            if unk is not None and model.get("fuse_unk") and not fallback:
                return None  # a run of unknown characters becomes one token
            if unk is None and not fallback:  # characters outside the vocabulary are dropped
                if not byte_level:
                    return None
                known = set(vocab)
                drop = bytes(sorted(b for c, b in _BYTE_CHARS.items() if c not in known))
        elif model.get("type") == "Unigram" and fallback:
            vocab = [piece for piece, _score in model.get("vocab") or []]
        else:
            return None
        if any(a.get("lstrip") or a.get("rstrip") for a in spec.get("added_tokens") or []):
            steps.insert(0, _drop_whitespace)  # such a token swallows the whitespace next to it
        pieces: list[bytes] = []
        for piece in vocab:
            if byte_level and all(c in _BYTE_CHARS for c in piece):
                pieces.append(piece.translate(_BYTE_TABLE).encode("latin-1"))
            else:
                pieces.append(piece.encode("utf-8", "surrogatepass"))
        for added in spec.get("added_tokens") or []:
            content = str(added.get("content", ""))
            normalized = content
            for step in steps:
                normalized = step(normalized)
            pieces += [content.encode("utf-8", "surrogatepass"), normalized.encode("utf-8")]
        one_character = [4] * 5 + [1] * 4  # an unknown or byte-fallback token: 4 bytes, one run
        most = map(max, one_character, _most_measures(pieces))
        return cls(tuple(steps), tuple(most), drop)


# --- metrics ------------------------------------------------------------------------------------


class _Metrics:
    """The counters behind ``/metrics`` (Prometheus text format); safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = 0
        self.busy_seconds = 0.0
        self.steps = 0
        self.step_rows = 0
        self.replies = 0
        self.gate_opens = 0
        self.gate_checks = 0
        self.stopped_by_string = 0
        self.aborted = 0
        self.refused = 0
        self.guard_aborted = 0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def step(self, rows: int, seconds: float) -> None:
        """One decoder step over ``rows`` rows that took ``seconds``."""
        with self._lock:
            self.steps += 1
            self.step_rows += rows
            self.busy_seconds += seconds

    def reply(self, r: SteeredResponse, stop: tuple[str, ...], eos: frozenset[int]) -> None:
        """A finished reply (``stop``: its request's stop strings; ``eos``: the EOS ids)."""
        with self._lock:
            self.replies += 1
            self.tokens += len(r.token_ids) if r.guard != "refused" else 0
            if r.report.gate_open is not None:
                self.gate_checks += 1
                self.gate_opens += bool(r.report.gate_open)
            self.refused += r.guard == "refused"
            self.guard_aborted += r.guard == "aborted"
            self.stopped_by_string += bool(
                stop and r.finish_reason == "stop" and r.token_ids and r.token_ids[-1] not in eos
            )

    def count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def render(self, queued: int, running: int, batch_rows: int, connections: int) -> str:
        with self._lock:
            rows: list[tuple[str, str, str, list[tuple[str, float]]]] = [
                ("steerlex_requests_total", "counter", "HTTP requests answered, by endpoint "
                 "and status code (refusals are the 4xx and 5xx).",
                 [(f'{{endpoint="{e}",status="{s}"}}', n)
                  for (e, s), n in sorted(self.requests.items())]),
                ("steerlex_queue_depth", "gauge", "Requests waiting for the model.",
                 [("", queued)]),
                ("steerlex_running", "gauge", "Requests being decoded now.",
                 [("", running)]),
                ("steerlex_batch_rows", "gauge", "Rows (choices) in the running batch now.",
                 [("", batch_rows)]),
                ("steerlex_decode_steps_total", "counter", "Batched decoder steps (one forward "
                 "pass each, plus a prefill when requests join).", [("", self.steps)]),
                ("steerlex_decode_rows_total", "counter", "Rows decoded, summed over steps "
                 "(divided by the steps: the mean batch size).", [("", self.step_rows)]),
                ("steerlex_mean_batch_size", "gauge", "Mean rows per decoder step, over the "
                 "server's life.", [("", self.step_rows / self.steps if self.steps else 0)]),
                ("steerlex_connections", "gauge", "Open client connections.",
                 [("", connections)]),
                ("steerlex_replies_total", "counter", "Replies generated to the end.",
                 [("", self.replies)]),
                ("steerlex_generated_tokens_total", "counter", "Tokens generated in those "
                 "replies.", [("", self.tokens)]),
                ("steerlex_busy_seconds_total", "counter", "Seconds the model spent in decoder "
                 "steps.", [("", self.busy_seconds)]),
                ("steerlex_tokens_per_second", "gauge", "Generated tokens per busy second, "
                 "over the server's life (all rows together).",
                 [("", self.tokens / self.busy_seconds if self.busy_seconds else 0)]),
                ("steerlex_gate_checks_total", "counter", "Replies whose strategy has a "
                 "condition (gate).", [("", self.gate_checks)]),
                ("steerlex_gate_opens_total", "counter", "Replies whose gate opened (steering "
                 "applied).", [("", self.gate_opens)]),
                ("steerlex_stop_string_total", "counter", "Replies cut at a stop string.",
                 [("", self.stopped_by_string)]),
                ("steerlex_refused_total", "counter", "Replies a refuse guard answered with "
                 "its refusal.", [("", self.refused)]),
                ("steerlex_guard_aborted_total", "counter", "Replies an abort guard stopped "
                 "when the detector fired on the reply.", [("", self.guard_aborted)]),
                ("steerlex_aborted_total", "counter", "Generations stopped by a shutdown.",
                 [("", self.aborted)]),
            ]  # fmt: skip
        lines: list[str] = []
        for name, kind, help_, samples in rows:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels} {_prom_number(v)}" for labels, v in samples]
        return "\n".join(lines) + "\n"


def _prom_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# --- the model worker ---------------------------------------------------------------------------


class ModelWorker:
    """The one thread that owns the model: it decodes the running requests together, in one
    batched forward pass per token (:class:`~steerlex.steer.batching.BatchDecoder`), each with
    its own steering, guard and sampling settings.

    A queued job joins the running batch at the next step once a row is free (``max_batch``
    rows; a job with ``n`` choices takes ``n``), in arrival order, and leaves it when its last
    choice is done. The HTTP layer only calls :meth:`submit` (and reads :meth:`queued`). The
    model is not thread-safe; nothing else may generate with it while the worker runs.
    :meth:`close` refuses new jobs and answers the waiting ones with 503; :meth:`abort` stops
    the running ones at their next token; :meth:`join` waits for the thread.
    """

    def __init__(self, steered: SteeredModel, limits: ServerLimits, metrics: _Metrics) -> None:
        self.steered = steered
        self.limits = limits
        self.metrics = metrics
        self.decoder = BatchDecoder(steered, max_batch=limits.max_batch)
        # the queue holds the waiting jobs and those about to take a free row: a burst that
        # arrives while a step runs may fill the free rows as well as max_queue (see submit)
        self.jobs: queue.Queue[_Job] = queue.Queue(maxsize=limits.max_queue + limits.max_batch)
        self._active: dict[int, tuple[_Job, int, _Streamer | None]] = {}  # ticket ->
        self._running: list[_Job] = []
        self._lock = threading.Lock()
        self._closing = False
        self._idle = threading.Event()
        self._idle.set()
        self._job_seconds = 1.0  # moving average, for Retry-After
        config = steered._generation_config(1, False, 1.0, 1.0)
        self._eos = frozenset(steered._eos_ids(config))
        self._pieces = _Pieces(steered.loaded.tokenizer)
        self._thread = threading.Thread(target=self._work, name="steerlex-serve-worker",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def submit(self, job: _Job) -> None:
        """Queue ``job``, or raise 429 (queue full) / 503 (shutting down).

        ``job`` is taken while the running jobs and the queued ones number fewer than
        ``max_batch + max_queue``: those that will find a free row at the next step plus
        ``max_queue`` that wait for one (a job with ``n`` choices counts once here)."""
        with self._lock:
            if self._closing:
                raise _shutting_down()
            try:
                if self.jobs.qsize() + len(self._running) >= self.jobs.maxsize:
                    raise queue.Full
                self.jobs.put_nowait(job)
            except queue.Full:
                waves = (self.jobs.qsize() + 1) / self.limits.max_batch
                wait = max(1, min(60, math.ceil(self._job_seconds * waves)))
                raise ApiError(
                    429,
                    f"the server is busy: {self.limits.max_queue} requests are already waiting "
                    f"(limit max_queue={self.limits.max_queue}); retry after {wait} s.",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": str(wait)},
                ) from None
            self._idle.clear()

    def queued(self) -> int:
        return self.jobs.qsize()

    def running(self) -> int:
        """Requests being decoded now."""
        return len(self._running)

    def rows(self) -> int:
        """Rows (choices) in the running batch."""
        return self.decoder.running

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Take no more jobs; answer every waiting one with 503."""
        with self._lock:
            self._closing = True
        while True:
            try:
                self.jobs.get_nowait().events.put(("error", _shutting_down()))
            except queue.Empty:
                break

    def wait_idle(self, seconds: float, hurry: threading.Event | None = None) -> bool:
        """Wait up to ``seconds`` for the running jobs to end (sooner once ``hurry`` is set)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._idle.wait(min(left, 0.1)):
                return True
            if hurry is not None and hurry.is_set():
                return False
        return self._idle.is_set()

    def abort(self, reason: str) -> None:
        """Stop the running jobs at their next token; they end with an error saying ``reason``."""
        for job in list(self._running):
            job.cancel_reason = reason
            job.cancelled.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # --- the loop -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            self._admit(block=not self._running)
            self._reap()
            if self._running:
                self._step()
                continue
            with self._lock:
                if self.jobs.empty():
                    self._idle.set()
                    if self._closing:
                        return

    def _admit(self, block: bool) -> None:
        """Start queued jobs while the batch has free rows (waiting up to 0.1 s for one when
        ``block``)."""
        while self.decoder.running + self.decoder.waiting < self.limits.max_batch:
            try:
                job = self.jobs.get(timeout=0.1) if block else self.jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            if self._closing:
                job.events.put(("error", _shutting_down()))
            elif not job.cancelled.is_set():
                self._start(job)

    def _start(self, job: _Job) -> None:
        """Encode ``job`` and hand its ``n`` choices to the decoder (or report why not)."""
        steered = self.steered
        tok = steered.loaded.tokenizer
        try:
            encoded = encode_chat(tok, job.messages)
            n_prompt = len(encoded.input_ids)
            _check_prompt_fits(n_prompt, "", job, self.limits, steered)
            s = job.sampling
            streamers = [
                _Streamer(tok, job, i, self._pieces) if job.stream else None for i in range(job.n)
            ]
            requests = [
                DecodeRequest(
                    encoded,
                    max_new_tokens=s.max_tokens,
                    strategy=job.strategy,
                    enabled=job.enabled,
                    do_sample=s.temperature > 0,
                    temperature=s.temperature if s.temperature > 0 else 1.0,
                    top_p=s.top_p,
                    seed=None if s.seed is None else (s.seed + i) % (MAX_SEED + 1),
                    guard=job.guard,
                    refusal=job.refusal,
                    stop=job.stop,
                    logprobs=job.logprobs,
                    on_token=functools.partial(self._on_token, job, streamers[i]),
                )
                for i in range(job.n)
            ]
            tickets = []
            try:
                for request in requests:
                    tickets.append(self.decoder.submit(request))
            except BaseException:
                for ticket in tickets:
                    self.decoder.cancel(ticket)
                raise
        except ApiError as exc:
            job.events.put(("error", exc))
            return
        except SteerlexError as exc:
            job.events.put(("error", ApiError(400, str(exc), param="messages")))
            return
        except Exception as exc:  # a bug: keep serving the others
            log.exception("starting a generation failed")
            job.events.put(("error", ApiError(500, f"generation failed: {exc}",
                                              type="server_error")))  # fmt: skip
            return
        job.tickets, job.left, job.began = tickets, job.n, time.perf_counter()
        for i, ticket in enumerate(tickets):
            self._active[ticket] = (job, i, streamers[i])
        self._running.append(job)
        job.events.put(("start", n_prompt))

    @staticmethod
    def _on_token(
        job: _Job, streamer: _Streamer | None, token: int, logprob: TokenLogprob | None
    ) -> None:
        job.generated += 1
        if streamer is not None:
            streamer.push(token, logprob)

    def _reap(self) -> None:
        """Drop the running jobs that were cancelled (client gone, or the server stopping)."""
        for job in [j for j in self._running if j.cancelled.is_set()]:
            self._end(job)
            if job.cancel_reason is not None:
                self.metrics.count("aborted")
            reason = job.cancel_reason or "the request was stopped"
            job.events.put(("error", ApiError(
                503, f"{reason}: the reply was cut off after {job.generated} generated tokens; "
                "retry later.", type="server_error", code="generation_aborted",
            )))  # fmt: skip

    def _end(self, job: _Job) -> None:
        """Take ``job`` out of the batch (its unfinished choices are dropped)."""
        for ticket in job.tickets:
            if self._active.pop(ticket, None) is not None:
                self.decoder.cancel(ticket)
        if job in self._running:
            self._running.remove(job)
        took = time.perf_counter() - job.began
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * took

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            finished = self.decoder.step()
        except Exception as exc:  # a model failure: every running job fails, the queue goes on
            log.exception("generation failed")
            for job in list(self._running):
                self._end(job)
                job.events.put(
                    ("error", ApiError(500, f"generation failed: {exc}", type="server_error"))
                )
            return
        self.metrics.step(self.decoder.running + len(finished), time.perf_counter() - t0)
        for ticket, response in finished:
            active = self._active.pop(ticket, None)
            if active is None:
                continue
            job, index, streamer = active
            self.metrics.reply(response, job.stop, self._eos)
            entries: list[dict[str, Any]] = []
            if streamer is not None:
                streamer.finish(response.text)
            elif response.logprobs is not None:
                entries = [self._pieces.entry(lp) for lp in response.logprobs]
            job.events.put(("done", (index, response, entries)))
            job.left -= 1
            if job.left == 0:
                self._end(job)


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry later.", type="server_error",
                    code="server_shutting_down", headers={"Retry-After": "5"})  # fmt: skip


# --- HTTP: the connection layer (uvicorn's h11 protocol with a total read deadline and a cap) -----


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus the two guards the ASGI app cannot see.

    Read deadline: from the moment a connection opens (or its previous reply ends, on a
    keep-alive connection) the client has ``read_timeout`` seconds in all to send its request
    line, headers and body; then it gets 408 and is closed. (uvicorn alone bounds only the idle
    time between requests: a client dripping a byte a second would hold its connection forever.)

    Connection cap: a connection opened while ``max_connections`` others are open is answered
    503 (``too_many_connections``, ``Retry-After: 1``) as soon as its request line and headers
    are in, or after half a second, and closed; it never reaches the app.
    """

    srv: SteeringServer  # set on the per-server subclass

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expired = False
        self._deadline: asyncio.TimerHandle | None = None
        limits = self.srv.limits
        self.refused = sum(not getattr(c, "refused", False) for c in self.connections) > (
            limits.max_connections
        )
        if self.refused:
            self.app = self.srv._refuse_app
        self._arm(0.5 if self.refused else limits.read_timeout)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._expired:  # answered 408: read and drop the rest until the close
            return
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the whole request is in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._arm(self.srv.limits.read_timeout)  # the next request on this connection

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        self._expired = True
        if self.refused:
            status, reason, exc = 503, "Service Unavailable", self.srv._too_many()
        else:
            seconds = self.srv.limits.read_timeout
            log.info("%s sent no whole request within %g s", self.client, seconds)
            status, reason = 408, "Request Timeout"
            exc = ApiError(
                408,
                f"the request did not arrive within read_timeout={seconds:g} s (request line, "
                "headers and body together); send it at once.",
                code="request_timeout",
            )
        self.srv.metrics.request("other", status)
        self.transport.write(_http_bytes(status, reason, _dumps(exc.body()), exc.headers))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # close a moment later, so that the client reads the answer before the connection goes
        self.loop.call_later(0.5, self.transport.close)


# --- HTTP: the ASGI app -------------------------------------------------------------------------


_ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions")


class _Gone(Exception):
    """The client disconnected (or hit the read deadline) while sending its body."""


class _App:
    """The Starlette app of one :class:`SteeringServer`: routes, auth, body limits, streaming."""

    def __init__(self, srv: SteeringServer) -> None:
        self.srv = srv
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]
        handlers: dict[Any, Any] = {
            ApiError: self.api_error,
            HTTPException: self.http_error,
            _Gone: self.gone,
            Exception: self.bug,
        }
        self.app = Starlette(routes=routes, exception_handlers=handlers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Count each answer in ``/metrics`` by endpoint and status."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        endpoint = "/v1/models" if path.startswith("/v1/models/") else path
        endpoint = endpoint if endpoint in _ENDPOINTS else "other"
        status = [500]

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.srv.metrics.request(endpoint, status[0])

    # --- errors -------------------------------------------------------------------------------

    async def api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _json(exc.status, exc.body(), exc.headers)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path = request.url.path
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "GET")
            err = ApiError(405, f"{path} takes {allowed}, not {request.method}.")
        elif exc.status_code == 404:
            err = ApiError(404, f"no endpoint {path}; see /v1/chat/completions, /v1/models.")
        else:
            err = ApiError(exc.status_code, str(exc.detail))
        return _json(err.status, err.body(), exc.headers)

    async def gone(self, request: Request, exc: Exception) -> Response:
        return Response(status_code=400)  # nobody reads it: the connection is closed

    async def bug(self, request: Request, exc: Exception) -> Response:
        log.error("request failed", exc_info=exc)
        err = ApiError(500, f"internal error: {exc}", type="server_error")
        return _json(500, err.body())

    # --- endpoints ----------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self.srv.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode("utf-8", "surrogateescape")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given, key)):
            raise ApiError(
                401,
                "missing or wrong API key; send the header Authorization: Bearer <key>.",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def health(self, request: Request) -> Response:
        srv = self.srv
        closing = srv.closing()
        data = {"status": "shutting_down" if closing else "ok", "model": srv.model_name,
                "model_loaded": srv.worker.alive(), "queued": srv.queued(),
                "running": srv.worker.running(), "batch_rows": srv.worker.rows(),
                "max_batch": srv.limits.max_batch, "max_queue": srv.limits.max_queue,
                "connections": srv.connections(),
                "max_connections": srv.limits.max_connections}  # fmt: skip
        return _json(503 if closing else 200, data)

    async def metrics(self, request: Request) -> Response:
        srv = self.srv
        worker = srv.worker
        text = srv.metrics.render(srv.queued(), worker.running(), worker.rows(), srv.connections())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_card(self) -> dict[str, Any]:
        srv = self.srv
        return {
            "id": srv.model_name,
            "object": "model",
            "created": srv.created,
            "owned_by": "steerlex",
            "steerlex": {
                "strategy": srv.steered.describe(),
                "steer": srv.steered.enabled,
                "layer": srv.steered.layer,
            },
        }

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return _json(200, {"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        name = request.path_params["model_id"]
        if name != self.srv.model_name:
            raise ApiError(404, f"model {name!r} not found; this server serves "
                           f"{self.srv.model_name!r}.", code="model_not_found")  # fmt: skip
        return _json(200, self._model_card())

    async def chat(self, request: Request) -> Response:
        srv = self.srv
        self._authorize(request)
        body = await self._read_json(request)
        job, include_usage = _parse_chat(body, srv)
        if srv.prompt_bound is not None:  # renders the chat template: off the event loop
            await asyncio.to_thread(_check_prompt_bound, job, srv)
        srv.worker.submit(job)
        if job.stream:
            try:
                kind, value = await self._next(job)
                if kind == "error":
                    raise value
            except BaseException:
                job.cancelled.set()
                raise
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            return StreamingResponse(
                self._stream(job, rid, int(value), include_usage),
                media_type="text/event-stream; charset=utf-8",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        try:
            done: dict[int, tuple[SteeredResponse, list[dict[str, Any]]]] = {}
            while len(done) < job.n:
                kind, value = await self._next(job)
                if kind == "error":
                    raise value
                if kind == "done":
                    done[value[0]] = (value[1], value[2])
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            return _json(200, _completion(rid, srv.model_name, done, job))
        finally:
            watcher.cancel()
            job.cancelled.set()  # a no-op once done

    async def _watch_disconnect(self, request: Request, job: _Job) -> None:
        """Cancel ``job`` when its client leaves before the reply."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancelled.set()
                return

    async def _next(self, job: _Job) -> tuple[str, Any]:
        while True:
            event = await job.events.get(1.0)
            if event is not None:
                return event
            if not self.srv.worker.alive():
                return "error", ApiError(503, "the server shut down.", type="server_error")

    async def _stream(
        self, job: _Job, rid: str, prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[bytes]:
        srv = self.srv
        created = int(time.time())

        def chunk(
            index: int,
            delta: dict[str, Any],
            finish: str | None = None,
            logprobs: list[dict[str, Any]] | None = None,
            **extra: Any,
        ) -> bytes:
            lp = {"content": logprobs, "refusal": None} if logprobs else None
            data: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": srv.model_name,
                "choices": [
                    {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}
                ],
            }
            if include_usage:
                data["usage"] = None
            data.update(extra)
            return _sse(data)

        try:
            for index in range(job.n):
                yield chunk(index, {"role": "assistant", "content": ""})
            completion_tokens, finished = 0, 0
            while finished < job.n:
                kind, value = await self._next(job)
                if kind == "delta":
                    index, text, entries = value
                    yield chunk(index, {"content": text} if text else {}, logprobs=entries)
                elif kind == "done":
                    index, r, _entries = value
                    completion_tokens += _completion_tokens(r)
                    finished += 1
                    yield chunk(index, {}, r.finish_reason, steerlex=_steerlex_field(r, job))
                    if finished == job.n and include_usage:
                        yield _sse(
                            {"id": rid, "object": "chat.completion.chunk", "created": created,
                             "model": srv.model_name, "choices": [],
                             "usage": _usage(prompt_tokens, completion_tokens)}
                        )  # fmt: skip
                elif kind == "error":  # after the headers went out: report it in the stream
                    yield _sse(value.body())
                    break
            yield b"data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a no-op once done; frees the worker if the client left

    async def _read_json(self, request: Request) -> Any:
        limits = self.srv.limits
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length.")
        length_header = request.headers.get("content-length")
        if length_header is None:
            raise ApiError(411, "the request has no Content-Length header.")
        try:
            length = int(length_header)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {length_header!r}.") from None
        if length < 0:
            raise ApiError(400, f"bad Content-Length {length_header!r}.")
        if length > limits.max_body_bytes:
            raise ApiError(
                413,
                f"the request body has {length} bytes, over the limit max_body_bytes="
                f"{limits.max_body_bytes}.",
                code="request_too_large",
            )
        parts: list[bytes] = []
        try:
            async for part in request.stream():
                parts.append(part)
        except ClientDisconnect:
            raise _Gone from None
        raw = b"".join(parts)
        if len(raw) != length:
            raise ApiError(400, f"the body ended after {len(raw)} of {length} bytes.")
        too_deep = ApiError(
            400,
            f"the request body is nested more than {MAX_JSON_DEPTH} levels deep (JSON arrays and "
            "objects in one another); a chat request needs about 5.",
            code="json_too_deep",
        )
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc}).") from None
        except RecursionError:
            raise too_deep from None
        except ValueError:  # an integer of more than sys.get_int_max_str_digits() digits
            raise ApiError(
                400,
                f"the request body has a number too long to read (more than "
                f"{sys.get_int_max_str_digits()} digits).",
            ) from None
        if _nesting_over(body, MAX_JSON_DEPTH):
            raise too_deep
        return body


def _json(status: int, data: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(_dumps(data), status_code=status, headers=dict(headers or {}),
                    media_type="application/json")  # fmt: skip


def _sse(data: Any) -> bytes:
    return b"data: " + _dumps(data) + b"\n\n"


# --- the server ---------------------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its signal handling (the owner of the process decides what a
    signal does: see :meth:`SteeringServer.shutdown`), telling when it accepts connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.accepting = threading.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.accepting.set()


class SteeringServer:
    """The HTTP server (Starlette on uvicorn, in its own thread) and the model worker thread.

    ``start()`` serves from a background thread and returns once connections are accepted;
    ``serve_forever()`` does the same and blocks until :meth:`shutdown` (from a signal handler's
    thread, say) has finished. ``url`` is ``http://host:port`` (the real port when created with
    port 0). ``with`` shuts down on exit.

    :meth:`shutdown` is graceful: new and waiting requests get 503 at once; the running
    generation has ``shutdown_grace`` seconds to finish (its reply is then sent whole), else it
    is stopped at its next token and its client gets an error (a 503, or in a stream an
    ``{"error": ...}`` event and ``data: [DONE]``); then the worker is joined, the connections are
    closed and the port freed. It returns only when all of that is done, from any thread, however
    often it is called.
    """

    address_family = socket.AF_INET
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: bursts of connections wait instead of being reset

    def __init__(
        self,
        steered: SteeredModel,
        address: tuple[str, int],
        *,
        model_name: str,
        api_key: str | None,
        limits: ServerLimits,
        shutdown_grace: float = 10.0,
        guard: GuardMode = "steer",
        refusal: str = DEFAULT_REFUSAL,
    ) -> None:
        family = socket.AF_INET6 if ":" in address[0] else self.address_family
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(self.request_queue_size)
        except BaseException:
            sock.close()
            raise
        self.socket = sock
        self.server_address = sock.getsockname()
        self.steered = steered
        self.model_name = model_name
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.limits = limits
        self.shutdown_grace = shutdown_grace
        self.guard: GuardMode = guard
        self.refusal = refusal
        self.created = int(time.time())
        self.metrics = _Metrics()
        # read on this thread, before the worker exists: the tokenizer is not shared yet
        self.prompt_bound = _PromptBound.of(steered.loaded.tokenizer)
        self.worker = ModelWorker(steered, limits, self.metrics)
        self.app = _App(self)
        protocol = type("_ServerProtocol", (_Protocol,), {"srv": self})
        config = uvicorn.Config(
            self.app, http=protocol, lifespan="off", log_config=None, access_log=False,
            proxy_headers=False, server_header=False, date_header=True, ws="none",
            loop="asyncio", interface="asgi3", backlog=self.request_queue_size,
            timeout_keep_alive=5, timeout_graceful_shutdown=5,
            headers=[("server", "steerlex")],
        )  # fmt: skip
        self._uvicorn = _Uvicorn(config)
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._closing = threading.Event()
        self._hurry = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """Serve from a background thread; returns once the server accepts connections."""
        with self._lock:
            if self._closing.is_set():
                raise SteeringError("this server was shut down; make a new one.")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="steerlex-serve",
                                                daemon=True)  # fmt: skip
                self._thread.start()
        thread = self._thread
        deadline = time.monotonic() + 10
        while not self._uvicorn.accepting.wait(0.05):
            if not thread.is_alive() or time.monotonic() > deadline:
                break
        if self._uvicorn.accepting.is_set():
            self._serving.set()
        return thread

    def _serve(self) -> None:
        try:
            asyncio.run(self._uvicorn.serve(sockets=[self.socket]))
        except BaseException:  # SystemExit from a failed startup, or a bug
            log.exception("the HTTP server stopped")
        finally:
            self._serving.clear()

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` has finished.

        On the main thread it also owns SIGTERM and SIGINT while it serves (the previous
        handlers come back afterwards): the first such signal starts :meth:`shutdown` on another
        thread, a second one cuts its grace short (:meth:`hurry`). Either way this returns only
        once the worker is joined and the port closed, so the process can exit cleanly.
        """
        thread = self.start()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            while not self._closed.is_set() and thread.is_alive():
                thread.join(0.2)
            if self._closing.is_set():
                while not self._closed.wait(0.2):
                    pass
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._closing.is_set():
            log.warning("signal %d again: stopping the running generation now", signum)
            self.hurry()
            return
        log.warning(
            "signal %d: shutting down (waiting requests get 503; the running one has %g s)",
            signum, self.shutdown_grace,
        )  # fmt: skip
        self._closing_thread = threading.Thread(
            target=self.shutdown, name="steerlex-serve-shutdown", daemon=True
        )
        self._closing_thread.start()

    def closing(self) -> bool:
        return self._closing.is_set()

    def hurry(self) -> None:
        """Cut the shutdown's grace short: stop the running generation now."""
        self._hurry.set()
        self.worker.abort("the server is shutting down")

    def shutdown(self) -> None:
        """Stop gracefully (see the class); returns once everything is stopped."""
        with self._lock:
            first = not self._closing.is_set()
            self._closing.set()
        if not first:  # another thread is shutting down: wait for it to finish
            self._closed.wait()
            return
        try:
            self.worker.close()
            if not self.worker.wait_idle(self.shutdown_grace, self._hurry):
                self.worker.abort("the server is shutting down")
            self.worker.join(timeout=60.0)
            thread = self._thread
            if thread is not None and thread.is_alive():
                self._uvicorn.should_exit = True
                thread.join(timeout=30.0)
            self.socket.close()
        finally:
            self._closed.set()

    def __enter__(self) -> SteeringServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- state --------------------------------------------------------------------------------

    def connections(self) -> int:
        """How many client connections are open now (refused ones over the cap not counted)."""
        return sum(not getattr(c, "refused", False) for c in self._uvicorn.server_state.connections)

    def queued(self) -> int:
        return self.worker.queued()

    def submit(self, job: _Job) -> None:
        """Queue ``job`` on the worker, or raise 429 (queue full) / 503 (shutting down)."""
        self.worker.submit(job)

    def _too_many(self) -> ApiError:
        return ApiError(
            503,
            f"the server has too many open connections (limit max_connections="
            f"{self.limits.max_connections}); retry in a moment.",
            type="server_error", code="too_many_connections", headers={"Retry-After": "1"},
        )  # fmt: skip

    async def _refuse_app(self, scope: Any, receive: Any, send: Any) -> None:
        """The ASGI app of a connection over the cap: 503 and close."""
        exc = self._too_many()
        payload = _dumps(exc.body())
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"retry-after", b"1"), (b"content-length", str(len(payload)).encode())]  # fmt: skip
        self.metrics.request("other", 503)
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


# --- encoding ---------------------------------------------------------------------------------


def _no_nan(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no such number)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def _dumps(data: Any) -> bytes:
    """Strict JSON as UTF-8: a non-finite float (a model's NaN in the report) becomes null, and
    text that is not valid Unicode is written as JSON escapes, rather than failing the reply."""
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    except ValueError:
        log.warning("a reply held a NaN or infinite number; sent as null")
        data = _no_nan(data)
        text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: as a \ud800 escape
        return json.dumps(data, allow_nan=False).encode("ascii")


def _http_bytes(
    status: int, reason: str, payload: bytes, headers: Mapping[str, str] | None = None
) -> bytes:
    """A whole HTTP/1.1 JSON response that closes the connection, written straight to the
    transport where there is no request to answer through the app (a request that never
    arrived whole)."""
    lines = [f"HTTP/1.1 {status} {reason}", "Server: steerlex", "Content-Type: application/json",
             f"Content-Length: {len(payload)}", "Connection: close"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def _nesting_over(value: Any, limit: int) -> bool:
    """Whether JSON arrays/objects nest more than ``limit`` deep in ``value`` (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 3, 80, 80, 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


def _show(value: Any) -> str:
    """A short repr of a client's value for an error message (long values are cut with ...)."""
    return _repr.repr(value)


# --- request parsing ----------------------------------------------------------------------------


def _parse_chat(body: Any, srv: SteeringServer) -> tuple[_Job, bool]:
    """Validate a chat-completions body into a job (roles are checked by the worker)."""
    limits = srv.limits
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}.")
    model = body.get("model")
    if model is None:
        raise ApiError(400, f'"model" is required; this server serves {srv.model_name!r}.',
                       param="model")  # fmt: skip
    if model != srv.model_name:
        raise ApiError(404, f"model {_show(model)} not found; this server serves "
                       f"{srv.model_name!r}.", param="model", code="model_not_found")  # fmt: skip
    messages = _parse_messages(body.get("messages"), limits)
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if not any(value == n and type(value) is type(n) for n in neutral):
            raise ApiError(
                400, f"{name}={_show(value)} is not supported by steerlex serve; leave it out.",
                param=name, code="unsupported_parameter",
            )  # fmt: skip
    n = body.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_n:
        raise ApiError(400, f"n must be an integer from 1 to {limits.max_n} (limit max_n), got "
                       f"{_show(n)}.", param="n")  # fmt: skip
    logprobs = _parse_logprobs(body)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, f"response_format={_show(fmt)} is not supported; only plain text.",
                       param="response_format", code="unsupported_parameter")  # fmt: skip
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {_show(stream)}.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object.", param="stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(400, f"stream_options.include_usage must be true or false, got "
                       f"{_show(include_usage)}.", param="stream_options")  # fmt: skip
    sampling = _parse_sampling(body, limits)
    o = _parse_override(body.get("steerlex"), srv)
    stop = _parse_stop(body.get("stop"))
    job = _Job(messages, sampling, o.strategy, o.enabled, stream, _Events(), stop, n=n,
               guard=o.guard, refusal=o.refusal, logprobs=logprobs)  # fmt: skip
    return job, bool(include_usage)


def _parse_logprobs(body: Mapping[str, Any]) -> int | None:
    """``logprobs`` (true/false) and ``top_logprobs`` (0 to 20, needs ``logprobs``): how many
    alternatives per token to report, or None for no log-probabilities."""
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if want is not None and not isinstance(want, bool):
        raise ApiError(400, f"logprobs must be true or false, got {_show(want)}.",
                       param="logprobs")  # fmt: skip
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS
    ):
        raise ApiError(400, f"top_logprobs must be an integer from 0 to {MAX_LOGPROBS}, got "
                       f"{_show(top)}.", param="top_logprobs")  # fmt: skip
    if not want:
        if top:
            raise ApiError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
        return None
    return int(top or 0)


def _parse_stop(value: Any) -> tuple[str, ...]:
    """``stop``: None, a string or a list of up to :data:`MAX_STOP` strings ("" means none)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ApiError(400, f"stop must be a string or a list of strings, got {_show(value)}.",
                       param="stop")  # fmt: skip
    if len(items) > MAX_STOP:
        raise ApiError(400, f"stop has {len(items)} strings; at most {MAX_STOP} are allowed.",
                       param="stop")  # fmt: skip
    for s in items:
        if len(s) > MAX_STOP_CHARS:
            raise ApiError(400, f"stop string {_show(s)} is longer than {MAX_STOP_CHARS} "
                           "characters.", param="stop")  # fmt: skip
        _check_unicode(s, "a stop string", param="stop")
    return tuple(dict.fromkeys(s for s in items if s))


def _parse_messages(messages: Any, limits: ServerLimits) -> list[dict[str, Any]]:
    if messages is None:
        raise ApiError(400, '"messages" is required: a list of {"role", "content"} objects.',
                       param="messages")  # fmt: skip
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, '"messages" must be a non-empty list of {"role", "content"} objects.',
                       param="messages")  # fmt: skip
    if len(messages) > limits.max_messages:
        raise ApiError(
            400,
            f"{len(messages)} messages, over the limit max_messages={limits.max_messages}; "
            "shorten the conversation.",
            param="messages", code="too_many_messages",
        )  # fmt: skip
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"message {i} must be an object, got {type(m).__name__}.",
                           param="messages")  # fmt: skip
        role, content = m.get("role"), m.get("content")
        if m.get("tool_calls") or m.get("function_call"):
            raise ApiError(400, f"message {i} has tool calls; tools are not supported.",
                           param="messages")  # fmt: skip
        if isinstance(content, list):  # OpenAI content parts: text only
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):  # fmt: skip
                    raise ApiError(400, f"message {i} has a non-text content part {_show(part)}; "
                                   "only text is supported.", param="messages")  # fmt: skip
                texts.append(part["text"])
            content = "\n".join(texts)
        for what, text in (("role", role), ("content", content)):
            if isinstance(text, str):
                _check_unicode(text, f"message {i} {what}")
        # roles and empty content are checked by encode_chat on the worker, with its messages
        out.append({"role": role, "content": content})
    return out


def _check_unicode(text: str, what: str, param: str = "messages") -> None:
    """400 for text that is not valid Unicode: a lone surrogate, from a JSON escape such as
    ``\\ud800`` without its pair (the tokenizer and UTF-8 cannot hold it)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(
            400,
            f"{what} is not valid Unicode: a lone surrogate U+{ord(text[exc.start]):04X} at "
            f"character {exc.start}. JSON \\uD800-\\uDFFF escapes must come in high-low pairs; "
            "or send the text as plain UTF-8.",
            param=param, code="invalid_unicode",
        ) from None  # fmt: skip


def _finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is no number (bools are not), NaN, infinite
    or an integer too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    f = _finite_float(value)
    if f is None:
        raise ApiError(400, f"{name} must be a finite number, got {_show(value)}.", param=name)
    return f


def _parse_sampling(body: Mapping[str, Any], limits: ServerLimits) -> _Sampling:
    given = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    for name in given:
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"{name} must be an integer >= 1, got {_show(value)}.",
                           param=name)  # fmt: skip
        if value > limits.max_tokens:
            raise ApiError(
                400,
                f"{name}={_show(value)} is over the limit max_tokens={limits.max_tokens}; ask for "
                "fewer.",
                param=name, code="max_tokens_too_large",
            )  # fmt: skip
    # max_completion_tokens wins, as in OpenAI's API
    max_tokens = int(body[given[0]]) if given else min(limits.default_max_tokens, limits.max_tokens)
    temperature = _number(body, "temperature", 0.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be in [0, 2], got {temperature}.",
                       param="temperature")  # fmt: skip
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}.", param="top_p")
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
    ):
        raise ApiError(400, f"seed must be an integer from 0 to 2**63 - 1 = {MAX_SEED}, got "
                       f"{_show(seed)}.", param="seed")  # fmt: skip
    return _Sampling(max_tokens, temperature, top_p, seed)


@dataclass(frozen=True)
class _Override:
    """One request's steering: strategy, on/off, guard mode and refusal text."""

    strategy: SteeringStrategy | None
    enabled: bool
    guard: GuardMode
    refusal: str


def _parse_override(spec: Any, srv: SteeringServer) -> _Override:
    """This request's steering: the server's, changed by ``"steerlex"``."""
    steered, limits = srv.steered, srv.limits
    strategy, enabled = steered.strategy, steered.enabled
    guard, refusal = srv.guard, srv.refusal
    if spec is None:
        return _Override(strategy, enabled, guard, refusal)
    if not isinstance(spec, dict):
        raise ApiError(400, f'"steerlex" must be an object like {{"steer": false}}, got '
                       f"{_show(spec)}.", param="steerlex")  # fmt: skip
    unknown = sorted(set(spec) - set(_OVERRIDE_KEYS))
    if unknown:
        raise ApiError(400, f'"steerlex" has unknown field(s) {_show(unknown)}; use '
                       f"{', '.join(_OVERRIDE_KEYS)}.", param="steerlex")  # fmt: skip
    steer = spec.get("steer")
    if steer is not None:
        if not isinstance(steer, bool):
            raise ApiError(400, f"steerlex.steer must be true or false, got {_show(steer)}.",
                           param="steerlex.steer")  # fmt: skip
        enabled = steer
    strength = spec.get("strength")
    if strength is not None:
        value = _finite_float(strength)
        if value is None or not 0 <= value <= limits.max_strength:
            raise ApiError(
                400,
                f"steerlex.strength must be a finite number >= 0 and at most "
                f"{limits.max_strength:g} (limit max_strength), got {_show(strength)}.",
                param="steerlex.strength",
            )
        if strategy is None:
            raise ApiError(400, "steerlex.strength: this server has no steering strategy to "
                           "set a strength on; leave it out.", param="steerlex.strength")  # fmt: skip
        try:
            strategy = strategy.with_strength(value)
            strategy.check(steered.sae)
        except SteeringError as exc:
            raise ApiError(400, f"steerlex.strength: {exc}", param="steerlex.strength") from None
    value = spec.get("guard")
    if value is not None:
        if value not in GUARD_MODES:
            raise ApiError(400, f"steerlex.guard must be one of {', '.join(GUARD_MODES)}, got "
                           f"{_show(value)}.", param="steerlex.guard")  # fmt: skip
        if value != "steer" and (strategy is None or strategy.gate is None):
            raise ApiError(
                400,
                f"steerlex.guard={value!r} acts on a harm detector (the strategy's gate), and "
                "this server's strategy has none; start steerlex serve with --harm.",
                param="steerlex.guard",
            )
        guard = value
    text = spec.get("refusal")
    if text is not None:
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_REFUSAL_CHARS:
            raise ApiError(400, f"steerlex.refusal must be a non-empty text of at most "
                           f"{MAX_REFUSAL_CHARS} characters, got {_show(text)}.",
                           param="steerlex.refusal")  # fmt: skip
        _check_unicode(text, "steerlex.refusal", param="steerlex.refusal")
        refusal = text
    return _Override(strategy, enabled, guard, refusal)


def _check_prompt_bound(job: _Job, srv: SteeringServer) -> None:
    """Refuse, on the request thread, a prompt that cannot fit, before it reaches the worker.

    The chat template is rendered here (pure Python: the tokenizer itself is not called, so no
    tokenizer state is shared with the worker) and :class:`_PromptBound` bounds its token count
    from below without tokenizing, so a prompt that would fit is never refused here; the worker
    still counts exactly. Without a bound for this tokenizer, or when the template fails (the
    worker then reports why), nothing is checked here.
    """
    bound = srv.prompt_bound
    if bound is None:
        return
    tok = srv.steered.loaded.tokenizer
    try:
        text = tok.apply_chat_template(job.messages, tokenize=False, add_generation_prompt=True)
    except Exception:
        return
    if not isinstance(text, str):
        return
    _check_prompt_fits(bound.tokens_at_least(text), "at least ", job, srv.limits, srv.steered)


def _check_prompt_fits(
    n: int, qualifier: str, job: _Job, limits: ServerLimits, steered: SteeredModel
) -> None:
    """Refuse a prompt of ``n`` tokens (``qualifier`` "at least " for a lower bound) over
    ``max_prompt_tokens``, or that leaves no room for the job's ``max_tokens`` in the model's
    context."""
    limit = limits.max_prompt_tokens
    if n > limit:
        raise ApiError(
            400,
            f"the prompt has {qualifier}{n} tokens, over the limit max_prompt_tokens={limit}; "
            "shorten the conversation.",
            param="messages", code="prompt_too_long",
        )  # fmt: skip
    context = steered.loaded.context_length
    if context is not None and n + job.sampling.max_tokens > context:
        raise ApiError(
            400,
            f"the prompt ({qualifier}{n} tokens) plus max_tokens ({job.sampling.max_tokens}) "
            f"exceeds the model's context of {context} tokens; shorten the conversation or "
            "lower max_tokens.",
            param="max_tokens", code="context_length_exceeded",
        )  # fmt: skip


# --- responses ----------------------------------------------------------------------------------


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _completion_tokens(r: SteeredResponse) -> int:
    """Tokens the model generated for a reply (a refusal's text was not generated: 0)."""
    return 0 if r.guard == "refused" else len(r.token_ids)


def _action(r: SteeredResponse) -> str:
    """What was done to a reply: ``refused`` / ``aborted`` (a guard), ``steered`` (some position
    was edited) or ``none``."""
    if r.guard is not None:
        return r.guard
    report = r.report
    edited = report.edited_prompt_positions + report.edited_generated_positions
    return "steered" if edited else "none"


def _steerlex_field(r: SteeredResponse, job: _Job) -> dict[str, Any]:
    """The report of one reply: settings used, whether the gate opened, features that fired
    (strongest first), what was done (``action``), details."""
    report = r.report
    return {
        "steer": job.enabled,
        "strategy": report.strategy,
        "strength": job.strategy.strength if job.strategy is not None else None,
        "guard": job.guard,
        "gate_open": report.gate_open,
        "harm_score": report.harm_score,
        "fired": [{"feature": f.feature, "role": f.role} for f in report.fired()],
        "action": _action(r),
        "report": report.to_dict(),
    }


def _completion(
    rid: str,
    model: str,
    done: Mapping[int, tuple[SteeredResponse, list[dict[str, Any]]]],
    job: _Job,
) -> dict[str, Any]:
    """The chat.completion body of a request's ``n`` replies (``done``: index -> (reply, its
    logprob entries)); the top-level ``steerlex`` field is choice 0's, each choice has its own."""
    choices = []
    for index in range(job.n):
        r, entries = done[index]
        lp = {"content": entries, "refusal": None} if job.logprobs is not None else None
        choices.append({
            "index": index,
            "message": {"role": "assistant", "content": r.text,
                        "refusal": r.text if r.guard == "refused" else None},
            "finish_reason": r.finish_reason,
            "logprobs": lp,
            "steerlex": _steerlex_field(r, job),
        })  # fmt: skip
    first = done[0][0]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(
            len(first.prompt_ids), sum(_completion_tokens(r) for r, _ in done.values())
        ),
        "steerlex": choices[0]["steerlex"],
    }


def make_server(
    steered: SteeredModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    limits: ServerLimits | None = None,
    shutdown_grace: float = 10.0,
    guard: GuardMode = "steer",
    refusal: str = DEFAULT_REFUSAL,
) -> SteeringServer:
    """An OpenAI-compatible server over ``steered``, bound but not yet serving.

    Call ``serve_forever()`` (blocking) or ``start()`` (a daemon thread), and ``shutdown()`` when
    done; ``shutdown_grace`` is how many seconds a running generation gets to finish then. ``port=0`` picks a free port (see ``.url``). ``model_name`` is the id clients send as
    ``model`` (default: the loaded model's short name). With ``api_key`` every ``/v1`` request
    needs ``Authorization: Bearer <api_key>``. While serving, the server owns ``steered``: do not
    generate with it from other threads.

    Raises:
        SteeringError: bad limits or an empty model name; OSError: the address is in use.
    """
    name = model_name if model_name is not None else steered.loaded.name
    if not name or not name.strip():
        raise SteeringError("model_name is empty; give the id clients should send as model.")
    if api_key is not None and not api_key.strip():
        raise SteeringError("api_key is empty; give a key or None for no authentication.")
    if (
        isinstance(shutdown_grace, bool)
        or not isinstance(shutdown_grace, (int, float))
        or not (shutdown_grace >= 0 and math.isfinite(shutdown_grace))
    ):
        raise SteeringError(f"shutdown_grace must be a number of seconds >= 0, got "
                            f"{shutdown_grace!r}.")  # fmt: skip
    check_guard(guard, refusal, steered.strategy)
    return SteeringServer(
        steered, (host, port), model_name=name, api_key=api_key, limits=limits or ServerLimits(),
        shutdown_grace=float(shutdown_grace), guard=guard, refusal=refusal,
    )  # fmt: skip


def check_guard(guard: str, refusal: str, strategy: SteeringStrategy | None) -> None:
    """Refuse a server guard mode that is unknown or has no detector to act on, and an empty
    or overlong refusal text."""
    if guard not in GUARD_MODES:
        raise SteeringError(f"guard must be one of {', '.join(GUARD_MODES)}, got {guard!r}.")
    if guard != "steer" and (strategy is None or strategy.gate is None):
        raise SteeringError(
            f"guard {guard!r} acts on a harm detector, the strategy's gate, and this strategy "
            f"({strategy.describe() if strategy is not None else 'none'}) has none; give --harm "
            "(harm feature ids, a selected_features.json or a gate_probe.safetensors)."
        )
    if not isinstance(refusal, str) or not refusal.strip() or len(refusal) > MAX_REFUSAL_CHARS:
        raise SteeringError(
            f"the refusal text must be non-empty and at most {MAX_REFUSAL_CHARS} characters."
        )
    check_text(refusal, "the refusal text", SteeringError)
