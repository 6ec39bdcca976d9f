"""Frequency bias and linguistic level of word-list explanations (see docs/bias.md).

Word-list explanations (one ranked word list per SAE feature) can look varied while
mostly repeating the same frequent, short words. This module measures that, on plain
data: word lists keyed by feature id and a frequency-ordered vocabulary
(:class:`~steerlex.explain.vocabulary.Vocabulary` or a word list, most frequent first).

- :func:`word_list_metrics` — the word-list metrics of the released code of Wu et al.
  (arXiv 2502.15576): Diversity, Lexical and Dominate, with *superficial* words = the
  vocabulary's 250 most frequent words or words shorter than 4 letters;
- :func:`subset_metrics` / :func:`compare_methods` — the same metrics on equal-size
  seeded random subsets of features (mean and 95% interval over draws), because on the
  full set they saturate once (#features x n) far exceeds the vocabulary size;
- :func:`superficial_share` — the share of listed words (with multiplicity) that are
  superficial, against the share in the vocabulary, plus a finer breakdown;
- :func:`linguistic_levels` — an offline rule-based classifier of each word list into
  "lexical", "morphological", "semantic" or "unclear", with the evidence.

Words are compared after stripping surrounding whitespace and lower-casing, so
``" Dog"``, ``"Dog"`` and ``"dog"`` are one word. Every result is a dataclass with
``to_dict()`` for JSON.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from steerlex.core.errors import ExplainError
from steerlex.explain.vocabulary import ENGLISH_STOPWORDS, Vocabulary, base_form
from steerlex.text_embed import TextEncoder, load_sentence_encoder

#: How many of the vocabulary's most frequent words are superficial (released code).
N_FREQUENT = 250
#: Words shorter than this many characters are superficial (released code).
MIN_LETTERS = 4
#: Dominate counts words listed by more than this share of the lists (released code).
DOMINATE_SHARE = 0.1

LEVELS = ("lexical", "morphological", "semantic", "unclear")
CATEGORIES = ("non_alphabetic", "function", "short", "frequent", "other")
METRICS = ("diversity", "lexical", "dominate")

#: Two-letter affixes common enough to count although the rule asks for >= 3 letters.
SHORT_PREFIXES = frozenset({"un", "re"})
SHORT_SUFFIXES = frozenset({"ed", "er", "ly"})

WordLists = Mapping[int, Sequence[str]]
VocabularyLike = Vocabulary | Sequence[str]


class HasWords(Protocol):
    """An explanation: a feature id and its ranked words (e.g. ``Explanation``)."""

    @property
    def feature(self) -> int: ...

    @property
    def words(self) -> Sequence[str]: ...


# ---------------------------------------------------------------- input checks


def word_lists(explanations: Iterable[HasWords]) -> dict[int, tuple[str, ...]]:
    """``{feature: words}`` from explanations of one method; a repeated feature is an error."""
    out: dict[int, tuple[str, ...]] = {}
    for e in explanations:
        if e.feature in out:
            raise ExplainError(
                f"Feature {e.feature} has two explanations; pass the explanations of one "
                "method at a time."
            )
        out[int(e.feature)] = tuple(e.words)
    return out


def _key(word: str) -> str:
    return word.strip().lower()


def _vocab_keys(vocab: VocabularyLike) -> tuple[str, ...]:
    words = vocab.words if isinstance(vocab, Vocabulary) else vocab
    if isinstance(words, str):
        raise ExplainError("vocab must be a Vocabulary or a list of words, not one string.")
    keys = tuple(dict.fromkeys(_key(w) for w in words))
    if not keys:
        raise ExplainError("The vocabulary is empty; pass a frequency-ordered word list.")
    return keys


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ExplainError(f"{name} must be >= 1; got {value}.")


def _select(lists: WordLists, features: Sequence[int] | None, what: str = "") -> list[int]:
    """The feature ids to use, checked against ``lists``."""
    if not isinstance(lists, Mapping):
        raise ExplainError(
            f"Word lists{what} must be a mapping {{feature id: words}}; got "
            f"{type(lists).__name__} (use word_lists(explanations))."
        )
    if not lists:
        raise ExplainError(f"No word lists{what} were given.")
    ids = sorted(lists) if features is None else [int(f) for f in features]
    if not ids:
        raise ExplainError("features is empty; pass at least one feature id.")
    repeated = sorted(f for f, c in Counter(ids).items() if c > 1)
    if repeated:
        raise ExplainError(f"Feature ids {repeated[:5]} are listed more than once in features.")
    unknown = [f for f in ids if f not in lists]
    if unknown:
        raise ExplainError(
            f"Feature ids {unknown[:5]} have no word list{what} ({len(lists)} lists given)."
        )
    for f in ids:
        if isinstance(lists[f], str):
            raise ExplainError(f"The word list of feature {f} is one string; pass a list of words.")
    return ids


def _top_keys(words: Sequence[str], top_n: int) -> list[str]:
    return [_key(w) for w in list(words)[:top_n]]


# ---------------------------------------------------------------- superficial words


@dataclass(frozen=True)
class _Superficial:
    vocab: frozenset[str]
    frequent: frozenset[str]
    min_letters: int

    def __call__(self, key: str) -> bool:
        return len(key) < self.min_letters or key in self.frequent


def _superficial_rule(keys: tuple[str, ...], n_frequent: int, min_letters: int) -> _Superficial:
    _check_positive("n_frequent", n_frequent)
    _check_positive("min_letters", min_letters)
    return _Superficial(frozenset(keys), frozenset(keys[:n_frequent]), min_letters)


def word_category(word: str, frequent: Collection[str], *, min_letters: int = MIN_LETTERS) -> str:
    """The first of :data:`CATEGORIES` that ``word`` falls in.

    ``non_alphabetic`` (punctuation, digits, anything not purely letters, the empty
    string), ``function`` (an English stop word), ``short`` (fewer than ``min_letters``
    characters), ``frequent`` (in ``frequent``, e.g. the vocabulary's top 250), else
    ``other``.
    """
    key = _key(word)
    if not key.isalpha():
        return "non_alphabetic"
    if key in ENGLISH_STOPWORDS:
        return "function"
    if len(key) < min_letters:
        return "short"
    if key in frequent:
        return "frequent"
    return "other"


# ---------------------------------------------------------------- Diversity, Lexical, Dominate


@dataclass(frozen=True)
class WordListMetrics:
    """Diversity, Lexical and Dominate of one set of word lists (top ``top_n`` each).

    ``diversity`` = unique listed non-superficial words / non-superficial vocabulary
    words; ``lexical`` = unique listed superficial words / superficial vocabulary words;
    ``dominate`` = share of unique listed words found in more than ``dominate_share`` of
    the lists. Out-of-vocabulary words count in the numerators (so both ratios may
    exceed 1); ``diversity_in_vocabulary`` and ``lexical_in_vocabulary`` count
    vocabulary words only.
    """

    n_lists: int
    top_n: int
    diversity: float
    lexical: float
    dominate: float
    diversity_in_vocabulary: float
    lexical_in_vocabulary: float
    n_unique: int
    n_unique_superficial: int
    n_unique_other: int
    n_out_of_vocabulary: int
    n_dominant: int
    vocab_superficial: int
    vocab_other: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metrics(
    keyed: Sequence[Sequence[str]], rule: _Superficial, top_n: int, dominate_share: float
) -> WordListMetrics:
    vocab_sup = sum(1 for w in rule.vocab if rule(w))
    vocab_other = len(rule.vocab) - vocab_sup
    if vocab_sup == 0 or vocab_other == 0:
        raise ExplainError(
            f"The vocabulary ({len(rule.vocab)} words) has {vocab_sup} superficial and "
            f"{vocab_other} other words; both are needed. Use a larger vocabulary or change "
            "n_frequent / min_letters."
        )
    listed_in: Counter[str] = Counter()
    for words in keyed:
        listed_in.update(set(words))
    if not listed_in:
        raise ExplainError(f"All {len(keyed)} word lists are empty; there is nothing to measure.")
    unique = set(listed_in)
    sup = {w for w in unique if rule(w)}
    other = unique - sup
    dominant = [w for w, c in listed_in.items() if c > dominate_share * len(keyed)]
    return WordListMetrics(
        n_lists=len(keyed),
        top_n=top_n,
        diversity=len(other) / vocab_other,
        lexical=len(sup) / vocab_sup,
        dominate=len(dominant) / len(unique),
        diversity_in_vocabulary=len(other & rule.vocab) / vocab_other,
        lexical_in_vocabulary=len(sup & rule.vocab) / vocab_sup,
        n_unique=len(unique),
        n_unique_superficial=len(sup),
        n_unique_other=len(other),
        n_out_of_vocabulary=len(unique - rule.vocab),
        n_dominant=len(dominant),
        vocab_superficial=vocab_sup,
        vocab_other=vocab_other,
    )


def _check_share(dominate_share: float) -> None:
    if not 0.0 <= dominate_share < 1.0:
        raise ExplainError(f"dominate_share must be in [0, 1); got {dominate_share}.")


def word_list_metrics(
    lists: WordLists,
    vocab: VocabularyLike,
    *,
    features: Sequence[int] | None = None,
    top_n: int = 50,
    n_frequent: int = N_FREQUENT,
    min_letters: int = MIN_LETTERS,
    dominate_share: float = DOMINATE_SHARE,
) -> WordListMetrics:
    """Diversity, Lexical and Dominate of the top ``top_n`` words of each list in ``features``.

    ``features`` defaults to every list. On many features these saturate; compare
    methods with :func:`subset_metrics` / :func:`compare_methods` instead.
    """
    _check_positive("top_n", top_n)
    _check_share(dominate_share)
    ids = _select(lists, features)
    rule = _superficial_rule(_vocab_keys(vocab), n_frequent, min_letters)
    return _metrics([_top_keys(lists[f], top_n) for f in ids], rule, top_n, dominate_share)


@dataclass(frozen=True)
class MetricSummary:
    """Mean, standard deviation and 95% t-interval of the mean of a metric over draws.

    With one draw the interval is ``None``.
    """

    mean: float
    sd: float
    ci_low: float | None
    ci_high: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def _t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion; matches the table at df = 30 to 1e-3
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def summarise(values: Sequence[float]) -> MetricSummary:
    """:class:`MetricSummary` of ``values`` (at least one)."""
    n = len(values)
    if n == 0:
        raise ExplainError("summarise needs at least one value.")
    mean = sum(values) / n
    if n == 1:
        return MetricSummary(mean, 0.0, None, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t975(n - 1) * sd / math.sqrt(n)
    return MetricSummary(mean, sd, mean - half, mean + half)


def feature_subsets(
    features: Sequence[int], size: int, *, draws: int = 20, seed: int = 0
) -> tuple[tuple[int, ...], ...]:
    """``draws`` seeded random subsets of ``size`` distinct feature ids (each sorted).

    The draws depend only on the *set* of ``features``, ``size``, ``draws`` and ``seed``
    (ids are sorted first), so every method given the same ids gets the same subsets.
    """
    _check_positive("size", size)
    _check_positive("draws", draws)
    ids = sorted(int(f) for f in features)
    if len(set(ids)) != len(ids):
        raise ExplainError("features lists a feature id more than once.")
    if size > len(ids):
        raise ExplainError(
            f"The subset size {size} is larger than the {len(ids)} features given; pass a "
            f"subset size of at most {len(ids)} or more features."
        )
    rng = random.Random(seed)
    return tuple(tuple(sorted(rng.sample(ids, size))) for _ in range(draws))


@dataclass(frozen=True)
class SubsetMetrics:
    """Word-list metrics on each seeded subset, their summary, and the full-set values."""

    n_features: int
    subset_size: int
    draws: int
    seed: int
    top_n: int
    summary: dict[str, MetricSummary]
    per_draw: tuple[WordListMetrics, ...]
    subsets: tuple[tuple[int, ...], ...]
    full: WordListMetrics

    def to_dict(self, with_subsets: bool = False) -> dict[str, Any]:
        """JSON-ready; the subsets' feature ids only with ``with_subsets``."""
        out = asdict(self)
        out["subsets"] = [list(s) for s in self.subsets] if with_subsets else None
        return out


def subset_metrics(
    lists: WordLists,
    vocab: VocabularyLike,
    *,
    features: Sequence[int] | None = None,
    subset_size: int = 100,
    draws: int = 20,
    seed: int = 0,
    top_n: int = 50,
    n_frequent: int = N_FREQUENT,
    min_letters: int = MIN_LETTERS,
    dominate_share: float = DOMINATE_SHARE,
) -> SubsetMetrics:
    """Diversity / Lexical / Dominate on ``draws`` random subsets of ``subset_size`` features.

    Subsets come from :func:`feature_subsets` over ``features`` (default: every list),
    so two methods compared on the same feature ids and seed see the same subsets. The
    summary holds the mean over draws and a 95% t-interval of that mean; ``full`` is
    the (saturating) value on all ``features``.
    """
    _check_positive("top_n", top_n)
    _check_share(dominate_share)
    ids = _select(lists, features)
    rule = _superficial_rule(_vocab_keys(vocab), n_frequent, min_letters)
    subsets = feature_subsets(ids, subset_size, draws=draws, seed=seed)
    keyed = {f: _top_keys(lists[f], top_n) for f in ids}
    per_draw = tuple(_metrics([keyed[f] for f in s], rule, top_n, dominate_share) for s in subsets)
    summary = {m: summarise([float(getattr(d, m)) for d in per_draw]) for m in METRICS}
    return SubsetMetrics(
        n_features=len(ids),
        subset_size=subset_size,
        draws=draws,
        seed=seed,
        top_n=top_n,
        summary=summary,
        per_draw=per_draw,
        subsets=subsets,
        full=_metrics([keyed[f] for f in ids], rule, top_n, dominate_share),
    )


@dataclass(frozen=True)
class MethodComparison:
    """:class:`SubsetMetrics` per method, all computed on the same feature subsets."""

    features: tuple[int, ...]
    methods: dict[str, SubsetMetrics]

    def to_dict(self, with_subsets: bool = False) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "subsets": [list(s) for s in next(iter(self.methods.values())).subsets]
            if with_subsets
            else None,
            "methods": {m: r.to_dict() for m, r in self.methods.items()},
        }


def compare_methods(
    lists_by_method: Mapping[str, WordLists],
    vocab: VocabularyLike,
    *,
    features: Sequence[int] | None = None,
    subset_size: int = 100,
    draws: int = 20,
    seed: int = 0,
    top_n: int = 50,
    n_frequent: int = N_FREQUENT,
    min_letters: int = MIN_LETTERS,
    dominate_share: float = DOMINATE_SHARE,
) -> MethodComparison:
    """:func:`subset_metrics` of every method on the same subsets of the same features.

    ``features`` defaults to the ids every method explains; each method must have a
    list for every id in ``features``.
    """
    if not lists_by_method:
        raise ExplainError("No methods were given; pass {method: {feature: words}}.")
    if features is None:
        common = set.intersection(*(set(v) for v in lists_by_method.values()))
        if not common:
            raise ExplainError("The methods explain no feature in common; pass features.")
        features = sorted(common)
    ids = tuple(sorted(int(f) for f in features))
    for method, lists in lists_by_method.items():
        _select(lists, ids, f" of method '{method}'")
    results = {}
    for method, lists in lists_by_method.items():
        results[method] = subset_metrics(
            lists,
            vocab,
            features=ids,
            subset_size=subset_size,
            draws=draws,
            seed=seed,
            top_n=top_n,
            n_frequent=n_frequent,
            min_letters=min_letters,
            dominate_share=dominate_share,
        )
    return MethodComparison(features=ids, methods=results)


# ---------------------------------------------------------------- superficial share


@dataclass(frozen=True)
class CategoryShare:
    """How many listed words (with multiplicity) and vocabulary words fall in a category."""

    listed: int
    listed_share: float
    vocab: int
    vocab_share: float
    ratio: float | None  # listed_share / vocab_share; None when the vocabulary has none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SuperficialShare:
    """Share of listed words that are superficial, against the vocabulary's share.

    ``ratio`` > 1 means the lists over-represent superficial words. ``breakdown`` splits
    listed and vocabulary words by :func:`word_category` (a finer partition; it does not
    add up to the superficial share: "2019" is non-alphabetic but not superficial).
    """

    n_lists: int
    top_n: int
    n_listed: int
    n_superficial: int
    listed_share: float
    vocab_share: float
    ratio: float
    breakdown: dict[str, CategoryShare]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def superficial_share(
    lists: WordLists,
    vocab: VocabularyLike,
    *,
    features: Sequence[int] | None = None,
    top_n: int = 50,
    n_frequent: int = N_FREQUENT,
    min_letters: int = MIN_LETTERS,
) -> SuperficialShare:
    """Superficial share of the top ``top_n`` words of each list, counted with multiplicity."""
    _check_positive("top_n", top_n)
    ids = _select(lists, features)
    keys = _vocab_keys(vocab)
    rule = _superficial_rule(keys, n_frequent, min_letters)
    listed = [w for f in ids for w in _top_keys(lists[f], top_n)]
    if not listed:
        raise ExplainError(f"All {len(ids)} word lists are empty; there is nothing to measure.")
    n_sup = sum(1 for w in listed if rule(w))
    vocab_share = sum(1 for w in keys if rule(w)) / len(keys)
    if vocab_share == 0.0:
        raise ExplainError(
            "The vocabulary has no superficial word; use a larger vocabulary or change "
            "n_frequent / min_letters."
        )
    by_listed = Counter(word_category(w, rule.frequent, min_letters=min_letters) for w in listed)
    by_vocab = Counter(word_category(w, rule.frequent, min_letters=min_letters) for w in keys)
    breakdown = {}
    for c in CATEGORIES:
        ls, vs = by_listed[c] / len(listed), by_vocab[c] / len(keys)
        breakdown[c] = CategoryShare(by_listed[c], ls, by_vocab[c], vs, ls / vs if vs else None)
    listed_share = n_sup / len(listed)
    return SuperficialShare(
        n_lists=len(ids),
        top_n=top_n,
        n_listed=len(listed),
        n_superficial=n_sup,
        listed_share=listed_share,
        vocab_share=vocab_share,
        ratio=listed_share / vocab_share,
        breakdown=breakdown,
    )


# ---------------------------------------------------------------- linguistic level


def is_content_word(word: str) -> bool:
    """Alphabetic, at least 3 letters, not a stop word (the complement of the lexical rule)."""
    key = _key(word)
    return key.isalpha() and len(key) >= 3 and key not in ENGLISH_STOPWORDS


def shared_affix(
    words: Sequence[str], known: Collection[str] | Mapping[str, float] = (), *, min_stem: int = 3
) -> tuple[str | None, tuple[str, ...]]:
    """The affix (or base form) shared by the most ``words``, and those words.

    Candidates: every prefix (``"un-"``) and suffix (``"-ing"``) of at least 3 letters,
    plus the two-letter :data:`SHORT_PREFIXES` / :data:`SHORT_SUFFIXES`, that leaves a
    stem of at least ``min_stem`` letters; and the base form of each word
    (:func:`~steerlex.explain.vocabulary.base_form` against ``known`` and ``words``),
    written ``"base:run"``. Ties go to base forms, then longer affixes, then
    alphabetical order. Returns ``(None, ())`` when no candidate covers two words.
    """
    keys = [k for k in dict.fromkeys(_key(w) for w in words) if k.isalpha()]
    groups: dict[str, set[str]] = defaultdict(set)
    for w in keys:
        for n in range(2, len(w) - min_stem + 1):
            pre, suf = w[:n], w[-n:]
            if n >= 3 or pre in SHORT_PREFIXES:
                groups[pre + "-"].add(w)
            if n >= 3 or suf in SHORT_SUFFIXES:
                groups["-" + suf].add(w)
    pool: dict[str, float] = {}
    if isinstance(known, Mapping):
        pool.update({_key(k): float(v) for k, v in known.items()})
    else:
        pool.update({_key(k): 0.0 for k in known})
    for w in keys:
        pool.setdefault(w, 0.0)
    for w in keys:
        groups["base:" + base_form(w, pool)].add(w)
    # max keeps the first of equal keys: iterate alphabetically so ties are reproducible
    best = max(
        sorted(groups.items()),
        key=lambda kv: (len(kv[1]), kv[0].startswith("base:"), len(kv[0])),
        default=None,
    )
    if best is None or len(best[1]) < 2:
        return None, ()
    return best[0], tuple(w for w in keys if w in best[1])


@dataclass(frozen=True)
class FeatureLevel:
    """The linguistic level of one feature's word list, with the evidence.

    ``words`` are the classified words (top ``top_n``, normalised, de-duplicated);
    ``lexical_share`` the share that are function words, non-alphabetic or 1-2 letters;
    ``morphological_share`` the share covered by ``affix``; ``coherence`` the mean
    pairwise cosine similarity of the content words' embeddings (``None`` with fewer
    than two) and ``threshold`` the calibrated value it must exceed for "semantic".
    """

    feature: int
    level: str
    words: tuple[str, ...]
    lexical_share: float
    morphological_share: float
    affix: str | None
    affix_words: tuple[str, ...]
    n_content: int
    coherence: float | None
    threshold: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LevelCalibration:
    """Null distribution of coherence: random lists of ``k`` vocabulary content words.

    ``thresholds[k]`` is the ``quantile`` of the mean pairwise cosine of ``null_lists``
    random lists of ``k`` words drawn (seeded) from a pool of ``pool_size`` content words
    of the vocabulary; ``null_mean[k]`` is their mean.
    """

    quantile: float
    null_lists: int
    pool_size: int
    seed: int
    thresholds: dict[int, float]
    null_mean: dict[int, float]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["thresholds"] = {str(k): v for k, v in self.thresholds.items()}
        out["null_mean"] = {str(k): v for k, v in self.null_mean.items()}
        return out


@dataclass(frozen=True)
class LevelReport:
    """Per-feature levels, their distribution (counts and shares) and the calibration."""

    top_n: int
    min_share: float
    counts: dict[str, int]
    shares: dict[str, float]
    calibration: LevelCalibration
    features: tuple[FeatureLevel, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "top_n": self.top_n,
            "min_share": self.min_share,
            "counts": dict(self.counts),
            "shares": dict(self.shares),
            "calibration": self.calibration.to_dict(),
            "features": [f.to_dict() for f in self.features],
        }


def _embed(encoder: TextEncoder, words: Sequence[str], progress: bool) -> dict[str, Tensor]:
    chunk = 512
    rows: list[Tensor] = []
    for start in tqdm(
        range(0, len(words), chunk), desc="embedding words", unit="chunk", disable=not progress
    ):
        batch = list(words[start : start + chunk])
        out = torch.as_tensor(encoder.encode(batch)).detach().to("cpu", torch.float32)
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise ExplainError(
                f"The encoder returned shape {tuple(out.shape)} for {len(batch)} texts; "
                "it must return one row per text."
            )
        rows.append(torch.nn.functional.normalize(out, dim=1))
    if not rows:
        return {}
    return dict(zip(words, torch.cat(rows).unbind(0), strict=True))


def _coherence(vectors: Tensor) -> Tensor:
    """Mean pairwise cosine of unit rows: ``[..., k, d] -> [...]`` (k >= 2)."""
    k = vectors.shape[-2]
    gram = vectors @ vectors.transpose(-1, -2)
    return (gram.sum(dim=(-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (k * (k - 1))


def _known_frequencies(vocab: VocabularyLike, vocab_keys: Sequence[str]) -> dict[str, float]:
    """Frequency of each normalised vocabulary word, for :func:`shared_affix`'s base forms.

    A :class:`~steerlex.explain.vocabulary.Vocabulary` with one frequency per word gives
    its frequencies (the first of words equal after normalising); otherwise the rank
    stands in for frequency (``len(vocab_keys) - i`` for the ``i``-th word).
    """
    if isinstance(vocab, Vocabulary) and len(vocab.frequencies) == len(vocab.words):
        known: dict[str, float] = {}
        for w, f in zip(vocab.words, vocab.frequencies, strict=True):
            known.setdefault(_key(w), float(f))
        return known
    # a plain list: rank stands in for frequency
    return {w: float(len(vocab_keys) - i) for i, w in enumerate(vocab_keys)}


@dataclass(frozen=True)
class _Calibrated:
    """What :func:`_calibrate` returns: the null thresholds and the word embeddings.

    ``thresholds[k]`` / ``null_mean[k]``: the quantile and the mean of the null coherence
    of ``k`` random content words; ``pool``: the sorted calibration pool; ``vectors``:
    unit embedding ``[d]`` of every pool word and every content word of the lists.
    """

    thresholds: dict[int, float]
    null_mean: dict[int, float]
    pool: list[str]
    vectors: dict[str, Tensor]


def _calibrate(
    content_of: Mapping[int, Sequence[str]],
    vocab_keys: Sequence[str],
    encoder: TextEncoder | None,
    *,
    quantile: float,
    null_lists: int,
    pool_size: int,
    seed: int,
    progress: bool,
) -> _Calibrated:
    """Embed the content words and draw the null coherence for each list size in use.

    A list size ``k`` is in use when some list of ``content_of`` has ``k >= 2`` content
    words; with none, nothing is embedded (and ``encoder`` is not loaded). The pool is
    ``pool_size`` content words of the vocabulary drawn with ``seed``; the ``null_lists``
    random lists of size ``k`` are drawn from it with the seed ``f"{seed}/{k}"``.

    Raises:
        ExplainError: the vocabulary has fewer content words than the largest size in use;
            the encoder returns the wrong shape.
    """
    sizes = sorted({len(c) for c in content_of.values() if len(c) >= 2})
    thresholds: dict[int, float] = {}
    null_mean: dict[int, float] = {}
    if not sizes:
        return _Calibrated(thresholds, null_mean, [], {})
    candidates = [w for w in vocab_keys if is_content_word(w)]
    if len(candidates) < max(sizes):
        raise ExplainError(
            f"The vocabulary has {len(candidates)} content words, fewer than the "
            f"{max(sizes)} needed to draw random lists for calibration; use a larger "
            "vocabulary."
        )
    pool = sorted(random.Random(seed).sample(candidates, min(pool_size, len(candidates))))
    if encoder is None:
        encoder = load_sentence_encoder()
    needed = sorted(set(pool).union(*content_of.values()))
    vectors = _embed(encoder, needed, progress)
    pool_vectors = torch.stack([vectors[w] for w in pool])
    for k in sizes:
        rng = random.Random(f"{seed}/{k}")
        index = torch.tensor([rng.sample(range(len(pool)), k) for _ in range(null_lists)])
        null = _coherence(pool_vectors[index]).double()
        thresholds[k] = float(torch.quantile(null, quantile))
        null_mean[k] = float(null.mean())
    return _Calibrated(thresholds, null_mean, pool, vectors)


def _feature_level(
    feature: int,
    words: list[str],
    content: list[str],
    known: Mapping[str, float],
    calibrated: _Calibrated,
    min_share: float,
) -> FeatureLevel:
    """The level of one feature's list (``words``: its normalised top words, ``content``:
    their content words), by the rules of :func:`linguistic_levels`, first match wins."""
    n = len(words)
    lexical_share = (n - len(content)) / n if n else 0.0
    affix, affix_words = shared_affix(words, known)
    morph_share = len(affix_words) / n if n else 0.0
    coherence = threshold = None
    if len(content) >= 2:
        coherence = float(_coherence(torch.stack([calibrated.vectors[w] for w in content])))
        threshold = calibrated.thresholds[len(content)]
    if n and lexical_share >= min_share:
        level = "lexical"
    elif len(affix_words) >= 2 and morph_share >= min_share:
        level = "morphological"
    elif coherence is not None and threshold is not None and coherence > threshold:
        level = "semantic"
    else:
        level = "unclear"
    return FeatureLevel(
        feature=feature,
        level=level,
        words=tuple(words),
        lexical_share=lexical_share,
        morphological_share=morph_share,
        affix=affix,
        affix_words=affix_words,
        n_content=len(content),
        coherence=coherence,
        threshold=threshold,
    )


def linguistic_levels(
    lists: WordLists,
    vocab: VocabularyLike,
    *,
    encoder: TextEncoder | None = None,
    features: Sequence[int] | None = None,
    top_n: int = 10,
    min_share: float = 0.5,
    quantile: float = 0.95,
    null_lists: int = 1000,
    pool_size: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> LevelReport:
    """Classify each list's top ``top_n`` words as lexical, morphological, semantic or unclear.

    Rules, first match wins (docs/bias.md):

    1. **lexical** — at least ``min_share`` of the words are function words, punctuation,
       digits or fragments (not purely letters, or 1-2 letters);
    2. **morphological** — at least ``min_share`` of them (and two or more) share an affix
       or base form (:func:`shared_affix`);
    3. **semantic** — the mean pairwise cosine similarity of the content words'
       ``encoder`` embeddings exceeds the ``quantile`` of the same statistic over
       ``null_lists`` random lists of as many content words drawn (seeded) from a pool of
       ``pool_size`` vocabulary content words;
    4. **unclear** — otherwise (also for an empty list).

    ``encoder`` defaults to the packaged :class:`~steerlex.text_embed.SentenceEncoder`.
    """
    _check_positive("top_n", top_n)
    _check_positive("null_lists", null_lists)
    _check_positive("pool_size", pool_size)
    if not 0.0 < min_share <= 1.0:
        raise ExplainError(f"min_share must be in (0, 1]; got {min_share}.")
    if not 0.0 < quantile < 1.0:
        raise ExplainError(f"quantile must be in (0, 1); got {quantile}.")
    ids = _select(lists, features)
    vocab_keys = _vocab_keys(vocab)
    known = _known_frequencies(vocab, vocab_keys)
    words_of = {f: list(dict.fromkeys(_top_keys(lists[f], top_n))) for f in ids}
    content_of = {f: [w for w in ws if is_content_word(w)] for f, ws in words_of.items()}
    calibrated = _calibrate(
        content_of,
        vocab_keys,
        encoder,
        quantile=quantile,
        null_lists=null_lists,
        pool_size=pool_size,
        seed=seed,
        progress=progress,
    )
    results = [
        _feature_level(f, words_of[f], content_of[f], known, calibrated, min_share) for f in ids
    ]
    counts = {lv: sum(1 for r in results if r.level == lv) for lv in LEVELS}
    return LevelReport(
        top_n=top_n,
        min_share=min_share,
        counts=counts,
        shares={lv: c / len(results) for lv, c in counts.items()},
        calibration=LevelCalibration(
            quantile=quantile,
            null_lists=null_lists,
            pool_size=len(calibrated.pool),
            seed=seed,
            thresholds=calibrated.thresholds,
            null_mean=calibrated.null_mean,
        ),
        features=tuple(results),
    )


__all__ = [
    "CATEGORIES",
    "LEVELS",
    "METRICS",
    "CategoryShare",
    "FeatureLevel",
    "LevelCalibration",
    "LevelReport",
    "MethodComparison",
    "MetricSummary",
    "SubsetMetrics",
    "SuperficialShare",
    "WordListMetrics",
    "compare_methods",
    "feature_subsets",
    "is_content_word",
    "linguistic_levels",
    "shared_affix",
    "subset_metrics",
    "summarise",
    "superficial_share",
    "word_category",
    "word_list_metrics",
    "word_lists",
]
