"""SAE files: the canonical SAELens (v6) layout, format detection, loading and conversion.

The canonical on-disk form of an SAE is a **SAELens v6 directory**::

    DIR/cfg.json                  SAELens's own keys + ``metadata.steerlex`` (ours)
    DIR/sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in],
                                  b_enc [d_sae], b_dec [d_in] (+ threshold [d_sae], JumpReLU)

``cfg.json`` holds exactly the keys SAELens v6 writes for the architecture (``d_in``,
``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``reshape_activations``, ``metadata``, ``architecture``; TopK adds ``k`` and
``rescale_acts_by_decoder_norm``), so ``sae_lens.SAE.load_from_disk(DIR)`` loads it.
Which SAELens architecture name, extra keys and extra tensors belong to which steerlex
architecture is declared by the classes in :data:`~steerlex.sae.base.SAE_ARCHITECTURES`
(``saelens_architecture``, ``saelens_keys``, ``latent_tensors``, ``uses_k``); an
architecture that is only a training procedure (BatchTopK) is saved as the class its
:meth:`~steerlex.sae.base.SparseAutoencoder.for_inference` returns (JumpReLU).

The hook an SAE reads is recorded on loading in ``cfg.extra["hook_kind"]`` (the
TransformerLens hook point without its block, e.g. ``hook_resid_post``, ``hook_mlp_out``,
``attn.hook_z``); :func:`steerlex.sae.compat.check_sae_fits` refuses non-residual ones.
steerlex's own record (the full :class:`SAEConfig`, the steerlex version and a format
version) sits in ``metadata.steerlex``: SAELens keeps unknown metadata keys when it loads
*and* re-saves an SAE, whereas it drops unknown top-level keys on re-save.

Saving always writes :meth:`SparseAutoencoder.folded` (``norm_scale`` 1, explicit decoder), so every
tool sees weights that act on raw activations. Loading accepts SAELens directories (v6 and
the older pre-6 layout), EleutherAI ``sparsify`` directories and the paper authors' tied
TopK ``.pth`` state dicts (see :mod:`steerlex.sae.foreign`); :func:`load_sae` detects which.

Weights are read only with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

import steerlex
from steerlex.core.errors import SAEError
from steerlex.core.io import file_mode, sha256_file
from steerlex.core.io import read_json_object as read_json
from steerlex.sae.base import SAE_ARCHITECTURES, SAEConfig, SparseAutoencoder, sae_class

__all__ = [
    "FORMATS",
    "SAELENS_CFG",
    "SAELENS_WEIGHTS",
    "SaeFormat",
    "convert_sae",
    "detect_format",
    "hook_kind",
    "hook_name_for_layer",
    "layer_from_hook_name",
    "load_sae",
    "load_saelens",
    "saelens_cfg",
    "save_sae",
]

SaeFormat = Literal["saelens", "sparsify", "pth"]
FORMATS: tuple[SaeFormat, ...] = ("saelens", "sparsify", "pth")
WRITABLE_FORMATS = ("saelens", "sparsify")

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"  # eai-sparsify: cfg.json + sae.safetensors
SPARSIFY_SIDECAR = "steerlex.json"  # steerlex's block beside a sparsify cfg.json
PTH_SUFFIXES = (".pth", ".pt", ".ckpt")

#: ``metadata.sae_lens_version`` we write: the SAELens config layout we follow (v6). SAELens
#: treats a missing or older version as a pre-6 config and rewrites it, so it must be >= 6.
SAELENS_FORMAT_VERSION = "6.0.0"
#: Version of the ``metadata.steerlex`` block; bump when its meaning changes.
STEERLEX_BLOCK_VERSION = 1
#: What to do about SAE weights that fail their checksum.
REBUILD = (
    "Copy or download the SAE directory again, or rebuild it: rerun the `steerlex train-sae` "
    "command that made it (it resumes from its last checkpoint and saves again; in a run "
    "directory: `steerlex run --resume RUN_DIR --stage train-sae`)."
)

# SAELens normalisations that its inference SAE treats as the identity (the training
# statistics are folded into the weights when training ends) vs. ones it applies per token.
_IDENTITY_NORMS = ("none", "expected_average_only_in", "covariance_whitening")
_PER_TOKEN_NORMS = ("constant_norm_rescale", "layer_norm")
# Files that belong to a saved SAE (any format): replaced or removed when saving over it.
_SAE_DIR_FILES = frozenset(
    {SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, SPARSIFY_SIDECAR, "sparsity.safetensors"}
)
# Provenance fields taken from the steerlex block (the math comes from SAELens's own keys).
PROVENANCE_FIELDS = ("model_spec", "weights_id", "layer", "hf_hook_name", "keep", "extra")

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_HF_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)[._](\d+)$")
_TL_BLOCK_RE = re.compile(r"^blocks\.\d+\.(.+)$")


# --- hook names -----------------------------------------------------------------------


def hook_name_for_layer(layer: int) -> str:
    """TransformerLens name of "the output of decoder block ``layer``": ``blocks.L.hook_resid_post``."""
    return f"blocks.{layer}.hook_resid_post"


def layer_from_hook_name(hook_name: str | None) -> int | None:
    """steerlex layer (output of block L, 0-based) of a TransformerLens or HF hook name.

    ``blocks.L.hook_resid_post`` -> L; ``blocks.L.hook_resid_pre`` -> L - 1 (the input of
    block L is the output of block L - 1; ``None`` for L = 0, the embeddings);
    ``model.layers.L`` / ``layers.L`` / ``transformer.h.L`` -> L; anything else -> ``None``.
    """
    if not hook_name:
        return None
    m = _HOOK_RE.match(hook_name)
    if m:
        layer = int(m.group(1))
        if m.group(2) == "post":
            return layer
        return layer - 1 if layer > 0 else None
    m = _HF_LAYER_RE.search(hook_name)
    return int(m.group(1)) if m else None


def hook_kind(hook_name: str | None, hf_hook_name: str | None = None) -> str | None:
    """The kind of activation a hook reads: its TransformerLens hook point without the block.

    ``blocks.5.hook_mlp_out`` -> ``hook_mlp_out``; ``blocks.3.attn.hook_z`` -> ``attn.hook_z``;
    ``hook_embed`` -> ``hook_embed``; a decoder-layer output name (``model.layers.L``,
    ``transformer.h.L``, as :func:`layer_from_hook_name` reads it) -> ``hook_resid_post``;
    any other name is returned as it is. ``hook_name`` is used when given, else
    ``hf_hook_name``; ``None`` when neither is known.
    """
    name = hook_name or hf_hook_name
    if not name:
        return None
    m = _TL_BLOCK_RE.match(name)
    if m:
        return m.group(1)
    return "hook_resid_post" if _HF_LAYER_RE.search(name) else name


# --- small readers shared with foreign.py --------------------------------------------------


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse ``path`` as a JSON object, or raise :class:`SAEError` naming the file."""
    return read_json(
        path,
        what="SAE config",
        fix="restore it from the original SAE or re-save the SAE.",
        error=SAEError,
    )


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, on CPU; :class:`SAEError` if missing or damaged."""
    if not path.is_file():
        raise SAEError(
            f"SAE weights file {path} is missing; the directory must hold {path.name} next to "
            f"{SAELENS_CFG}. Copy the whole SAE directory, or re-save the SAE."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises SafetensorError (and OSError) for bad files
        raise SAEError(
            f"SAE weights file {path} is corrupted or truncated and cannot be read ({exc}); "
            "copy or download it again, or re-save the SAE."
        ) from None


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """sha256 of tensors' contents: each tensor's name, dtype, shape and bytes, in name
    order. Unlike a file hash it survives a re-save that keeps the tensors (SAELens's
    ``save_model`` writes other bytes for the same weights)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def check_weights_hash(
    tensors: Mapping[str, Tensor],
    block: Mapping[str, Any] | None,
    weights_path: Path,
    record: Path,
    *,
    rebuild: str,
) -> None:
    """Refuse tensors whose :func:`tensors_sha256` differs from the one steerlex recorded
    in ``block`` (``tensors_sha256``, in the file ``record``). An SAE without a recorded hash
    (written by another tool or an older steerlex) is used with a warning. ``rebuild``: how
    this SAE is made again, for the error message."""
    expected = (block or {}).get("tensors_sha256")
    if not isinstance(expected, str):
        warnings.warn(
            f"{weights_path} has no sha256 recorded by steerlex in {record.name}, so its "
            "integrity is not checked; `steerlex sae convert` writes a copy that records one.",
            stacklevel=3,
        )
        return
    if tensors_sha256(tensors) != expected:
        raise SAEError(
            f"SAE weights file {weights_path} does not match the sha256 recorded in {record} "
            f"(tensors_sha256): the file is damaged or was changed after saving. {rebuild}"
        )


def resolve_dtype(dtype: torch.dtype | str | None, default: str, *, where: str) -> str:
    """A floating torch dtype name (``"float32"``) from a dtype, a name or ``"torch.float32"``."""
    if dtype is None:
        dtype = default
    name = str(dtype).removeprefix("torch.")
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise SAEError(
            f"{where}: dtype '{dtype}' is not a floating-point torch dtype; use float32, "
            "float16 or bfloat16."
        )
    return name


def check_tensors(
    tensors: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    weights_path: Path,
    cfg_desc: str,
) -> None:
    """Check that each named tensor exists with the expected shape and finite values.

    ``cfg_desc`` names where the expected shapes came from (``"cfg.json (d_in=8, d_sae=32)"``)
    so that a mismatch message names both files.
    """
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise SAEError(
            f"SAE weights file {weights_path} lacks tensor(s) {missing} (it has "
            f"{sorted(tensors)}); it is not an SAE of this format or belongs to another SAE."
        )
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise SAEError(
                f"Shape mismatch: {cfg_desc} implies {name} of shape {list(shape)}, but "
                f"{weights_path} holds {name} of shape {list(got)}; the config and the weights "
                "do not belong together. Restore the matching pair or re-save the SAE."
            )
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SAEError(
                f"SAE weights file {weights_path} holds NaN or infinite values in {name}; the "
                "SAE is broken (a diverged training run?). Use another checkpoint."
            )


def build_sae(
    cfg: SAEConfig,
    *,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    W_dec: Tensor | None = None,
    latent_tensors: Mapping[str, Tensor] | None = None,
    device: torch.device | str | None = None,
    source: str,
) -> SparseAutoencoder:
    """A :class:`SparseAutoencoder` of ``cfg.architecture`` holding the given weights (shapes
    already checked).

    ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``b_dec [d_in]``, ``W_dec [d_sae, d_in]``
    (``None`` only when ``cfg.tied``), ``latent_tensors``: the architecture's extra
    ``[d_sae]`` tensors by name (JumpReLU: ``threshold``). The module is first built on the
    meta device and the tensors are then assigned, so no random init and no second copy of
    the weights is made. ``source`` (the file) prefixes config errors.
    """
    try:
        cfg.validate()
    except SAEError as exc:
        raise SAEError(f"{source}: {exc}") from None
    dtype = getattr(torch, cfg.dtype)
    target = torch.device(device) if device is not None else torch.device("cpu")

    def prep(t: Tensor) -> Tensor:
        return t.detach().to(device=target, dtype=dtype).contiguous()

    state: dict[str, Tensor] = {"W_enc": prep(W_enc), "b_enc": prep(b_enc), "b_dec": prep(b_dec)}
    if not cfg.tied:
        if W_dec is None:
            raise SAEError(f"{source}: an untied SAE needs a decoder matrix W_dec.")
        state["W_dec_free"] = prep(W_dec)
    cls = sae_class(cfg.architecture)
    for name in cls.latent_tensors:
        tensor = (latent_tensors or {}).get(name)
        if tensor is None:
            raise SAEError(f"{source}: a {cls.title} SAE needs a {name} tensor [d_sae].")
        state[name] = prep(tensor)
    with torch.device("meta"):
        sae = SparseAutoencoder(cfg)
    sae.load_state_dict(state, assign=True)
    return sae


# --- atomic directory writes ----------------------------------------------------------------


def _fsync_tree(directory: Path) -> None:
    for p in directory.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _same_file(a: Path, b: Path) -> bool:
    if not (a.is_file() and b.is_file()) or a.stat().st_size != b.stat().st_size:
        return False
    return sha256_file(a) == sha256_file(b)


def write_sae_dir(directory: Path, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Write an SAE's files into ``directory`` via a temp directory; ``write`` fills the temp dir.

    - New or empty ``directory``: the temp dir is built beside it and renamed into place
      (fully atomic).
    - ``directory`` already holds byte-identical SAE files: nothing is written (saving the
      same SAE twice is a no-op).
    - It holds a different SAE: refused unless ``overwrite=True``.
    - Otherwise (also when it holds other files, e.g. a training run's checkpoints and log,
      which are kept) the files are moved in one by one with atomic renames: the old
      ``cfg.json`` is removed first and the new one moved in last, so an interrupted save
      leaves a directory without ``cfg.json`` (a clear error on load), never a config paired
      with the wrong weights. SAE files of another format left there are removed.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise SAEError(f"Cannot save an SAE to {directory}: it is a file; choose a directory path.")
    existing = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    if not existing:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent)
        )
        try:
            write(tmp)
            _fsync_tree(tmp)
            os.chmod(tmp, file_mode(directory=True))  # mkdtemp makes it private (0o700)
            if directory.exists():
                directory.rmdir()
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    tmp = Path(tempfile.mkdtemp(prefix=".sae-", suffix=".tmp", dir=directory))
    try:
        write(tmp)
        _fsync_tree(tmp)
        new = sorted(p.name for p in tmp.iterdir())
        present = existing & _SAE_DIR_FILES
        stale = present - set(new)
        if (
            not stale
            and set(new) <= existing
            and all(_same_file(tmp / name, directory / name) for name in new)
        ):
            return directory
        if present and not overwrite:
            raise SAEError(
                f"{directory} already holds a different SAE ({sorted(present)}); pass "
                "overwrite=True (CLI: --overwrite) to replace it, or choose another directory."
            )
        (directory / SAELENS_CFG).unlink(missing_ok=True)
        for name in stale:
            (directory / name).unlink(missing_ok=True)
        for name in sorted(new, key=lambda n: n == SAELENS_CFG):  # cfg.json last
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def save_safetensors(tensors: Mapping[str, Tensor], path: Path) -> None:
    """Write tensors (moved to CPU, made contiguous) to a safetensors file."""
    save_file(
        {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()},
        str(path),
        metadata={"format": "pt"},
    )
    os.chmod(path, file_mode())  # safetensors creates its files private (0o600)


# --- SAELens: write ---------------------------------------------------------------------


def saelens_cfg(sae: SparseAutoencoder) -> dict[str, Any]:
    """The ``cfg.json`` dict for a *folded* SAE (``norm_scale`` 1, untied): SAELens v6 keys
    plus ``metadata.steerlex`` with the full :class:`SAEConfig`."""
    c = sae.cfg
    cls = type(sae)
    if cls.saelens_architecture is None:
        raise SAEError(
            f"A {cls.title} SAE has no SAELens inference form of its own; pass "
            "sae.for_inference() (save_sae does)."
        )
    if c.norm_scale != 1.0 or c.tied:
        raise SAEError("saelens_cfg needs a folded SAE; call sae.folded() first.")
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # not trained by SAELens
    }
    if c.model_spec:
        metadata["model_name"] = c.model_spec
    if c.layer is not None:
        metadata["hook_name"] = hook_name_for_layer(c.layer)
    elif c.extra.get("saelens_hook_name"):  # a loaded SAE of a hook steerlex has no layer for
        metadata["hook_name"] = c.extra["saelens_hook_name"]
    if c.hf_hook_name:
        metadata["hf_hook_name"] = c.hf_hook_name
    if c.extra.get("training_architecture"):  # as SAELens records e.g. BatchTopK -> JumpReLU
        metadata["training_architecture"] = c.extra["training_architecture"]
    metadata["steerlex"] = {
        "format_version": STEERLEX_BLOCK_VERSION,
        "steerlex_version": steerlex.__version__,
        "config": c.to_dict(),
    }
    out: dict[str, Any] = {
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": c.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if "k" in cls.saelens_keys:
        out["k"] = c.k
    if "rescale_acts_by_decoder_norm" in cls.saelens_keys:
        out["rescale_acts_by_decoder_norm"] = False  # decoder norms are folded on loading
    out["architecture"] = cls.saelens_architecture
    return out


def save_sae(sae: SparseAutoencoder, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Save ``sae`` as a SAELens v6 directory (``cfg.json`` + ``sae_weights.safetensors``).

    Writes ``sae.for_inference().folded()`` so the files act on raw activations (a BatchTopK
    SAE is written as JumpReLU). The write is atomic (temp directory + rename). Saving the
    same SAE again is a no-op; replacing a different SAE needs ``overwrite=True``. Returns
    the directory.
    """
    folded = sae.for_inference().folded()
    cfg = saelens_cfg(folded)
    try:
        json.dumps(cfg)
    except (TypeError, ValueError) as exc:
        raise SAEError(
            f"Cannot save the SAE config as JSON ({exc}); keep SAEConfig.extra to JSON values "
            "(str, int, float, bool, None, lists and dicts of them)."
        ) from None

    weights = folded.weights()
    cfg["metadata"]["steerlex"]["tensors_sha256"] = tensors_sha256(weights)
    text = json.dumps(cfg, indent=2) + "\n"

    def write(tmp: Path) -> None:
        save_safetensors(weights, tmp / SAELENS_WEIGHTS)
        (tmp / SAELENS_CFG).write_text(text, encoding="utf-8")

    return write_sae_dir(Path(directory), write, overwrite=overwrite)


# --- SAELens: read ---------------------------------------------------------------------------


def _require_int(raw: Mapping[str, Any], key: str, cfg_path: Path) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SAEError(
            f"SAE config {cfg_path} needs an integer '{key}', got {value!r}; it is not a "
            "SAELens SAE config or it is damaged."
        )
    return value


def _saelens_classes() -> dict[str, type[SparseAutoencoder]]:
    """SAELens architecture name -> the registered class saved and loaded as it."""
    return {
        cls.saelens_architecture: cls
        for _, cls in SAE_ARCHITECTURES.items()
        if cls.saelens_architecture is not None
    }


def _saelens_architecture(raw: Mapping[str, Any], cfg_path: Path) -> tuple[str, int | None]:
    """(SAELens architecture, k) of a v6 or pre-6 config."""
    arch = raw.get("architecture")
    k = raw.get("k")
    act = raw.get("activation_fn", raw.get("activation_fn_str"))
    kwargs = raw.get("activation_fn_kwargs") or {}
    if act == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        arch, k = "topk", kwargs["k"]  # pre-6 TopK configs
    if arch is None:
        arch = "standard"
    known = _saelens_classes()
    if not isinstance(arch, str) or arch not in known:
        raise SAEError(
            f"SAE config {cfg_path} has architecture {arch!r}, which steerlex cannot load; "
            f"supported SAELens architectures: {', '.join(sorted(known))}. Use an SAE "
            "of one of these kinds, or train one with `steerlex train-sae`."
        )
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise SAEError(f"SAE config {cfg_path} has a non-integer k={k!r}.")
    return arch, k


def _steerlex_block(raw: Mapping[str, Any], cfg_path: Path) -> dict[str, Any] | None:
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    block = (meta or {}).get("steerlex", raw.get("steerlex"))
    if block is None:
        return None
    if not isinstance(block, dict) or not isinstance(block.get("config"), dict):
        raise SAEError(f"SAE config {cfg_path} has a malformed 'steerlex' block; re-save the SAE.")
    version = block.get("format_version", 1)
    if not isinstance(version, int) or version > STEERLEX_BLOCK_VERSION:
        raise SAEError(
            f"SAE config {cfg_path} was written by a newer steerlex (block version {version}, "
            f"this one reads up to {STEERLEX_BLOCK_VERSION}); upgrade steerlex."
        )
    return block


def _saelens_provenance(
    raw: Mapping[str, Any], cfg_path: Path, arch: str, norm: str
) -> dict[str, Any]:
    """The :data:`PROVENANCE_FIELDS` of a SAELens config: from the steerlex block when there
    is one, else from SAELens's metadata (model, hook names, hook kind, source)."""
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    meta = meta or {}
    block = _steerlex_block(raw, cfg_path)
    if block is not None:
        prov = {key: block["config"].get(key) for key in PROVENANCE_FIELDS}
        prov["extra"] = dict(prov.get("extra") or {})
    else:
        hook = meta.get("hook_name", raw.get("hook_name", raw.get("hook_point")))
        hf_hook = meta.get("hf_hook_name")
        layer = layer_from_hook_name(hook)
        if layer is None:
            layer = layer_from_hook_name(hf_hook)
        extra: dict[str, Any] = {"source_format": "saelens", "saelens_architecture": arch}
        if hook:
            extra["saelens_hook_name"] = hook
        kind = hook_kind(hook, hf_hook)
        if kind is not None:
            extra["hook_kind"] = kind
        if meta.get("training_architecture"):
            extra["training_architecture"] = meta["training_architecture"]
        if norm != "none":
            extra["saelens_normalize_activations"] = norm
        prov = {
            "model_spec": meta.get("model_name", raw.get("model_name")),
            "weights_id": None,
            "layer": layer,
            "hf_hook_name": hf_hook,
            "keep": None,
            "extra": extra,
        }
    return prov


def load_saelens(
    directory: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    k: int | None = None,
) -> SparseAutoencoder:
    """Load a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``).

    Architectures: ``topk``, ``standard`` (ReLU), ``jumprelu``. TopK SAEs saved with
    ``rescale_acts_by_decoder_norm`` get the decoder norms folded into the encoder (same
    outputs). The architecture's class comes from the registry (``saelens_architecture``).
    Normalisations that SAELens's inference SAE treats as the identity (``none``,
    ``expected_average_only_in``, ``covariance_whitening``: folded at the end of training) are
    treated the same way; per-token ones (``layer_norm``, ``constant_norm_rescale``) raise.
    ``k`` overrides a TopK SAE's k. Provenance (model, layer, ...) comes from
    ``metadata.steerlex`` when present, else from SAELens's ``metadata`` (model_name,
    hook_name, hf_hook_name).
    """
    directory = Path(directory)
    cfg_path, weights_path = directory / SAELENS_CFG, directory / SAELENS_WEIGHTS
    raw = read_json_object(cfg_path)
    d_in = _require_int(raw, "d_in", cfg_path)
    d_sae = _require_int(raw, "d_sae", cfg_path)
    arch, file_k = _saelens_architecture(raw, cfg_path)
    cls = _saelens_classes()[arch]
    if k is not None and not cls.uses_k:
        raise SAEError(
            f"k={k} applies only to TopK SAEs (those that keep the k largest latents); "
            f"{directory} is a '{arch}' ({cls.title}) SAE."
        )

    norm = raw.get("normalize_activations", "none")
    if isinstance(norm, bool) or norm is None:  # pre-6 configs
        norm = "expected_average_only_in" if norm else "none"
    if norm in _PER_TOKEN_NORMS:
        raise SAEError(
            f"SAE config {cfg_path} uses normalize_activations='{norm}', which SAELens applies "
            "to every token at run time; steerlex SAEs cannot represent it. Use an SAE trained "
            "without it (or with the scale folded into the weights)."
        )
    if norm not in _IDENTITY_NORMS:
        raise SAEError(f"SAE config {cfg_path} has unknown normalize_activations={norm!r}.")
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise SAEError(
            f"SAE config {cfg_path} reshapes activations ({raw['reshape_activations']!r}, an "
            "attention-head SAE); steerlex uses residual-stream SAEs only."
        )

    tensors = read_safetensors(weights_path)
    check_weights_hash(
        tensors, _steerlex_block(raw, cfg_path), weights_path, cfg_path, rebuild=REBUILD
    )
    expected: dict[str, tuple[int, ...]] = {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_in),
        "b_enc": (d_sae,),
        "b_dec": (d_in,),
    }
    expected.update({name: (d_sae,) for name in cls.latent_tensors})
    check_tensors(
        tensors,
        expected,
        weights_path=weights_path,
        cfg_desc=f"{cfg_path} (d_in={d_in}, d_sae={d_sae})",
    )
    W_enc, W_dec, b_enc = tensors["W_enc"], tensors["W_dec"], tensors["b_enc"]
    compute = torch.float64 if W_enc.dtype == torch.float64 else torch.float32
    # Old SAELens "finetuning" scale multiplies latents before decoding: fold it into W_dec.
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        if key in tensors:
            check_tensors(
                tensors, {key: (d_sae,)}, weights_path=weights_path, cfg_desc=str(cfg_path)
            )
            W_dec = W_dec.to(compute) * tensors[key].to(compute)[:, None]
    if "rescale_acts_by_decoder_norm" in cls.saelens_keys and raw.get(
        "rescale_acts_by_decoder_norm"
    ):
        norms = W_dec.to(compute).norm(dim=-1).clamp_min(1e-8)
        W_enc = W_enc.to(compute) * norms[None, :]
        b_enc = b_enc.to(compute) * norms
        W_dec = W_dec.to(compute) / norms[:, None]

    prov = _saelens_provenance(raw, cfg_path, arch, norm)
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=(k if k is not None else file_k) if cls.uses_k else None,
        architecture=cls.name,
        tied=False,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        norm_scale=1.0,
        dtype=resolve_dtype(dtype, str(raw.get("dtype") or "float32"), where=str(cfg_path)),
        **prov,
    )
    return build_sae(
        cfg,
        W_enc=W_enc,
        b_enc=b_enc,
        b_dec=tensors["b_dec"],
        W_dec=W_dec,
        latent_tensors={name: tensors[name] for name in cls.latent_tensors},
        device=device,
        source=str(cfg_path),
    )


# --- detection, dispatch, conversion ------------------------------------------------------------


def _looks_sparsify(cfg: Mapping[str, Any]) -> bool:
    return "architecture" not in cfg and any(
        key in cfg for key in ("num_latents", "expansion_factor", "transcode", "skip_connection")
    )


def detect_format(path: str | Path) -> tuple[SaeFormat, Path]:
    """Which format ``path`` holds and the path to hand its loader.

    A ``.pth``/``.pt``/``.ckpt`` file -> ``"pth"``; a directory (or a ``cfg.json`` /
    weights file inside one) with ``sae_weights.safetensors`` or a SAELens ``cfg.json`` ->
    ``"saelens"``; with ``sae.safetensors`` or a sparsify ``cfg.json`` -> ``"sparsify"``.
    """
    p = Path(path)
    if not p.exists():
        raise SAEError(f"SAE path {p} does not exist; pass an SAE directory or a .pth file.")
    if p.is_file():
        if p.suffix.lower() in PTH_SUFFIXES:
            return "pth", p
        if p.name in (SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS):
            p = p.parent
        else:
            raise SAEError(
                f"Cannot tell the SAE format of {p}; pass a SAELens or sparsify SAE directory "
                f"(cfg.json + {SAELENS_WEIGHTS} or {SPARSIFY_WEIGHTS}) or a .pth state dict."
            )
    cfg_path = p / SAELENS_CFG
    candidates: tuple[tuple[str, SaeFormat], ...] = (
        (SAELENS_WEIGHTS, "saelens"),
        (SPARSIFY_WEIGHTS, "sparsify"),
    )
    for weights, fmt in candidates:
        if (p / weights).is_file():
            if not cfg_path.is_file():
                raise SAEError(
                    f"{p} has {weights} but no {SAELENS_CFG} (an interrupted save or a partial "
                    "copy); copy the SAE's cfg.json too, or save the SAE again."
                )
            return fmt, p
    if cfg_path.is_file():
        cfg = read_json_object(cfg_path)
        if _looks_sparsify(cfg):
            return "sparsify", p
        if "d_in" in cfg and "d_sae" in cfg:
            return "saelens", p  # its loader names the missing weights file
        raise SAEError(
            f"Cannot tell the SAE format of {cfg_path}: it has neither SAELens keys (d_in, "
            "d_sae, architecture) nor sparsify keys (num_latents, expansion_factor)."
        )
    subdirs = sorted(q.name for q in p.iterdir() if q.is_dir() and (q / SAELENS_CFG).is_file())
    if subdirs:
        shown = ", ".join(subdirs[:8]) + (", ..." if len(subdirs) > 8 else "")
        raise SAEError(
            f"{p} holds several SAEs ({shown}); pass one of them, e.g. {p / subdirs[0]}."
        )
    pths = sorted(q.name for q in p.iterdir() if q.suffix.lower() in PTH_SUFFIXES)
    hint = f" It has {pths}: pass that file." if pths else ""
    raise SAEError(
        f"{p} is not an SAE directory: it has no {SAELENS_CFG}.{hint} An SAE directory holds "
        f"cfg.json + {SAELENS_WEIGHTS} (SAELens) or cfg.json + {SPARSIFY_WEIGHTS} (sparsify)."
    )


def load_sae(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    k: int | None = None,
    format: SaeFormat | None = None,
) -> SparseAutoencoder:
    """Load an SAE from any supported format (auto-detected unless ``format`` is given).

    ``path``: a SAELens directory, an eai-sparsify directory, or a tied TopK ``.pth``.
    ``device``/``dtype``: where and in what precision to put the weights (default: CPU, the
    file's dtype). ``k``: TopK k; required for a ``.pth`` that does not record it, and for
    the other formats it overrides the file's k.
    """
    if format is None:
        format, path = detect_format(path)
    elif format not in FORMATS:
        raise SAEError(f"Unknown SAE format {format!r}; choose one of {', '.join(FORMATS)}.")
    if format == "saelens":
        return load_saelens(path, device=device, dtype=dtype, k=k)
    from steerlex.sae import foreign

    if format == "sparsify":
        return foreign.load_sparsify(path, device=device, dtype=dtype, k=k)
    return foreign.load_pth(path, device=device, dtype=dtype, k=k)


def convert_sae(
    src: str | Path,
    dst: str | Path,
    *,
    to: str = "saelens",
    k: int | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Convert the SAE at ``src`` (any readable format) to ``to`` at ``dst``; returns ``dst``.

    ``to``: ``"saelens"`` (canonical) or ``"sparsify"``. ``k``: TopK k for a ``.pth`` without
    one. ``dtype``: convert the weights (default: keep). Atomic; see :func:`save_sae`.
    """
    if to not in WRITABLE_FORMATS:
        raise SAEError(
            f"Cannot write SAE format {to!r}; steerlex writes {', '.join(WRITABLE_FORMATS)} "
            "(.pth is read-only)."
        )
    sae = load_sae(src, k=k, dtype=dtype)
    if to == "saelens":
        return save_sae(sae, dst, overwrite=overwrite)
    from steerlex.sae import foreign

    return foreign.save_sparsify(sae, dst, overwrite=overwrite)
