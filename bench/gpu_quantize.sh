#!/usr/bin/env bash
# One short GPU check for `lmkiln quantize` (run through the device tool, a few minutes):
#   1. the CUDA tests (CPU/CUDA agreement in fp32 on the bundled model, bf16 default run)
#   2. an 8B-shaped synthetic Llama (hidden 4096, intermediate 14336, 32/8 heads, bf16 on
#      disk, 2 layers) quantized with AWQ W4 g128 on 128 x 512 calibration tokens on the
#      GPU: seconds per layer (layer 1: layer 0 pays CUDA start-up) and peak GPU memory.
# lmkiln runs on the machine's own CUDA torch: a link named lmkiln -> src on PYTHONPATH,
# no pip install. Results land in $OUT (or bench/out/gpu when run by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT" /tmp/lmkiln-path
ln -sfn "$PWD/src" /tmp/lmkiln-path/lmkiln
export PYTHONPATH=/tmp/lmkiln-path${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
python - <<'PY' | tee "$OUT/gpu.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
python -m pytest -q -p no:cacheprovider tests/test_quantize_scale.py -k "cuda or resolve" 2>&1 | tail -5 | tee -a "$OUT/gpu.txt"
python - <<'PY'
import sys; sys.path.insert(0, "bench")
from pathlib import Path
from common import make_synthetic
make_synthetic(Path("/tmp/synth-8b-L2"), 4096, 14336, 2, 32, 8, "bfloat16")
PY
python -m lmkiln quantize /tmp/synth-8b-L2 --dry-run --w4a16 -o /tmp/q8b --calib-samples 128 --calib-seqlen 512 \
    --device cuda 2>&1 | tee -a "$OUT/gpu.txt" || true
TIME=$(command -v /usr/bin/time >/dev/null && echo "/usr/bin/time -v" || true)  # peak host RSS where GNU time exists
$TIME python -m lmkiln quantize /tmp/synth-8b-L2 -o /tmp/q8b --w4a16 --group-size 128 \
    --calib-samples 128 --calib-seqlen 512 --device cuda --report "$OUT/q8b-report.json" 2>&1 | tail -40 | tee -a "$OUT/gpu.txt"
python - "$OUT/q8b-report.json" <<'PY' | tee -a "$OUT/gpu.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print("seconds per layer", [l["seconds"] for l in r["layers"]], "peak device MB", r["totals"]["peak_device_mb"],
      "calibration tokens", r["totals"]["calibration_tokens"], "device", r["compute"])
PY
