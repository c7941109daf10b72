"""No import cycles among retro_kernels/, models/ and bench/, read from their import statements.

Reads every .py file of the packages with `ast` (nothing is imported or run)
and draws an edge from a module to each project module it imports, at the top
or inside a function alike: a lazy import that closes a loop is still a loop
(the two modules cannot be understood, or tested, one without the other).
`from pkg import name` points at `pkg/name.py` when that is a module, else at
`pkg/__init__.py`; imports of modules outside the packages are ignored.
A failure names one loop per tangle (modules that import each other, through
one another) as `a -> b -> a`.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("retro_kernels", "models", "bench")


def module_files(root: Path, packages) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file below the packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The dotted name a relative import `from .{level} name import ...` means."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` (read from `path`) imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node.level, node.module)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return {name for name in found if name in modules and name != module}


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm):
    each is a set of modules every one of which imports, through the others, every other."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop per tangle, the shortest through its first module: [a, ..., a]."""
    return [_path_through(graph, component) for component in tangles(graph)]


def _path_through(graph, component: set[str]) -> list[str]:
    """A shortest loop from the component's first module back to itself."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no loop through {start}")  # a component always has one


def test_the_project_has_no_import_cycles():
    graph = import_graph(ROOT, PACKAGES)
    assert "models.train" in graph and "bench.cli" in graph and "retro_kernels.dispatch" in graph
    assert "models.runtime" in graph["models.train"]  # the edges are read: not an empty graph
    assert cycles(graph) == [], "\n".join(" -> ".join(loop) for loop in cycles(graph))


def _write(root: Path, files: dict) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_it_finds_a_loop_closed_by_a_lazy_or_relative_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",                           # a -> b
        "pkg/sub/__init__.py": "from .c import thing\n",         # pkg.sub -> pkg.sub.c
        "pkg/sub/c.py": "import os\n\ndef f():\n    from ..a import g\n",  # c -> a, lazily
        "pkg/b.py": "from pkg.sub import thing\n",               # b -> pkg.sub (its __init__)
        "pkg/free.py": "from pkg import a\nimport pkg.b\n",      # imports into the loop, not part of it
    })
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.sub.c"] == {"pkg.a"} and graph["pkg.b"] == {"pkg.sub"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.a"]]
    (tmp_path / "pkg/sub/c.py").write_text("import os\n")
    assert cycles(import_graph(tmp_path, ["pkg"])) == []
