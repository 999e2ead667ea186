"""The configuration table of README.md, generated from the settings classes themselves.

`python -m hiermem.envdoc` prints one Markdown table row per environment variable of every service's
pydantic-settings class (plus the few plain variables), so the README cannot drift from the code:
`tests/test_readme.py` checks that README lists every variable this module knows.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

from base.paths import home

# (module, class, the command it configures)
SETTINGS_CLASSES = (
    ("services.memory_bank.settings", "BankServerSettings", "hiermem serve-bank"),
    ("services.model_server.settings", "ModelServerSettings", "hiermem serve-model"),
    ("hiermem.launcher", "UpSettings", "hiermem up"),
    ("hiermem.launcher", "EnsureBankSettings", "hiermem ensure-bank"),
)

PLAIN_VARIABLES = (
    ("HIERMEM_HOME", "`~/.cache/hiermem`", "all", "caches: converted anchors, demo and synthetic banks"),
    ("HIERMEM_THREADS", "`auto`", "hiermem generate", "torch threads (`auto` = cores minus load, at least 1)"),
    ("HIERMEM_VENV", "`.venv`", "scripts/*.sh", "virtual environment the two README commands create and use"),
)


def _default(field) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if value in (None, ""):
        return "unset"
    if isinstance(value, Path):  # show paths below the cache root portably
        value = str(value).replace(str(home()), "$HIERMEM_HOME")
    return f"`{value!r}`"


def rows() -> Iterator[tuple[str, str, str, str]]:
    """(variable, default, command, meaning) for every known variable."""
    for module, cls_name, command in SETTINGS_CLASSES:
        cls = getattr(importlib.import_module(module), cls_name)
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            doc = " ".join((field.description or "").split())
            yield f"{prefix}{name}".upper(), _default(field), command, doc
    yield from PLAIN_VARIABLES


def table() -> str:
    out = ["| variable | default | used by | meaning |", "|---|---|---|---|"]
    for var, default, command, doc in rows():
        out.append(f"| `{var}` | {default} | {command} | {doc.replace('|', '/')} |")
    return "\n".join(out) + "\n"


START, END = "<!-- env:start -->", "<!-- env:end -->"


def write_readme(readme: Path) -> None:
    """Replace the block between the env markers of `readme` with the current table."""
    text = readme.read_text()
    start, end = text.index(START), text.index(END)
    readme.write_text(text[:start + len(START)] + "\n" + table() + text[end:])


if __name__ == "__main__":
    import sys

    if "--write-readme" in sys.argv:
        write_readme(Path(__file__).resolve().parent.parent / "README.md")
    else:
        print(table(), end="")
