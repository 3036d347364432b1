"""A Triton kernel for int4 linears on CUDA that computes with the dequantized weights exactly.

PyTorch's own int4 kernel (tinygemm) takes bfloat16 activations only and computes its
weights as (q - 8) * scale + zero_fp with scale and zero_fp rounded to bf16, so its output
is bf16-noisy and differs from the dequantized engine (KL ~1e-3 on the bundled model).
This kernel reads lmkiln's own packed codes and, in registers, forms exactly the weight the
"dequant" path holds, w = ((q - zero) * scale in float32) rounded to the compute dtype, then
multiplies with float32 accumulation: the same numbers as a dequantized matmul up to the
order of the sums, in float16, bfloat16 or float32 (IEEE products, no TF32).

Layout (built once at load, `pack`): codes (n, k/2) uint8, byte j of row n = k 2j in the low
nibble, 2j+1 in the high one, so each output column's codes are contiguous along k (the
decode kernel's loads run along k); scales (n, k/g) as the engine stores them (float16: the
arithmetic is float32 in any case, so keeping them narrow is exact) and zeros (n, k/g) uint8.

It serves small calls (decode, up to `MAX_M` rows): one program per tile of output rows and
columns and per share of k (`pick`), every k tile inside one quantization group, so each
tile needs one scale and zero per column. Larger calls (prefill) dequantize the linear by a second kernel (`weight`, the
same numbers as the float32 reference `dequantize`) and run a plain matmul (QuantLinear).
Triton is imported lazily: `available()` is False where it is missing (CPU-only PyTorch
wheels have no Triton) and QuantLinear then picks its other paths. Under
TRITON_INTERPRET=1 the kernel runs on CPU tensors (slowly), which is how CI-less machines
test it (tests/test_triton_int4.py).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from lmkiln.formats.packing import unpack_int4
from lmkiln.formats.qtensor import dequantize as qdequantize

MAX_M = 128  # rows per call served by the kernel; above, dequantize + matmul (a GEMM's tiling wins there)


@functools.cache
def _triton():
    """The triton modules and the compiled kernel, or None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def w4_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, KX, KH, KH_SPLIT, G, stride_xm, stride_qn, stride_sn, stride_ym,
                  stride_ys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, IEEE: tl.constexpr):
        # program (column tile, row tile, k split); KH_SPLIT is a multiple of BLOCK_KH
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, BLOCK_KH)
        row_ok, col_ok = rows < M, cols < N
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j0 in range(pid_k * KH_SPLIT, tl.minimum(KH, (pid_k + 1) * KH_SPLIT), BLOCK_KH):
            # one group per tile (BLOCK_KH divides G / 2): one scale and zero per column
            grp = (2 * j0) // G
            s = tl.load(s_ptr + cols * stride_sn + grp, mask=col_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + cols * stride_sn + grp, mask=col_ok, other=0).to(tl.float32)
            b = tl.load(q_ptr + cols[:, None] * stride_qn + (j0 + j)[None, :], mask=col_ok[:, None], other=0)
            w_lo = (((b & 15).to(tl.float32) - z[:, None]) * s[:, None]).to(dtype)  # (BLOCK_N, BLOCK_KH): k even
            w_hi = (((b >> 4).to(tl.float32) - z[:, None]) * s[:, None]).to(dtype)  # k odd
            k_lo = 2 * (j0 + j)
            x_lo = tl.load(x_ptr + rows[:, None] * stride_xm + k_lo[None, :], mask=row_ok[:, None] & (k_lo < KX)[None, :], other=0.0)
            x_hi = tl.load(x_ptr + rows[:, None] * stride_xm + (k_lo + 1)[None, :],
                           mask=row_ok[:, None] & (k_lo + 1 < KX)[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(x_lo, tl.trans(w_lo), acc, input_precision="ieee")
                acc = tl.dot(x_hi, tl.trans(w_hi), acc, input_precision="ieee")
            else:
                acc = tl.dot(x_lo, tl.trans(w_lo), acc)
                acc = tl.dot(x_hi, tl.trans(w_hi), acc)
        # y: (M, N) in x's dtype, or with k splits (SPLIT, M, N) float32 partial sums
        out = y_ptr + pid_k * stride_ys + rows[:, None] * stride_ym + cols[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def dequant_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, KH, G, stride_qn, stride_sn, stride_wn,
                       BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr):
        # w (N, 2 KH) in the output's dtype, element for element as `dequantize` computes it
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.program_id(1) * BLOCK_KH + tl.arange(0, BLOCK_KH)
        ok = (rows < N)[:, None] & (j < KH)[None, :]
        grp = (2 * j) // G
        b = tl.load(q_ptr + rows[:, None] * stride_qn + j[None, :], mask=ok, other=0)
        s = tl.load(s_ptr + rows[:, None] * stride_sn + grp[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * stride_sn + grp[None, :], mask=ok, other=0).to(tl.float32)
        dtype = w_ptr.dtype.element_ty
        w_lo = (((b & 15).to(tl.float32) - z) * s).to(dtype)
        w_hi = (((b >> 4).to(tl.float32) - z) * s).to(dtype)
        k = 2 * j
        tl.store(w_ptr + rows[:, None] * stride_wn + k[None, :], w_lo, mask=ok)
        tl.store(w_ptr + rows[:, None] * stride_wn + (k + 1)[None, :], w_hi, mask=ok)

    return triton, w4_kernel, dequant_kernel


_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs on `device` with `dtype` activations: CUDA with Triton
    installed, or any device under TRITON_INTERPRET=1 (Triton's interpreter, for tests).
    Probed once per device and dtype on a tiny problem against the dequantized product,
    not assumed (a Triton that cannot compile it here, or computes it wrong, is not used)."""
    if not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") or _triton() is None:
        return False  # (the device first: importing Triton costs ~0.2 s a CPU run does not need)
    key = (str(device), dtype)
    if key not in _PROBED:
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (64, 24), dtype=torch.uint8, generator=gen)
        scales = torch.rand(2, 24, generator=gen).half()
        zeros = torch.randint(0, 16, (2, 24), dtype=torch.uint8, generator=gen)
        x = torch.randn(3, 64, generator=gen).to(device=device, dtype=dtype)
        q, s, z = (t.to(device) for t in pack(codes, scales, zeros))
        try:
            w = dequantize(q, s, z, dtype)
            got = matmul(x, q, s, z).float()
            want = (x @ w.t()).float()
            _PROBED[key] = bool(torch.allclose(got, want, rtol=1e-2, atol=1e-2)) and torch.equal(weight(q, s, z, dtype), w)
        except Exception:  # noqa: BLE001 - any failure to compile or launch means: not here
            _PROBED[key] = False
    return _PROBED[key]


def k_tile(group_size: int, k: int) -> int | None:
    """Bytes of codes (2 k each) per k step: a tile must lie inside one group and be at least
    16 wide for tl.dot; None when the group size allows no such tile."""
    if k % 2 or group_size % 2:
        return None
    return next((t for t in (64, 32, 16) if (group_size // 2) % t == 0), None)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes uint8 (k, n), scales (k/g, n), zeros (k/g, n) as the engine holds them → the
    kernel's layout: (n, k/2) nibbles, (n, k/g) scales in their own float dtype, (n, k/g) uint8 zeros."""
    q = codes.t()
    return ((q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scales.t().contiguous(),
            zeros.t().to(torch.uint8).contiguous())


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference (n, k) weight in `dtype` from the kernel's layout: the engine's own
    dequantization (formats.qtensor, float32) of the unpacked codes, then rounded. What the
    probe and the tests check `weight` and `matmul` against."""
    codes = unpack_int4(q)
    return qdequantize(codes, scales.float(), zeros.to(torch.int32), codes.shape[1] // scales.shape[1]).to(dtype)


def weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` by a Triton kernel, for prefill-sized calls where `available`: the same
    numbers, with no float32 temporaries (memory: the (n, k) weight in `dtype` alone)."""
    triton, _, kernel = _triton()
    n, kh = q.shape
    w = torch.empty(n, 2 * kh, dtype=dtype, device=q.device)
    grid = (triton.cdiv(n, 32), triton.cdiv(kh, 64))
    kernel[grid](q, scales, zeros, w, n, kh, 2 * kh // scales.shape[1], q.stride(0), scales.stride(0), w.stride(0),
                 BLOCK_N=32, BLOCK_KH=64)
    return w


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16


@dataclass(frozen=True)
class Config:
    """One launch shape: rows and columns per program, k splits (each a program; partial
    sums added afterwards in a fixed order, so results do not depend on scheduling), and
    Triton's pipelining depth and warps per program."""
    block_m: int
    block_n: int
    split: int
    stages: int = 2  # H100 sweep: 2 stages 1-9 % faster than 3 on 13 of 14 linears (the 14th within 1 %)
    warps: int = 4


def pick(m: int, n: int, k: int, g: int, sms: int) -> Config:
    """The launch shape for an (m, k) x (k, n) call, from a sweep on an H100 (bf16, g128,
    TinyLlama- to 70B-shaped linears, m 1 and 8; docs/BENCHMARKS.md): 16-row tiles even for
    one row (tensor cores; a one-row reduction on the CUDA cores measured 1.0-1.4x slower),
    128 columns, and k split until there are four programs per SM (at most 16 splits, each
    at least two k tiles): within 10 % of the best of 40 shapes on every linear measured."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 128
    tiles = -(-n // block_n) * -(-m // block_m)
    steps = k // 2 // k_tile(g, k)
    split = 1
    while tiles * split < 4 * sms and split < 16 and steps >= 4 * split:
        split *= 2
    return Config(block_m, block_n, split)


def matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    """x (m, kx) @ the (k, n) weight held as `pack` made it, kx ≤ k (columns beyond kx are the
    engine's zero padding and are skipped); m ≤ MAX_M. Output (m, n) in x's dtype.
    `config`: a launch shape (benchmarks); None picks one (`pick`)."""
    triton, kernel, _ = _triton()
    x = x.contiguous()
    m, kx = x.shape
    n, kh = q.shape
    if m == 0:  # no rows (an expert no token was routed to): a grid with no programs is refused
        return x.new_empty(0, n)
    g = 2 * kh // scales.shape[1]
    block_kh = k_tile(g, 2 * kh)
    c = config or pick(m, n, 2 * kh, g, _sm_count(x.device))
    per_split = -(-kh // (c.split * block_kh)) * block_kh  # whole k tiles per split
    split = -(-kh // per_split)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if split == 1 else \
        torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, c.block_n), triton.cdiv(m, c.block_m), split)
    kernel[grid](x, q, scales, zeros, y, m, n, kx, kh, per_split, g, x.stride(0), q.stride(0), scales.stride(0),
                 y.stride(-2), y.stride(0) if split > 1 else 0, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_KH=block_kh,
                 IEEE=x.dtype == torch.float32, num_stages=c.stages, num_warps=c.warps)
    return y if split == 1 else y.sum(0).to(x.dtype)
