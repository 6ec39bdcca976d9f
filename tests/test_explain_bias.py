"""Frequency-bias metrics and the linguistic-level classifier, on hand-checked cases."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from steerlex.core.errors import ExplainError
from steerlex.explain.bias import (
    compare_methods,
    feature_subsets,
    linguistic_levels,
    shared_affix,
    subset_metrics,
    summarise,
    superficial_share,
    word_category,
    word_list_metrics,
    word_lists,
)
from steerlex.explain.run import Explanation
from steerlex.explain.vocabulary import Vocabulary

# Frequency order; with n_frequent=3 and min_letters=4 the superficial words are
# the, and (short, and in the top 3) and water (top 3): 3 superficial, 7 other.
VOCAB = [
    "the",
    "and",
    "water",
    "house",
    "river",
    "mountain",
    "forest",
    "garden",
    "window",
    "yellow",
]
SMALL: dict[str, Any] = {"n_frequent": 3, "min_letters": 4}


# ---------------------------------------------------------------- Diversity, Lexical, Dominate


def test_metrics_by_hand() -> None:
    lists = {
        1: ["the", "house", "river", "ignored"],  # beyond top_n=3: not counted
        2: ["The ", "water", "forest"],  # "The " is "the"
        3: ["house", "xyzzy", "of"],  # two out-of-vocabulary words: other, superficial (short)
    }
    m = word_list_metrics(lists, VOCAB, top_n=3, dominate_share=0.5, **SMALL)
    # unique: the house river water forest xyzzy of = 7
    # superficial: the water of = 3 of 3 superficial vocabulary words
    # other: house river forest xyzzy = 4 of 7 other vocabulary words
    # in more than 0.5 * 3 = 1.5 lists: the (1, 2), house (1, 3)
    assert (m.n_unique, m.n_unique_superficial, m.n_unique_other) == (7, 3, 4)
    assert (m.vocab_superficial, m.vocab_other) == (3, 7)
    assert m.lexical == pytest.approx(3 / 3)
    assert m.diversity == pytest.approx(4 / 7)
    assert m.dominate == pytest.approx(2 / 7)
    assert m.n_dominant == 2
    assert m.n_out_of_vocabulary == 2
    assert m.lexical_in_vocabulary == pytest.approx(2 / 3)  # the, water
    assert m.diversity_in_vocabulary == pytest.approx(3 / 7)  # house, river, forest
    assert m.n_lists == 3 and m.top_n == 3
    assert json.loads(json.dumps(m.to_dict()))["diversity"] == pytest.approx(4 / 7)


def test_dominate_default_share_is_strict() -> None:
    # 20 lists, threshold 0.1 * 20 = 2: "the" in 3 lists is dominant, "house" in exactly 2 is not
    lists: dict[int, list[str]] = {i: [f"word{i}"] for i in range(20)}
    for i in (0, 1, 2):
        lists[i].append("the")
    for i in (3, 4):
        lists[i].append("house")
    m = word_list_metrics(lists, VOCAB, **SMALL)
    assert m.n_unique == 22
    assert m.n_dominant == 1
    assert m.dominate == pytest.approx(1 / 22)


def test_duplicates_within_a_list_count_once() -> None:
    m = word_list_metrics({0: ["house", "House", " house"]}, VOCAB, **SMALL)
    assert m.n_unique == 1 and m.diversity == pytest.approx(1 / 7)


def test_default_superficial_rule_uses_top_250() -> None:
    vocab = [f"word{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(300)]
    lists = {0: [vocab[0], vocab[249], vocab[250], vocab[299], "abc"]}
    m = word_list_metrics(lists, vocab)
    assert (m.vocab_superficial, m.vocab_other) == (250, 50)
    assert m.n_unique_superficial == 3  # two of the top 250, and "abc" (short)
    assert m.lexical == pytest.approx(3 / 250)
    assert m.diversity == pytest.approx(2 / 50)


def test_word_lists_from_explanations() -> None:
    ex = [Explanation(4, "mi", ("a", "b"), (1.0, 0.5)), Explanation(2, "mi", ("c",), (1.0,))]
    assert word_lists(ex) == {4: ("a", "b"), 2: ("c",)}
    with pytest.raises(ExplainError, match="two explanations"):
        word_lists([*ex, ex[0]])


# ---------------------------------------------------------------- subsets


def _lists(n: int, offset: int = 0) -> dict[int, list[str]]:
    return {f: [VOCAB[(f + offset) % 10], VOCAB[(2 * f + offset) % 10], "the"] for f in range(n)}


def test_subsets_are_seeded_and_order_free() -> None:
    ids = list(range(40))
    a = feature_subsets(ids, 10, draws=5, seed=3)
    assert a == feature_subsets(list(reversed(ids)), 10, draws=5, seed=3)
    assert a != feature_subsets(ids, 10, draws=5, seed=4)
    assert len(a) == 5 and all(len(s) == 10 == len(set(s)) for s in a)
    assert all(list(s) == sorted(s) and set(s) <= set(ids) for s in a)


def test_same_subsets_for_every_method() -> None:
    methods = {"mi": _lists(30), "logitlens": _lists(30, offset=3), "topact": _lists(35, 5)}
    cmp = compare_methods(methods, VOCAB, subset_size=8, draws=4, seed=1, **SMALL)
    assert cmp.features == tuple(range(30))  # ids every method explains
    subsets = {m: r.subsets for m, r in cmp.methods.items()}
    assert subsets["mi"] == subsets["logitlens"] == subsets["topact"]
    assert subsets["mi"] == feature_subsets(range(30), 8, draws=4, seed=1)
    json.dumps(cmp.to_dict(with_subsets=True))


def test_subset_metrics_match_per_subset_metrics() -> None:
    lists = _lists(25)
    r = subset_metrics(lists, VOCAB, subset_size=6, draws=3, seed=0, top_n=2, **SMALL)
    for subset, got in zip(r.subsets, r.per_draw, strict=True):
        assert got == word_list_metrics(lists, VOCAB, features=subset, top_n=2, **SMALL)
    div = [d.diversity for d in r.per_draw]
    assert r.summary["diversity"].mean == pytest.approx(sum(div) / 3)
    assert r.full == word_list_metrics(lists, VOCAB, top_n=2, **SMALL)
    assert r.to_dict()["subsets"] is None
    json.dumps(r.to_dict(with_subsets=True))


def test_summarise_t_interval() -> None:
    s = summarise([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert (s.mean, s.sd) == (pytest.approx(2.0), pytest.approx(1.0))
    assert s.ci_low == pytest.approx(2 - half) and s.ci_high == pytest.approx(2 + half)
    one = summarise([0.5])
    assert (one.mean, one.sd, one.ci_low, one.ci_high) == (0.5, 0.0, None, None)
    big = summarise([float(i % 2) for i in range(200)])  # df=199 uses the expansion
    assert big.ci_high is not None
    assert big.ci_high - big.mean == pytest.approx(1.972 * big.sd / math.sqrt(200), rel=1e-3)


# ---------------------------------------------------------------- superficial share


def test_superficial_share_by_hand() -> None:
    lists = {1: ["the", "house"], 2: ["the", "of", "2019", "river"]}
    s = superficial_share(lists, VOCAB, **SMALL)
    # listed (6): the house the of 2019 river; superficial: the, the, of ("2019" has 4 chars)
    assert (s.n_listed, s.n_superficial) == (6, 3)
    assert s.listed_share == pytest.approx(0.5)
    assert s.vocab_share == pytest.approx(0.3)
    assert s.ratio == pytest.approx(0.5 / 0.3)
    b = s.breakdown
    assert [b[c].listed for c in ("non_alphabetic", "function", "short", "frequent", "other")] == [
        1,
        3,
        0,
        0,
        2,
    ]
    assert [b[c].vocab for c in ("non_alphabetic", "function", "short", "frequent", "other")] == [
        0,
        2,
        0,
        1,
        7,
    ]
    assert b["non_alphabetic"].ratio is None
    assert b["function"].ratio == pytest.approx((3 / 6) / (2 / 10))
    json.dumps(s.to_dict())


def test_word_category() -> None:
    top = {"water", "time"}
    assert word_category("...", top) == "non_alphabetic"
    assert word_category("42", top) == "non_alphabetic"
    assert word_category("", top) == "non_alphabetic"
    assert word_category(" The", top) == "function"
    assert word_category("cat", top) == "short"
    assert word_category("Water", top) == "frequent"
    assert word_category("garden", top) == "other"


# ---------------------------------------------------------------- linguistic level


TOPIC = ["dog", "puppy", "kitten", "horse", "rabbit", "parrot", "hamster", "pony", "cat", "bird"]


class FakeEncoder:
    """Topic words share one direction; every other word gets its own random direction."""

    def __init__(self, dim: int = 32) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []
        self.topic = torch.zeros(dim)
        self.topic[0] = 1.0

    def _vector(self, word: str) -> Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
        v = torch.randn(self.dim, generator=g)
        if word in TOPIC:
            v = 3.0 * self.topic * v.norm() + 0.3 * v
        return v

    def encode(self, texts: Sequence[str]) -> Tensor:
        self.calls.append(list(texts))
        return torch.stack([self._vector(t) for t in texts]) if texts else torch.zeros(0, 32)


def _content_vocab(n: int = 80) -> Vocabulary:
    words = tuple(f"zork{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(n))
    return Vocabulary(
        words=words,
        frequencies=tuple(float(n - i) for i in range(n)),
        source="test",
    )


RANDOM = ["quartz", "velvet", "glacier", "tuba", "senate", "lemon", "crayon", "harbor"]


def test_level_rules_on_constructed_lists() -> None:
    lists = {
        0: ["the", "of", ",", "2", "ab", *RANDOM[:5]],  # 5/10 lexical: the boundary counts
        1: ["the", "of", ",", "2", *RANDOM[:6]],  # 4/10 lexical: not lexical
        2: ["running", "jumping", "swimming", "walking", "cycling", *RANDOM[:5]],
        3: ["unhappy", "unable", "unknown", "unfair", *RANDOM[:4]],
        4: ["walk", "walks", "walked", "walking", *RANDOM[:4]],
        5: TOPIC,
        6: RANDOM,
        7: ["the", "of", "and", "to", "in", *TOPIC[:5]],  # lexical wins over semantic
        8: [],
    }
    enc = FakeEncoder()
    r = linguistic_levels(lists, _content_vocab(), encoder=enc, progress=False, null_lists=200)
    by = {f.feature: f for f in r.features}
    assert by[0].level == "lexical" and by[0].lexical_share == pytest.approx(0.5)
    assert by[1].level != "lexical" and by[1].lexical_share == pytest.approx(0.4)
    assert (by[2].level, by[2].affix, by[2].morphological_share) == ("morphological", "-ing", 0.5)
    assert by[2].affix_words == ("running", "jumping", "swimming", "walking", "cycling")
    assert (by[3].level, by[3].affix) == ("morphological", "un-")
    assert (by[4].level, by[4].affix) == ("morphological", "base:walk")
    assert by[4].affix_words == ("walk", "walks", "walked", "walking")
    assert by[5].level == "semantic"
    assert by[5].coherence is not None and by[5].threshold is not None
    assert by[5].coherence > by[5].threshold
    assert by[6].level == "unclear"
    assert by[6].coherence is not None and by[6].threshold is not None
    assert by[6].coherence <= by[6].threshold
    assert by[7].level == "lexical"
    assert by[8].level == "unclear" and by[8].words == () and by[8].coherence is None
    assert r.counts == {"lexical": 2, "morphological": 3, "semantic": 1, "unclear": 3 - 1 + 1}
    assert sum(r.counts.values()) == 9
    assert r.shares["morphological"] == pytest.approx(3 / 9)
    # calibration: one threshold per content-list size, all from the seeded pool
    cal = r.calibration
    assert set(cal.thresholds) == {f.n_content for f in r.features if f.n_content >= 2}
    assert cal.pool_size == 80 and cal.null_lists == 200 and cal.quantile == 0.95
    assert all(cal.null_mean[k] < cal.thresholds[k] < 1.0 for k in cal.thresholds)
    assert len(enc.calls) == 1  # every word embedded in one pass
    json.dumps(r.to_dict())


def test_level_calibration_is_seeded() -> None:
    lists = {0: RANDOM, 1: TOPIC}
    a = linguistic_levels(lists, _content_vocab(), encoder=FakeEncoder(), progress=False)
    b = linguistic_levels(lists, _content_vocab(), encoder=FakeEncoder(), progress=False)
    c = linguistic_levels(lists, _content_vocab(), encoder=FakeEncoder(), progress=False, seed=9)
    assert a == b
    assert a.calibration.thresholds != c.calibration.thresholds


def test_lexical_only_lists_need_no_encoder() -> None:
    class Unusable:
        def encode(self, texts: Sequence[str]) -> Tensor:
            raise AssertionError("the encoder must not be called")

    r = linguistic_levels({0: ["the", "of", "."]}, _content_vocab(), encoder=Unusable())
    assert r.features[0].level == "lexical" and r.calibration.thresholds == {}


def test_top_n_and_normalisation() -> None:
    lists = {0: [" Dog", "dog", "DOG", *TOPIC[1:], "the", "of", "and", "a"]}
    r = linguistic_levels(lists, _content_vocab(), encoder=FakeEncoder(), top_n=12, progress=False)
    assert r.features[0].words == tuple(TOPIC)  # de-duplicated, cut at 12 entries
    assert r.features[0].level == "semantic"


def test_shared_affix_ties_and_none() -> None:
    assert shared_affix(["cat", "dog"]) == (None, ())
    # a stem of at least 3 letters must remain: "thing" is not "th" + "-ing"
    assert shared_affix(["thing", "bring", "sing"]) == (None, ())
    # equal coverage: the longest affix wins ("-ation" over "-tion" and "-ion")
    assert shared_affix(["creation", "relation", "dog"]) == ("-ation", ("creation", "relation"))
    # a base form wins a tie with an affix; "walk" has no stem left for "walk-"
    assert shared_affix(["walk", "walking"]) == ("base:walk", ("walk", "walking"))
    # "reader" leaves only "er" after "read-", so the three share "rea-"
    assert shared_affix(["reading", "reader", "readable"])[0] == "rea-"


def test_level_bad_inputs() -> None:
    vocab = _content_vocab()
    with pytest.raises(ExplainError, match="shape"):

        class Bad:
            def encode(self, texts: Sequence[str]) -> Tensor:
                return torch.zeros(1, 4)

        linguistic_levels({0: TOPIC}, vocab, encoder=Bad(), progress=False)
    with pytest.raises(ExplainError, match="quantile"):
        linguistic_levels({0: TOPIC}, vocab, encoder=FakeEncoder(), quantile=1.0)
    with pytest.raises(ExplainError, match="min_share"):
        linguistic_levels({0: TOPIC}, vocab, encoder=FakeEncoder(), min_share=0.0)
    with pytest.raises(ExplainError, match="content words"):
        linguistic_levels({0: TOPIC}, VOCAB, encoder=FakeEncoder(), progress=False)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: word_list_metrics({}, VOCAB), "No word lists"),
        (lambda: word_list_metrics({0: ["a"]}, []), "vocabulary is empty"),
        (lambda: word_list_metrics({0: ["a"]}, "the and"), "not one string"),
        (lambda: word_list_metrics({0: ["a"]}, VOCAB, top_n=0), "top_n"),
        (lambda: word_list_metrics({0: ["a"]}, VOCAB, features=[0, 7]), r"\[7\]"),
        (lambda: word_list_metrics({0: ["a"]}, VOCAB, features=[]), "features is empty"),
        (lambda: word_list_metrics({0: ["a"]}, VOCAB, features=[0, 0]), "more than once"),
        (lambda: word_list_metrics({0: "house"}, VOCAB), "one string"),
        (lambda: word_list_metrics({0: [], 1: []}, VOCAB, **SMALL), "empty"),
        (lambda: word_list_metrics([["a"]], VOCAB), "mapping"),  # type: ignore[arg-type]
        (lambda: word_list_metrics({0: ["a"]}, VOCAB, dominate_share=1.0), "dominate_share"),
        (lambda: word_list_metrics({0: ["a"]}, VOCAB), "superficial"),  # all 10 in top 250
        (lambda: subset_metrics(_lists(5), VOCAB, subset_size=6), "larger than the 5"),
        (lambda: subset_metrics(_lists(5), VOCAB, subset_size=0), "size"),
        (lambda: subset_metrics(_lists(5), VOCAB, subset_size=2, draws=0), "draws"),
        (lambda: compare_methods({}, VOCAB), "No methods"),
        (lambda: compare_methods({"a": {0: ["x"]}, "b": {1: ["x"]}}, VOCAB), "in common"),
        (
            lambda: compare_methods({"a": _lists(5), "b": _lists(3)}, VOCAB, features=[0, 4]),
            "method 'b'",
        ),
        (lambda: superficial_share({0: []}, VOCAB), "empty"),
        (lambda: linguistic_levels({}, VOCAB), "No word lists"),
        (lambda: linguistic_levels({0: ["a"]}, VOCAB, features=[3]), r"\[3\]"),
        (lambda: linguistic_levels({0: ["a"]}, VOCAB, top_n=0), "top_n"),
        (lambda: summarise([]), "at least one"),
    ],
)
def test_bad_inputs(call: object, message: str) -> None:
    with pytest.raises(ExplainError, match=message):
        call()  # type: ignore[operator]


# ---------------------------------------------------------------- with the real encoder


def test_levels_with_real_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEERLEX_CACHE", str(tmp_path / "cache"))
    from steerlex.explain.vocabulary import vocabulary_from_wordfreq

    vocab = vocabulary_from_wordfreq(2000)
    lists = {
        0: ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it"],
        1: ["dog", "cat", "puppy", "kitten", "pet", "animal", "horse", "bird", "fish", "rabbit"],
        2: ["money", "bank", "finance", "loan", "credit", "debt", "payment", "cash", "budget"],
        3: ["tax", "puppy", "quantum", "guitar", "lemon", "senate", "blue", "window", "river"],
    }
    r = linguistic_levels(lists, vocab, progress=False, pool_size=200, null_lists=400)
    assert [f.level for f in r.features] == ["lexical", "semantic", "semantic", "unclear"]
