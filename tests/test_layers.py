"""The package's modules import each other one way: no circle, not even
through imports made for type checkers only (DESIGN.md's layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import atomstore

PACKAGE = Path(atomstore.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The package's modules ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module)
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("atomstore."):
            found.add(node.module.split(".", 1)[1])  # type: ignore[union-attr]
    return {name for name in found if (PACKAGE / f"{name}.py").exists()}


def test_no_module_imports_itself_back() -> None:
    graph = {
        path.stem: imports_of(path)
        for path in PACKAGE.glob("*.py")
        if path.stem not in ("__init__", "__main__")
    }
    circles = []

    def visit(module: str, trail: list[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            if imported in trail:
                circles.append(" -> ".join([*trail[trail.index(imported) :], imported]))
            else:
                visit(imported, [*trail, imported])

    for module in sorted(graph):
        visit(module, [module])
    assert circles == []


def test_claims_and_batches_know_the_store_only_by_its_areas() -> None:
    for module in ("_claim", "_batch", "_work"):
        assert "_store" not in imports_of(PACKAGE / f"{module}.py"), module
