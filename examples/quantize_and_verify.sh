#!/usr/bin/env bash
# Quantize a checkpoint with AWQ (W4, group-wise), convert it to an lmkiln engine, verify it
# against the original with thresholds, and export it to ONNX.
#
#   examples/quantize_and_verify.sh                 # the bundled stories260K, outputs in ./lmkiln-out
#   MODEL=./Llama-3.1-8B GROUP_SIZE=128 CALIB_SAMPLES=128 CALIB_SEQLEN=512 \
#   EVAL_DATA= MAX_TOKENS=8192 MAX_NEW_TOKENS=32 MAX_PPL_INCREASE=10 MAX_KL=0.1 MIN_TOP1=0.8 \
#   OUT_DIR=./l8b examples/quantize_and_verify.sh   # a real model (values for a real model in the comments below)
#
# Exit codes (what a CI job checks):
#   0    every step ran and both verifications passed
#   1    the quantized model is degraded: a verify threshold failed (the report is still written)
#   2    bad input: a missing model, a group size the model cannot take, an output that already
#        exists (nothing is ever replaced unless FORCE=1)
#   3    an internal lmkiln error (re-run the failing command with `lmkiln --debug ...`)
#   130  interrupted
set -euo pipefail

# --- what to quantize and where the outputs go ------------------------------------------------
MODEL="${MODEL:-}"                  # a Hugging Face checkpoint directory; empty = the bundled stories260K
OUT_DIR="${OUT_DIR:-./lmkiln-out}"  # created if missing; every output below goes inside it
PYTHON="${PYTHON:-python3}"         # the Python that has lmkiln installed (only used to find the bundled model)

# --- quantization ------------------------------------------------------------------------------
GROUP_SIZE="${GROUP_SIZE:-32}"      # real model: 128. stories260K's hidden and attention width is 64, so the
                                    # AWQ-GEMM layout needs a group size dividing 64 (32 or 64); 128 is refused
CALIB_SAMPLES="${CALIB_SAMPLES:-16}"  # real model: 128 (lmkiln's default)
CALIB_SEQLEN="${CALIB_SEQLEN:-128}"   # real model: 512 (lmkiln's default)

# --- verification (docs/verify.md) ---------------------------------------------------------------
# Defaults suit the 260K-parameter bundled model on the in-domain text it was trained for. For a
# real model leave EVAL_DATA empty (the bundled WikiText-2 test excerpt), MAX_TOKENS=8192, and use
# lmkiln's int4 defaults: MAX_PPL_INCREASE=10 MAX_KL=0.1 MIN_TOP1=0.8.
EVAL_DATA="${EVAL_DATA-bundled-tinystories}"  # a .txt file; empty = lmkiln's default text
MAX_TOKENS="${MAX_TOKENS:-1024}"
MAX_PPL_INCREASE="${MAX_PPL_INCREASE:-15}"    # percent
MAX_KL="${MAX_KL:-0.25}"                      # mean KL(original || quantized)
MIN_TOP1="${MIN_TOP1:-0.7}"                   # share of positions whose argmax agrees
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-4}"         # greedy-generation comparison (reported, not a threshold); real model: 32
FORCE="${FORCE:-}"                            # FORCE=1 replaces existing outputs

if [[ -z "$MODEL" || "$EVAL_DATA" == bundled-tinystories ]]; then
    ASSETS="$("$PYTHON" -c 'from lmkiln.assets import ASSETS; print(ASSETS)')"
    [[ -n "$MODEL" ]] || MODEL="$ASSETS/stories260K"
    [[ "$EVAL_DATA" != bundled-tinystories ]] || EVAL_DATA="$ASSETS/eval/tinystories_sample.txt"
fi
force=()
[[ -z "$FORCE" ]] || force=(--force)
data=()
[[ -z "$EVAL_DATA" ]] || data=(--data "$EVAL_DATA")
mkdir -p "$OUT_DIR"
AWQ="$OUT_DIR/model-awq"          # AWQ-GEMM Hugging Face directory (vLLM, SGLang, transformers read it)
ENGINE="$OUT_DIR/model-w4.engine" # lmkiln int4 engine
ONNX="$OUT_DIR/model-w4.onnx"     # onnxruntime / onnxruntime-genai / Triton folder

echo "== 1/5 quantize: AWQ W4 g$GROUP_SIZE, $CALIB_SAMPLES x $CALIB_SEQLEN calibration tokens -> $AWQ"
lmkiln quantize "$MODEL" -o "$AWQ" --w4a16 --group-size "$GROUP_SIZE" \
    --calib-samples "$CALIB_SAMPLES" --calib-seqlen "$CALIB_SEQLEN" \
    --report "$OUT_DIR/quant-report.json" "${force[@]}"

echo "== 2/5 convert: AWQ-GEMM -> int4 engine $ENGINE"
lmkiln convert hf-to-engine "$AWQ" -o "$ENGINE" "${force[@]}"

echo "== 3/5 verify: the int4 engine against the original (the quality gate)"
# `|| status=$?` keeps the exit code (1 = degraded) instead of letting `set -e` stop silently.
status=0
lmkiln verify "$MODEL" "$ENGINE" "${data[@]}" --max-tokens "$MAX_TOKENS" --max-new-tokens "$MAX_NEW_TOKENS" \
    --max-ppl-increase "$MAX_PPL_INCREASE" --max-kl "$MAX_KL" --min-top1 "$MIN_TOP1" \
    --report "$OUT_DIR/verify.json" --plot "$OUT_DIR/verify.png" "${force[@]}" || status=$?
if (( status != 0 )); then
    echo "verify failed with exit $status (1 = degraded, see $OUT_DIR/verify.json); not exporting" >&2
    exit "$status"
fi

echo "== 4/5 export: int4 engine -> ONNX $ONNX (MatMulNBits; genai_config.json for onnxruntime-genai)"
# --accuracy-level 0: MatMulNBits computes in float (exact); the CPU default 4 quantizes activations
# to int8 for speed (docs/export-onnx.md), which step 5's tight thresholds would rightly flag.
lmkiln export onnx "$ENGINE" -o "$ONNX" --accuracy-level 0 "${force[@]}"

echo "== 5/5 verify: onnxruntime on the export against the torch engine (the export must be the engine)"
# The export moves the int4 codes as they are, so ORT and the engine agree to float rounding:
# thresholds far tighter than the quantization gate.
lmkiln verify "$ENGINE" "$ONNX" "${data[@]}" --max-tokens "$MAX_TOKENS" --max-new-tokens "$MAX_NEW_TOKENS" \
    --max-ppl-increase 0.1 --max-kl 1e-4 --min-top1 0.99 --report "$OUT_DIR/verify-onnx.json" "${force[@]}"

echo "done: $AWQ  $ENGINE  $ONNX  (reports: $OUT_DIR/quant-report.json, verify.json, verify.png, verify-onnx.json)"
