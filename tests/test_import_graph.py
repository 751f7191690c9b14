"""The package's import graph: no circle between modules, and no import from a lower layer to a
higher one. Every ``import``/``from ... import`` counts, also those inside functions: a lazy import
hides a circle from Python but not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "benchmarks", "docs", "csrc", "build", ".git", ".ci"}

# low to high; a module belongs to the layer of its longest matching prefix
LAYERS = [
    ("core", ["modalmoe", "modalmoe.ops"]),
    ("runtime", ["modalmoe.runtime"]),
    ("models", ["modalmoe.models"]),
    ("train", ["modalmoe.train"]),
    ("job description", ["modalmoe.launch.presets", "modalmoe.launch.environment"]),
    ("study", ["modalmoe.study"]),
    ("entry points", ["modalmoe.launch"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or rel.name == "setup.py" or "__pycache__" in rel.parts:
            continue
        name = ".".join(("modalmoe", *rel.with_suffix("").parts))
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in mods else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer; add it to LAYERS"
    return rank


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_package():
    graph = import_graph()
    for name in ("modalmoe.ops", "modalmoe.runtime.moe.layer", "modalmoe.models.transformer",
                 "modalmoe.train.trainer", "modalmoe.study.runner", "modalmoe.launch.cli"):
        assert name in graph
    assert "modalmoe.runtime.moe" in graph["modalmoe.models.block"]
    assert "modalmoe.train.trainer" in graph["modalmoe.launch.cli"]  # a lazy import inside a function counts


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_rank_the_longest_prefix():
    assert layer_of("modalmoe.ops") < layer_of("modalmoe.runtime.moe.layer") < layer_of("modalmoe.models.block")
    assert layer_of("modalmoe.train.trainer") < layer_of("modalmoe.launch.presets") < layer_of("modalmoe.study.spec")
    assert layer_of("modalmoe.study.spec") < layer_of("modalmoe.launch.cli")


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
           for a, deps in sorted(import_graph().items()) for b in sorted(deps) if layer_of(b) > layer_of(a)]
    assert bad == []


def test_no_module_over_400_lines():
    """Modules small enough to read in one sitting (the package's; tests and benchmarks aside)."""
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
