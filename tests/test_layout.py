"""The package layout's rules, read from the source: no import cycle, and each part imports only
the parts below it (the rules are written in `predictor/__init__.py`).

Every `import` counts, at module level, inside functions and under `TYPE_CHECKING` alike: a
lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "predictor"
MAX_ROOT_MODULES = 12

# Lowest first. A module may import its own layer and the layers before it.
CONTRACT = {
    "predictor",
    "predictor.errors",
    "predictor.settings",
    "predictor.params",
    "predictor.protocol",
    "predictor.rows",
    "predictor.metrics",
    "predictor.cancellation",
}
LAYERS: tuple[tuple[str, ...], ...] = (
    tuple(sorted(CONTRACT)),
    ("predictor.inputs",),
    ("predictor.engine",),
    ("predictor.model",),
    ("predictor.openai", "predictor.ui"),
    ("predictor.server",),
    ("predictor.__main__",),
)
# Clients that ship in the package but import nothing of the server's code.
STANDALONE = ("predictor.describe", "predictor.canary")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The predictor modules `path` imports (a package's `__init__` when a package is named)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix not in CONTRACT and module.startswith(prefix + ".")):
                return index
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_rules_see_imports() -> None:
    """A guard on the reader itself: a few imports known to exist are found."""
    graph = import_graph()
    assert "predictor.rows" in graph["predictor.engine.generation"]
    assert "predictor.metrics" in graph["predictor.engine.client"]  # `from predictor import x`
    assert "predictor.engine.loading" in graph["predictor.engine.core"]  # inside a function
    assert "predictor.server.main" in graph["predictor.__main__"]


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_every_module_has_a_place() -> None:
    unplaced = [
        m
        for m in import_graph()
        if layer_of(m) is None
        and not m.startswith(tuple(p + "." for p in STANDALONE))
        and m not in STANDALONE
    ]
    assert unplaced == []


def test_each_layer_imports_only_those_below() -> None:
    broken = []
    for module, targets in import_graph().items():
        own = layer_of(module)
        if own is None:
            continue
        for target in targets:
            theirs = layer_of(target)
            if theirs is None or theirs > own:
                broken.append(f"{module} imports {target}")
    assert sorted(broken) == []


def test_clients_import_only_themselves() -> None:
    broken = []
    for module, targets in import_graph().items():
        for client in STANDALONE:
            if module == client or module.startswith(client + "."):
                broken += [f"{module} imports {t}" for t in targets if not t.startswith(client)]
    assert broken == []


def test_root_holds_the_contract_only() -> None:
    root = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


@pytest.mark.slow
def test_engine_core_loads_none_of_the_front() -> None:
    """What the engine core process really imports: no server, route or model module."""
    code = (
        "import sys, predictor.engine.core, predictor.engine.generation; "
        "print(' '.join(m for m in sys.modules if m.startswith('predictor')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert "predictor.engine.core" in loaded
    front = [m for m in loaded if layer_of(m) is not None and layer_of(m) > 2]
    assert front == []
