"""The fast entry points (`python -m services.memory_bank`, `python -m services.model_server`,
`python -m hiermem.launcher`): one command's flags without importing every package's commands (torch), so
a shard replica or a healthcheck starts in well under a second."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from base.logsetup import configure


def run(prog: str, add_arguments: Callable[[argparse.ArgumentParser], None], argv: list[str] | None = None,
        description: str | None = None) -> int:
    """Parse `argv` with `--log-level` and what `add_arguments` adds (which sets `func`), set up logging,
    run `args.func(args)`; returns its exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)
    return int(args.func(args) or 0)
