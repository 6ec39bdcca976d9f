"""One check that an SAE fits what it is used on: a model's layer, an activation store, or both.

Every stage that pairs an SAE with a model or a store calls :func:`check_sae_fits`, so the
rules (and their messages) are the same everywhere:

- the SAE's input width ``d_in`` equals the layer's residual width (or the store's width);
- the SAE records no other model weights than the model's (``weights_id``; skippable);
- the layer asked for is the SAE's own: another layer warns (``other_layer="warn"``, e.g.
  steering a neighbouring layer on purpose) or raises (``"error"``, e.g. evaluation);
- a store holds the SAE's own layer.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal

from steerlex.core.errors import SAEError
from steerlex.models.hooks import check_layer, residual_width

if TYPE_CHECKING:
    from steerlex.activations.store import ActivationStore
    from steerlex.models.loading import LoadedModel
    from steerlex.sae.base import SparseAutoencoder

__all__ = ["check_sae_fits", "sae_origin"]


def sae_origin(sae: SparseAutoencoder) -> str:
    """`` (trained on MODEL layer L)``, or empty when the SAE records neither."""
    cfg = sae.cfg
    if cfg.model_spec is None and cfg.layer is None:
        return ""
    return f" (trained on {cfg.model_spec or 'an unnamed model'} layer {cfg.layer})"


def check_sae_fits(
    sae: SparseAutoencoder,
    *,
    loaded: LoadedModel | None = None,
    layer: int | None = None,
    store: ActivationStore | None = None,
    check_weights: bool = True,
    other_layer: Literal["warn", "error"] = "warn",
) -> int | None:
    """Raise :class:`SAEError` unless ``sae`` reads ``layer`` of ``loaded`` and/or ``store``.

    ``layer`` defaults to the SAE's own; it is checked against the model's depth. Returns
    the layer (``None`` when neither the SAE nor the caller gives one, or without a model).
    """
    use = layer if layer is not None else sae.cfg.layer
    if loaded is not None:
        name = loaded.spec
        if use is not None:
            use = check_layer(loaded.model, use)
        width = residual_width(loaded.model)
        if sae.d_in != width:
            trained = f" (trained on {sae.cfg.model_spec})" if sae.cfg.model_spec else ""
            raise SAEError(
                f"SAE d_in={sae.d_in}{trained} does not match layer {use} width {width} of "
                f"{name}; pass the SAE trained for this model."
            )
        wid = sae.cfg.weights_id
        if check_weights and wid and loaded.weights_id and wid != loaded.weights_id:
            raise SAEError(
                f"The SAE was trained on {sae.cfg.model_spec} ({wid}) but the model given is "
                f"{name} ({loaded.weights_id}); use the model it was trained on, or skip this "
                "check (check_weights=False; CLI: --ignore-weights-id) if they are the same "
                "weights."
            )
        if use is not None and sae.cfg.layer is not None and sae.cfg.layer != use:
            msg = (
                f"The SAE was trained on layer {sae.cfg.layer} but is used on layer {use} of {name}"
            )
            if other_layer == "error":
                raise SAEError(
                    f"{msg}{sae_origin(sae)}; use it at layer {sae.cfg.layer} or pass the SAE "
                    f"for layer {use}."
                )
            warnings.warn(f"{msg}; its features may not mean the same there.", stacklevel=2)
    if store is not None:
        spec = store.index.get("model", {}).get("spec")
        if sae.d_in != store.d_model:
            raise SAEError(
                f"The SAE takes width d_in={sae.d_in}{sae_origin(sae)}, but the store "
                f"{store.directory} holds width-{store.d_model} activations of {spec} layer "
                f"{store.layer}; pass the SAE trained for that model and layer."
            )
        if sae.cfg.layer is not None and sae.cfg.layer != store.layer:
            raise SAEError(
                f"The SAE was trained on layer {sae.cfg.layer}{sae_origin(sae)}, but the store "
                f"{store.directory} holds layer {store.layer} of {spec}; use activations of "
                "its own layer."
            )
    return use
