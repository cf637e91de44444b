"""docs/guarantees.rst names real tests: the table cannot rot unseen."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_the_table_names_exists() -> None:
    table = (ROOT / "docs" / "guarantees.rst").read_text()
    named = re.findall(r"``(test_\w+)::(test_\w+)``", table)
    assert len(named) > 40
    missing = []
    for module, test in named:
        tree = ast.parse((ROOT / "tests" / f"{module}.py").read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        if test not in defined:
            missing.append(f"{module}::{test}")
    assert missing == []
