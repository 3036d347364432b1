"""Block math the engine runner and calibration share, so both compute the families' blocks
the same way: the FFN activations the engine format names (`hidden_act`) and mixture-of-
experts routing (Mixtral / Qwen3-MoE semantics)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # Gemma's GeGLU
}


def mix_experts(flat: torch.Tensor, logits: torch.Tensor, top_k: int, norm_topk: bool,
                expert: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ over each token's top-k experts of weight · expert output, for tokens `flat` (n, h).

    Softmax over the router's `logits` (n, E) in float32, top-k, the weights renormalised to
    sum 1 when `norm_topk`; `expert(e, rows, weights)` returns expert e's weighted output for
    the rows routed to it. Experts are added in increasing index, as the reference does."""
    w, idx = torch.softmax(logits.float(), -1).topk(top_k, -1)
    if norm_topk:
        w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for e in idx.unique().tolist():
        tok, slot = (idx == e).nonzero(as_tuple=True)
        out.index_add_(0, tok, expert(e, flat[tok], w[tok, slot]).to(out.dtype))
    return out
