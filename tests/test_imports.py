"""The import graph of ldm_jax/ and benchmarks/: no circle, and dependencies point one way.

Counts every import in a file, top level or inside a function; a package's __init__.py is
a node of its own (imported by `from pkg import name`), unlike a plain module import.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(*packages):
    mods = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def import_graph(*packages) -> dict:
    """{module: set of project modules it imports}."""
    mods = _modules(*packages)
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(import_graph("ldm_jax", "benchmarks")) == []


def test_the_cycle_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _imports_of(graph, prefix):
    return {(m, t) for m, ts in graph.items() if m == prefix or m.startswith(prefix + ".")
            for t in ts}


def test_dependencies_point_one_way():
    graph = import_graph("ldm_jax", "benchmarks")
    bad = [(m, t) for m, t in _imports_of(graph, "ldm_jax") if t.startswith("benchmarks")]
    bad += [(m, t) for m, t in _imports_of(graph, "ldm_jax.autoencoder")
            if t.startswith("ldm_jax.diffusion") or t.startswith("ldm_jax.cli")]
    bad += [(m, t) for m, t in _imports_of(graph, "ldm_jax.trainer")
            if t.startswith(("ldm_jax.autoencoder", "ldm_jax.diffusion", "ldm_jax.cli"))]
    shared = ("ldm_jax.models", "ldm_jax.schedulers", "ldm_jax.data", "ldm_jax.metrics",
              "ldm_jax.config", "ldm_jax.errors", "ldm_jax.checkpoint", "ldm_jax.sharding",
              "ldm_jax.optim")
    for pkg in shared:
        bad += [(m, t) for m, t in _imports_of(graph, pkg)
                if t.startswith(("ldm_jax.autoencoder", "ldm_jax.diffusion", "ldm_jax.cli",
                                 "ldm_jax.trainer"))]
    assert sorted(bad) == []


def test_no_command_alias_modules():
    aliases = [p.name for p in (ROOT / "ldm_jax").glob("*.py")
               if "from ldm_jax.cli." in p.read_text() and "import main" in p.read_text()
               and p.name != "__main__.py"]
    assert aliases == []


