#!/usr/bin/env python3
"""The time and memory model of docs/scale.md: AWQ work per layer counted in FLOPs,
checked against the CPU seconds measured by bench/quantize_scale.py, then projected to
Llama-3-70B on 1, 8 and 4 x 8 GPUs with `--ray`.

    python3 bench/scale_model.py [--gpu-tflops 300] [--scale-json bench/out/scale.json] [--ray-json bench/out/ray1.json]

Work per calibration token of one decoder layer (what quant/awq.py does):
- search: every grid point (n_grid = 20) plus plain RTN, i.e. 21 forwards of each
  group's inspected module: the attention block (q/k/v/o), the MLP (gate/up/down) and
  down_proj alone; v -> o is skipped under GQA (shapes differ);
- pass 1 (fp output + statistics), the driver's fp pass with --ray, and pass 3 (each
  group once more, the whole quantized layer once): about 5 layer forwards;
- a linear forward costs 2 FLOPs per weight per token; attention scores add
  4 x seqlen x q-width per token per attention forward.
The clip search (512 tokens, 10 shrink steps, every clipped weight) does not grow with
calibration tokens and is counted separately. Pure Python, no torch: it only reads the
JSON the benchmarks wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = {  # hidden, intermediate, heads, kv heads, head_dim, layers
    "1b-synthetic": (2048, 5632, 32, 4, 64, 4),
    "8b-synthetic": (4096, 14336, 32, 8, 128, 32),
    "llama-3-70b": (8192, 28672, 64, 8, 128, 80),
}
N_TRIALS = 21  # 20 grid points + RTN
FORWARDS_OUTSIDE_SEARCH = 5


def layer_flops(shape, tokens: int, seqlen: int) -> dict:
    h, i, nh, nkv, hd, _ = shape
    q, kv = nh * hd, nkv * hd
    attn_w = h * q + 2 * h * kv + q * h
    mlp_w = 3 * h * i
    down_w = i * h
    attn_scores = 4 * seqlen * q
    per_token_search = N_TRIALS * (2 * attn_w + attn_scores + 2 * mlp_w + 2 * down_w)
    per_token_rest = FORWARDS_OUTSIDE_SEARCH * (2 * (attn_w + mlp_w) + attn_scores)
    clip_w = q * h + mlp_w  # o, gate, up, down (q/k are not clipped; v under GQA is small)
    clip = 10 * 2 * 2 * 512 * clip_w  # 10 steps x (quantized + reference contributions)
    return {"search": per_token_search * tokens, "rest": per_token_rest * tokens, "clip": clip,
            "fp_pass": 2 * (attn_w + mlp_w) * tokens + attn_scores * tokens,
            "weight_bytes_bf16": 2 * (attn_w + mlp_w), "packed_bytes_w4g128": (attn_w + mlp_w) * (0.5 + 2 / 128 + 0.5 / 128)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu-tflops", type=float, default=300.0, help="achieved bf16 TFLOP/s per GPU in the search (assumed)")
    ap.add_argument("--scale-json", default="bench/out/scale.json")
    ap.add_argument("--ray-json", default="bench/out/ray1.json")
    ap.add_argument("--tokens", type=int, default=128 * 512)
    ap.add_argument("--disk-gbps", type=float, default=2.0, help="GB/s one node reads the checkpoint at")
    ap.add_argument("--net-gbps", type=float, default=12.5, help="GB/s between nodes (100 Gb/s)")
    a = ap.parse_args()

    # 1. the FLOP model against the CPU seconds measured by quantize_scale.py
    measured = {}
    if Path(a.scale_json).exists():
        rows = json.loads(Path(a.scale_json).read_text())["rows"]
        measured = {"1b-synthetic": rows.get("awq-1b-L1-16x512", {}).get("s_per_layer"),
                    "8b-synthetic": rows.get("awq-8b-L1-16x512", {}).get("s_per_layer")}
    print("FLOP model vs measured CPU seconds per layer (16 x 512 tokens, fp32, 2 cores):")
    rate = None
    for name in ("1b-synthetic", "8b-synthetic"):
        f = layer_flops(SHAPES[name], 16 * 512, 512)
        total = f["search"] + f["rest"] + f["clip"]
        sec = measured.get(name)
        if sec and rate is None:
            rate = total / sec  # calibrate on the 1B-shaped layer
        pred = total / rate if rate else None
        print(f"  {name}: {total / 1e12:.1f} TFLOP, measured {sec} s, "
              + (f"predicted {pred:.0f} s at {rate / 1e9:.0f} GFLOP/s" if pred else "no measurement"))

    # 2. Ray overhead measured on this machine (CPU), if the ray row exists
    overhead = None
    if Path(a.ray_json).exists():
        r = json.loads(Path(a.ray_json).read_text())["rows"]
        row = next(iter(v for k, v in r.items() if k.startswith("ray1-")), None)
        if row:
            overhead = row["ray"]["wall_s"] / row["single"]["wall_s"] - 1
            print(f"Ray overhead, 1 worker vs single process (CPU): {overhead * 100:+.1f} %")

    # 3. Llama-3-70B, AWQ W4 g128, 128 x 512 tokens, bf16 on GPUs
    shape = SHAPES["llama-3-70b"]
    n_layers = shape[5]
    f = layer_flops(shape, a.tokens, 512)
    job = (f["search"] + f["rest"] - f["fp_pass"] + f["clip"]) / (a.gpu_tflops * 1e12)
    hidden_bytes = a.tokens * shape[0] * 2
    read = f["weight_bytes_bf16"] / (a.disk_gbps * 1e9)
    fp = f["fp_pass"] / (a.gpu_tflops * 1e12)
    print(f"\nLlama-3-70B: {n_layers} layers, {a.tokens} calibration tokens, assumed {a.gpu_tflops:.0f} TFLOP/s per GPU")
    print(f"  per layer: job {job:.1f} s, driver fp pass {fp:.2f} s + read {read:.2f} s, hidden states "
          f"{hidden_bytes / 2**30:.2f} GiB (object store), packed result {f['packed_bytes_w4g128'] / 2**30:.2f} GiB")
    print("  GPUs | wall (model)            | bound")
    for gpus, nodes in ((1, 1), (8, 1), (32, 4)):
        step = fp + read  # the driver's sequential work per layer
        transfer = hidden_bytes / (a.net_gbps * 1e9) if nodes > 1 else 0.0
        search = -(-n_layers // gpus) * (job + transfer) + step  # the jobs, back to back on each GPU
        chain = (n_layers - 1) * step + transfer + job  # the last layer's input exists, then its job
        wall = max(chain, search)
        bound = "the driver's fp chain" if chain > search else "the search"
        print(f"  {gpus:4d} | {wall / 60:6.1f} min ({wall / 3600:.2f} h) | {bound}")


if __name__ == "__main__":
    main()
