#!/usr/bin/env bash
# The main job: set up the environment, then run one real generation with the SmolLM2 anchor plus a
# memory block (until the model server lands, this is the command-line generator; it grows into the stack).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
VENV="${HIERMEM_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec hiermem generate "${@:-The capital of France is}" --max-new-tokens 16 --synthetic-memory
