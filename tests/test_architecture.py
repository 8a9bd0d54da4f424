"""The package's layering, read from the source: every import (at module level or inside a function) goes to a
package of the same or a lower layer, module-level imports form no cycle, and `torchslim.core` imports nothing
above the base layer. A new dependency that breaks this fails here, naming the import."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "src" / "torchslim"

# Lowest first. A package may import from its own layer and the layers below; within a layer, the package graph
# must stay acyclic (checked below). Names are the first component under torchslim ("" is the package root).
LAYERS = [
    {"_version", "errors", "_config", "_spec", "_progress", "_quiet", "_cache", "_logging", "_deprecated",
     "integrity", "_validate", "registry", "plugins", "_output", "defaults"},
    {"core"},
    {"graph", "measure", "data", "runtime"},
    {"recover"},
    {"zoo"},
    {"pruning", "quant", "factorize", "compact", "llm"},
    {"export"},
    {"_context", "_adapter", "catalog", "recipe", "profile"},
    {"api", "loading", "pipeline", "report"},
    {"search"},
    {"schema", "_cli_info", "cli", "__main__", "_fuzz", ""},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = ["torchslim", *path.relative_to(SOURCE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = SOURCE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported torchslim module, line) for every import in the file."""
    name = _module_name(path)
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("torchslim"):
                continue
            submodules = [f"{target}.{alias.name}" for alias in node.names if _is_module(f"{target}.{alias.name}")]
            found += [(t, node.lineno) for t in (submodules if len(submodules) == len(node.names) else [target])]
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("torchslim")]
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _files() -> list[Path]:
    return sorted(SOURCE.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {_package(_module_name(path)) for path in _files()}
    assert packages - set(LAYER) == set(), "add the new package to LAYERS"
    assert len(packages) >= 30


def test_imports_go_down_the_layers():
    upward = []
    edges = set()
    for path in _files():
        source = _package(_module_name(path))
        for target, line in _imports(path, top_level_only=False):
            destination = _package(target)
            if destination == source:
                continue
            edges.add((source, destination))
            # A section of the recipe document is a config dataclass of the package that runs it (search:,
            # export:); reading the config module is allowed from below, running the package is not.
            if LAYER[destination] > LAYER[source] and not target.endswith(".config"):
                upward.append(f"{path.relative_to(SOURCE.parent)}:{line} imports {target}")
    assert upward == []
    # Within one layer the package graph is acyclic too.
    for a, b in edges:
        if LAYER[a] == LAYER[b]:
            assert (b, a) not in edges, f"{a} and {b} import each other"
    assert len(edges) > 100


def test_config_modules_read_from_below_import_only_lower_layers_and_configs():
    """The exception above stays honest: a config module that a lower layer reads imports only base modules,
    core, other configs and the training configs its sections nest."""
    read_from_below = set()
    for path in _files():
        source = _package(_module_name(path))
        for target, _ in _imports(path, top_level_only=False):
            if target.endswith(".config") and LAYER[_package(target)] > LAYER[source]:
                read_from_below.add(target)
    assert "torchslim.search.config" in read_from_below
    for path in _files():
        name = _module_name(path)
        if name not in read_from_below:
            continue
        for target, line in _imports(path, top_level_only=False):
            allowed = LAYER[_package(target)] <= LAYER["core"] or target.endswith(".config") \
                or target in ("torchslim.recover.finetune", "torchslim.recover.optim", "torchslim.data")
            assert allowed, f"{name}:{line} imports {target}"


def test_module_level_imports_have_no_cycle():
    graph = {_module_name(p): {t for t, _ in _imports(p, top_level_only=True)} for p in _files()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            while target and target not in graph:
                target = target.rpartition(".")[0]
            if not target or target == module:
                continue
            assert state.get(target) != 1, "import cycle: " + " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(state) == len(graph) > 140


def test_core_imports_only_the_base_layer():
    for path in (SOURCE / "core").glob("*.py"):
        for target, line in _imports(path, top_level_only=False):
            assert LAYER[_package(target)] <= LAYER["core"], f"core/{path.name}:{line} imports {target}"


def test_tests_mirror_the_package():
    """A test folder is named for the package it tests (tests/pruning/ for torchslim/pruning/, ...), or for the
    repository's benchmarks/ scripts."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    packages = {p.name for p in SOURCE.iterdir() if (p / "__init__.py").exists()}
    assert folders - packages <= {"benchmarks"}
    assert len(folders) >= 10
