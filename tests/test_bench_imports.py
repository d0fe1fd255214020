"""The benchmarks are not run by the tests (they take minutes), so a refactor that moves a module
must not silently break them: every `from selfsup... import name` in bench/ must resolve."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _imports() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(BENCH.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "selfsup":
                found += [(path.relative_to(BENCH).as_posix(), node.module, alias.name) for alias in node.names]
    return found


def test_the_benchmarks_import_selfsup():
    assert len(_imports()) > 20, "the benchmarks' selfsup imports were found"


@pytest.mark.parametrize("where, module, name", _imports(), ids=lambda v: str(v))
def test_every_selfsup_import_of_the_benchmarks_resolves(where, module, name):
    assert hasattr(importlib.import_module(module), name), f"bench/{where}: {module} has no {name}"
