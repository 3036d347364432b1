#!/usr/bin/env bash
# llama.cpp for bench/gguf_llamacpp.py: llama-cpp-python built from source (CPU only) into
# bench/out/venv-llamacpp, and llama.cpp's own llama-perplexity and llama-quantize built in
# the same CMake build tree (the sdist vendors llama.cpp's whole source). Never lmkiln's .venv.
#
#   bash bench/peers/setup_llamacpp.sh           # create / reuse (about 15-25 min of compiling on 2 cores)
#   bash bench/peers/setup_llamacpp.sh --fresh   # from scratch
#
# Results: bench/out/venv-llamacpp/bin/python (import llama_cpp) and
# bench/out/llamacpp-build/bin/{llama-perplexity,llama-quantize}.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=0.3.36  # llama-cpp-python; vendors llama.cpp (see bench/out/llamacpp-src/vendor/llama.cpp)
VENV=bench/out/venv-llamacpp
SRC=bench/out/llamacpp-src
BUILD="$PWD/bench/out/llamacpp-build"
JOBS=${JOBS:-$(nproc)}
# CPU only: no GPU backends, no BLAS; -march=native for this machine's AVX2/AVX-512; no multimodal library.
CMAKE_FLAGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF"

if [[ "${1:-}" == "--fresh" ]]; then
    rm -rf "$VENV" "$SRC" "$BUILD"
fi
mkdir -p bench/out

if [[ ! -d "$SRC" ]]; then
    # The source distribution from the package registry: we build the tools from the same tree.
    python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d bench/out/dl
    rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
    tar xzf "bench/out/dl/llama_cpp_python-$VERSION.tar.gz" -C "$SRC.tmp" --strip-components=1
    mv "$SRC.tmp" "$SRC"
fi

[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    # build-dir keeps the CMake tree, so the tools below reuse its compiled ggml/llama objects
    CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        "$VENV/bin/python" -m pip install --verbose "./$SRC" -C "build-dir=$BUILD" > bench/out/llamacpp-pip.log 2>&1 \
        || { echo "pip install of llama-cpp-python failed; the last lines of bench/out/llamacpp-pip.log:"; tail -40 bench/out/llamacpp-pip.log; exit 1; }
fi

# llama.cpp's own command-line tools, from the same source and build tree.
cmake -S "$SRC" -B "$BUILD" $CMAKE_FLAGS -DLLAMA_BUILD_TOOLS=ON > bench/out/llamacpp-tools.log 2>&1
cmake --build "$BUILD" --config Release -j "$JOBS" --target llama-perplexity llama-quantize >> bench/out/llamacpp-tools.log 2>&1 \
    || { echo "building llama-perplexity / llama-quantize failed; see bench/out/llamacpp-tools.log"; tail -40 bench/out/llamacpp-tools.log; exit 1; }

"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
ls -1 "$BUILD/bin/llama-perplexity" "$BUILD/bin/llama-quantize"
