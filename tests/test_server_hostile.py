"""``steerlex serve`` under hostile input: each case was a 500, a hang or wasted work before.

Deep JSON, out-of-range seeds and strengths, lone surrogates, slow-drip clients, connection
floods and huge prompts must all be refused with a clear 4xx (or a prompt 503) before any work
reaches the worker thread, and never with a traceback or a 500.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import steerlex.steer.server as server_mod
from conftest import CHAT_TEMPLATE, SENTENCES, SPECIALS, make_tiny_llama, make_tokenizer
from steerlex.core.errors import SteeringError
from steerlex.models.loading import LoadedModel
from steerlex.steer import SteeredModel, encode_chat
from steerlex.steer.server import MAX_SEED, ServerLimits, SteeringServer
from test_steer_server import KEY, MODEL, chat_body, make_steered, post, serve

USER = '{"role": "user", "content": "tell me a short story about the cat"}'


@pytest.fixture(scope="module")
def steered() -> SteeredModel:
    return make_steered()


@pytest.fixture(scope="module")
def server(steered: SteeredModel) -> Iterator[SteeringServer]:
    srv = serve(steered, max_body_bytes=1 << 20)
    yield srv
    srv.shutdown()


@pytest.fixture
def worker_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per prompt the worker tokenizes (it calls encode_chat first for every job)."""
    calls: list[int] = []
    real = server_mod.encode_chat

    def spy(tokenizer: Any, messages: Any) -> Any:
        calls.append(len(messages))
        return real(tokenizer, messages)

    monkeypatch.setattr(server_mod, "encode_chat", spy)
    return calls


def post_raw(server: SteeringServer, body: str) -> tuple[int, dict[str, Any]]:
    status, data, _ = post(server, None, raw=body.encode("utf-8"))
    return status, data


def body_with(field: str) -> str:
    """A valid request as JSON text with ``field`` (raw JSON text, e.g. '"seed": NaN') added."""
    return f'{{"model": "{MODEL}", "messages": [{USER}], "max_tokens": 4, {field}}}'


def assert_refused(status: int, data: dict[str, Any], *words: str, param: str | None = None) -> str:
    assert status == 400, data
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], (w, err["message"])
    if param is not None:
        assert err["param"] == param
    return str(err["message"])


# --- 1. deep JSON -------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 10_000, 200_000])
@pytest.mark.parametrize("where", ["messages", "metadata"])
def test_deeply_nested_json_is_400(
    server: SteeringServer, worker_calls: list[int], depth: int, where: str
) -> None:
    # before: RecursionError -> 500 at 10,000 (and 65 went on to the worker)
    deep = "[" * depth + "]" * depth
    body = body_with(f'"{where}": {deep}')
    if where == "messages":
        body = f'{{"model": "{MODEL}", "messages": {deep}}}'
    status, data = post_raw(server, body)
    assert_refused(status, data, "nested more than 64 levels")
    assert data["error"]["code"] == "json_too_deep"
    assert worker_calls == []


def test_moderate_nesting_in_an_ignored_field_is_fine(server: SteeringServer) -> None:
    status, data = post_raw(server, body_with('"metadata": ' + '{"a": ' * 20 + "1" + "}" * 20))
    assert status == 200, data


def test_a_number_with_too_many_digits_is_400(server: SteeringServer) -> None:
    # before: ValueError (int max str digits) from json.loads -> 500
    status, data = post_raw(server, body_with('"user": ' + "9" * 5000))
    assert_refused(status, data, "number too long")


# --- 2. seed ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed", ["9223372036854775808", "18446744073709551616", "-1", "-9223372036854775809",
             "1.5", "true", '"7"', "NaN", "9" * 400],
)  # fmt: skip
def test_seed_out_of_range_or_not_an_integer_is_400(
    server: SteeringServer, worker_calls: list[int], seed: str
) -> None:
    # before: 2**64 and below -2**63 were a 500 from torch after queueing; 2**63 and -1 passed
    status, data = post_raw(server, body_with(f'"temperature": 1.0, "seed": {seed}'))
    assert_refused(status, data, "seed must be an integer from 0 to", str(MAX_SEED), param="seed")
    assert worker_calls == []


@pytest.mark.parametrize("seed", [0, MAX_SEED])
def test_seed_bounds_are_accepted(server: SteeringServer, seed: int) -> None:
    status, data, _ = post(server, chat_body(temperature=1.0, seed=seed, max_tokens=2))
    assert status == 200, data


# --- 3. steerlex overrides ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "strength", ["1e308", "1e30", "1000.5", "NaN", "Infinity", "-Infinity", "-1", "1" + "0" * 400,
                 "true", '"2"', "[1]"],
)  # fmt: skip
def test_bad_strength_is_refused_before_any_work(
    server: SteeringServer, worker_calls: list[int], strength: str
) -> None:
    # before: 1e308 generated, then failed to encode the report (inf) -> 500; 1e30 was accepted
    t0 = time.monotonic()
    status, data = post_raw(server, body_with(f'"steerlex": {{"strength": {strength}}}'))
    msg = assert_refused(status, data, "steerlex.strength", param="steerlex.strength")
    assert "finite number >= 0 and at most 1000 (limit max_strength)" in msg
    assert worker_calls == []
    assert time.monotonic() - t0 < 5


def test_strength_at_the_bound_is_served(server: SteeringServer) -> None:
    status, data, _ = post(server, chat_body(max_tokens=2, steerlex={"strength": 1000}))
    assert status == 200, data
    assert data["steerlex"]["strength"] == 1000.0
    status, data = post_raw(server, body_with('"steerlex": {"strength": null}'))  # not given
    assert status == 200 and data["steerlex"]["strength"] == 8.0


def test_max_strength_is_a_limit(steered: SteeredModel) -> None:
    with serve(steered, max_strength=10.0) as srv:
        status, data, _ = post(srv, chat_body(max_tokens=2, steerlex={"strength": 10.5}))
        assert_refused(status, data, "at most 10 (limit max_strength)")
        status, data, _ = post(srv, chat_body(max_tokens=2, steerlex={"strength": 10}))
        assert status == 200, data
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(SteeringError, match="max_strength"):
            ServerLimits(max_strength=bad)


# --- 4. lone surrogates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "where"),
    [
        ('[{"role": "user", "content": "cat \\ud800"}]', "message 0 content"),
        ('[{"role": "user", "content": "\\udc00"}]', "message 0 content"),
        (
            f'[{USER}, {{"role": "assistant", "content": "ok"}}, '
            '{"role": "user", "content": [{"type": "text", "text": "a \\udfff b"}]}]',
            "message 2 content",
        ),
        ('[{"role": "us\\ud800er", "content": "cat"}]', "message 0 role"),
    ],
)
def test_lone_surrogate_is_400_naming_the_message(
    server: SteeringServer, worker_calls: list[int], messages: str, where: str
) -> None:
    # before: a 500 from the worker's tokenizer (now the worker also refuses it, but only after
    # the request waited in the queue); here it is refused before queueing
    status, data = post_raw(server, f'{{"model": "{MODEL}", "messages": {messages}}}')
    assert_refused(status, data, where, "lone surrogate U+D", param="messages")
    assert worker_calls == []


def test_a_surrogate_pair_is_a_character(server: SteeringServer) -> None:
    status, data = post_raw(
        server, f'{{"model": "{MODEL}", "max_tokens": 2, "messages": '
        '[{"role": "user", "content": "the cat \\ud83d\\ude00"}]}',
    )  # fmt: skip
    assert status == 200, data


# --- other numeric and typed fields -------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "param", "words"),
    [
        ('"temperature": NaN', "temperature", "finite number"),
        ('"temperature": Infinity', "temperature", "finite number"),
        ('"temperature": 1e400', "temperature", "finite number"),
        ('"temperature": ' + "9" * 400, "temperature", "finite number"),
        ('"temperature": true', "temperature", "finite number"),
        ('"temperature": "1"', "temperature", "finite number"),
        ('"temperature": 3', "temperature", "[0, 2]"),
        ('"top_p": NaN', "top_p", "finite number"),
        ('"top_p": -Infinity', "top_p", "finite number"),
        ('"top_p": ' + "9" * 400, "top_p", "finite number"),
        ('"top_p": [1]', "top_p", "finite number"),
        ('"top_p": 1.5', "top_p", "(0, 1]"),
        ('"max_tokens": 8.0', "max_tokens", "integer >= 1"),
        ('"max_tokens": true', "max_tokens", "integer >= 1"),
        ('"max_tokens": NaN', "max_tokens", "integer >= 1"),
        ('"max_tokens": "8"', "max_tokens", "integer >= 1"),
        ('"max_tokens": -3', "max_tokens", "integer >= 1"),
        ('"max_tokens": ' + "9" * 400, "max_tokens", "over the limit max_tokens=16"),
        ('"max_completion_tokens": 1e3', "max_completion_tokens", "integer >= 1"),
        ('"max_completion_tokens": 17', "max_completion_tokens", "over the limit"),
        ('"stream_options": {"include_usage": "yes"}', "stream_options", "true or false"),
        ('"stream": 1', "stream", "true or false"),
        ('"n": 1e400', "n", "integer from 1"),
    ],
)
def test_bad_numbers_and_types_are_400(
    server: SteeringServer, worker_calls: list[int], field: str, param: str, words: str
) -> None:
    if field.startswith('"max_tokens"'):  # replace the body's own max_tokens
        body = f'{{"model": "{MODEL}", "messages": [{USER}], {field}}}'
    else:
        body = body_with(field)
    status, data = post_raw(server, body)
    assert_refused(status, data, words, param=param)
    assert worker_calls == []


def test_long_values_are_cut_in_error_messages(server: SteeringServer) -> None:
    status, data, _ = post(server, chat_body(tools=["x" * 100_000]))
    msg = assert_refused(status, data, "is not supported")
    assert len(msg) < 400
    status, data, _ = post(server, chat_body(stop=["x" * 100_000]))
    msg = assert_refused(status, data, "longer than 256 characters", param="stop")
    assert len(msg) < 400


def test_a_nan_in_a_reply_is_sent_as_null() -> None:
    # a model that produced NaN activations must not turn a finished reply into a 500
    data = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": "ok"}
    assert json.loads(server_mod._dumps(data)) == {"a": None, "b": [1.0, None],
                                                   "c": {"d": None}, "e": "ok"}  # fmt: skip
    assert json.loads(server_mod._dumps({"t": "a\ud800b"})) == {"t": "a\ud800b"}


# --- 5. slow clients and connection floods ------------------------------------------------------


def drip(server: SteeringServer, data: bytes, every: float, give_up: float) -> tuple[float, bytes]:
    """Send ``data`` one byte per ``every`` seconds until the server answers or closes (or
    ``give_up`` seconds pass); (seconds until then, what the server sent)."""
    host, port = server.server_address[:2]
    t0 = time.monotonic()
    with socket.create_connection((str(host), int(port)), timeout=give_up) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(every)
        for b in data:
            if time.monotonic() - t0 > give_up:
                break
            try:
                sock.sendall(bytes([b]))
            except OSError:  # the server closed
                break
            try:
                got = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - t0, b""
            seconds = time.monotonic() - t0
            sock.settimeout(2.0)
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    got += chunk
            return seconds, got
    return time.monotonic() - t0, b""


REQUEST = (
    f"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
).encode() + b" " * 100


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_slow_drip_client_hits_the_total_deadline(steered: SteeredModel, phase: str) -> None:
    # before: read_timeout bounded each read only, so a byte every 0.2 s held the thread forever
    with serve(steered, read_timeout=1.0) as srv:
        head, _, _ = REQUEST.partition(b"\r\n\r\n")
        if phase == "headers":
            seconds, answer = drip(srv, REQUEST, every=0.2, give_up=6.0)
        else:  # the headers at once, then the body byte by byte
            host, port = srv.server_address[:2]
            t0 = time.monotonic()
            with socket.create_connection((str(host), int(port)), timeout=6) as sock:
                sock.sendall(head + b"\r\n\r\n")
                sock.settimeout(0.2)
                answer = b""
                while time.monotonic() - t0 < 6 and not answer:
                    try:
                        sock.sendall(b" ")
                        answer = sock.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                seconds = time.monotonic() - t0
        assert seconds < 3.0, f"the server held a dripping client for {seconds:.1f} s"
        assert answer.startswith(b"HTTP/1.1 408"), answer
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "request_timeout"
        assert "read_timeout=1 s" in body["error"]["message"]
        status, data, _ = post(srv, chat_body(max_tokens=2))  # a normal client is still served
        assert status == 200, data
        wait_for(lambda: srv.connections() == 0)


def wait_for(check: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def health(srv: SteeringServer) -> tuple[int, dict[str, Any], dict[str, str]]:
    try:
        with urllib.request.urlopen(f"{srv.url}/health", timeout=10) as resp:
            return (
                resp.status,
                json.loads(resp.read()),
                {k.lower(): v for k, v in resp.headers.items()},
            )
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), {k.lower(): v for k, v in err.headers.items()}


def test_connections_over_the_cap_get_a_prompt_503(steered: SteeredModel) -> None:
    with serve(steered, max_connections=2, read_timeout=5.0) as srv:
        host, port = srv.server_address[:2]
        idle = [socket.create_connection((str(host), int(port))) for _ in range(2)]
        try:
            wait_for(lambda: srv.connections() == 2)
            t0 = time.monotonic()
            status, data, headers = health(srv)
            assert time.monotonic() - t0 < 2.0
            assert status == 503, data
            assert data["error"]["code"] == "too_many_connections"
            assert "max_connections=2" in data["error"]["message"]
            assert headers["retry-after"] == "1"
            assert srv.connections() == 2  # the refused one never got a thread
        finally:
            for s in idle:
                s.close()
        wait_for(lambda: srv.connections() == 0)
        status, data, _ = health(srv)
        assert status == 200 and data["connections"] == 1 and data["max_connections"] == 2


def test_new_limits_are_checked() -> None:
    for name, bad in [("max_connections", 0), ("max_connections", 2.5), ("read_timeout", 0),
                      ("read_timeout", float("inf"))]:  # fmt: skip
        with pytest.raises(SteeringError, match=name):
            ServerLimits(**{name: bad})


# --- 6. huge prompts ----------------------------------------------------------------------------


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (the GPT-2 / Llama 3 / Qwen kind), with an NFC normalizer as Qwen."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS, show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(SENTENCES * 5 + ["=" * 64, " " * 32], trainer)
    return wrap(backend)


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny SentencePiece-style BPE with byte fallback (the Llama 2 / Mistral / Gemma kind)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", *bytes_, *SPECIALS], show_progress=False
    )
    backend.train_from_iterator(SENTENCES * 5, trainer)
    return wrap(backend)


def wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", pad_token="[PAD]", unk_token="[UNK]",
        additional_special_tokens=SPECIALS[3:],
    )  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    return tok


def steered_with(tok: PreTrainedTokenizerFast) -> SteeredModel:
    loaded = LoadedModel(
        model=make_tiny_llama(len(tok)), tokenizer=tok, spec="tiny:bpe", kind="local",
        source="random init (tests)", weights_id="sha256:tiny-bpe", path=None,
    )  # fmt: skip
    return SteeredModel(loaded, layer=2)


TEXTS = [
    "tell me a short story about the cat",
    "cat " * 300,
    "=" * 500 + " " * 500 + "\n" * 100,
    "caf\u00e9 cafe\u0301 \u1100\u1161\u11a8 na\u00efve \u2603 \U0001f600 \u4e2d\u6587 " * 20,
    "e" + "\u0301" * 300,
    "<|user|> hi <|end|> [BOS] <|assistant|>" * 20,
    "\t \r\n\x0b\x0c\x1c\x85\xa0\u3000 x" * 50,
    "\u2581\u2581 \u2581 x" * 100,
    "".join(chr(c) for c in range(32, 1200)),
]


@pytest.mark.parametrize("make", [byte_level_tokenizer, sentencepiece_tokenizer])
def test_the_prompt_bound_never_exceeds_the_real_token_count(make: Any) -> None:
    tok = make()
    bound = server_mod._PromptBound.of(tok)
    assert bound is not None
    for text in TEXTS:
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert bound.tokens_at_least(text) <= n, (text[:40], bound.tokens_at_least(text), n)
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
        real = len(encode_chat(tok, [{"role": "user", "content": text}]).input_ids)
        assert bound.tokens_at_least(rendered) <= real
    # and a useful one: 30,000 letters are hundreds of tokens at least (this toy SentencePiece
    # has no pre-tokenizer, so it learned pieces of whole sentences, up to 53 letters)
    assert bound.tokens_at_least("cat" * 10_000) > 500


def test_no_prompt_bound_where_a_token_may_cover_any_length() -> None:
    # the tests' word-level tokenizer: one [UNK] may stand for a word of any length
    assert server_mod._PromptBound.of(make_tokenizer()) is None


@pytest.fixture(scope="module")
def bpe_steered() -> SteeredModel:
    return steered_with(byte_level_tokenizer())


def test_a_huge_prompt_is_refused_before_the_worker(
    bpe_steered: SteeredModel, worker_calls: list[int]
) -> None:
    # before: the worker rendered and tokenized all 400 KB before refusing it
    with serve(bpe_steered, max_body_bytes=1 << 20, max_prompt_tokens=64) as srv:
        t0 = time.monotonic()
        huge = [{"role": "user", "content": "cat " * 100_000}]
        status, data, _ = post(srv, chat_body(messages=huge))
        msg = assert_refused(status, data, "max_prompt_tokens=64", param="messages")
        assert "at least" in msg and data["error"]["code"] == "prompt_too_long"
        assert worker_calls == []
        assert time.monotonic() - t0 < 5
    with serve(bpe_steered, max_body_bytes=1 << 20) as srv:  # over the 128-token context
        status, data, _ = post(srv, chat_body(messages=[{"role": "user", "content": "cat " * 400}]))
        msg = assert_refused(status, data, "context of 128 tokens", param="max_tokens")
        assert "at least" in msg
        assert worker_calls == []


def test_a_long_prompt_that_fits_still_reaches_the_worker(
    bpe_steered: SteeredModel, worker_calls: list[int]
) -> None:
    with serve(bpe_steered, max_body_bytes=1 << 20, max_prompt_tokens=64) as srv:
        text = "tell me a short story about the cat " * 4  # 144 characters, under 64 tokens
        n = len(encode_chat(bpe_steered.loaded.tokenizer, [{"role": "user", "content": text}])
                .input_ids)  # fmt: skip
        assert len(text) > 64 >= n
        status, data, _ = post(srv, chat_body(messages=[{"role": "user", "content": text}]))
        assert status == 200, data
        assert worker_calls == [1]
        # over the limit yet not provably so by the cheap bound: the worker's exact count refuses it
        over = [{"role": "user", "content": "tell me a short story about the cat " * 7}]
        tok = bpe_steered.loaded.tokenizer
        rendered = tok.apply_chat_template(over, tokenize=False, add_generation_prompt=True)
        assert srv.prompt_bound is not None
        assert (
            srv.prompt_bound.tokens_at_least(rendered) <= 64 < len(encode_chat(tok, over).input_ids)
        )
        status, data, _ = post(srv, chat_body(messages=over))
        assert_refused(status, data, "tokens, over the limit max_prompt_tokens=64")
        assert len(worker_calls) == 2
