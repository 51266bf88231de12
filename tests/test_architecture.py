"""The two wings and the way imports go: the library never imports the lab, and no module imports itself
back through others (imports inside functions included).

Every ``import`` statement of every module is read from its source (``ast``), wherever it stands. The
experiments are found by the registry with ``importlib`` rather than an import statement; that edge,
registry -> each experiment, is added by hand so a circle through it is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "jaxopt_lab"
LAB = "jaxopt_lab.lab"
EXPERIMENTS = "jaxopt_lab.lab.experiments"
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    """Module name -> source file, with ``experiments/`` under its installed name."""
    found = {}
    for base, package in ((ROOT / "jaxopt_lab", LIBRARY), (ROOT / "experiments", EXPERIMENTS)):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imported(name: str, tree: ast.AST) -> list[tuple[str, int, bool]]:
    """``(module, line, inside_a_function)`` for every project module that ``name``'s source imports."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    edges = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one, else names of pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for target in targets:
            while target and target not in MODULES:  # `import jaxopt_lab.lab.x.y` -> the deepest module
                target = target.rpartition(".")[0]
            if target.startswith(LIBRARY):
                edges.append((target, node.lineno, id(node) in inside))
    return edges


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imported(name, ast.parse(path.read_text(), str(path))):
            if target != name:  # `python -m` guards import their own module: not a second module
                graph[name].add(target)
    # The registry imports every experiment by name (importlib): the one edge no import statement shows.
    graph[f"{LAB}.registry"] |= {n for n in MODULES if n.startswith(EXPERIMENTS + ".")}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
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
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_checker_sees_both_wings_and_the_registry_edge():
    graph = _graph()
    assert f"{LIBRARY}.normalization" in MODULES and f"{EXPERIMENTS}.normalization" in MODULES
    assert f"{LIBRARY}.nn" in graph[f"{LAB}.models"]  # a plain top-level import
    assert f"{EXPERIMENTS}.hand_backprop" in graph[f"{LAB}.registry"]


def test_the_checker_finds_a_circle_through_a_function_level_import():
    tree = ast.parse("def late():\n    from jaxopt_lab.lab import cli\n")
    assert _imported(f"{LAB}.runner", tree) == [(f"{LAB}.cli", 2, True)]
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _circles(_graph()) == []


def test_the_library_imports_nothing_of_the_lab():
    graph = _graph()
    library = [n for n in MODULES if not n.startswith(LAB)]
    assert len(library) >= 6
    offenders = {n: sorted(t for t in graph[n] if t.startswith(LAB)) for n in library}
    assert {n: t for n, t in offenders.items() if t} == {}


def test_only_the_cli_imports_project_modules_inside_functions():
    """The CLI imports the lab late on purpose (see its docstring); anywhere else it would hide a circle."""
    late = {}
    for name, path in MODULES.items():
        lines = [line for target, line, inside in _imported(name, ast.parse(path.read_text())) if inside
                 and target != name]
        if lines:
            late[name] = lines
    assert set(late) <= {f"{LAB}.cli"}, late


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_700_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)}: {lines} lines"
