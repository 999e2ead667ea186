#!/usr/bin/env bash
# The main job: set up the environment, make sure a bank exists, start the whole stack with `hiermem up`
# (redis + bank shards + model server, SmolLM2 anchor), send one real completion and print the answer with
# its `memory` object, then stop the stack.
#
#   bash scripts/run.sh                        # default prompt (a rare demo fact, memory on vs off)
#   bash scripts/run.sh "Marie Curie was born in"
#   bash scripts/run.sh --keep "..."           # leave the stack running afterwards (stop: kill <pid shown>)
#
# Bank: the trained demo bank ($HIERMEM_HOME/banks/demo, built by `hiermem build --preset demo --no-eval
# --no-generic`: memories trained on a fifth of the built-in documents corpus, minutes the first time) when
# the training package is installed, else a small synthetic bank for SmolLM2 ($HIERMEM_HOME/banks/synth-smollm2)
# (the demo build trains, once; if it fails the synthetic bank is used). Override with HIERMEM_RUN_SOURCE=
# synth|demo, or HIERMEM_RUN_BANK=DIR (built with that source when absent, synth by default).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
KEEP=0
if [ "${1:-}" = "--keep" ]; then KEEP=1; shift; fi
PROMPT="${1:-}"

bash scripts/setup_env.sh
VENV="${HIERMEM_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
HOME_DIR="${HIERMEM_HOME:-$HOME/.cache/hiermem}"
PORT="${HIERMEM_UP_PORT:-8000}"

# 1. a bank
SOURCE="${HIERMEM_RUN_SOURCE:-auto}"
DEMO="$HOME_DIR/banks/demo"  # hiermem.launcher.demo_bank()
SYNTH="$HOME_DIR/banks/synth-smollm2"
BANK="${HIERMEM_RUN_BANK:-}"
ensure() { python -m hiermem.launcher --log-level WARNING ensure-bank --anchor smollm2 --bank "$1" --source "$2" >/dev/null; }
if [ -n "$BANK" ]; then
  ensure "$BANK" "${SOURCE/auto/synth}"
elif [ "$SOURCE" != synth ] && { [ -f "$DEMO/manifest.json" ] || hiermem build --help >/dev/null 2>&1; }; then
  [ -f "$DEMO/manifest.json" ] || echo "[run] building the demo bank at $DEMO (trains memories: a while, once)"
  if ensure "$DEMO" demo; then BANK="$DEMO"
  elif [ "$SOURCE" = demo ]; then echo "[run] the demo build failed"; exit 1
  else echo "[run] WARNING: the demo build failed; using a synthetic bank instead"; fi
fi
if [ -z "$BANK" ]; then
  [ -f "$SYNTH/manifest.json" ] || echo "[run] writing a small synthetic bank for SmolLM2 at $SYNTH"
  ensure "$SYNTH" synth
  BANK="$SYNTH"
fi
echo "[run] bank: $BANK"

# 2. the stack, in the background; its log goes to a file
LOG="$(mktemp -t hiermem-up.XXXXXX.log)"
echo "[run] starting the stack on port $PORT (log: $LOG)"
hiermem up --bank "$BANK" --anchor smollm2 --port "$PORT" >"$LOG" 2>&1 &
UP_PID=$!
stop_stack() {
  if kill -0 "$UP_PID" 2>/dev/null; then
    echo "[run] stopping the stack"
    kill -TERM "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
  fi
}
trap stop_stack EXIT INT TERM
for _ in $(seq 1 900); do
  grep -q "hiermem is up" "$LOG" && break
  if ! kill -0 "$UP_PID" 2>/dev/null; then echo "[run] hiermem up failed:"; tail -40 "$LOG"; exit 1; fi
  sleep 1
done
grep -q "hiermem is up" "$LOG" || { echo "[run] the stack did not come up in 15 min"; tail -40 "$LOG"; exit 1; }
grep -E "^(hiermem is up|try:)" "$LOG"

# 3. one real completion, printed with its memory object. Without a prompt argument and with the demo bank,
#    ask about a fact of the rarest popularity bucket that the memories were trained on, in the probes'
#    question wording, which no document of the corpus uses (training/corpus_docs.py: PROBE_TEMPLATES): the
#    first such fact (in the corpus's order) that the anchor alone gets wrong, found by asking the running
#    server with memory off -- chosen by the anchor's answer, never by the memory's. Then ask it again with
#    memory off, so the two answers show what the fetched blocks add.
PROBES="$HOME_DIR/work/demo/corpus/probes.jsonl"
COMPARE=0
if [ -z "$PROMPT" ]; then
  if [ "$BANK" = "$DEMO" ] && [ -f "$PROBES" ]; then
    mapfile -t ASK < <(python - "$PROBES" "$PORT" <<'PY'
import json, sys, urllib.request
rows = [json.loads(line) for line in open(sys.argv[1])]
rarest = max(r["bucket"] for r in rows)
asks = [r for r in rows if r["split"] == "train" and r["bucket"] == rarest and r["template"] == "probe:0"]
def off(prompt):
    body = json.dumps({"prompt": prompt, "max_tokens": 8, "temperature": 0, "memory": "off"}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[2]}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["text"]
pick = next((r for r in asks[:20] if not off(r["prompt"]).strip().lower().startswith(r["answer"].strip().lower())),
            asks[0])
print(json.dumps(pick["prompt"]))
print(pick["answer"].strip())
PY
)
    PROMPT=$(python -c 'import json, sys; print(json.loads(sys.argv[1]))' "${ASK[0]}")
    echo "[run] a rare fact the memories were trained on and the anchor alone gets wrong, asked in a wording no"
    echo "[run] document uses (the corpus says: ${ASK[1]})"
    COMPARE=1
  else
    PROMPT="The capital of France is"
  fi
fi
ask() {
  BODY=$(python -c 'import json, sys
print(json.dumps({"prompt": sys.argv[1], "max_tokens": 24, "temperature": 0, "memory": sys.argv[2]}))' "$PROMPT" "$1")
  echo "[run] POST /v1/completions $BODY"
  curl -sS --fail-with-body "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' -d "$BODY" \
    | python -c 'import json, sys
reply = json.load(sys.stdin)
print("prompt:  ", sys.argv[1])
print("answer:  ", reply["choices"][0]["text"].strip().splitlines()[0] if reply["choices"][0]["text"].strip() else "")
print("memory:  ", json.dumps(reply["memory"]))' "$PROMPT"
}
ask auto
if [ "$COMPARE" = 1 ]; then
  echo "[run] the same rare fact with memory off (the anchor alone):"
  ask off
fi

if [ "$KEEP" = 1 ]; then
  trap - EXIT INT TERM
  echo "[run] the stack keeps running (pid $UP_PID, log $LOG); stop it with: kill $UP_PID"
fi
