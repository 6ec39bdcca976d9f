"""An OpenAI-compatible HTTP API over a :class:`~steerlex.steer.runtime.SteeredModel`.

:func:`make_server` returns a :class:`SteeringServer` (standard-library ``ThreadingHTTPServer``)
with three endpoints:

- ``POST /v1/chat/completions``: a chat reply, whole or streamed as server-sent events in
  OpenAI's ``chat.completion.chunk`` format (ending with ``data: [DONE]``). The reply carries a
  ``steerlex`` field: the steering report (features that fired, gate decision).
- ``GET /v1/models``: the one served model.
- ``GET /health``: liveness and queue length (no authentication).

Steering is on by default. A request may override it for itself only, with the extra body field
``"steerlex": {"steer": false}`` or ``{"strength": 1.5}`` (the openai client: ``extra_body``).

Concurrency: one worker thread owns the model and runs one generation at a time, in arrival
order; HTTP threads only parse, validate and wait. Requests are not batched, so every reply is
exactly what ``SteeredModel.chat`` gives for the same settings (batching left-pads and changes
the numerics slightly; a ``seed`` would also stop being per request). Waiting requests sit in a
bounded queue; when it is full a request gets 429 with ``Retry-After``. All tokenizer work runs
on the worker too (a fast tokenizer is not safe to share between threads); a request thread only
renders the chat template (pure Python) to refuse, from a cheap lower bound on its token count, a
prompt that cannot fit before it reaches the worker (:class:`_PromptBound`).

Hostile input: every request has ``read_timeout`` seconds in all to send its request line,
headers and body; at most ``max_connections`` connections are served at once (more get a prompt
503); JSON nesting, numbers, text and the ``steerlex`` override are checked before any work.
"""

from __future__ import annotations

import contextlib
import copy
import hmac
import io
import json
import logging
import math
import queue
import re
import reprlib
import socket
import sys
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from steerlex.core.errors import SteeringError, SteerlexError
from steerlex.steer.runtime import SteeredModel, SteeredResponse, encode_chat
from steerlex.steer.strategies import SteeringStrategy

__all__ = ["API_KEY_ENV", "ServerLimits", "SteeringServer", "make_server"]

API_KEY_ENV = "STEERLEX_SERVER_API_KEY"
"""Environment variable the CLI reads the API key from when ``--api-key`` is not given."""

log = logging.getLogger(__name__)

# Fields OpenAI defines that would change the reply and that steerlex cannot honour: a request
# that sets them to anything but their neutral value gets 400 rather than a silently wrong reply.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "stop": (None, [], ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}
_OVERRIDE_KEYS = ("steer", "strength")
MAX_JSON_DEPTH = 64
"""Deepest nesting of JSON arrays/objects a request body may have (a chat request needs 5)."""
MAX_SEED = 2**63 - 1
"""Largest ``seed``: seeds are 0 to 2**63 - 1 (a signed 64-bit integer, as OpenAI's)."""


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; anything larger is refused with a message naming the limit.

    ``max_tokens`` caps ``max_tokens``/``max_completion_tokens``; a request without one gets
    ``default_max_tokens`` (at most ``max_tokens``). ``max_prompt_tokens`` caps the chat-formatted
    prompt; prompt plus reply must also fit the model's context (``max_position_embeddings``).
    ``max_queue`` is how many requests may wait while one runs. ``read_timeout`` (seconds) is
    the total time a client has to send its request line, headers and body (then 408), and the
    limit on each write of the reply. ``max_connections`` caps the connections served at once,
    each on its own thread (more get 503 at once; keep it above ``max_queue`` + 1 or the queue
    never fills). ``max_strength`` bounds a request's ``steerlex.strength``.
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

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes", "max_messages", "max_tokens", "default_max_tokens",
            "max_prompt_tokens", "max_queue", "max_connections",
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


@dataclass
class _Job:
    """A queued request; the worker reports on ``events``.

    Events, in order: ``("start", prompt_tokens)``, then with ``stream`` any number of
    ``("delta", text)``, then ``("done", SteeredResponse)``; or ``("error", ApiError)`` at any
    point instead.
    """

    messages: list[dict[str, Any]]
    sampling: _Sampling
    strategy: SteeringStrategy | None
    enabled: bool
    stream: bool
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Streamer:
    """Turns generated token ids into text deltas whose concatenation is the final text.

    Text is released up to the last whitespace (like transformers' ``TextStreamer``), so a
    detokenizer that merges or cleans across token boundaries cannot change what was already
    sent; the rest comes with the final text.
    """

    def __init__(self, tokenizer: Any, job: _Job) -> None:
        self.tokenizer = tokenizer
        self.job = job
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character
            return
        cut = max(text.rfind(" "), text.rfind("\n")) + 1
        self._emit(text[:cut])

    def finish(self, final: str) -> None:
        if not final.startswith(self.sent):  # should not happen; never resend text
            log.warning("streamed text %r is not a prefix of the reply %r", self.sent, final)
            return
        self._emit(final)

    def _emit(self, upto: str) -> None:
        if len(upto) > len(self.sent) and upto.startswith(self.sent):
            self.job.events.put(("delta", upto[len(self.sent) :]))
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


# --- the server ---------------------------------------------------------------------------------


class SteeringServer(ThreadingHTTPServer):
    """The HTTP server and the worker thread that owns the model.

    ``serve_forever()`` serves until ``shutdown()`` (call it from another thread, or after
    ``serve_forever`` returned on Ctrl-C); ``shutdown()`` also answers every waiting request
    with 503, stops the running generation at its next token and joins the worker. ``url`` is
    ``http://host:port`` (the real port when created with port 0). ``start()`` serves from a
    daemon thread, for tests and notebooks; ``with`` shuts down on exit.

    Each connection gets a thread, at most ``limits.max_connections`` at once; a connection over
    the cap is answered 503 (``too_many_connections``, ``Retry-After: 1``) by one small thread that
    waits at most half a second for the client's request before closing, or, when that thread
    already has 64 waiting, closed at once.
    """

    daemon_threads = True
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
    ) -> None:
        super().__init__(address, _Handler)
        self.steered = steered
        self.model_name = model_name
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.limits = limits
        self.created = int(time.time())
        self.jobs: queue.Queue[_Job] = queue.Queue(maxsize=limits.max_queue)
        self._closing = threading.Event()
        self._running: _Job | None = None
        self._job_seconds = 1.0  # moving average, for Retry-After
        self._serving = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._closed = False
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._refusals: queue.Queue[socket.socket] = queue.Queue(maxsize=64)
        # read on this thread, before the worker exists: the tokenizer is not shared yet
        self.prompt_bound = _PromptBound.of(steered.loaded.tokenizer)
        self._worker = threading.Thread(
            target=self._work, name="steerlex-serve-worker", daemon=True
        )
        self._worker.start()
        self._refuser = threading.Thread(
            target=self._refuse_loop, name="steerlex-serve-refuser", daemon=True
        )
        self._refuser.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    # --- lifecycle ----------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving.set()
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving.clear()

    def start(self) -> threading.Thread:
        """Serve from a daemon thread; returns once the server accepts connections."""
        thread = threading.Thread(target=self.serve_forever, name="steerlex-serve", daemon=True)
        thread.start()
        self._serving.wait(5.0)
        return thread

    def shutdown(self) -> None:
        with self._shutdown_lock:
            if self._closed:
                return
            self._closed = True
        self._closing.set()
        if self._serving.is_set():
            super().shutdown()
        busy = ApiError(503, "the server is shutting down; retry later.", type="server_error")
        while True:
            try:
                self.jobs.get_nowait().events.put(("error", busy))
            except queue.Empty:
                break
        running = self._running
        if running is not None:
            running.cancelled.set()
        self._worker.join(timeout=30.0)
        self._refuser.join(timeout=5.0)
        while True:
            try:
                self._refusals.get_nowait().close()
            except queue.Empty:
                break
        self.server_close()

    def __enter__(self) -> SteeringServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- connections --------------------------------------------------------------------------

    def connections(self) -> int:
        """How many connections are being served now (each on its own thread)."""
        return self._connections

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            full = self._connections >= self.limits.max_connections
            if not full:
                self._connections += 1
        if full:
            try:
                self._refusals.put_nowait(request)
            except queue.Full:  # a flood: close without an answer rather than wait
                self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._connections_lock:
            self._connections -= 1

    def _refuse_loop(self) -> None:
        exc = ApiError(
            503,
            f"the server has too many open connections (limit max_connections="
            f"{self.limits.max_connections}); retry in a moment.",
            type="server_error", code="too_many_connections",
        )  # fmt: skip
        answer = _http_bytes(503, "Service Unavailable", _dumps(exc.body()), {"Retry-After": "1"})
        while not self._closing.is_set():
            try:
                sock = self._refusals.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                sock.settimeout(0.5)
                sock.sendall(answer)
                sock.shutdown(socket.SHUT_WR)
                # read the request (up to half a second), so closing does not reset the
                # connection before the client has read the answer
                deadline = time.monotonic() + 0.5
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    if not sock.recv(65536):
                        break
            except OSError:
                pass
            finally:
                sock.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, _ReadDeadline)):
            log.info("connection from %s ended: %r", client_address, exc)
        else:
            log.exception("connection from %s failed", client_address)

    # --- queue --------------------------------------------------------------------------------

    def submit(self, job: _Job) -> None:
        """Queue ``job``, or raise 429 (queue full) / 503 (shutting down)."""
        if self._closing.is_set():
            raise ApiError(503, "the server is shutting down; retry later.", type="server_error")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            wait = max(1, min(60, math.ceil(self._job_seconds * (self.jobs.qsize() + 1))))
            raise ApiError(
                429,
                f"the server is busy: {self.limits.max_queue} requests are already waiting "
                f"(limit max_queue={self.limits.max_queue}); retry after {wait} s.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(wait)},
            ) from None

    def queued(self) -> int:
        return self.jobs.qsize()

    def _work(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            if self._closing.is_set():
                busy = ApiError(503, "the server is shutting down.", type="server_error")
                job.events.put(("error", busy))
                continue
            if job.cancelled.is_set():
                continue
            self._running = job
            t0 = time.perf_counter()
            try:
                self._run(job)
            finally:
                self._running = None
                self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.perf_counter() - t0)

    def _run(self, job: _Job) -> None:
        steered = self.steered
        tok = steered.loaded.tokenizer
        try:
            encoded = encode_chat(tok, job.messages)
            n_prompt = len(encoded.input_ids)
            _check_prompt_fits(n_prompt, "", job, self)
            job.events.put(("start", n_prompt))
            # A shallow copy shares the model, SAE and call lock but holds this request's own
            # strategy and on/off state, so no request changes what another one sees.
            view = copy.copy(steered)
            view.strategy = job.strategy
            view.enabled = job.enabled
            streamer = _Streamer(tok, job) if job.stream else None
            with _watch_tokens(steered, job, streamer):
                s = job.sampling
                response = view.generate(
                    [encoded],
                    max_new_tokens=s.max_tokens,
                    do_sample=s.temperature > 0,
                    temperature=s.temperature if s.temperature > 0 else 1.0,
                    top_p=s.top_p,
                    seed=s.seed,
                )[0]
            if streamer is not None:
                streamer.finish(response.text)
            job.events.put(("done", response))
        except _Cancelled:  # the client left or the server is shutting down
            job.events.put(
                ("error", ApiError(503, "the request was stopped.", type="server_error"))
            )
        except ApiError as exc:
            job.events.put(("error", exc))
        except SteerlexError as exc:
            job.events.put(("error", ApiError(400, str(exc), param="messages")))
        except Exception as exc:  # a bug or a model failure: keep serving the others
            log.exception("generation failed")
            job.events.put(
                ("error", ApiError(500, f"generation failed: {exc}", type="server_error"))
            )


@contextlib.contextmanager
def _watch_tokens(steered: SteeredModel, job: _Job, streamer: _Streamer | None) -> Iterator[None]:
    """While generating: stop on cancellation and feed each new token to the streamer.

    A forward pre-hook on the input embeddings sees every token fed back into the model (each
    generated token but the last, which the final text carries); the first call is the prefill.
    """
    calls = 0
    worker = threading.get_ident()

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        nonlocal calls
        if threading.get_ident() != worker:  # another thread's call on the same model
            return
        if job.cancelled.is_set():
            raise _Cancelled
        calls += 1
        if calls > 1 and streamer is not None and args:
            ids = args[0]
            if hasattr(ids, "shape") and ids.dim() == 2 and ids.shape[1] == 1:
                streamer.push(int(ids[0, 0]))

    handle = steered.loaded.model.get_input_embeddings().register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --- HTTP ---------------------------------------------------------------------------------------


class _ReadDeadline(Exception):
    """The client did not send its whole request within ``read_timeout`` (not a TimeoutError, so
    that ``BaseHTTPRequestHandler`` does not swallow it silently while reading the request line)."""


class _DeadlineReader(io.RawIOBase):
    """The socket's input, with one deadline for everything read until :meth:`end`.

    A socket timeout bounds each read only: a client sending one byte a second would never trip
    it. Here every read waits at most for what is left of the deadline.
    """

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        super().__init__()
        self.sock = sock
        self.seconds = seconds
        self.deadline: float | None = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is None:
            return self.sock.recv_into(buffer)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _ReadDeadline
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:
            raise _ReadDeadline from None

    def end(self) -> None:
        """The request is in: from now on only the per-operation timeout (for the writes)."""
        if self.deadline is not None:
            self.deadline = None
            self.sock.settimeout(self.seconds)


class _Handler(BaseHTTPRequestHandler):
    server: SteeringServer
    # HTTP/1.0: one request per connection and a stream ends when the connection closes.
    protocol_version = "HTTP/1.0"
    server_version = "steerlex"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # one deadline for the request line, headers and body (slowloris, slow drip); afterwards
        # read_timeout bounds each write of the reply
        seconds = self.server.limits.read_timeout
        self.connection.settimeout(seconds)
        self._reader = _DeadlineReader(self.connection, seconds)
        plain, self.rfile = self.rfile, io.BufferedReader(self._reader)
        plain.close()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _ReadDeadline:
            self._send_timeout()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _send_timeout(self) -> None:
        """408 (written by hand: the request line may not even be parsed) and close."""
        self.close_connection = True
        seconds = self.server.limits.read_timeout
        log.info("%s sent no whole request within %g s", self.address_string(), seconds)
        exc = ApiError(
            408,
            f"the request did not arrive within read_timeout={seconds:g} s (request line, headers "
            "and body together); send it at once.",
            code="request_timeout",
        )
        with contextlib.suppress(OSError):
            self.connection.settimeout(1.0)
            self.connection.sendall(_http_bytes(408, "Request Timeout", _dumps(exc.body())))

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # --- routing ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        if method != "POST":  # nothing more to read
            self._reader.end()
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        routes = {
            "/health": ("GET", self._health, False),
            "/v1/models": ("GET", self._models, True),
            "/v1/chat/completions": ("POST", self._chat, True),
        }
        try:
            model_path = path.startswith("/v1/models/")
            if path not in routes and not model_path:
                raise ApiError(404, f"no endpoint {path}; see /v1/chat/completions, /v1/models.")
            want, fn, auth = routes.get(path, ("GET", self._model, True))
            if method != want:
                raise ApiError(405, f"{path} takes {want}, not {method}.")
            if auth:
                self._authorize()
            fn()
        except ApiError as exc:
            self._send_error(exc)
        except _ReadDeadline:
            self._send_timeout()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client left or was too slow; nobody to answer
        except Exception as exc:  # a bug: answer 500 and keep serving
            log.exception("request failed")
            with contextlib.suppress(OSError):
                self._send_error(ApiError(500, f"internal error: {exc}", type="server_error"))

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode("utf-8", "surrogateescape")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given, key)
        if not ok:
            raise ApiError(
                401,
                "missing or wrong API key; send the header Authorization: Bearer <key>.",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # --- endpoints ----------------------------------------------------------------------------

    def _health(self) -> None:
        srv = self.server
        self._send_json(
            200, {"status": "ok", "model": srv.model_name, "queued": srv.queued(),
                  "max_queue": srv.limits.max_queue, "connections": srv.connections(),
                  "max_connections": srv.limits.max_connections}
        )  # fmt: skip

    def _model_card(self) -> dict[str, Any]:
        srv = self.server
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

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [self._model_card()]})

    def _model(self) -> None:
        name = self.path.split("?", 1)[0].removeprefix("/v1/models/")
        if name != self.server.model_name:
            raise ApiError(404, f"model {name!r} not found; this server serves "
                           f"{self.server.model_name!r}.", code="model_not_found")  # fmt: skip
        self._send_json(200, self._model_card())

    def _chat(self) -> None:
        srv = self.server
        body = self._read_json()
        job, include_usage = _parse_chat(body, srv)
        _check_prompt_bound(job, srv)
        srv.submit(job)
        try:
            kind, value = self._next_event(job)
            if kind == "error":
                raise value
            prompt_tokens = int(value)
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            if job.stream:
                self._stream(job, rid, prompt_tokens, include_usage)
                return
            while kind != "done":
                kind, value = self._next_event(job)
                if kind == "error":
                    raise value
            self._send_json(200, _completion(rid, srv.model_name, value, job))
        finally:
            job.cancelled.set()  # a no-op once done; frees the worker if this thread leaves

    def _next_event(self, job: _Job) -> tuple[str, Any]:
        while True:
            try:
                return job.events.get(timeout=1.0)
            except queue.Empty:
                if self.server._closing.is_set() and not self.server._worker.is_alive():
                    return "error", ApiError(503, "the server shut down.", type="server_error")

    def _stream(self, job: _Job, rid: str, prompt_tokens: int, include_usage: bool) -> None:
        srv = self.server
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
            data: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": srv.model_name,
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                ],
            }
            if include_usage:
                data["usage"] = None
            data.update(extra)
            self._sse(data)

        chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = self._next_event(job)
            if kind == "delta":
                chunk({"content": value})
            elif kind == "done":
                r: SteeredResponse = value
                chunk({}, r.finish_reason, steerlex=_steerlex_field(r, job))
                if include_usage:
                    self._sse(
                        {"id": rid, "object": "chat.completion.chunk", "created": created,
                         "model": srv.model_name, "choices": [],
                         "usage": _usage(prompt_tokens, len(r.token_ids))}
                    )  # fmt: skip
                break
            else:  # an error after the headers went out: report it in the stream
                self._sse(value.body())
                break
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    # --- I/O ----------------------------------------------------------------------------------

    def _read_json(self) -> Any:
        limits = self.server.limits
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length.")
        length_header = self.headers.get("Content-Length")
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
        raw = self.rfile.read(length)
        self._reader.end()
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

    def _send_json(self, status: int, data: Any, headers: Mapping[str, str] | None = None) -> None:
        payload = _dumps(data)
        self._reader.end()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def _send_error(self, exc: ApiError) -> None:
        self._send_json(exc.status, exc.body(), exc.headers)

    def _sse(self, data: Any) -> None:
        self.wfile.write(b"data: " + _dumps(data) + b"\n\n")
        self.wfile.flush()


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
    """A whole HTTP/1.0 JSON response, for the paths that cannot use the handler's methods."""
    lines = [f"HTTP/1.0 {status} {reason}", "Server: steerlex", "Content-Type: application/json",
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
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, f"n={_show(n)} is not supported; steerlex serve returns one choice (n=1).",
                       param="n", code="unsupported_parameter")  # fmt: skip
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
    strategy, enabled = _parse_override(body.get("steerlex"), srv.steered, limits)
    job = _Job(messages, sampling, strategy, enabled, stream)
    return job, bool(include_usage)


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


def _check_unicode(text: str, what: str) -> None:
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
            param="messages", code="invalid_unicode",
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


def _parse_override(
    spec: Any, steered: SteeredModel, limits: ServerLimits
) -> tuple[SteeringStrategy | None, bool]:
    """This request's strategy and on/off state: the server's, changed by ``"steerlex"``."""
    strategy, enabled = steered.strategy, steered.enabled
    if spec is None:
        return strategy, enabled
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
    return strategy, enabled


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
    _check_prompt_fits(bound.tokens_at_least(text), "at least ", job, srv)


def _check_prompt_fits(n: int, qualifier: str, job: _Job, srv: SteeringServer) -> None:
    """Refuse a prompt of ``n`` tokens (``qualifier`` "at least " for a lower bound) over
    ``max_prompt_tokens``, or that leaves no room for the job's ``max_tokens`` in the model's
    context."""
    limit = srv.limits.max_prompt_tokens
    if n > limit:
        raise ApiError(
            400,
            f"the prompt has {qualifier}{n} tokens, over the limit max_prompt_tokens={limit}; "
            "shorten the conversation.",
            param="messages", code="prompt_too_long",
        )  # fmt: skip
    context = srv.steered.loaded.context_length
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


def _steerlex_field(r: SteeredResponse, job: _Job) -> dict[str, Any]:
    """The report of one reply: settings used, features that fired (strongest first), details."""
    report = r.report
    return {
        "steer": job.enabled,
        "strategy": report.strategy,
        "strength": job.strategy.strength if job.strategy is not None else None,
        "gate_open": report.gate_open,
        "fired": [{"feature": f.feature, "role": f.role} for f in report.fired()],
        "report": report.to_dict(),
    }


def _completion(rid: str, model: str, r: SteeredResponse, job: _Job) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": r.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(len(r.prompt_ids), len(r.token_ids)),
        "steerlex": _steerlex_field(r, job),
    }


def make_server(
    steered: SteeredModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    limits: ServerLimits | None = None,
) -> SteeringServer:
    """An OpenAI-compatible server over ``steered``, bound but not yet serving.

    Call ``serve_forever()`` (blocking) or ``start()`` (a daemon thread), and ``shutdown()`` when
    done. ``port=0`` picks a free port (see ``.url``). ``model_name`` is the id clients send as
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
    return SteeringServer(
        steered, (host, port), model_name=name, api_key=api_key, limits=limits or ServerLimits()
    )
