"""`hiermem serve-model` (flags mirror ModelServerSettings / HIERMEM_MODEL_*) and `hiermem model-key`."""

from __future__ import annotations

import argparse
import json

from base.settings_cli import add_settings_flags, settings_from_args


def add_serve_model_arguments(parser: argparse.ArgumentParser) -> None:
    from .settings import ModelServerSettings

    add_settings_flags(parser, ModelServerSettings)
    parser.set_defaults(func=_serve_model)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve-model", help="serve the anchor + memory bank over HTTP (OpenAI, TGI)",
                              description=__doc__)
    add_serve_model_arguments(p)
    k = subparsers.add_parser("model-key", help="make an API key for the model server (prints key + entry)")
    k.add_argument("--tenant", required=True)
    k.add_argument("--subtrees", default=None,
                   help="comma-separated level-1 subtrees the key may use (default: all; '' = none)")
    k.set_defaults(func=_model_key)


def _serve_model(args: argparse.Namespace) -> int:
    from .server import run
    from .settings import ModelServerSettings

    return run(settings_from_args(ModelServerSettings, args))


def _model_key(args: argparse.Namespace) -> int:
    from .auth import hash_key, new_key

    key = new_key()
    subtrees = None if args.subtrees is None else [int(s) for s in args.subtrees.split(",") if s.strip()]
    print(f"key: {key}")
    print("entry for the keys file:")
    print(json.dumps({"sha256": hash_key(key), "tenant": args.tenant, "subtrees": subtrees}))
    return 0
