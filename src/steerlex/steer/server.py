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
on the worker too (a fast tokenizer is not safe to share between threads).
"""

from __future__ import annotations

import contextlib
import copy
import hmac
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
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


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; anything larger is refused with a message naming the limit.

    ``max_tokens`` caps ``max_tokens``/``max_completion_tokens``; a request without one gets
    ``default_max_tokens`` (at most ``max_tokens``). ``max_prompt_tokens`` caps the chat-formatted
    prompt; prompt plus reply must also fit the model's context (``max_position_embeddings``).
    ``max_queue`` is how many requests may wait while one runs. ``read_timeout`` (seconds) bounds
    how long a client may take to send its request.
    """

    max_body_bytes: int = 1 << 20
    max_messages: int = 64
    max_tokens: int = 512
    default_max_tokens: int = 256
    max_prompt_tokens: int = 4096
    max_queue: int = 16
    read_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes", "max_messages", "max_tokens", "default_max_tokens",
            "max_prompt_tokens", "max_queue",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SteeringError(f"server limit {name} must be an int >= 1, got {value!r}.")
        if not (self.read_timeout > 0 and math.isfinite(self.read_timeout)):
            raise SteeringError(f"read_timeout must be > 0 seconds, got {self.read_timeout!r}.")


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


# --- the server ---------------------------------------------------------------------------------


class SteeringServer(ThreadingHTTPServer):
    """The HTTP server and the worker thread that owns the model.

    ``serve_forever()`` serves until ``shutdown()`` (call it from another thread, or after
    ``serve_forever`` returned on Ctrl-C); ``shutdown()`` also answers every waiting request
    with 503, stops the running generation at its next token and joins the worker. ``url`` is
    ``http://host:port`` (the real port when created with port 0). ``start()`` serves from a
    daemon thread, for tests and notebooks; ``with`` shuts down on exit.
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
        self._worker = threading.Thread(
            target=self._work, name="steerlex-serve-worker", daemon=True
        )
        self._worker.start()

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
        self.server_close()

    def __enter__(self) -> SteeringServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

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
        steered, limits = self.steered, self.limits
        tok = steered.loaded.tokenizer
        try:
            encoded = encode_chat(tok, job.messages)
            n_prompt = len(encoded.input_ids)
            if n_prompt > limits.max_prompt_tokens:
                raise ApiError(
                    400,
                    f"the prompt has {n_prompt} tokens, over the limit max_prompt_tokens="
                    f"{limits.max_prompt_tokens}; shorten the conversation.",
                    param="messages",
                    code="prompt_too_long",
                )
            context = getattr(steered.loaded.model.config, "max_position_embeddings", None)
            if isinstance(context, int) and n_prompt + job.sampling.max_tokens > context:
                raise ApiError(
                    400,
                    f"the prompt ({n_prompt} tokens) plus max_tokens "
                    f"({job.sampling.max_tokens}) exceeds the model's context of {context} "
                    "tokens; shorten the conversation or lower max_tokens.",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
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


class _Handler(BaseHTTPRequestHandler):
    server: SteeringServer
    # HTTP/1.0: one request per connection and a stream ends when the connection closes.
    protocol_version = "HTTP/1.0"
    server_version = "steerlex"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # bounds a slow client (slowloris); also applies to writes of a stream
        self.connection.settimeout(self.server.limits.read_timeout)

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
                  "max_queue": srv.limits.max_queue}
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
        if len(raw) != length:
            raise ApiError(400, f"the body ended after {len(raw)} of {length} bytes.")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc}).") from None

    def _send_json(self, status: int, data: Any, headers: Mapping[str, str] | None = None) -> None:
        payload = json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")
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
        payload = json.dumps(data, ensure_ascii=False, allow_nan=False)
        self.wfile.write(f"data: {payload}\n\n".encode())
        self.wfile.flush()


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
        raise ApiError(404, f"model {model!r} not found; this server serves "
                       f"{srv.model_name!r}.", param="model", code="model_not_found")  # fmt: skip
    messages = _parse_messages(body.get("messages"), limits)
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if not any(value == n and type(value) is type(n) for n in neutral):
            raise ApiError(
                400, f"{name}={value!r} is not supported by steerlex serve; leave it out.",
                param=name, code="unsupported_parameter",
            )  # fmt: skip
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, f"n={n!r} is not supported; steerlex serve returns one choice (n=1).",
                       param="n", code="unsupported_parameter")  # fmt: skip
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, f"response_format={fmt!r} is not supported; only plain text.",
                       param="response_format", code="unsupported_parameter")  # fmt: skip
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object.", param="stream_options")
    include_usage = bool(options.get("include_usage", False))
    sampling = _parse_sampling(body, limits)
    strategy, enabled = _parse_override(body.get("steerlex"), srv.steered)
    job = _Job(messages, sampling, strategy, enabled, stream)
    return job, include_usage


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
                    raise ApiError(400, f"message {i} has a non-text content part {part!r}; "
                                   "only text is supported.", param="messages")  # fmt: skip
                texts.append(part["text"])
            content = "\n".join(texts)
        # roles and empty content are checked by encode_chat on the worker, with its messages
        out.append({"role": role, "content": content})
    return out


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}.", param=name)
    return float(value)


def _parse_sampling(body: Mapping[str, Any], limits: ServerLimits) -> _Sampling:
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"{name} must be an integer >= 1, got {max_tokens!r}.", param=name)
    if max_tokens > limits.max_tokens:
        raise ApiError(
            400,
            f"{name}={max_tokens} is over the limit max_tokens={limits.max_tokens}; ask for fewer.",
            param=name, code="max_tokens_too_large",
        )  # fmt: skip
    temperature = _number(body, "temperature", 0.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be in [0, 2], got {temperature}.",
                       param="temperature")  # fmt: skip
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}.", param="top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed must be an integer, got {seed!r}.", param="seed")
    return _Sampling(max_tokens, temperature, top_p, seed)


def _parse_override(spec: Any, steered: SteeredModel) -> tuple[SteeringStrategy | None, bool]:
    """This request's strategy and on/off state: the server's, changed by ``"steerlex"``."""
    strategy, enabled = steered.strategy, steered.enabled
    if spec is None:
        return strategy, enabled
    if not isinstance(spec, dict):
        raise ApiError(400, f'"steerlex" must be an object like {{"steer": false}}, got {spec!r}.',
                       param="steerlex")  # fmt: skip
    unknown = sorted(set(spec) - set(_OVERRIDE_KEYS))
    if unknown:
        raise ApiError(400, f'"steerlex" has unknown field(s) {unknown}; use '
                       f"{', '.join(_OVERRIDE_KEYS)}.", param="steerlex")  # fmt: skip
    steer = spec.get("steer")
    if steer is not None:
        if not isinstance(steer, bool):
            raise ApiError(400, f"steerlex.steer must be true or false, got {steer!r}.",
                           param="steerlex.steer")  # fmt: skip
        enabled = steer
    strength = spec.get("strength")
    if strength is not None:
        if (
            isinstance(strength, bool)
            or not isinstance(strength, (int, float))
            or not math.isfinite(strength)
            or strength < 0
        ):
            raise ApiError(400, f"steerlex.strength must be a finite number >= 0, got "
                           f"{strength!r}.", param="steerlex.strength")  # fmt: skip
        if strategy is None:
            raise ApiError(400, "steerlex.strength: this server has no steering strategy to "
                           "set a strength on; leave it out.", param="steerlex.strength")  # fmt: skip
        try:
            strategy = strategy.with_strength(float(strength))
            strategy.check(steered.sae)
        except SteeringError as exc:
            raise ApiError(400, f"steerlex.strength: {exc}", param="steerlex.strength") from None
    return strategy, enabled


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
