"""SAE evaluation: activation metrics with known answers, spliced-in LM loss, eval.json."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import SENTENCES, make_tiny_llama, make_tokenizer
from steerlex.activations import ActivationStore, HarvestOptions, harvest
from steerlex.activations import store as store_mod
from steerlex.core.errors import SAEError, SteerlexError
from steerlex.models.chat import encode_prompt
from steerlex.models.hooks import read_residual
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SAEConfig, SparseAutoencoder
from steerlex.sae.evaluate import (
    EVAL_FILE,
    FREQUENCY_FILE,
    activation_metrics,
    evaluate_sae,
    spliced_lm_loss,
)

LAYER = 1
D = 32  # tiny Llama width


@dataclass(frozen=True)
class Item:
    text: str
    id: str
    source: str = "test"


ITEMS = [Item(s, f"t{i}") for i, s in enumerate(SENTENCES)]


def perfect_sae(d: int, **cfg: object) -> SparseAutoencoder:
    """TopK SAE with latents relu(x), relu(-x) and k = d: reconstructs any x exactly."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, k=d, **cfg))  # type: ignore[arg-type]
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        assert sae.W_dec_free is not None
        sae.W_dec_free.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def random_sae(
    d: int = D, d_sae: int = 64, k: int = 4, layer: int | None = LAYER
) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=d_sae, k=k, layer=layer))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    return sae


def reference_metrics(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, float]:
    """One-shot float64 computation of the definitions."""
    with torch.no_grad():
        recon = sae(x).double()
        f = sae.encode(x)
    xd = x.double()
    err = (xd - recon).square().sum()
    var = (xd - xd.mean(0)).square().sum()
    return {
        "nmse": float(err / var),
        "l0": float((f > 0).sum(1).double().mean()),
        "n_dead": int(((f > 0).sum(0) == 0).sum()),
    }


# --- activation metrics ------------------------------------------------------------------------


def test_perfect_sae_has_nmse_zero() -> None:
    x = torch.randn(300, 8) * 3 + 5
    m = activation_metrics(perfect_sae(8), x, batch_size=64, progress=False)
    assert m["n_tokens"] == 300
    assert m["nmse"] < 1e-12
    assert m["fve"] == pytest.approx(1.0, abs=1e-12)
    json.dumps(m)  # plain JSON-able


def test_sae_that_outputs_the_mean_has_nmse_one() -> None:
    x = torch.randn(500, 8, dtype=torch.float64).float() * 2 + 10
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, k=2))
    with torch.no_grad():
        assert sae.W_dec_free is not None
        sae.W_dec_free.zero_()
        sae.b_dec.copy_(x.double().mean(0).float())
    m = activation_metrics(sae, x, batch_size=37, progress=False)
    assert m["nmse"] == pytest.approx(1.0, abs=1e-6)
    assert m["fve"] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(
        torch.tensor(m["mean_activation"], dtype=torch.float64),
        x.double().mean(0),
        rtol=0,
        atol=1e-9,
    )


def test_topk_l0_is_exactly_k_with_positive_pre_acts() -> None:
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=40, k=5, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.abs_()
        sae.b_enc.fill_(1.0)
    x = torch.rand(123, 8)
    m = activation_metrics(sae, x, batch_size=50, progress=False)
    assert m["l0"] == 5.0
    assert sum(m["firing_frequency"]) == pytest.approx(5.0)


def hand_built() -> tuple[SparseAutoencoder, torch.Tensor]:
    """ReLU SAE with latent j = relu(x_j); latents fire on 100%, 5%, 0% and 20% of tokens."""
    sae = SparseAutoencoder(SAEConfig(d_in=4, d_sae=4, architecture="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        assert sae.W_dec_free is not None
        sae.W_dec_free.copy_(torch.eye(4))
    x = -torch.ones(100, 4)
    x[:, 0] = 1
    x[:5, 1] = 2
    x[40:60, 3] = 0.5
    return sae, x


def test_dead_dense_frequency_and_histogram_on_hand_built_latents() -> None:
    sae, x = hand_built()
    m = activation_metrics(sae, x, batch_size=16, progress=False)
    assert m["firing_frequency"] == pytest.approx([1.0, 0.05, 0.0, 0.2])
    assert m["l0"] == pytest.approx(1.25)
    assert (m["n_dead"], m["dead_fraction"]) == (1, 0.25)
    assert (m["n_dense"], m["dense_fraction"]) == (2, 0.5)
    assert activation_metrics(sae, x, dense_threshold=0.5, progress=False)["n_dense"] == 1
    hist = m["firing_histogram"]
    assert len(hist["log10_edges"]) == 51 and len(hist["counts"]) == 50
    assert hist["log10_edges"][0] == -8.0 and hist["log10_edges"][-1] == 0.0
    assert hist["n_dead"] == 1 and sum(hist["counts"]) == 3
    # log10(1) = 0 -> last bin; log10(0.2) = -0.70 -> bin 45; log10(0.05) = -1.30 -> bin 41
    assert [i for i, c in enumerate(hist["counts"]) if c] == [41, 45, 49]


def test_streaming_equals_one_shot() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1000, D, generator=gen) * 0.5 + 40.0  # big mean: cancellation-prone
    sae = random_sae()
    one = activation_metrics(sae, x, batch_size=10_000, progress=False)
    streamed = activation_metrics(sae, x, batch_size=7, progress=False)

    def uneven() -> Iterator[torch.Tensor]:
        for lo, hi in [(0, 1), (1, 300), (300, 301), (301, 1000)]:
            yield x[lo:hi]

    from_iter = activation_metrics(sae, uneven(), batch_size=128, progress=False)
    ref = reference_metrics(sae, x)
    for m in (one, streamed, from_iter):
        assert m["nmse"] == pytest.approx(ref["nmse"], rel=1e-9)
        assert m["l0"] == pytest.approx(ref["l0"], rel=1e-12)
        assert m["n_dead"] == ref["n_dead"]
        assert m["firing_frequency"] == one["firing_frequency"]


def test_max_tokens_takes_the_first_tokens() -> None:
    x = torch.randn(200, D)
    sae = random_sae()
    a = activation_metrics(sae, x, max_tokens=77, batch_size=10, progress=False)
    b = activation_metrics(sae, x[:77], progress=False)
    assert a["n_tokens"] == 77
    assert a["nmse"] == pytest.approx(b["nmse"], rel=1e-6)
    c = activation_metrics(sae, iter([x[:50], x[50:]]), max_tokens=77, progress=False)
    assert c["n_tokens"] == 77 and c["nmse"] == pytest.approx(b["nmse"], rel=1e-6)


def test_non_finite_activations_say_how_many_and_where() -> None:
    x = torch.randn(40, 8)
    x[13, 2] = math.nan
    x[13, 3] = math.nan
    x[20, 0] = math.inf
    with pytest.raises(SAEError, match=r"2 NaN and 1 Inf in 2 token row\(s\).*first at row 13"):
        activation_metrics(perfect_sae(8), x, progress=False)


def test_empty_inputs_raise() -> None:
    with pytest.raises(SteerlexError, match="No activations"):
        activation_metrics(perfect_sae(8), torch.empty(0, 8), progress=False)
    with pytest.raises(SteerlexError, match="No activations"):
        activation_metrics(perfect_sae(8), iter([]), progress=False)


def test_width_mismatch_on_tensors() -> None:
    with pytest.raises(SAEError, match=r"d_in=8.*width 5"):
        activation_metrics(perfect_sae(8), torch.randn(10, 5), progress=False)


# --- with a store ------------------------------------------------------------------------------


@pytest.fixture
def store(tiny_loaded: LoadedModel, tmp_path: Path) -> ActivationStore:
    opts = HarvestOptions(layer=LAYER, batch_size=4, texts_per_shard=4)
    return harvest(tiny_loaded, ITEMS, tmp_path / "acts", opts, progress=False)


def test_store_metrics_equal_tensor_metrics(store: ActivationStore) -> None:
    sae = random_sae()
    a = activation_metrics(sae, store, batch_size=5, progress=False)
    b = activation_metrics(sae, store.activations(), progress=False)
    assert a["n_tokens"] == store.n_tokens
    assert a["nmse"] == pytest.approx(b["nmse"], rel=1e-6)
    assert a["firing_frequency"] == b["firing_frequency"]


def test_store_width_and_layer_mismatch(store: ActivationStore) -> None:
    with pytest.raises(SAEError, match=r"d_in=16.*width-32 activations of tiny:llama layer 1"):
        activation_metrics(random_sae(d=16), store, progress=False)
    with pytest.raises(SAEError, match=r"trained on layer 2.*holds layer 1"):
        activation_metrics(random_sae(layer=2), store, progress=False)


def test_store_nan_names_shard_text_and_position(
    store: ActivationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store.load_shard

    def poisoned(i: int) -> dict[str, torch.Tensor]:
        shard = real(i)
        if i == 1:
            shard["activations"][3, 0] = math.nan
        return shard

    monkeypatch.setattr(store, "load_shard", poisoned)
    shard1 = real(1)
    text, pos = int(shard1["text_index"][3]), int(shard1["position"][3])
    with pytest.raises(
        SAEError, match=rf"1 NaN and 0 Inf.*shard_00001.*text {text}, token position {pos}"
    ):
        activation_metrics(random_sae(), store, progress=False)


def test_empty_store_raises(tmp_path: Path) -> None:
    index = {"shards": [], "d_model": D, "dtype": "float32", "model": {"layer": LAYER}}
    empty = ActivationStore(tmp_path, index)
    with pytest.raises(SteerlexError, match="No activations"):
        activation_metrics(random_sae(), empty, progress=False)


# --- spliced-in LM loss ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained() -> LoadedModel:
    """A tiny Llama trained briefly on the sentences, so that ablations visibly hurt."""
    tok = make_tokenizer()
    model = make_tiny_llama(len(tok), seed=3)
    ids = [encode_prompt(tok, s, chat=True).input_ids for s in SENTENCES]
    width = max(map(len, ids))
    batch = torch.zeros(len(ids), width, dtype=torch.long)
    labels = torch.full_like(batch, -100)
    for r, seq in enumerate(ids):
        batch[r, : len(seq)] = torch.tensor(seq)
        labels[r, : len(seq)] = torch.tensor(seq)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(20):
        opt.zero_grad()
        model(
            input_ids=batch, attention_mask=(labels != -100).long(), labels=labels
        ).loss.backward()
        opt.step()
    model.eval()
    return LoadedModel(model, tok, "tiny:trained", "local", "tests", "sha256:trained", None)


def keep_mask(loaded: LoadedModel, texts: list[str], *, chat: bool, keep: str) -> torch.Tensor:
    """The [B, T] spliced-position mask of one batch holding all texts, as spliced_lm_loss builds it."""
    tok = loaded.tokenizer
    enc = [encode_prompt(tok, t, chat=chat, max_length=512) for t in texts]
    order = sorted(range(len(enc)), key=lambda j: (-len(enc[j].input_ids), j))
    mask = torch.zeros(len(enc), max(len(e.input_ids) for e in enc), dtype=torch.bool)
    for r, j in enumerate(order):
        mask[r, enc[j].keep_positions(keep, set(tok.all_special_ids))] = True  # type: ignore[arg-type]
    return mask


def test_identity_splice_recovers_everything(
    trained: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sae = random_sae()
    monkeypatch.setattr(sae, "forward", lambda x: x)
    mean = torch.randn(D)
    r = spliced_lm_loss(
        trained, sae, SENTENCES, LAYER, batch_size=3, mean_activation=mean, progress=False
    )
    assert r["ce_sae"] == r["ce_clean"]
    assert r["loss_recovered_zero"] == 100.0
    assert r["loss_recovered_mean"] == 100.0
    assert r["ce_zero"] > r["ce_clean"] + 0.1
    assert r["ce_mean"] > r["ce_clean"]
    assert r["n_texts"] == len(SENTENCES) and r["n_texts_skipped"] == 0
    json.dumps(r)


def test_clean_ce_matches_a_manual_computation(trained: LoadedModel) -> None:
    tok, model = trained.tokenizer, trained.model
    total, count = 0.0, 0
    for s in SENTENCES:
        enc = encode_prompt(tok, s, chat=True)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logits = model(ids).logits[0]
        t = torch.arange(enc.content_start, len(enc.input_ids) - 1)  # keep = no-prefix
        total += float(F.cross_entropy(logits[t], ids[0, t + 1], reduction="sum"))
        count += t.numel()
    r = spliced_lm_loss(trained, random_sae(), SENTENCES, LAYER, batch_size=4, progress=False)
    assert r["n_tokens"] == count
    assert r["ce_clean"] == pytest.approx(total / count, rel=1e-5)
    assert r["ce_mean"] is None and r["loss_recovered_mean"] is None
    # padding does not change anything: one text per batch gives the same numbers
    r1 = spliced_lm_loss(trained, random_sae(), SENTENCES, LAYER, batch_size=1, progress=False)
    for key in ("ce_clean", "ce_sae", "ce_zero"):
        assert r1[key] == pytest.approx(r[key], rel=1e-5)


@pytest.mark.parametrize(("chat", "keep"), [(True, "no-prefix"), (False, "no-bos")])
def test_only_kept_positions_are_edited(trained: LoadedModel, chat: bool, keep: str) -> None:
    texts = SENTENCES[:5]
    mean = torch.full((D,), 0.25)
    with read_residual(trained.model, LAYER) as cap:
        spliced_lm_loss(
            trained,
            random_sae(),
            texts,
            LAYER,
            chat=chat,
            keep=keep,  # type: ignore[arg-type]
            batch_size=len(texts),
            mean_activation=mean,
            progress=False,
        )
    clean, sae_out, zero, meaned = cap.values  # one batch, conditions in this order
    mask = keep_mask(trained, texts, chat=chat, keep=keep)
    assert mask.any() and (~mask).any()
    if not chat:
        assert not mask[:, 0].any()  # BOS never spliced
    for edited in (sae_out, zero, meaned):
        assert torch.equal(edited[~mask], clean[~mask])
    assert torch.equal(zero[mask], torch.zeros_like(zero[mask]))
    assert torch.equal(meaned[mask], mean.expand(int(mask.sum()), D))
    with torch.no_grad():
        torch.testing.assert_close(sae_out[mask], random_sae()(clean[mask]))


def test_spliced_bad_inputs(trained: LoadedModel) -> None:
    with pytest.raises(SAEError, match=r"d_in=16.*does not match layer 1 width 32 of tiny:trained"):
        spliced_lm_loss(trained, random_sae(d=16), SENTENCES, LAYER, progress=False)
    with pytest.raises(SAEError, match=r"trained on layer 2.*layer 1 of tiny:trained"):
        spliced_lm_loss(trained, random_sae(layer=2), SENTENCES, LAYER, progress=False)
    with pytest.raises(SAEError, match="text list is empty"):
        spliced_lm_loss(trained, random_sae(), [], LAYER, progress=False)
    with pytest.raises(SAEError, match="None of the 1 texts"):
        spliced_lm_loss(trained, random_sae(), [""], LAYER, keep="content", progress=False)
    with pytest.raises(SAEError, match="mean_activation has 3 entries"):
        spliced_lm_loss(
            trained, random_sae(), SENTENCES, LAYER, mean_activation=[0.0] * 3, progress=False
        )


# --- evaluate_sae ------------------------------------------------------------------------------


def test_evaluate_sae_writes_eval_json(
    tiny_loaded: LoadedModel, store: ActivationStore, tmp_path: Path
) -> None:
    sae = random_sae()
    out = tmp_path / "eval"
    r = evaluate_sae(sae, store.directory, out, loaded=tiny_loaded, lm_batch_size=4, progress=True)
    on_disk = json.loads((out / EVAL_FILE).read_text())
    assert on_disk["activation"]["nmse"] == r["activation"]["nmse"]
    assert "firing_frequency" not in on_disk["activation"]
    assert on_disk["activation"]["firing_histogram"]["n_dead"] == r["activation"]["n_dead"]
    assert on_disk["spliced"]["ce_clean"] == r["spliced"]["ce_clean"]
    assert on_disk["spliced"]["ce_mean"] is not None
    assert on_disk["spliced"]["keep"] == "no-prefix" and on_disk["spliced"]["chat"] is True
    assert on_disk["spliced"]["n_texts"] == len(ITEMS)
    vectors = json.loads((out / FREQUENCY_FILE).read_text())
    assert vectors["firing_frequency"] == r["activation"]["firing_frequency"]
    assert len(vectors["mean_activation"]) == D
    if on_disk["plot"] is None:
        assert "matplotlib is not installed" in on_disk["plot_note"]
        assert not (out / "firing_histogram.png").exists()
    else:
        assert (out / on_disk["plot"]).is_file()
    assert not list(out.glob(".*.tmp"))


def test_evaluate_sae_without_model_and_with_the_wrong_model(
    store: ActivationStore, trained: LoadedModel, tmp_path: Path
) -> None:
    r = evaluate_sae(random_sae(), store, tmp_path / "a", plot=False, progress=False)
    assert r["spliced"] is None and "no model" in r["spliced_note"]
    assert r["plot"] is None and r["plot_note"] == "plot turned off"
    with pytest.raises(SAEError, match=r"harvested from tiny:llama.*model given is tiny:trained"):
        evaluate_sae(random_sae(), store, tmp_path / "b", loaded=trained, progress=False)


def raw_store(directory: Path, shards: list[torch.Tensor]) -> ActivationStore:
    """A store written from raw tensors: no texts, no harvest settings, ids/positions -1."""
    directory.mkdir(parents=True)
    (directory / "texts.jsonl").write_text("")
    infos = []
    for i, acts in enumerate(shards):
        n = acts.shape[0]
        tensors = {"activations": acts.clone()}
        for key in ("token_ids", "text_index", "position"):
            tensors[key] = torch.full((n,), -1, dtype=torch.int32)
        digest = store_mod.write_shard(directory / store_mod.shard_name(i), tensors)
        infos.append(store_mod.ShardInfo(store_mod.shard_name(i), n, 0, 0, digest).to_json())
    model = {"spec": "tiny:llama", "weights_id": "unknown", "layer": LAYER}
    index = {
        "format": store_mod.FORMAT,
        "identity": {"model_spec": "tiny:llama", "weights_id": "unknown", "layer": LAYER},
        "model": model,
        "d_model": D,
        "dtype": "float32",
        "n_texts": 0,
        "n_shards": len(shards),
        "shards": infos,
        "complete": True,
    }
    store_mod.write_index(directory, index)
    return ActivationStore.open(directory)


def test_evaluate_sae_on_a_store_without_texts(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    x = torch.randn(50, D)
    x[7, 1] = math.inf
    raw = raw_store(tmp_path / "raw", [x[:20], x[20:]])
    with pytest.raises(SAEError, match=r"1 Inf.*first at row 7 of shard shard_00000") as err:
        evaluate_sae(random_sae(), raw, tmp_path / "e", progress=False)
    assert "text -1" not in str(err.value)
    x[7, 1] = 0.0
    raw2 = raw_store(tmp_path / "raw2", [x])
    r = evaluate_sae(random_sae(), raw2, tmp_path / "e2", plot=False, progress=False)
    assert r["activation"]["n_tokens"] == 50
    with pytest.raises(SAEError, match="records no texts.*pass lm_texts"):
        evaluate_sae(random_sae(), raw2, tmp_path / "e3", loaded=tiny_loaded, progress=False)
    r = evaluate_sae(
        random_sae(),
        raw2,
        tmp_path / "e4",
        loaded=tiny_loaded,
        lm_texts=SENTENCES[:3],
        plot=False,
        progress=False,
    )
    assert r["spliced"]["n_texts"] == 3
    assert any("no harvest settings" in w for w in r["warnings"])
