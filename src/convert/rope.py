"""Rotary position embeddings for interleaved pairs, from the manifest's `rope` block.

The `rope` block is derived from the model config (src/convert/hf_config.py); this is
its math, shared by the torch runner, the ONNX export and AWQ calibration. The inverse
frequencies follow the published definitions (RoFormer; linear position interpolation;
Llama 3.1's piecewise "llama3" scaling) so every user agrees with transformers without
importing its model code.
"""

from __future__ import annotations

import math

import torch

from lmkiln.errors import EngineFormatError


def inv_freq(rope: dict) -> torch.Tensor:
    """(dim/2,) float32 inverse frequencies."""
    dim, base = rope["dim"], float(rope["base"])
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind, s = rope["type"], rope.get("scaling") or {}
    if kind == "default":
        return freq
    if kind == "linear":
        return freq / float(s["factor"])
    if kind == "llama3":
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > old_ctx / lo, freq / factor, freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
        return torch.where(medium, smoothed, scaled)
    raise EngineFormatError(f"rope type {kind!r} is not supported by this runner")


def cos_sin(freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, T, 1, dim/2), computed in float32."""
    angles = positions.to(torch.float32)[..., None] * freq.to(positions.device)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, dim) with rotary pairs (2j, 2j+1) adjacent."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)
