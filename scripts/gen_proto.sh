#!/usr/bin/env bash
# Generates the Python messages of proto/hiermem/v1/*.proto (module + type stub) into
# services/memory_bank/_gen/ (or into the directory given as $1), with the pinned grpcio-tools.
# No gRPC service stubs (memory_bank_pb2_grpc.py): the server and the client register their methods by hand,
# because FetchBlocks sends and receives pre-encoded chunks (services/memory_bank/wire.py) and requests
# are parsed leniently, which the generated stubs' fixed (de)serializers cannot do; the method names come
# from the messages module's service descriptor.
# tests/services/memory_bank/test_proto_stubs.py regenerates into a temp dir and diffs, so they cannot drift.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/services/memory_bank/_gen}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
cd "$ROOT/proto"
"$PY" -m grpc_tools.protoc -I. --python_out="$TMP" --pyi_out="$TMP" hiermem/v1/memory_bank.proto
mkdir -p "$OUT"
cp "$TMP"/hiermem/v1/*.py "$TMP"/hiermem/v1/*.pyi "$OUT"/
[ -f "$OUT/__init__.py" ] || printf '"""Generated from proto/hiermem/v1 by scripts/gen_proto.sh; do not edit."""\n' > "$OUT/__init__.py"
