"""One logging set-up for every entry point (the `hiermem` CLI and the fast `python -m` service entries)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str | int = "INFO") -> None:
    """Log to stderr at `level` (a name such as "DEBUG" or a logging constant; unknown names mean INFO)."""
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=level, format=FORMAT)
