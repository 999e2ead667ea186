"""`python -m services.memory_bank ...` is `hiermem serve-bank ...`, without importing the other packages'
commands (torch, transformers), so a shard replica starts in about a second."""

import argparse
import sys

from base.logsetup import configure

from .cli import add_serve_bank_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.memory_bank", description="hiermem serve-bank")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    add_serve_bank_arguments(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
