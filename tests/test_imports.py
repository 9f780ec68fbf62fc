"""The package's import structure: no cycles, and the pipeline's stages import downwards only.

Two checks: every module imports on its own in a fresh interpreter (a cycle that only bites in
some import order shows up here), and the static import graph (every ``import`` statement,
those inside functions included) has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cam_engine"


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (packages by their __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                child = f"{module}.{alias.name}"
                targets.add(child if child in MODULES else module)
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _is_package_parent(importer: str, imported: str) -> bool:
    # a submodule importing its own package's __init__ (``from . import x``) is how Python
    # reaches siblings; the package importing its submodules back is not a cycle of logic
    return importer.startswith(imported + ".")


def test_the_import_graph_has_no_cycle():
    graph = {
        name: {t for t in targets if not _is_package_parent(name, t)}
        for name, targets in GRAPH.items()
    }
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    ("stage", "forbidden"),
    [
        ("cam_engine.methods", ("engine", "explainer", "compose", "model", "graph", "commands")),
        ("cam_engine.gradients", ("engine", "explainer", "compose", "methods", "commands")),
        ("cam_engine.pipeline", ("commands", "distributed")),
        ("cam_engine.distributed", ("commands",)),
        ("cam_engine.postprocess", ("engine", "explainer", "methods", "model", "graph")),
    ],
)
def test_stages_import_only_the_stages_below(stage, forbidden):
    importers = [n for n in GRAPH if n == stage or n.startswith(stage + ".")]
    if not importers:
        pytest.skip(f"{stage} does not exist")
    banned = [f"cam_engine.{f}" for f in forbidden]
    bad = {
        (importer, target)
        for importer in importers
        for target in GRAPH[importer]
        if any(target == b or target.startswith(b + ".") for b in banned)
    }
    assert bad == set()


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """One interpreter (torch stays loaded); the package's modules are dropped between imports."""
    names = sorted(MODULES)
    script = f"""
import importlib, sys
failures = []
for name in {names!r}:
    for loaded in [m for m in sys.modules if m == "cam_engine" or m.startswith("cam_engine.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith(("ray", "pyarrow")):
            failures.append(f"{{name}}: {{exc!r}}")
    except Exception as exc:
        failures.append(f"{{name}}: {{exc!r}}")
print("\\n".join(failures))
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
    )
    assert out.stdout.strip() == ""
