"""SAE formats other than the canonical SAELens layout.

**EleutherAI sparsify** (pip ``eai-sparsify``, imported as ``sparsify``): a directory with

- ``cfg.json``: ``SparseCoderConfig`` fields (``activation``, ``expansion_factor``,
  ``normalize_decoder``, ``num_latents``, ``k``, ``multi_topk``, ``skip_connection``,
  ``transcode``) plus ``d_in``;
- ``sae.safetensors``: ``encoder.weight [d_sae, d_in]`` and ``encoder.bias [d_sae]`` (an
  ``nn.Linear``), ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``;
- written by steerlex also ``steerlex.json``: steerlex's block (the full config, the
  weights' sha256), kept out of ``cfg.json`` because sparsify prints a warning for every key
  of ``cfg.json`` it does not know.

sparsify encodes ``topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias))`` (ReLU first,
then TopK) and decodes ``sum of the k selected W_dec rows + b_dec``. steerlex does TopK then
ReLU; the dense latents and the reconstructions are identical (they differ only in *which*
zero-valued latents fill the k slots when fewer than k pre-activations are positive). A
training run stores one such directory per hookpoint (``layers.8/``, ...), with the run's
``config.json`` (``model``, ...) beside them. Read and written here (TopK only).

**Paper authors' tied TopK** ``.pth``: a ``torch.save``'d state dict with ``W_enc [d_in,
d_sae]``, ``b_enc [d_sae]``, ``b_dec [d_in]``; the decoder is ``W_enc.T``; encoding is
``topk((x - b_dec) @ W_enc + b_enc)`` then ReLU. The file usually lacks ``k``; the user
passes it. A ``W_dec [d_sae, d_in]`` entry, if present, is used as an untied decoder; a
``k`` entry (int or 0-d tensor) is used when the user passes none. Read only, and only with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import steerlex
from steerlex.core.errors import SAEError
from steerlex.sae.base import SAE_ARCHITECTURES, SAEConfig, SparseAutoencoder
from steerlex.sae.formats import (
    PROVENANCE_FIELDS,
    REBUILD,
    SAELENS_CFG,
    SPARSIFY_SIDECAR,
    SPARSIFY_WEIGHTS,
    STEERLEX_BLOCK_VERSION,
    build_sae,
    check_tensors,
    check_weights_hash,
    read_json_object,
    read_safetensors,
    resolve_dtype,
    save_safetensors,
    tensors_sha256,
    write_sae_dir,
)

__all__ = ["load_pth", "load_sparsify", "save_sparsify", "sparsify_cfg"]

_SPARSIFY_LAYER_RE = re.compile(r"^(?:model\.)?layers[._](\d+)$")
#: The registered architecture of the paper's ``.pth`` (a tied TopK SAE).
PTH_ARCHITECTURE = "topk"


def _sparsify_classes() -> dict[str, type[SparseAutoencoder]]:
    """sparsify activation name -> the registered class that computes it."""
    return {
        cls.sparsify_activation: cls
        for _, cls in SAE_ARCHITECTURES.items()
        if cls.sparsify_activation is not None
    }


def _int_field(raw: dict[str, Any], key: str, cfg_path: Path, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SAEError(
            f"sparsify config {cfg_path} needs an integer '{key}', got {value!r}; it is not a "
            "sparsify SAE config or it is damaged."
        )
    return value


# --- sparsify ------------------------------------------------------------------------------


def load_sparsify(
    directory: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    k: int | None = None,
) -> SparseAutoencoder:
    """Load an eai-sparsify SAE directory (``cfg.json`` + ``sae.safetensors``) as a TopK SAE.

    ``W_enc = encoder.weight.T [d_in, d_sae]``, ``b_enc = encoder.bias``, ``W_dec``/``b_dec``
    as stored, ``apply_b_dec_to_input`` on. ``layer`` comes from a hookpoint directory name
    ``layers.L``; the model name from the run's ``config.json`` beside it. ``k`` overrides
    the file's k. Groupmax activations, skip connections and transcoders are refused.
    """
    directory = Path(directory)
    cfg_path, weights_path = directory / SAELENS_CFG, directory / SPARSIFY_WEIGHTS
    raw = read_json_object(cfg_path)
    d_in = _int_field(raw, "d_in", cfg_path)
    file_k = _int_field(raw, "k", cfg_path, default=32)
    activation = raw.get("activation", "topk")
    known = _sparsify_classes()
    if activation not in known:
        raise SAEError(
            f"sparsify config {cfg_path} uses activation={activation!r}; steerlex loads only "
            f"{', '.join(repr(a) for a in known)} sparsify SAEs."
        )
    if raw.get("transcode"):
        raise SAEError(
            f"{directory} is a sparsify transcoder (transcode=true): it maps a module's input "
            "to its output, not the residual stream to itself; steerlex needs an SAE."
        )
    if raw.get("skip_connection"):
        raise SAEError(
            f"{directory} has a skip connection (skip_connection=true, W_skip), which steerlex "
            "SAEs cannot represent; use an SAE trained without it."
        )
    num_latents = raw.get("num_latents") or 0
    d_sae = (
        _int_field(raw, "num_latents", cfg_path)
        if num_latents
        else d_in * _int_field(raw, "expansion_factor", cfg_path, default=32)
    )
    block = _sparsify_block(directory, raw)
    tensors = read_safetensors(weights_path)
    check_weights_hash(tensors, block, weights_path, directory / SPARSIFY_SIDECAR, rebuild=REBUILD)
    if "W_skip" in tensors:
        raise SAEError(f"{weights_path} holds W_skip (a skip connection); steerlex cannot use it.")
    check_tensors(
        tensors,
        {
            "encoder.weight": (d_sae, d_in),
            "encoder.bias": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
        },
        weights_path=weights_path,
        cfg_desc=f"{cfg_path} (d_in={d_in}, d_sae={d_sae})",
    )

    if block is not None:
        prov = {key: block["config"].get(key) for key in PROVENANCE_FIELDS}
        prov["extra"] = dict(prov.get("extra") or {})
    else:
        hookpoint = directory.name
        m = _SPARSIFY_LAYER_RE.match(hookpoint)
        run_cfg: dict[str, Any] = {}
        if (directory.parent / "config.json").is_file():
            try:
                run_cfg = read_json_object(directory.parent / "config.json")
            except SAEError:
                run_cfg = {}
        model = run_cfg.get("model")
        prov = {
            "model_spec": model if isinstance(model, str) else None,
            "weights_id": None,
            "layer": int(m.group(1)) if m else None,
            "hf_hook_name": None,
            "keep": None,
            "extra": {"source_format": "sparsify", "sparsify_hookpoint": hookpoint},
        }
    default_dtype = str(tensors["encoder.weight"].dtype)
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=k if k is not None else file_k,
        architecture=known[activation].name,
        tied=False,
        apply_b_dec_to_input=True,
        dtype=resolve_dtype(dtype, default_dtype, where=str(cfg_path)),
        **prov,
    )
    return build_sae(
        cfg,
        W_enc=tensors["encoder.weight"].T,
        b_enc=tensors["encoder.bias"],
        b_dec=tensors["b_dec"],
        W_dec=tensors["W_dec"],
        device=device,
        source=str(cfg_path),
    )


def _sparsify_block(directory: Path, raw: dict[str, Any]) -> dict[str, Any] | None:
    """steerlex's block of a sparsify directory: ``steerlex.json``, or a ``steerlex`` key in
    ``cfg.json`` (steerlex before 0.2 wrote it there); None for an SAE sparsify wrote."""
    side = directory / SPARSIFY_SIDECAR
    block = read_json_object(side) if side.is_file() else raw.get("steerlex")
    if block is None:
        return None
    if not isinstance(block, dict) or not isinstance(block.get("config"), dict):
        raise SAEError(
            f"steerlex's block of {directory} ({side.name if side.is_file() else SAELENS_CFG}) "
            "is malformed; re-save the SAE."
        )
    return block


def _sparsify_parts(
    sae: SparseAutoencoder,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]:
    """(cfg.json dict, steerlex block, tensors) of ``sae`` in sparsify's layout."""
    sae = sae.for_inference()
    activation = type(sae).sparsify_activation
    if activation is None:
        raise SAEError(
            f"sparsify stores TopK SAEs only; this SAE is '{sae.cfg.architecture}' "
            f"({type(sae).title}). Save it in the SAELens format instead (--to saelens)."
        )
    folded = sae.folded()
    c = folded.cfg
    W_enc, b_enc = folded.W_enc.detach(), folded.b_enc.detach()
    if not c.apply_b_dec_to_input:
        # sparsify always encodes x - b_dec: (x - b_dec) @ W + b' == x @ W + b_enc
        # with b' = b_enc + b_dec @ W.
        wide = torch.float64
        b_enc = (b_enc.to(wide) + folded.b_dec.detach().to(wide) @ W_enc.to(wide)).to(W_enc.dtype)
    W_dec = folded.W_dec.detach()
    norms = W_dec.float().norm(dim=1)
    unit = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3))
    block_cfg = {**c.to_dict(), "apply_b_dec_to_input": True}
    cfg: dict[str, Any] = {
        "activation": activation,
        "expansion_factor": max(1, c.d_sae // c.d_in),
        "normalize_decoder": unit,
        "num_latents": c.d_sae,
        "k": c.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": c.d_in,
    }
    block = {
        "format_version": STEERLEX_BLOCK_VERSION,
        "steerlex_version": steerlex.__version__,
        "config": block_cfg,
    }
    tensors = {
        "encoder.weight": W_enc.T.contiguous(),
        "encoder.bias": b_enc,
        "W_dec": W_dec.contiguous(),
        "b_dec": folded.b_dec.detach(),
    }
    return cfg, block, tensors


def sparsify_cfg(sae: SparseAutoencoder) -> dict[str, Any]:
    """The sparsify ``cfg.json`` dict that :func:`save_sparsify` writes for ``sae``."""
    return _sparsify_parts(sae)[0]


def save_sparsify(
    sae: SparseAutoencoder, directory: str | Path, *, overwrite: bool = False
) -> Path:
    """Save a TopK SAE as an eai-sparsify directory (``cfg.json`` + ``sae.safetensors``).

    Writes the folded SAE; an SAE without ``apply_b_dec_to_input`` gets ``b_dec @ W_enc``
    folded into the encoder bias (sparsify always subtracts ``b_dec``). Atomic, like
    :func:`steerlex.sae.formats.save_sae`.
    """
    cfg, block, tensors = _sparsify_parts(sae)
    block["tensors_sha256"] = tensors_sha256(tensors)
    try:
        text = json.dumps(cfg, indent=2) + "\n"
        side = json.dumps(block, indent=2) + "\n"
    except (TypeError, ValueError) as exc:
        raise SAEError(f"Cannot save the SAE config as JSON ({exc}).") from None

    def write(tmp: Path) -> None:
        save_safetensors(tensors, tmp / SPARSIFY_WEIGHTS)
        (tmp / SPARSIFY_SIDECAR).write_text(side, encoding="utf-8")
        (tmp / SAELENS_CFG).write_text(text, encoding="utf-8")

    return write_sae_dir(Path(directory), write, overwrite=overwrite)


# --- the paper's tied TopK .pth -----------------------------------------------------------------


#: How a file torch.save wrote begins: a zip archive (torch >= 1.6) or a pickle (older).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
#: Words of torch's weights-only unpickler errors about a Python object it will not build
#: (any other error of it means bytes that are no pickle at all: a damaged file).
_OBJECT_ERRORS = ("GLOBAL", "allowlisted", "Can only ")


def _not_a_checkpoint(path: Path, detail: str) -> SAEError:
    return SAEError(
        f"{path} is not a valid torch checkpoint ({detail}): it is damaged, truncated or not "
        "a file torch.save wrote. Copy or download it again, or pass the SAE it came from."
    )


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise SAEError(f"SAE file {path} does not exist.")
    with path.open("rb") as f:
        head = f.read(4)
    if not head.startswith(_TORCH_MAGIC):
        detail = (
            f"it starts with the bytes {head.hex(' ')}, neither a zip nor a pickle"
            if head
            else "the file is empty"
        )
        raise _not_a_checkpoint(path, detail)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text and not any(w in text for w in _OBJECT_ERRORS):
            m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            detail = m.group(1).strip() if m else "unreadable pickle"
            raise _not_a_checkpoint(path, detail) from None
        if "Weights only load failed" in text:
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f" (it pickles {m.group(1)})" if m else ""
            raise SAEError(
                f"{path} cannot be read safely: torch.load(weights_only=True) refuses it "
                f"because it stores arbitrary Python objects{what}, and steerlex never "
                "unpickles those. Re-save it as a plain state dict of tensors where it was "
                "made: torch.save({k: v for k, v in sd.items()}, 'sae.pth')."
            ) from None
        raise SAEError(f"{path} is corrupted and cannot be read ({exc}).") from None
    except Exception as exc:  # truncated zip, garbage bytes, ...
        raise SAEError(
            f"{path} is corrupted or truncated and cannot be read by torch.load "
            f"({type(exc).__name__}: {str(exc)[:200]}); copy or download it again."
        ) from None


def _k_value(value: Any) -> int | None:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def load_pth(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    k: int | None = None,
) -> SparseAutoencoder:
    """Load the paper authors' tied TopK SAE from a ``.pth`` state dict.

    Needs ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``b_dec [d_in]`` (a ``module.`` prefix
    or a ``{"state_dict": ...}`` wrapper is accepted). ``k`` is the TopK k; it is required
    unless the file holds a ``k`` entry.
    """
    path = Path(path)
    obj = _torch_load(path)
    warnings.warn(
        f"{path} is a .pth state dict, which records no sha256, so its integrity is not "
        "checked; `steerlex sae convert` writes a copy that records one.",
        stacklevel=2,
    )
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        outer_k = _k_value(obj.get("k"))
        obj = obj["state_dict"]
    else:
        outer_k = None
    if not isinstance(obj, dict):
        raise SAEError(
            f"{path} holds a {type(obj).__name__}, not a state dict; expected a dict with "
            "W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in]."
        )
    entries = {str(key).removeprefix("module."): v for key, v in obj.items()}
    tensors = {key: v for key, v in entries.items() if isinstance(v, Tensor)}
    file_k = _k_value(entries.get("k")) or outer_k
    W_enc = tensors.get("W_enc")
    if W_enc is None or W_enc.ndim != 2:
        raise SAEError(
            f"{path} is not a tied TopK SAE state dict: it needs a 2-D W_enc [d_in, d_sae] "
            f"(plus b_enc [d_sae], b_dec [d_in]); it has {sorted(entries)[:10]}."
        )
    d_in, d_sae = (int(n) for n in W_enc.shape)
    expected: dict[str, tuple[int, ...]] = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "b_dec": (d_in,),
    }
    if "W_dec" in tensors:
        expected["W_dec"] = (d_sae, d_in)
    check_tensors(
        tensors,
        expected,
        weights_path=path,
        cfg_desc=f"its W_enc [d_in={d_in}, d_sae={d_sae}]",
    )
    use_k = k if k is not None else file_k
    if use_k is None:
        raise SAEError(
            f"{path} does not record the TopK k; pass it: load_sae(path, k=K) "
            "(CLI: --k K), using the k the SAE was trained with."
        )
    tied = "W_dec" not in tensors
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=use_k,
        architecture=PTH_ARCHITECTURE,
        tied=tied,
        apply_b_dec_to_input=True,
        dtype=resolve_dtype(dtype, str(W_enc.dtype), where=str(path)),
        extra={"source_format": "pth", "source_file": path.name},
    )
    return build_sae(
        cfg,
        W_enc=W_enc,
        b_enc=tensors["b_enc"],
        b_dec=tensors["b_dec"],
        W_dec=tensors.get("W_dec"),
        device=device,
        source=str(path),
    )
