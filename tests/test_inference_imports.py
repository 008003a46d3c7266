"""The inference side's import graph (read with ast, nothing imported): no circles, nothing from the CLI or web app."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "polypseg"
INFERENCE_SIDE = (
    "polypseg.inferer",
    "polypseg.inference",
    "polypseg.export",
    "polypseg.deploy",
    "polypseg.explain",
    "polypseg.explain_metrics",
    "polypseg.explain_files",
    "polypseg.predict_files",
    "polypseg.evaluation",
    "polypseg.inputs",
    "polypseg.video",
    "polypseg.bench",
    "polypseg.gallery",
    "polypseg.reporting.cases",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("polypseg", *parts)).removesuffix(".__init__")


def _import_graph() -> dict[str, set[str]]:
    """Every polypseg module -> the polypseg modules it imports anywhere (top level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[_module_name(path)] = {name for name in imported if name == "polypseg" or name.startswith("polypseg.")}
    return graph


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        module, path = stack.pop()
        for target in sorted(graph.get(module, ())):
            if target == start:
                return [*path, target]
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


@pytest.mark.parametrize("module", INFERENCE_SIDE)
def test_no_import_circle_and_nothing_from_above(module: str) -> None:
    graph = _import_graph()
    assert module in graph
    assert _cycle_through(graph, module) is None
    above = sorted(name for name in graph[module] if name.startswith(("polypseg.cli", "polypseg.web")))
    assert not above, f"{module} imports {above}"
