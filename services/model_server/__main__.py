"""`python -m services.model_server [flags]`: the same as `hiermem serve-model`, without the other commands."""

from __future__ import annotations

import argparse
import sys

from base.logsetup import configure

from .cli import _add_settings_flags, _serve_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.model_server", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    _add_settings_flags(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)
    return _serve_model(args)


if __name__ == "__main__":
    sys.exit(main())
