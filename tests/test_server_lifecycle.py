"""``steerlex serve`` on Starlette + uvicorn: stop strings, /health, /metrics and a clean
shutdown (in process, and for real: SIGTERM and SIGINT sent to a ``steerlex serve`` process)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from conftest import save_tiny_model
from steerlex.core.errors import SteeringError
from steerlex.sae.base import SAEConfig, SparseAutoencoder
from steerlex.sae.formats import save_sae
from steerlex.steer import SteeredModel
from steerlex.steer.server import SteeringServer, make_server
from test_steer_server import KEY, MESSAGES, MODEL, chat_body, make_steered, post, serve


@pytest.fixture(scope="module")
def steered() -> SteeredModel:
    return make_steered()


@pytest.fixture(scope="module")
def server(steered: SteeredModel) -> Iterator[SteeringServer]:
    srv = serve(steered)
    yield srv
    srv.shutdown()


@pytest.fixture
def client(server: SteeringServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def get(srv: SteeringServer, path: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"{srv.url}{path}", timeout=10) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, err.read(), {k.lower(): v for k, v in err.headers.items()}


# --- stop ---------------------------------------------------------------------------------------


def whole_reply(client: openai.OpenAI) -> tuple[str, int]:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)
    assert r.usage is not None
    text = r.choices[0].message.content or ""
    return text, r.usage.completion_tokens


def a_stop_string(text: str) -> tuple[str, int]:
    """A piece of ``text`` from its middle to stop at, and where it first starts."""
    assert len(text) >= 6, text
    piece = text[len(text) // 2 : len(text) // 2 + 2]
    return piece, text.find(piece)


def test_stop_cuts_the_reply_and_ends_generation_early(client: openai.OpenAI) -> None:
    text, tokens = whole_reply(client)
    stop, cut = a_stop_string(text)
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, stop=["never-there", stop]
    )
    assert r.choices[0].message.content == text[:cut]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens < tokens  # stopped early
    # a single string works too; one that never appears changes nothing
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, stop=stop)
    assert r.choices[0].message.content == text[:cut]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, stop="zzqx")
    assert r.choices[0].message.content == text


def test_streaming_never_sends_text_past_the_stop_string(client: openai.OpenAI) -> None:
    text, _ = whole_reply(client)
    stop, cut = a_stop_string(text)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, stop=[stop], stream=True
    )
    chunks = [c for c in stream if c.choices]
    sent = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert sent == text[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_limits(server: SteeringServer) -> None:
    status, data, _ = post(server, chat_body(stop=["a", "b", "c", "d", "e"]))
    assert status == 400 and data["error"]["param"] == "stop"
    status, data, _ = post(server, chat_body(stop={"x": 1}))
    assert status == 400 and "string or a list of strings" in data["error"]["message"]
    status, data, _ = post(server, chat_body(stop=["", None]))
    assert status == 400
    status, data, _ = post(server, chat_body(stop=["", "zzqx"], max_tokens=2))
    assert status == 200, data


# --- /health and /metrics -----------------------------------------------------------------------


def test_health_reports_the_model_and_the_queue(server: SteeringServer) -> None:
    status, body, _ = get(server, "/health")
    data = json.loads(body)
    assert status == 200
    assert data["status"] == "ok" and data["model_loaded"] is True
    assert data["queued"] == 0 and data["running"] in (0, 1) and data["max_queue"] == 64


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m is not None, (name, labels, text)
    return float(m.group(1))


def test_metrics_in_prometheus_text_format(server: SteeringServer) -> None:
    _, before, _ = get(server, "/metrics")
    status, data, _ = post(server, chat_body(max_tokens=4))
    assert status == 200
    post(server, chat_body(max_tokens=99))  # 400
    status, body, headers = get(server, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    for line in text.splitlines():  # every line is a comment or "name{labels} number"
        assert line.startswith("# ") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? [0-9.e+-]+", line)
    ok = '{endpoint="/v1/chat/completions",status="200"}'
    bad = '{endpoint="/v1/chat/completions",status="400"}'
    old = before.decode()
    was = metric(old, "steerlex_requests_total", ok) if ok in old else 0
    assert metric(text, "steerlex_requests_total", ok) == was + 1
    assert metric(text, "steerlex_requests_total", bad) >= 1
    tokens = metric(text, "steerlex_generated_tokens_total")
    assert (
        tokens - metric(old, "steerlex_generated_tokens_total")
        == data["usage"]["completion_tokens"]
    )
    assert metric(text, "steerlex_tokens_per_second") > 0
    assert metric(text, "steerlex_queue_depth") == 0
    assert metric(text, "steerlex_gate_opens_total") == 0  # no gate on this strategy


# --- shutdown in process ------------------------------------------------------------------------


def sse_events(resp: Any) -> Iterator[Any]:
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            yield payload if payload == "[DONE]" else json.loads(payload)


def open_stream(url: str, max_tokens: int, key: str | None = KEY) -> Any:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), method="POST"
    )
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    return urllib.request.urlopen(req, timeout=60)


def test_shutdown_without_grace_ends_a_stream_with_an_error_event(steered: SteeredModel) -> None:
    srv = make_server(
        steered, port=0, api_key=KEY, model_name=MODEL, shutdown_grace=0.0,
    )  # fmt: skip
    srv.start()
    gate = threading.Event()
    decoder = srv.worker.decoder
    real = decoder.step
    steps = 0

    def slow_step() -> Any:  # hold the generation (after its first tokens) until shutdown began
        nonlocal steps
        steps += 1
        if steps == 3:
            gate.wait(10)
        return real()

    decoder.step = slow_step  # type: ignore[method-assign]
    with open_stream(srv.url, 64) as resp:
        events = sse_events(resp)
        first = next(events)
        assert first["choices"][0]["delta"]["role"] == "assistant"
        closer = threading.Thread(target=srv.shutdown)
        closer.start()
        time.sleep(0.3)
        gate.set()
        rest = list(events)
    closer.join(30)
    assert not closer.is_alive()
    assert rest[-1] == "[DONE]"
    assert "error" in rest[-2], rest
    assert rest[-2]["error"]["code"] == "generation_aborted"
    assert "shutting down" in rest[-2]["error"]["message"]


def test_shutdown_grace_lets_a_running_reply_finish(steered: SteeredModel) -> None:
    with serve(steered) as srv:  # default grace: 10 s
        with open_stream(srv.url, 16) as resp:
            events = sse_events(resp)
            next(events)
            closer = threading.Thread(target=srv.shutdown)
            closer.start()
            rest = list(events)
        closer.join(30)
    assert rest[-1] == "[DONE]"
    finals = [e for e in rest[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finals and finals[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_shutdown_grace_must_be_a_number() -> None:
    with pytest.raises(SteeringError, match="shutdown_grace"):
        make_server(make_steered(), port=0, shutdown_grace=-1)


# --- shutdown for real: signals to a steerlex serve process -------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_model(tmp / "model")
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, k=8, layer=2, model_spec=str(model_dir)))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    save_sae(sae, tmp / "sae")
    return tmp / "sae"


def start_cli(sae: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """``steerlex serve`` as a subprocess on the tiny model; (process, its URL)."""
    env = {**os.environ, "STEERLEX_SERVER_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "steerlex.cli", "serve", "--sae", str(sae), "--features",
            "3,11", "--strategy", "amplify", "--alpha", "4", "--port", "0",
            "--model-name", MODEL, *extra]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        m = re.search(r"serving \S+ at (http://127\.0\.0\.1:\d+)", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain the rest
            return proc, m.group(1)
    proc.wait(10)
    raise AssertionError("steerlex serve did not start:\n" + "".join(seen))


def test_sigterm_mid_stream_exits_0_and_the_stream_ends_properly(saved: Path) -> None:
    proc, url = start_cli(saved, "--shutdown-grace", "0", "--max-tokens-limit", "100")
    try:
        with open_stream(url, 100) as resp:
            events = sse_events(resp)
            assert next(events)["choices"][0]["delta"]["role"] == "assistant"
            proc.send_signal(signal.SIGTERM)
            rest = list(events)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rest and rest[-1] == "[DONE]", rest
    last = rest[-2] if len(rest) > 1 else {}
    finished = bool(last.get("choices")) and last["choices"][0]["finish_reason"] is not None
    assert finished or "error" in last, rest


def test_sigint_when_idle_exits_0(saved: Path) -> None:
    proc, url = start_cli(saved)
    try:
        status, _, _ = post_url(url)
        assert status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def post_url(url: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    class Where:
        pass

    where = Where()
    where.url = url  # type: ignore[attr-defined]
    return post(where, chat_body(max_tokens=3))  # type: ignore[arg-type]
