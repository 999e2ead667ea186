"""The packages stack without back-edges: the domain packages (`lm`, `memory_store`, `training`) import no
transport and nothing from the layers above them (the `hiermem` CLI, the `services`), and `base` imports
no other package of the repository (docs/design.md §2). And no module imports itself through others: the
import graph between the repository's modules has no circle, lazy imports inside functions included (a
circle of lazy imports still ties two modules into one; imports under `if TYPE_CHECKING:` never run and do
not count).

Imports are read with `ast` from every .py file, including the lazy ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRANSPORT = {"grpc", "grpc_health", "grpc_reflection", "fastapi", "starlette", "uvicorn", "redis"}
FORBIDDEN = {
    "lm": TRANSPORT | {"hiermem", "services", "training", "memory_store"},
    "memory_store": TRANSPORT | {"hiermem", "services", "training", "lm"},
    "training": TRANSPORT | {"hiermem", "services"},
    "base": TRANSPORT | {"hiermem", "services", "training", "lm", "memory_store", "torch"},
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`; relative imports stay inside the package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(source: str, forbidden: set[str], where: str = "<source>") -> list[str]:
    """`where:line imports module` for each import whose top-level package is in `forbidden`."""
    return [f"{where}:{line} imports {module}" for line, module in imported_modules(source)
            if module.split(".")[0] in forbidden]


def test_the_checker_reports_a_forbidden_import():
    source = ("import torch\n"
              "from lm.model import Transformer\n"
              "def load():\n"
              "    from hiermem.paths import home\n"
              "    import grpc.aio\n"
              "    from . import errors\n")
    assert violations(source, FORBIDDEN["training"], "t.py") == ["t.py:4 imports hiermem.paths",
                                                                 "t.py:5 imports grpc.aio"]
    assert violations("import torch\nfrom lm import MemoryBatch\n", FORBIDDEN["training"]) == []


def test_lower_packages_import_nothing_from_above_or_from_the_transports():
    problems = []
    for package, forbidden in FORBIDDEN.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"no Python files under {package}/"
        for path in files:
            problems += violations(path.read_text(), forbidden, str(path.relative_to(ROOT)))
    assert problems == []


# --- import circles -------------------------------------------------------------------------------------

PACKAGES = ["base", "lm", "memory_store", "training", "services.memory_bank", "services.model_server",
            "hiermem", "bench"]


def module_name(path: Path, root: Path = ROOT) -> str:
    """`training/evaluate.py` -> `training.evaluate`; `lm/__init__.py` -> `lm`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _run_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: module level, inside functions and classes, in try blocks; not the
    body of `if TYPE_CHECKING:` (its `else:` runs)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children: list[ast.AST] = list(node.orelse)
        else:
            children = list(ast.iter_child_nodes(node))
        for child in children:
            visit(child)

    visit(tree)
    return found


def import_edges(module: str, source: str, modules: set[str], is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module of `modules`) for each import of `source` (the text of `module`) that runs a module of
    `modules`. Relative imports are resolved against `module`'s package; `from pkg import name` imports
    `pkg.name` where that is a module, else `pkg` itself; `import a.b.c` imports `a.b.c`."""
    package = module if is_package else module.rpartition(".")[0]
    edges = []
    for node in _run_imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            edges += [(node.lineno, alias.name) for alias in node.names if alias.name in modules]
            continue
        if node.level:
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            submodule = f"{target}.{alias.name}" if target else alias.name
            if submodule in modules:
                edges.append((node.lineno, submodule))
            elif target in modules:
                edges.append((node.lineno, target))
    return [(line, target) for line, target in edges if target != module]


def import_cycles(graph: dict[str, set[str]], limit: int = 200) -> list[list[str]]:
    """The elementary cycles of `graph` (module -> modules it imports), each as [m0, m1, ..., m0] starting at
    its smallest module, sorted; at most `limit` of them."""
    cycles: list[list[str]] = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack and len(cycles) < limit:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ()), reverse=True):
                if nxt == start:
                    cycles.append(path + [start])
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return sorted(cycles)


def repository_import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """The import graph between the modules of PACKAGES, and where each edge is written (`file:line`)."""
    files = {}
    for package in PACKAGES:
        directory = root.joinpath(*package.split("."))
        assert directory.is_dir(), f"no package {package}"
        files.update({module_name(path, root): path for path in sorted(directory.rglob("*.py"))})
    graph: dict[str, set[str]] = {module: set() for module in files}
    where: dict[tuple[str, str], str] = {}
    for module, path in files.items():
        for line, target in import_edges(module, path.read_text(), set(files), path.name == "__init__.py"):
            graph[module].add(target)
            where.setdefault((module, target), f"{path.relative_to(root)}:{line}")
    return graph, where


def test_the_cycle_checker_finds_a_lazy_circle_and_ignores_type_checking_ones():
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"}
    sources = {
        "pkg": ("from pkg.a import run\n", True),
        "pkg.a": ("from typing import TYPE_CHECKING\n"
                  "import pkg.c\n"
                  "if TYPE_CHECKING:\n"
                  "    from pkg.d import Thing\n"
                  "def run():\n"
                  "    from . import b\n", False),
        "pkg.b": ("def helper():\n"
                  "    from .a import run\n", False),
        "pkg.c": ("import os\n", False),
        "pkg.d": ("import typing\n"
                  "if typing.TYPE_CHECKING:\n"
                  "    from pkg.a import run\n"
                  "else:\n"
                  "    from pkg import c\n", False),
    }
    graph = {module: {target for _, target in import_edges(module, source, modules, is_package)}
             for module, (source, is_package) in sources.items()}
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.c", "pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": set(),
                     "pkg.d": {"pkg.c"}}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert import_cycles({"x": {"y"}, "y": {"z"}, "z": {"x", "y"}}) == [["x", "y", "z", "x"], ["y", "z", "y"]]
    assert import_edges("p.q.r", "from ..s import t\nfrom .. import s, u\n", {"p", "p.s", "p.s.t"}) == [
        (1, "p.s.t"), (2, "p.s"), (2, "p")]


def test_no_import_circles_between_the_repositorys_modules():
    graph, where = repository_import_graph()
    problems = []
    for cycle in import_cycles(graph):
        edges = ", ".join(where[a, b] for a, b in zip(cycle, cycle[1:], strict=False))
        problems.append(f"{' -> '.join(cycle)}  ({edges})")
    assert problems == [], "import circles:\n" + "\n".join(problems)
