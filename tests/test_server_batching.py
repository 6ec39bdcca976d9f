"""``steerlex serve`` on the batched decoder: concurrent differently-steered requests, ``n``,
``logprobs``, guard modes and the ``steerlex`` field, over a tiny random model on localhost."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from steerlex.core.errors import SteeringError
from steerlex.steer import Amplification, Gate, SteeredModel
from steerlex.steer.server import ServerLimits, SteeringServer, make_server
from test_steer_server import ALPHA, KEY, MESSAGES, MODEL, chat_body, direct, make_steered, post

PROMPTS = [
    "tell me a short story about the cat",
    "what is a tree",
    "write a poem about rain and the sun",
    "please explain music",
]


@pytest.fixture(scope="module")
def steered() -> SteeredModel:
    return make_steered()


def serve(steered: SteeredModel, **kw: Any) -> SteeringServer:
    limits = ServerLimits(max_tokens=16, default_max_tokens=8, max_queue=64,
                          **kw.pop("limits", {}))  # fmt: skip
    srv = make_server(steered, port=0, api_key=KEY, model_name=MODEL, limits=limits, **kw)
    srv.start()
    return srv


@pytest.fixture(scope="module")
def server(steered: SteeredModel) -> Iterator[SteeringServer]:
    srv = serve(steered)
    yield srv
    srv.shutdown()


def metric(srv: SteeringServer, name: str) -> float:
    with urllib.request.urlopen(f"{srv.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def alone(steered: SteeredModel, prompt: str, steer: bool, alpha: float, n: int) -> str:
    view = steered.__class__.__new__(steered.__class__)
    view.__dict__.update(steered.__dict__)
    assert steered.strategy is not None
    view.strategy = steered.strategy.with_strength(alpha)
    view.enabled = steer
    return view.chat([{"role": "user", "content": prompt}], max_new_tokens=n).text


def test_concurrent_mixed_requests_are_batched_and_equal_each_alone(
    server: SteeringServer, steered: SteeredModel
) -> None:
    """Greedy replies of interleaved requests with different prompts, steering on/off and
    strengths, and lengths, decoded together, are what each gives alone."""
    settings = [(p, steer, alpha, n) for p in PROMPTS for steer, alpha, n in
                ((True, ALPHA, 12), (False, ALPHA, 9), (True, 2.0, 16))]  # fmt: skip
    expected = {s: alone(steered, *s) for s in settings}
    steps0, rows0 = (
        metric(server, "steerlex_decode_steps_total"),
        metric(server, "steerlex_decode_rows_total"),
    )

    def ask(s: tuple[str, bool, float, int]) -> str:
        override: dict[str, Any] = {"steer": s[1], "strength": s[2]}
        body = {"model": MODEL, "messages": [{"role": "user", "content": s[0]}],
                "max_tokens": s[3], "steerlex": override}  # fmt: skip
        status, data, _ = post(server, body)
        assert status == 200, data
        return str(data["choices"][0]["message"]["content"])

    with ThreadPoolExecutor(len(settings)) as pool:
        got = list(pool.map(ask, settings))
    for s, text in zip(settings, got, strict=True):
        assert text == expected[s], s
    steps = metric(server, "steerlex_decode_steps_total") - steps0
    rows = metric(server, "steerlex_decode_rows_total") - rows0
    assert rows / steps > 1.5, "requests were not decoded together"


def test_n_choices_with_seeds_and_greedy(server: SteeringServer, steered: SteeredModel) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    greedy = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.message.content for c in greedy.choices} == {direct(steered)}
    one = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert greedy.usage is not None and one.usage is not None
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
    kw: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8,
                          "temperature": 1.5, "seed": 41}  # fmt: skip
    sampled = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) >= 2  # each choice has its own seed
    assert texts == [c.message.content for c in client.chat.completions.create(n=3, **kw).choices]
    # choice i uses seed + i: choice 1 of seed 41 is choice 0 of seed 42
    shifted = client.chat.completions.create(n=1, **{**kw, "seed": 42})
    assert shifted.choices[0].message.content == texts[1]
    for c in sampled.choices:
        assert (c.model_extra or {})["steerlex"]["steer"] is True


def test_n_choices_stream(server: SteeringServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    kw: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12,
                          "temperature": 1.2, "seed": 5, "n": 2}  # fmt: skip
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = {0: "", 1: ""}
    finish: dict[int, str | None] = {}
    for c in chunks:
        for choice in c.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert [text[i] for i in (0, 1)] == [c.message.content for c in whole.choices]
    assert [finish[i] for i in (0, 1)] == [c.finish_reason for c in whole.choices]


def test_logprobs(server: SteeringServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3
    )
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert r.usage is not None and len(entries) == r.usage.completion_tokens
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the likeliest
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.bytes is not None
    # this tiny tokenizer is word-level: a token's text is its word (byte-level BPE: see below)
    assert choice.message.content is not None
    assert "".join(e.token for e in entries) == choice.message.content.replace(" ", "")
    assert all(bytes(e.bytes or []) == e.token.encode() for e in entries)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=1, stream=True
    )
    streamed = [
        e for c in stream for ch in c.choices if ch.logprobs and ch.logprobs.content
        for e in ch.logprobs.content
    ]  # fmt: skip
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries])


# --- guards -------------------------------------------------------------------------------------


def gated(steered: SteeredModel, threshold: float) -> SteeredModel:
    """``steered`` with a prompt gate on harm features 5, 6 at ``threshold``."""
    view = steered.__class__.__new__(steered.__class__)
    view.__dict__.update(steered.__dict__)
    view.strategy = Amplification((3, 11), alpha=ALPHA, gate=Gate((5, 6), threshold, "prompt"))
    return view


@pytest.mark.parametrize("threshold, opens", [(0.0, True), (1e9, False)])
def test_refuse_guard_by_default_and_per_request(
    steered: SteeredModel, threshold: float, opens: bool
) -> None:
    srv = serve(gated(steered, threshold), guard="refuse", refusal="Not with me.")
    try:
        status, body, _ = post(srv, chat_body())
        assert status == 200, body
        choice = body["choices"][0]
        field = choice["steerlex"]
        assert field["guard"] == "refuse" and field["gate_open"] is opens
        if opens:
            assert choice["message"]["content"] == "Not with me."
            assert choice["message"]["refusal"] == "Not with me."
            assert choice["finish_reason"] == "content_filter" and field["action"] == "refused"
            assert body["usage"]["completion_tokens"] == 0
            assert metric(srv, "steerlex_refused_total") == 1
        else:  # a closed gate: an ordinary, unsteered reply
            assert choice["message"]["content"] == alone(steered, MESSAGES[0]["content"], False,
                                                         ALPHA, 8)  # fmt: skip
            assert field["action"] == "none" and choice["message"]["refusal"] is None
        # per request: this one steers instead, and may set its own refusal
        status, body, _ = post(srv, chat_body(steerlex={"guard": "steer"}))
        assert body["choices"][0]["steerlex"]["action"] == ("steered" if opens else "none")
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        status, body, _ = post(srv, chat_body(steerlex={"refusal": "No."}, stream=False))
        if opens:
            assert body["choices"][0]["message"]["content"] == "No."
    finally:
        srv.shutdown()


def test_abort_guard_per_request_stops_the_reply(steered: SteeredModel) -> None:
    srv = serve(gated(steered, 0.0))  # default guard: steer
    try:
        status, body, _ = post(srv, chat_body(max_tokens=12, steerlex={"guard": "abort"}))
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] == "content_filter"
        assert choice["steerlex"]["action"] == "aborted" and choice["steerlex"]["guard"] == "abort"
        assert body["usage"]["completion_tokens"] < 12
        assert metric(srv, "steerlex_guard_aborted_total") == 1
    finally:
        srv.shutdown()


def test_abort_guard_streamed_ends_with_content_filter(steered: SteeredModel) -> None:
    srv = serve(gated(steered, 0.0), guard="abort")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=12, stream=True,
        ))  # fmt: skip
        last = [c for c in chunks if c.choices][-1]
        assert last.choices[0].finish_reason == "content_filter"
        assert (last.model_extra or {})["steerlex"]["action"] == "aborted"
    finally:
        srv.shutdown()


def test_server_guard_settings_are_checked(steered: SteeredModel) -> None:
    with pytest.raises(SteeringError, match="has none; give --harm"):
        make_server(steered, port=0, guard="refuse")  # no gate on this strategy
    with pytest.raises(SteeringError, match="guard must be one of"):
        make_server(gated(steered, 0.0), port=0, guard="block")  # type: ignore[arg-type]
    with pytest.raises(SteeringError, match="refusal text"):
        make_server(gated(steered, 0.0), port=0, guard="refuse", refusal=" ")
    with pytest.raises(SteeringError, match="max_batch"):
        ServerLimits(max_batch=0)


def test_health_and_metrics_report_the_batch(server: SteeringServer) -> None:
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as resp:
        health = json.loads(resp.read())
    assert health["model_loaded"] is True and health["max_batch"] == 8
    assert health["batch_rows"] == 0 and health["running"] == 0
    for name in ("steerlex_mean_batch_size", "steerlex_busy_seconds_total",
                 "steerlex_refused_total", "steerlex_guard_aborted_total"):  # fmt: skip
        assert metric(server, name) >= 0


def test_logprob_pieces_of_a_byte_level_tokenizer() -> None:
    """With byte-level BPE (Qwen, Llama 3, GPT-2) each token's bytes are exact: they join to
    the text's UTF-8, and a token holding part of a character is named by its bytes."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from steerlex.steer.runtime import TokenLogprob
    from steerlex.steer.server import _Pieces

    text = "héllo wörld, the café 🙂 über naïve"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text] * 4, vocab_size=300, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    pieces = _Pieces(tok)
    ids = tok.encode("🙂 über", add_special_tokens=False)
    raw = [bytes(pieces.piece(i)[1]) for i in ids]
    assert b"".join(raw) == "🙂 über".encode()
    byte_ids = [i for i in range(256) if tok.convert_ids_to_tokens(i) == "\u00f0"]  # byte 0xF0
    assert byte_ids
    assert pieces.piece(byte_ids[0]) == ("bytes:\\xf0", [0xF0])
    entry = pieces.entry(TokenLogprob(ids[0], -0.5, ((ids[0], -0.5), (ids[-1], -2.0))))
    assert entry["logprob"] == -0.5 and [t["logprob"] for t in entry["top_logprobs"]] == [
        -0.5,
        -2.0,
    ]
    assert entry["top_logprobs"][0]["bytes"] == entry["bytes"]
