#!/usr/bin/env bash
# Generates the Python stubs of proto/hiermem/v1/*.proto into services/memory_bank/_gen/ (or into the
# directory given as $1). Uses the pinned grpcio-tools; the generated grpc module's absolute import of
# `hiermem.v1` is rewritten to a relative one, because `hiermem` is also our Python package.
# tests/services/memory_bank/test_proto_stubs.py regenerates into a temp dir and diffs, so stubs cannot drift.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/services/memory_bank/_gen}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
cd "$ROOT/proto"
"$PY" -m grpc_tools.protoc -I. --python_out="$TMP" --pyi_out="$TMP" --grpc_python_out="$TMP" \
  hiermem/v1/memory_bank.proto
mkdir -p "$OUT"
for f in "$TMP"/hiermem/v1/*.py "$TMP"/hiermem/v1/*.pyi; do
  sed -e 's/^from hiermem\.v1 import /from . import /' "$f" > "$OUT/$(basename "$f")"
done
[ -f "$OUT/__init__.py" ] || printf '"""Generated from proto/hiermem/v1 by scripts/gen_proto.sh; do not edit."""\n' > "$OUT/__init__.py"
