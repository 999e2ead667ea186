"""Where hiermem keeps its caches and default artefacts."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Root of hiermem's caches (converted anchors, demo banks): `$HIERMEM_HOME`, default ~/.cache/hiermem."""
    return Path(os.environ.get("HIERMEM_HOME", Path.home() / ".cache" / "hiermem")).expanduser()
