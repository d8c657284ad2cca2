"""data_tools' modules import each other one way: no cycle, not even through function-level imports.

    .venv/bin/python -m pytest tests/test_data_tools_imports.py -q

``data_tools.rows`` holds what readers and layouts share, so that readers -> layouts -> rows and
never back; a cycle would make import order matter and hide which room owns what.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "data_tools"


def _imported_modules(path: Path, modules: set[str]) -> set[str]:
    """data_tools modules that ``path`` imports anywhere in it (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from data_tools import rows` names a module; `from data_tools.rows import Row` too.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "data_tools" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    return {m: _imported_modules(PACKAGE / f"{m}.py", modules) for m in sorted(modules)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with a path stack)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for dep in sorted(graph[node]):
            cycle = visit(dep, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for node in graph:
        cycle = visit(node, [])
        if cycle:
            return cycle
    return None


def test_find_cycle_sees_a_cycle() -> None:
    # The search itself, on the graph data_tools had before rows.py (layouts imported readers).
    cycle = find_cycle({"readers": {"layouts"}, "layouts": {"readers"}})
    assert cycle == ["readers", "layouts", "readers"]
    assert find_cycle({"readers": {"layouts", "rows"}, "layouts": {"rows"}, "rows": set()}) is None


def test_data_tools_imports_have_no_cycle() -> None:
    graph = import_graph()
    assert graph["rows"] == set(), "rows is the bottom: it imports no other data_tools module"
    assert "readers" not in graph["layouts"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("data_tools.rows", ["data_tools.readers", "data_tools.layouts"]),
        ("data_tools.layouts", ["data_tools.readers"]),
        ("data_tools.chunks", ["data_tools.readers", "data_tools.layouts"]),
    ],
)
def test_importing_a_module_alone_leaves_the_others_out(module: str, absent: list[str]) -> None:
    # A fresh interpreter: this process has long imported everything.
    code = f"import sys, {module}; print([m for m in {absent!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
