"""`hiermem serve-bank`: one shard replica of a bank over gRPC. Flags mirror `BankServerSettings`."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: Any) -> None:
    """One flag per settings field (`max_nodes_per_call` -> `--max-nodes-per-call`), help from the field's
    description and its environment variable. Absent flags stay absent, so the environment and the
    defaults apply; pydantic validates and converts the strings."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = (prefix + name).upper()
        required = field.is_required()
        help_text = f"{field.description or ''} [env {env}]" + ("" if required else f" (default {field.default})")
        annotation = field.annotation
        args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        if bool in args:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def settings_from_args(settings_cls: Any, args: argparse.Namespace) -> Any:
    """Builds the settings: flags given on the command line win over `<PREFIX>*` environment variables."""
    given = {name: getattr(args, name) for name in settings_cls.model_fields if hasattr(args, name)}
    return settings_cls(**given)


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

    from pydantic import ValidationError

    from memory_store.errors import BankError

    from .errors import BankServiceError
    from .server import serve
    from .settings import BankServerSettings

    try:
        settings = settings_from_args(BankServerSettings, args)
    except ValidationError as exc:
        raise SystemExit(f"hiermem serve-bank: invalid settings:\n{exc}") from None
    try:
        asyncio.run(serve(settings))
    except (BankError, BankServiceError, OSError) as exc:  # a bank or shard that cannot be served, a busy port
        raise SystemExit(f"hiermem serve-bank: {exc}") from None
    return 0
