"""`hiermem serve-model` (flags mirror ModelServerSettings / HIERMEM_MODEL_*) and `hiermem model-key`."""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    from .settings import ModelServerSettings

    prefix = ModelServerSettings.model_config.get("env_prefix", "")
    for name, field in ModelServerSettings.model_fields.items():
        env = (prefix + name).upper()
        help_text = f"{field.description or ''} [env {env}]"
        ann = field.annotation
        args = typing.get_args(ann) if isinstance(ann, types.UnionType) else (ann,)
        flag = "--" + name.replace("_", "-")
        if bool in args:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Any:
    """Flags given on the command line win over HIERMEM_MODEL_* variables and defaults."""
    from .settings import ModelServerSettings

    given = {name: getattr(args, name) for name in ModelServerSettings.model_fields if hasattr(args, name)}
    return ModelServerSettings(**given)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve-model", help="serve the anchor + memory bank over HTTP (OpenAI, TGI)",
                              description=__doc__)
    _add_settings_flags(p)
    p.set_defaults(func=_serve_model)
    k = subparsers.add_parser("model-key", help="make an API key for the model server (prints key + entry)")
    k.add_argument("--tenant", required=True)
    k.add_argument("--subtrees", default=None,
                   help="comma-separated level-1 subtrees the key may use (default: all; '' = none)")
    k.set_defaults(func=_model_key)


def _serve_model(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .serve import run

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise SystemExit(f"hiermem serve-model: invalid settings:\n{exc}") from None
    return run(settings)


def _model_key(args: argparse.Namespace) -> int:
    from .auth import hash_key, new_key

    key = new_key()
    subtrees = None if args.subtrees is None else [int(s) for s in args.subtrees.split(",") if s.strip()]
    print(f"key: {key}")
    print("entry for the keys file:")
    print(json.dumps({"sha256": hash_key(key), "tenant": args.tenant, "subtrees": subtrees}))
    return 0
