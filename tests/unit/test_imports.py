"""The package's import structure, read from the source with ``ast`` (nothing is imported): no cycle among the
modules' imports, those inside functions included (a lazy import hides a cycle, it does not remove it)."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import resnet_ray

PACKAGE = "resnet_ray"


def package_modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package, subpackages included.

    pkgutil.walk_packages skips folders without an ``__init__.py`` (``resnet_ray`` and ``resnet_ray/data`` are
    namespace packages), so each folder is walked with pkgutil.iter_modules and subfolders are entered here.
    """
    modules = {}

    def walk(folder: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(folder)], prefix):
            path = folder / info.name.rsplit(".", 1)[-1]
            modules[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.py"))):
            if sub.name.isidentifier():
                walk(sub, f"{prefix}{sub.name}.")

    for root in resnet_ray.__path__:  # an editable install adds a path-hook entry that is no folder
        if Path(root).is_dir():
            walk(Path(root), f"{PACKAGE}.")
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The dotted names an import statement may load: the module, and ``module.name`` for each imported name
    (``from resnet_ray.data import layout`` loads the module resnet_ray.data.layout)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        parts = module.split(".")[: -node.level]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def package_imports(module: str, path: Path) -> set[str]:
    """The modules ``module`` may import: every import statement in it, at the top level or inside a function,
    except under ``if TYPE_CHECKING:`` (an import inside a function is an edge of the graph too: it only moves
    the moment the cycle bites)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(_imported_names(node, module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {
        name: {m for m in package_imports(name, path) if m in modules and m != name} for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as [a, b, ..., a], or [] when there is none (depth-first, in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_walk_finds_the_modules_of_subpackages():
    modules = package_modules()
    assert {"resnet_ray.config", "resnet_ray.data.layout", "resnet_ray.data.prepare"} <= set(modules)


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle_among_the_package_modules():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_an_import_inside_a_function_is_an_edge(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from resnet_ray import config\n"
        "def f():\n    from resnet_ray.model import build_model\n    if True:\n        import resnet_ray.storage\n"
    )
    found = package_imports("resnet_ray.m", path)
    assert {"resnet_ray.model", "resnet_ray.storage"} <= found and "resnet_ray.config" not in found


def test_data_layout_is_a_leaf_of_the_data_package():
    graph = import_graph()
    assert not {m for m in graph["resnet_ray.data.layout"] if m.startswith("resnet_ray.data.")}


def test_the_report_side_imports_neither_ray_nor_torch():
    """docs/ARCHITECTURE.md's rule: metrics, calibration maths, reports, plots and comparisons run without Ray or
    torch (a laptop reads an evaluation folder with them), through every package module they import, in functions
    too."""
    modules = package_modules()
    for start in ("metrics", "calibration", "report", "plots", "compare"):
        seen, todo, heavy = set(), [f"{PACKAGE}.{start}"], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for imported in package_imports(name, modules[name]):
                if imported in modules:
                    todo.append(imported)
                elif imported.split(".")[0] in ("ray", "torch", "torchvision"):
                    heavy.add(f"{name} imports {imported}")
        assert not heavy, f"{start}: {sorted(heavy)}"
