"""README.md stays true: the two commands, CI calling the test command, every env variable, the bench table."""

from __future__ import annotations

import re
from pathlib import Path

from bench.summary import readme_block, summary
from hiermem import envdoc

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["bash scripts/run.sh", "bash scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci and "run.sh" not in ci
    for script in ("run.sh", "test.sh", "setup_env.sh"):
        assert (ROOT / "scripts" / script).is_file()


def test_every_environment_variable_is_documented():
    missing = [var for var, *_ in envdoc.rows() if f"`{var}`" not in README]
    assert not missing, f"README lacks {missing}: run python -m hiermem.envdoc --write-readme"


def test_benchmark_table_matches_the_results_files():
    assert readme_block(README) == summary(), "run python -m bench.summary --write-readme"
