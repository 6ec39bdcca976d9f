"""LLM summaries of explanations: a real local HTTP server stands in for the LLM."""

from __future__ import annotations

import json
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from steerlex.core.errors import BackendError, SummaryError
from steerlex.explain.run import Explanation
from steerlex.explain.summaries import (
    CANNOT_TELL,
    CONTEXTS_SYSTEM,
    SUMMARY_SYSTEM,
    BadAnswer,
    OpenAIBackend,
    SummaryWarning,
    TransformersBackend,
    backend_from_options,
    classify_levels,
    contexts_prompt,
    parse_level,
    parse_summary,
    skipped_report,
    summarize,
    words_prompt,
)
from steerlex.models.loading import LoadedModel

# A reply is (status, body bytes); a responder maps the request's JSON to a reply.
Reply = tuple[int, bytes]
Responder = Callable[[dict[str, Any]], Reply]


def chat_reply(content: Any) -> Reply:
    return 200, json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": content}}]}
    ).encode()


def good_answer(request: dict[str, Any]) -> Reply:
    """Answers by looking at the word list: animals, fragments ("cannot tell") or levels."""
    system = request["messages"][0]["content"]
    user = request["messages"][1]["content"]
    if system.startswith("You sort word lists"):
        if '"dog"' in user:
            return chat_reply("Semantic.")
        if '"unhappy"' in user:
            return chat_reply("Answer: morphological")
        return chat_reply("lexical or semantic, hard to say")  # names two: unusable
    if '"dog"' in user:
        return chat_reply("Animals\nThe words are all animals.")
    if '"}"' in user:
        return chat_reply("I can't tell.")
    return chat_reply(f"Summary of {len(user)} characters")


class FakeLLM:
    """A ThreadingHTTPServer on 127.0.0.1 that mimics POST /v1/chat/completions.

    ``script`` replies are used first, one per request; then ``responder`` answers.
    """

    def __init__(self, responder: Responder = good_answer) -> None:
        self.responder = responder
        self.script: list[Reply | float] = []  # a float: sleep that long, then use responder
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    status, payload = 404, b'{"error": "no such route"}'
                else:
                    item: Reply | float | None = fake.script.pop(0) if fake.script else None
                    if isinstance(item, float):
                        time.sleep(item)
                        item = None
                    status, payload = item if item is not None else fake.responder(body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def backend(self, **kwargs: Any) -> OpenAIBackend:
        kwargs.setdefault("retries", 2)
        kwargs.setdefault("retry_delay", 0.0)
        kwargs.setdefault("timeout", 5.0)
        return OpenAIBackend(self.base_url, "fake-model", **kwargs)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    server = FakeLLM()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEERLEX_LLM_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ANIMALS = Explanation(0, "mi", ("dog", "cat", "horse"), (3.0, 2.0, 1.0))
FRAGMENTS = Explanation(1, "mi", ("}", "xt", "."), (3.0, 2.0, 1.0))
OTHER = Explanation(2, "mi", ("alpha", "beta"), (1.0, 0.5))
EMPTY = Explanation(3, "mi", (), ())
PREFIXES = Explanation(4, "mi", ("unhappy", "unfair"), (1.0, 0.5))


def run(
    explanations: list[Explanation], backend: Any, cache: Path, **kwargs: Any
) -> tuple[list[Explanation], Any]:
    return summarize(explanations, backend, cache_dir=cache, progress=False, **kwargs)


def test_summaries_from_good_server_and_cache(llm: FakeLLM, tmp_path: Path) -> None:
    cache = tmp_path / "summaries"
    exps = [ANIMALS, FRAGMENTS, OTHER, EMPTY]
    out, report = run(exps, llm.backend(), cache)
    assert [e.summary for e in out] == ["Animals", CANNOT_TELL, out[2].summary, None]
    assert out[2].summary is not None and out[2].summary.startswith("Summary of")
    assert [e.words for e in out] == [e.words for e in exps]  # only the summary changes
    assert (report.summarized, report.cannot_tell, report.failed, report.no_words) == (2, 1, 0, 1)
    assert report.cached == 0 and report.total == 4
    assert len(llm.requests) == 3  # no call for the feature without words
    request = llm.requests[0]
    assert request["model"] == "fake-model" and request["temperature"] == 0.0
    assert request["messages"][0] == {"role": "system", "content": SUMMARY_SYSTEM}
    assert request["messages"][1]["content"] == 'Words: "dog", "cat", "horse"'
    assert "Authorization" not in llm.headers[0]
    assert len(list(cache.glob("*.json"))) == 3
    entry = json.loads(next(cache.glob("*.json")).read_text())
    assert set(entry) == {"backend", "system", "user", "answer"}

    again, report2 = run(exps, llm.backend(), cache)
    assert len(llm.requests) == 3  # the rerun made no HTTP call
    assert [e.summary for e in again] == [e.summary for e in out]
    assert report2.cached == 3 and report2.summarized == 2 and report2.cannot_tell == 1
    assert "from the cache" in report2.describe()

    # Another model (another back-end name) is another cache key.
    other = OpenAIBackend(llm.base_url, "other-model", retries=0)
    run([ANIMALS], other, cache)
    assert len(llm.requests) == 4


def test_n_words_cuts_the_list(llm: FakeLLM, tmp_path: Path) -> None:
    run([ANIMALS], llm.backend(), tmp_path, n_words=2)
    assert llm.requests[0]["messages"][1]["content"] == 'Words: "dog", "cat"'


def test_retries_500_then_succeeds(llm: FakeLLM, tmp_path: Path) -> None:
    llm.script = [(500, b"boom"), (503, b"busy")]
    out, report = run([ANIMALS], llm.backend(retries=2), tmp_path)
    assert out[0].summary == "Animals" and report.failed == 0
    assert len(llm.requests) == 3


def test_429_is_retried(llm: FakeLLM, tmp_path: Path) -> None:
    llm.script = [(429, b'{"error": "slow down"}')]
    out, _ = run([ANIMALS], llm.backend(retries=1), tmp_path)
    assert out[0].summary == "Animals" and len(llm.requests) == 2


def test_timeout_is_retried(llm: FakeLLM, tmp_path: Path) -> None:
    llm.script = [0.6]
    out, _ = run([ANIMALS], llm.backend(timeout=0.2, retries=1), tmp_path)
    assert out[0].summary == "Animals"  # the second attempt, answered by the responder


def test_retries_exhausted_is_a_counted_failure(llm: FakeLLM, tmp_path: Path) -> None:
    llm.script = [(500, b"boom")] * 3
    with pytest.warns(SummaryWarning, match="feature 0.*HTTP 500"):
        out, report = run([ANIMALS, OTHER], llm.backend(retries=2), tmp_path)
    assert out[0].summary is None and out[1].summary is not None
    assert report.failed == 1 and "failed 3 time(s)" in report.failures[0]
    assert len(llm.requests) == 4
    assert list(tmp_path.glob("*.json")) != []  # only the good answer is cached
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_401_fails_at_once_and_stops_the_run(llm: FakeLLM, tmp_path: Path) -> None:
    llm.responder = lambda _: (401, b'{"error": "bad key"}')
    backend = llm.backend(api_key="sk-wrong", retries=5)
    with pytest.warns(SummaryWarning) as caught:
        out, report = run([ANIMALS, FRAGMENTS, OTHER], backend, tmp_path)
    assert len(llm.requests) == 1  # neither retried nor repeated for the other features
    assert llm.headers[0]["Authorization"] == "Bearer sk-wrong"
    assert all(e.summary is None for e in out)
    assert report.failed == 3 and report.summarized == 0
    reason = report.failures[0]
    assert llm.base_url + "/chat/completions" in reason and "HTTP 401" in reason
    assert "API key" in reason and "bad key" in reason
    assert report.failures[1].startswith("not sent:")
    messages = [str(w.message) for w in caught]
    assert any("2 feature(s) got no summary" in m for m in messages)
    assert list(tmp_path.glob("*.json")) == []


def test_401_raised_by_backend_names_url_and_status(llm: FakeLLM) -> None:
    llm.responder = lambda _: (403, b"")
    with pytest.raises(BackendError, match=r"127\.0\.0\.1.*HTTP 403") as info:
        llm.backend().complete("s", "u")
    assert info.value.fatal


def test_wrong_path_404_is_fatal(tmp_path: Path, llm: FakeLLM) -> None:
    backend = OpenAIBackend(llm.base_url.removesuffix("/v1") + "/api", "m", retry_delay=0)
    with pytest.raises(BackendError, match="HTTP 404.*check base_url"):
        backend.complete("s", "u")


@pytest.mark.parametrize(
    "reply",
    [
        (200, b"this is not json"),
        (200, b'{"choices": []}'),
        chat_reply(None),
        chat_reply(""),
        chat_reply("   \n  "),
        chat_reply("?!... ---"),
        chat_reply("word " * 200),
    ],
    ids=["not-json", "no-choices", "null-content", "empty", "blank", "punctuation", "too-long"],
)
def test_garbage_is_skipped_with_warning_and_not_cached(
    llm: FakeLLM, tmp_path: Path, reply: Reply
) -> None:
    llm.responder = lambda _: reply
    with pytest.warns(SummaryWarning) as caught:
        out, report = run([ANIMALS, OTHER], llm.backend(), tmp_path)
    warned = [str(w.message) for w in caught]
    assert len(warned) == 2  # one warning per feature
    assert warned[0].startswith("No summary for feature 0:")
    assert [e.summary for e in out] == [None, None]
    assert report.failed == 2 and set(report.failures) == {0, 2}
    assert len(llm.requests) == 2  # garbage is not retried and does not stop the run
    assert list(tmp_path.glob("*.json")) == []

    # A later good server fills the failed features.
    llm.responder = good_answer
    out, report = run([ANIMALS, OTHER], llm.backend(), tmp_path)
    assert out[0].summary == "Animals" and report.failed == 0 and report.cached == 0


def test_unreachable_server_is_counted_and_run_continues(tmp_path: Path) -> None:
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "m", retries=1, retry_delay=0)
    exps = [ANIMALS, FRAGMENTS, OTHER, EMPTY, PREFIXES]
    with pytest.warns(SummaryWarning, match="failed 2 time"):
        out, report = run(exps, backend, tmp_path, max_consecutive_errors=2)
    assert all(e.summary is None for e in out)
    assert report.failed == 4 and report.no_words == 1
    assert "Connection" in report.failures[0] or "refused" in report.failures[0].lower()
    assert report.failures[2].startswith("not sent: the back end failed 2 times in a row")
    assert list(tmp_path.glob("*.json")) == []


def test_cached_answers_survive_an_unreachable_server(llm: FakeLLM, tmp_path: Path) -> None:
    run([ANIMALS], llm.backend(), tmp_path)
    dead = OpenAIBackend(llm.base_url, "fake-model", retries=0)
    llm.close()
    with pytest.warns(SummaryWarning, match="feature 2"):
        out, report = run([ANIMALS, OTHER], dead, tmp_path)
    assert out[0].summary == "Animals" and out[1].summary is None
    assert report.cached == 1 and report.failed == 1


def test_corrupt_cache_entry_is_ignored(llm: FakeLLM, tmp_path: Path) -> None:
    run([ANIMALS], llm.backend(), tmp_path)
    entry = next(tmp_path.glob("*.json"))
    entry.write_text("{not json")
    out, report = run([ANIMALS], llm.backend(), tmp_path)
    assert out[0].summary == "Animals" and report.cached == 0 and len(llm.requests) == 2
    assert json.loads(entry.read_text())["answer"].startswith("Animals")


def test_contexts_are_used_instead_of_words(llm: FakeLLM, tmp_path: Path) -> None:
    topact = Explanation(7, "topact", ("dog",), ())
    contexts = {7: ["the  dog\nbarked at", "a cat sat " * 100]}
    out, _ = run([topact], llm.backend(), tmp_path, contexts=contexts)
    messages = llm.requests[0]["messages"]
    assert messages[0]["content"] == CONTEXTS_SYSTEM
    assert messages[1]["content"] == contexts_prompt(contexts[7])
    assert messages[1]["content"].startswith('Passages:\n1. "the dog barked at"\n2. "a cat')
    assert len(messages[1]["content"]) < 400  # each context is cut
    assert out[0].summary is not None


def test_api_key_from_env(llm: FakeLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert llm.backend().api_key == "sk-openai"
    monkeypatch.setenv("STEERLEX_LLM_API_KEY", "sk-steerlex")
    llm.backend().complete("s", '"dog"')
    assert llm.headers[-1]["Authorization"] == "Bearer sk-steerlex"
    assert "sk-" not in llm.backend().name  # the key is not part of the cache key


@pytest.mark.parametrize(
    "answer",
    [
        "Cannot tell",
        "cannot tell.",
        "CANNOT TELL",
        "Can't tell",
        "I cannot tell what these have in common.",
        '"Cannot tell"',
        "Answer: can not tell",
        "<think>hmm, fragments</think>\nCannot tell",
        "- I can’t tell",
    ],
)
def test_cannot_tell_variants(answer: str) -> None:
    assert parse_summary(answer) == CANNOT_TELL


def test_parse_summary_cleans_the_line() -> None:
    assert parse_summary('Answer: "Pets and farm animals"\nBecause...') == "Pets and farm animals"
    assert parse_summary("\n\n  Summary: Legal terms  ") == "Legal terms"
    assert parse_summary("<think>\nlong musing\n</think>\nColours") == "Colours"
    for bad in ["", "  ", "...", '""', "x" * 400, None, 42]:
        with pytest.raises(BadAnswer):
            parse_summary(bad)


@pytest.mark.parametrize(
    ("answer", "level"),
    [
        ("semantic", "semantic"),
        ("Semantic.", "semantic"),
        ("Answer: LEXICAL", "lexical"),
        ("The level is morphological.\nNot semantic.", "morphological"),
        ("unclear", "unclear"),
        ("<think>lexical? semantic?</think> semantic", "semantic"),
    ],
)
def test_parse_level(answer: str, level: str) -> None:
    assert parse_level(answer) == level


@pytest.mark.parametrize("answer", ["", "lexical or semantic", "syntactic", "semantically", None])
def test_parse_level_garbage(answer: Any) -> None:
    with pytest.raises(BadAnswer):
        parse_level(answer)


def test_classify_levels(llm: FakeLLM, tmp_path: Path) -> None:
    exps = [ANIMALS, PREFIXES, OTHER, EMPTY]
    with pytest.warns(SummaryWarning, match="No level for feature 2"):
        levels = classify_levels(exps, llm.backend(), cache_dir=tmp_path, progress=False)
    assert levels == {0: "semantic", 4: "morphological"}
    assert len(llm.requests) == 3
    assert len(list(tmp_path.glob("*.json"))) == 2  # the unusable answer is not cached
    with pytest.warns(SummaryWarning):
        again = classify_levels(exps, llm.backend(), cache_dir=tmp_path, progress=False)
    assert again == levels and len(llm.requests) == 4  # only feature 2 is asked again


def test_levels_and_summaries_do_not_share_cache_entries(llm: FakeLLM, tmp_path: Path) -> None:
    run([ANIMALS], llm.backend(), tmp_path)
    levels = classify_levels([ANIMALS], llm.backend(), cache_dir=tmp_path, progress=False)
    assert levels == {0: "semantic"} and len(llm.requests) == 2


def test_default_cache_dir_is_under_the_steerlex_cache(llm: FakeLLM, cache_dir: Path) -> None:
    summarize([ANIMALS], llm.backend(), progress=False)
    assert len(list((cache_dir / "summaries").glob("*.json"))) == 1


def test_backend_raising_anything_is_a_failure(tmp_path: Path) -> None:
    class Broken:
        name = "broken"

        def __init__(self) -> None:
            self.calls = 0

        def complete(self, system: str, user: str) -> str:
            self.calls += 1
            raise RuntimeError("kaput")

    broken = Broken()
    with pytest.warns(SummaryWarning, match="RuntimeError: kaput"):
        out, report = run([ANIMALS, OTHER, PREFIXES], broken, tmp_path, max_consecutive_errors=10)
    assert broken.calls == 3 and report.failed == 3 and out[0].summary is None


def test_skipped_report() -> None:
    report = skipped_report()
    assert report.describe() == "summaries skipped (no back end configured)"
    assert report.to_json()["skipped"] == "no back end configured"
    assert report.summarized == report.failed == 0


def test_report_to_json(llm: FakeLLM, tmp_path: Path) -> None:
    llm.script = [chat_reply("")]
    with pytest.warns(SummaryWarning):
        _, report = run([ANIMALS, OTHER], llm.backend(), tmp_path)
    data = report.to_json()
    assert data["failed"] == 1 and set(data["failures"]) == {"0"}
    assert data["backend"].startswith("openai:")
    json.dumps(data)


def test_backend_from_options(llm: FakeLLM, tiny_loaded: LoadedModel) -> None:
    backend = backend_from_options("openai", base_url=llm.base_url, model="m", max_tokens=20)
    assert isinstance(backend, OpenAIBackend) and backend.max_tokens == 20
    assert backend.url == llm.base_url + "/chat/completions"
    full = backend_from_options("openai", base_url=backend.url + "/", model="m")
    assert isinstance(full, OpenAIBackend) and full.url == backend.url
    local = backend_from_options("transformers", loaded=tiny_loaded, max_new_tokens=4)
    assert isinstance(local, TransformersBackend) and "tiny-llama" in local.name
    with pytest.raises(SummaryError, match="needs base_url"):
        backend_from_options("openai", model="m")
    with pytest.raises(SummaryError, match="needs model"):
        backend_from_options("openai", base_url=llm.base_url)
    with pytest.raises(SummaryError, match="needs model"):
        backend_from_options("transformers")
    with pytest.raises(SummaryError, match="Unknown summary back end 'claude'"):
        backend_from_options("claude")
    with pytest.raises(SummaryError, match="not an http"):
        backend_from_options("openai", base_url="localhost:8000", model="m")
    with pytest.raises(SummaryError, match="max_tokens=0"):
        OpenAIBackend(llm.base_url, "m", max_tokens=0)


def test_bad_n_words(llm: FakeLLM, tmp_path: Path) -> None:
    with pytest.raises(SummaryError, match="n_words=0"):
        run([ANIMALS], llm.backend(), tmp_path, n_words=0)


def test_words_prompt_quotes_words() -> None:
    assert words_prompt([" the", 'say "hi"', "é"]) == 'Words: " the", "say \\"hi\\"", "é"'


@pytest.mark.filterwarnings("ignore:.*maximum length")
def test_transformers_backend_plumbing(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    backend = TransformersBackend(tiny_loaded, max_new_tokens=4)
    text, chat = backend.prompt_text("SYS", "USER")
    assert chat and text.startswith("[BOS]<|system|> SYS <|end|> <|user|> USER")
    answer = backend.complete(SUMMARY_SYSTEM, words_prompt(ANIMALS.words))
    assert isinstance(answer, str)
    assert backend.complete(SUMMARY_SYSTEM, words_prompt(ANIMALS.words)) == answer  # greedy
    with warnings.catch_warnings(record=True) as caught:  # random text: summary or failure
        warnings.simplefilter("always")
        out, report = run([ANIMALS, EMPTY], backend, tmp_path)
    assert report.summarized + report.cannot_tell + report.failed == 1
    assert report.no_words == 1 and out[1].summary is None
    summary_warnings = [w for w in caught if issubclass(w.category, SummaryWarning)]
    assert len(summary_warnings) == report.failed
    if report.failed == 0:
        assert isinstance(out[0].summary, str)
        again, report2 = run([ANIMALS], backend, tmp_path)
        assert report2.cached == 1 and again[0].summary == out[0].summary


def test_transformers_backend_without_chat_template(tiny_loaded: LoadedModel) -> None:
    tiny_loaded.tokenizer.chat_template = None
    backend = TransformersBackend(tiny_loaded, max_new_tokens=2)
    text, chat = backend.prompt_text("SYS", "USER")
    assert not chat and text == "SYS\n\nUSER\nAnswer:"
    assert isinstance(backend.complete("the cat", "the dog"), str)
