"""The import graph of the project: no cycle, and stage 1 (``rela_convert``) never imports stage 2 (``rela_train``)
or the CLI.

The graph is read from the source with :mod:`ast`, without importing anything: every ``import`` and ``from ...
import`` of a project module counts, wherever it stands (module level, inside a function, under ``if
TYPE_CHECKING``). An edge goes to the module named (``from rela_convert.dataset import remote`` names the module
``rela_convert.dataset.remote``; ``from rela_convert.dataset.index import DatasetIndex`` names
``rela_convert.dataset.index``), not to the packages above it, as pydeps and grimp count them.

``python tests/test_layering.py`` prints the graph: every edge, the cycles and the upward edges.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
#: The project's importable code: the two stages and the command.
PACKAGES = ("rela_convert", "rela_train")
#: Floors, lowest first: a module may import its own floor and those below it, never one above.
FLOORS = ("rela_convert", "rela_train", "cli")


def module_name(path: Path, root: Path = PROJECT) -> str:
    """``rela_convert/dataset/index.py`` -> ``rela_convert.dataset.index``; a package's ``__init__.py`` -> its name."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = PROJECT) -> dict[str, Path]:
    """Every module of the project (``cli`` and the modules of :data:`PACKAGES`) -> its file."""
    files = [root / "cli.py", *(path for package in PACKAGES for path in sorted((root / package).rglob("*.py")))]
    return {module_name(path, root): path for path in files}


def imports(path: Path, name: str, is_package: bool) -> list[tuple[str, str | None]]:
    """Every import of ``path`` (module ``name``), wherever it stands, as ``(module, attribute)``: ``import a.b`` ->
    ``("a.b", None)``; ``from a import b`` -> ``("a", "b")`` (``b`` a submodule or a name defined in ``a``);
    relative imports made absolute."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.extend((base, alias.name) for alias in node.names)
    return found


def imported_modules(path: Path, name: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` (module ``name``) imports: ``from a import b`` names ``a.b`` when that is a
    module, else ``a``."""
    targets = set()
    for module, attribute in imports(path, name, is_package):
        submodule = f"{module}.{attribute}"
        targets.add(submodule if attribute is not None and submodule in modules else module)
    return {target for target in targets if target in modules and target != name}


def import_graph(root: Path = PROJECT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (see the module docstring)."""
    modules = project_modules(root)
    return {name: imported_modules(path, name, path.name == "__init__.py", modules) for name, path in modules.items()}


def defined_names(path: Path) -> set[str] | None:
    """The names a module defines at its top level (functions, classes, assignments, imports, loop variables);
    None when it has a module ``__getattr__`` (any name may exist)."""
    names = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(child.name)
                continue  # names inside are not the module's
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names.update((alias.asname or alias.name).split(".")[0] for alias in child.names)
            elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                names.add(child.id)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return None if "__getattr__" in names else names


def dangling_imports(root: Path = PROJECT, folders: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """``(importer, name)`` for every import of a ``rela_convert`` / ``rela_train`` / ``cli`` name that the project
    does not hold (a module that moved and left a stale import behind, a name no longer defined there), in the
    project's modules and the ``.py`` files under ``folders`` (e.g. ``tests``)."""
    modules = project_modules(root)
    files = {**{name: path for name, path in modules.items()}}
    for folder in folders:
        files.update({str(path.relative_to(root)): path for path in sorted((root / folder).rglob("*.py"))})
    found = []
    for name, path in files.items():
        for module, attribute in imports(path, name, path.name == "__init__.py"):
            if module.split(".")[0] not in (*PACKAGES, "cli"):
                continue
            if module not in modules:
                found.append((name, module))
            elif attribute is not None and f"{module}.{attribute}" not in modules:
                defined = defined_names(modules[module])
                if defined is not None and attribute not in defined and attribute != "*":
                    found.append((name, f"{module}.{attribute}"))
    return sorted(set(found))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def floor(module: str) -> int:
    """The position of ``module``'s top-level name in :data:`FLOORS`."""
    return FLOORS.index(module.split(".")[0])


def upward_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(importer, imported)`` for every import of a higher floor (stage 1 importing stage 2 or the CLI, ...)."""
    return sorted(
        (source, target) for source, targets in graph.items() for target in targets if floor(target) > floor(source)
    )


def test_the_graph_is_read_from_the_project():
    graph = import_graph()
    assert {"cli", "rela_convert.dataset.index", "rela_train.trainer"} <= set(graph)
    assert "rela_train.trainer" in graph["cli"] or any(module.startswith("rela_train") for module in graph["cli"])
    assert graph["rela_train.trainer"], "the trainer imports the modules it drives"


def test_the_project_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_stage_one_never_imports_stage_two_or_the_command():
    assert upward_edges(import_graph()) == []


def test_every_import_of_a_project_name_names_one_that_exists():
    assert dangling_imports(folders=("tests", "benchmarks", "experiments")) == []


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert upward_edges({"rela_convert.x": {"rela_train.y", "rela_convert.z"}, "rela_train.y": {"cli"}}) == [
        ("rela_convert.x", "rela_train.y"),
        ("rela_train.y", "cli"),
    ]


def main() -> None:
    """Print the graph (one line per module: what it imports), then the cycles and the upward edges."""
    graph = import_graph()
    for module in sorted(graph):
        print(f"{module} -> {', '.join(sorted(graph[module])) or '(nothing of the project)'}")
    found, upward = cycles(graph), upward_edges(graph)
    dangling = dangling_imports(folders=("tests", "benchmarks", "experiments"))
    print(f"\n{len(graph)} modules, {sum(map(len, graph.values()))} import edges")
    print(f"cycles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    print(f"upward edges (a lower floor importing a higher one; floors {' < '.join(FLOORS)}): {len(upward)}")
    for source, target in upward:
        print(f"  {source} -> {target}")
    print(f"dangling imports: {len(dangling)}")
    for source, target in dangling:
        print(f"  {source} -> {target}")


if __name__ == "__main__":
    main()
