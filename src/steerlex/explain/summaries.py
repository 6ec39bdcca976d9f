"""Optional natural-language summaries of feature explanations, written by an LLM.

A feature's word list (its first ``n_words`` words) — or the TopAct contexts where it
fires, given as strings — goes to a chat LLM, which answers one short line ("Pets and
domestic animals") or exactly ``"Cannot tell"``. :func:`summarize` fills
:attr:`Explanation.summary` that way; :func:`classify_levels` asks for the linguistic
level of each list (lexical / morphological / semantic / unclear).

Back ends implement :class:`SummaryBackend` (``name`` and ``complete(system, user)``):
:class:`OpenAIBackend` (any OpenAI-compatible chat-completions endpoint, standard
library only) and :class:`TransformersBackend` (a local chat model). Every valid answer
is cached on disk, one JSON file per prompt (sha256 of the back end's name and both
prompts), so a rerun costs nothing; failures are never cached. A back end that fails or
answers garbage for a feature costs that feature its summary (a :class:`SummaryWarning`,
counted in the :class:`SummaryReport`), never the run. See docs/summaries.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from tqdm.auto import tqdm

from steerlex.core.errors import BackendError, SteerlexError, SummaryError
from steerlex.core.io import read_json_object, write_json_atomic
from steerlex.explain.run import Explanation
from steerlex.models.cache import cache_root
from steerlex.models.chat import chat_text, has_chat_template
from steerlex.models.loading import LoadedModel, load_model

CANNOT_TELL = "Cannot tell"
LEVELS = ("lexical", "morphological", "semantic", "unclear")
API_KEY_ENVS = ("STEERLEX_LLM_API_KEY", "OPENAI_API_KEY")
BACKEND_KINDS = ("openai", "transformers")
MAX_SUMMARY_CHARS = 300  # a first line longer than this is not "one short line"
MAX_CONTEXT_CHARS = 300  # each TopAct context is cut to this many characters

BackendKind = Literal["openai", "transformers"]


class SummaryWarning(UserWarning):
    """One feature got no summary (or level): the back end failed or answered garbage."""


class SummaryBackend(Protocol):
    """A chat LLM: one system instruction and one user message in, one text answer out."""

    @property
    def name(self) -> str:
        """Identity of the model and its settings; part of every cache key."""
        ...

    def complete(self, system: str, user: str) -> str:
        """The model's answer; raise :class:`BackendError` when there is none."""
        ...


# --------------------------------------------------------------------------- prompts

SUMMARY_SYSTEM = """\
You are labelling features of a neural language model. For each feature you get the \
words most strongly tied to it, strongest first. Say in one line what these words have \
in common: a shared meaning or topic, a grammatical role, a spelling or word-formation \
pattern, or one token written in several ways, whichever describes them best. Use a few \
words up to one sentence. Do not repeat the list and do not explain your reasoning. If \
the words have nothing you can name in common (for instance they are word pieces, \
symbols or punctuation), answer exactly: Cannot tell

Examples:

Words: "puppy", "cats", "hamster", "kitten", "dog", "pet", "parrot", "rabbit"
Answer: Pets and other domestic animals

Words: "swimming", "running", "cooking", "singing", "reading", "jumping", "driving"
Answer: Verbs ending in -ing

Words: "verdict", "judge", "plaintiff", "lawsuit", "attorney", "court", "appeal"
Answer: Courts and legal proceedings

Words: "although", "however", "yet", "but", "nevertheless", "whereas", "though"
Answer: Words that introduce a contrast

Words: " Paris", "paris", "PARIS", "Paris", " paris"
Answer: The name "Paris" in different casings and spacings

Words: "}", "xt", "##ly", ".", "_", "ph", "ous", ";"
Answer: Cannot tell"""

CONTEXTS_SYSTEM = """\
You are labelling features of a neural language model. For each feature you get short \
text passages in which it responds most strongly, strongest first. Say in one line what \
the feature responds to in these passages: a topic, a kind of word, a phrase, a piece of \
syntax or formatting. Use a few words up to one sentence. Do not quote the passages at \
length and do not explain your reasoning. If the passages share nothing you can name, \
answer exactly: Cannot tell

Examples:

Passages:
1. "the recipe needs two cups of flour and"
2. "add a tablespoon of sugar to the"
3. "whisk three eggs with the milk"
Answer: Cooking ingredients and quantities in recipes

Passages:
1. "ok so then"
2. "); x = "
3. "the 19th of"
Answer: Cannot tell"""

LEVELS_SYSTEM = """\
You sort word lists that describe features of a neural language model by linguistic \
level. Answer with exactly one word, one of:
lexical: one particular word or token in its variants (casing, spacing, spelling, \
inflections of that same word);
morphological: different words that share a form, such as a prefix, a suffix, an \
inflection or a part of speech;
semantic: different words that share a meaning, a topic or a concept;
unclear: none of these fits, or the list is word pieces, symbols or punctuation.

Examples:

Words: " Paris", "paris", "PARIS", "Paris", " paris"
Answer: lexical

Words: "unhappy", "unclear", "unfair", "unknown", "unable", "unusual"
Answer: morphological

Words: "verdict", "judge", "plaintiff", "lawsuit", "attorney", "court"
Answer: semantic

Words: "}", "xt", "##ly", ".", "_", "ph"
Answer: unclear"""


def words_prompt(words: Sequence[str], n_words: int = 15) -> str:
    """The user message for a word list: its first ``n_words`` words, each JSON-quoted so
    leading spaces and punctuation stay visible."""
    return "Words: " + ", ".join(json.dumps(w, ensure_ascii=False) for w in words[:n_words])


def contexts_prompt(contexts: Sequence[str], n_contexts: int = 10) -> str:
    """The user message for TopAct contexts: the first ``n_contexts``, numbered, each cut
    to ``MAX_CONTEXT_CHARS`` characters and JSON-quoted."""
    lines = [
        f"{i}. {json.dumps(' '.join(c.split())[:MAX_CONTEXT_CHARS], ensure_ascii=False)}"
        for i, c in enumerate(contexts[:n_contexts], start=1)
    ]
    return "Passages:\n" + "\n".join(lines)


# --------------------------------------------------------------------------- parsing


class BadAnswer(ValueError):
    """An answer that is not a usable summary or level (empty, too long, punctuation...)."""


_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_LABEL = re.compile(r"^(answer|summary|description|label|level)\s*[:\-]\s*", re.IGNORECASE)
_BULLET = re.compile(r"^([-*•]|\d+[.)])\s+")
_CANNOT_TELL = re.compile(
    r"^(i\s+)?(cannot|can\s*not|can't|can’t|unable\s+to)\s+(tell|say|determine)\b",
    re.IGNORECASE,
)
_QUOTES = "\"'`“”‘’"


def _first_line(answer: object) -> str:
    if not isinstance(answer, str):
        raise BadAnswer(f"the back end returned {type(answer).__name__}, not text")
    text = _THINK.sub("", answer)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise BadAnswer("the answer is empty")
    line = _BULLET.sub("", lines[0])
    line = _LABEL.sub("", line).strip()
    if len(line) > 1 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    if not line:
        raise BadAnswer("the answer is empty")
    return line


def parse_summary(answer: object) -> str:
    """The summary in ``answer``: its first non-empty line, without a leading "Answer:" or
    bullet and surrounding quotes; any "cannot tell" variant becomes exactly "Cannot tell".

    Raises :class:`BadAnswer` for non-text, an empty answer, a first line longer than
    ``MAX_SUMMARY_CHARS`` characters, or one without a letter or digit.
    """
    line = _first_line(answer)
    if _CANNOT_TELL.match(line.strip(_QUOTES + " ")):
        return CANNOT_TELL
    if len(line) > MAX_SUMMARY_CHARS:
        raise BadAnswer(f"the answer is {len(line)} characters long, more than {MAX_SUMMARY_CHARS}")
    if not any(ch.isalnum() for ch in line):
        raise BadAnswer(f"the answer {line[:40]!r} holds no letter or digit")
    return line


def parse_level(answer: object) -> str:
    """The level in ``answer``: the one of :data:`LEVELS` named in its first line (else in
    the whole answer). Raises :class:`BadAnswer` when none or several are named."""
    if not isinstance(answer, str):
        raise BadAnswer(f"the back end returned {type(answer).__name__}, not text")
    text = _THINK.sub("", answer)
    first = _first_line(text)
    for scope in (first, text):
        found = {lv for lv in LEVELS if re.search(rf"\b{lv}\b", scope, re.IGNORECASE)}
        if len(found) == 1:
            return found.pop()
    raise BadAnswer(f"the answer {first[:60]!r} does not name exactly one of {', '.join(LEVELS)}")


# --------------------------------------------------------------------------- back ends


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, Ollama...).

    ``base_url`` is the API root (``http://localhost:8000/v1``; requests go to
    ``<base_url>/chat/completions``) or the full chat-completions URL. The API key is
    ``api_key``, else ``$STEERLEX_LLM_API_KEY``, else ``$OPENAI_API_KEY``; with none, no
    Authorization header is sent (local servers rarely need one). Connection errors,
    timeouts, HTTP 429 and 5xx are retried ``retries`` times with exponential back-off
    (``retry_delay``, doubled each time; a numeric Retry-After is honoured up to 60 s);
    any other 4xx fails at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 64,
        timeout: float = 60.0,
        retries: int = 4,
        retry_delay: float = 1.0,
    ) -> None:
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise SummaryError(
                f"The LLM base URL {base_url!r} is not an http(s) URL; pass the API root of an "
                "OpenAI-compatible server, e.g. http://localhost:8000/v1."
            )
        if not model or not model.strip():
            raise SummaryError(
                "The OpenAI-compatible back end needs a model name (e.g. gpt-4o-mini, or the "
                "name your local server serves)."
            )
        if max_tokens < 1 or timeout <= 0 or retries < 0 or retry_delay < 0:
            raise SummaryError(
                f"Bad LLM settings: max_tokens={max_tokens} (must be >= 1), timeout={timeout} "
                f"(> 0), retries={retries} (>= 0), retry_delay={retry_delay} (>= 0)."
            )
        root = base_url.rstrip("/")
        self.url = root if root.endswith("/chat/completions") else root + "/chat/completions"
        self.model = model.strip()
        self.api_key = api_key or next(
            (os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None
        )
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.retry_delay = float(retry_delay)

    @property
    def name(self) -> str:
        return (
            f"openai:{self.url}|model={self.model}|temperature={self.temperature}"
            f"|max_tokens={self.max_tokens}"
        )

    def complete(self, system: str, user: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": user},
                ],
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            wait = self.retry_delay * 2**attempt
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code != 429 and exc.code < 500:
                    raise BackendError(
                        f"The LLM endpoint {self.url} answered HTTP {exc.code} {exc.reason}"
                        f"{detail}; {_advice(exc.code)}",
                        fatal=True,
                    ) from None
                last = f"HTTP {exc.code} {exc.reason}{detail}"
                wait = max(wait, _retry_after(exc))
            except (OSError, TimeoutError) as exc:  # URLError, refused, reset, timed out
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            else:
                return _chat_content(raw, self.url)
            if attempt < self.retries:
                time.sleep(wait)
        raise BackendError(
            f"The LLM endpoint {self.url} failed {self.retries + 1} time(s), last: {last}. "
            "Check that the server is running and reachable."
        )


def _error_detail(exc: urllib.error.HTTPError) -> str:
    with contextlib.suppress(Exception):
        text = exc.read().decode("utf-8", "replace").strip()
        if text:
            return f" ({' '.join(text.split())[:200]})"
    return ""


def _advice(code: int) -> str:
    if code in (401, 403):
        return "check the API key (api_key, $STEERLEX_LLM_API_KEY or $OPENAI_API_KEY)."
    if code == 404:
        return "check base_url (the API root, e.g. http://localhost:8000/v1) and the model name."
    return "check the request settings (model, max_tokens, temperature) against the server."


def _retry_after(exc: urllib.error.HTTPError) -> float:
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return min(max(float(value), 0.0), 60.0) if value else 0.0
    except ValueError:
        return 0.0


def _chat_content(raw: bytes, url: str) -> str:
    """``choices[0].message.content`` of a chat-completions response, as text."""
    try:
        data = json.loads(raw)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BackendError(
            f"The LLM endpoint {url} returned no chat completion "
            f"(expected JSON with choices[0].message.content, got {raw[:120]!r})."
        ) from None
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise BackendError(
            f"The LLM endpoint {url} returned a {type(content).__name__} as message content, "
            "not text."
        )
    return content


class TransformersBackend:
    """A local transformers chat model: greedy decoding of up to ``max_new_tokens`` tokens.

    The prompt goes through the tokenizer's chat template (system + user turn, then the
    assistant header); a template that refuses a system turn gets the instruction at the
    head of the user turn, and a tokenizer without a template gets plain text.
    """

    def __init__(self, loaded: LoadedModel, *, max_new_tokens: int = 48) -> None:
        if max_new_tokens < 1:
            raise SummaryError(f"max_new_tokens={max_new_tokens} must be at least 1.")
        self.loaded = loaded
        self.max_new_tokens = int(max_new_tokens)

    @property
    def name(self) -> str:
        ident = self.loaded.weights_id or self.loaded.spec
        return f"transformers:{ident}|max_new_tokens={self.max_new_tokens}|greedy"

    def prompt_text(self, system: str, user: str) -> tuple[str, bool]:
        """The formatted prompt and whether it is chat-formatted (no BOS to add then)."""
        tok = self.loaded.tokenizer
        if not has_chat_template(tok):
            return f"{system}\n\n{user}\nAnswer:", False
        try:
            return chat_text(tok, user, system_prompt=system), True
        except Exception:  # templates such as Gemma's reject a system turn
            return chat_text(tok, f"{system}\n\n{user}"), True

    def complete(self, system: str, user: str) -> str:
        text, chat = self.prompt_text(system, user)
        return greedy_completion(
            self.loaded, text, max_new_tokens=self.max_new_tokens, add_special_tokens=not chat
        )


def greedy_completion(
    loaded: LoadedModel, text: str, *, max_new_tokens: int, add_special_tokens: bool
) -> str:
    """The greedy continuation of the already formatted ``text`` (special tokens dropped)."""
    tok, model = loaded.tokenizer, loaded.model
    enc = tok(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    enc = {k: v.to(loaded.device) for k, v in enc.items()}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
    new = out[0, enc["input_ids"].shape[1] :]
    return str(tok.decode(new, skip_special_tokens=True))


def backend_from_options(
    kind: str,
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    temperature: float = 0.0,
    max_tokens: int = 64,
    timeout: float = 60.0,
    retries: int = 4,
    retry_delay: float = 1.0,
    loaded: LoadedModel | None = None,
    max_new_tokens: int = 48,
    dtype: str = "float32",
    device: str = "cpu",
) -> SummaryBackend:
    """A back end from CLI-style values (or ``**config_dict``).

    ``kind="openai"`` needs ``base_url`` and ``model`` (the served model's name).
    ``kind="transformers"`` needs ``loaded`` (a :class:`LoadedModel`) or ``model`` (a
    steerlex model spec, loaded here with ``dtype``/``device``).
    """
    if kind == "openai":
        if not base_url:
            raise SummaryError(
                "The 'openai' summary back end needs base_url: the API root of an "
                "OpenAI-compatible server, e.g. https://api.openai.com/v1 or "
                "http://localhost:8000/v1."
            )
        if not model:
            raise SummaryError(
                f"The 'openai' summary back end needs model: the name of the chat model "
                f"served at {base_url} (e.g. gpt-4o-mini)."
            )
        return OpenAIBackend(
            base_url,
            model,
            api_key=api_key,
            temperature=temperature,
            max_tokens=max_tokens,
            timeout=timeout,
            retries=retries,
            retry_delay=retry_delay,
        )
    if kind == "transformers":
        if loaded is None:
            if not model:
                raise SummaryError(
                    "The 'transformers' summary back end needs model: a steerlex model spec "
                    "of a chat model (e.g. embedded:qwen2.5-coder-0.5b-instruct), or a "
                    "loaded model."
                )

            loaded = load_model(model, dtype=dtype, device=device)
        return TransformersBackend(loaded, max_new_tokens=max_new_tokens)
    raise SummaryError(f"Unknown summary back end {kind!r}; use one of {', '.join(BACKEND_KINDS)}.")


# --------------------------------------------------------------------------- running


def default_cache_dir() -> Path:
    """``<steerlex cache>/summaries``: where summaries and levels are cached by default."""
    return cache_root() / "summaries"


@dataclass
class SummaryReport:
    """What a summary run did.

    ``summarized``: features given a description; ``cannot_tell``: features answered
    "Cannot tell"; ``cached``: how many of those two came from the cache; ``failed``:
    features left without a summary, with the reason per feature in ``failures``;
    ``no_words``: features with an empty word list (no call made). ``skipped`` says why
    no summaries were made at all (then every count is 0).
    """

    backend: str | None
    total: int = 0
    summarized: int = 0
    cannot_tell: int = 0
    cached: int = 0
    failed: int = 0
    no_words: int = 0
    failures: dict[int, str] = field(default_factory=dict)
    skipped: str | None = None

    def describe(self) -> str:
        """One line for logs and the CLI."""
        if self.skipped is not None:
            return f"summaries skipped ({self.skipped})"
        return (
            f"summaries: {self.summarized} described, {self.cannot_tell} 'Cannot tell', "
            f"{self.failed} failed, {self.no_words} without words "
            f"({self.cached} from the cache; back end {self.backend})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "total": self.total,
            "summarized": self.summarized,
            "cannot_tell": self.cannot_tell,
            "cached": self.cached,
            "failed": self.failed,
            "no_words": self.no_words,
            "failures": {str(k): v for k, v in sorted(self.failures.items())},
            "skipped": self.skipped,
        }


def skipped_report(reason: str = "no back end configured") -> SummaryReport:
    """The report of a run that made no summaries, e.g. because no back end is configured."""
    return SummaryReport(backend=None, skipped=reason)


def summarize(
    explanations: Sequence[Explanation],
    backend: SummaryBackend,
    *,
    cache_dir: str | Path | None = None,
    n_words: int = 15,
    contexts: Mapping[int, Sequence[str]] | None = None,
    n_contexts: int = 10,
    progress: bool = True,
    max_consecutive_errors: int = 3,
) -> tuple[list[Explanation], SummaryReport]:
    """Copies of ``explanations`` with ``summary`` filled, and a report.

    Each feature's first ``n_words`` words — or, when ``contexts`` has an entry for the
    feature, its first ``n_contexts`` context strings (e.g. ``Span.text`` of TopAct) — are
    sent to ``backend``. A feature without words (or contexts) gets no call; a feature
    whose call fails or whose answer is garbage keeps ``summary=None``, is counted as
    failed and warned about (:class:`SummaryWarning`). After a fatal back-end error (a
    4xx) or ``max_consecutive_errors`` back-end errors in a row, the remaining features
    are not sent and count as failed. Answers are cached under ``cache_dir`` (default
    :func:`default_cache_dir`).
    """
    if n_words < 1 or n_contexts < 1 or max_consecutive_errors < 1:
        raise SummaryError(
            f"n_words={n_words}, n_contexts={n_contexts} and max_consecutive_errors="
            f"{max_consecutive_errors} must each be at least 1."
        )
    items: list[tuple[int, str, str | None]] = []
    for e in explanations:
        ctx = contexts.get(e.feature) if contexts is not None else None
        if ctx:
            items.append((e.feature, CONTEXTS_SYSTEM, contexts_prompt(list(ctx), n_contexts)))
        elif e.words:
            items.append((e.feature, SUMMARY_SYSTEM, words_prompt(e.words, n_words)))
        else:
            items.append((e.feature, SUMMARY_SYSTEM, None))
    outcome = _ask_all(
        items,
        backend,
        parse_summary,
        _cache_path(cache_dir),
        what="summary",
        progress=progress,
        max_consecutive_errors=max_consecutive_errors,
    )
    report = SummaryReport(
        backend=backend.name,
        total=len(explanations),
        cached=outcome.cached,
        failed=len(outcome.failures),
        no_words=outcome.no_input,
        failures=outcome.failures,
    )
    out: list[Explanation] = []
    for e, (feature, _, _) in zip(explanations, items, strict=True):
        summary = outcome.values.get(feature)
        if summary is not None:
            if summary == CANNOT_TELL:
                report.cannot_tell += 1
            else:
                report.summarized += 1
        out.append(replace(e, summary=summary))
    return out, report


def classify_levels(
    explanations: Sequence[Explanation],
    backend: SummaryBackend,
    *,
    cache_dir: str | Path | None = None,
    n_words: int = 15,
    progress: bool = True,
    max_consecutive_errors: int = 3,
) -> dict[int, str]:
    """The linguistic level of each feature's word list: ``{feature: level}`` with level one
    of :data:`LEVELS`. Features without words, and those whose call fails or whose answer
    names no single level (warned about), are not in the dict. Same cache and failure
    rules as :func:`summarize`."""
    if n_words < 1 or max_consecutive_errors < 1:
        raise SummaryError(
            f"n_words={n_words} and max_consecutive_errors={max_consecutive_errors} must each "
            "be at least 1."
        )
    items = [
        (e.feature, LEVELS_SYSTEM, words_prompt(e.words, n_words) if e.words else None)
        for e in explanations
    ]
    outcome = _ask_all(
        items,
        backend,
        parse_level,
        _cache_path(cache_dir),
        what="level",
        progress=progress,
        max_consecutive_errors=max_consecutive_errors,
    )
    return outcome.values


@dataclass
class _Outcome:
    values: dict[int, str] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    cached: int = 0
    no_input: int = 0


def _cache_path(cache_dir: str | Path | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir)


def cache_key(backend_name: str, system: str, user: str) -> str:
    """sha256 (hex) of the back end's name and both prompts: the cache file's stem."""
    blob = json.dumps(
        {"backend": backend_name, "system": system, "user": user},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _ask_all(
    items: Sequence[tuple[int, str, str | None]],
    backend: SummaryBackend,
    parse: Callable[[object], str],
    cache_dir: Path,
    *,
    what: str,
    progress: bool,
    max_consecutive_errors: int,
) -> _Outcome:
    """Ask ``backend`` for each (feature, system, user) item; ``user=None`` means no input."""
    outcome = _Outcome()
    name = backend.name
    stopped: str | None = None  # why the back end is no longer called
    not_sent: list[int] = []
    in_a_row = 0
    cache_ok = True
    for feature, system, user in tqdm(items, desc=f"{what}s", unit="feature", disable=not progress):
        if user is None:
            outcome.no_input += 1
            continue
        path = cache_dir / f"{cache_key(name, system, user)}.json"
        hit = _read_cached(path, parse)
        if hit is not None:
            outcome.values[feature] = hit
            outcome.cached += 1
            continue
        if stopped is not None:
            outcome.failures[feature] = f"not sent: {stopped}"
            not_sent.append(feature)
            continue
        try:
            answer = backend.complete(system, user)
        except Exception as exc:  # never let one feature end the run
            reason = str(exc) if isinstance(exc, SteerlexError) else f"{type(exc).__name__}: {exc}"
            outcome.failures[feature] = reason
            warnings.warn(
                f"No {what} for feature {feature}: {reason}", SummaryWarning, stacklevel=3
            )
            in_a_row += 1
            if isinstance(exc, BackendError) and exc.fatal:
                stopped = (
                    f"the back end failed on feature {feature} with an error that "
                    "retrying cannot fix"
                )
            elif in_a_row >= max_consecutive_errors:
                stopped = f"the back end failed {in_a_row} times in a row"
            continue
        in_a_row = 0
        try:
            value = parse(answer)
        except BadAnswer as exc:
            outcome.failures[feature] = f"unusable answer: {exc}"
            warnings.warn(
                f"No {what} for feature {feature}: unusable answer from {name}: {exc}",
                SummaryWarning,
                stacklevel=3,
            )
            continue
        outcome.values[feature] = value
        if cache_ok:
            try:
                write_json_atomic(
                    path,
                    {"backend": name, "system": system, "user": user, "answer": answer},
                )
            except OSError as exc:
                cache_ok = False
                warnings.warn(
                    f"Cannot write the {what} cache in {cache_dir} ({exc}); going on without "
                    "caching. Pass a writable cache_dir or set $STEERLEX_CACHE.",
                    SummaryWarning,
                    stacklevel=3,
                )
    if not_sent:
        warnings.warn(
            f"{len(not_sent)} feature(s) got no {what} because {stopped} "
            f"(first: {not_sent[:5]}); fix the back end and rerun: finished answers are cached.",
            SummaryWarning,
            stacklevel=3,
        )
    return outcome


def _read_cached(path: Path, parse: Callable[[object], str]) -> str | None:
    """The cached answer's parsed value, or None (missing, unreadable or no longer valid)."""
    if not path.is_file():
        return None
    try:
        data = read_json_object(path, what="summary cache entry", fix="", error=SummaryError)
        return parse(data.get("answer"))
    except (SummaryError, BadAnswer):
        return None
