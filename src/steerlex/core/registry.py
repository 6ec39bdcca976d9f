"""Registries: named, open sets of plug-ins (SAE architectures, explanation methods, defences).

A registry is filled by the modules that define its entries: each one calls
``REGISTRY.register(...)`` when it is imported. The built-in entries live in one package
per registry, and every module of that package is imported the first time the registry
is read, so adding a built-in entry is adding one module. Code outside steerlex adds
entries the same way, by importing its module first, or through the ``steerlex.plugins``
entry-point group of its own package (each entry point names a module to import), so that
the CLI and ``steerlex run`` see the entries too.

Everything that offers a choice (CLI ``choices``, config validation, the report) reads
the registry, never a list of its own.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from steerlex.core.errors import SteerlexError

__all__ = ["PLUGIN_GROUP", "Registry", "load_plugins"]

T = TypeVar("T")

PLUGIN_GROUP = "steerlex.plugins"
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module named in the ``steerlex.plugins`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            importlib.import_module(ep.value.split(":")[0])
        except Exception as exc:  # a broken plug-in must name itself, not break steerlex
            raise SteerlexError(
                f"The steerlex plug-in {ep.name!r} ({ep.value}) failed to import: {exc}; fix "
                "or uninstall the package that declares it."
            ) from exc


class Registry(Generic[T]):
    """Entries of one kind by name, in display order.

    ``kind`` names the entries in messages (``"explanation method"``). ``package`` is the
    dotted name of the package whose modules hold the built-in entries; they are imported
    on first read. ``order`` (given at registration, default 100) sorts entries for display
    and defaults; ties keep registration order.
    """

    def __init__(
        self, kind: str, package: str | None = None, error: type[SteerlexError] = SteerlexError
    ) -> None:
        self.kind = kind
        self.package = package
        self.error = error
        self._entries: dict[str, tuple[int, int, T]] = {}
        self._loaded = package is None

    def register(self, name: str, *, order: int = 100) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` on a class (or any object)."""

        def add(item: T) -> T:
            self.add(name, item, order=order)
            return item

        return add

    def add(self, name: str, item: T, *, order: int | None = None, replace: bool = False) -> None:
        """Register ``item`` as ``name`` (``order``: default 100, or the replaced entry's); a
        name already taken raises unless ``replace``."""
        if not name or not isinstance(name, str):
            raise self.error(f"A {self.kind} needs a non-empty name, got {name!r}.")
        old = self._entries.get(name)
        if old is not None and not replace and old[2] is not item:
            raise self.error(f"The {self.kind} {name!r} is registered twice; choose another name.")
        rank = order if order is not None else (old[0] if old is not None else 100)
        seq = old[1] if old is not None else len(self._entries)
        self._entries[name] = (rank, seq, item)

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register a toy entry clean up with this)."""
        self._entries.pop(name, None)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        assert self.package is not None
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{self.package}.{info.name}")
        load_plugins()

    def names(self) -> tuple[str, ...]:
        """Every registered name, in display order."""
        self._load()
        ranked = sorted(self._entries.items(), key=lambda kv: (kv[1][0], kv[1][1]))
        return tuple(name for name, _ in ranked)

    def get(self, name: str) -> T:
        """The entry ``name``; an unknown name raises naming the choices."""
        self._load()
        if name not in self._entries:
            raise self.error(
                f"Unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}."
            )
        return self._entries[name][2]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs in display order."""
        return [(n, self.get(n)) for n in self.names()]
