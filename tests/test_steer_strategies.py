"""Steering strategies as pure functions of (h, SAE, features, params, mask)."""

from __future__ import annotations

import math

import pytest
import torch

from steerlex.core.errors import SteeringError
from steerlex.sae.base import SAEConfig, SparseAutoencoder
from steerlex.steer.strategies import (
    Ablate,
    Amplification,
    Calibration,
    Clamp,
    DenseDirection,
    Gate,
    feature_pre_acts,
    make_strategy,
)

D = 32


def random_sae(
    d_sae: int = 64, k: int = 8, seed: int = 0, norm_scale: float = 1.0
) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=d_sae, k=k, norm_scale=norm_scale))
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 2))
    return sae


def orthonormal_sae(d_sae: int = 16) -> SparseAutoencoder:
    """A tied SAE with orthonormal decoder rows and k = d_sae: encode(decode(a)) == a for a >= 0."""
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=d_sae, k=d_sae, tied=True))
    q, _ = torch.linalg.qr(torch.randn(D, d_sae, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        sae.W_enc.copy_(q)
    return sae


def hidden(b: int = 3, t: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, D, generator=torch.Generator().manual_seed(seed)) * 3


def full_mask(h: torch.Tensor) -> torch.Tensor:
    return torch.ones(h.shape[:2], dtype=torch.bool)


# --- shared promises ------------------------------------------------------------------------------


ALL = [
    Amplification((1, 5), alpha=4.0),
    Amplification((1, 5), alpha=4.0, keep_norm=True),
    Calibration((1, 5, 9)),
    Clamp((2, 3), value=1.5),
    Ablate((2, 3)),
    Amplification((1,), alpha=3.0, gate=Gate((7,), threshold=0.0, mode="token")),
    Calibration((1,), gate=Gate((7,), threshold=0.0, mode="prompt")),
]


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.describe())
def test_masked_positions_are_bit_identical(strategy: object) -> None:
    sae = random_sae()
    h = hidden()
    h[0, 0] *= 100  # a massive template activation
    mask = full_mask(h)
    mask[0, :2] = False  # template prefix
    mask[1, :3] = False  # left padding
    out = strategy(h, sae, mask)  # type: ignore[operator]
    assert out.shape == h.shape and out.dtype == h.dtype
    assert torch.equal(out[~mask], h[~mask])
    assert not torch.equal(out[mask], h[mask])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("strategy", ALL[:5], ids=lambda s: s.describe())
def test_strategies_keep_bfloat16_and_mask(strategy: object) -> None:
    sae = random_sae()
    h = hidden().to(torch.bfloat16)
    mask = full_mask(h)
    mask[:, 0] = False
    out = strategy(h, sae, mask)  # type: ignore[operator]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:, 0], h[:, 0])


def test_feature_pre_acts_match_the_sae() -> None:
    sae = random_sae(norm_scale=1.7)
    h = hidden()
    torch.testing.assert_close(feature_pre_acts(sae, h, [4, 0, 9]), sae.pre_acts(h)[..., [4, 0, 9]])


# --- Amplification --------------------------------------------------------------------------------


def test_amplification_adds_unit_directions() -> None:
    sae = random_sae(norm_scale=2.0)
    h = hidden()
    out = Amplification((1, 5), alpha=2.0, weights=(1.0, 0.5))(h, sae, full_mask(h))
    d = sae.W_dec[[1, 5]]
    d = d / d.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, h + 2.0 * (d[0] + 0.5 * d[1]))


def test_amplification_alpha_zero_is_identity() -> None:
    sae = random_sae()
    h = hidden()
    for keep in (False, True):
        assert torch.equal(Amplification((1,), alpha=0.0, keep_norm=keep)(h, sae, full_mask(h)), h)


def test_amplification_keep_norm() -> None:
    sae = random_sae()
    h = hidden()
    out = Amplification((1, 2), alpha=5.0, keep_norm=True)(h, sae, full_mask(h))
    torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1))
    assert not torch.allclose(out, h)


def test_amplification_raises_selected_activations() -> None:
    sae = random_sae()
    h = hidden()
    feats = (3, 11)
    out = Amplification(feats, alpha=3.0)(h, sae, full_mask(h))
    assert (feature_pre_acts(sae, out, feats) > feature_pre_acts(sae, h, feats)).all()


# --- Calibration ----------------------------------------------------------------------------------


def test_calibration_matches_the_authors_rule() -> None:
    sae = random_sae(norm_scale=1.5)
    h = hidden()
    feats = [1, 5, 9]
    m = 2.5
    out = Calibration(tuple(feats), target=m)(h, sae, full_mask(h))
    a = sae.pre_acts(h)[..., feats]
    v = torch.relu(m - torch.relu(a))
    rows = sae.W_dec[feats] / sae.cfg.norm_scale
    total = v.sum(-1, keepdim=True)
    tilde = h + m * (v / total) @ rows
    expected = tilde * h.norm(dim=-1, keepdim=True) / tilde.norm(dim=-1, keepdim=True)
    expected = torch.where(total > 0, expected, h)  # sum v = 0: already at m, left alone
    torch.testing.assert_close(out, expected)


def test_calibration_is_a_noop_when_every_feature_reaches_target() -> None:
    sae = random_sae()
    with torch.no_grad():
        sae.b_enc[[2, 4]] = 100.0  # both features far above m everywhere
    h = hidden()
    out = Calibration((2, 4), target=2.5)(h, sae, full_mask(h))
    assert torch.equal(out, h)
    assert torch.isfinite(out).all()


def test_calibration_partial_noop_has_no_nan() -> None:
    sae = random_sae()
    h = hidden()
    with torch.no_grad():
        sae.b_enc[2] = 100.0
    h[0, 0] = 0.0  # a zero vector: keep_norm must not divide by zero
    out = Calibration((2,), target=1.0)(h, sae, full_mask(h))
    assert torch.equal(out, h)
    out = Calibration((2, 3), target=1.0)(h, sae, full_mask(h))
    assert torch.isfinite(out).all()


# --- Clamp / Ablate -------------------------------------------------------------------------------


def test_clamp_sets_the_activation() -> None:
    sae = orthonormal_sae()
    a = torch.rand(2, 4, sae.d_sae, generator=torch.Generator().manual_seed(0)) * 3
    h = sae.decode(a) + 0.0
    out = Clamp((2, 7), value=5.0)(h, sae, full_mask(h))
    got = sae.encode(out)
    torch.testing.assert_close(got[..., [2, 7]], torch.full((2, 4, 2), 5.0))
    others = [i for i in range(sae.d_sae) if i not in (2, 7)]
    torch.testing.assert_close(got[..., others], a[..., others])


def test_ablate_zeroes_the_activation_and_keeps_the_error() -> None:
    sae = orthonormal_sae()
    a = torch.rand(2, 4, sae.d_sae, generator=torch.Generator().manual_seed(0)) + 0.5
    err = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(1)) * 0.01
    h = sae.decode(a) + err
    out = Ablate((2,))(h, sae, full_mask(h))
    assert torch.allclose(sae.encode(out)[..., 2], torch.zeros(2, 4), atol=1e-5)
    # out - h is exactly decode(edited) - decode(original): the reconstruction error survives
    orig = sae.encode(h)
    edited = orig.clone()
    edited[..., 2] = 0
    torch.testing.assert_close(out - h, sae.decode(edited) - sae.decode(orig))


def test_clamp_uses_topk_activation() -> None:
    sae = random_sae(k=2)
    h = hidden()
    out = Clamp((5,), value=0.0)(h, sae, full_mask(h))
    a5 = sae.encode(h)[..., 5]
    expected = h - a5[..., None] * sae.W_dec[5]
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[a5 == 0], h[a5 == 0])  # not in the top k: nothing to remove


# --- DenseDirection (no SAE) ---------------------------------------------------------------------


def test_dense_direction_adds_a_scaled_unit_vector_without_an_sae() -> None:
    h = hidden()
    direction = torch.randn(D, generator=torch.Generator().manual_seed(5)) * 7
    strategy = DenseDirection(direction=direction, scale=2.0, alpha=0.5)
    assert strategy.features == () and strategy.gate is None and not strategy.needs_sae
    mask = full_mask(h)
    mask[0, :2] = False
    out = strategy(h, None, mask)
    unit = direction / direction.norm()
    torch.testing.assert_close(out[mask], h[mask] + 0.5 * 2.0 * unit)
    assert torch.equal(out[~mask], h[~mask])
    assert torch.equal(strategy.with_strength(0.0)(h, None, mask), h)
    assert strategy.with_strength(1.5).strength == 1.5
    bf = strategy(h.to(torch.bfloat16), None, mask)
    assert bf.dtype == torch.bfloat16
    # an SAE, when given, only has to agree on the width
    torch.testing.assert_close(strategy(h, random_sae(), mask), out)


def test_dense_direction_checks_its_width() -> None:
    strategy = DenseDirection(direction=torch.ones(D), alpha=1.0)
    strategy.check(None, D)
    with pytest.raises(SteeringError, match=f"width {D} but the layer has 8"):
        strategy.check(None, 8)
    with pytest.raises(SteeringError, match="direction's width"):
        strategy(torch.zeros(1, 2, 8), None, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(SteeringError, match="zero"):
        DenseDirection(direction=torch.zeros(D))
    with pytest.raises(SteeringError, match="1-d"):
        DenseDirection(direction=torch.ones(2, D))


def test_sae_strategies_need_an_sae() -> None:
    h = hidden()
    for strategy in (Amplification((1,), alpha=1.0), Calibration((1,)), Ablate((1,))):
        assert strategy.needs_sae
        with pytest.raises(SteeringError, match="needs the SAE"):
            strategy(h, None, full_mask(h))
        with pytest.raises(SteeringError, match="needs the SAE"):
            strategy.check(None)


# --- the gate -------------------------------------------------------------------------------------


def test_prompt_gate_opens_only_above_threshold() -> None:
    sae = random_sae()
    h = hidden()
    cond = Gate((7, 8), threshold=0.5, mode="prompt")
    strategy = Amplification((1,), alpha=3.0, gate=cond)
    with torch.no_grad():
        sae.b_enc[[7, 8]] = -100.0
    assert torch.equal(strategy(h, sae, full_mask(h)), h)
    with torch.no_grad():
        sae.b_enc[[7, 8]] = 100.0
    out = strategy(h, sae, full_mask(h))
    assert not torch.equal(out, h)
    # an explicit decision overrides: closed for row 0 only
    gate = torch.tensor([False, True, True])
    out = strategy(h, sae, full_mask(h), gate_open=gate)
    assert torch.equal(out[0], h[0]) and not torch.equal(out[1], h[1])


def test_prompt_gate_reads_only_editable_positions() -> None:
    sae = random_sae()
    cond = Gate((7,), threshold=1.0, mode="prompt")
    h = torch.zeros(1, 4, D)
    direction = sae.W_enc[:, 7] / sae.W_enc[:, 7].norm()
    h[0, 0] = 500 * direction  # a massive template position: would open the gate
    mask = torch.tensor([[False, True, True, True]])
    assert not bool(cond.prompt_gate(h, sae, mask)[0])
    assert bool(cond.prompt_gate(h, sae, torch.ones(1, 4, dtype=torch.bool))[0])


def test_prompt_gate_pools_the_top_positions_so_one_request_in_a_long_template_counts() -> None:
    sae = random_sae()
    with torch.no_grad():
        sae.b_enc[7] = -30.0
    direction = sae.W_enc[:, 7] / sae.W_enc[:, 7].norm()
    h = torch.zeros(2, 40, D)
    h[:, 30:34] = 100 * direction  # a short request inside a 40-position template
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 32:] = False  # row 1 sees only two of the four request positions
    s = torch.relu(feature_pre_acts(sae, h, [7])).mean(-1)
    top = Gate((7,), threshold=1.0).prompt_score(h, sae, mask)
    assert torch.allclose(top[0], s[0, 30:34].sum() / 8)  # top 8: 4 request + 4 zero positions
    assert torch.allclose(top[1], s[1, 30:32].sum() / 8)
    mean = Gate((7,), threshold=1.0, top_k=None).prompt_score(h, sae, mask)
    assert torch.allclose(mean[0], s[0].mean()) and float(top[0]) > 4 * float(mean[0])
    few = Gate((7,), top_k=8).prompt_score(h[:, :3], sae, torch.tensor([[True, True, False]] * 2))
    assert torch.allclose(few, s[:, :2].mean(1))  # fewer editable positions than k: all of them
    assert float(Gate((7,)).prompt_score(h, sae, torch.zeros(2, 40, dtype=torch.bool))[0]) == 0
    for bad in (0, -2, True):
        with pytest.raises(SteeringError, match="top_k"):
            Gate((7,), top_k=bad)


def test_token_gate_per_position() -> None:
    sae = random_sae()
    with torch.no_grad():
        sae.b_enc[7] = -30.0
    cond = Gate((7,), threshold=0.1, mode="token")
    h = hidden(1, 4)
    direction = sae.W_enc[:, 7] / sae.W_enc[:, 7].norm()
    h[0, 2] += 100 * direction
    out = Amplification((1,), alpha=2.0, gate=cond)(h, sae, full_mask(h))
    changed = (out != h).any(-1)[0].tolist()
    assert changed == [False, False, True, False]


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Amplification((), alpha=1.0), "empty"),
        (lambda: Amplification((1, 1), alpha=1.0), "more than once"),
        (lambda: Amplification((-1,), alpha=1.0), "negative"),
        (lambda: Amplification((1.5,), alpha=1.0), "integer"),  # type: ignore[arg-type]
        (lambda: Amplification("12", alpha=1.0), "string"),  # type: ignore[arg-type]
        (lambda: Amplification((1,), alpha=math.nan), "finite"),
        (lambda: Amplification((1,), alpha=math.inf), "finite"),
        (lambda: Amplification((1, 2), weights=(1.0,)), "one weight per feature"),
        (lambda: Calibration((1,), target=0.0), "> 0"),
        (lambda: Calibration((1,), target=-1.0), "> 0"),
        (lambda: Clamp((1,), value=math.nan), "finite"),
        (lambda: Gate((1,), threshold=-0.1), ">= 0"),
        (lambda: Gate((), threshold=0.1), "empty"),
        (lambda: Gate((1,), mode="sometimes"), "gate mode"),  # type: ignore[arg-type]
        (lambda: make_strategy("boost", [1]), "unknown strategy"),
        (lambda: make_strategy("clamp", [1], alpha=2.0), "does not take alpha"),
        (lambda: Ablate((1,), value=2.0), "Clamp"),
    ],
)
def test_bad_parameters(build: object, message: str) -> None:
    with pytest.raises(SteeringError, match=message):
        build()  # type: ignore[operator]


def test_feature_out_of_range_names_the_sae() -> None:
    sae = random_sae(d_sae=64)
    h = hidden()
    with pytest.raises(SteeringError, match=r"\[64\].*d_sae=64"):
        Amplification((1, 64), alpha=1.0)(h, sae, full_mask(h))
    with pytest.raises(SteeringError, match="harm features"):
        Calibration((1,), gate=Gate((99,)))(h, sae, full_mask(h))


def test_bad_shapes() -> None:
    sae = random_sae()
    h = hidden()
    with pytest.raises(SteeringError, match="mask"):
        Amplification((1,), alpha=1.0)(h, sae, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(SteeringError, match="d_in"):
        Amplification((1,), alpha=1.0)(torch.zeros(3, 5, 8), sae, full_mask(h))


def test_make_strategy_and_strength() -> None:
    s = make_strategy("calibrate", [1, 2], target=3.0, gate=Gate((4,)))
    assert isinstance(s, Calibration) and s.target == 3.0 and s.gate is not None
    assert s.with_strength(1.0).strength == 1.0
    assert "gate prompt top-8 >= 0.1" in s.describe()
    assert make_strategy("amplify", [1]).strength == 1.0
    assert isinstance(make_strategy("ablate", [1]), Ablate)
