"""The shape of the package: arrows point one way (no import cycles; the engine and the data never
import the trainer; weight formats never import the run's checkpointing), and a module over about
400 lines says in its docstring why it is one."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "convnext_train"
# Modules over 400 lines; each docstring says why it is one module.
LONG_MODULES = {"convnext_train.bench", "convnext_train.data.rand_augment"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules `path` imports, anywhere in the file (TYPE_CHECKING blocks and
    function bodies too: a cycle there is still a cycle for a reader)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    cycles = sorted(name for name in graph if name in reachable(graph, name))
    assert cycles == [], cycles


def test_the_arrows_point_down():
    graph = import_graph()
    assert "convnext_train.trainer" not in reachable(graph, "convnext_train.engine")
    assert "convnext_train.engine" in reachable(graph, "convnext_train.trainer")
    for module in ("convnext_train.evaluate", "convnext_train.bench"):
        assert "convnext_train.trainer" not in reachable(graph, module), module
    formats = [name for name in graph if name.startswith("convnext_train.weights")]
    assert all(not any(t.startswith("convnext_train.checkpointing") for t in reachable(graph, f)) for f in formats)
    data = [name for name in graph if name.startswith("convnext_train.data")]
    assert all("convnext_train.trainer" not in reachable(graph, name) for name in data)


def test_long_modules_are_the_known_ones():
    lengths = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name for name, lines in lengths.items() if lines > 400} == LONG_MODULES
