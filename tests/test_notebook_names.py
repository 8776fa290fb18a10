"""Every ``course_utils`` name a lesson, lab or solution uses exists in the package (a rename that misses a
notebook fails here in seconds, not after minutes of nbval)."""

import ast
import importlib
import json

import pytest

from course_utils import config

NOTEBOOKS = sorted(p for folder in ("lessons", "labs", "solutions") for p in (config.repo_root() / folder).glob("*.ipynb"))


def _code(path) -> ast.Module:
    cells = json.loads(path.read_text())["cells"]
    lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
    return ast.parse("\n".join(line for line in lines if not line.lstrip().startswith(("%", "!"))))


def _missing(tree: ast.Module) -> list[str]:
    modules, missing = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("course_utils"):
            for a in node.names:
                try:
                    modules[a.asname or a.name] = importlib.import_module(f"{node.module}.{a.name}")
                except ImportError:
                    if not hasattr(importlib.import_module(node.module), a.name):
                        missing.append(f"{node.module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if not hasattr(modules[node.value.id], node.attr):
                missing.append(f"{modules[node.value.id].__name__}.{node.attr}")
    return missing


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_package_name_a_notebook_uses_exists(path):
    assert _missing(_code(path)) == []


def test_a_missing_name_is_found():
    tree = ast.parse("from course_utils.quant import linear\nlinear.linear_layers(model)\nfrom course_utils.memory import nope")
    assert _missing(tree) == ["course_utils.memory.nope", "course_utils.quant.linear.linear_layers"]
