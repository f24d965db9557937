"""The core modules import each other without a cycle, counting every import.

Lazy imports inside functions and imports under ``if TYPE_CHECKING:`` count
too: a cycle hidden in either still means two modules that cannot be
understood (or type-checked, or loaded in isolation) one without the other.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import ast
from pathlib import Path

import cancellable

PACKAGE = Path(cancellable.__file__).resolve().parent
CORE = ("_scope", "_hooks", "_timer", "_exceptions", "_config", "_log", "events")


def imports_of(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its source (relative or absolute)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.level == 1 and node.module is not None:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 0 and (node.module or "").startswith("cancellable."):
                found.add(node.module.split(".")[1])  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cancellable."):
                    found.add(alias.name.split(".")[1])
    return found


def graph() -> dict[str, set[str]]:
    """Core module -> the core modules it imports."""
    return {module: imports_of(module) & set(CORE) for module in CORE}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``edges`` as a list of modules (first == last), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for target in sorted(edges[node]):
            cycle = visit(target, [*path, node])
            if cycle is not None:
                return cycle
        done.add(node)
        return None

    for start in sorted(edges):
        cycle = visit(start, [])
        if cycle is not None:
            return cycle
    return None


class TestCoreImportGraph:
    def test_no_cycle(self):
        """No chain of imports among the core modules leads back to where it started."""
        assert None is find_cycle(graph())

    def test_scope_imports_hooks_not_the_other_way_round(self):
        """``_scope`` runs hooks through ``_hooks``; ``_hooks`` knows nothing of scopes."""
        edges = graph()

        assert "_hooks" in edges["_scope"]
        assert "_scope" not in edges["_hooks"]

    def test_timer_imports_nothing_of_the_package(self):
        """``_timer`` is the bottom layer: deadlines reach ``_scope`` through a registered door."""
        assert set() == imports_of("_timer")

    def test_the_cycle_finder_finds_cycles(self):
        """The checker itself reports a cycle, including one through a lazy import."""
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}

        assert ["a", "b", "c", "a"] == find_cycle(edges)
        assert None is find_cycle({"a": {"b"}, "b": set()})

    def test_lazy_and_type_checking_imports_count(self, tmp_path, monkeypatch):
        """imports_of sees imports inside functions and under TYPE_CHECKING."""
        (tmp_path / "probe.py").write_text(
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from ._scope import HookHandle\n"
            "def f():\n"
            "    from . import _timer\n"
            "    import cancellable._log\n"
        )
        monkeypatch.setattr(
            "test_core_imports.PACKAGE",
            tmp_path,
        )

        assert {"_scope", "_timer", "_log"} == imports_of("probe")
