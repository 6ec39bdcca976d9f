"""One check that an SAE fits what it is used on: a model's layer, an activation store, or both.

Every stage that pairs an SAE with a model or a store calls :func:`check_sae_fits`, so the
rules (and their messages) are the same everywhere:

- the SAE's input width ``d_in`` equals the layer's residual width (or the store's width);
- the SAE records no other model weights than the model's (``weights_id``; skippable);
- the layer asked for is the SAE's own: another layer warns (``other_layer="warn"``, e.g.
  steering a neighbouring layer on purpose) or raises (``"error"``, e.g. evaluation);
- a store holds the SAE's own layer;
- the SAE reads the residual stream at a decoder block's output (an SAE of another hook,
  e.g. SAELens ``blocks.5.hook_mlp_out``, recorded in ``cfg.extra["hook_kind"]`` when it
  was loaded, is refused: steerlex reads, explains and edits only that stream).
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

__all__ = ["RESIDUAL_HOOK_KINDS", "check_residual_hook", "check_sae_fits", "sae_origin"]

#: ``cfg.extra["hook_kind"]`` values of the residual stream between decoder blocks.
RESIDUAL_HOOK_KINDS = ("hook_resid_post", "hook_resid_pre")

# What the common non-residual TransformerLens hook points read (for the error message).
_HOOK_MEANING = {
    "hook_resid_mid": "the residual stream between a block's attention and its MLP",
    "hook_mlp_out": "a block's MLP output",
    "hook_attn_out": "a block's attention output",
    "attn.hook_z": "the attention heads' outputs before W_O",
    "hook_embed": "the token embeddings",
    "hook_pos_embed": "the position embeddings",
    "hook_resid_pre": "the input of block 0 (the embeddings)",
}


def sae_origin(sae: SparseAutoencoder) -> str:
    """`` (trained on MODEL layer L)``, or empty when the SAE records neither."""
    cfg = sae.cfg
    if cfg.model_spec is None and cfg.layer is None:
        return ""
    return f" (trained on {cfg.model_spec or 'an unnamed model'} layer {cfg.layer})"


def check_residual_hook(sae: SparseAutoencoder) -> None:
    """Raise :class:`SAEError` unless ``sae`` reads the residual stream at a block's output.

    An SAE whose loader recorded no ``hook_kind`` (steerlex's own, or one without a hook
    name) passes; ``blocks.0.hook_resid_pre`` (the embeddings: no block output) does not.
    """
    kind = sae.cfg.extra.get("hook_kind")
    if kind is None or (kind in RESIDUAL_HOOK_KINDS and sae.cfg.layer is not None):
        return
    hook = sae.cfg.extra.get("saelens_hook_name") or sae.cfg.hf_hook_name or kind
    meaning = _HOOK_MEANING.get(str(kind), "an activation that is not the residual stream")
    raise SAEError(
        f"The SAE reads hook {hook} ({meaning}), not the residual stream at a decoder block's "
        "output; steerlex harvests, explains, evaluates and steers residual-stream SAEs only "
        "(SAELens blocks.L.hook_resid_post, blocks.L.hook_resid_pre for L >= 1, or HF "
        "model.layers.L). Use an SAE trained on the residual stream (loading and `steerlex sae "
        "convert` still work for this one)."
    )


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
    With a model or a store, an SAE of a non-residual hook raises (:func:`check_residual_hook`).
    """
    if loaded is not None or store is not None:
        check_residual_hook(sae)
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
