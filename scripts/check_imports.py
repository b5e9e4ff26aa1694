"""Check kvtier's import graph: no cycles, the library never imports its tooling, benchmarks never edit sys.path.

Every import statement counts, at module level or inside a function (an import moved into a function to dodge a
cycle is still a cycle), except those under `if TYPE_CHECKING:`. Run from anywhere: `python scripts/check_imports.py`;
exit status 1 with one line per problem.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"kvtier": "kvtier", "kernels": "kvtier.kernels", "policies": "kvtier.policies"}
TOOLING = "kvtier.tools"
ENTRY_POINTS = {"kvtier.__main__"}  # `python -m kvtier` is the command line: it may import the tooling


def module_files() -> dict[str, Path]:
    """Installed module name -> its source file, for every module of the project."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(path: Path, module: str) -> list[str]:
    """Absolute dotted names `module` imports (`from a import b` yields a.b: module a.b, or name b of module a)."""
    is_package = path.name == "__init__.py"
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                names.extend(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names.extend(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module):
            # `from kvtier.policies import build_policy` names the package; `from kvtier import dispatch` a module
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def problems() -> list[str]:
    modules = module_files()
    graph = import_graph(modules)
    found = [f"import cycle: {' <-> '.join(component)}" for component in cycles(graph)]
    for module, targets in sorted(graph.items()):
        if not module.startswith(TOOLING) and module not in ENTRY_POINTS:
            found += [f"the library imports its tooling: {module} -> {target}"
                      for target in sorted(targets) if target.startswith(TOOLING)]
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if "sys.path" in script.read_text():
            found.append(f"{script.relative_to(ROOT)} edits sys.path: import the installed kvtier instead")
    return found


def main() -> int:
    found = problems()
    for line in found:
        print(line)
    if not found:
        print(f"imports ok: {len(module_files())} modules, no cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
