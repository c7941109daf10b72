"""Find import cycles among the project's modules, from their import statements.

    python tools/import_cycles.py [PACKAGE ...]     (default: retro_kernels models bench)

Reads every .py file of the packages with `ast` (nothing is imported or run)
and draws an edge from a module to each project module it imports, at the top
or inside a function alike: a lazy import that closes a loop is still a loop
(the two modules cannot be understood, or tested, one without the other).
`from pkg import name` points at `pkg/name.py` when that is a module, else at
`pkg/__init__.py`; imports of modules outside the packages are ignored.
Prints one loop per tangle (a set of modules that import each other, through
one another) as `a -> b -> a`, with what each module of a larger tangle
imports inside it; exits 1 if there is one, 0 if none (2: a bad argument).
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="*", default=list(PACKAGES),
                        help="top-level packages of the checkout to read")
    args = parser.parse_args(argv)
    missing = [p for p in args.packages if not (ROOT / p).is_dir()]
    if missing:
        parser.error(f"no package folder {', '.join(missing)} in {ROOT}")
    graph = import_graph(ROOT, args.packages)
    found = tangles(graph)
    for component in found:
        print(" -> ".join(_path_through(graph, component)))
        if len(component) > 2:
            print(f"  one tangle of {len(component)} modules: " + "; ".join(
                f"{m} imports {', '.join(sorted(graph[m] & component))}" for m in sorted(component)))
    if not found:
        print(f"no import cycles among {', '.join(args.packages)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
