"""Load a causal LM and its tokenizer from a model spec string.

A spec is one of:

- ``embedded:NAME`` — a model that ships in pip packages (see ``steerlex models``);
- a path to a ``.gguf`` file;
- a local directory saved by transformers (``save_pretrained``);
- a Hugging Face hub id such as ``Qwen/Qwen2.5-0.5B-Instruct`` (needs network).

:func:`load_model` is the one function every stage uses to get a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from steerlex.core.errors import ModelSpecError
from steerlex.hub import hub_unreachable_reason, offline_vars
from steerlex.models.cache import cached_sha256
from steerlex.models.embedded import EMBEDDED, MARKER, prepare_embedded, prepare_gguf_file

SpecKind = Literal["embedded", "gguf", "local", "hub"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a model spec points, before any weights are read."""

    spec: str
    kind: SpecKind
    location: str  # embedded name, file path, directory or hub id


@dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    spec: str
    kind: SpecKind
    source: str  # human-readable origin of the weights
    weights_id: str  # "sha256:<hex>" of the source file(s), or "hub:<id>@<commit>"
    path: str | None  # the directory transformers loaded from, if local

    @property
    def name(self) -> str:
        """A short display name (the embedded name, the file or directory name, or the hub id)."""
        if self.kind == "embedded":
            return self.spec.removeprefix("embedded:")
        if self.kind == "hub":
            return self.spec
        return Path(self.spec).name.removesuffix(".gguf")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_spec(spec: str) -> ResolvedSpec:
    """Classify ``spec`` without loading anything; raise ModelSpecError when unusable."""
    if not spec or not spec.strip():
        raise ModelSpecError("The model spec is empty. " + _SPEC_HELP)
    spec = spec.strip()
    if spec.startswith("embedded:"):
        name = spec.removeprefix("embedded:")
        if name not in EMBEDDED:
            known = ", ".join(f"embedded:{n}" for n in EMBEDDED)
            raise ModelSpecError(f"Unknown embedded model '{spec}'. Known: {known}.")
        return ResolvedSpec(spec, "embedded", name)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"The GGUF file '{spec}' does not exist.")
        return ResolvedSpec(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"The directory '{spec}' holds no config.json; pass a directory written by "
                "transformers' save_pretrained, a .gguf file, or an embedded model. " + _SPEC_HELP
            )
        return ResolvedSpec(spec, "local", str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or path.exists():
        raise ModelSpecError(f"The model path '{spec}' does not exist. " + _SPEC_HELP)
    if spec.count("/") == 1 and all(part for part in spec.split("/")):
        return ResolvedSpec(spec, "hub", spec)
    raise ModelSpecError(f"Unknown model spec '{spec}'. " + _SPEC_HELP)


_SPEC_HELP = (
    "A model spec is embedded:NAME (see `steerlex models`), a path to a .gguf file, "
    "a local transformers directory, or a Hugging Face hub id like Org/Model."
)


def model_dir(resolved: ResolvedSpec) -> tuple[str, str, str]:
    """Return (directory or hub id to load from, source description, weights id).

    Embedded models and GGUF files are converted into the cache on first use.
    """
    if resolved.kind == "embedded":
        em = EMBEDDED[resolved.location]
        path = prepare_embedded(resolved.location)
        pkgs = ", ".join(sorted({f"{p.package}=={p.version}" for p in em.parts}))
        source = f"pip packages {pkgs} (GGUF sha256 verified), safetensors cache {path}"
        return str(path), source, f"sha256:{em.sha256}"
    if resolved.kind == "gguf":
        gguf = Path(resolved.location)
        path = prepare_gguf_file(gguf)
        return (
            str(path),
            f"GGUF file {gguf}, safetensors cache {path}",
            f"sha256:{cached_sha256(gguf)}",
        )
    if resolved.kind == "local":
        directory = Path(resolved.location)
        marker = directory / MARKER
        weights = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
        if marker.is_file():  # one of our caches: the source hash is recorded
            digest = json.loads(marker.read_text())["sha256"]
        else:
            h = hashlib.sha256()
            for w in weights:
                h.update(w.name.encode() + b"\0" + cached_sha256(w).encode())
            digest = h.hexdigest()
        return str(directory), f"local directory {directory}", f"sha256:{digest}"
    return resolved.location, f"Hugging Face hub {resolved.location}", f"hub:{resolved.location}"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map 'float32' / 'float16' / 'bfloat16' (or a torch.dtype) to a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelSpecError(f"Unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_config(spec: str) -> tuple[Any, Any, ResolvedSpec, str, str]:
    """Config and tokenizer only, no weights: (config, tokenizer, resolved, source, weights id).

    An embedded model or GGUF file is converted into the cache first if needed.
    """
    resolved = resolve_spec(spec)
    location, source, weights_id = model_dir(resolved)
    config = _from_pretrained(AutoConfig, location, spec)
    tokenizer = _from_pretrained(AutoTokenizer, location, spec)
    return config, tokenizer, resolved, source, weights_id


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load the model and tokenizer named by ``spec``, in eval mode.

    ``device`` places the whole model; pass ``device_map`` (e.g. "auto") instead to
    let accelerate spread it over GPUs, in which case ``device`` is ignored.
    Remote code is never run unless ``trust_remote_code=True``.
    """
    resolved = resolve_spec(spec)
    torch_dtype = parse_dtype(dtype)
    location, source, weights_id = model_dir(resolved)
    tokenizer = _from_pretrained(AutoTokenizer, location, spec, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = _from_pretrained(AutoModelForCausalLM, location, spec, **kwargs)
    if device_map is None and device is not None:
        model.to(device)
    model.eval()
    if resolved.kind == "hub":
        commit = getattr(model.config, "_commit_hash", None)
        weights_id = f"hub:{resolved.location}@{commit or 'unknown'}"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        kind=resolved.kind,
        source=source,
        weights_id=weights_id,
        path=None if resolved.kind == "hub" else location,
    )


def _from_pretrained(cls: Any, location: str, spec: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with hub and file failures turned into ModelSpecErrors.

    A hub id with no reachable hub is looked up in the local hub cache only, so an
    offline machine fails in seconds instead of retrying for a minute.
    """
    is_dir = Path(location).is_dir()
    reachable = is_dir or (not offline_vars() and hub_unreachable_reason() is None)
    if not reachable:
        kwargs["local_files_only"] = True
    try:
        return cls.from_pretrained(location, **kwargs)
    except OSError as exc:
        if is_dir:
            raise ModelSpecError(f"Could not load '{spec}' from {location}: {exc}") from exc
        raise ModelSpecError(
            f"Could not load the hub model '{spec}'"
            + (
                " (the hub is unreachable and it is not in the local hub cache)"
                if not reachable
                else " (no such model, or it needs a login)"
            )
            + ". Use an embedded model such as embedded:qwen2.5-coder-0.5b-instruct "
            "(see `steerlex models`), a local directory saved by transformers, or a .gguf file."
        ) from exc
