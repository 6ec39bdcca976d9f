"""``steerlex serve``: the OpenAI-compatible API over a tiny random model, on localhost."""

from __future__ import annotations

import copy
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from conftest import make_tiny_loaded, save_tiny_model
from steerlex.cli import main
from steerlex.jobs import steer as steer_jobs
from steerlex.sae.base import SAEConfig, SparseAutoencoder
from steerlex.sae.formats import save_sae
from steerlex.steer import Amplification, SteeredModel, encode_chat
from steerlex.steer.server import ServerLimits, SteeringServer, make_server

KEY = "test-key"
MODEL = "tiny"
ALPHA = 8.0
MESSAGES = [{"role": "user", "content": "tell me a short story about the cat"}]


def make_steered() -> SteeredModel:
    loaded = make_tiny_loaded()
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, k=8, layer=2))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    return SteeredModel(loaded, sae, Amplification((3, 11), alpha=ALPHA))


@pytest.fixture(scope="module")
def steered() -> SteeredModel:
    return make_steered()


def serve(steered: SteeredModel, **limits: Any) -> SteeringServer:
    kw: dict[str, Any] = {"max_tokens": 16, "default_max_tokens": 8, "max_messages": 4,
                          "max_body_bytes": 4096, "max_queue": 64}  # fmt: skip
    kw.update(limits)
    server = make_server(
        steered, host="127.0.0.1", port=0, api_key=KEY, model_name=MODEL,
        limits=ServerLimits(**kw),
    )  # fmt: skip
    server.start()
    return server


@pytest.fixture(scope="module")
def server(steered: SteeredModel) -> Iterator[SteeringServer]:
    srv = serve(steered)
    yield srv
    srv.shutdown()


@pytest.fixture
def client(server: SteeringServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(
    server: SteeringServer, body: Any, *, key: str | None = KEY, raw: bytes | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST /v1/chat/completions with urllib: (status, JSON body, headers, names lowercased)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{server.url}/v1/chat/completions", data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return (
                resp.status,
                json.loads(resp.read()),
                {k.lower(): v for k, v in resp.headers.items()},
            )
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), {k.lower(): v for k, v in err.headers.items()}


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, **extra}


def direct(steered: SteeredModel, *, steer: bool = True, alpha: float = ALPHA) -> str:
    """What SteeredModel.chat gives for MESSAGES, greedy, 8 tokens."""
    view = make_view(steered, steer, alpha)
    return view.chat(MESSAGES, max_new_tokens=8).text


def make_view(steered: SteeredModel, steer: bool, alpha: float) -> SteeredModel:
    view = copy.copy(steered)
    assert steered.strategy is not None
    view.strategy = steered.strategy.with_strength(alpha)
    view.enabled = steer
    return view


# --- completions --------------------------------------------------------------------------------


def test_completion_matches_steered_model(client: openai.OpenAI, steered: SteeredModel) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == direct(steered)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 8
    extra = r.model_extra or {}
    field = extra["steerlex"]
    assert field["steer"] is True and field["strength"] == ALPHA
    assert [f["feature"] for f in field["report"]["features"]] == [3, 11]
    assert field["report"]["edited_prompt_positions"] > 0
    assert {f["feature"] for f in field["fired"]} <= {3, 11}


def test_streaming_concatenates_to_the_whole_reply(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) >= 2  # arrived in more than one piece
    assert "".join(pieces) == whole.choices[0].message.content
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert (last.model_extra or {})["steerlex"]["steer"] is True
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_models_and_health(client: openai.OpenAI, server: SteeringServer) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as resp:  # no key needed
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["model"] == MODEL and health["max_queue"] == 64


def test_sampling_with_seed_is_reproducible(client: openai.OpenAI) -> None:
    def ask() -> str | None:
        r = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.5, top_p=0.9, seed=7,
        )  # fmt: skip
        return r.choices[0].message.content

    assert ask() == ask()


# --- steering overrides -------------------------------------------------------------------------


def test_steer_off_equals_the_unsteered_model(client: openai.OpenAI, steered: SteeredModel) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, extra_body={"steerlex": {"steer": False}},
    )  # fmt: skip
    # the bare transformers model, no hook at all
    enc = encode_chat(steered.loaded.tokenizer, MESSAGES)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        out = steered.loaded.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
            do_sample=False, pad_token_id=steered.loaded.tokenizer.pad_token_id,
        )  # fmt: skip
    bare = steered.loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert r.choices[0].message.content == bare
    assert bare != direct(steered)  # the steering does change this reply
    report = (r.model_extra or {})["steerlex"]["report"]
    assert report["steered"] is False and report["edited_prompt_positions"] == 0


def test_overrides_do_not_leak_between_interleaved_requests(
    server: SteeringServer, steered: SteeredModel
) -> None:
    settings = [(True, ALPHA), (False, ALPHA), (True, 2.0), (True, 0.0)]
    expected = {s: direct(steered, steer=s[0], alpha=s[1]) for s in settings}
    assert len(set(expected.values())) >= 2
    order = [settings[i % len(settings)] for i in range(16)]

    def ask(s: tuple[bool, float]) -> tuple[tuple[bool, float], str, dict[str, Any]]:
        override: dict[str, Any] = {"steer": s[0]}
        if s[1] != ALPHA:
            override["strength"] = s[1]
        status, body, _ = post(server, chat_body(steerlex=override))
        assert status == 200, body
        return s, body["choices"][0]["message"]["content"], body["steerlex"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, order))
    for s, text, field in results:
        assert text == expected[s], s
        assert field["steer"] is s[0] and field["strength"] == s[1]
    # the server's own settings are untouched
    assert steered.enabled is True and steered.strategy.strength == ALPHA
    status, body, _ = post(server, chat_body())
    assert status == 200
    assert body["choices"][0]["message"]["content"] == expected[(True, ALPHA)]


# --- auth and limits ----------------------------------------------------------------------------


def test_wrong_or_missing_key_is_401(server: SteeringServer) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, body, headers = post(server, chat_body(), key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert headers["www-authenticate"] == "Bearer"


def test_oversize_requests_name_their_limit(client: openai.OpenAI, server: SteeringServer) -> None:
    many = [{"role": "user", "content": "what is a tree"}] * 5
    with pytest.raises(openai.BadRequestError, match="max_messages=4"):
        client.chat.completions.create(model=MODEL, messages=many)
    with pytest.raises(openai.BadRequestError, match="max_tokens=16"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=17)
    with pytest.raises(openai.APIStatusError, match="max_body_bytes=4096") as info:
        big = [{"role": "user", "content": "cat " * 1200}]
        client.chat.completions.create(model=MODEL, messages=big)
    assert info.value.status_code == 413
    long_prompt = [{"role": "user", "content": "cat " * 200}]  # over the 128-token context
    status, body, _ = post(server, chat_body(messages=long_prompt))
    assert status == 400 and "context of 128 tokens" in body["error"]["message"]


def test_prompt_token_limit(steered: SteeredModel) -> None:
    with serve(steered, max_prompt_tokens=10) as srv:
        status, body, _ = post(srv, chat_body())
    assert status == 400 and "max_prompt_tokens=10" in body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        ([1, 2], 400, "must be a JSON object"),
        ({"model": MODEL}, 400, '"messages" is required'),
        ({"model": MODEL, "messages": []}, 400, "non-empty list"),
        ({"messages": MESSAGES}, 400, '"model" is required'),
        ({"model": "gpt-4o", "messages": MESSAGES}, 404, "model 'gpt-4o' not found"),
        (chat_body(messages=[{"role": "robot", "content": "hi"}]), 400, "role 'robot'"),
        (chat_body(messages=[{"role": "user", "content": " "}]), 400, "empty or non-text"),
        (chat_body(messages=[{"role": "user"}]), 400, "non-text content"),
        (chat_body(n=5), 400, "n must be an integer from 1 to 4"),
        (chat_body(n=0), 400, "n must be an integer from 1 to 4"),
        (chat_body(n=True), 400, "n must be an integer from 1 to 4"),
        (chat_body(stop=["a", "b", "c", "d", "e"]), 400, "at most 4 are allowed"),
        (chat_body(stop=[1]), 400, "stop must be a string or a list of strings"),
        (chat_body(logprobs="yes"), 400, "logprobs must be true or false"),
        (chat_body(logprobs=True, top_logprobs=21), 400, "top_logprobs must be an integer"),
        (chat_body(logprobs=True, top_logprobs=-1), 400, "top_logprobs must be an integer"),
        (chat_body(top_logprobs=2), 400, "top_logprobs needs logprobs=true"),
        (chat_body(steerlex={"guard": "block"}), 400, "steerlex.guard must be one of"),
        (chat_body(steerlex={"guard": "refuse"}), 400, "has none; start steerlex serve"),
        (chat_body(steerlex={"refusal": ""}), 400, "steerlex.refusal must be a non-empty"),
        (chat_body(steerlex={"refusal": 3}), 400, "steerlex.refusal must be a non-empty"),
        (chat_body(max_tokens=0), 400, "max_tokens must be an integer >= 1"),
        (chat_body(temperature=-1), 400, "temperature must be in [0, 2]"),
        (chat_body(top_p=0), 400, "top_p must be in (0, 1]"),
        (chat_body(stream="yes"), 400, "stream must be true or false"),
        (chat_body(steerlex={"strength": -1}), 400, "finite number >= 0"),
        (chat_body(steerlex={"strength": "big"}), 400, "finite number >= 0"),
        (chat_body(steerlex={"steer": "off"}), 400, "steerlex.steer must be true or false"),
        (chat_body(steerlex={"alpha": 2}), 400, "unknown field(s) ['alpha']"),
        (chat_body(steerlex=True), 400, '"steerlex" must be an object'),
    ],
)
def test_malformed_requests_are_400(
    server: SteeringServer, body: Any, status: int, message: str
) -> None:
    raw = body if isinstance(body, bytes) else None
    got, data, _ = post(server, body, raw=raw)
    assert got == status
    assert message in data["error"]["message"]
    assert set(data["error"]) == {"message", "type", "param", "code"}


def test_a_server_without_a_strategy_refuses_a_strength() -> None:
    srv = serve(SteeredModel(make_tiny_loaded(), layer=2))  # no SAE, no strategy
    try:
        got, data, _ = post(srv, chat_body(steerlex={"strength": 1.0}))
        assert got == 400 and "no steering strategy" in data["error"]["message"]
        got, data, _ = post(srv, chat_body())
        assert got == 200 and data["choices"][0]["message"]["content"] is not None
        assert data["steerlex"]["strength"] is None and data["steerlex"]["fired"] == []
        assert data["steerlex"]["strategy"] == "no steering"
    finally:
        srv.shutdown()


def test_routes(server: SteeringServer) -> None:
    def get(path: str) -> int:
        req = urllib.request.Request(f"{server.url}{path}")
        req.add_header("Authorization", f"Bearer {KEY}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    assert get("/v1/nothing") == 404
    assert get("/v1/chat/completions") == 405
    assert get("/v1/models/other") == 404


# --- concurrency --------------------------------------------------------------------------------


def rss_mb() -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc: cannot read the resident set size")
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no VmRSS in /proc/self/status")


def wave(server: SteeringServer, n: int = 32) -> list[tuple[int, dict[str, str]]]:
    def one(i: int) -> tuple[int, dict[str, str]]:
        steer = {"steer": i % 2 == 0}
        status, body, headers = post(server, chat_body(max_tokens=4, steerlex=steer))
        if status == 200:
            assert body["choices"][0]["message"]["content"] is not None
        return status, headers

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_load_with_a_small_queue_answers_429(steered: SteeredModel) -> None:
    with serve(steered, max_queue=1) as srv:
        results = wave(srv)
        assert len(results) == 32
        codes = [s for s, _ in results]
        assert set(codes) <= {200, 429}
        assert 200 in codes and 429 in codes
        busy = next(h for s, h in results if s == 429)
        assert int(busy["retry-after"]) >= 1
        status, _, _ = post(srv, chat_body())  # still serving afterwards
        assert status == 200


def test_load_with_a_large_queue_all_succeed_and_memory_is_stable(
    steered: SteeredModel,
) -> None:
    with serve(steered, max_queue=64) as srv:
        assert [s for s, _ in wave(srv)] == [200] * 32
        first = rss_mb()
        assert [s for s, _ in wave(srv)] == [200] * 32
        second = rss_mb()
        assert srv.queued() == 0
    assert second - first < 50, f"RSS grew from {first:.0f} MB to {second:.0f} MB"


def test_shutdown_answers_waiting_requests_and_frees_the_port(steered: SteeredModel) -> None:
    srv = serve(steered, max_queue=64, max_tokens=64)
    url = srv.url
    codes: list[int] = []

    def one() -> None:
        try:
            codes.append(post(srv, chat_body(max_tokens=64))[0])
        except (urllib.error.URLError, ConnectionError):  # still in the listen backlog
            codes.append(-1)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while srv.queued() < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    waiting = srv.queued()
    srv.shutdown()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert len(codes) == 8 and set(codes) <= {200, 503, -1}
    if waiting >= 3:
        assert 503 in codes
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/health", timeout=5)
    srv.shutdown()  # twice is fine
    make_server(steered, port=0).shutdown()  # never served: returns at once


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import steerlex.steer.server as server_mod

    model_dir = save_tiny_model(tmp_path / "model")
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, k=8, layer=2, model_spec=str(model_dir)))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    save_sae(sae, tmp_path / "sae")
    seen: dict[str, Any] = {}
    real = server_mod.make_server

    def spy(*args: Any, **kwargs: Any) -> SteeringServer:
        srv = real(*args, **kwargs)

        def drive() -> None:  # ask once, then stop the server like SIGTERM would
            srv._serving.wait(10)
            seen["status"], seen["body"], _ = post(srv, {"model": srv.model_name,
                                                         "messages": MESSAGES, "max_tokens": 3},
                                                   key="cli-key")  # fmt: skip
            srv.shutdown()

        threading.Thread(target=drive, daemon=True).start()
        return srv

    monkeypatch.setattr(steer_jobs, "make_server", spy)
    monkeypatch.setenv("STEERLEX_SERVER_API_KEY", "cli-key")
    argv = ["serve", "--sae", str(tmp_path / "sae"), "--features", "3,11", "--strategy", "amplify",
            "--alpha", "4", "--port", "0", "--max-queue", "2", "--max-tokens-limit", "8"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "serving model at http://127.0.0.1:" in out and "(auth on)" in out
    assert "curl http://127.0.0.1:" in out and 'extra_body={"steerlex"' in out
    assert "$STEERLEX_SERVER_API_KEY" in out and "cli-key" not in out
    assert seen["status"] == 200, seen
    assert seen["body"]["steerlex"]["strategy"].startswith("amplify alpha=4")
    assert "guard: steer (no gate (--harm)" in out and "up to 8 requests decoded together" in out
    # a guard that needs a detector, without one: refused before the model is loaded
    assert main([*argv, "--guard", "refuse"]) != 0
    assert "--guard refuse acts on a harm detector; give --harm" in capsys.readouterr().err
