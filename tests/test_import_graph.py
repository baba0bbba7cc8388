"""The package's modules import one another without a circle (issue 24, item 9)."""

from __future__ import annotations

import ast
from pathlib import Path

import pyrovae

PACKAGE = Path(pyrovae.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package modules that ``path`` imports at any depth of its code (also inside
    functions: a deferred import hides a circle, it does not open it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in known else node.module for name in submodules]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: imported_modules(path, known) - {name} for name, path in files.items()}


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(graph.get(node, ()))
    return False


def test_the_vae_and_the_two_layer_model_share_the_data_plate_without_a_circle():
    graph = import_graph()
    assert "pyrovae.models.hierarchical" in graph["pyrovae.models.vae"]
    assert not reaches(graph, "pyrovae.models.hierarchical", "pyrovae.models.vae")
    from pyrovae.models import base, hierarchical, vae

    assert hierarchical.DATA_PLATE is base.DATA_PLATE == vae.DATA_PLATE == "data"
