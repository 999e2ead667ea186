#!/usr/bin/env bash
# The whole test suite: environment setup, lint (ruff), types (mypy, settings in mypy.ini), then pytest
# (unit + integration tests, which start real redis-server, bank shard and model server processes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
VENV="${HIERMEM_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "[test] ruff"
ruff check .
echo "[test] mypy"
mypy base lm memory_store services hiermem training
echo "[test] pytest"
exec python -m pytest "$@"
