#!/usr/bin/env bash
# Create the bench-only virtualenv for llm-compressor (the AWQ peer of lmkiln's AWQ):
#
#     bash bench/peers/setup_llmcompressor.sh            # make or update it
#     bash bench/peers/setup_llmcompressor.sh --fresh    # delete it first
#
# It lives at bench/out/venv-llmcompressor (bench/out is gitignored) and is never
# lmkiln's own .venv: llm-compressor pins transformers<=5.17.0 and brings accelerate,
# datasets, auto-round, compressed-tensors, ... none of which lmkiln depends on.
#
# Versions: bench/peers/requirements-llmcompressor.txt, a full pin set that was installed
# and run together. llmcompressor 0.14.0.1 accepts torch>=2.10.0,<=2.14.0, so the plain
# `pip install -r` works: no --no-deps step is needed. torch is pinned to 2.13.0, which
# pip resolves to the CPU wheel this machine carries (2.13.0+cpu); leaving torch
# unpinned would download a multi-GB CUDA build.
#
# Override the interpreter with PYTHON=... (default python3; tested with CPython 3.11).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/bench/out/venv-llmcompressor"
req="$here/requirements-llmcompressor.txt"
python="${PYTHON:-python3}"

if [[ "${1:-}" == "--fresh" ]]; then
    rm -rf "$venv"
fi
mkdir -p "$root/bench/out"
if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade-strategy only-if-needed -r "$req"
# Fail here, not in the bench, if the pins are not what got installed.
"$venv/bin/python" -m pip check
"$venv/bin/python" - <<'EOF'
from importlib import metadata
import torch
import llmcompressor  # noqa: F401  (import check)
print("venv ok: llmcompressor", metadata.version("llmcompressor"),
      "| compressed-tensors", metadata.version("compressed-tensors"),
      "| transformers", metadata.version("transformers"),
      "| torch", torch.__version__, "| cuda", torch.cuda.is_available())
EOF
echo "python: $venv/bin/python"
