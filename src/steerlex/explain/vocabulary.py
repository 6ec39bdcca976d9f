"""A fixed word vocabulary for explaining SAE features, and its word vectors.

The mutual-information explainer scores every SAE feature against every word of a
fixed vocabulary (the paper uses 5,000 frequent English words). This module builds
such a vocabulary and turns it into one vector per word:

- :func:`vocabulary_from_wordfreq` — the top-N words of a language from the
  ``wordfreq`` package (the default, as in the paper);
- :func:`vocabulary_from_corpus` — the top-N words counted in the user's texts;
- :func:`vocabulary_from_file` — a word list, one word per line with an optional
  frequency;
- :func:`word_vectors` — the mean of the unembedding (``lm_head``) rows of each
  word's sub-tokens in its mid-sentence form (``" word"``), shape ``[M, d]``.

Every builder applies the same filters (alphabetic only, length bounds, optional
English stop-word removal) and, by default, merges inflected forms with a small
suffix-stripping stemmer (:func:`base_form`), keeping the most frequent surface form
and recording the others in :attr:`Vocabulary.merges`. ``docs/vocabulary.md``
describes the rules and their limits.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch

from steerlex.core.errors import VocabularyError
from steerlex.core.io import read_json_object, write_json_atomic

Dedupe = Literal["stem", "none"]
Matrix = Literal["lm_head", "embed_tokens"]

FORMAT = "steerlex-vocabulary"
FORMAT_VERSION = 1

#: How many wordfreq candidates to read per requested word (filters and merges drop many).
CANDIDATE_FACTOR = 10


# ---------------------------------------------------------------- stop words


#: About 170 common English function words (articles, pronouns, auxiliaries,
#: prepositions, conjunctions, determiners, a few adverbs). Lower case.
def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


ENGLISH_STOPWORDS: frozenset[str] = _word_set(
    """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    either else ever every few for from further had has have having he her here hers herself
    him himself his how however i if in into is it its itself just least less let many may
    me might mine more most much must my myself neither no nor not now of off often on once
    only onto or other others ought our ours ourselves out over own per quite rather same
    shall she should since so some such than that the their theirs them themselves then there
    these they this those though through thus to too toward towards under until up upon us
    very via was we were what whatever when whenever where whereas wherever whether which
    while who whoever whom whose why will with within without would yet you your yours
    yourself yourselves
    """
)


# ---------------------------------------------------------------- stemmer

#: Words the stemmer never reduces: their apparent base is another word
#: ("news" is not the plural of "new", "evening" is not a form of "even").
NEVER_STEM: frozenset[str] = _word_set(
    """
    news means goods arms glasses lots series species physics politics economics
    mathematics athletics ethics graphics does
    being doing during evening morning nothing something anything everything thing
    ceiling wedding pudding sibling darling shilling inning boring amazing interesting
    wicked tired united naked sacred beloved
    earring earnest willing kidding stranger corps
    hardly nearly lately shortly likely lovely early only barely fairly lonely homely
    kindly presently scarcely daily family rally belly bully silly jelly holy ugly
    supply apply reply italy july unlikely stately orderly friendly brotherly sisterly
    motherly fatherly courtly shapely deathly heartedly handedly purposely expressly
    """
)

_VOWELS = frozenset("aeiouy")
_BY_FREQUENCY = "#"  # marker in a candidate list: choose the most frequent known candidate
_KEEP_DOUBLE = frozenset("lsz")  # "falling" -> "fall", "missing" -> "miss", "buzzing" -> "buzz"


def _has_vowel(s: str) -> bool:
    return any(c in _VOWELS for c in s)


def _cvc(stem: str) -> bool:
    """Ends consonant-vowel-consonant, last not w/x/y ("hop", "not", "car"): a silent e
    was removed before -ing/-ed/-er, else the consonant would have been doubled."""
    return (
        len(stem) >= 3
        and stem[-3] not in _VOWELS
        and stem[-2] in _VOWELS
        and stem[-1] not in _VOWELS
        and stem[-1] not in "wx"
    )


def _verb_candidates(stem: str) -> list[str]:
    """Base forms to try for a stem left by removing -ing / -ed / -er / -est (preferred first)."""
    if len(stem) < 2 or not _has_vowel(stem):
        return []
    doubled = len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in _VOWELS
    if doubled:  # "running" -> "runn" -> "run"; "falling" -> "fall"; "added" -> "add"
        out = [stem, stem[:-1]] if stem[-1] in _KEEP_DOUBLE else [stem[:-1], stem]
    elif stem[-1] in _VOWELS:  # "going" -> "go" (too short), "seeing" -> "see"
        out = [stem]
    elif _cvc(stem) or len(stem) < 3:  # "hoping" -> "hope", "noted" -> "note", "used" -> "use"
        out = [stem + "e", stem]
    else:  # "waited" -> "wait", "leaving" -> "leave"; the more frequent when both are words
        out = [stem, stem + "e", _BY_FREQUENCY]
    return [c for c in out if len(c) >= 3 or c == _BY_FREQUENCY]


def _candidates(w: str, known: Collection[str]) -> list[str]:
    """Possible base forms of lower-case ``w``, most plausible first."""
    n = len(w)
    # plurals and third person singular
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        if w.endswith("ies") and n > 4:
            return [w[:-3] + "y", w[:-1]]  # studies -> study; movies -> movie
        if w.endswith(("ses", "xes", "zes", "ches", "shes", "oes")):
            return [w[:-1], w[:-2]]  # uses -> use; toes -> toe; boxes -> box; heroes -> hero
        return [w[:-1]]  # cats -> cat
    if w.endswith("ing") and n >= 5:
        return _verb_candidates(w[:-3])
    if w.endswith("ed") and n >= 4:
        if w.endswith("eed") and n <= 5:  # need, seed, feed, speed, breed
            return []
        if w.endswith("ied") and n > 4:
            return [w[:-3] + "y"]  # studied -> study; tried -> try
        return _verb_candidates(w[:-2])
    # comparatives and superlatives: only when both degrees exist ("letter" has no "lettest")
    for suffix, other in (("est", "er"), ("er", "est")):
        if w.endswith(suffix) and n >= len(suffix) + 3 and w[: -len(suffix)] + other in known:
            stem = w[: -len(suffix)]
            if stem.endswith("i"):
                return [stem[:-1] + "y"]  # happier -> happy
            return _verb_candidates(stem)  # bigger -> big; later -> late; older -> old
    if w.endswith("ly") and n >= 5:
        if w.endswith("ily"):
            return [w[:-3] + "y"]  # happily -> happy
        if w.endswith("bly"):
            return [w[:-1] + "e"]  # possibly -> possible
        stem = w[:-2]
        return [stem] if len(stem) >= 5 else []  # quickly -> quick; (really, mostly kept)
    return []


def _pick(cands: list[str], known: Collection[str] | Mapping[str, float]) -> str | None:
    found = [c for c in cands if c in known and c != _BY_FREQUENCY]
    if not found:
        return None
    if _BY_FREQUENCY in cands and isinstance(known, Mapping):
        return max(found, key=lambda c: float(known[c]))  # stable: first wins ties
    return found[0]


def base_form(word: str, known: Collection[str] | Mapping[str, float]) -> str:
    """The base form that ``word`` merges into, or ``word`` itself (lower case).

    A suffix is removed only when the resulting base is itself in ``known`` (the
    candidate word list), so the stemmer never invents non-words; see
    ``docs/vocabulary.md`` for the rules. Applied until nothing changes
    ("savings" -> "saving" -> "save"). When ``known`` maps words to frequencies, a
    tie between two real bases ("changed": "change" or "chang") goes to the more
    frequent one.
    """
    w = word.lower()
    for _ in range(3):
        if len(w) < 4 or w in NEVER_STEM:
            break
        nxt = _pick([c for c in _candidates(w, known) if c != w], known)
        if nxt is None:
            break
        w = nxt
    return w


# ---------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Vocabulary:
    """An ordered word list with frequencies and provenance.

    ``words[i]`` has frequency ``frequencies[i]`` (a wordfreq frequency in 0..1, a
    corpus count, or a file's frequency column); words are most frequent first.
    ``merges`` maps a kept word to the inflected forms merged into it.
    """

    words: tuple[str, ...]
    frequencies: tuple[float, ...]
    source: str
    merges: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.words) != len(self.frequencies):
            raise VocabularyError(
                f"A vocabulary needs one frequency per word; got {len(self.words)} words "
                f"and {len(self.frequencies)} frequencies."
            )

    def __len__(self) -> int:
        return len(self.words)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (format, version, source, words, frequencies, merges)."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "source": self.source,
            "words": list(self.words),
            "frequencies": list(self.frequencies),
            "merges": {k: list(v) for k, v in self.merges.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as JSON (atomic: temp file, then rename); return the path."""
        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`."""
        path = Path(path)
        data = read_json_object(
            path,
            what="vocabulary file",
            fix="write it with Vocabulary.save.",
            error=VocabularyError,
        )
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise VocabularyError(
                f'\'{path}\' is not a steerlex vocabulary (no "format": "{FORMAT}"); '
                "write it with Vocabulary.save."
            )
        if data.get("version") != FORMAT_VERSION:
            raise VocabularyError(
                f"'{path}' has vocabulary format version {data.get('version')!r}; this steerlex "
                f"reads version {FORMAT_VERSION}. Rebuild the vocabulary."
            )
        try:
            return cls(
                words=tuple(str(w) for w in data["words"]),
                frequencies=tuple(float(f) for f in data["frequencies"]),
                source=str(data["source"]),
                merges={str(k): tuple(str(x) for x in v) for k, v in data["merges"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise VocabularyError(f"The vocabulary file '{path}' is malformed ({exc!r}).") from None


def _check_params(n: int | None, min_len: int, max_len: int, dedupe: str) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise VocabularyError(f"The vocabulary size n must be an integer >= 1; got {n!r}.")
    if min_len < 1 or max_len < min_len:
        raise VocabularyError(
            f"Word length bounds must satisfy 1 <= min_len <= max_len; got "
            f"min_len={min_len}, max_len={max_len}."
        )
    if dedupe not in ("stem", "none"):
        raise VocabularyError(f"dedupe must be 'stem' or 'none'; got {dedupe!r}.")


def _filter_text(min_len: int, max_len: int, alphabetic: bool, drop_stopwords: bool) -> str:
    parts = [f"length {min_len}..{max_len}"]
    if alphabetic:
        parts.insert(0, "alphabetic")
    if drop_stopwords:
        parts.append("English stop words removed")
    return ", ".join(parts)


def _make_filter(
    min_len: int, max_len: int, alphabetic: bool, drop_stopwords: bool
) -> Callable[[str], bool]:
    def keep(word: str) -> bool:
        if not word or any(c.isspace() for c in word):
            return False
        if alphabetic and not word.isalpha():
            return False
        if not min_len <= len(word) <= max_len:
            return False
        return not (drop_stopwords and word.lower() in ENGLISH_STOPWORDS)

    return keep


def _select(
    ranked: list[tuple[str, float]],
    n: int | None,
    dedupe: Dedupe,
    source: str,
    filters: str,
    what: str,
) -> Vocabulary:
    """Keep the first ``n`` groups of ``ranked`` (already filtered, most frequent first).

    With ``dedupe="stem"`` words with the same :func:`base_form` form one group whose
    kept form is its most frequent member; every other pool member is recorded in
    ``merges`` (including forms ranked after the n-th kept word).
    """
    if not ranked:
        raise VocabularyError(
            f"The vocabulary is empty after filtering {what} ({filters}). Loosen the filters "
            "(length bounds, alphabetic, stop words) or give more words."
        )
    known: dict[str, float] = {}
    for w, f in ranked:
        known.setdefault(w.lower(), f)
    keys = [base_form(w, known) if dedupe == "stem" else w for w, _ in ranked]
    kept_by_key: dict[str, int] = {}
    words: list[str] = []
    freqs: list[float] = []
    merges: dict[str, list[str]] = {}
    for (word, freq), key in zip(ranked, keys, strict=True):
        if key in kept_by_key:
            kept = words[kept_by_key[key]] if kept_by_key[key] >= 0 else None
            if kept is not None:
                merges.setdefault(kept, []).append(word)
            continue
        if n is not None and len(words) >= n:
            kept_by_key[key] = -1  # a group beyond the cut: its members are not kept
            continue
        kept_by_key[key] = len(words)
        words.append(word)
        freqs.append(freq)
    if n is not None and len(words) < n:
        raise VocabularyError(
            f"Only {len(words)} words are left after filtering {what} ({filters}"
            f"{', inflections merged' if dedupe == 'stem' else ''}); {n} were asked for. "
            "Ask for fewer words, loosen the filters, or give more text."
        )
    return Vocabulary(
        words=tuple(words),
        frequencies=tuple(freqs),
        source=source,
        merges={k: tuple(v) for k, v in merges.items()},
    )


def vocabulary_from_wordfreq(
    n: int = 5000,
    *,
    lang: str = "en",
    min_len: int = 2,
    max_len: int = 20,
    alphabetic: bool = True,
    drop_stopwords: bool = False,
    dedupe: Dedupe = "stem",
) -> Vocabulary:
    """The ``n`` most frequent words of ``lang`` from wordfreq, after filters and merges.

    Candidates are read from ``wordfreq.top_n_list(lang, 10 * n)`` (lower case) until
    ``n`` words are kept. Frequencies are wordfreq's unrounded frequencies (0..1, from
    ``wordfreq.get_frequency_dict``; ``word_frequency`` rounds them to 3 digits).
    The stop-word list is English whatever ``lang`` is.
    """
    _check_params(n, min_len, max_len, dedupe)
    try:
        import wordfreq
    except ImportError:
        from steerlex.core.errors import MissingPackageError

        raise MissingPackageError(
            "wordfreq", "pip install wordfreq", "A wordfreq vocabulary"
        ) from None
    version = metadata.version("wordfreq")
    try:
        candidates = wordfreq.top_n_list(lang, max(CANDIDATE_FACTOR * n, 1000))
    except (LookupError, ValueError):  # unknown language, or not a language tag at all
        known = ", ".join(sorted(wordfreq.available_languages()))
        raise VocabularyError(
            f"wordfreq=={version} has no word list for language '{lang}'. Known languages: {known}."
        ) from None
    freq_of = wordfreq.get_frequency_dict(lang)  # one lookup table, not one call per word
    keep = _make_filter(min_len, max_len, alphabetic, drop_stopwords)
    seen: set[str] = set()
    ranked: list[tuple[str, float]] = []
    for w in candidates:
        if w in seen or not keep(w):
            continue
        seen.add(w)
        ranked.append((w, float(freq_of.get(w, 0.0))))
    filters = _filter_text(min_len, max_len, alphabetic, drop_stopwords)
    source = (
        f"wordfreq=={version} {lang} top {n} ({filters}; "
        f"{'inflections merged' if dedupe == 'stem' else 'no merging'})"
    )
    return _select(
        ranked, n, dedupe, source, filters, f"the top {len(candidates)} wordfreq '{lang}' words"
    )


_WORD_RE = re.compile(r"[^\W\d_]+")


def vocabulary_from_corpus(
    texts: Iterable[str],
    n: int = 5000,
    *,
    min_count: int = 5,
    lowercase: bool = True,
    min_len: int = 2,
    max_len: int = 20,
    alphabetic: bool = True,
    drop_stopwords: bool = False,
    dedupe: Dedupe = "stem",
) -> Vocabulary:
    """The ``n`` most frequent words counted in ``texts`` (runs of letters).

    Words seen fewer than ``min_count`` times are dropped; frequencies are counts;
    ties are broken alphabetically so the result is deterministic.
    """
    _check_params(n, min_len, max_len, dedupe)
    if min_count < 1:
        raise VocabularyError(f"min_count must be >= 1; got {min_count}.")
    if isinstance(texts, str):
        raise VocabularyError("texts must be an iterable of strings, not one string.")
    counts: Counter[str] = Counter()
    n_texts = 0
    for text in texts:
        n_texts += 1
        counts.update(_WORD_RE.findall(text.lower() if lowercase else text))
    keep = _make_filter(min_len, max_len, alphabetic, drop_stopwords)
    ranked = sorted(
        ((w, float(c)) for w, c in counts.items() if c >= min_count and keep(w)),
        key=lambda wc: (-wc[1], wc[0]),
    )
    filters = _filter_text(min_len, max_len, alphabetic, drop_stopwords)
    filters += f", count >= {min_count}"
    source = (
        f"corpus of {n_texts} texts, {sum(counts.values())} word tokens, top {n} ({filters}; "
        f"{'inflections merged' if dedupe == 'stem' else 'no merging'})"
    )
    return _select(ranked, n, dedupe, source, filters, f"a corpus of {n_texts} texts")


def vocabulary_from_file(
    path: str | Path,
    n: int | None = None,
    *,
    min_frequency: float | None = None,
    min_len: int = 2,
    max_len: int = 20,
    alphabetic: bool = True,
    drop_stopwords: bool = False,
    dedupe: Dedupe = "stem",
) -> Vocabulary:
    """A vocabulary from a word list: one word per line, optionally ``word<TAB or space>freq``.

    Blank lines and lines starting with ``#`` are skipped. Either every word has a
    frequency (the list is sorted by it, descending, stable) or none has (file order
    is kept and frequencies are 0.0). ``n=None`` keeps every word that passes;
    ``min_frequency`` drops words below it (the paper used 5). Repeated words keep
    their first occurrence.
    """
    _check_params(n, min_len, max_len, dedupe)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VocabularyError(f"The word list '{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VocabularyError(
            f"Cannot read the word list '{path}' ({exc}); give a UTF-8 text file with one "
            "word per line."
        ) from None
    entries: list[tuple[str, float | None]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise VocabularyError(
                f"{path}:{lineno}: expected 'word' or 'word<TAB>frequency', got {raw!r}."
            )
        freq: float | None = None
        if len(parts) == 2:
            try:
                freq = float(parts[1])
            except ValueError:
                raise VocabularyError(
                    f"{path}:{lineno}: the frequency {parts[1]!r} is not a number."
                ) from None
            if not math.isfinite(freq) or freq < 0:
                raise VocabularyError(
                    f"{path}:{lineno}: the frequency must be a finite number >= 0; got {freq}."
                )
        entries.append((parts[0], freq))
    if not entries:
        raise VocabularyError(
            f"The word list '{path}' holds no words; write one word per line, optionally "
            "followed by a tab and its frequency."
        )
    with_freq = sum(f is not None for _, f in entries)
    if 0 < with_freq < len(entries):
        raise VocabularyError(
            f"The word list '{path}' gives a frequency for {with_freq} of {len(entries)} words; "
            "give one for every word or for none."
        )
    has_freq = with_freq > 0
    if min_frequency is not None and not has_freq:
        raise VocabularyError(
            f"min_frequency={min_frequency} was given but the word list '{path}' has no "
            "frequency column."
        )
    keep = _make_filter(min_len, max_len, alphabetic, drop_stopwords)
    seen: set[str] = set()
    ranked: list[tuple[str, float]] = []
    for word, f in entries:
        value = 0.0 if f is None else f
        if word in seen or not keep(word):
            continue
        if min_frequency is not None and value < min_frequency:
            continue
        seen.add(word)
        ranked.append((word, value))
    if has_freq:
        ranked.sort(key=lambda wf: -wf[1])
    filters = _filter_text(min_len, max_len, alphabetic, drop_stopwords)
    if min_frequency is not None:
        filters += f", frequency >= {min_frequency:g}"
    size = "all" if n is None else f"top {n}"
    source = (
        f"word list {path.resolve()} ({len(entries)} entries, "
        f"{'with frequencies' if has_freq else 'no frequencies, file order'}), {size} "
        f"({filters}; {'inflections merged' if dedupe == 'stem' else 'no merging'})"
    )
    return _select(ranked, n, dedupe, source, filters, f"the word list '{path}'")


# ---------------------------------------------------------------- word vectors


@dataclass(frozen=True)
class WordVectors:
    """One vector per encodable vocabulary word.

    ``vectors`` has shape ``[M, d]`` (float32, CPU), row ``i`` for ``words[i]``;
    ``n_tokens[i]`` is how many sub-tokens were averaged. ``dropped`` maps each
    word that could not be encoded to the reason. ``matrix`` names the weight used.
    """

    words: tuple[str, ...]
    vectors: torch.Tensor
    dropped: Mapping[str, str]
    matrix: Matrix
    n_tokens: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.words)


def _unpack(model_or_loaded: Any, tokenizer: Any) -> tuple[Any, Any]:
    if tokenizer is not None:
        return model_or_loaded, tokenizer
    if isinstance(model_or_loaded, tuple) and len(model_or_loaded) == 2:
        return model_or_loaded[0], model_or_loaded[1]
    if hasattr(model_or_loaded, "model") and hasattr(model_or_loaded, "tokenizer"):
        return model_or_loaded.model, model_or_loaded.tokenizer
    raise VocabularyError(
        "word_vectors needs a LoadedModel, a (model, tokenizer) pair, or a model and a "
        "tokenizer argument."
    )


def _weight(model: Any, matrix: str) -> torch.Tensor:
    if matrix == "lm_head":
        module = model.get_output_embeddings()
        if module is None:
            raise VocabularyError(
                f"{type(model).__name__} has no output embedding (lm_head); use "
                "matrix='embed_tokens'."
            )
    elif matrix == "embed_tokens":
        module = model.get_input_embeddings()
    else:
        raise VocabularyError(f"matrix must be 'lm_head' or 'embed_tokens'; got {matrix!r}.")
    return module.weight


def word_vectors(
    vocab: Vocabulary,
    model_or_loaded: Any,
    tokenizer: Any = None,
    *,
    matrix: Matrix = "lm_head",
    batch: int = 1024,
) -> WordVectors:
    """Mean unembedding (or input embedding) row of each word's sub-tokens: ``[M, d]``.

    Each word is encoded in its mid-sentence form ``" " + word`` with
    ``add_special_tokens=False``; the rows of ``model.get_output_embeddings().weight``
    (``matrix="lm_head"``, the default; correct for tied and untied models) or of the
    input embeddings (``matrix="embed_tokens"``) for its token ids are averaged in
    float32. Words with an empty tokenization or containing the tokenizer's unknown
    token are dropped and listed in ``WordVectors.dropped`` with the reason.

    ``model_or_loaded`` is a :class:`~steerlex.models.loading.LoadedModel`, a
    ``(model, tokenizer)`` pair, or a model with ``tokenizer`` given separately.
    """
    model, tok = _unpack(model_or_loaded, tokenizer)
    if len(vocab) == 0:
        raise VocabularyError("The vocabulary is empty; build one with at least one word.")
    if batch < 1:
        raise VocabularyError(f"batch must be >= 1; got {batch}.")
    weight = _weight(model, matrix)
    rows_total, dim = int(weight.shape[0]), int(weight.shape[1])
    unk = getattr(tok, "unk_token_id", None) if getattr(tok, "unk_token", None) else None
    kept: list[str] = []
    counts: list[int] = []
    dropped: dict[str, str] = {}
    chunks: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(vocab), batch):
            words = vocab.words[start : start + batch]
            encoded = tok([" " + w for w in words], add_special_tokens=False)["input_ids"]
            ids_flat: list[int] = []
            segs: list[int] = []
            for word, ids in zip(words, encoded, strict=True):
                if len(ids) == 0:
                    dropped[word] = "the tokenizer encodes it as no tokens"
                    continue
                n_unk = sum(i == unk for i in ids) if unk is not None else 0
                if n_unk:
                    dropped[word] = (
                        f"{n_unk} of its {len(ids)} tokens are the unknown token "
                        f"{tok.unk_token!r} (id {unk})"
                    )
                    continue
                bad = [i for i in ids if not 0 <= i < rows_total]
                if bad:
                    raise VocabularyError(
                        f"The tokenizer gives '{word}' token id {bad[0]}, outside the model's "
                        f"{matrix} matrix ({rows_total} rows): tokenizer and model do not match."
                    )
                segs.extend([len(counts)] * len(ids))
                ids_flat.extend(ids)
                counts.append(len(ids))
                kept.append(word)
            n_new = len(counts) - sum(c.shape[0] for c in chunks)
            if n_new == 0:
                continue
            offset = len(counts) - n_new
            index = torch.tensor(ids_flat, dtype=torch.long, device=weight.device)
            seg = torch.tensor(segs, dtype=torch.long, device=weight.device) - offset
            rows = weight.detach().index_select(0, index).to(torch.float32)
            sums = torch.zeros(n_new, dim, dtype=torch.float32, device=weight.device)
            sums.index_add_(0, seg, rows)
            denom = torch.tensor(counts[offset:], dtype=torch.float32, device=weight.device)
            chunks.append((sums / denom[:, None]).cpu())
    if not kept:
        example = next(iter(dropped.items()))
        raise VocabularyError(
            f"None of the {len(vocab)} vocabulary words can be encoded by the tokenizer "
            f"{type(tok).__name__} (e.g. '{example[0]}': {example[1]}). Use a vocabulary in "
            "the model's language/script, or a tokenizer that matches the model."
        )
    return WordVectors(
        words=tuple(kept),
        vectors=torch.cat(chunks, dim=0),
        dropped=dropped,
        matrix=matrix,
        n_tokens=tuple(counts),
    )
