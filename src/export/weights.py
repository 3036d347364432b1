"""Per-layer weights of an engine, ranks merged, in the layouts the ONNX graph needs.

An engine stores linears (in, out), possibly split over tensor-parallel ranks and,
for int4/int8 engines, as codes + fp16 scales + uint8 zeros per group of input rows
(docs/engine-format.md section 5). `load_linear` merges the ranks (reusing the torch
runner's merge, so both backends see the same weight) and returns a `LinearW`; the
`to_*` helpers turn one into the tensors of `MatMulNBits` or of a blocked
`DequantizeLinear`. Codes are moved, never requantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmkiln.formats.engine import Engine
from lmkiln.formats.packing import unpack_int4
from lmkiln.quant.primitives import GRID_STEPS, grid_qparams
from lmkiln.runtime.engine_model import merge_shards


# Output rows per step of quantize_symmetric's grid search (a 2048-wide head: 8 MB a step; 512-4096 ran alike).
HEAD_CHUNK = 1024


@dataclass
class LinearW:
    """One merged linear. fp: `weight` (in, out). Quantized: `codes` uint8 (in_q, out)
    (one code per byte), `scales` fp16 / `zeros` uint8 (in_q / g, out)."""

    in_features: int  # the activation width (in_q - in_features trailing rows are padding)
    out_features: int
    bits: int = 0  # 0 = fp
    weight: np.ndarray | None = None
    codes: np.ndarray | None = None
    scales: np.ndarray | None = None
    zeros: np.ndarray | None = None
    bias: np.ndarray | None = None

    @property
    def group(self) -> int:
        return self.codes.shape[0] // self.scales.shape[0]


def np_fp(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """A torch float tensor (any fp dtype, bf16 included) as a contiguous numpy array."""
    return np.ascontiguousarray(t.to(torch.float32 if dtype == np.float32 else torch.float16).numpy())


def load_linear(engine: Engine, layer: int, kind: str, dtype: np.dtype) -> LinearW:
    """`layers.{layer}.{kind}` (kind e.g. "attention.w_qkv") with its ranks merged."""
    m, tp = engine.model, engine.tp
    base = f"layers.{layer}.{kind}"

    def merged(suffix, convert=lambda t: t):
        return merge_shards(kind, [convert(engine.get(f"{base}.{r}.{suffix}")) for r in range(tp)], m, tp)

    bias = np_fp(merged("bias"), dtype) if kind == "attention.w_qkv" and m["attn_bias"] else None
    if not engine.is_quantized(base):
        w = np_fp(merged("weight"), dtype)
        return LinearW(w.shape[0], w.shape[1], weight=w, bias=bias)
    bits = engine.quant["bits"]
    codes = merged("qweight", unpack_int4 if bits == 4 else (lambda t: t)).numpy()
    in_features = {"attention.w_qkv": m["hidden_units"], "feed_forward.w13": m["hidden_units"]}.get(kind, codes.shape[0])
    return LinearW(in_features, codes.shape[1], bits, codes=np.ascontiguousarray(codes),
                   scales=merged("scales").to(torch.float16).numpy(), zeros=merged("zeros").numpy(), bias=bias)


def dequantized(lw: LinearW, dtype: np.dtype) -> np.ndarray:
    """The (in_features, out) fp weight of a quantized linear: (code - zero) * scale."""
    g = lw.group
    w = (lw.codes.astype(np.float32) - np.repeat(lw.zeros, g, 0).astype(np.float32)) * np.repeat(lw.scales, g, 0).astype(np.float32)
    return np.ascontiguousarray(w[: lw.in_features].astype(dtype))


def nbits_block(group: int, cap: int = 128) -> int:
    """MatMulNBits' block_size for a group: the largest power of two (16..cap) dividing
    it (a group then spans several blocks sharing its scale); 0 when there is none."""
    b = group & -group
    b = min(b, cap)
    return b if b >= 16 else 0


def pack_nibbles(a: np.ndarray) -> np.ndarray:
    """uint8 values < 16, last axis even -> bytes, low nibble = even element."""
    return (a[..., 0::2] | (a[..., 1::2] << 4)).astype(np.uint8)


def split_columns(lw: LinearW, sizes: list[int]) -> list[LinearW]:
    """`lw` cut along its output columns (e.g. the fused w13 into w1 and w3): the same
    codes, scales and zeros, so each part computes exactly its columns of the whole."""
    parts, start = [], 0
    for n in sizes:
        cols = slice(start, start + n)
        take = lambda a: None if a is None else np.ascontiguousarray(a[..., cols])  # noqa: E731
        parts.append(LinearW(lw.in_features, n, lw.bits, weight=take(lw.weight), codes=take(lw.codes),
                             scales=take(lw.scales), zeros=take(lw.zeros), bias=take(lw.bias)))
        start += n
    if start != lw.out_features:
        raise ValueError(f"split {sizes} does not cover {lw.out_features} columns")
    return parts


def default_zero_point(bits: int) -> int:
    """The zero point MatMulNBits assumes when its zero_points input is absent (8 for int4)."""
    return 1 << (bits - 1)


def to_matmulnbits(lw: LinearW, dtype: np.dtype, drop_default_zeros: bool = True) -> dict:
    """B (N, k_blocks, blob), scales (N * k_blocks,), zero points and the K/N/bits/block_size
    attributes of com.microsoft MatMulNBits for `lw` (None when no block size fits).

    K is the true activation width: k_blocks = ceil(K / block) rows of blocks are kept
    and the padded rows beyond K inside the last block are ignored by the kernel.
    `zero_points` is None when every zero equals MatMulNBits' default (symmetric
    quantization: 8 for int4, 128 for int8) and `drop_default_zeros`: the kernel then
    uses that default, the same dequantized weight without the input.
    """
    block = nbits_block(lw.group)
    if not block:
        return None
    rep = lw.group // block
    K, N = lw.in_features, lw.out_features
    kb = -(-K // block)
    codes = lw.codes[: kb * block].T  # (N, kb * block): K-major per output column
    scales = np.repeat(lw.scales, rep, 0)[:kb].T.astype(dtype)  # (N, kb)
    zeros = np.repeat(lw.zeros, rep, 0)[:kb].T  # (N, kb)
    if lw.bits == 4:
        B = pack_nibbles(codes).reshape(N, kb, block // 2)
        zp = pack_nibbles(np.pad(zeros, ((0, 0), (0, kb % 2))))  # (N, ceil(kb / 2))
    else:
        B = codes.reshape(N, kb, block)
        zp = zeros
    if drop_default_zeros and (zeros == default_zero_point(lw.bits)).all():
        zp = None
    return {"B": np.ascontiguousarray(B), "scales": np.ascontiguousarray(scales.reshape(-1)),
            "zero_points": None if zp is None else np.ascontiguousarray(zp.reshape(-1)), "K": K, "N": N,
            "bits": lw.bits, "block_size": block}


def quantize_symmetric(w: np.ndarray, bits: int = 4, block: int = 32, steps: int = GRID_STEPS) -> LinearW:
    """Symmetric quantization of an fp (in, out) weight in groups of `block` input rows (the
    in dimension zero-padded to a multiple of it), zero = 2^(bits-1) as the quantizer's
    symmetric scheme. Each group's scale is the one of `steps` range shrinks with the least
    squared rounding error (`grid_qparams`, data-free: no calibration at export); `steps=1`
    is plain absmax RTN, as the onnxruntime-genai builder quantizes its head. Used for the
    optional quantized output head (the engine keeps the head fp)."""
    K, N = w.shape
    kp = -(-K // block) * block
    wp = np.zeros((kp, N), np.float32)
    wp[:K] = w
    wt = torch.from_numpy(np.ascontiguousarray(wp.T))  # (out, in): groups along rows
    scales = np.empty((kp // block, N), np.float16)  # fp16 like the engine's scales
    for c in range(0, N, HEAD_CHUNK):  # output rows a chunk at a time: the search's temporaries stay small
        s, _ = grid_qparams(wt[c:c + HEAD_CHUNK], bits, block, True, steps=steps)
        scales[:, c:c + HEAD_CHUNK] = s.T.half().numpy()
    del wt
    scales[scales == 0] = np.float16(2.0 ** -24)  # an all-zero group: any positive scale
    g = wp.reshape(kp // block, block, N)
    qmax, zero = (1 << (bits - 1)) - 1, default_zero_point(bits)
    q = np.clip(np.rint(g / scales.astype(np.float32)[:, None, :]), -zero, qmax) + zero
    return LinearW(K, N, bits, codes=np.ascontiguousarray(q.reshape(kp, N).astype(np.uint8)), scales=scales,
                   zeros=np.full(scales.shape, zero, np.uint8))


def to_blocked_dq(lw: LinearW, dtype: np.dtype) -> dict:
    """x / scale / zero point of an ONNX opset-21 DequantizeLinear(axis=0, block_size=g)
    giving the (in_q, out) weight. int4 tensors are returned as raw uint4 bytes (two
    codes per byte, low nibble first in row-major order: the engine's own packing)."""
    out = {"shape": lw.codes.shape, "zshape": lw.zeros.shape, "block_size": lw.group,
           "scale": np.ascontiguousarray(lw.scales.astype(dtype))}
    if lw.bits == 4:
        out["x_raw"] = pack_nibbles(lw.codes).tobytes()
        out["zero_raw"] = pack_nibbles(np.ascontiguousarray(lw.zeros).reshape(-1)).tobytes()
    else:
        out["x"], out["zero"] = lw.codes, np.ascontiguousarray(lw.zeros)
    return out
