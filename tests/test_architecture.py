"""The package layering: who may import whom, and no import cycles.

``core`` imports none of the project's packages; ``simulation`` and ``adaptation`` never
import ``training``; within the project, the module-level imports form no cycle (a cycle
kept alive by function-local imports counts too: every import is read).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "simulation", "adaptation", "training")
#: package -> project packages it must not import
FORBIDDEN = {
    "core": ("simulation", "adaptation", "training", "scripts"),
    "simulation": ("adaptation", "training", "scripts"),
    "adaptation": ("training", "scripts"),
    "training": ("scripts",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


@pytest.mark.parametrize("package", PACKAGES)
def test_layering(package):
    bad = []
    for name, path in project_modules().items():
        if name.split(".")[0] != package:
            continue
        for target in imports(path):
            if target.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{name} imports {target}")
    assert not bad, bad


def test_no_import_cycles_between_modules():
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target in imports(path):
            # "a.b.c" may be a module or a name in module "a.b"
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # a module importing its own package, or a package's __init__ re-exporting its
            # own modules, is not a cycle
            inside = name.startswith(target + ".") or target.startswith(name + ".")
            if target and target != name and not inside:
                edges.add(target)
        graph[name] = edges
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles[:3]
