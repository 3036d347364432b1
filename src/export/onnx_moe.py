"""A mixture-of-experts FFN as onnxruntime's `com.microsoft.MoE` node.

onnxruntime's CPU MoE kernel (1.2x+) takes the router's logits and computes softmax,
top-k and (`normalize_routing_weights`) the renormalisation itself, which is the engine's
routing (renormalised top-k of a softmax = softmax over the top-k logits). Its CPU kernel
has no separate up projection (FC3), so a gated expert goes in as `swiglu` with FC1 rows
interleaved [gate_0, up_0, gate_1, up_1, ...] (`swiglu_fusion=1`) and alpha 1 / beta 0,
which is silu(gate) * up. Weights are (experts, out, in). Experts are exported in the
graph's float type: int4/int8 engines' experts are dequantized (the QMoE kernel takes
symmetric codes only), which `DecoderBuilder.fallbacks` reports.
"""

from __future__ import annotations

import numpy as np
import torch

from lmkiln.runtime.engine_model import load_moe

MS = "com.microsoft"


def moe_ffn(b, x: str, i: int) -> str:
    """The MoE output for input `x` (batch, seq, hidden) of layer i; `b` is the DecoderBuilder."""
    g, m, h = b.g, b.m, b.h
    if m["hidden_act"] != "silu":
        raise ValueError(f"MoE export needs silu experts, not {m['hidden_act']}")
    moe = load_moe(b.e, i, torch.float32)  # ranks merged, quantized experts dequantized once
    ip = m["inter_size_padded"]
    fc1, fc2 = [], []
    for ex in moe.experts:
        w13 = _dense(ex.w13)  # (h, 2 ip): [gate | up]
        gate, up = w13[:, :ip].T, w13[:, ip:].T  # (ip, h) each
        fc1.append(np.stack([gate, up], 1).reshape(2 * ip, h))
        fc2.append(_dense(ex.w2).T)  # (h, ip)
    dt = b.dtype
    if b.e.quant is not None:
        b.fallbacks.append(f"layers.{i}.moe (experts dequantized: onnxruntime's QMoE takes symmetric codes only)")
    w1 = g.store.add(f"layers.{i}.moe.fc1", np.ascontiguousarray(np.stack(fc1).astype(dt)))
    w2 = g.store.add(f"layers.{i}.moe.fc2", np.ascontiguousarray(np.stack(fc2).astype(dt)))
    router = g.store.add(f"layers.{i}.moe.router", np.ascontiguousarray(moe.router.weight.numpy().astype(dt)))
    x2 = g.op1("Reshape", [x, g.const([-1, h])])
    logits = g.op1("MatMul", [x2, router])
    y = g.op1("MoE", [x2, logits, w1, "", w2], domain=MS, k=m["experts_per_token"], activation_type="swiglu",
              swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=int(m["norm_topk"]))
    return g.op1("Reshape", [y, g.op1("Shape", [x])])


def _dense(lin) -> np.ndarray:
    """The (in, out) fp32 weight of a runner Linear / QuantLinear (dequantized at load)."""
    return lin.weight.detach().float().numpy()
