"""TopAct: top-activating spans from an activation store, de-duplicated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import WORDS, make_tokenizer
from steerlex.activations.store import (
    ActivationStore,
    create_store,
    shard_name,
    write_index,
    write_shard,
)
from steerlex.core.errors import ExplainError, SAEError
from steerlex.explain import topact
from steerlex.explain.topact import Span, clean_word, top_activations, topact_words
from steerlex.sae.base import SAEConfig, SparseAutoencoder

D = 6
PREFIX = 5  # positions of the dropped template prefix


def make_store(
    directory: Path, shards: list[list[list[int]]], acts: list[torch.Tensor]
) -> ActivationStore:
    """A store whose shard i holds the texts ``shards[i]`` (token id lists) and ``acts[i]``."""
    store = create_store(directory, acts)
    index = store.index
    t = 0
    for i, texts in enumerate(shards):
        ids = [tok for text in texts for tok in text]
        tensors = {
            "activations": acts[i],
            "token_ids": torch.tensor(ids, dtype=torch.int32),
            "text_index": torch.tensor(
                [t + j for j, text in enumerate(texts) for _ in text], dtype=torch.int32
            ),
            "position": torch.tensor(
                [PREFIX + p for text in texts for p in range(len(text))], dtype=torch.int32
            ),
        }
        assert acts[i].shape[0] == len(ids)
        index["shards"][i]["sha256"] = write_shard(directory / shard_name(i), tensors)
        index["shards"][i]["first_text"] = t
        index["shards"][i]["n_texts"] = len(texts)
        t += len(texts)
    index["n_texts"] = t
    write_index(directory, index)
    store = ActivationStore.open(directory)
    assert store.verify() == []
    return store


def planted_sae(d_sae: int = 4, k: int = 2) -> SparseAutoencoder:
    """Feature c reads coordinate c of the activation (no biases)."""
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.W_enc.zero_()
        for c in range(min(d_sae, D)):
            sae.W_enc[c, c] = 1.0
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def planted(
    shard_texts: list[list[int]], plants: dict[tuple[int, int], dict[int, float]]
) -> torch.Tensor:
    """Activations of one shard: zeros, with plants[(text_in_shard, token)] = {feature: value}."""
    n = sum(len(t) for t in shard_texts)
    x = torch.zeros(n, D)
    starts = [sum(len(t) for t in shard_texts[:j]) for j in range(len(shard_texts))]
    for (j, p), feats in plants.items():
        for f, v in feats.items():
            x[starts[j] + p, f] = v
    return x


T0 = list(range(10, 20))
T1 = list(range(20, 26))
T2 = list(range(30, 40))


@pytest.fixture
def basic_store(tmp_path: Path) -> ActivationStore:
    s0 = [T0, T1]
    s1 = [T2]
    a0 = planted(s0, {(0, 1): {0: 5.0}, (1, 0): {0: 3.0}, (0, 8): {0: 2.0}, (0, 0): {0: 1.0},
                      (0, 9): {1: 4.0}})  # fmt: skip
    a1 = planted(s1, {(0, 9): {0: 4.0}})
    return make_store(tmp_path / "s", [s0, s1], [a0, a1])


def test_top_spans_order_windows_and_activations(basic_store: ActivationStore) -> None:
    out = top_activations(
        planted_sae(), basic_store, per_feature=10, window=(2, 1), per_group=10, progress=False
    )
    assert set(out) == {0, 1, 2, 3}
    spans = out[0]
    assert [s.activation for s in spans] == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert [s.text_index for s in spans] == [0, 2, 1, 0, 0]
    assert [s.token_ids for s in spans] == [
        (10, 11, 12),
        (37, 38, 39),  # last token of its text: nothing after
        (20, 21),  # first token of text 1: text 0's tokens are not taken
        (16, 17, 18, 19),
        (10, 11),
    ]
    assert [s.focus for s in spans] == [1, 2, 0, 2, 0]
    assert [s.position for s in spans] == [PREFIX + 1, PREFIX + 9, PREFIX, PREFIX + 8, PREFIX]
    assert spans[0].activations == (1.0, 5.0, 0.0)
    assert spans[3].activations == (0.0, 0.0, 2.0, 0.0)
    # the last token of text 0 is followed by text 1 in the same shard: not crossed
    (last,) = out[1]
    assert last.token_ids == (17, 18, 19) and last.focus == 2 and last.text_index == 0
    assert out[2] == [] and out[3] == []
    assert spans[0].text is None and spans[0].tokens is None


def test_features_max_tokens_and_per_feature(basic_store: ActivationStore) -> None:
    sae = planted_sae()
    out = top_activations(sae, basic_store, features=[1], progress=False)
    assert list(out) == [1] and len(out[1]) == 1
    out = top_activations(
        sae, basic_store, features=[0], per_feature=2, per_group=10, progress=False
    )
    assert [s.activation for s in out[0]] == [5.0, 4.0]
    # only the first shard (16 tokens): text 2's plant is not seen
    out = top_activations(
        sae, basic_store, features=[0], max_tokens=16, per_group=10, progress=False
    )
    assert [s.activation for s in out[0]] == [5.0, 3.0, 2.0, 1.0]
    out = top_activations(sae, basic_store, features=[0], span_activations=False, progress=False)
    assert out[0][0].activations is None


def test_template_groups_are_capped(tmp_path: Path) -> None:
    prefix = list(range(100, 132))  # 32 shared tokens: one template group
    texts = [prefix + [200 + 4 * i + j for j in range(4)] for i in range(4)]
    texts.append(list(range(300, 310)))
    plants = {(i, 35): {0: 10.0 - i} for i in range(4)}
    plants[(4, 5)] = {0: 1.0}
    store = make_store(tmp_path / "s", [texts], [planted(texts, plants)])
    sae = planted_sae()
    spans = top_activations(sae, store, features=[0], window=(2, 0), progress=False)[0]
    assert [s.text_index for s in spans] == [0, 1, 4]  # at most 2 per template group
    spans = top_activations(sae, store, features=[0], window=(2, 0), per_group=3, progress=False)[0]
    assert [s.text_index for s in spans] == [0, 1, 2, 4]


def test_identical_contexts_are_removed(tmp_path: Path) -> None:
    same = list(range(40, 50))
    other = [50, 51, 52, 53, 54, 55]
    texts = [same, list(same), [60, 61, *same[1:9]], other]
    plants = {
        (0, 5): {0: 3.0},
        (1, 5): {0: 2.5},  # identical text: identical span
        (2, 6): {0: 2.2},  # another span, but the same 3 tokens either side of the focus
        (3, 2): {0: 2.0},
    }
    store = make_store(tmp_path / "s", [texts], [planted(texts, plants)])
    spans = top_activations(planted_sae(), store, features=[0], window=(4, 4), progress=False)[0]
    assert [s.text_index for s in spans] == [0, 3]
    assert [s.activation for s in spans] == [3.0, 2.0]


def reference(
    sae: SparseAutoencoder,
    store: ActivationStore,
    per_feature: int,
    window: tuple[int, int],
    per_group: int,
) -> dict[int, list[tuple[float, int, int, tuple[int, ...]]]]:
    """Dense one-shot TopAct with unlimited candidates, written plainly."""
    shards = [store.load_shard(i) for i in range(len(store.shards))]
    x = torch.cat([s["activations"] for s in shards])
    tok = torch.cat([s["token_ids"] for s in shards]).tolist()
    ti = torch.cat([s["text_index"] for s in shards]).tolist()
    pos = torch.cat([s["position"] for s in shards]).tolist()
    f_all = sae.encode(x).detach()
    text_rows: dict[int, list[int]] = {}
    for r, t in enumerate(ti):
        text_rows.setdefault(t, []).append(r)
    out = {}
    for f in range(sae.cfg.d_sae):
        col = f_all[:, f].tolist()
        order = sorted((r for r in range(len(col)) if col[r] > 0), key=lambda r: (-col[r], r))
        kept: list[tuple[float, int, int, tuple[int, ...]]] = []
        full, near, groups = set(), set(), {}  # type: ignore[var-annotated]
        for r in order:
            rows = text_rows[ti[r]]
            lo = max(rows[0], r - window[0])
            hi = min(rows[-1] + 1, r + window[1] + 1)
            ids = tuple(tok[lo:hi])
            focus = r - lo
            around = ids[max(0, focus - 3) : focus + 4]
            g = tuple(tok[rows[0] : rows[0] + 32])
            if groups.get(g, 0) >= per_group or ids in full or around in near:
                continue
            full.add(ids)
            near.add(around)
            groups[g] = groups.get(g, 0) + 1
            kept.append((col[r], ti[r], pos[r], ids))
            if len(kept) == per_feature:
                break
        out[f] = kept
    return out


def test_streaming_equals_one_shot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    shards, acts = [], []
    for _ in range(3):
        texts = []
        for _ in range(5):
            n = int(torch.randint(1, 12, (1,), generator=gen))
            texts.append(torch.randint(0, 6, (n,), generator=gen).tolist())  # many repeats
        shards.append(texts)
        acts.append(torch.randn(sum(len(t) for t in texts), D, generator=gen))
    store = make_store(tmp_path / "s", shards, acts)
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=7, k=3))
    sae.reset_parameters(torch.Generator().manual_seed(1))

    def flat(
        res: dict[int, list[Span]],
    ) -> dict[int, list[tuple[float, int, int, tuple[int, ...]]]]:
        return {
            f: [(round(s.activation, 5), s.text_index, s.position, s.token_ids) for s in spans]
            for f, spans in res.items()
        }

    kw = {"per_feature": 4, "window": (3, 2), "progress": False}
    one = top_activations(sae, store, batch_size=10**6, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(topact, "MERGE_EVERY", 1)  # merge after every batch
    many = top_activations(sae, store, batch_size=3, **kw)  # type: ignore[arg-type]
    assert flat(one) == flat(many)
    big = top_activations(sae, store, batch_size=5, candidates=10**6, **kw)  # type: ignore[arg-type]
    ref = reference(sae, store, 4, (3, 2), 2)
    assert flat(big) == {
        f: [(round(v, 5), t, p, ids) for v, t, p, ids in spans] for f, spans in ref.items()
    }
    assert any(len(v) > 1 for v in ref.values())
    for spans in many.values():  # per-token activations agree with the focus value
        for s in spans:
            assert s.activations is not None
            assert s.activations[s.focus] == pytest.approx(s.activation)
            assert all(a >= 0 for a in s.activations)


def test_decoding_and_words(tmp_path: Path) -> None:
    tok = make_tokenizer()
    ids: dict[str, int] = {w: int(tok.convert_tokens_to_ids(w)) for w in WORDS}  # type: ignore[arg-type]
    text_a = [ids[w] for w in ["tell", "me", "a", "short", "story", "about", "the", "cat"]]
    text_b = [ids[w] for w in ["the", "dog", "likes", "fire"] if w in ids]
    texts = [text_a, text_b]
    plants = {(0, 7): {0: 4.0}, (1, 1): {0: 2.0}}
    store = make_store(tmp_path / "s", [texts], [planted(texts, plants)])
    spans = top_activations(
        planted_sae(), store, features=[0], window=(2, 1), tokenizer=tok, progress=False
    )[0]
    assert spans[0].text == "about the cat"
    assert spans[0].tokens == ("about", "the", "cat")
    words = topact_words(spans, tok, top_k=10)
    # cat 4; dog 2; the: 0.5*4 + 0.5*2 = 3; about is 2 tokens away; fire 0.5*2 = 1
    assert words == ["cat", "the", "dog", "fire"]
    assert topact_words(spans, tok, top_k=2) == ["cat", "the"]
    assert topact_words(spans, tok, context=0) == ["cat", "dog"]
    # sub-word pieces without a leading space join the previous word
    pieces = {1: " un", 2: "believ", 3: "able!", 4: " so"}

    class BPE:
        def decode(self, ids: list[int]) -> str:
            return "".join(pieces[i] for i in ids)

    sub = Span(0, 1.0, 0, 0, (4, 1, 2, 3), 2)
    assert topact_words([sub], BPE()) == ["unbelievable"]  # " so" is 2 away
    assert clean_word(" Hello,") == "hello" and clean_word("42") is None and clean_word("a") is None


def test_bad_inputs(basic_store: ActivationStore, tmp_path: Path) -> None:
    sae = planted_sae()
    with pytest.raises(SAEError, match=r"d_in=8.*width-6"):
        top_activations(
            SparseAutoencoder(SAEConfig(d_in=8, d_sae=4, k=2)), basic_store, progress=False
        )
    with pytest.raises(ExplainError, match="per_feature"):
        top_activations(sae, basic_store, per_feature=0, progress=False)
    for bad in [(1,), (-1, 2), (1, 2, 3), (1.5, 2)]:
        with pytest.raises(ExplainError, match="window"):
            top_activations(sae, basic_store, window=bad, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ExplainError, match="outside"):
        top_activations(sae, basic_store, features=[4], progress=False)
    with pytest.raises(ExplainError, match="empty"):
        top_activations(sae, basic_store, features=[], progress=False)
    with pytest.raises(ExplainError, match="candidates"):
        top_activations(sae, basic_store, per_feature=5, candidates=2, progress=False)
    empty = create_store(tmp_path / "empty", [torch.zeros(0, D)])
    with pytest.raises(ExplainError, match="no tokens"):
        top_activations(sae, empty, progress=False)
    bare = create_store(tmp_path / "bare", [torch.ones(3, D)])
    with pytest.raises(ExplainError, match="no token ids"):
        top_activations(sae, bare, progress=False)
    with pytest.raises(ExplainError, match="top_k"):
        topact_words([], make_tokenizer(), top_k=0)
