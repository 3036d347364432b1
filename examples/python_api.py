#!/usr/bin/env python3
"""lmkiln from Python: quantize (AWQ W4) to an int4 engine, load the engine runner,
generate, and verify against the original with the report as a dict.

    python examples/python_api.py                      # the bundled stories260K, outputs in ./lmkiln-out-api
    MODEL=./Llama-3.1-8B GROUP_SIZE=128 OUT_DIR=./l8b python examples/python_api.py

The same steps as `examples/quantize_and_verify.sh`, through the API the commands call.
Exit code: 0 when verification passed, 1 when a threshold failed, 2 on bad input
(an lmkiln error: missing model, existing output without FORCE=1, ...).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# --- settings (environment variables override them) -----------------------------------------------
MODEL = os.environ.get("MODEL", "")              # HF checkpoint directory; empty = the bundled stories260K
OUT_DIR = Path(os.environ.get("OUT_DIR", "lmkiln-out-api"))
GROUP_SIZE = int(os.environ.get("GROUP_SIZE", "32"))        # real model: 128 (stories260K's widths of 64 need 32 or 64)
CALIB_SAMPLES = int(os.environ.get("CALIB_SAMPLES", "16"))  # real model: 128
CALIB_SEQLEN = int(os.environ.get("CALIB_SEQLEN", "128"))   # real model: 512
FORCE = bool(os.environ.get("FORCE"))                       # replace existing outputs
PROMPT = os.environ.get("PROMPT", "Once upon a time")
# Thresholds for the 260K-parameter bundled model on in-domain text (docs/verify.md). For a real
# model set EVAL_DATA to "" (the bundled WikiText-2 excerpt) and use the int4 defaults 10 / 0.1 / 0.8.
EVAL_DATA = os.environ.get("EVAL_DATA", "bundled-tinystories")
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", "1024"))
MAX_PPL_INCREASE = float(os.environ.get("MAX_PPL_INCREASE", "15"))
MAX_KL = float(os.environ.get("MAX_KL", "0.25"))
MIN_TOP1 = float(os.environ.get("MIN_TOP1", "0.7"))


def main() -> int:
    import torch

    from lmkiln.assets import ASSETS, bundled_model_path
    from lmkiln.errors import LmkilnError
    from lmkiln.formats.tokenizer import load_tokenizer
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import CalibOptions, quantize_model
    from lmkiln.runtime.engine_model import EngineModel
    from lmkiln.runtime.generate import greedy_generate
    from lmkiln.runtime.session import generate_text
    from lmkiln.verify.verify import VerifyOptions, run_verify

    model = Path(MODEL) if MODEL else bundled_model_path()
    data = ASSETS / "eval" / "tinystories_sample.txt" if EVAL_DATA == "bundled-tinystories" else (Path(EVAL_DATA) if EVAL_DATA else None)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    try:
        # 1. Quantize: AWQ W4 straight to an int4 engine (to="hf" writes the AWQ-GEMM directory
        #    instead, which `convert_hf_to_engine` turns into the same engine).
        result = quantize_model(model, OUT_DIR / "model-w4.engine", QuantOptions(bits=4, group_size=GROUP_SIZE),
                                CalibOptions(n_samples=CALIB_SAMPLES, seqlen=CALIB_SEQLEN), to="engine", force=FORCE,
                                on_info=print, on_layer=lambda i, n, rep: print(f"layer {i + 1}/{n}: output MSE {rep['mse_output']:.3g}"))
        engine_dir = result.output
        totals = result.report["totals"]
        print(f"quantized {len(result.report['layers'])} layers in {totals['seconds']:.1f} s -> {engine_dir}")

        # 2. Load the engine runner (torch, CPU; device="cuda" on a GPU) and generate greedily.
        #    check=True hashes the weight files against the manifest first.
        engine = EngineModel.from_path(engine_dir, check=True)
        tok = load_tokenizer(engine_dir)
        prompt_ids = tok(PROMPT).input_ids
        (new_ids,) = greedy_generate(engine, [prompt_ids], 24, engine.eos_token_ids)
        print(f"engine runner: {tok.decode(prompt_ids + new_ids, skip_special_tokens=True)!r}")
        logits = engine.forward(torch.tensor([prompt_ids]))  # (batch, tokens, vocab) float32, no KV cache kept
        print(f"logits for the prompt: {tuple(logits.shape)}")
        # The one-call helper behind `lmkiln generate` (an engine, or an HF directory converted on the fly):
        (continuation,) = generate_text(engine_dir, [PROMPT], 24)
        print(f"generate_text continuation: {continuation!r}")

        # 3. Verify against the original: perplexity, KL, top-1, greedy match; the report is a dict.
        res = run_verify(model, engine_dir, VerifyOptions(data=data, max_tokens=MAX_TOKENS, max_new_tokens=4,
                                                          max_ppl_increase=MAX_PPL_INCREASE, max_kl=MAX_KL, min_top1=MIN_TOP1))
    except LmkilnError as e:  # what the CLI prints as one line with exit code 2
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    report: dict = res.report
    (OUT_DIR / "verify.json").write_text(json.dumps(report, indent=1))
    print(f"perplexity {report['reference']['ppl']:.3f} -> {report['candidate']['ppl']:.3f} "
          f"(+{report['ppl_increase_pct']:.2f} %), mean KL {report['kl']['mean']:.4f}, top-1 {report['top1_agreement']:.3f}")
    for name, check in report["checks"].items():
        print(f"  {name}: {check['value']:.4g} vs {report['thresholds'][name]:.4g} -> {'pass' if check['passed'] else 'FAIL'}")
    print("PASS" if res.passed else "FAIL: " + "; ".join(res.failures))
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(main())
