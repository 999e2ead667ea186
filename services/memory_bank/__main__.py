"""`python -m services.memory_bank ...` is `hiermem serve-bank ...`, without importing the other packages'
commands (torch, transformers), so a shard replica starts in about a second."""

import sys

from base.entry import run

from .cli import add_serve_bank_arguments

if __name__ == "__main__":
    sys.exit(run("python -m services.memory_bank", add_serve_bank_arguments, description="hiermem serve-bank"))
