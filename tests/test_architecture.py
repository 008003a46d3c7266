"""The shape of the import graph, read from the source with ``ast`` (the package is never imported).

What this file enforces (docs/architecture.md, "What the tests enforce"):

- no import cycle among polypseg modules: every import counts, at module level or inside a
  function (a lazy import is still a dependency); only ``if TYPE_CHECKING:`` blocks are skipped;
- layering: only ``polypseg.cli`` imports ``polypseg.cli``; only ``polypseg.web`` and ``polypseg.cli``
  import ``polypseg.web``;
- ``import polypseg`` and ``polypseg.cli.main`` (``polypseg --help``) load no torch: no module they
  load at import time imports torch, torchvision or smp at module level.

Besides ``import`` statements, a module name in a string literal counts as an import where it is an
import table entry (an element of a tuple, list, set or dict: ``cli.main.COMMAND_MODULES``, the
package root's lazy names) or the argument of ``importlib.import_module``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "polypseg"
HEAVY = ("torch", "torchvision", "segmentation_models_pytorch")
LIGHT_ENTRY_POINTS = ("polypseg", "polypseg.cli.main")


@dataclass(frozen=True)
class Import:
    """One import of a polypseg module: who imports what, where, and whether it runs at import time."""

    source: str
    target: str
    line: int
    at_import_time: bool


@dataclass
class ModuleInfo:
    name: str
    path: Path
    imports: list[Import] = field(default_factory=list)
    heavy_at_import_time: list[tuple[str, int]] = field(default_factory=list)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def walk(node: ast.AST, at_import_time: bool = True) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below ``node`` with whether it runs when the module is imported (not inside a
    function or lambda), skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if is_type_checking_block(child):
            for orelse in child.orelse:  # type: ignore[attr-defined]
                yield orelse, at_import_time
                yield from walk(orelse, at_import_time)
            continue
        child_at_import_time = at_import_time and not isinstance(
            child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        )
        yield child, child_at_import_time
        yield from walk(child, child_at_import_time)


def resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def scan(path: Path, known: set[str]) -> ModuleInfo:
    """The polypseg imports and the module-level heavy imports of one source file."""
    name = module_name(path)
    info = ModuleInfo(name, path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    dynamic_import_at_import_time = False
    strings: list[tuple[str, int, bool]] = []
    for node, at_import_time in walk(tree):
        for value in import_table_strings(node):
            if value.value in known:
                strings.append((value.value, value.lineno, at_import_time))
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (
                resolve_relative(name, path.name == "__init__.py", node.level, node.module)
                if node.level
                else node.module or ""
            )
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if submodule in known else base)
        elif isinstance(node, ast.Call) and at_import_time:
            function = node.func
            called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            dynamic_import_at_import_time |= called in ("import_module", "__import__")
        for target in targets:
            if target.split(".")[0] in HEAVY and at_import_time:
                info.heavy_at_import_time.append((target, node.lineno))
            resolved = longest_known_prefix(target, known)
            if resolved is not None and resolved != name:
                info.imports.append(Import(name, resolved, node.lineno, at_import_time))
    for target, line, string_at_import_time in strings:
        if target != name:
            # An import table runs at import time only when the module imports from it at module level.
            runs_now = string_at_import_time and dynamic_import_at_import_time
            info.imports.append(Import(name, target, line, runs_now))
    return info


def import_table_strings(node: ast.AST) -> list[ast.Constant]:
    """String constants that may name a module to import: the elements of a container literal and
    the first argument of ``import_module`` / ``__import__``."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        candidates = node.elts
    elif isinstance(node, ast.Dict):
        candidates = node.values
    elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
        "import_module",
        "__import__",
    ):
        candidates = node.args[:1]
    else:
        return []
    return [c for c in candidates if isinstance(c, ast.Constant) and isinstance(c.value, str)]


def longest_known_prefix(target: str, known: set[str]) -> str | None:
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def build_graph() -> dict[str, ModuleInfo]:
    paths = sorted((SRC / PACKAGE).rglob("*.py"))
    known = {module_name(path) for path in paths}
    return {info.name: info for info in (scan(path, known) for path in paths)}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (or a self-import), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def describe_cycles(modules: dict[str, ModuleInfo], components: list[list[str]]) -> str:
    """Each cycle with the import lines that close it, so the reader knows where to cut."""
    lines = []
    for component in components:
        members = set(component)
        lines.append("cycle: " + " <-> ".join(component))
        for member in component:
            for edge in dict.fromkeys(modules[member].imports):
                if edge.target in members:
                    where = modules[member].path.relative_to(SRC.parent)
                    kind = "module level" if edge.at_import_time else "inside a function"
                    lines.append(f"  {edge.source} -> {edge.target}  ({where}:{edge.line}, {kind})")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def modules() -> dict[str, ModuleInfo]:
    return build_graph()


def find_cycles(modules: dict[str, ModuleInfo]) -> list[list[str]]:
    graph = {name: {edge.target for edge in info.imports} for name, info in modules.items()}
    return strongly_connected(graph)


def test_the_graph_sees_lazy_imports_and_import_tables(modules: dict[str, ModuleInfo]) -> None:
    """The scanner itself: a sanity check on edges that exist for sure."""
    main = {edge.target: edge for edge in modules["polypseg.cli.main"].imports}
    assert main["polypseg.cli.train_cmd"].at_import_time  # COMMAND_MODULES, imported in a module-level loop
    assert main["polypseg.errors"].at_import_time
    root = {edge.target: edge for edge in modules["polypseg"].imports}
    assert not root["polypseg.models.checkpoint"].at_import_time  # the lazy names: only on first use
    assert any(not edge.at_import_time for info in modules.values() for edge in info.imports)


def test_no_import_cycles(modules: dict[str, ModuleInfo]) -> None:
    """Data flows one way: no polypseg module imports, even lazily, a module that imports it back."""
    cycles = find_cycles(modules)
    if cycles:
        print(describe_cycles(modules, cycles))
    assert not cycles, "import cycle(s) among polypseg modules:\n" + describe_cycles(modules, cycles)


def test_only_the_cli_imports_the_cli(modules: dict[str, ModuleInfo]) -> None:
    offending = [
        f"{edge.source} -> {edge.target} ({info.path.name}:{edge.line})"
        for info in modules.values()
        if not in_package(info.name, "polypseg.cli") and info.name != "polypseg.__main__"  # python -m polypseg
        for edge in info.imports
        if in_package(edge.target, "polypseg.cli")
    ]
    assert not offending, "a module below the CLI imports it:\n" + "\n".join(offending)


def test_only_web_and_cli_import_web(modules: dict[str, ModuleInfo]) -> None:
    offending = [
        f"{edge.source} -> {edge.target} ({info.path.name}:{edge.line})"
        for info in modules.values()
        if not in_package(info.name, "polypseg.web") and not in_package(info.name, "polypseg.cli")
        for edge in info.imports
        if in_package(edge.target, "polypseg.web")
    ]
    assert not offending, "a module below the web app imports it:\n" + "\n".join(offending)


@pytest.mark.parametrize("entry_point", LIGHT_ENTRY_POINTS)
def test_entry_point_loads_no_torch(modules: dict[str, ModuleInfo], entry_point: str) -> None:
    """Everything ``entry_point`` loads at import time (its module-level imports, their parent
    packages, and so on) is free of module-level torch, torchvision and smp imports."""
    loaded = import_time_closure(modules, entry_point)
    heavy = [
        f"{name} imports {target} ({modules[name].path.relative_to(SRC.parent)}:{line}) via {' -> '.join(path)}"
        for name, path in loaded.items()
        for target, line in modules[name].heavy_at_import_time
    ]
    assert not heavy, f"importing {entry_point} loads torch:\n" + "\n".join(heavy)


def import_time_closure(modules: dict[str, ModuleInfo], start: str) -> dict[str, list[str]]:
    """The modules loaded by importing ``start``, each with one import path from ``start``."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        current = queue.pop(0)
        following = [edge.target for edge in modules[current].imports if edge.at_import_time]
        following += parents(current)
        for target in following:
            if target in modules and target not in paths:
                paths[target] = [*paths[current], target]
                queue.append(target)
    return paths


def parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# The stage packages of docs/architecture.md, bottom to top. A module may import its own layer and
# those below it, never one above: data flows one way. A new package or root module must be placed here.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "_lazy", "errors", "core", "metrics"),  # foundation
    ("data",),  # data sets, splits, transforms, input files
    ("models",),  # building models, checkpoints, shipped weights
    ("inference",),  # the inference core and everything that predicts
    ("training", "explain"),  # training and evaluation; Grad-CAM (neither imports the other)
    ("reporting",),  # summaries, figures, HTML reports, comparisons
    ("experiments",),  # cross-validation, studies, benchmarks: they train, then report
    ("cli", "web", "__main__"),  # apps
)


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) == 1:
        return len(LAYERS) if module == PACKAGE else None  # the package root re-exports: on top
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    return None


def test_every_module_has_a_layer(modules: dict[str, ModuleInfo]) -> None:
    assert [name for name in modules if layer_of(name) is None] == []


def test_imports_only_go_down_the_layers(modules: dict[str, ModuleInfo]) -> None:
    upward = [
        f"{edge.source} (layer {layer_of(edge.source)}) -> {edge.target} (layer {layer_of(edge.target)})"
        f"  ({info.path.name}:{edge.line})"
        for info in modules.values()
        for edge in info.imports
        if (layer_of(edge.target) or 0) > (layer_of(edge.source) or 0)
    ]
    assert upward == [], "imports up the layers:\n" + "\n".join(upward)


def test_sibling_packages_do_not_import_each_other(modules: dict[str, ModuleInfo]) -> None:
    """Two stage packages in one layer (training and explain) stay independent; the foundation's
    modules and the apps (the CLI serves the web app) may import their layer-mates."""
    sideways = [
        f"{edge.source} -> {edge.target}  ({info.path.name}:{edge.line})"
        for info in modules.values()
        for edge in info.imports
        if layer_of(edge.source) == layer_of(edge.target)
        and layer_of(edge.source) not in (0, len(LAYERS) - 1, len(LAYERS))
        and edge.source.split(".")[:2] != edge.target.split(".")[:2]
    ]
    assert sideways == [], "imports between sibling packages:\n" + "\n".join(sideways)
