"""The package's import graph: no cycle anywhere, and the core never imports an integration.

Every import counts, also lazy ones inside functions and those under
``if TYPE_CHECKING:``.  The core is every module directly in the package, except the demo command
(``_demo``, ``__main__``: an application of the library, which uses the
Celery integration as any application would); integrations live in
subpackages (``cancellable.celery``) and are activated by a post-import hook
registered by name, never imported by the core.
"""

# style.md 13: asserts read `expected == actual`, which SIM300 calls a Yoda condition.

from __future__ import annotations

import ast
from pathlib import Path

import cancellable

PACKAGE = Path(cancellable.__file__).resolve().parent


def module_name(path: Path) -> str:
    """``cancellable.celery._runtime`` for ``.../cancellable/celery/_runtime.py``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_by(name: str) -> set[str]:
    """The package modules that module ``name`` imports, anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # ``from .x import y`` imports module x (and y, if it is a module);
            # ``from . import y`` imports module y.
            targets = [f"{base}.{alias.name}" for alias in node.names]
            if node.module:
                targets.append(base)
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def test_the_graph_sees_the_integration():
    """The graph is not empty by accident: the integration's wiring is in it."""
    assert {"cancellable.celery._task", "cancellable.celery._runtime"} <= imported_by(
        "cancellable.celery._activation"
    )


def test_no_import_cycle_anywhere():
    """Depth-first search over every module finds no cycle."""
    graph = {name: imported_by(name) for name in MODULES}
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])

    assert [] == cycles


def test_the_core_never_imports_an_integration():
    """No module directly in the package imports a subpackage's module."""
    demo = {"cancellable._demo", "cancellable.__main__"}
    core = [name for name, path in MODULES.items() if path.parent == PACKAGE and name not in demo]
    leaks = {
        name: sorted(t for t in imported_by(name) if t.count(".") > 1 or t == "cancellable.celery")
        for name in core
    }

    assert {} == {name: targets for name, targets in leaks.items() if targets}
