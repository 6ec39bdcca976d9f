"""Tests for steerlex.explain.vocabulary: builders, filters, stemmer, storage, word vectors."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch

from steerlex.core.errors import SteerlexError, VocabularyError
from steerlex.explain.vocabulary import (
    ENGLISH_STOPWORDS,
    Vocabulary,
    base_form,
    vocabulary_from_corpus,
    vocabulary_from_file,
    vocabulary_from_wordfreq,
    word_vectors,
)
from steerlex.models.loading import LoadedModel

# ---------------------------------------------------------------- wordfreq


def test_wordfreq_vocabulary_basic() -> None:
    v = vocabulary_from_wordfreq(200)
    assert len(v) == 200 == len(v.frequencies)
    assert len(set(v.words)) == 200
    assert all(w.isalpha() and 2 <= len(w) <= 20 for w in v.words)
    assert all(0 < f <= 1 for f in v.frequencies)
    assert list(v.frequencies) == sorted(v.frequencies, reverse=True)
    assert f"wordfreq=={metadata.version('wordfreq')}" in v.source and "en top 200" in v.source
    # merged forms never appear as kept words
    merged = {m for ms in v.merges.values() for m in ms}
    assert not merged & set(v.words)
    assert set(v.merges) <= set(v.words)


def test_wordfreq_filters_and_dedupe_none() -> None:
    v = vocabulary_from_wordfreq(300, min_len=4, max_len=6, drop_stopwords=True, dedupe="none")
    assert len(v) == 300 and v.merges == {}
    assert all(4 <= len(w) <= 6 for w in v.words)
    assert not set(v.words) & ENGLISH_STOPWORDS
    assert "English stop words removed" in v.source and "no merging" in v.source
    stemmed = vocabulary_from_wordfreq(300, min_len=4, max_len=6, drop_stopwords=True)
    # merging pulls in later-ranked words
    assert stemmed.words != v.words and stemmed.merges


def test_wordfreq_dedupe_merges_inflections() -> None:
    v = vocabulary_from_wordfreq(3000)
    words = set(v.words)
    for kept, form in [("use", "used"), ("run", "running"), ("day", "days")]:
        assert kept in words and form not in words
        assert form in v.merges[kept]
    # "news" is not a form of "new"
    assert "news" in words and "new" in words
    assert "news" not in v.merges.get("new", ())


@pytest.mark.parametrize("lang", ["xx", "klingon"])
def test_wordfreq_unknown_language(lang: str) -> None:
    with pytest.raises(VocabularyError, match=f"no word list for language '{lang}'"):
        vocabulary_from_wordfreq(10, lang=lang)


def test_wordfreq_other_language() -> None:
    v = vocabulary_from_wordfreq(50, lang="fr", dedupe="none")
    assert len(v) == 50 and "fr top 50" in v.source


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_n(n: object) -> None:
    with pytest.raises(VocabularyError, match="n must be an integer >= 1"):
        vocabulary_from_wordfreq(n)  # type: ignore[arg-type]


def test_bad_length_bounds_and_dedupe() -> None:
    with pytest.raises(VocabularyError, match="min_len <= max_len"):
        vocabulary_from_wordfreq(10, min_len=5, max_len=3)
    with pytest.raises(VocabularyError, match="dedupe"):
        vocabulary_from_wordfreq(10, dedupe="lemma")  # type: ignore[arg-type]


def test_wordfreq_too_few_words() -> None:
    with pytest.raises(VocabularyError, match=r"Only \d+ words are left"):
        vocabulary_from_wordfreq(200_000, min_len=19, max_len=20)


def test_errors_are_steerlex_errors() -> None:
    assert issubclass(VocabularyError, SteerlexError)


# ---------------------------------------------------------------- stemmer

KNOWN = {
    "cat", "cats", "run", "running", "runs", "study", "studies", "studied", "happy",
    "happily", "happier", "happiest", "new", "news", "make", "making", "made", "hope",
    "hoping", "hop", "hopping", "note", "noted", "not", "wait", "waited", "waite", "box",
    "boxes", "big", "bigger", "biggest", "let", "letter", "fall", "falling", "use", "us",
    "uses", "used", "even", "evening", "play", "played", "player", "quick", "quickly",
    "possible", "possibly", "fee", "feed", "save", "saving", "savings", "toe", "toes", "to",
    "change", "chang", "changed",
}  # fmt: skip


@pytest.mark.parametrize(
    ("word", "base"),
    [
        ("cats", "cat"),
        ("running", "run"),
        ("runs", "run"),
        ("studies", "study"),
        ("studied", "study"),
        ("happily", "happy"),
        ("happier", "happy"),
        ("happiest", "happy"),
        ("making", "make"),
        ("hoping", "hope"),  # silent e restored after consonant-vowel-consonant
        ("hopping", "hop"),  # doubled consonant undone
        ("noted", "note"),
        ("waited", "wait"),
        ("boxes", "box"),
        ("toes", "toe"),
        ("uses", "use"),
        ("used", "use"),
        ("bigger", "big"),
        ("biggest", "big"),
        ("falling", "fall"),
        ("played", "play"),
        ("quickly", "quick"),
        ("possibly", "possible"),
        ("savings", "save"),  # applied repeatedly
        # not merged
        ("news", "news"),
        ("evening", "evening"),
        ("letter", "letter"),  # no "lettest": not a comparative
        ("player", "player"),  # agent nouns are not inflections
        ("made", "made"),  # irregular forms are not merged
        ("feed", "feed"),
        ("cat", "cat"),
        ("Cats", "cat"),
    ],
)
def test_base_form(word: str, base: str) -> None:
    assert base_form(word, KNOWN) == base


def test_base_form_needs_known_base() -> None:
    assert base_form("zorbing", {"zorbing"}) == "zorbing"
    assert base_form("zorbing", {"zorbing", "zorb"}) == "zorb"


def test_base_form_frequency_tie_break() -> None:
    freqs = {"changed": 0.1, "change": 1.0, "chang": 0.01}
    assert base_form("changed", freqs) == "change"
    assert base_form("changed", {"changed": 0.1, "change": 0.01, "chang": 1.0}) == "chang"


# ---------------------------------------------------------------- corpus

CORPUS = [
    "The cats sat on the mat. The cat ran; cats run, and the dog is running!",
    "A dog runs. Dogs and cats. The 3 cats' bowls. Running dogs 42 x",
] * 3


def test_corpus_vocabulary() -> None:
    v = vocabulary_from_corpus(CORPUS, n=5, min_count=3)
    # ties are broken alphabetically; "dogs" (6) merges into "dog" (6)
    assert v.words == ("the", "cats", "and", "dog", "running")
    assert v.frequencies == (15.0, 12.0, 6.0, 6.0, 6.0)
    assert v.merges == {"cats": ("cat",), "dog": ("dogs",), "running": ("run", "runs")}
    assert "corpus of 6 texts" in v.source and "count >= 3" in v.source


def test_corpus_min_count_and_stopwords() -> None:
    v = vocabulary_from_corpus(CORPUS, n=2, min_count=6, drop_stopwords=True, dedupe="none")
    assert v.words == ("cats", "dog")
    with pytest.raises(VocabularyError, match="empty after filtering"):
        vocabulary_from_corpus(CORPUS, n=2, min_count=1000)
    with pytest.raises(VocabularyError, match="Only 3 words"):
        vocabulary_from_corpus(CORPUS, n=50, min_count=6, drop_stopwords=True)
    with pytest.raises(VocabularyError, match="min_count"):
        vocabulary_from_corpus(CORPUS, n=2, min_count=0)
    with pytest.raises(VocabularyError, match="not one string"):
        vocabulary_from_corpus("the cat", n=1)
    with pytest.raises(VocabularyError, match="empty after filtering"):
        vocabulary_from_corpus([], n=1)


# ---------------------------------------------------------------- file


def test_file_with_frequencies(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_text(
        "# my list\ncat\t5\ncats 9\n\ndog\t7\nx1 100\nrunning\t3\nrun\t4\ncat\t1\nbird 2\n",
        encoding="utf-8",
    )
    v = vocabulary_from_file(path)
    assert v.words == ("cats", "dog", "run", "bird")
    assert v.frequencies == (9.0, 7.0, 4.0, 2.0)
    assert v.merges == {"cats": ("cat",), "run": ("running",)}
    assert "with frequencies" in v.source and "all" in v.source
    top = vocabulary_from_file(path, 2, min_frequency=5, dedupe="none")
    assert top.words == ("cats", "dog")


def test_file_without_frequencies_keeps_order(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_text("zebra\napple\nmango\n", encoding="utf-8")
    v = vocabulary_from_file(path)
    assert v.words == ("zebra", "apple", "mango") and v.frequencies == (0.0, 0.0, 0.0)
    with pytest.raises(VocabularyError, match="no frequency column"):
        vocabulary_from_file(path, min_frequency=5)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "holds no words"),
        ("# only a comment\n\n", "holds no words"),
        ("cat 3\ndog\n", "for 1 of 2 words"),
        ("cat three\n", "not a number"),
        ("cat 3 4\n", "expected 'word'"),
        ("cat -1\n", ">= 0"),
        ("42\n!!\n", "empty after filtering"),
    ],
)
def test_file_bad_inputs(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "words.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(VocabularyError, match=match):
        vocabulary_from_file(path)


def test_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match="does not exist"):
        vocabulary_from_file(tmp_path / "missing.txt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80bad")
    with pytest.raises(VocabularyError, match="Cannot read the word list"):
        vocabulary_from_file(binary)
    with pytest.raises(VocabularyError, match="Cannot read the word list"):
        vocabulary_from_file(tmp_path)  # a directory


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path: Path) -> None:
    v = vocabulary_from_wordfreq(120)
    path = v.save(tmp_path / "sub" / "vocab.json")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    back = Vocabulary.load(path)
    assert back == v
    assert json.loads(path.read_text())["format"] == "steerlex-vocabulary"


def test_load_bad_files(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match="does not exist"):
        Vocabulary.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(VocabularyError, match="Cannot read"):
        Vocabulary.load(bad)
    bad.write_text(json.dumps({"words": []}))
    with pytest.raises(VocabularyError, match="not a steerlex vocabulary"):
        Vocabulary.load(bad)
    bad.write_text(json.dumps({"format": "steerlex-vocabulary", "version": 99}))
    with pytest.raises(VocabularyError, match="version 99"):
        Vocabulary.load(bad)
    bad.write_text(json.dumps({"format": "steerlex-vocabulary", "version": 1, "words": ["a"]}))
    with pytest.raises(VocabularyError, match="malformed"):
        Vocabulary.load(bad)
    data = Vocabulary(("a", "b"), (2.0, 1.0), "test").to_dict()
    data["frequencies"] = [1.0]
    bad.write_text(json.dumps(data))
    with pytest.raises(VocabularyError, match="one frequency per word"):
        Vocabulary.load(bad)


# ---------------------------------------------------------------- word vectors


def test_word_vectors_lm_head(tiny_loaded: LoadedModel) -> None:
    tok = tiny_loaded.tokenizer
    vocab = Vocabulary(("cat", "zebra", "dog", "qwerty", "story"), (5, 4, 3, 2, 1), "test")
    wv = word_vectors(vocab, tiny_loaded)
    assert wv.words == ("cat", "dog", "story")
    assert set(wv.dropped) == {"zebra", "qwerty"}
    assert "unknown token" in wv.dropped["zebra"]
    assert wv.matrix == "lm_head" and wv.n_tokens == (1, 1, 1)
    lm = tiny_loaded.model.get_output_embeddings().weight
    emb = tiny_loaded.model.get_input_embeddings().weight
    assert not torch.equal(lm, emb)  # untied
    ids = [tok.convert_tokens_to_ids(w) for w in wv.words]
    assert wv.vectors.shape == (3, lm.shape[1]) and wv.vectors.dtype == torch.float32
    assert torch.equal(wv.vectors, lm[ids].detach())
    # batching does not change the result
    assert torch.equal(word_vectors(vocab, tiny_loaded, batch=2).vectors, wv.vectors)
    # (model, tokenizer) pair and separate tokenizer argument
    assert torch.equal(word_vectors(vocab, (tiny_loaded.model, tok)).vectors, wv.vectors)
    assert torch.equal(word_vectors(vocab, tiny_loaded.model, tok).vectors, wv.vectors)


def test_word_vectors_embed_tokens(tiny_loaded: LoadedModel) -> None:
    vocab = Vocabulary(("tree", "house"), (2, 1), "test")
    wv = word_vectors(vocab, tiny_loaded, matrix="embed_tokens")
    emb = tiny_loaded.model.get_input_embeddings().weight
    ids = tiny_loaded.tokenizer.convert_tokens_to_ids(["tree", "house"])
    assert wv.matrix == "embed_tokens"
    assert torch.equal(wv.vectors, emb[ids].detach())


def test_word_vectors_mean_of_subtokens(tiny_loaded: LoadedModel) -> None:
    # the word-level tokenizer splits "cat dog" into two tokens: the vector is their mean
    vocab = Vocabulary(("cat dog",), (1,), "test")
    wv = word_vectors(vocab, tiny_loaded)
    lm = tiny_loaded.model.get_output_embeddings().weight.detach()
    ids = tiny_loaded.tokenizer.convert_tokens_to_ids(["cat", "dog"])
    assert wv.n_tokens == (2,)
    torch.testing.assert_close(wv.vectors[0], lm[ids].mean(0))


def test_word_vectors_bad_inputs(tiny_loaded: LoadedModel) -> None:
    with pytest.raises(VocabularyError, match="None of the 2 vocabulary words"):
        word_vectors(Vocabulary(("zebra", "qwerty"), (2, 1), "t"), tiny_loaded)
    with pytest.raises(VocabularyError, match="None of the 1"):
        word_vectors(Vocabulary(("",), (1,), "t"), tiny_loaded)
    with pytest.raises(VocabularyError, match="empty"):
        word_vectors(Vocabulary((), (), "t"), tiny_loaded)
    with pytest.raises(VocabularyError, match="matrix must be"):
        word_vectors(Vocabulary(("cat",), (1,), "t"), tiny_loaded, matrix="wte")  # type: ignore[arg-type]
    with pytest.raises(VocabularyError, match="batch"):
        word_vectors(Vocabulary(("cat",), (1,), "t"), tiny_loaded, batch=0)
    with pytest.raises(VocabularyError, match="LoadedModel"):
        word_vectors(Vocabulary(("cat",), (1,), "t"), object())


def test_word_vectors_tokenizer_model_mismatch(tiny_loaded: LoadedModel) -> None:
    tiny_loaded.model.resize_token_embeddings(8)
    with pytest.raises(VocabularyError, match="tokenizer and model do not match"):
        word_vectors(Vocabulary(("four",), (1,), "t"), tiny_loaded)


@pytest.mark.slow
def test_default_vocabulary_on_smollm2() -> None:
    from steerlex.models import load_model

    loaded = load_model("embedded:smollm2-135m-instruct")
    vocab = vocabulary_from_wordfreq()
    assert len(vocab) == 5000
    wv = word_vectors(vocab, loaded)
    assert wv.vectors.shape == (5000, 576)
    assert wv.dropped == {}
    assert torch.isfinite(wv.vectors).all()
    lm = loaded.model.get_output_embeddings().weight.detach().float()
    ids = loaded.tokenizer(" " + wv.words[0], add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(wv.vectors[0], lm[ids].mean(0))
