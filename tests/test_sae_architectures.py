"""The SAE architectures: each class against its dense math, the sparse form, the registry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from steerlex.core.errors import SAEError
from steerlex.sae import SAEConfig, SparseAutoencoder, load_sae, save_sae
from steerlex.sae.architectures import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE
from steerlex.sae.architectures.batchtopk import THRESHOLD_LR
from steerlex.sae.base import SAE_ARCHITECTURES, pack_latents, trainable_architectures
from steerlex.sae.formats import SAELENS_CFG

D_IN, D_SAE, K = 12, 40, 5
ALL = ("topk", "batchtopk", "relu", "jumprelu")


def make(architecture: str, *, tied: bool = False, scale: float = 1.0) -> SparseAutoencoder:
    """An SAE with random weights; JumpReLU gets thresholds around the median pre-activation."""
    torch.manual_seed(0)
    k = K if SAE_ARCHITECTURES.get(architecture).uses_k else None
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, k=k, architecture=architecture, tied=tied)
    cfg.norm_scale = scale
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.4)
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.2)
        if sae.W_dec_free is not None:
            sae.W_dec_free.normal_(0, 0.3)
        for name in sae.latent_tensors:
            getattr(sae, name).uniform_(0.2, 0.8)
    return sae


def reference(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    """Each architecture's latents written out from the pre-activations, [N, d_sae]."""
    pre = sae.pre_acts(x)
    if isinstance(sae, TopKSAE):
        top = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
    if isinstance(sae, BatchTopKSAE):
        flat = F.relu(pre).flatten()
        top = flat.topk(K * pre.shape[0])
        return torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(pre.shape)
    if isinstance(sae, JumpReLUSAE):
        return F.relu(pre) * (pre > sae.threshold)
    assert isinstance(sae, ReLUSAE)
    return F.relu(pre)


@pytest.fixture(params=ALL)
def any_sae(request: pytest.FixtureRequest) -> Iterator[SparseAutoencoder]:
    yield make(request.param, tied=False, scale=1.7)


def test_registry_builds_each_class() -> None:
    assert set(ALL) <= set(SAE_ARCHITECTURES.names())
    assert trainable_architectures() == ("topk", "batchtopk")
    classes = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "relu": ReLUSAE, "jumprelu": JumpReLUSAE}
    for name, cls in classes.items():
        sae = make(name)
        assert type(sae) is cls and sae.cfg.architecture == name == cls.name
        assert isinstance(sae, SparseAutoencoder)


def test_unknown_architecture_and_mismatched_class() -> None:
    with pytest.raises(SAEError, match=r"Unknown SAE architecture 'gated'; choose one of topk, "):
        SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, architecture="gated"))
    with pytest.raises(SAEError, match=r"JumpReLUSAE is the 'jumprelu' architecture.*'relu'"):
        JumpReLUSAE(SAEConfig(d_in=4, d_sae=8, architecture="relu"))
    with pytest.raises(SAEError, match=r"A BatchTopK SAE needs k >= 1"):
        SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, architecture="batchtopk"))
    with pytest.raises(SAEError, match=r"k=2 applies only to TopK SAEs.*JumpReLU SAE has no k"):
        SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, k=2, architecture="jumprelu"))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("architecture", ALL)
def test_encode_matches_dense_math(architecture: str, tied: bool) -> None:
    sae = make(architecture, tied=tied, scale=2.0)
    x = torch.randn(30, D_IN)
    with torch.no_grad():
        dense = sae.encode(x)
        torch.testing.assert_close(dense, reference(sae, x))
        assert bool((dense >= 0).all()) and bool((dense > 0).any())
        torch.testing.assert_close(sae(x), sae.decode(dense), rtol=1e-5, atol=1e-5)


def test_encode_sparse_and_decode_sparse_agree_with_dense(any_sae: SparseAutoencoder) -> None:
    x = torch.randn(3, 10, D_IN)
    with torch.no_grad():
        dense = any_sae.encode(x.reshape(30, D_IN))
        values, indices = any_sae.encode_sparse(x)
        assert values.shape == indices.shape and values.shape[0] == 30
        assert bool((values >= 0).all())
        counts = (dense > 0).sum(-1)
        if isinstance(any_sae, TopKSAE):
            assert values.shape[1] == K
        else:  # packed to the batch's largest count, padded with zero-valued latents
            assert values.shape[1] == int(counts.max())
        assert all(len(set(row)) == len(row) for row in indices.tolist())
        rebuilt = torch.zeros_like(dense).scatter(-1, indices, values)
        torch.testing.assert_close(rebuilt, dense)
        torch.testing.assert_close(
            any_sae.decode_sparse(values, indices), any_sae.decode(dense), rtol=1e-5, atol=1e-5
        )


def test_pack_latents_pads_and_keeps_gradients() -> None:
    f = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    f.requires_grad_(True)
    values, indices = pack_latents(f)
    assert values.shape == (3, 2)
    assert sorted(zip(values[0].tolist(), indices[0].tolist(), strict=True)) == [(1.0, 3), (2.0, 1)]
    assert values[1].tolist() == [0.0, 0.0] and len(set(indices[1].tolist())) == 2
    values.sum().backward()
    assert f.grad is not None and f.grad.sum() == 6  # every entry reaches f


def test_folded_keeps_architecture_and_outputs(any_sae: SparseAutoencoder) -> None:
    folded = any_sae.folded()
    assert type(folded) is type(any_sae) and folded.cfg.norm_scale == 1.0
    x = torch.randn(16, D_IN) * 3
    with torch.no_grad():
        torch.testing.assert_close(folded.encode(x), any_sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded(x), any_sae(x), rtol=1e-5, atol=1e-5)


# --- BatchTopK ---------------------------------------------------------------------------------


def test_batchtopk_selects_per_stream_block() -> None:
    sae = make("batchtopk")
    pre = torch.randn(8, D_SAE)
    values, indices = sae.training_codes(pre, 3, groups=2)
    dense = torch.zeros_like(pre).scatter_add(-1, indices, values)
    halves = []
    for block in pre.split(4):
        v, i = sae.training_codes(block, 3)
        halves.append(torch.zeros_like(block).scatter_add(-1, i, v))
    torch.testing.assert_close(dense, torch.cat(halves))
    for half in dense.split(4):
        assert int((half > 0).sum()) == 3 * 4  # k per token on average, per block
    with pytest.raises(SAEError, match="cannot be split into 3"):
        sae.training_codes(pre, 3, groups=3)


@pytest.mark.parametrize("seed", range(6))
def test_batchtopk_candidate_search_equals_a_search_of_the_whole_block(seed: int) -> None:
    sae = make("batchtopk")
    assert isinstance(sae, BatchTopKSAE)
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(16, D_SAE, generator=g) * 2 - seed % 3
    if seed % 2:
        pre[3] += 10.0  # one token wants more latents than its candidates: full search
    values, indices = sae.training_codes(pre, 2, groups=2)
    ref_v, ref_i = sae._block_codes(F.relu(pre), 2 * 8, 2)
    dense = torch.zeros_like(pre).scatter(-1, indices, values)
    torch.testing.assert_close(dense, torch.zeros_like(pre).scatter(-1, ref_i, ref_v))
    assert all(len(set(row)) == len(row) for row in indices.tolist())


def test_batchtopk_threshold_is_bias_corrected_running_minimum() -> None:
    sae = make("batchtopk")
    assert isinstance(sae, BatchTopKSAE)
    assert sae.inference_threshold() == 0.0
    seen = [0.5, 0.7, 0.6]
    for m in seen:
        codes = torch.tensor([[0.0, m, m + 1.0], [2.0, 0.0, 0.0]])
        sae.observe_training_codes(codes, lambda t: t)
    ema = 0.0
    for m in seen:
        ema = (1 - THRESHOLD_LR) * ema + THRESHOLD_LR * m
    expected = ema / (1 - (1 - THRESHOLD_LR) ** len(seen))
    assert sae.inference_threshold() == pytest.approx(expected)
    assert 0.5 < expected < 0.7  # a weighted mean of the minima, not pulled towards 0
    sae.observe_training_codes(torch.zeros(2, 3), lambda t: t)  # nothing positive: no update
    assert int(sae.threshold_updates) == 3


def test_batchtopk_for_inference_is_jumprelu(tmp_path: Path) -> None:
    sae = make("batchtopk", scale=2.5)
    assert isinstance(sae, BatchTopKSAE)
    sae.observe_training_codes(torch.tensor([[0.4, 0.9]]), lambda t: t)
    jump = sae.for_inference()
    assert isinstance(jump, JumpReLUSAE) and jump.cfg.k is None
    assert jump.cfg.extra["training_architecture"] == "batchtopk"
    assert jump.cfg.extra["training_k"] == K
    torch.testing.assert_close(jump.threshold, torch.full((D_SAE,), 0.4))
    x = torch.randn(20, D_IN)
    pre = sae.pre_acts(x)
    with torch.no_grad():
        torch.testing.assert_close(jump.encode(x), F.relu(pre) * (pre > 0.4))
    out = save_sae(sae, tmp_path / "sae")  # saved in its inference form
    cfg = json.loads((out / SAELENS_CFG).read_text())
    assert cfg["architecture"] == "jumprelu" and "k" not in cfg
    assert cfg["metadata"]["training_architecture"] == "batchtopk"
    loaded = load_sae(out)
    assert isinstance(loaded, JumpReLUSAE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), jump.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), jump(x), rtol=1e-5, atol=1e-5)


def test_untrainable_architecture_says_which_are() -> None:
    with pytest.raises(SAEError, match=r"cannot train ReLU SAEs; train one of topk, batchtopk"):
        make("relu").training_codes(torch.randn(2, D_SAE), 2)


# --- a new architecture is one registered class ------------------------------------------------


class AbsTopK(SparseAutoencoder):
    """A toy architecture: the k latents of largest |pre|, kept with their magnitude."""

    name = "abs-topk-test"
    title = "AbsTopK (test)"
    saelens_architecture = "abs-topk-test"
    saelens_keys = ("k",)
    uses_k = True

    def activation(self, pre: Tensor) -> Tensor:
        top = pre.abs().topk(int(self.cfg.k or 0), dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


@pytest.fixture
def toy_architecture() -> Iterator[None]:
    SAE_ARCHITECTURES.add(AbsTopK.name, AbsTopK)
    yield
    SAE_ARCHITECTURES.remove(AbsTopK.name)


@pytest.mark.usefixtures("toy_architecture")
def test_registered_architecture_works_everywhere(tmp_path: Path) -> None:
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, architecture=AbsTopK.name))
    assert type(sae) is AbsTopK
    sae.reset_parameters(torch.Generator().manual_seed(1))
    x = torch.randn(6, D_IN)
    out = save_sae(sae, tmp_path / "toy")
    cfg = json.loads((out / SAELENS_CFG).read_text())
    assert (cfg["architecture"], cfg["k"]) == ("abs-topk-test", 3)
    loaded = load_sae(out)
    assert type(loaded) is AbsTopK
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-5)
        values, _ = loaded.encode_sparse(x)
        assert values.shape[1] == 3
