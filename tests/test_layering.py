"""The packages stack without back-edges: the domain packages (`lm`, `memory_store`, `training`) import no
transport and nothing from the layers above them (the `hiermem` CLI, the `services`), and `base` imports
no other package of the repository (docs/design.md §2).

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
