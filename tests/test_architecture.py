"""The import graph of the spavae package: no circles, and the data layer imports nothing from the layers above it.

The graph is read statically: every ``import`` and ``from ... import`` of every module, at module level or inside a
function (an import inside a function still ties the two modules together, it only hides the circle until the
function runs). An edge goes to the module imported: ``from spavae.analysis.clustering import x`` to
``spavae.analysis.clustering``, ``from spavae.analysis import x`` to the package ``spavae.analysis`` (its
``__init__``), ``from spavae import experiment`` to ``spavae.experiment``.

One upward reference is allowed: ``from spavae import __version__``. The version has to be a literal in
``spavae/__init__.py`` (setup.cfg reads it from there without importing the package), which sets it before it
imports anything, so reading it never runs into a half-initialised package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spavae"
#: What the data layer may not import: everything that builds on it.
ABOVE_DATA = ("spavae.model", "spavae.api", "spavae.analysis", "spavae.experiment", "spavae.cli", "spavae.sweep")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The spavae modules an import statement of ``module`` reads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        if base == "spavae" and [alias.name for alias in node.names] == ["__version__"]:
            return []  # the one allowed upward reference (see the module documentation)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:  # an attribute of a module: the module
            name = name.rpartition(".")[0]
        if name.split(".")[0] == "spavae" and name != module:
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """``module -> the spavae modules it imports``, for every module of the package."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = {target for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for target in _imported(module, node)}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "spavae.data.setup" in graph and "spavae.cli" in graph
    assert "spavae.experiment" in graph["spavae.cli.experiment"]  # imported inside the command functions


def test_the_cycle_finder_finds_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("spavae.data")))
def test_the_data_layer_imports_nothing_above_it(module):
    upward = sorted(target for target in import_graph()[module]
                    if any(target == above or target.startswith(above + ".") for above in ABOVE_DATA))
    assert not upward, f"{module} imports {upward}"


def test_only_the_entry_points_import_the_command_line():
    importers = sorted(module for module, targets in import_graph().items()
                       if any(t == "spavae.cli" or t.startswith("spavae.cli.") for t in targets)
                       and not (module == "spavae.cli" or module.startswith("spavae.cli.") or module == "spavae.__main__"))
    assert not importers, f"{importers} import the command line"
