"""The shared run context: what is already loaded, handed from one job to the next.

Every job takes a :class:`RunContext`. It loads each model, SAE and activation store the
first time a job asks for it and hands the same object to every later job of the run, so
``steerlex run`` loads its model once. It also carries how to report: whether to show
progress bars and where progress lines go.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from steerlex.activations.store import ActivationStore
from steerlex.models.loading import LoadedModel, load_config, load_model
from steerlex.sae.base import SparseAutoencoder
from steerlex.sae.formats import load_sae

__all__ = ["ModelLoad", "RunContext"]


@dataclass(frozen=True)
class ModelLoad:
    """One model load of a run (for the record and the tests)."""

    spec: str
    device: str
    dtype: str


def _stamp(path: Path) -> tuple[int, ...]:
    """Change stamps of a directory's files (an SAE saved again is loaded again)."""
    if path.is_file():
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return tuple(x for p in files for x in (p.stat().st_mtime_ns, p.stat().st_size))


@dataclass
class RunContext:
    """Loaded models, SAEs and stores, keyed by what identifies them, plus reporting.

    ``progress``: show progress bars. ``log``: where progress lines go (``None``: quiet;
    default standard error as it is when a line is written).
    """

    progress: bool = True
    log: TextIO | str | None = "stderr"
    model_loads: list[ModelLoad] = field(default_factory=list)
    _models: dict[tuple[str, str, str], LoadedModel] = field(default_factory=dict, repr=False)
    _tokenizers: dict[str, Any] = field(default_factory=dict, repr=False)
    _saes: dict[tuple[str, str, str], tuple[tuple[int, ...], SparseAutoencoder]] = field(
        default_factory=dict, repr=False
    )
    _stores: dict[str, tuple[tuple[int, ...], ActivationStore]] = field(
        default_factory=dict, repr=False
    )

    def stream(self) -> TextIO | None:
        """Where progress lines go now (``None``: nowhere)."""
        if isinstance(self.log, str):
            return sys.stderr
        return self.log

    def say(self, message: str) -> None:
        """One progress line (to ``log``)."""
        out = self.stream()
        if out is not None:
            print(message, file=out, flush=True)

    def model(self, spec: str, *, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
        """The model ``spec`` on ``device`` in ``dtype``, loaded on first use. ``device``
        ``"auto"`` spreads it over the GPUs (accelerate's ``device_map="auto"``)."""
        key = (spec, device, dtype)
        if key not in self._models:
            auto = device == "auto"
            self._models[key] = load_model(
                spec,
                dtype=dtype,
                device=None if auto else device,
                device_map="auto" if auto else None,
            )
            self.model_loads.append(ModelLoad(spec, device, dtype))
        return self._models[key]

    def add_model(
        self, loaded: LoadedModel, *, device: str = "cpu", dtype: str = "float32"
    ) -> None:
        """Use an already loaded model for ``loaded.spec`` (notebooks, tests)."""
        self._models[(loaded.spec, device, dtype)] = loaded

    def loaded_model(self, spec: str) -> LoadedModel | None:
        """A model of ``spec`` already loaded (on any device, in any dtype), else ``None``;
        loads nothing."""
        return next((m for (s, _, _), m in self._models.items() if s == spec), None)

    def tokenizer(self, spec: str) -> Any:
        """The tokenizer of ``spec``: a loaded model's when there is one, else the tokenizer
        alone (no weights are read)."""
        for (s, _, _), loaded in self._models.items():
            if s == spec:
                return loaded.tokenizer
        if spec not in self._tokenizers:
            self._tokenizers[spec] = load_config(spec)[1]
        return self._tokenizers[spec]

    def sae(self, path: str | Path, *, device: str = "cpu") -> SparseAutoencoder:
        """The SAE at ``path`` on ``device``; loaded again when its files changed."""
        p = Path(path)
        key = (str(p.resolve()), device, "")
        stamp = _stamp(p)
        hit = self._saes.get(key)
        if hit is None or hit[0] != stamp:
            self._saes[key] = (stamp, load_sae(p, device=device))
        return self._saes[key][1]

    def store(self, path: str | Path, *, verify: bool = True) -> ActivationStore:
        """The activation store at ``path``; opened again when its index changed. ``verify``:
        refuse it when a shard's sha256 differs from its index (each file hashed once, then
        memoised by size and mtime)."""
        p = Path(path)
        key = str(p.resolve())
        stamp = _stamp(p / "index.json")
        hit = self._stores.get(key)
        if hit is None or hit[0] != stamp:
            self._stores[key] = (stamp, ActivationStore.open(p))
        store = self._stores[key][1]
        if verify:
            store.require_intact()
        return store
