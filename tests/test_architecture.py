"""The shape of the package: arrows point one way (no import cycles; the engine, the tasks and the
data never import the trainer; weight formats never import the run's checkpointing; nothing the
runtime runs imports the tooling: the bench, the GPU suite, the README generators), one module knows
where the configs are, the data kind is chosen in one registry, and a module over about 400 lines
says in its docstring why it is one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "convnext_train"
# Modules over 400 lines; each docstring says why it is one module.
LONG_MODULES = {
    "convnext_train.bench",
    "convnext_train.data.rand_augment",
    "convnext_train.export",
    "convnext_train.roadmap",
    "convnext_train.weights.layouts",
}
# Measurement and documentation tools: they import the runtime, never the other way round.
TOOLING = (
    "convnext_train.bench",
    "convnext_train.measure",
    "convnext_train.gpu_suite",
    "convnext_train.readme",
    "convnext_train.roadmap",
)


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
    assert formats and all(
        not any(t.startswith("convnext_train.checkpointing") for t in reachable(graph, f)) for f in formats
    )
    below_the_trainer = [name for name in graph if name.startswith(("convnext_train.data", "convnext_train.tasks"))]
    assert below_the_trainer and all("convnext_train.trainer" not in reachable(graph, n) for n in below_the_trainer)


def is_tooling(name: str) -> bool:
    return any(name == t or name.startswith(f"{t}.") for t in TOOLING)


def test_nothing_the_runtime_runs_imports_the_tooling():
    graph = import_graph()
    runtime = [name for name in graph if not is_tooling(name)]
    assert "convnext_train.trainer" in runtime and "convnext_train.bench" not in runtime
    offending = {name: sorted(filter(is_tooling, reachable(graph, name))) for name in runtime}
    assert {name: found for name, found in offending.items() if found} == {}


def test_one_module_knows_where_the_configs_are_and_one_registry_chooses_the_data():
    """No other module builds a path to conf/ (they ask convnext_train.configs), and no module but
    the data registry compares `data.kind` (or `data_cfg.kind`) to a value."""
    conf_paths, kind_chains = [], []
    for path in PACKAGE.rglob("*.py"):
        name, text = module_name(path), path.read_text()
        if name != "convnext_train.configs" and re.search(r'"conf"|__file__.*conf', text):
            conf_paths.append(name)
        if name != "convnext_train.data.sources" and re.search(r"data(_cfg)?\.kind\s*(==|!=|in\b|not in\b)", text):
            kind_chains.append(name)
    assert conf_paths == []
    assert kind_chains == []


def test_long_modules_are_the_known_ones():
    lengths = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name for name, lines in lengths.items() if lines > 400} == LONG_MODULES
