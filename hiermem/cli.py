"""The `hiermem` command line: one entry point, subcommands contributed by each package.

Each package that adds commands has a `cli.py` with `register(subparsers)`; it must import its heavy
dependencies (torch, grpc, fastapi) lazily, inside the command functions, so `hiermem --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from base.logsetup import configure

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "lm.cli",
    "memory_store.cli",
    "training.cli",
    "services.memory_bank.cli",
    "services.model_server.cli",
    "hiermem.launcher",
)


def anchor_for_bank(name: str) -> tuple[Any, int, int]:
    """(AnchorIdentity, n_layers, d_model) of an anchor (smollm2, tiny or a directory; converted and cached on
    first use): what a bank made for it must record. Handed to memory_store's commands, which cannot import lm."""
    from lm import load_anchor
    from memory_store import AnchorIdentity

    anchor = load_anchor(name)
    return AnchorIdentity(**anchor.identity), anchor.config.n_layers, anchor.config.d_model


def update_bank(args: argparse.Namespace) -> int:
    """`hiermem bank update`: training's command on memory_store's `bank` group (training/update.py)."""
    from training.update import run_update_command

    return run_update_command(args)


# What the entry point hands a package's register() beyond the subparsers: what that package may not import.
WIRING: dict[str, dict[str, Any]] = {"memory_store.cli": {"resolve_anchor": anchor_for_bank,
                                                           "update_bank": update_bank}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hiermem", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A package that has not landed yet contributes nothing; any other import error is a bug.
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(sub, **WIRING.get(name, {}))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(args.log_level)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
