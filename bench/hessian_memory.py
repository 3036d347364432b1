"""Peak memory of one Hessian update (quant.gptq.hessian_update) against the one-product
form it replaced, on the CPU: 2·XᵀX of a chunk of bf16 tokens added into an fp32 H, as the
calibrated methods do per linear input (docs/BENCHMARKS.md "GPU").

    python bench/hessian_memory.py [--tokens 8192] [--width 14336]

Each variant runs in its own process; printed: peak RSS above the inputs (MiB), seconds,
and whether the two H agree to fp32 rounding.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(variant: str, tokens: int, width: int) -> dict:
    import torch

    torch.manual_seed(0)
    x = torch.randn(tokens, width).bfloat16()
    h = torch.zeros(width, width)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if variant == "one-product":  # the form before 2026-11-27
        xf = x.float()
        h.add_(xf.t() @ xf, alpha=2)
    else:
        from lmkiln.quant.gptq import hessian_update
        hessian_update(h, x)
    return {"variant": variant, "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base),
            "seconds": round(time.perf_counter() - t, 2), "h_sum": float(h.double().sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--width", type=int, default=14336)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.child, a.tokens, a.width)))
        return
    rows = [json.loads(subprocess.run([sys.executable, __file__, "--child", v, "--tokens", str(a.tokens), "--width", str(a.width)],
                                      check=True, capture_output=True, text=True).stdout) for v in ("one-product", "blocked")]
    for r in rows:
        print(f"{r['variant']:12s} peak {r['peak_mib']:6d} MiB above the inputs, {r['seconds']:6.2f} s")
    print("same H to fp32 rounding:", abs(rows[0]["h_sum"] - rows[1]["h_sum"]) <= 1e-5 * abs(rows[0]["h_sum"]))


if __name__ == "__main__":
    main()
