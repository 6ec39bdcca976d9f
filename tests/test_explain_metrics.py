"""Faithfulness metrics: AUROC and interval math, oracle explanations, bad inputs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from conftest import WORDS
from steerlex.core.errors import ExplainError
from steerlex.explain.metrics import (
    _add_rows,
    _last_logprobs,
    _max_activations,
    _text_tokens,
    auroc,
    best_method,
    input_faithfulness,
    mean_ci,
    output_faithfulness,
    ranked_features,
    word_token_ids,
)
from steerlex.models.chat import left_padded
from steerlex.models.hooks import edit_residual, forward_to_layer
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SAEConfig, SparseAutoencoder

LAYER = 1
PROMPTS = ("the cat", "tell me about", "a dog is")


def make_sae(d_in: int = 32, d_sae: int = 16, layer: int | None = LAYER) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=4, layer=layer))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.01)
    return sae


def _mean_prompt_norm(loaded: LoadedModel) -> float:
    """The prompts' mean layer-LAYER residual norm, first position left out (the scale
    output_faithfulness gives the directions)."""
    norms: list[float] = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([loaded.tokenizer.encode(p)])
            h = forward_to_layer(loaded.model, ids, layer=LAYER)
            norms.extend(h[0, 1:].norm(dim=-1).tolist())
    return sum(norms) / len(norms)


def test_auroc_hand_cases() -> None:
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    # pairs: (2>1), (2=2), (2<3); (5>1), (5>2), (5>3) -> (1 + 0.5 + 0 + 3) / 6
    assert auroc([2, 5], [1, 2, 3]) == pytest.approx(4.5 / 6)
    with pytest.raises(ExplainError, match="at least one"):
        auroc([], [1.0])


def test_mean_ci() -> None:
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, df=2)
    assert mean == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert mean_ci([0.7]) == (0.7, 0.7, 0.7)
    assert all(math.isnan(v) for v in mean_ci([]))


def test_best_method_and_ranked_features_read_a_result() -> None:
    result: dict[str, Any] = {
        "methods": ["a", "b", "c"],
        "output_faithfulness": {
            "a": {"auroc_mean": 0.7, "per_feature": {"3": 0.9, "1": 0.6, "2": 0.9, "4": math.nan}},
            "b": {"auroc_mean": 0.7, "per_feature": {}},
            "c": {"auroc_mean": math.nan},
        },
        "input_faithfulness": {"c": {"auroc_mean": 0.52}, "b": {"auroc_mean": 0.61}},
    }
    assert best_method(result) == "a"  # tie with b: the first in "methods"; c's NaN skipped
    assert best_method(result, "input") == "b"
    # most faithful first, ties by id; NaN left out; string keys (JSON) become ints
    assert ranked_features(result, "a") == [(2, 0.9), (3, 0.9), (1, 0.6)]
    assert ranked_features(result, "b") == [] and ranked_features(result, "zzz") == []
    assert best_method({"methods": ["a"]}) is None
    with pytest.raises(ExplainError, match="side"):
        best_method(result, "middle")


def test_left_padding_matches_unpadded(tiny_loaded: LoadedModel) -> None:
    tok = tiny_loaded.tokenizer
    seqs = [tok.encode(p) for p in PROMPTS]
    ids, mask, pos = left_padded(seqs, tok.pad_token_id)
    with torch.no_grad():
        batched = _last_logprobs(tiny_loaded.model, ids, mask, pos, LAYER, None)
        for i, s in enumerate(seqs):
            alone = torch.log_softmax(
                tiny_loaded.model(input_ids=torch.tensor([s])).logits[0, -1], dim=-1
            )
            torch.testing.assert_close(batched[i], alone, atol=1e-4, rtol=1e-4)


def _delta_ranking(
    loaded: LoadedModel, sae: SparseAutoencoder, feature: int, strength: float
) -> list[int]:
    """Token ids ordered by how much adding the feature's direction raises them (mean over
    prompts), computed independently of output_faithfulness."""
    tok, model = loaded.tokenizer, loaded.model
    d = sae.W_dec[feature].detach()
    d = d / d.norm()
    total = torch.zeros(len(tok))
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([tok.encode(p)])
            clean = torch.log_softmax(model(input_ids=ids).logits[0, -1], dim=-1)
            with edit_residual(model, LAYER, _add_rows((d * strength)[None])):
                steered = torch.log_softmax(model(input_ids=ids).logits[0, -1], dim=-1)
            total += steered - clean
    return torch.argsort(total, descending=True).tolist()


def test_output_oracle_beats_anti_oracle(tiny_loaded: LoadedModel) -> None:
    sae = make_sae()
    tok = tiny_loaded.tokenizer
    words = [w for w in WORDS if word_token_ids(tok, [w])[0] == tok.convert_tokens_to_ids(w)]
    by_id = {tok.convert_tokens_to_ids(w): w for w in words}
    feature = 3
    # output_faithfulness scales directions by the prompts' mean residual norm (first
    # position left out); rank tokens at that same strength.
    scale = _mean_prompt_norm(tiny_loaded)
    order = [t for t in _delta_ranking(tiny_loaded, sae, feature, scale) if t in by_id]
    top = [by_id[t] for t in order[:5]]
    bottom = [by_id[t] for t in order[-5:]]
    res = output_faithfulness(
        tiny_loaded,
        sae,
        {"oracle": {feature: top}, "anti": {feature: bottom}},
        [feature],
        words,
        prompts=PROMPTS,
        strengths=(1.0,),
        n_words=5,
        n_random=20,
        progress=False,
    )
    assert res["oracle"].per_feature[feature] > 0.8
    assert res["anti"].per_feature[feature] < 0.2
    assert res["oracle"].extra["lift_nats_mean"] > res["anti"].extra["lift_nats_mean"]
    assert res["oracle"].n_scored == 1 and res["oracle"].side == "output"


def test_output_generation_hits(tiny_loaded: LoadedModel) -> None:
    sae = make_sae()
    res = output_faithfulness(
        tiny_loaded,
        sae,
        {"m": {0: ["cat", "dog"], 1: ["red"]}},
        [0, 1],
        WORDS,
        prompts=PROMPTS,
        strengths=(0.5,),
        n_random=10,
        generate_tokens=3,
        progress=False,
    )
    extra = res["m"].extra
    assert 0.0 <= extra["generation_hit_rate"] <= 1.0
    assert 0.0 <= extra["generation_clean_hit_rate"] <= 1.0
    assert 0.0 <= extra["generation_random_hit_rate"] <= 1.0


def test_input_oracle_and_silent(tiny_loaded: LoadedModel) -> None:
    sae = make_sae()
    with torch.no_grad():
        sae.b_enc[5] = -1e4  # feature 5 can never fire
    # The oracle for feature 2: the words whose one-word texts activate it most.
    tok = tiny_loaded.tokenizer
    texts = [_text_tokens(tok, [w]) for w in WORDS]
    single = _max_activations(tiny_loaded.model, sae, LAYER, texts, 8, 0, False)[:, 2]
    order = torch.argsort(single, descending=True).tolist()
    assert single[order[0]] > 0
    oracle = [WORDS[i] for i in order[:4]]
    anti = [WORDS[i] for i in order[-4:]]
    one_word = input_faithfulness(
        tiny_loaded,
        sae,
        {"oracle": {2: oracle}, "anti": {2: anti}},
        [2],
        WORDS,
        texts_per_feature=4,
        words_per_text=1,
        n_random_texts=24,
        progress=False,
    )
    assert one_word["oracle"].per_feature[2] > 0.7
    assert one_word["oracle"].per_feature[2] > one_word["anti"].per_feature[2]
    res = input_faithfulness(
        tiny_loaded,
        sae,
        {"a": {2: WORDS[:10], 5: WORDS[:10]}, "b": {2: WORDS[10:20]}},
        [2, 5],
        WORDS,
        n_words=10,
        texts_per_feature=4,
        words_per_text=3,
        n_random_texts=8,
        progress=False,
    )
    a = res["a"]
    assert a.per_feature[5] == 0.5  # silent on everything: a tie
    assert a.extra["silent_share"] >= 0.5
    assert res["b"].extra["features_without_words"] == 1
    assert 0.0 <= a.per_feature[2] <= 1.0


def test_input_deterministic(tiny_loaded: LoadedModel) -> None:
    sae = make_sae()
    kw: dict[str, Any] = {
        "texts_per_feature": 3,
        "words_per_text": 3,
        "n_random_texts": 6,
        "progress": False,
    }
    one = input_faithfulness(tiny_loaded, sae, {"a": {1: WORDS[:8]}}, [1], WORDS, **kw)
    two = input_faithfulness(tiny_loaded, sae, {"a": {1: WORDS[:8]}}, [1], WORDS, **kw)
    assert one["a"].per_feature == two["a"].per_feature


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"features": []}, "No features"),
        ({"features": [99]}, "out of range"),
        ({"explanations": {}}, "No explanations"),
        ({"n_words": 0}, "n_words"),
        ({"strengths": (-1.0,)}, "strengths"),
        ({"vocab_words": ["cat"]}, "usable words"),
    ],
)
def test_output_bad_inputs(tiny_loaded: LoadedModel, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "explanations": {"m": {0: ["cat"]}},
        "features": [0],
        "vocab_words": WORDS,
    }
    args.update(kwargs)
    with pytest.raises(ExplainError, match=match):
        output_faithfulness(
            tiny_loaded,
            make_sae(),
            args["explanations"],
            args["features"],
            args["vocab_words"],
            prompts=PROMPTS,
            n_words=kwargs.get("n_words", 10),
            strengths=kwargs.get("strengths", (1.0,)),
            progress=False,
        )


def test_sae_mismatch_and_missing_layer(tiny_loaded: LoadedModel) -> None:
    with pytest.raises(ExplainError, match="Width mismatch"):
        input_faithfulness(tiny_loaded, make_sae(d_in=16), {"m": {0: ["cat"]}}, [0], WORDS)
    with pytest.raises(ExplainError, match="records no layer"):
        input_faithfulness(tiny_loaded, make_sae(layer=None), {"m": {0: ["cat"]}}, [0], WORDS)
    with pytest.raises(ExplainError, match="words_per_text"):
        input_faithfulness(
            tiny_loaded, make_sae(), {"m": {0: ["cat"]}}, [0], WORDS, words_per_text=0
        )


def test_output_specificity_of_oracles(tiny_loaded: LoadedModel) -> None:
    """Each feature's own top-raised words rise more under its own edit than under the
    other's: specificity 1.0 for both."""
    sae = make_sae()
    tok = tiny_loaded.tokenizer
    words = [w for w in WORDS if word_token_ids(tok, [w])[0] == tok.convert_tokens_to_ids(w)]
    by_id = {tok.convert_tokens_to_ids(w): w for w in words}
    scale = _mean_prompt_norm(tiny_loaded)
    oracle = {}
    for f in (3, 7):
        order = [t for t in _delta_ranking(tiny_loaded, sae, f, scale) if t in by_id]
        oracle[f] = [by_id[t] for t in order[:3]]
    res = output_faithfulness(
        tiny_loaded, sae, {"oracle": oracle}, [3, 7], words, prompts=PROMPTS,
        strengths=(1.0,), n_words=3, n_random=10, progress=False,
    )  # fmt: skip
    assert res["oracle"].extra["specificity_mean"] == 1.0
