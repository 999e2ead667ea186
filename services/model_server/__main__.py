"""`python -m services.model_server [flags]`: the same as `hiermem serve-model`, without the other commands."""

import sys

from base.entry import run

from .cli import add_serve_model_arguments

if __name__ == "__main__":
    sys.exit(run("python -m services.model_server", add_serve_model_arguments, description=__doc__))
