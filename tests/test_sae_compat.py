"""check_sae_fits: the one SAE-vs-model/store check every stage uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from steerlex.activations.harvest import HarvestOptions, harvest
from steerlex.core.errors import LayerError, SAEError
from steerlex.data.textset import TextItem
from steerlex.models.loading import LoadedModel
from steerlex.sae import check_sae_fits
from steerlex.sae.base import SAEConfig, SparseAutoencoder


def _sae(d_in: int = 32, layer: int | None = 2, weights_id: str | None = None) -> SparseAutoencoder:
    cfg = SAEConfig(
        d_in=d_in, d_sae=64, k=4, layer=layer, model_spec="tiny:llama", weights_id=weights_id
    )
    return SparseAutoencoder(cfg)


def test_model_width_weights_and_layer(tiny_loaded: LoadedModel) -> None:
    assert check_sae_fits(_sae(), loaded=tiny_loaded) == 2
    assert check_sae_fits(_sae(layer=None), loaded=tiny_loaded) is None
    with pytest.raises(SAEError) as info:
        check_sae_fits(_sae(d_in=48), loaded=tiny_loaded)
    assert str(info.value) == (
        "SAE d_in=48 (trained on tiny:llama) does not match layer 2 width 32 of tiny:llama; "
        "pass the SAE trained for this model."
    )
    other = _sae(weights_id="sha256:other")
    with pytest.raises(SAEError, match=r"trained on tiny:llama \(sha256:other\).*--ignore-weights"):
        check_sae_fits(other, loaded=tiny_loaded)
    check_sae_fits(other, loaded=tiny_loaded, check_weights=False)
    with pytest.warns(UserWarning, match="trained on layer 2 but is used on layer 3"):
        assert check_sae_fits(_sae(), loaded=tiny_loaded, layer=3) == 3
    with pytest.raises(
        SAEError, match="trained on layer 2 but is used on layer 1.*use it at layer 2"
    ):
        check_sae_fits(_sae(), loaded=tiny_loaded, layer=1, other_layer="error")
    with pytest.raises(LayerError):
        check_sae_fits(_sae(), loaded=tiny_loaded, layer=9)


def test_store_width_and_layer(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    store = harvest(tiny_loaded, [TextItem("hello there", "a", "t"), TextItem("a second text", "b", "t")], tmp_path / "acts",
                    HarvestOptions(layer=1, chat=False), progress=False)  # fmt: skip
    check_sae_fits(_sae(layer=1), store=store)
    check_sae_fits(_sae(layer=None), store=store)
    with pytest.raises(SAEError, match="width-32 activations of tiny:llama layer 1"):
        check_sae_fits(_sae(d_in=16, layer=1), store=store)
    with pytest.raises(SAEError, match=r"trained on layer 2 .*holds layer 1 of tiny:llama"):
        check_sae_fits(_sae(layer=2), store=store)
