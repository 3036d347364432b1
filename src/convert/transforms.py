"""Named weight transforms, pure and shape-explicit.

All take HF-orientation linear weights, (out, in), and return new tensors; the engine
stores fp weights in that orientation too (format v4), quantized codes (in, out).
Tensor-parallel helpers compute one rank's slice so a rank never needs the others
(which splits are allowed is the engine format's rule: `lmkiln.formats.engine.check_tp`).
"""

from __future__ import annotations

from typing import Callable

import torch


def permute_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """HF "rotate_half" row order -> interleaved rotary pairs, per head.

    HF rotates element j of a head with element j + head_dim/2; TurboMind (and Meta's
    original checkpoints) rotate adjacent pairs (2j, 2j+1). New row 2j+c takes old row
    c*head_dim/2 + j. Works for weights (out, in), biases (out,) and per-head norms
    (head_dim,) with n_heads = 1.
    """
    rest = w.shape[1:]
    assert w.shape[0] == n_heads * head_dim, f"{tuple(w.shape)} is not {n_heads} heads x {head_dim}"
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def unpermute_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of `permute_rotary`: interleaved pairs -> HF half-split order."""
    rest = w.shape[1:]
    assert w.shape[0] == n_heads * head_dim, f"{tuple(w.shape)} is not {n_heads} heads x {head_dim}"
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad dim 0 to `rows`. Zero rows of gate/up give silu(0)*0 = 0, and zero
    columns of down multiply those zeros, so padding never changes the output."""
    if w.shape[0] == rows:
        return w
    assert w.shape[0] < rows
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])], 0)


def pad_cols(w: torch.Tensor, cols: int) -> torch.Tensor:
    if w.shape[1] == cols:
        return w
    assert w.shape[1] < cols
    return torch.cat([w, w.new_zeros(w.shape[0], cols - w.shape[1])], 1)


def rank_rows(w: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s contiguous 1/tp slice along dim 0 (the output dim of an (out, in) weight)."""
    assert w.shape[0] % tp == 0, f"dim 0 of {tuple(w.shape)} does not split {tp} ways"
    n = w.shape[0] // tp
    return w[rank * n:(rank + 1) * n]


def rank_cols(w: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    assert w.shape[1] % tp == 0, f"dim 1 of {tuple(w.shape)} does not split {tp} ways"
    n = w.shape[1] // tp
    return w[:, rank * n:(rank + 1) * n]


def kv_rank_heads(kv_heads: int, tp: int, rank: int) -> tuple[int, int]:
    """[first, last) kv heads held by `rank`.

    tp <= kv_heads: kv heads split evenly. tp > kv_heads: each kv head is replicated on
    tp/kv_heads consecutive ranks, matching the q heads those ranks hold.
    """
    if tp <= kv_heads:
        n = kv_heads // tp
        return rank * n, (rank + 1) * n
    h = rank // (tp // kv_heads)
    return h, h + 1


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, 0)


def fuse_qkv_rank(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, kv_heads: int, tp: int, rank: int,
                  join: Callable[[list], torch.Tensor] = cat_rows) -> torch.Tensor:
    """[q_r | k_r | v_r] along dim 0 for one rank (weights (out, in) or biases (out,)); `join`
    makes the parts one tensor (a writer's `Rows` keeps them apart: no copy)."""
    a, b = kv_rank_heads(kv_heads, tp, rank)
    return join([rank_rows(q, tp, rank), k[a * head_dim:b * head_dim], v[a * head_dim:b * head_dim]])


def fuse_w13_rank(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int,
                  join: Callable[[list], torch.Tensor] = cat_rows) -> torch.Tensor:
    """[w1_r | w3_r] along dim 0 for one rank; gate/up already padded to a multiple of tp."""
    return join([rank_rows(gate, tp, rank), rank_rows(up, tp, rank)])
