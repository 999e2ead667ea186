"""`python -m services.memory_bank ...` is `hiermem serve-bank ...`."""

import sys

from hiermem.cli import main

sys.exit(main(["serve-bank", *sys.argv[1:]]))
