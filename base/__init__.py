"""The bottom layer: helpers every hiermem package may import (where files live, logging set-up, settings
as command-line flags). It imports no other package of this repository, and nothing of torch, grpc,
fastapi or redis, so `lm`, `memory_store` and `training` can use it without reaching up into the CLI
(`hiermem`) or the services (tests/test_layering.py keeps it so)."""
