#!/usr/bin/env bash
# One short GPU check for the CUDA engine runner (issue #12), run through the device tool
# in a few minutes:
#   1. the CUDA tests: packed int4 (tinygemm and the Triton kernel) / int8 vs dequantized,
#      CUDA-graph greedy == step-by-step == the host loop, int4 linears' memory,
#      `lmkiln generate/verify --device cuda`;
#   2. bench/gpu_runtime.py: int4 kernels (tinygemm, Triton) vs a bf16 matmul per shape and
#      rows; the 1.1B synthetic: engine fp16 / int4 (each path) vs transformers fp16:
#      memory, decode tok/s at batch 1 and 8, prefill tok/s at 2048; exactness on the
#      bundled model;
#   3. with GPU_QUANTIZE=1: bench/gpu_quantize.sh (AWQ on the GPU), results in $OUT/q.
# lmkiln runs on the machine's own CUDA torch: a link named lmkiln -> src on PYTHONPATH,
# no pip install. Results land in $OUT (or bench/out/gpu when run by hand).
# Knobs: TEST_TIMEOUT, BENCH_TIMEOUT (seconds), BENCH_ARGS (e.g. "--skip hf_static,int8").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT" /tmp/lmkiln-path
ln -sfn "$PWD/src" /tmp/lmkiln-path/lmkiln
export PYTHONPATH=/tmp/lmkiln-path HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# Packages the machine lacks (blake3: engine checksums; gguf: verify's imports), as wheels carried in .whl/
if compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"; } | tee "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-150}" python -m pytest -q -p no:cacheprovider tests/test_runtime_cuda.py "tests/test_verify.py::test_cuda_engine_vs_hf" \
    2>&1 | tail -40 | tee -a "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-300}" python bench/gpu_runtime.py --out "$OUT/runtime.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/runtime.log" | grep -E "^== |error|Error"
python -m lmkiln generate /tmp/lmkiln-gpu-runtime/int4.engine -p "Once upon a time" -n 32 --device cuda --no-check 2>&1 | tail -3 | tee -a "$OUT/gpu.txt"
python - "$OUT/runtime.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for k in ("engine_fp16", "engine_int4", "engine_int4_other_bf16", "engine_int4_fp16", "engine_int8", "transformers_fp16_dynamic",
          "transformers_fp16_static"):
    v = r.get(k, {})
    print(k, {x: (round(y, 2) if isinstance(y, float) else y) for x, y in v.items() if x != "error"}, v.get("error", "")[-600:])
print("targets", json.dumps(r.get("targets")))
print("exact", json.dumps(r.get("exact"))[:3000])
for row in r.get("kernels", []) if isinstance(r.get("kernels"), list) else [r.get("kernels")]:
    print({x: (round(y, 1) if isinstance(y, float) else y) for x, y in row.items()})
PY
if [ "${GPU_QUANTIZE:-0}" = 1 ]; then
    OUT="$OUT/q" timeout "${QUANTIZE_TIMEOUT:-150}" bash bench/gpu_quantize.sh
fi
