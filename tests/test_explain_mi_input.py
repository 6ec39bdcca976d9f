"""Input-side MI explainer: word activations, cache, scores, planted feature, bad inputs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import WORDS
from steerlex.core.errors import ExplainError, LayerError
from steerlex.explain import mi_input
from steerlex.explain.mi_input import (
    cached_word_activations,
    default_temperature,
    input_mi_scores,
    word_activations,
    word_residuals,
)
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SAEConfig, SparseAutoencoder

LAYER = 1
TEMPLATES = ("{w}", "tell me about {w}", "the {w} is short")


def make_sae(d_in: int = 32, d_sae: int = 64, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=4))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.01)
        sae.b_dec.normal_(0, 0.01)
    return sae


@pytest.fixture
def sae() -> SparseAutoencoder:
    return make_sae()


def _manual(
    loaded: LoadedModel, sae: SparseAutoencoder, text: str, positions: list[int]
) -> torch.Tensor:
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        out = loaded.model(input_ids=ids, output_hidden_states=True)
        resid = out.hidden_states[LAYER + 1][0, positions].mean(dim=0)
        return sae.pre_acts(resid)


def test_shape_and_manual_value(tiny_loaded: LoadedModel, sae: SparseAutoencoder) -> None:
    acts = word_activations(tiny_loaded, sae, LAYER, WORDS, templates=TEMPLATES, progress=False)
    assert acts.shape == (len(WORDS), sae.d_sae)
    assert acts.dtype == torch.float32
    # One word, one template, against a full forward pass: [BOS] tell me about cat.
    one = word_activations(
        tiny_loaded, sae, LAYER, ["cat"], templates=["tell me about {w}"], progress=False
    )
    torch.testing.assert_close(one[0], _manual(tiny_loaded, sae, "tell me about cat", [4]))
    # Mean over templates: the row for "cat" in the full matrix.
    parts = [
        _manual(tiny_loaded, sae, "cat", [1]),
        _manual(tiny_loaded, sae, "tell me about cat", [4]),
        _manual(tiny_loaded, sae, "the cat is short", [2]),
    ]
    torch.testing.assert_close(acts[WORDS.index("cat")], torch.stack(parts).mean(0))


def test_multi_token_word_is_averaged(tiny_loaded: LoadedModel, sae: SparseAutoencoder) -> None:
    # The word-level tokenizer splits "cat dog" into two tokens: both positions are averaged.
    got = word_activations(
        tiny_loaded,
        sae,
        LAYER,
        ["cat dog"],
        templates=["tell me about {w} today"],
        progress=False,
        batch_size=1,
    )
    want = _manual(tiny_loaded, sae, "tell me about cat dog", [4, 5])
    torch.testing.assert_close(got[0], want)


def test_batching_and_padding_do_not_change_values(
    tiny_loaded: LoadedModel, sae: SparseAutoencoder
) -> None:
    a1 = word_activations(
        tiny_loaded, sae, LAYER, WORDS[:9], templates=TEMPLATES, batch_size=1, progress=False
    )
    a2 = word_activations(
        tiny_loaded, sae, LAYER, WORDS[:9], templates=TEMPLATES, batch_size=7, progress=False
    )
    torch.testing.assert_close(a1, a2, atol=1e-5, rtol=1e-5)


def test_acts_option(tiny_loaded: LoadedModel, sae: SparseAutoencoder) -> None:
    resid = word_residuals(tiny_loaded, LAYER, ["cat", "dog"], templates=["{w}"])
    acts = word_activations(
        (tiny_loaded.model, tiny_loaded.tokenizer),
        sae,
        LAYER,
        ["cat", "dog"],
        templates=["{w}"],
        use="acts",
        progress=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(acts, sae.encode(resid))
    assert int((acts != 0).sum(dim=1).max()) <= sae.cfg.k  # type: ignore[operator]


def test_cache_hit_skips_model(
    tiny_loaded: LoadedModel,
    sae: SparseAutoencoder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = {"n": 0}
    real = mi_input.forward_to_layer

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(mi_input, "forward_to_layer", counting)
    words = WORDS[:20]
    first = cached_word_activations(
        tiny_loaded, sae, LAYER, words, tmp_path, templates=TEMPLATES, progress=False
    )
    n_first = calls["n"]
    assert n_first > 0
    assert len(list(tmp_path.glob("mi_input-*.safetensors"))) == 1
    assert not list(tmp_path.glob("*.tmp"))
    again = cached_word_activations(
        tiny_loaded, sae, LAYER, words, tmp_path, templates=TEMPLATES, progress=False
    )
    assert calls["n"] == n_first
    assert torch.equal(first, again)
    # Any change of the key recomputes: use, templates, words, SAE weights.
    cached_word_activations(
        tiny_loaded,
        sae,
        LAYER,
        words,
        tmp_path,
        templates=TEMPLATES,
        use="acts",
        progress=False,
    )
    assert calls["n"] > n_first
    n2 = calls["n"]
    other = make_sae(seed=1)
    cached_word_activations(
        tiny_loaded, other, LAYER, words, tmp_path, templates=TEMPLATES, progress=False
    )
    assert calls["n"] > n2
    assert len(list(tmp_path.glob("mi_input-*.safetensors"))) == 3


def test_corrupt_cache_entry_is_recomputed(
    tiny_loaded: LoadedModel, sae: SparseAutoencoder, tmp_path: Path
) -> None:
    first = cached_word_activations(tiny_loaded, sae, LAYER, WORDS[:5], tmp_path, progress=False)
    (entry,) = tmp_path.glob("mi_input-*.safetensors")
    entry.write_bytes(b"garbage")
    again = cached_word_activations(tiny_loaded, sae, LAYER, WORDS[:5], tmp_path, progress=False)
    torch.testing.assert_close(first, again)


def test_planted_feature_ranks_its_word_first(
    tiny_loaded: LoadedModel, sae: SparseAutoencoder
) -> None:
    resid = word_residuals(tiny_loaded, LAYER, WORDS, templates=TEMPLATES)
    target = WORDS.index("python")
    direction = resid[target] - resid.mean(dim=0)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_enc[:, 0] = direction / direction.norm()
    acts = word_activations(tiny_loaded, sae, LAYER, WORDS, templates=TEMPLATES, progress=False)
    scores, idx = input_mi_scores(acts, top_k=5)
    assert int(idx[0, 0]) == target
    assert scores.shape == idx.shape == (sae.d_sae, 5)


def _dense(acts: torch.Tensor, alpha: float, beta: float, score: str) -> torch.Tensor:
    s = acts.double().T
    log_pw = torch.log_softmax(s / alpha, dim=1)
    log_pc = torch.log_softmax(s / beta, dim=0)
    if score == "mi":
        return log_pw.exp() * (log_pc + math.log(s.shape[0]))
    return log_pw.exp() * log_pc


@pytest.mark.parametrize("score", ["mi", "paper"])
def test_scores_match_dense_and_chunks(score: str) -> None:
    gen = torch.Generator().manual_seed(3)
    acts = torch.randn(40, 23, generator=gen) * 0.3
    want = _dense(acts, 0.2, 0.4, score)
    ref_v, ref_i = torch.sort(want, dim=1, descending=True, stable=True)
    for chunk in (1, 5, 1024):
        v, i = input_mi_scores(
            acts,
            score=score,  # type: ignore[arg-type]
            alpha=0.2,
            beta=0.4,
            top_k=7,
            feature_chunk=chunk,
            standardize=False,
        )
        assert torch.equal(i, ref_i[:, :7])
        torch.testing.assert_close(v, ref_v[:, :7].float())


def test_hand_checked_case_and_default_temperature() -> None:
    # Two words, two features: word 0 excites feature 0, word 1 excites feature 1.
    acts = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    v, i = input_mi_scores(acts, alpha=1.0, beta=1.0, top_k=2, standardize=False)
    assert i.tolist() == [[0, 1], [1, 0]]
    p_hi = math.exp(2) / (1 + math.exp(2))
    want_top = p_hi * (math.log(p_hi) + math.log(2))
    assert float(v[0, 0]) == pytest.approx(want_top, rel=1e-6)
    assert default_temperature(acts) == pytest.approx(float(acts.double().std()) / 2)
    # alpha=None uses std/2.
    t = default_temperature(acts)
    torch.testing.assert_close(
        input_mi_scores(acts, top_k=2, standardize=False)[0],
        input_mi_scores(acts, alpha=t, beta=t, top_k=2, standardize=False)[0],
    )


def test_log_p_c_prior() -> None:
    acts = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    prior = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    v, _ = input_mi_scores(acts, alpha=0.5, beta=0.5, top_k=10, log_p_c=prior, standardize=False)
    dense = torch.softmax(acts.double().T / 0.5, 1) * (
        torch.log_softmax(acts.double().T / 0.5, 0) - prior.double()[:, None]
    )
    torch.testing.assert_close(v, torch.sort(dense, 1, descending=True).values.float())


# --- bad inputs --------------------------------------------------------------------------


def test_bad_word_inputs(tiny_loaded: LoadedModel, sae: SparseAutoencoder) -> None:
    with pytest.raises(ExplainError, match="word list is empty"):
        word_activations(tiny_loaded, sae, LAYER, [], progress=False)
    with pytest.raises(ExplainError, match="not one string"):
        word_activations(tiny_loaded, sae, LAYER, "cat", progress=False)
    with pytest.raises(ExplainError, match="cannot encode 1 of 2 words.*'zebra'"):
        word_activations(tiny_loaded, sae, LAYER, ["cat", "zebra"], progress=False)


@pytest.mark.parametrize("templates", [["the cat"], ["{w} and {w}"], [], ["{word}"]])
def test_bad_templates(
    tiny_loaded: LoadedModel, sae: SparseAutoencoder, templates: list[str]
) -> None:
    with pytest.raises(ExplainError, match="template"):
        word_activations(tiny_loaded, sae, LAYER, ["cat"], templates=templates, progress=False)


def test_bad_model_inputs(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    narrow = make_sae(d_in=16)
    with pytest.raises(ExplainError, match="d_in=16.*width is 32"):
        word_activations(tiny_loaded, narrow, LAYER, ["cat"], progress=False)
    with pytest.raises(ExplainError, match="d_in=16"):
        cached_word_activations(tiny_loaded, narrow, LAYER, ["cat"], tmp_path, progress=False)
    sae = make_sae()
    with pytest.raises(LayerError, match="out of range"):
        word_activations(tiny_loaded, sae, 4, ["cat"], progress=False)
    with pytest.raises(LayerError, match="negative"):
        word_activations(tiny_loaded, sae, -1, ["cat"], progress=False)
    with pytest.raises(ExplainError, match="use must be"):
        word_activations(tiny_loaded, sae, LAYER, ["cat"], use="x", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ExplainError, match="batch_size"):
        word_activations(tiny_loaded, sae, LAYER, ["cat"], batch_size=0, progress=False)
    with pytest.raises(ExplainError, match="LoadedModel"):
        word_activations(object(), sae, LAYER, ["cat"], progress=False)


def test_bad_score_inputs() -> None:
    acts = torch.randn(6, 3)
    with pytest.raises(ExplainError, match="alpha"):
        input_mi_scores(acts, alpha=0.0)
    with pytest.raises(ExplainError, match="beta"):
        input_mi_scores(acts, alpha=1.0, beta=-1.0)
    with pytest.raises(ExplainError, match=r"top_k must be an integer in \[1, 6\]"):
        input_mi_scores(acts, top_k=7)
    with pytest.raises(ExplainError, match="top_k"):
        input_mi_scores(acts, top_k=0)
    with pytest.raises(ExplainError, match="2-D"):
        input_mi_scores(acts[0])
    with pytest.raises(ExplainError, match="empty"):
        input_mi_scores(torch.zeros(0, 3))
    with pytest.raises(ExplainError, match="non-finite"):
        input_mi_scores(torch.tensor([[1.0, float("nan")]]), top_k=1)
    with pytest.raises(ExplainError, match="standard deviation"):
        input_mi_scores(torch.zeros(4, 3), top_k=1)
    with pytest.raises(ExplainError, match="score must be"):
        input_mi_scores(acts, score="bogus")  # type: ignore[arg-type]
    with pytest.raises(ExplainError, match="log_p_c"):
        input_mi_scores(acts, top_k=2, log_p_c=torch.zeros(2))
    with pytest.raises(ExplainError, match="feature_chunk"):
        input_mi_scores(acts, top_k=2, feature_chunk=0)


def test_ties_go_to_lower_word_index() -> None:
    acts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    _, idx = input_mi_scores(acts, alpha=1.0, beta=1.0, top_k=3)
    assert idx[0].tolist() == [0, 1, 3]


def test_standardize_removes_hub_words() -> None:
    """A word that is high on every feature (a "hub") tops the raw lists of the features it
    is highest on; after z-scoring rows then columns each feature's own word comes first."""
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(30, 6, generator=gen) * 0.1
    acts[0] += torch.tensor([3.0, 4.0, 3.0, 4.0, 3.0, 4.0])  # the hub: high everywhere
    for c in range(6):
        acts[1 + c, c] += 1.5  # word 1 + c belongs to feature c
    _, raw = input_mi_scores(acts, alpha=0.5, beta=0.5, top_k=1, standardize=False)
    assert raw[:, 0].tolist() == [1, 0, 3, 0, 5, 0]  # the hub wins half the features
    _, std = input_mi_scores(acts, top_k=1)
    assert std[:, 0].tolist() == [1, 2, 3, 4, 5, 6]
