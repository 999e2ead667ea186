"""`hiermem serve-bank`: one shard replica of a bank over gRPC. Flags mirror `BankServerSettings`."""

from __future__ import annotations

import argparse

from base.settings_cli import add_settings_flags, settings_from_args


def add_serve_bank_arguments(parser: argparse.ArgumentParser) -> None:
    from .settings import BankServerSettings

    add_settings_flags(parser, BankServerSettings)
    parser.set_defaults(func=_serve_bank)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve-bank", help="serve one shard of a bank over gRPC (health, reflection, metrics, Redis)",
        description=__doc__)
    add_serve_bank_arguments(p)


def _serve_bank(args: argparse.Namespace) -> int:
    import asyncio

    from memory_store.errors import BankError

    from .errors import BankServiceError
    from .server import serve
    from .settings import BankServerSettings

    settings = settings_from_args(BankServerSettings, args)
    try:
        asyncio.run(serve(settings))
    except (BankError, BankServiceError, OSError) as exc:  # a bank or shard that cannot be served, a busy port
        raise SystemExit(f"hiermem serve-bank: {exc}") from None
    return 0
