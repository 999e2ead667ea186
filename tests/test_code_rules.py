"""Rules that keep the code tidy (docs/code-quality.md):

* no source file over MAX_LINES lines (tests, the generated gRPC stubs, `build/` and `.venv/` aside);
* no dated measurement in a comment or docstring: no date, no "ms on <machine>", no before -> after pair of
  timings or percentages. Code keeps the decision; the numbers behind it live in docs/ (docs/lm.md,
  docs/memory_store.md, docs/training.md, ...), where they can be dated and rerun;
* training/config.py holds the training settings only: its command line is built elsewhere (no
  `add_argument` there).

Each rule has a test of its checker on a small source, so the rule can fail."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
SKIPPED_DIRS = {"tests", "build", "dist", "node_modules", "__pycache__"}
GENERATED = Path("services/memory_bank/_gen")


def source_files(root: Path = ROOT) -> list[Path]:
    """The repository's non-test .py files, relative to `root`: not under tests/, build/, a hidden directory
    (.venv, .git, caches) or the generated gRPC stubs."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIPPED_DIRS or part.startswith(".") or part.endswith(".egg-info")
               for part in rel.parts[:-1]):
            continue
        if rel.is_relative_to(GENERATED):
            continue
        found.append(rel)
    return found


# --- file length -----------------------------------------------------------------------------------------

def too_long(text: str, where: str, max_lines: int = MAX_LINES) -> list[str]:
    n = len(text.splitlines())
    return [f"{where}: {n} lines (at most {max_lines})"] if n > max_lines else []


def test_the_length_rule_reports_a_long_file():
    assert too_long("x = 1\n" * 451, "a.py") == ["a.py: 451 lines (at most 450)"]
    assert too_long("x = 1\n" * 450, "a.py") == []


def test_no_source_file_is_over_the_line_limit():
    files = source_files()
    assert any(str(path) == "lm/model.py" for path in files)
    assert not any(path.is_relative_to(GENERATED) or path.parts[0] in {"tests", ".venv"} for path in files)
    problems = []
    for rel in files:
        problems += too_long((ROOT / rel).read_text(), str(rel))
    assert problems == [], "split these files:\n" + "\n".join(problems)


# --- no dated measurements in comments and docstrings ----------------------------------------------------

_NUM = r"\d+(?:[.,]\d+)*"
_UNIT = r"(?:%|ns|us|µs|ms|s|min|x)(?![A-Za-z0-9])"
_ARROW = r"(?:->|→|=>)"
MEASUREMENT = re.compile(
    r"\b20\d\d-[01]\d-[0-3]\d\b"                                   # a date
    r"|\bms on\b"                                                   # "58 ms on 2 threads", "62.9 ms on an EPYC"
    rf"|{_NUM} ?{_UNIT} ?{_ARROW} ?{_NUM}(?: ?{_UNIT})?"              # "38% -> 80%", "71 s → 7.7 s"
    rf"|{_NUM} ?{_ARROW} ?{_NUM} ?{_UNIT}"                           # "62.9 -> 58.2 ms"
    rf"|\bfrom {_NUM} ?(?:{_UNIT} )?to {_NUM} ?{_UNIT}")              # "from 17 ms to 7 ms"


def _docstring_starts(tree: ast.AST) -> set[tuple[int, int]]:
    """(line, column) where each string that stands alone as a statement begins: docstrings of modules,
    classes and functions, and the strings documenting an attribute."""
    return {(node.value.lineno, node.value.col_offset) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


def dated_measurements(source: str, where: str = "<source>") -> list[str]:
    """`where:line: text` for each measurement MEASUREMENT finds in a comment or a docstring of `source`.
    Code, string literals in expressions and annotations (`-> int`) are not read."""
    docstrings = _docstring_starts(ast.parse(source))
    found: dict[str, None] = {}  # in order, each line's match once
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT or (token.type == tokenize.STRING and token.start in docstrings):
            for match in MEASUREMENT.finditer(token.string):
                line = token.start[0] + token.string.count("\n", 0, match.start())
                found[f"{where}:{line}: {match.group(0)!r}"] = None
    return list(found)


def test_the_measurement_rule_reads_comments_and_docstrings_only():
    source = ('"""Module doc.\n'
              '\n'
              'Measured 2026-11-28 on the CI machine."""\n'
              'def f(x: int) -> int:  # a batch-1 step 62.9 -> 58.2 ms\n'
              '    """Fast: 58 ms on 2 threads, 2.7 ms on 1."""\n'
              '    log = "took %.1f ms on %d threads"  # a log line is code\n'
              '    return x  # valid 38% -> 80% on the subset; reads went from 17 ms to 7 ms\n'
              'class C:\n'
              '    size = 3\n'
              '    """Attribute doc: 71 s → 7.7 s."""\n'
              'def g(a: float) -> float:\n'
              '    return a  # (N, d) -> (N, V); level 1 -> 2; see docs/lm.md\n')
    assert dated_measurements(source, "m.py") == [
        "m.py:3: '2026-11-28'",
        "m.py:4: '62.9 -> 58.2 ms'",
        "m.py:5: 'ms on'",
        "m.py:7: '38% -> 80%'",
        "m.py:7: 'from 17 ms to 7 ms'",
        "m.py:10: '71 s → 7.7 s'",
    ]
    assert dated_measurements("def h(n: int) -> dict[str, int]:\n    return {'a': 1}\n") == []


def test_no_dated_measurements_in_comments_or_docstrings():
    problems = []
    for rel in source_files():
        problems += dated_measurements((ROOT / rel).read_text(), str(rel))
    assert problems == [], ("move these numbers to docs/ and point there from the code:\n"
                            + "\n".join(problems))


# --- training/config.py declares settings only ----------------------------------------------------------

def argparse_calls(source: str, where: str = "<source>") -> list[str]:
    """`where:line` of each `add_argument` named in the code of `source` (comments and strings aside)."""
    lines = sorted(node.lineno for node in ast.walk(ast.parse(source))
                   if (isinstance(node, ast.Attribute) and node.attr == "add_argument")
                   or (isinstance(node, ast.Name) and node.id == "add_argument"))
    return [f"{where}:{line}" for line in lines]


def test_the_config_rule_finds_add_argument():
    source = ("import argparse\n"
              "# add_argument is documented here\n"
              "p = argparse.ArgumentParser()\n"
              "p.add_argument('--lr')\n"
              "add = p.add_argument\n")
    assert argparse_calls(source, "c.py") == ["c.py:4", "c.py:5"]
    assert argparse_calls("x = 'add_argument'  # add_argument\n") == []


def test_training_config_builds_no_command_line():
    calls = argparse_calls((ROOT / "training" / "config.py").read_text(), "training/config.py")
    assert calls == [], (f"training/config.py builds a command line ({len(calls)} add_argument): "
                         + ", ".join(calls))
