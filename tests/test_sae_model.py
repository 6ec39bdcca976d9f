"""SparseAutoencoder: encode/decode contracts, the sparse decode against the dense path, options.

Per-architecture behaviour (TopK, BatchTopK, ReLU, JumpReLU, the registry) is in
test_sae_architectures.py."""

from __future__ import annotations

import pytest
import torch

from steerlex.core.errors import SAEError
from steerlex.sae import SAEConfig, SparseAutoencoder


def make(
    tied: bool = False, scale: float = 1.0, k: int = 4, apply_b_dec: bool = True
) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        SAEConfig(
            d_in=16, d_sae=64, k=k, tied=tied, norm_scale=scale, apply_b_dec_to_input=apply_b_dec
        )
    )
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    return sae


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_sparse_decode_matches_dense(tied: bool, scale: float) -> None:
    sae = make(tied, scale)
    x = torch.randn(5, 7, 16)
    dense = sae.encode(x)
    assert dense.shape == (5, 7, 64)
    assert ((dense != 0).sum(-1) <= 4).all() and (dense >= 0).all()
    values, indices = sae.encode_sparse(x)
    assert values.shape == indices.shape == (35, 4)
    torch.testing.assert_close(
        sae.decode_sparse(values, indices), sae.decode(dense).reshape(35, 16), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(sae(x), sae.decode(dense), rtol=1e-5, atol=1e-5)


def test_topk_is_reference_topk() -> None:
    sae = make()
    x = torch.randn(20, 16)
    pre = sae.pre_acts(x)
    ref = torch.zeros_like(pre)
    top = pre.topk(4, dim=-1)
    ref.scatter_(-1, top.indices, top.values.clamp_min(0))
    assert torch.equal(sae.encode(x), ref)
    # pre-activations are ((s x) - b_dec) W_enc + b_enc
    torch.testing.assert_close(pre, (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    no_bias_in = make(apply_b_dec=False)
    torch.testing.assert_close(no_bias_in.pre_acts(x), x @ no_bias_in.W_enc + no_bias_in.b_enc)


def test_tied_decoder_is_encoder_transpose() -> None:
    sae = make(tied=True)
    assert sae.W_dec_free is None
    assert torch.equal(sae.W_dec, sae.W_enc.T)
    assert {n for n, _ in sae.named_parameters()} == {"W_enc", "b_enc", "b_dec"}


@pytest.mark.parametrize("tied", [False, True])
def test_norm_scale_is_applied_in_and_undone_out(tied: bool) -> None:
    base = make(tied, 1.0)
    scaled = make(tied, 2.0)
    x = torch.randn(8, 16)
    # the scaled SAE sees 2x: same latents as the base SAE on 2x
    torch.testing.assert_close(scaled.encode(x), base.encode(2 * x))
    # decode divides by the scale
    f = scaled.encode(x)
    torch.testing.assert_close(scaled.decode(f), base.decode(f) / 2)


@pytest.mark.parametrize("tied", [False, True])
def test_folded_is_equivalent(tied: bool) -> None:
    sae = make(tied, 2.5)
    folded = sae.folded()
    x = torch.randn(30, 16) * 4
    assert folded.cfg.norm_scale == 1.0 and not folded.cfg.tied
    assert folded.cfg.extra["folded_norm_scale"] == 2.5
    torch.testing.assert_close(folded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x), sae(x), rtol=1e-5, atol=1e-5)


def test_init_has_unit_decoder_rows_and_normalize_keeps_them() -> None:
    sae = make()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    with torch.no_grad():
        sae.W_dec_free.mul_(3.0)  # type: ignore[union-attr]
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_parallel_grad_removed() -> None:
    sae = make()
    sae(torch.randn(10, 16)).pow(2).sum().backward()
    sae.remove_parallel_decoder_grad()
    g, w = sae.W_dec_free.grad, sae.W_dec_free  # type: ignore[union-attr]
    assert g is not None
    assert float((g * w).sum(1).abs().max()) < 1e-4 * float(g.abs().max())


def test_relu_and_jumprelu_encode() -> None:
    relu = SparseAutoencoder(SAEConfig(d_in=8, d_sae=12, architecture="relu"))
    x = torch.randn(4, 8)
    assert torch.equal(relu.encode(x), torch.relu(relu.pre_acts(x)))
    jump = SparseAutoencoder(SAEConfig(d_in=8, d_sae=12, architecture="jumprelu"))
    assert jump.threshold is not None
    with torch.no_grad():
        jump.threshold.fill_(0.3)
    pre = jump.pre_acts(x)
    assert torch.equal(jump.encode(x), pre * (pre > 0.3))
    with pytest.raises(SAEError, match="k=3 applies only to TopK SAEs"):
        SparseAutoencoder(SAEConfig(d_in=8, d_sae=12, k=3, architecture="relu"))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (dict(d_in=8, d_sae=12, k=13), r"k=13 is larger than d_sae=12"),
        (dict(d_in=8, d_sae=12), r"needs k >= 1"),
        (dict(d_in=8, d_sae=12, k=2, architecture="gated"), "Unknown SAE architecture 'gated'"),
        (dict(d_in=8, d_sae=12, k=2, norm_scale=0.0), "norm_scale"),
    ],
)
def test_bad_configs(cfg: dict[str, object], message: str) -> None:
    with pytest.raises(SAEError, match=message):
        SparseAutoencoder(SAEConfig(**cfg))  # type: ignore[arg-type]


def test_width_mismatch_names_both() -> None:
    sae = SparseAutoencoder(
        SAEConfig(
            d_in=896, d_sae=32, k=2, model_spec="embedded:qwen2.5-coder-0.5b-instruct", layer=8
        )
    )
    with pytest.raises(
        SAEError,
        match=r"d_in=896 \(trained on embedded:qwen2.5-coder-0.5b-instruct layer 8\).*width 576",
    ):
        sae.encode(torch.randn(2, 576))
    with pytest.raises(SAEError, match="Unknown SAE config keys"):
        SAEConfig.from_dict({"d_in": 2, "d_sae": 4, "bogus": 1})
