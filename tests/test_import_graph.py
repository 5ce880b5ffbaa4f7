"""The package's import graph has no cycles and keeps the layers of docs/design.md.

The graph is read from the source with :mod:`ast`, so imports inside functions count too (a
function-level import is how a cycle hides: it runs later, but the two modules still need each
other). ``python tests/test_import_graph.py`` prints the cycles and layer violations it finds.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "medshield"

# The layers of docs/design.md ("Layers"), bottom first: a top-level package or module of
# medshield imports only from its own layer and the layers below it.
LAYERS = (
    ("errors",),
    ("config", "data", "device", "registry", "threads", "workers"),
    ("models", "runs"),
    ("attacks",),
    ("defense", "eval", "noise"),
    ("cache", "report", "train"),
    ("commands",),
)
# The commands (whole jobs, and the command line over them) sit on top; the rest is the library.
COMMANDS = ("commands",)
LIBRARY = tuple(sorted({name for names in LAYERS for name in names} - set(COMMANDS)))
# Inside medshield.commands the same rule holds between its packages and modules, bottom first.
COMMAND_LAYERS = (
    ("console", "finetune", "redteam", "serve", "train_vlm", "workflows"),
    ("studies",),
    ("demo",),
    ("dual_encoder", "generative", "overview", "study"),
    ("cli",),
)

# The imports that still close a cycle, each with the reason; each must still close one. (The
# last one went with issue 24: the registries import their built-in plugins themselves.)
ALLOWED_BACK_EDGES: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))}


def imported_names(path: Path, module: str) -> Iterator[tuple[str, str, int]]:
    """Every import in a file, at any depth (functions included), as ``(module, name, line)``:
    ``import a.b`` gives ``("a.b", "", line)``, ``from a.b import c`` gives ``("a.b", "c", line)``
    (``c`` may be a module or a name defined in ``a.b``); relative imports are made absolute."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                drop = node.level - 1 if is_package else node.level
                anchor = anchor[: len(anchor) - drop]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield base, alias.name, node.lineno


@functools.cache
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported medshield module: line of its first import}. ``from a import c`` is an
    edge to ``a.c`` where that is a module, else to ``a``; any other name resolves to the longest
    medshield module it starts with. The parent packages that Python initialises on the way are
    not edges unless they are imported by name."""
    files = module_files()
    graph: dict[str, dict[str, int]] = {name: {} for name in files}
    for module, path in files.items():
        for base, name, line in imported_names(path, module):
            parts = (f"{base}.{name}" if f"{base}.{name}" in files else base).split(".")
            if parts[0] != PACKAGE:
                continue
            while parts and ".".join(parts) not in files:
                parts.pop()
            target = ".".join(parts)
            if target and target != module:
                graph[module].setdefault(target, line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def cycle_in(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """One cycle through a strongly connected component's first member (shortest, by BFS)."""
    start = component[0]
    members = set(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt in members and nxt not in parent:
                    parent[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join([*steps, cycle[-1]])


def layer(module: str) -> str:
    """The top-level package or module under medshield that a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def command_layer(module: str) -> str:
    """The package or module directly under medshield.commands that a module belongs to ("" for
    the rest, ``medshield.commands`` itself included)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "commands" else ""


def package_graph(graph: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The graph between medshield's top-level packages and modules (an edge stands for the first
    module-level import found between them)."""
    layers: dict[str, dict[str, int]] = {layer(m): {} for m in graph}
    for module, targets in graph.items():
        for target, line in targets.items():
            if layer(target) != layer(module) and layer(target):
                layers[layer(module)].setdefault(layer(target), line)
    return layers


def module_cycles(
    graph: dict[str, dict[str, int]], allowed: set[tuple[str, str]] = ALLOWED_BACK_EDGES
) -> list[str]:
    """One cycle per strongly connected group of modules, once the ``allowed`` edges are cut."""
    cut = {m: {t: n for t, n in ts.items() if (m, t) not in allowed} for m, ts in graph.items()}
    return [describe(cycle_in(c, cut), cut) for c in strongly_connected(cut)]


def package_cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    packages = package_graph(graph)
    cycles = []
    for component in strongly_connected(packages):
        cycle = cycle_in(component, packages)
        steps = []
        for a, b in zip(cycle, cycle[1:], strict=False):
            module, target = next(
                (m, t)
                for m in sorted(graph)
                for t in sorted(graph[m])
                if layer(m) == a and layer(t) == b
            )
            steps.append(f"{a} ({module} imports {target}, line {graph[module][target]})")
        cycles.append(" -> ".join([*steps, cycle[-1]]))
    return cycles


def imports_where(graph: dict[str, dict[str, int]], wrong: Callable[[str, str], bool]) -> list[str]:
    """The imports between two top-level names ``a -> b`` for which ``wrong(a, b)``."""
    return [
        f"{module} imports {target} (line {line})"
        for module in sorted(graph)
        for target, line in sorted(graph[module].items())
        if layer(module) and layer(target) and wrong(layer(module), layer(target))
    ]


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    rank = {name: i for i, names in enumerate(LAYERS) for name in names}
    found = imports_where(graph, lambda a, b: rank[b] > rank[a])
    command_rank = {name: i for i, names in enumerate(COMMAND_LAYERS) for name in names}
    return found + [
        f"{module} imports {target} (line {line})"
        for module in sorted(graph)
        for target, line in sorted(graph[module].items())
        if command_layer(module)
        and command_layer(target)
        and command_rank[command_layer(target)] > command_rank[command_layer(module)]
    ]


def commands_imported_by_the_library(graph: dict[str, dict[str, int]]) -> list[str]:
    return imports_where(graph, lambda a, b: a in LIBRARY and b in COMMANDS)


def test_every_top_level_name_is_placed_in_a_layer() -> None:
    names = {layer(m) for m in module_files()} - {""}
    placed = [name for names in LAYERS for name in names]
    assert len(placed) == len(set(placed)), "a name is in two layers"
    assert set(COMMANDS) <= set(placed)
    assert names == set(placed), f"not in LAYERS: {sorted(names - set(placed))}; " + (
        f"no longer in src: {sorted(set(placed) - names)}"
    )
    commands = {command_layer(m) for m in module_files()} - {""}
    placed = [name for names in COMMAND_LAYERS for name in names]
    assert len(placed) == len(set(placed)), "a command name is in two layers"
    assert commands == set(placed), f"not in COMMAND_LAYERS: {sorted(commands - set(placed))}; " + (
        f"no longer in src/medshield/commands: {sorted(set(placed) - commands)}"
    )


def test_the_graph_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "medshield" / "x.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from medshield.eval import vqa\n    from . import y\n")
    found = {(base, name) for base, name, _ in imported_names(source, "medshield.x")}
    assert found == {("medshield.eval", "vqa"), ("medshield", "y")}
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert describe(cycle_in(["a", "b", "c"], graph), graph) == (
        "a (line 1) -> b (line 2) -> c (line 3) -> a"
    )


def test_the_checks_name_a_library_module_importing_a_command() -> None:
    graph = {
        "medshield.report.x": {"medshield.commands.cli": 3, "medshield.eval": 4},
        "medshield.commands.demo.stages": {"medshield.commands.cli": 5},
        "medshield.commands.cli": {"medshield.commands.demo.stages": 6, "medshield.report.x": 7},
        "medshield.eval": {},
    }
    report_to_cli = "medshield.report.x imports medshield.commands.cli (line 3)"
    assert commands_imported_by_the_library(graph) == [report_to_cli]
    assert upward_imports(graph) == [
        report_to_cli,
        "medshield.commands.demo.stages imports medshield.commands.cli (line 5)",
    ]
    # report.x, cli and demo.stages are one strongly connected group: one cycle through it
    assert module_cycles(graph) == [
        "medshield.commands.cli (line 6) -> medshield.commands.demo.stages (line 5) -> "
        "medshield.commands.cli"
    ]
    assert package_cycles(graph) == [
        "commands (medshield.commands.cli imports medshield.report.x, line 7) -> "
        "report (medshield.report.x imports medshield.commands.cli, line 3) -> commands"
    ]


def test_no_import_cycle_between_modules() -> None:
    cycles = module_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_each_allowed_back_edge_still_closes_a_cycle() -> None:
    graph = import_graph()
    for module, target in ALLOWED_BACK_EDGES:
        assert target in graph[module], f"{module} no longer imports {target}: remove the exception"
        others = ALLOWED_BACK_EDGES - {(module, target)}
        assert module_cycles(graph, others), f"{module} -> {target} closes no cycle: remove it"


def test_no_import_cycle_between_packages() -> None:
    cycles = package_cycles(import_graph())
    assert not cycles, "import cycles between packages:\n" + "\n".join(cycles)


def test_library_never_imports_commands() -> None:
    violations = commands_imported_by_the_library(import_graph())
    assert not violations, "library modules importing commands:\n" + "\n".join(violations)


def test_imports_only_go_down_the_layers() -> None:
    violations = upward_imports(import_graph())
    assert not violations, "imports from a higher layer:\n" + "\n".join(violations)


# --- module size (issue 24) ----------------------------------------------------------------------

MAX_MODULE_LINES = 500


def module_lines() -> dict[str, int]:
    """Lines of every module under src/, by its path relative to src/."""
    return {
        str(path.relative_to(SRC)): len(path.read_text().splitlines())
        for path in sorted((SRC / PACKAGE).rglob("*.py"))
    }


def oversized_modules(lines: dict[str, int]) -> list[str]:
    return [f"{name}: {n} lines" for name, n in lines.items() if n > MAX_MODULE_LINES]


def test_no_module_is_over_500_lines() -> None:
    over = oversized_modules(module_lines())
    assert not over, (
        f"modules over {MAX_MODULE_LINES} lines (split them along their banners):\n"
        + "\n".join(over)
    )


def test_the_size_check_counts_lines() -> None:
    lines = {"medshield/a.py": MAX_MODULE_LINES, "medshield/b.py": MAX_MODULE_LINES + 1}
    assert oversized_modules(lines) == [f"medshield/b.py: {MAX_MODULE_LINES + 1} lines"]
    assert module_lines()["medshield/errors.py"] == len(
        (SRC / PACKAGE / "errors.py").read_text().splitlines()
    )


if __name__ == "__main__":
    graph = import_graph()
    for title, lines in (
        ("module cycles", module_cycles(graph, allowed=set())),
        ("module cycles besides the allowed back edges", module_cycles(graph)),
        ("package cycles", package_cycles(graph)),
        ("library -> commands imports", commands_imported_by_the_library(graph)),
        ("imports from a higher layer", upward_imports(graph)),
        (f"modules over {MAX_MODULE_LINES} lines", oversized_modules(module_lines())),
    ):
        print(f"{title}: {len(lines)}")
        for line in lines:
            print(f"  {line}")
