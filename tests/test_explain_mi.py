"""The MI explainer (chunked scores against a dense reference), feature vectors, LogitLens."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from conftest import make_tiny_llama, make_tokenizer
from steerlex.core.errors import ExplainError
from steerlex.explain import (
    affinity_stats,
    decode_tokens,
    effective_words,
    feature_vectors,
    final_norm_module,
    logit_lens,
    logit_lens_topk,
    mi_scores,
)
from steerlex.explain.mi import _merge_topk, _slab_row_lse, _slab_topk
from steerlex.sae.base import SAEConfig, SparseAutoencoder


def dense_scores(
    features: Tensor,
    words: Tensor,
    *,
    score: str = "mi",
    alpha: float = 1.0,
    beta: float = 1.0,
    log_p_c: Tensor | None = None,
) -> Tensor:
    """The full [C, M] score matrix in float64, straight from the definitions."""
    s = features.double() @ words.double().T
    log_pw = torch.log_softmax(s / alpha, dim=1)
    log_pc = torch.log_softmax(s / beta, dim=0)
    if score == "paper":
        return log_pw.exp() * log_pc
    prior = (
        torch.full((s.shape[0],), -math.log(s.shape[0]), dtype=torch.float64)
        if log_p_c is None
        else log_p_c.double()
    )
    return log_pw.exp() * (log_pc - prior[:, None])


def paper_log_topk(
    features: Tensor, words: Tensor, k: int, *, alpha: float = 1.0, beta: float = 1.0, **_: object
) -> Tensor:
    """`paper` ranking from log|score| = log p(w|c) + log(−log p(c|w)) (ascending)."""
    s = features.double() @ words.double().T
    log_pw = torch.log_softmax(s / alpha, dim=1)
    log_pc = torch.log_softmax(s / beta, dim=0)
    key = log_pw + torch.log(-log_pc.clamp_max(0.0))
    return torch.sort(key, dim=1, stable=True).indices[:, :k]


def dense_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k by (score descending, index ascending)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), order


def data(c: int, m: int, d: int, seed: int = 0, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(c, d, generator=gen) * scale,
        torch.randn(m, d, generator=gen) * scale / math.sqrt(d) * 2,  # S has std ~2 scale^2
    )


def assert_matches_dense(features: Tensor, words: Tensor, k: int, **kwargs: object) -> None:
    min_resolvable = float(kwargs.pop("min_resolvable", 0.5))  # type: ignore[arg-type]
    chunk_kw = {
        key: kwargs.pop(key)
        for key in ("feature_chunk", "word_chunk", "max_slab_elements")
        if key in kwargs
    }
    got_v, got_i = mi_scores(features, words, top_k=k, **chunk_kw, **kwargs)  # type: ignore[arg-type]
    ref_v, ref_i = dense_topk(dense_scores(features, words, **kwargs), k)  # type: ignore[arg-type]
    assert got_v.shape == got_i.shape == (features.shape[0], k)
    assert got_v.dtype == torch.float32 and got_i.dtype == torch.int64
    torch.testing.assert_close(got_v.double(), ref_v, rtol=1e-5, atol=1e-7)
    if kwargs.get("score") == "paper":
        # `paper` is ranked in the log domain, so even scores far below float32 range
        # (low temperatures) are ordered exactly: compare with the log-domain reference.
        assert torch.equal(got_i, paper_log_topk(features, words, k, **kwargs))  # type: ignore[arg-type]
        return
    # `mi` scores below float32 range (p(w|c) < ~1e-38) are 0 in the chunked result and tie.
    resolvable = ref_v.abs() > 1e-30
    assert torch.equal(got_i[resolvable], ref_i[resolvable])
    assert float(resolvable.double().mean()) >= min_resolvable


# --- chunked equals dense ---------------------------------------------------------------


@pytest.mark.parametrize("score", ["mi", "paper"])
@pytest.mark.parametrize(
    ("feature_chunk", "word_chunk", "max_slab_elements"),
    [
        (4096, 8192, 1 << 25),  # one block
        (7, 11, 1 << 25),  # chunks that divide neither C nor M
        (64, 1000, 1 << 25),  # C and M smaller than a chunk
        (5, 13, 37 * 2),  # the slab cap forces 2-word slabs
        (1, 1, 1),  # one feature, one word at a time
    ],
)
def test_chunked_equals_dense(
    score: str, feature_chunk: int, word_chunk: int, max_slab_elements: int
) -> None:
    features, words = data(37, 53, 16)
    assert_matches_dense(
        features,
        words,
        10,
        score=score,
        feature_chunk=feature_chunk,
        word_chunk=word_chunk,
        max_slab_elements=max_slab_elements,
    )


@pytest.mark.parametrize(
    ("score", "alpha", "beta"),
    [
        ("mi", 0.5, 2.0),
        ("mi", 3.0, 0.7),
        ("paper", 0.5, 2.0),
        ("paper", 3.0, 0.7),
        # S/beta spans hundreds of nats: the fast column sums underflow for many words
        # and the exact per-column fallback must take over. (Not for `paper`: there,
        # log p(c|w) within float32 rounding of 0 counts as 0, see docs/mi.md.)
        ("mi", 0.02, 0.02),
    ],
)
def test_chunked_equals_dense_temperatures(score: str, alpha: float, beta: float) -> None:
    features, words = data(29, 41, 8, seed=1)
    assert_matches_dense(
        features,
        words,
        7,
        score=score,
        alpha=alpha,
        beta=beta,
        feature_chunk=6,
        word_chunk=9,
        min_resolvable=0.1 if alpha < 0.1 else 0.5,
    )


def test_chunked_equals_dense_with_prior_and_all_words() -> None:
    features, words = data(20, 15, 8, seed=2)
    gen = torch.Generator().manual_seed(5)
    log_p_c = torch.log_softmax(torch.randn(20, generator=gen) * 2, dim=0)
    assert_matches_dense(
        features, words, 15, score="mi", log_p_c=log_p_c, feature_chunk=3, word_chunk=4
    )


def test_ties_go_to_the_lower_word_index() -> None:
    # One feature: p(c|w) = 1, so every `mi` and `paper` score is exactly 0 (all tie).
    # (alpha != beta: the per-word normaliser is then an exact logsumexp of one value.)
    features, words = data(1, 30, 8, seed=3)
    for chunk in (30, 7, 1):
        for score in ("mi", "paper"):
            v, idx = mi_scores(
                features,
                words,
                score=score,
                top_k=12,
                word_chunk=chunk,
                alpha=2.0,
            )
            assert bool((v == 0).all())
            assert idx[0].tolist() == list(range(12))


def test_topk_helpers_break_ties_by_index() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [5.0, 4.0, 4.0, 4.0, 1.0, 4.0]])
    vals, idx = _slab_topk(scores, 2, 10)
    assert idx.tolist() == [[11, 12], [10, 11]] and vals.tolist() == [[3.0, 3.0], [5.0, 4.0]]
    vals, idx = _slab_topk(scores, 3, 0)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 2]]
    old_v, old_i = torch.tensor([[3.0, 1.0]]), torch.tensor([[4, 2]])
    v, i = _merge_topk(old_v, old_i, torch.tensor([[3.0, 2.0]]), torch.tensor([[7, 9]]), 3)
    assert i.tolist() == [[4, 7, 9]] and v.tolist() == [[3.0, 3.0, 2.0]]


def test_slab_row_lse_probe_and_fallback() -> None:
    # Rows whose probed word is far in the tail (q underflows) use the exact logsumexp.
    features, words = data(30, 200, 8, seed=12)
    b = features @ words.T
    b[3, :64] = -200.0  # probe window far below the row's maximum: q_j = 0
    for ratio in (1.0, 0.3, 5.0):
        q = torch.softmax(b * ratio, dim=1)
        got = _slab_row_lse(b, q, ratio, torch.float64)
        expected = torch.logsumexp(b.double() * ratio, dim=1)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(ExplainError, match="overflow"):
        bad = b.clone()
        bad[0, 100] = float("inf")
        _slab_row_lse(bad, torch.softmax(bad, dim=1), 1.0, torch.float64)


def test_deterministic() -> None:
    features, words = data(50, 70, 12, seed=4)
    for score in ("mi", "paper"):
        a = mi_scores(features, words, score=score, top_k=9, feature_chunk=16, word_chunk=32)
        b = mi_scores(features, words, score=score, top_k=9, feature_chunk=16, word_chunk=32)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- what the two scores rank -----------------------------------------------------------


def planted() -> tuple[Tensor, Tensor, int]:
    """8 features, 40 words; word 5 is aligned with feature 0 (and nothing else)."""
    gen = torch.Generator().manual_seed(7)
    features = torch.randn(8, 16, generator=gen)
    features = 3 * features / features.norm(dim=1, keepdim=True)
    words = torch.randn(40, 16, generator=gen)  # S has std ~3, as on real weights
    words[5] = 1.5 * features[0]
    return features, words, 5


def test_mi_puts_the_planted_word_first() -> None:
    features, words, target = planted()
    _, idx = mi_scores(features, words, score="mi", top_k=5)
    assert int(idx[0, 0]) == target


def test_paper_ranks_the_least_aligned_words_first() -> None:
    features, words, target = planted()
    s = features @ words.T
    paper_v, paper_i = mi_scores(features, words, score="paper", top_k=40)
    mi_i = mi_scores(features, words, score="mi", top_k=40)[1]
    assert bool((paper_v <= 0).all())  # p(w|c) log p(c|w) is never positive
    # The top `paper` word of every feature is its least aligned word, and its top 5 are
    # among the 8 least aligned; `mi` puts the planted word first for feature 0 and agrees
    # with ranking by affinity at the top.
    assert torch.equal(paper_i[:, 0], s.argmin(dim=1))
    least = s.argsort(dim=1)[:, :8]
    assert all(set(paper_i[c, :5].tolist()) <= set(least[c].tolist()) for c in range(8))
    assert int(mi_i[0, 0]) == target
    most = s.argsort(dim=1, descending=True)[:, :3]
    assert all(int(mi_i[c, 0]) in most[c].tolist() for c in range(8))
    assert int((paper_i[0] == target).nonzero()) > 20  # `paper` buries the planted word


def test_log_p_c_lowers_the_scores_of_frequent_features() -> None:
    features, words = data(6, 20, 8, seed=8)
    base_v, base_i = mi_scores(features, words, top_k=20)
    uniform = torch.full((6,), -math.log(6))
    same_v, same_i = mi_scores(features, words, top_k=20, log_p_c=uniform)
    torch.testing.assert_close(same_v, base_v)
    assert torch.equal(same_i, base_i)
    # Raising feature 2's prior by delta lowers each of its scores by delta * p(w|c).
    delta = 1.5
    shifted = uniform.clone()
    shifted[2] += delta
    new_v, new_i = mi_scores(features, words, top_k=20, log_p_c=shifted)
    p_wc = torch.softmax((features @ words.T).double(), dim=1)
    by_word_base = torch.empty(6, 20, dtype=torch.float64).scatter_(1, base_i, base_v.double())
    by_word_new = torch.empty(6, 20, dtype=torch.float64).scatter_(1, new_i, new_v.double())
    torch.testing.assert_close(
        by_word_new[2], by_word_base[2] - delta * p_wc[2], rtol=1e-5, atol=1e-7
    )
    others = [0, 1, 3, 4, 5]
    torch.testing.assert_close(new_v[others], base_v[others])
    # `paper` ignores the prior.
    a = mi_scores(features, words, score="paper", top_k=5)
    b = mi_scores(features, words, score="paper", top_k=5, log_p_c=shifted)
    assert torch.equal(a[0], b[0])


def test_high_alpha_makes_p_w_given_c_uniform() -> None:
    features, words = data(10, 30, 8, seed=9, scale=2.0)
    n_eff = effective_words(features, words, alpha=1e6, feature_chunk=3, word_chunk=7)
    torch.testing.assert_close(
        n_eff, torch.full((10,), 30.0, dtype=torch.float64), rtol=1e-4, atol=0
    )
    sharp = effective_words(features, words, alpha=1e-3)
    torch.testing.assert_close(sharp, torch.ones(10, dtype=torch.float64), rtol=1e-3, atol=0)
    # With uniform p(w|c) = 1/M, the mi score is (log p(c|w) + log C) / M.
    v, i = mi_scores(features, words, alpha=1e6, top_k=30)
    log_pc = torch.log_softmax((features @ words.T).double(), dim=0)
    expected = (log_pc.gather(1, i) + math.log(10)) / 30
    torch.testing.assert_close(v.double(), expected, rtol=1e-4, atol=1e-6)


def test_effective_words_matches_entropy() -> None:
    features, words = data(12, 25, 8, seed=10)
    p = torch.softmax((features @ words.T).double() / 0.7, dim=1)
    expected = torch.exp(-(p * p.log()).sum(dim=1))
    got = effective_words(features, words, alpha=0.7, feature_chunk=5, word_chunk=6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_affinity_stats_and_temperature_suggestion() -> None:
    features, words = data(40, 30, 8, seed=11)
    stats = affinity_stats(features, words, sample=1000)
    s = (features @ words.T).double()
    assert stats.n_features == 40 and stats.n_words == 30
    assert stats.mean == pytest.approx(float(s.mean()), rel=1e-6)
    assert stats.std == pytest.approx(float(s.std(unbiased=False)), rel=1e-6)
    alpha, beta = stats.suggest_temperatures(2.0)
    assert float((s / alpha).std(dim=1, unbiased=False).mean()) == pytest.approx(2.0, rel=1e-6)
    assert beta > 0
    small = affinity_stats(features, words, sample=8)
    assert small.n_features == 8
    assert small == affinity_stats(features, words, sample=8)  # deterministic sample


# --- feature vectors and LogitLens ------------------------------------------------------


def tiny_sae(d_in: int = 32, d_sae: int = 16, norm_scale: float = 1.0) -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=4, norm_scale=norm_scale))


def test_feature_vectors_final_norm_equals_the_models_norm() -> None:
    model = make_tiny_llama(len(make_tokenizer()))
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)  # a non-trivial gain
    sae = tiny_sae()
    got = feature_vectors(sae, model, chunk=5)
    with torch.no_grad():
        expected = model.model.norm(sae.W_dec)
    torch.testing.assert_close(got, expected)
    assert final_norm_module(model) is model.model.norm


def test_feature_vectors_sides_and_norm_scale() -> None:
    sae = tiny_sae(norm_scale=2.0)
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))  # encoder != decoder.T
    dec = feature_vectors(sae, transform="identity")
    enc = feature_vectors(sae, side="encoder", transform="identity")
    torch.testing.assert_close(dec, sae.W_dec.detach() / 2.0)
    torch.testing.assert_close(enc, sae.W_enc.detach().T * 2.0)
    assert enc.shape == dec.shape == (16, 32)


def test_feature_vectors_errors() -> None:
    sae = tiny_sae()
    with pytest.raises(ExplainError, match="needs the language model"):
        feature_vectors(sae)
    with pytest.raises(ExplainError, match="Cannot find the final norm"):
        feature_vectors(sae, nn.Linear(32, 32))
    with pytest.raises(ExplainError, match="side"):
        feature_vectors(sae, side="middle", transform="identity")  # type: ignore[arg-type]
    with pytest.raises(ExplainError, match="transform"):
        feature_vectors(sae, transform="softmax")  # type: ignore[arg-type]


@pytest.mark.parametrize("transform", ["final_norm", "identity"])
def test_logit_lens_finds_a_planted_token(transform: str) -> None:
    tok = make_tokenizer()
    model = make_tiny_llama(len(tok))
    sae = tiny_sae()
    w_u = model.get_output_embeddings().weight.detach()
    target = tok.get_vocab()["story"]
    assert sae.W_dec_free is not None
    with torch.no_grad():
        sae.W_dec_free[3] = w_u[target] / w_u[target].norm()
    result = logit_lens(sae, model, tok, top_k=5, transform=transform, feature_chunk=4)  # type: ignore[arg-type]
    assert len(result) == 16
    assert result[3].feature == 3
    assert result[3].token_ids[0] == target
    assert result[3].tokens[0] == "story"
    assert result[3].scores == sorted(result[3].scores, reverse=True)
    subset = logit_lens(sae, model, tok, top_k=3, transform=transform, features=[3, 0])  # type: ignore[arg-type]
    assert [r.feature for r in subset] == [3, 0]
    assert subset[0].token_ids == result[3].token_ids[:3]
    with pytest.raises(ExplainError, match="Feature ids"):
        logit_lens(sae, model, tok, features=[16])


def test_logit_lens_topk_and_decode() -> None:
    unembed = torch.eye(4, 3)  # tokens 0..2 are axes, token 3 is zero
    vectors = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    scores, ids = logit_lens_topk(vectors, unembed, top_k=3)
    assert ids.tolist() == [[1, 2, 0], [0, 1, 2]]  # tie 0/1 -> lower id; 2 vs 3 tie -> 2
    assert scores.tolist() == [[2.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    with pytest.raises(ExplainError, match="width 3"):
        logit_lens_topk(torch.zeros(2, 5), unembed)
    with pytest.raises(ExplainError, match="top_k"):
        logit_lens_topk(vectors, unembed, top_k=5)
    tok = make_tokenizer()
    ids_story = [tok.get_vocab()[w] for w in ("story", "the")]
    assert decode_tokens(tok, ids_story) == ["story", "the"]


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, "alpha must be a positive"),
        ({"alpha": -1.0}, "alpha must be a positive"),
        ({"alpha": float("nan")}, "alpha must be a positive"),
        ({"beta": 0.0}, "beta must be a positive"),
        ({"beta": float("inf")}, "beta must be a positive"),
        ({"top_k": 0}, "top_k must be an integer between 1 and the vocabulary size 12"),
        ({"top_k": 13}, "top_k must be an integer between 1 and the vocabulary size 12"),
        ({"score": "pmi"}, "score must be one of mi, paper"),
        ({"log_p_c": torch.zeros(3)}, r"log_p_c must be a tensor of shape \[5\]"),
        ({"log_p_c": torch.tensor([0.0, -math.inf, 0.0, 0.0, 0.0])}, "non-finite"),
        ({"feature_chunk": 0}, "feature_chunk must be an integer >= 1"),
        ({"word_chunk": -2}, "word_chunk must be an integer >= 1"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    features, words = data(5, 12, 4)
    with pytest.raises(ExplainError, match=message):
        mi_scores(features, words, **{"top_k": 5, **kwargs})  # type: ignore[arg-type]


def test_bad_tensors() -> None:
    features, words = data(5, 12, 4)
    with pytest.raises(ExplainError, match="features have width 4 but words have width 6"):
        mi_scores(features, torch.zeros(12, 6))
    with pytest.raises(ExplainError, match="features is empty"):
        mi_scores(torch.zeros(0, 4), words)
    with pytest.raises(ExplainError, match="words is empty"):
        mi_scores(features, torch.zeros(0, 4), top_k=1)
    with pytest.raises(ExplainError, match="2-D"):
        mi_scores(features[0], words)
    bad = features.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ExplainError, match="features contain 1 non-finite"):
        mi_scores(bad, words)
    bad_words = words.clone()
    bad_words[0, 0] = float("inf")
    bad_words[3, 1] = float("-inf")
    with pytest.raises(ExplainError, match="words contain 2 non-finite"):
        mi_scores(features, bad_words)
    with pytest.raises(ExplainError, match="overflow"):
        mi_scores(features * 1e30, words * 1e30, top_k=5)
    with pytest.raises(ExplainError, match="width mismatch|Width mismatch"):
        affinity_stats(features, torch.zeros(3, 5))
    with pytest.raises(ExplainError, match="alpha"):
        effective_words(features, words, alpha=0)
