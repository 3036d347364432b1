#!/usr/bin/env bash
# Quantize an 8B-70B checkpoint on one GPU: plan first (--dry-run --probe), then the run on
# --device cuda, and --resume when a run was interrupted (preempted node, OOM kill, Ctrl-C).
# Quantization works one decoder layer at a time, so the GPU holds one layer plus the calibration
# activations, never the model (Llama-3-70B: about 12 GiB; docs/quantize.md, docs/scale.md).
#
#   MODEL=/models/Llama-3.1-70B GROUP_SIZE=128 CALIB_SAMPLES=128 CALIB_SEQLEN=512 \
#   OUT_DIR=/scratch/l70b examples/big_model_on_one_gpu.sh
#
# Without a usable GPU it falls back to the CPU form (--device cpu --dtype fp32); as-is it runs
# on the bundled stories260K that way in seconds. Run it again after an interruption: it finds
# the run's resume state and continues after the last finished layer (bit-identical output).
#
# Exit codes: 0 done (or the output already exists),
# 2 bad input, 3 internal error, 130/137/143 interrupted or killed: run the script again.
set -euo pipefail

MODEL="${MODEL:-}"                    # HF checkpoint (bf16/fp16); empty = the bundled stories260K
OUT_DIR="${OUT_DIR:-./lmkiln-big}"    # the output and its resume state go here: put it on a big, local disk
TO="${TO:-hf}"                        # hf (AWQ-GEMM: vLLM, SGLang), compressed-tensors, or engine
GROUP_SIZE="${GROUP_SIZE:-32}"        # real model: 128 (stories260K's widths of 64 need 32 or 64)
CALIB_SAMPLES="${CALIB_SAMPLES:-16}"  # real model: 128
CALIB_SEQLEN="${CALIB_SEQLEN:-128}"   # real model: 512
DEVICE="${DEVICE:-}"                  # empty = cuda when torch sees a GPU, else cpu; or cuda:1 to pick one
DTYPE="${DTYPE:-}"                    # calibration precision; empty = bf16 on cuda, fp32 on cpu (output keeps the source dtype)
PROBE="${PROBE:-1}"                   # 1 = the plan also times layer 0 (loads one layer; nothing is written)
RAY="${RAY:-}"                        # several GPUs on this machine or a cluster: RAY=local (or auto, head:6379)
                                      # runs one layer job per GPU; pip install 'lmkiln[ray]' (docs/scale.md)
PYTHON="${PYTHON:-python3}"           # the Python lmkiln is installed in
FORCE="${FORCE:-}"                    # FORCE=1 starts over and replaces an existing output

if [[ -z "$MODEL" ]]; then
    MODEL="$("$PYTHON" -c 'from lmkiln.assets import bundled_model_path; print(bundled_model_path())')"
fi
if [[ -z "$DEVICE" ]]; then
    # nvidia-smi first (no torch import when there is clearly no GPU), then ask torch itself:
    # a CPU-only torch build on a GPU machine cannot use the GPU.
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
        && "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        DEVICE=cuda
    else
        DEVICE=cpu
        echo "no usable GPU: running on the CPU (fine for small models; an 8B model takes hours, a 70B days)" >&2
    fi
fi
[[ -n "$DTYPE" ]] || { [[ "$DEVICE" == cuda* ]] && DTYPE=bf16 || DTYPE=fp32; }

mkdir -p "$OUT_DIR"
OUT="$OUT_DIR/model-w4"
PARTIAL="$OUT_DIR/.model-w4.lmkiln-partial"   # lmkiln's resume state for $OUT (docs/quantize.md, Resume)
args=("$MODEL" -o "$OUT" --w4a16 --group-size "$GROUP_SIZE" --to "$TO"
      --calib-samples "$CALIB_SAMPLES" --calib-seqlen "$CALIB_SEQLEN" --device "$DEVICE" --dtype "$DTYPE")

if [[ -e "$OUT" && -z "$FORCE" ]]; then
    echo "$OUT already exists: nothing to do (FORCE=1 to quantize again)"
    exit 0
fi

resume=()
if [[ -d "$PARTIAL" && -z "$FORCE" ]]; then
    # An earlier run was interrupted: lmkiln checks the model, calibration, options and device
    # kind are the same, replays the finished layers and continues (it refuses, naming what
    # changed, otherwise; remove $PARTIAL to start over).
    echo "== resuming the interrupted run in $PARTIAL (the plan was printed by the first run)"
    resume=(--resume)
else
    # 1. The plan: layers, memory per term (device and host), disk for the output and the resume
    #    state, free space. --dry-run alone reads only config.json and the safetensors headers
    #    (seconds, even for 70B); --probe also quantizes layer 0 to estimate the total time.
    probe=()
    [[ "$PROBE" != 1 ]] || probe=(--probe)
    echo "== plan on $DEVICE ($DTYPE)"
    lmkiln quantize "${args[@]}" --dry-run "${probe[@]}"
fi

# 2. The run. Ctrl-C or a kill leaves every finished layer saved under $PARTIAL.
ray=()
[[ -z "$RAY" ]] || ray=(--ray "$RAY")
force=()
[[ -z "$FORCE" ]] || force=(--force)
echo "== quantize AWQ W4 g$GROUP_SIZE on $DEVICE ($DTYPE) -> $OUT"
status=0
lmkiln quantize "${args[@]}" "${resume[@]}" "${ray[@]}" "${force[@]}" --report "$OUT_DIR/quant-report.json" || status=$?
case "$status" in
    0) ;;
    130|137|143)
        echo "interrupted (exit $status): run this script again with the same settings to continue from the last finished layer" >&2
        exit "$status" ;;
    *) exit "$status" ;;
esac

# 3. Next: verify it on the same GPU (docs/verify.md, docs/runtime.md). An engine output
#    (TO=engine) runs there with its int4 codes packed; verify loads one model at a time, and
#    for a 70B the fp reference does not fit one GPU: run it on the host, e.g.
#    lmkiln verify "$MODEL" "$OUT" --device cuda --reference-device cpu --report "$OUT_DIR/verify.json"
#    lmkiln generate "$OUT" -p "The capital of France is" -n 64 --device cuda
echo "done: $OUT (report: $OUT_DIR/quant-report.json)"
