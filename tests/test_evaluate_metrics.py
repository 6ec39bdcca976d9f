"""Wilson intervals (hand values) and the KL helper."""

from __future__ import annotations

import pytest
import torch

from steerlex.evaluate.metrics import Rate, kl_per_position, wilson_interval


def test_wilson_interval_hand_values() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)  # z^2 / (n + z^2)
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 3.8415 / 13.8415, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_rate_text_and_json() -> None:
    r = Rate(22, 40)
    assert r.text() == "55% [40-69]"
    assert r.to_json()["rate"] == pytest.approx(0.55)
    assert Rate(0, 0).text() == "n/a" and Rate(0, 0).rate is None


def test_kl_is_zero_for_equal_and_positive_for_different_logits() -> None:
    a = torch.randn(3, 5, 11)
    assert torch.allclose(kl_per_position(a, a), torch.zeros(3, 5), atol=1e-6)
    b = a.clone()
    b[..., 0] += 3.0
    assert (kl_per_position(b, a) > 0).all()


def test_calibrate_gate_threshold() -> None:
    from steerlex.core.errors import EvalError
    from steerlex.evaluate.tuning import calibrate_gate

    # harmful 0.3, 0.5, 0.7; benign 0.1, 0.2, 0.4: t = 0.5 gives TPR 2/3, FPR 0 (J = 2/3);
    # t = 0.3 gives TPR 1, FPR 1/3 (J = 2/3): the tie goes to the higher threshold.
    t, j = calibrate_gate([0.3, 0.5, 0.7], [0.1, 0.2, 0.4])
    assert t == 0.5 and j == pytest.approx(2 / 3)
    t, j = calibrate_gate([0.9], [0.1])
    assert t == 0.9 and j == 1.0
    with pytest.raises(EvalError, match="harmful and benign"):
        calibrate_gate([], [0.1])


def test_the_printed_estimate_uses_the_model_dtypes_rates() -> None:
    from steerlex.evaluate.plan import Estimate

    def est(dtype: str) -> Estimate:
        return Estimate(0, 300, 0, 0, prompt_tokens=60_000, max_new_tokens=32, dtype=dtype)

    fp32, bf16 = est("float32"), est("bfloat16")
    assert bf16.minutes < fp32.minutes / 1.5
    assert est("float16").rates == fp32.rates  # no measured rates: float32's
    plan = type("Plan", (), {"defences": [], "conditions": {}})()
    assert "in bfloat16" in bf16.message(plan, "cache") and "in float32" in fp32.message(plan, "c")
