"""A JumpReLU SAE saved by the real ``sae_lens`` package (Gemma Scope's layout) for the tiny
Llama, through every stage that uses an SAE: TopAct, feature statistics, activation
metrics and eval-sae, and steering with Calibration and Clamp. SAEs of non-residual hooks
load and convert but are refused for residual-stream use."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import SENTENCES
from steerlex.activations import ActivationStore, HarvestOptions, harvest
from steerlex.core.errors import SAEError
from steerlex.explain.topact import top_activations
from steerlex.models.loading import LoadedModel
from steerlex.report.features import feature_stats, token_decoder
from steerlex.sae import check_sae_fits, convert_sae, load_sae
from steerlex.sae.architectures import JumpReLUSAE
from steerlex.sae.evaluate import activation_metrics, evaluate_sae
from steerlex.steer import Calibration, Clamp, SteeredModel

sae_lens = pytest.importorskip("sae_lens")

LAYER = 1
D, D_SAE = 32, 48


@dataclass(frozen=True)
class Item:
    text: str
    id: str
    source: str = "test"


@pytest.fixture
def store(tiny_loaded: LoadedModel, tmp_path: Path) -> ActivationStore:
    items = [Item(s, f"t{i}") for i, s in enumerate(SENTENCES)]
    opts = HarvestOptions(layer=LAYER, batch_size=4, texts_per_shard=4)
    return harvest(tiny_loaded, items, tmp_path / "acts", opts, progress=False)


def write_saelens_jumprelu(
    directory: Path, acts: torch.Tensor, hook: str = f"blocks.{LAYER}.hook_resid_post"
) -> Any:
    """A random JumpReLU SAE saved by sae_lens with Gemma Scope-like metadata; each latent's
    threshold is its 80th-percentile pre-activation on ``acts``, so it fires on ~20%."""
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(
        model_name="tiny:llama",
        hook_name=hook,
        hook_head_index=None,
        prepend_bos=True,
        context_size=1024,
        dataset_path="monology/pile-uncopyrighted",
        neuronpedia_id=None,
    )
    sl = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=D_SAE, metadata=meta))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sl.W_enc.copy_(torch.randn(D, D_SAE, generator=g) / D**0.5)
        sl.W_dec.copy_(torch.randn(D_SAE, D, generator=g) / D**0.5)
        sl.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        sl.b_dec.copy_(acts.mean(0))
        pre = (acts - sl.b_dec) @ sl.W_enc + sl.b_enc
        sl.threshold.copy_(torch.quantile(pre, 0.8, dim=0).clamp_min(0.01))
    sl.save_model(str(directory))
    return sl


@pytest.fixture
def gemma_style(store: ActivationStore, tmp_path: Path) -> tuple[JumpReLUSAE, Any]:
    sl = write_saelens_jumprelu(tmp_path / "sl", store.activations())
    sae = load_sae(tmp_path / "sl")
    assert isinstance(sae, JumpReLUSAE)
    return sae, sl


def test_loads_as_jumprelu_with_saelens_outputs(
    gemma_style: tuple[JumpReLUSAE, Any], store: ActivationStore
) -> None:
    sae, sl = gemma_style
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.layer) == ("jumprelu", None, LAYER)
    assert sae.cfg.extra["hook_kind"] == "hook_resid_post"
    x = store.activations()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), sl.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), sl.decode(sl.encode(x)), rtol=1e-5, atol=1e-5)


def test_topact_and_feature_stats(
    gemma_style: tuple[JumpReLUSAE, Any], store: ActivationStore, tiny_loaded: LoadedModel
) -> None:
    sae, _ = gemma_style
    with torch.no_grad():
        dense = sae.encode(store.activations())
    spans = top_activations(
        sae, store, per_feature=3, tokenizer=tiny_loaded.tokenizer, progress=False
    )
    fired = [f for f in range(D_SAE) if bool((dense[:, f] > 0).any())]
    assert len(fired) > D_SAE // 2
    for f in range(D_SAE):
        assert bool(spans[f]) == (f in fired)
        if spans[f]:
            best = spans[f][0]
            assert best.activation == pytest.approx(float(dense[:, f].max()), rel=1e-5)
            assert best.activations is not None
            assert best.activations[best.focus] == pytest.approx(best.activation, rel=1e-5)
    stats = feature_stats(sae, store, token_decoder(tiny_loaded.tokenizer), progress=False)
    assert stats["sae"]["architecture"] == "jumprelu"
    counts = (dense > 0).sum(0).tolist()
    assert [rec["count"] for rec in stats["features"]] == counts
    maxima = [rec["max"] for rec in stats["features"]]
    torch.testing.assert_close(torch.tensor(maxima), dense.max(0).values, rtol=1e-4, atol=1e-6)


def test_activation_metrics_and_eval_sae(
    gemma_style: tuple[JumpReLUSAE, Any],
    store: ActivationStore,
    tiny_loaded: LoadedModel,
    tmp_path: Path,
) -> None:
    sae, sl = gemma_style
    x = store.activations()
    with torch.no_grad():
        dense = sae.encode(x)
        recon = sl.decode(sl.encode(x))
    m = activation_metrics(sae, store, batch_size=7, progress=False)
    assert m["l0"] == pytest.approx(float((dense > 0).sum(-1).float().mean()))
    nmse = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert m["nmse"] == pytest.approx(nmse, rel=1e-4)
    assert (m["architecture"], m["k"]) == ("jumprelu", None)
    result = evaluate_sae(sae, store, tmp_path / "eval", loaded=tiny_loaded, plot=False)
    assert result["activation"]["l0"] == pytest.approx(m["l0"])
    spliced = result["spliced"]
    assert spliced["n_tokens"] > 0 and spliced["loss_recovered_zero"] is not None


def test_steering_with_calibration_and_clamp(
    gemma_style: tuple[JumpReLUSAE, Any], tiny_loaded: LoadedModel
) -> None:
    sae, _ = gemma_style
    features = (0, 5, 9)
    steered = SteeredModel(tiny_loaded, sae, Calibration(features, target=50.0))
    plain = SteeredModel(tiny_loaded, sae, Calibration(features, target=50.0))
    plain.enabled = False
    prompts = ["tell me a short story about the cat", "what is a tree"]
    out = steered.generate(prompts, max_new_tokens=4)
    base = plain.generate(prompts, max_new_tokens=4)
    assert all(r.report.edited_prompt_positions > 0 for r in out)
    assert all(r.report.edited_prompt_positions == 0 for r in base)
    clamp = SteeredModel(tiny_loaded, sae, Clamp(features, value=0.0))
    assert len(clamp.generate(prompts[:1], max_new_tokens=2)[0].token_ids) >= 1


# --- SAEs of other hooks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook", "kind"),
    [
        (f"blocks.{LAYER}.hook_mlp_out", "hook_mlp_out"),
        (f"blocks.{LAYER}.hook_resid_mid", "hook_resid_mid"),
        (f"blocks.{LAYER}.attn.hook_z", "attn.hook_z"),
        ("hook_embed", "hook_embed"),
        ("blocks.0.hook_resid_pre", "hook_resid_pre"),
    ],
)
def test_non_residual_hooks_load_but_are_refused(
    hook: str, kind: str, store: ActivationStore, tiny_loaded: LoadedModel, tmp_path: Path
) -> None:
    write_saelens_jumprelu(tmp_path / "sl", store.activations(), hook=hook)
    sae = load_sae(tmp_path / "sl")
    assert sae.cfg.layer is None and sae.cfg.extra["hook_kind"] == kind
    # converting keeps the hook, and the copy is refused the same way
    copy = load_sae(convert_sae(tmp_path / "sl", tmp_path / "copy"))
    assert copy.cfg.extra["hook_kind"] == kind
    message = rf"reads hook {re.escape(hook)} \(.*not the residual stream"
    for one in (sae, copy):
        with pytest.raises(SAEError, match=message):
            check_sae_fits(one, loaded=tiny_loaded, layer=LAYER)
    with pytest.raises(SAEError, match=message):
        check_sae_fits(sae, store=store)
    with pytest.raises(SAEError, match=message):
        SteeredModel(tiny_loaded, sae, Calibration((0,)), layer=LAYER)
    with pytest.raises(SAEError, match=message):
        top_activations(sae, store, progress=False)
    with torch.no_grad():
        assert sae.encode(store.activations()).shape == (store.n_tokens, D_SAE)


# --- SmolLM2 through the CLI (slow) ----------------------------------------------------------


@pytest.mark.slow
def test_smollm2_jumprelu_through_every_stage_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Gemma Scope-style JumpReLU SAE for SmolLM2 layer 10 (random weights, thresholds at
    each latent's 80th-percentile pre-activation), in SAELens layout, through `steerlex
    explain` with every method, `explain-metrics`, `select`, `generate --strategy calibrate`,
    the feature statistics and the report."""
    from sae_lens.saes.sae import SAEMetadata

    from steerlex.cli import main
    from steerlex.explain.method import method_names
    from steerlex.explain.run import read_explanations
    from steerlex.jobs.context import RunContext
    from steerlex.jobs.report import FeaturesConfig, features_job, report_job
    from steerlex.models import SMALL_MODEL

    run = tmp_path / "run"
    acts, sae_dir, expl = run / "acts-train", run / "sae", run / "explanations"
    assert main(["harvest", "--model", SMALL_MODEL, "--layer", "10", "--source", "benign",
                 "--limit", "16", "--max-length", "64", "--out", str(acts), "--quiet"]) == 0  # fmt: skip
    x = ActivationStore.open(acts).activations()
    d_in, d_sae = x.shape[1], 64
    meta = SAEMetadata(model_name=SMALL_MODEL, hook_name="blocks.10.hook_resid_post")
    sl = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rows = torch.randn(d_sae, d_in, generator=g)
        sl.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True))
        sl.W_enc.copy_(sl.W_dec.T)
        sl.b_dec.copy_(x.mean(0))
        pre = (x - sl.b_dec) @ sl.W_enc
        sl.threshold.copy_(torch.quantile(pre, 0.8, dim=0).clamp_min(1e-3))
    sl.save_model(str(sae_dir))

    methods = [a for m in method_names() for a in ("--method", m)]
    assert main(["explain", "--sae", str(sae_dir), *methods, "--activations", str(acts),
                 "--vocab-size", "500", "--top-k", "10", "--out", str(expl), "--quiet"]) == 0  # fmt: skip
    for method in method_names():
        found = read_explanations(expl / f"{method}.jsonl")
        assert [e.feature for e in found] == list(range(d_sae))
        assert sum(bool(e.words) for e in found) > d_sae // 2, method
    assert main(["explain-metrics", "--sae", str(sae_dir), "--explanations", str(expl),
                 "--features", "4", "--no-levels", "--quiet"]) == 0  # fmt: skip
    for concept in ("safety", "harm"):
        assert main(["select", "--sae", str(sae_dir), "--concept", concept, "--explanations",
                     str(expl), "--top-n", "3", "--out", str(run / f"selected_{concept}.json"),
                     "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["generate", "--sae", str(sae_dir), "--features", "1,2", "--strategy",
                 "calibrate", "--prompt", "Hello", "--max-new-tokens", "4"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "Hello" in printed and len(printed.strip().splitlines()) >= 2
    features_job(
        FeaturesConfig(sae=str(sae_dir), activations=str(acts), model=SMALL_MODEL, top_contexts=3,
                       out=str(run / "features.json")),
        RunContext(progress=False, log=None),
    )  # fmt: skip
    report, browser = report_job(run)
    html = report.read_text()
    assert "jumprelu" in html and "Explanations side by side" in html
    assert "selected_safety" in html or "safety" in html
    assert "MI input side" in browser.read_text()
