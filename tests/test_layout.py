"""The package's shape: no import cycle between its modules (function-local imports included, since
they only hide a cycle), and no long functions outside data tables."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PKG = Path(__file__).resolve().parents[1] / "mudsc_graph"
#: The import packages and the folders they live in (the CLI and the built-in plugins are installed
#: under other names than their folders').
PACKAGES = {"mudsc_graph": PKG, "mudsc_cli": PKG.parent / "cli", "mudsc_plugins": PKG.parent / "plugins",
            "mudsc_experiments": PKG.parent / "experiments"}


def _module_name(path: Path, root: Path = PKG, package: str = "mudsc_graph") -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str], root: Path = PKG, pkg: str = "mudsc_graph") -> set[str]:
    """The package modules ``path`` imports at run time (``if TYPE_CHECKING:`` blocks left out)."""
    name = _module_name(path, root, pkg)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def _graph(pkg: str = "mudsc_graph") -> nx.DiGraph:
    root = PACKAGES[pkg]
    files = sorted(root.rglob("*.py"))
    modules = {_module_name(f, root, pkg) for f in files}
    g = nx.DiGraph()
    for f in files:
        src = _module_name(f, root, pkg)
        g.add_node(src)
        for dst in _imports(f, modules, root, pkg):
            # a package's __init__ re-exporting its submodules is not a dependency of those submodules
            if not dst.startswith(src + ".") and not (f.name == "__init__.py" and dst.startswith(src)):
                g.add_edge(src, dst)
    return g


@pytest.mark.parametrize("pkg", ["mudsc_cli", "mudsc_plugins", "mudsc_experiments"])
def test_no_import_cycle_in_the_command_line_or_the_plugins(pkg):
    g = _graph(pkg)
    assert g.number_of_edges() > 0, f"the graph of {pkg} sees no imports"
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles[:5])


def test_no_import_cycle_between_modules():
    g = _graph()
    g.remove_node("mudsc_graph")  # the public facade imports everything and nothing imports it back
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles[:5])


def test_the_library_holds_no_application():
    """mudsc_graph imports neither the command line nor the experiments (nor the built-in plugins:
    the registry loads them by name)."""
    found = []
    for f in sorted(PKG.rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{f.relative_to(PKG)}: {n}" for n in names if n.split(".")[0] in ("mudsc_cli", "mudsc_experiments", "mudsc_plugins")]
    assert not found, found


def test_merging_needs_nothing_from_io():
    """Merging is the library's core; reading and writing files builds on it, not the reverse."""
    g = _graph()
    edges = [(a, b) for a, b in g.edges if a.startswith("mudsc_graph.merging") and b.startswith("mudsc_graph.io")]
    assert not edges, f"merging imports io: {edges}"


def test_the_graph_sees_the_imports():
    """The oracle itself: known edges are found, function-local ones included."""
    g = _graph()
    assert g.has_edge("mudsc_graph.merging.api", "mudsc_graph.merging.solver")
    assert g.has_edge("mudsc_graph.analysis.pipeline", "mudsc_graph.analysis.grouping")
    assert g.number_of_edges() > 60


def _is_data_table(body: list[ast.stmt]) -> bool:
    """A function that returns one literal list, tuple or dict (a table of records) is data."""
    last = body[-1]
    return isinstance(last, ast.Return) and isinstance(last.value, (ast.List, ast.Tuple, ast.Dict)) and (
        last.end_lineno - last.lineno + 1 >= 0.8 * (body[-1].end_lineno - body[0].lineno + 1)
    )


def test_no_function_over_60_lines():
    """Long functions are where the next maintainer gets lost (the library, the built-in plugins and
    the command line; data tables are not functions)."""
    long = []
    for root in PACKAGES.values():
        for f in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    body = node.body[1:] if ast.get_docstring(node) else node.body
                    lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
                    if lines > 60 and not _is_data_table(body):
                        long.append(f"{f.relative_to(PKG.parent)}:{node.name} ({lines} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(long)


def test_architecture_md_lists_every_module():
    """docs/architecture.md's tree names every module of the library (one line each)."""
    text = (PKG.parent / "docs" / "architecture.md").read_text()
    tree = text.split("```")[1]
    missing = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG)
        if rel.name == "__init__.py" and rel.parent != Path("merging/matching") and len(rel.parts) > 1:
            continue  # a package is its folder line
        if not any(line.strip().split()[:1] == [rel.name] for line in tree.splitlines()):
            missing.append(str(rel))
    assert not missing, f"docs/architecture.md does not list {missing}"


@pytest.mark.parametrize("pkg", ["mudsc_cli", "mudsc_experiments", "mudsc_plugins"])
def test_applications_use_only_public_names_of_the_library(pkg):
    """The command line, the experiments and the built-in plugins build on what the library
    documents: no ``_private`` name of mudsc_graph, and no private module."""
    found = []
    for f in sorted(PACKAGES[pkg].rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mudsc_graph":
                private = [p for p in node.module.split(".") if p.startswith("_")] + [a.name for a in node.names if a.name.startswith("_")]
                found += [f"{f.name}: from {node.module} import {name}" for name in private]
    assert not found, found
