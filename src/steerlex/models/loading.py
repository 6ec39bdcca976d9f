"""Load a causal LM and its tokenizer from a model spec string.

A spec is one of:

- ``embedded:NAME`` — a model that ships in pip packages (see ``steerlex models``);
- a path to a ``.gguf`` file;
- a local directory saved by transformers (``save_pretrained``);
- a Hugging Face hub id such as ``Qwen/Qwen2.5-0.5B-Instruct`` (needs network).

:func:`load_model` is the one function every stage uses to get a model. It checks the device
(:func:`check_device`) before anything is read or converted. :func:`context_length` is the
model's context (prompt plus reply), which every generating command checks prompts against.
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

    @property
    def context_length(self) -> int | None:
        """Most positions (prompt plus generated tokens) the model takes; ``None``: unknown."""
        return context_length(self.model)


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(model: Any) -> int | None:
    """The context of ``model`` (a transformers model or its config) in tokens: the prompt plus
    the reply must fit in it. Read from ``max_position_embeddings`` (or ``n_positions``, ...;
    a multimodal config's ``text_config``); ``None`` when the config names none."""
    config = getattr(model, "config", model)
    for cfg in (config, getattr(config, "text_config", None)):
        for key in _CONTEXT_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


_INSTALL_CUDA = (
    "install a CUDA build of torch (the pip command for your CUDA driver is at "
    "https://pytorch.org/get-started/locally/, e.g. pip install torch --index-url "
    "https://download.pytorch.org/whl/cu128)"
)


def available_devices() -> list[str]:
    """The devices this torch can use here: ``cpu``, then ``cuda:N``, ``mps``, ``xpu:N``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        out.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        out += [f"xpu:{i}" for i in range(xpu.device_count())]
    return out


def check_device(device: str | torch.device, what: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device`, or a ModelSpecError (before any weights are read)
    when it is malformed or not usable here: a CPU-only torch asked for ``cuda``, a GPU index
    past the last GPU, ``mps`` off a Mac. The message lists the devices there are.

    ``what`` names the input in the message (``"--device"`` from the command line).
    """
    here = ", ".join(available_devices())
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, ValueError, TypeError):
        raise ModelSpecError(
            f"{what} {str(device)!r} is not a torch device; use cpu, cuda, cuda:N or mps "
            f"(devices here: {here})."
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if torch.version.cuda is None:
                raise ModelSpecError(
                    f"{what} {str(device)!r}: this torch ({torch.__version__}) is built without "
                    f"CUDA, so it cannot use a GPU. Use cpu, or {_INSTALL_CUDA}. Devices here: "
                    f"{here}."
                )
            raise ModelSpecError(
                f"{what} {str(device)!r}: torch {torch.__version__} has CUDA "
                f"{torch.version.cuda} but sees no GPU (no NVIDIA driver, or CUDA_VISIBLE_DEVICES "
                f"hides them; nvidia-smi tells). Use cpu, or fix the driver. Devices here: {here}."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ModelSpecError(
                f"{what} {str(device)!r}: there {'is' if count == 1 else 'are'} only {count} "
                f"CUDA device{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1}); pick one "
                f"of {here}."
            )
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            why = (
                "this machine has no Apple GPU (mps is macOS on Apple silicon only)"
                if torch.backends.mps.is_built()
                else "this torch is built without MPS (mps is macOS on Apple silicon only)"
            )
            raise ModelSpecError(f"{what} {str(device)!r}: {why}. Use one of: {here}.")
        return dev
    if dev.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise ModelSpecError(
                f"{what} {str(device)!r}: torch sees no Intel GPU (xpu). Use one of: {here}."
            )
        if dev.index is not None and dev.index >= xpu.device_count():
            raise ModelSpecError(f"{what} {str(device)!r}: no such xpu device; use one of: {here}.")
        return dev
    raise ModelSpecError(
        f"{what} {str(device)!r}: steerlex runs models on cpu, cuda, mps or xpu, not "
        f"{dev.type}; use one of: {here}."
    )


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

    Raises:
        ModelSpecError: a bad spec or dtype, or a ``device`` that is malformed or not usable
            here (checked first, before anything is read: see :func:`check_device`).
    """
    if device_map is None and device is not None:
        device = check_device(device)
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
