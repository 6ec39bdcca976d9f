"""SAE file formats: the SAELens layout, sparsify, the paper's .pth, conversion, bad inputs.

Compatibility tests run against the real ``sae-lens`` and ``eai-sparsify`` packages and are
skipped when those are not installed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from steerlex.core.errors import SAEError, SteerlexError
from steerlex.sae.base import SAEConfig, SparseAutoencoder
from steerlex.sae.foreign import load_pth, save_sparsify
from steerlex.sae.formats import (
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    convert_sae,
    detect_format,
    hook_name_for_layer,
    layer_from_hook_name,
    load_sae,
    save_sae,
)

D_IN, D_SAE, K = 16, 64, 8
ATOL = 1e-5


def make_sae(
    architecture: str = "topk",
    *,
    tied: bool = False,
    norm_scale: float = 1.0,
    apply_b_dec_to_input: bool = True,
    seed: int = 0,
    **kw: Any,
) -> SparseAutoencoder:
    """A small SAE with random (not just initial) weights."""
    torch.manual_seed(seed)
    cfg = SAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        k=K if architecture == "topk" else None,
        architecture=architecture,
        tied=tied,
        norm_scale=norm_scale,
        apply_b_dec_to_input=apply_b_dec_to_input,
        **kw,
    )
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
        if sae.W_dec_free is not None:
            sae.W_dec_free.normal_(0, 0.3)
        for name in sae.latent_tensors:  # JumpReLU: threshold
            getattr(sae, name).uniform_(0, 0.5)
    return sae


def inputs(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def assert_same_sae(a: SparseAutoencoder, b: SparseAutoencoder, x: torch.Tensor) -> None:
    """Same dense latents and the same reconstruction on ``x``."""
    with torch.no_grad():
        torch.testing.assert_close(a.encode(x), b.encode(x), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(a(x), b(x), atol=ATOL, rtol=1e-5)
        f = a.encode(x)
        torch.testing.assert_close(a.decode(f), b.decode(f), atol=ATOL, rtol=1e-5)


def random_params(module: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# --- canonical format: round trips ----------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "tied", "norm_scale", "apply_b_dec"),
    [
        ("topk", False, 1.0, True),
        ("topk", True, 3.5, True),
        ("topk", False, 0.25, False),
        ("relu", False, 2.0, True),
        ("jumprelu", False, 1.0, True),
    ],
)
def test_round_trip_same_outputs(
    tmp_path: Path, architecture: str, tied: bool, norm_scale: float, apply_b_dec: bool
) -> None:
    sae = make_sae(architecture, tied=tied, norm_scale=norm_scale, apply_b_dec_to_input=apply_b_dec)
    out = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in out.iterdir()) == [SAELENS_CFG, SAELENS_WEIGHTS]
    loaded = load_sae(out)
    assert_same_sae(sae, loaded, inputs())
    # written folded: raw-activation weights, explicit decoder
    assert loaded.cfg.norm_scale == 1.0 and not loaded.cfg.tied
    assert loaded.cfg.extra["folded_norm_scale"] == norm_scale
    assert loaded.cfg.extra["trained_tied"] is tied
    assert loaded.W_enc.requires_grad
    for name in loaded.latent_tensors:
        assert not getattr(loaded, name).requires_grad


def test_cfg_json_has_saelens_keys_and_steerlex_block(tmp_path: Path) -> None:
    sae = make_sae(
        model_spec="embedded:smollm2-135m-instruct",
        weights_id="sha256:abc",
        layer=8,
        hf_hook_name="model.layers.8",
        keep="no-prefix",
        extra={"note": "x"},
    )
    out = save_sae(sae, tmp_path / "sae")
    cfg = json.loads((out / SAELENS_CFG).read_text())
    for key in (
        "d_in",
        "d_sae",
        "dtype",
        "device",
        "apply_b_dec_to_input",
        "normalize_activations",
        "reshape_activations",
        "metadata",
        "architecture",
        "k",
        "rescale_acts_by_decoder_norm",
    ):
        assert key in cfg
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"]) == ("topk", K, D_IN, D_SAE)
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.8.hook_resid_post"
    assert meta["hf_hook_name"] == "model.layers.8"
    assert meta["model_name"] == "embedded:smollm2-135m-instruct"
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6
    block = meta["steerlex"]
    assert block["config"]["norm_scale"] == 1.0 and block["steerlex_version"]
    loaded = load_sae(out)
    c = loaded.cfg
    assert (c.model_spec, c.weights_id, c.layer, c.hf_hook_name, c.keep) == (
        "embedded:smollm2-135m-instruct",
        "sha256:abc",
        8,
        "model.layers.8",
        "no-prefix",
    )
    assert c.extra["note"] == "x"
    weights = load_file(str(out / SAELENS_WEIGHTS))
    assert {n: list(t.shape) for n, t in weights.items()} == {
        "W_enc": [D_IN, D_SAE],
        "W_dec": [D_SAE, D_IN],
        "b_enc": [D_SAE],
        "b_dec": [D_IN],
    }


def test_load_device_and_dtype(tmp_path: Path) -> None:
    out = save_sae(make_sae(), tmp_path / "sae")
    half = load_sae(out, dtype=torch.bfloat16, device="cpu")
    assert half.W_enc.dtype == torch.bfloat16 and half.cfg.dtype == "bfloat16"
    assert load_sae(out, dtype="torch.float64").W_dec.dtype == torch.float64
    with pytest.raises(SAEError, match="not a floating-point"):
        load_sae(out, dtype="int8")


def test_save_is_atomic_idempotent_and_guards_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "sae"
    save_sae(make_sae(seed=0), target)
    mtime = (target / SAELENS_WEIGHTS).stat().st_mtime_ns
    save_sae(make_sae(seed=0), target)  # same SAE again: no-op
    assert (target / SAELENS_WEIGHTS).stat().st_mtime_ns == mtime
    other = make_sae(seed=5)
    with pytest.raises(SAEError, match="different SAE.*overwrite=True"):
        save_sae(other, target)
    assert_same_sae(load_sae(target), make_sae(seed=0), inputs())  # untouched
    save_sae(other, target, overwrite=True)
    assert_same_sae(load_sae(target), other, inputs())
    # no temp or backup directories left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    save_sae(other, tmp_path / "empty")
    assert_same_sae(load_sae(tmp_path / "empty"), other, inputs())


def test_save_into_directory_with_other_files(tmp_path: Path) -> None:
    """A training run's SAE directory also holds checkpoints and a log: they are kept."""
    run = tmp_path / "sae"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train_log.jsonl").write_text("{}\n")
    first, second = make_sae(seed=0), make_sae(seed=1)
    save_sae(first, run)  # no SAE there yet: no overwrite needed
    save_sae(first, run)  # same SAE: no-op
    with pytest.raises(SAEError, match="different SAE"):
        save_sae(second, run)
    save_sae(second, run, overwrite=True)
    assert_same_sae(load_sae(run), second, inputs())
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoints", "train_log.jsonl", SAELENS_CFG, SAELENS_WEIGHTS]
    )
    # replacing with another format removes the old format's files
    save_sparsify(first, run, overwrite=True)
    assert not (run / SAELENS_WEIGHTS).exists()
    assert_same_sae(load_sae(run), first, inputs())


def test_interrupted_save_never_pairs_old_config_with_new_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "sae"
    run.mkdir()
    (run / "train_log.jsonl").write_text("{}\n")
    save_sae(make_sae(seed=0), run)
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if Path(dst).name == SAELENS_CFG:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_sae(make_sae(seed=1), run, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(
        SAEError, match=r"has sae_weights.safetensors but no cfg.json \(an interrupted save"
    ):
        load_sae(run)
    assert sorted(p.name for p in run.iterdir()) == [SAELENS_WEIGHTS, "train_log.jsonl"]


def test_save_failure_leaves_nothing(tmp_path: Path) -> None:
    sae = make_sae(extra={"bad": object()})
    with pytest.raises(SAEError, match="JSON"):
        save_sae(sae, tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []


def test_hook_names() -> None:
    assert hook_name_for_layer(3) == "blocks.3.hook_resid_post"
    assert layer_from_hook_name("blocks.3.hook_resid_post") == 3
    assert layer_from_hook_name("blocks.3.hook_resid_pre") == 2
    assert layer_from_hook_name("blocks.0.hook_resid_pre") is None
    assert layer_from_hook_name("model.layers.12") == 12
    assert layer_from_hook_name("blocks.3.hook_mlp_out") is None
    assert layer_from_hook_name(None) is None


# --- compatibility with the real sae-lens package ------------------------------------------------


def _saelens_forward(sl: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        f = sl.encode(x)
        return f, sl.decode(f)


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
def test_our_sae_loads_in_saelens(tmp_path: Path, architecture: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae(architecture, norm_scale=1.7, layer=4, model_spec="tiny:llama")
    out = save_sae(sae, tmp_path / "sae")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings from SAELens about our config
        sl = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert sl.cfg.architecture() == {"relu": "standard"}.get(architecture, architecture)
    assert sl.cfg.metadata.hook_name == "blocks.4.hook_resid_post"
    x = inputs()
    f, recon = _saelens_forward(sl, x)
    with torch.no_grad():
        torch.testing.assert_close(f, sae.encode(x), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(recon, sae.decode(sae.encode(x)), atol=ATOL, rtol=1e-5)


def test_saelens_round_trip_keeps_steerlex_metadata(tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae(layer=5, keep="content", weights_id="sha256:1")
    sl = sae_lens.SAE.load_from_disk(str(save_sae(sae, tmp_path / "ours")))
    sl.save_model(str(tmp_path / "resaved"))
    again = load_sae(tmp_path / "resaved")
    assert (again.cfg.layer, again.cfg.keep, again.cfg.weights_id) == (5, "content", "sha256:1")
    assert_same_sae(sae, again, inputs())


def test_saelens_tolerates_top_level_steerlex_key(tmp_path: Path) -> None:
    """Older steerlex-like files with a top-level 'steerlex' key load in both."""
    sae_lens = pytest.importorskip("sae_lens")
    out = save_sae(make_sae(layer=2), tmp_path / "sae")
    cfg = json.loads((out / SAELENS_CFG).read_text())
    cfg["steerlex"] = cfg["metadata"].pop("steerlex")
    (out / SAELENS_CFG).write_text(json.dumps(cfg))
    sae_lens.SAE.load_from_disk(str(out))
    assert load_sae(out).cfg.layer == 2


def test_saelens_topk_semantics_match_with_few_positive_preacts(tmp_path: Path) -> None:
    """SAELens TopK = topk then ReLU, like ours: equal when fewer than k pre-acts are > 0."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae()
    with torch.no_grad():
        sae.b_enc.fill_(-2.0)  # most pre-activations negative
    x = inputs(32)
    n_pos = (sae.pre_acts(x) > 0).sum(-1)
    assert bool((n_pos < K).any()), "fixture must have rows with fewer than k positives"
    sl = sae_lens.SAE.load_from_disk(str(save_sae(sae, tmp_path / "sae")))
    f, recon = _saelens_forward(sl, x)
    with torch.no_grad():
        torch.testing.assert_close(f, sae.encode(x), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(recon, sae(x), atol=ATOL, rtol=1e-5)
        assert bool(((sae.encode(x) > 0).sum(-1) <= torch.minimum(n_pos, torch.tensor(K))).all())


def _saelens_sae(kind: str, **cfg_kw: Any) -> Any:
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name="gpt2", hook_name="blocks.3.hook_resid_post")
    if kind == "topk":
        sl = sae_lens.TopKSAE(
            sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=meta, **cfg_kw)
        )
    elif kind == "standard":
        sl = sae_lens.StandardSAE(
            sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta, **cfg_kw)
        )
    else:
        sl = sae_lens.JumpReLUSAE(
            sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta, **cfg_kw)
        )
    random_params(sl)
    return sl


@pytest.mark.parametrize(
    ("kind", "cfg_kw", "ours"),
    [
        ("topk", {}, "topk"),
        ("topk", {"rescale_acts_by_decoder_norm": True}, "topk"),
        ("topk", {"apply_b_dec_to_input": False}, "topk"),
        ("standard", {}, "relu"),
        ("jumprelu", {}, "jumprelu"),
    ],
)
def test_saelens_saved_sae_loads_in_ours(
    tmp_path: Path, kind: str, cfg_kw: dict[str, Any], ours: str
) -> None:
    sl = _saelens_sae(kind, **cfg_kw)
    sl.save_model(str(tmp_path / "sl"))
    assert detect_format(tmp_path / "sl")[0] == "saelens"
    sae = load_sae(tmp_path / "sl")
    assert sae.cfg.architecture == ours
    assert (sae.cfg.layer, sae.cfg.model_spec) == (3, "gpt2")
    assert sae.cfg.extra["saelens_hook_name"] == "blocks.3.hook_resid_post"
    x = inputs(32)
    f, recon = _saelens_forward(sl, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(sae.decode(sae.encode(x)), recon, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(sae(x), recon, atol=ATOL, rtol=1e-5)


def test_pre_v6_saelens_config_loads(tmp_path: Path) -> None:
    """Pre-6 SAELens configs: top-level hook_point/model_name, activation_fn_kwargs.k,
    boolean normalize_activations, and a finetuning scaling_factor folded into W_dec."""
    sae = make_sae()
    d = tmp_path / "old"
    d.mkdir()
    scale = torch.linspace(0.5, 1.5, D_SAE)
    weights = {n: t.contiguous() for n, t in sae.weights().items()}
    save_file({**weights, "scaling_factor": scale}, str(d / SAELENS_WEIGHTS))
    old_cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "model_name": "gpt2-small",
        "hook_point": "blocks.5.hook_resid_pre",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "normalize_activations": False,
        "apply_b_dec_to_input": True,
    }
    (d / SAELENS_CFG).write_text(json.dumps(old_cfg))
    loaded = load_sae(d)
    assert (loaded.cfg.architecture, loaded.cfg.k, loaded.cfg.layer) == ("topk", K, 4)
    x = inputs()
    with torch.no_grad():
        f = sae.encode(x)
        torch.testing.assert_close(loaded.encode(x), f, atol=ATOL, rtol=1e-5)
        expected = (f * scale) @ sae.W_dec + sae.b_dec
        torch.testing.assert_close(loaded(x), expected, atol=ATOL, rtol=1e-5)


def test_saelens_per_token_normalisation_is_refused(tmp_path: Path) -> None:
    sl = _saelens_sae("standard", normalize_activations="layer_norm")
    sl.save_model(str(tmp_path / "sl"))
    with pytest.raises(SAEError, match="layer_norm"):
        load_sae(tmp_path / "sl")


# --- sparsify -------------------------------------------------------------------------------


def _sparsify_latents(sc: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense latents [n, d_sae] and reconstruction [n, d_in] of a sparsify SparseCoder."""
    with torch.no_grad():
        enc = sc.encode(x)
        dense = torch.zeros(x.shape[0], sc.num_latents).scatter_(-1, enc.top_indices, enc.top_acts)
        return dense, sc.decode(enc.top_acts, enc.top_indices)


def test_sparsify_saved_sae_loads_in_ours(tmp_path: Path) -> None:
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    sc = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K))
    random_params(sc)
    with torch.no_grad():
        sc.encoder.bias.sub_(2.5)  # some rows with fewer than k positive pre-activations
    run = tmp_path / "run"
    sc.save_to_disk(run / "layers.6")
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M"}))
    assert detect_format(run / "layers.6")[0] == "sparsify"
    sae = load_sae(run / "layers.6")
    assert (sae.d_in, sae.d_sae, sae.cfg.k) == (D_IN, D_SAE, K)
    assert tuple(sae.W_enc.shape) == (D_IN, D_SAE) and tuple(sae.W_dec.shape) == (D_SAE, D_IN)
    assert (sae.cfg.layer, sae.cfg.model_spec) == (6, "HuggingFaceTB/SmolLM2-135M")
    x = inputs(32)
    assert bool(((sae.pre_acts(x) > 0).sum(-1) < K).any())
    dense, recon = _sparsify_latents(sc, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), dense, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(sae(x), recon, atol=ATOL, rtol=1e-5)
    # a run directory with several hookpoints: say which to pick
    sc.save_to_disk(run / "layers.7")
    with pytest.raises(SAEError, match=r"several SAEs \(layers.6, layers.7\)"):
        load_sae(run)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_our_sae_loads_in_sparsify(tmp_path: Path, apply_b_dec: bool) -> None:
    sparsify = pytest.importorskip("sparsify")
    sae = make_sae(norm_scale=2.0, apply_b_dec_to_input=apply_b_dec, layer=3)
    out = save_sparsify(sae, tmp_path / "layers.3")
    sc = sparsify.SparseCoder.load_from_disk(out)
    assert (sc.d_in, sc.num_latents, sc.cfg.k) == (D_IN, D_SAE, K)
    x = inputs()
    dense, recon = _sparsify_latents(sc, x)
    with torch.no_grad():
        torch.testing.assert_close(dense, sae.encode(x), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(recon, sae(x), atol=ATOL, rtol=1e-5)
    back = load_sae(out)
    assert back.cfg.layer == 3
    assert_same_sae(sae, back, x)


def test_sparsify_refuses_relu_and_unsupported_variants(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match="TopK SAEs only"):
        save_sparsify(make_sae("relu"), tmp_path / "x")
    out = save_sparsify(make_sae(), tmp_path / "sp")
    cfg = json.loads((out / SAELENS_CFG).read_text())
    for key, value, message in [
        ("activation", "groupmax", "groupmax"),
        ("transcode", True, "transcoder"),
        ("skip_connection", True, "skip connection"),
    ]:
        (out / SAELENS_CFG).write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(SAEError, match=message):
            load_sae(out)


# --- the paper's tied TopK .pth ---------------------------------------------------------------


def _paper_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.5,
        "b_dec": torch.randn(D_IN, generator=g) * 0.5,
    }


def test_pth_tied_topk_matches_tied_sae(tmp_path: Path) -> None:
    sd = _paper_state_dict()
    path = tmp_path / "sae.pth"
    torch.save(sd, path)
    sae = load_sae(path, k=K)
    assert sae.cfg.tied and sae.cfg.k == K
    ref = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, tied=True))
    with torch.no_grad():
        ref.W_enc.copy_(sd["W_enc"])
        ref.b_enc.copy_(sd["b_enc"])
        ref.b_dec.copy_(sd["b_dec"])
    x = inputs()
    assert_same_sae(sae, ref, x)
    # by hand: topk((x - b_dec) @ W_enc + b_enc), ReLU, decode with W_enc.T
    pre = (x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"]
    top = pre.topk(K, dim=-1)
    dense = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), dense, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(sae(x), dense @ sd["W_enc"].T + sd["b_dec"], atol=ATOL, rtol=0)
    # convert to the canonical format and back: same outputs, k recorded
    out = convert_sae(path, tmp_path / "canon", k=K)
    assert_same_sae(load_sae(out), ref, x)


def test_pth_k_from_file_wrapper_and_prefix(tmp_path: Path) -> None:
    sd = {f"module.{n}": t for n, t in _paper_state_dict().items()}
    torch.save({"state_dict": sd, "k": torch.tensor(5)}, tmp_path / "a.pt")
    assert load_sae(tmp_path / "a.pt").cfg.k == 5
    assert load_sae(tmp_path / "a.pt", k=3).cfg.k == 3


def test_pth_without_k_needs_k(tmp_path: Path) -> None:
    torch.save(_paper_state_dict(), tmp_path / "sae.pth")
    with pytest.raises(SAEError, match=r"sae.pth does not record the TopK k; pass it"):
        load_sae(tmp_path / "sae.pth")


class _Custom:
    pass


def test_pth_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({**_paper_state_dict(), "cfg": _Custom()}, path)
    with pytest.raises(SAEError, match=r"pickled.pth.*weights_only=True.*_Custom"):
        load_sae(path, k=K)


def test_pth_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(SAEError, match=r"list.pth holds a list, not a state dict"):
        load_sae(tmp_path / "list.pth", k=K)
    torch.save({"weight": torch.zeros(4, 4)}, tmp_path / "other.pth")
    with pytest.raises(SAEError, match=r"other.pth is not a tied TopK SAE state dict"):
        load_pth(tmp_path / "other.pth", k=K)


def test_pth_truncated_or_bad_shapes(tmp_path: Path) -> None:
    torch.save(_paper_state_dict(), tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEError, match=r"cut.pth is corrupted or truncated"):
        load_sae(tmp_path / "cut.pth", k=K)
    bad = {**_paper_state_dict(), "b_dec": torch.zeros(D_IN + 1)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(SAEError, match=r"b_dec of shape \[17\]"):
        load_sae(tmp_path / "bad.pth", k=K)


# --- conversion -------------------------------------------------------------------------------


def test_convert_saelens_sparsify_saelens(tmp_path: Path) -> None:
    sae = make_sae(norm_scale=1.5, layer=2, model_spec="tiny:llama")
    src = save_sae(sae, tmp_path / "a")
    sp = convert_sae(src, tmp_path / "b", to="sparsify")
    assert detect_format(sp)[0] == "sparsify"
    back = convert_sae(sp, tmp_path / "c", to="saelens")
    loaded = load_sae(back)
    assert (loaded.cfg.layer, loaded.cfg.model_spec) == (2, "tiny:llama")
    assert_same_sae(sae, loaded, inputs())
    with pytest.raises(SAEError, match="Cannot write SAE format 'pth'"):
        convert_sae(src, tmp_path / "d", to="pth")
    with pytest.raises(SAEError, match="different SAE"):
        save_sparsify(make_sae(seed=9), sp)


# --- bad inputs ---------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_sae(make_sae(), tmp_path / "sae")


def test_corrupted_safetensors(saved: Path) -> None:
    (saved / SAELENS_WEIGHTS).write_bytes(b"\x00" * 64)
    with pytest.raises(SAEError, match=r"sae_weights.safetensors is corrupted or truncated"):
        load_sae(saved)


def test_truncated_safetensors(saved: Path) -> None:
    path = saved / SAELENS_WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(SAEError, match=r"corrupted or truncated.*download it again"):
        load_sae(saved)


def test_unknown_architecture(saved: Path) -> None:
    cfg = json.loads((saved / SAELENS_CFG).read_text())
    (saved / SAELENS_CFG).write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SAEError, match=r"cfg.json has architecture 'gated'.*supported"):
        load_sae(saved)


def test_missing_weights_file(saved: Path) -> None:
    (saved / SAELENS_WEIGHTS).unlink()
    with pytest.raises(SAEError, match=r"sae_weights.safetensors is missing"):
        load_sae(saved)


def _as_written_elsewhere(saved: Path) -> None:
    """Drop the tensors' sha256 from the config, as in an SAE another tool wrote."""
    cfg = json.loads((saved / SAELENS_CFG).read_text())
    del cfg["metadata"]["steerlex"]["tensors_sha256"]
    (saved / SAELENS_CFG).write_text(json.dumps(cfg))


def test_shape_mismatch_names_both_files(saved: Path) -> None:
    _as_written_elsewhere(saved)
    weights = load_file(str(saved / SAELENS_WEIGHTS))
    weights["W_enc"] = torch.zeros(D_IN, D_SAE * 2)
    save_file(weights, str(saved / SAELENS_WEIGHTS))
    with pytest.raises(SAEError) as info:
        load_sae(saved)
    msg = str(info.value)
    assert "cfg.json" in msg and "sae_weights.safetensors" in msg
    assert f"[{D_IN}, {D_SAE}]" in msg and f"[{D_IN}, {D_SAE * 2}]" in msg


def test_k_larger_than_d_sae(saved: Path) -> None:
    cfg = json.loads((saved / SAELENS_CFG).read_text())
    (saved / SAELENS_CFG).write_text(json.dumps({**cfg, "k": D_SAE + 1}))
    with pytest.raises(SAEError, match=rf"cfg.json: k={D_SAE + 1} is larger than d_sae={D_SAE}"):
        load_sae(saved)
    with pytest.raises(SAEError, match="k=1000 is larger"):
        load_sae(saved, k=1000)


def test_invalid_json_and_nan_weights(saved: Path) -> None:
    _as_written_elsewhere(saved)
    weights = load_file(str(saved / SAELENS_WEIGHTS))
    weights["b_enc"][0] = float("nan")
    save_file(weights, str(saved / SAELENS_WEIGHTS))
    with pytest.raises(SAEError, match="NaN or infinite values in b_enc"):
        load_sae(saved)
    (saved / SAELENS_CFG).write_text("{not json")
    with pytest.raises(SAEError, match=r"cfg.json is not valid JSON"):
        load_sae(saved)


def test_unknown_paths(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match="does not exist"):
        load_sae(tmp_path / "nope")
    (tmp_path / "weights.npy").write_bytes(b"x")
    with pytest.raises(SAEError, match="Cannot tell the SAE format"):
        load_sae(tmp_path / "weights.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEError, match="not an SAE directory"):
        load_sae(tmp_path / "empty")
    with pytest.raises(SAEError, match="applies only to TopK"):
        load_sae(save_sae(make_sae("relu"), tmp_path / "relu"), k=4)
    run = tmp_path / "run"
    save_sae(make_sae(), run / "layer_2")
    save_sae(make_sae(seed=1), run / "layer_4")
    with pytest.raises(SAEError, match=r"several SAEs \(layer_2, layer_4\); pass one"):
        load_sae(run)
    assert issubclass(SAEError, SteerlexError)


def test_hook_kinds() -> None:
    from steerlex.sae.formats import hook_kind

    assert hook_kind("blocks.3.hook_resid_post") == "hook_resid_post"
    assert hook_kind("blocks.3.hook_resid_pre") == "hook_resid_pre"
    assert hook_kind("blocks.3.hook_mlp_out") == "hook_mlp_out"
    assert hook_kind("blocks.3.attn.hook_z") == "attn.hook_z"
    assert hook_kind("hook_embed") == "hook_embed"
    assert hook_kind("model.layers.12") == "hook_resid_post"  # an HF name in hook_name
    assert hook_kind(None, "model.layers.4") == "hook_resid_post"
    assert hook_kind(None, "model.layers.4.mlp") == "model.layers.4.mlp"
    assert hook_kind(None, None) is None
