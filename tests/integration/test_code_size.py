"""Small modules with one job each (issue 14): no class above 300 lines, no function above 60. A class or
function that must be longer says why in the table below."""
from __future__ import annotations

import ast

import pytest

from support.paths import ROOT

MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60
ALLOWED: dict[str, str] = {}  # "path:QualifiedName" -> why it may be longer


def _definitions():
    for path in sorted((ROOT / "meshsl").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        stack = [(node, "") for node in tree.body]
        while stack:
            node, prefix = stack.pop()
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{node.name}"
                yield f"{path.relative_to(ROOT)}:{name}", node, node.end_lineno - node.lineno + 1
                stack.extend((child, f"{name}.") for child in node.body)


@pytest.mark.unit
def test_no_class_or_function_is_too_long():
    too_long = []
    for where, node, lines in _definitions():
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        if lines > limit and where not in ALLOWED:
            too_long.append(f"{where}: {lines} lines (limit {limit})")
    assert not too_long, "split these (or say why in ALLOWED):\n" + "\n".join(too_long)


@pytest.mark.unit
def test_the_size_check_sees_classes_and_nested_functions():
    names = {where.split(":", 1)[1] for where, _, _ in _definitions()}
    assert "NodeRuntime" in names and "NodeRuntime.run" in names and "Coordinator.collect" in names
