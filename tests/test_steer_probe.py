"""The harm probe: fitting, saving and loading it, and a gate on it (no SAE needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steerlex.core.errors import SteeringError
from steerlex.models.loading import LoadedModel
from steerlex.steer import DenseDirection, Gate, SteeredModel
from steerlex.steer.probe import LinearProbe, fit_probe, is_probe_file, load_probe

LAYER = 2


def clusters(
    seed: int = 0, n: int = 24, d: int = 32
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(d)
    shift[:4] = 3.0
    pos = [torch.randn(d, generator=g) + shift for _ in range(n)]
    neg = [torch.randn(d, generator=g) for _ in range(n)]
    return pos, neg


def test_fit_probe_separates_and_folds_the_standardisation() -> None:
    pos, neg = clusters()
    probe = fit_probe(pos, neg, layer=LAYER, model="sha256:abc", model_name="tiny")
    assert (
        probe.d_model == 32 and probe.meta["positive"] == 24 and probe.meta["model_name"] == "tiny"
    )
    # raw-space weights: held-out rows from the same clusters are scored on the right side of 0
    tpos, tneg = clusters(seed=1)
    right = sum(float(probe.scores(x)) > 0 for x in tpos) + sum(
        float(probe.scores(x)) < 0 for x in tneg
    )
    assert right >= 44  # of 48
    # the shifted coordinates carry the weight
    assert probe.weight[:4].abs().min() > probe.weight[4:].abs().max()
    # a per-position score averaged over positions is the score of the mean row
    rows = torch.stack(tpos[:5])
    assert torch.allclose(probe.scores(rows).mean(), probe.scores(rows.mean(0)), atol=1e-4)
    with pytest.raises(SteeringError, match="needs harmful and benign"):
        fit_probe(pos, [], layer=LAYER, model="m")


def test_save_load_round_trip_and_bad_files(tmp_path: Path) -> None:
    pos, neg = clusters()
    probe = fit_probe(pos, neg, layer=LAYER, model="sha256:abc", model_name="tiny")
    path = tmp_path / "gate_probe.safetensors"
    probe.save(path)
    back = load_probe(path)
    assert back == probe and back.fingerprint == probe.fingerprint
    assert torch.equal(back.weight, probe.weight) and back.meta == probe.meta
    assert is_probe_file(str(path)) and not is_probe_file("3,17,42")
    with pytest.raises(SteeringError, match="does not exist"):
        load_probe(tmp_path / "missing.safetensors")
    other = tmp_path / "sae.safetensors"
    save_file({"W_enc": torch.zeros(2, 2)}, str(other))
    with pytest.raises(SteeringError, match="is not a steerlex harm probe"):
        load_probe(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SteeringError, match="is not a steerlex harm probe"):
        load_probe(garbage)
    probe.check_for("sha256:abc", LAYER)
    with pytest.raises(SteeringError, match="fitted on layer 2 of tiny .* not layer 5"):
        probe.check_for("sha256:abc", 5)
    with pytest.raises(SteeringError, match="weights sha256:other"):
        probe.check_for("sha256:other", LAYER)
    with pytest.raises(SteeringError, match="finite vector"):
        LinearProbe(torch.tensor([1.0, float("nan")]), 0.0, LAYER, "m")


def test_probe_gate_needs_no_sae_and_takes_negative_thresholds() -> None:
    pos, neg = clusters()
    probe = fit_probe(pos, neg, layer=LAYER, model="m")
    gate = Gate((), -1.5, top_k=None, probe=probe)
    assert not gate.needs_sae and gate.threshold == -1.5 and gate.features == ()
    assert gate.describe().startswith("prompt mean >= -1.5 on harm probe ")
    gate.check(None)
    h = torch.stack([torch.stack(pos[:6]), torch.stack(neg[:6])])  # [2, 6, 32]
    mask = torch.ones(2, 6, dtype=torch.bool)
    score = gate.prompt_score(h, None, mask)
    assert torch.allclose(score, probe.scores(h).mean(dim=1))
    assert Gate((), 0.0, top_k=None, probe=probe).prompt_gate(h, None, mask).tolist() == [
        True,
        False,
    ]
    with pytest.raises(SteeringError, match="harm features or a harm probe, not both"):
        Gate((1, 2), 0.0, probe=probe)
    with pytest.raises(SteeringError, match="gate on harm features needs the SAE"):
        Gate((1, 2)).check(None)


def test_conditional_dense_direction_edits_only_rows_whose_probe_gate_opens() -> None:
    pos, neg = clusters()
    probe = fit_probe(pos, neg, layer=LAYER, model="m")
    gate = Gate((), 0.0, top_k=None, probe=probe)
    strat = DenseDirection(direction=torch.ones(32), scale=2.0, alpha=0.5, gate=gate)
    assert "gate prompt mean >= 0 on harm probe" in strat.describe()
    h = torch.stack([torch.stack(pos[:6]), torch.stack(neg[:6])])
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = strat(h, None, mask)
    assert not torch.equal(out[0], h[0]) and torch.equal(out[1], h[1])
    with pytest.raises(SteeringError, match="harm probe has width 32 but the direction 8"):
        DenseDirection(direction=torch.ones(8), gate=gate).check(None)


def test_steered_model_reports_the_probe_gate(tiny_loaded: LoadedModel) -> None:
    """On the tiny model: a probe that calls every prompt harmful opens the gate and steers;
    one that calls none harmful leaves the replies exactly as unsteered."""
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1))
    prompts = ["tell me a short story about the cat", "what is a tree"]
    plain = SteeredModel(tiny_loaded, layer=LAYER).generate(prompts, max_new_tokens=6)
    for bias, opens in ((1e3, True), (-1e3, False)):
        probe = LinearProbe(torch.zeros(32), bias, LAYER, tiny_loaded.weights_id)
        gate = Gate((), 0.0, top_k=None, probe=probe)
        strat = DenseDirection(direction=direction, scale=4.0, alpha=2.0, gate=gate)
        got = SteeredModel(tiny_loaded, None, strat, layer=LAYER).generate(
            prompts, max_new_tokens=6
        )
        for g, p in zip(got, plain, strict=True):
            assert g.report.gate_open is opens
            assert (g.token_ids == p.token_ids) is (not opens)
