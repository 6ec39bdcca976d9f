"""The package's import graph: library code never imports the CLI, and the subpackages
form no cycle (every import counts, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import steerlex

ROOT = Path(steerlex.__file__).parent
CLI = "steerlex.cli"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m == "steerlex" or m.startswith("steerlex.")}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _unit(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to: ``steerlex.sae``."""
    return ".".join(module.split(".")[:2])


def _is_cli(module: str) -> bool:
    return module == CLI or module.startswith(CLI + ".")


def test_library_code_never_imports_the_cli() -> None:
    bad = sorted(
        f"{mod} imports {imp}"
        for mod, imps in _graph().items()
        if not _is_cli(mod)
        for imp in imps
        if _is_cli(imp)
    )
    assert not bad, "library modules import the CLI:\n" + "\n".join(bad)


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_subpackages() -> None:
    modules = set(_graph())
    edges: dict[str, set[str]] = {}
    for mod, imps in _graph().items():
        src = _unit(mod)
        for imp in imps:
            # "from steerlex.x import name" names a module or an attribute of one
            target = imp if imp in modules else imp.rsplit(".", 1)[0]
            dst = _unit(target)
            if dst != src and dst != "steerlex" and src != "steerlex":
                edges.setdefault(src, set()).add(dst)
    cycle = _cycle(edges)
    assert cycle is None, "import cycle between subpackages: " + " -> ".join(cycle or [])


def test_the_checks_see_a_cycle_and_a_cli_import() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert _is_cli("steerlex.cli.harvest") and not _is_cli("steerlex.commands")
