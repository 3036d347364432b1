"""Quantized linears for the engine runner: int4/int8 codes held packed on the device.

`QuantLinear` picks one path per linear (int4 and int8 kernels on CUDA, per-call
dequantization where none fits, dequantization at load on CPU) and reports it as `mode`.
PyTorch's CUDA int4 kernel (tinygemm) keeps its own packed layout; the helpers here read
that layout off the packing op itself, so prefill-sized calls can dequantize from the
packed codes instead of running tinygemm at sizes where it is slow (docs/runtime.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.formats.packing import unpack_int4
from lmkiln.formats.qtensor import dequantize
from lmkiln.runtime import triton_int4

INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # what PyTorch's int4 kernels (CPU and CUDA tinygemm) accept
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the CPU kernels'; CUDA's tinygemm: bfloat16 (float16 where int4_kernel_on says)


def int4_inner_k_tiles(k: int) -> int | None:
    """The tinygemm tiling for a reduction of k rows: k must be a multiple of 16 × innerKTiles
    (2, 4 or 8; more tiles, fewer loads); None when no tiling fits."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


_TILE_ORDER: dict[tuple[str, int], torch.Tensor] = {}


def tinygemm_tile_order(device: torch.device, tiles: int) -> torch.Tensor:
    """Where each nibble of a tinygemm-packed tile came from: for the int4 codes of one tile
    (8 output rows × 16·tiles input columns) in the packed tensor's memory order, the
    row-major index of the code in the tile. Read off the packing op itself (three probe
    packs, one per base-16 digit of the index), not assumed; `QuantLinear` checks it on
    every linear it packs before relying on it."""
    key = (str(device), tiles)
    if key not in _TILE_ORDER:
        cols = 16 * tiles
        idx = torch.arange(8 * cols, device=device, dtype=torch.int32).view(8, cols)
        order = torch.zeros(8 * cols, dtype=torch.int64, device=device)
        for digit in range(3):  # 8 × 128 = 1024 < 16³ codes per tile at most
            packed = tinygemm_pack(((idx >> (4 * digit)) & 15).to(torch.uint8), tiles)
            order += tinygemm_nibbles(packed).reshape(-1).long() << (4 * digit)
        _TILE_ORDER[key] = order
    return _TILE_ORDER[key]


def tinygemm_pack(w: torch.Tensor, tiles: int) -> torch.Tensor:
    """PyTorch's CUDA int4 packing of codes w uint8 (n, k): it takes (n, k/2) bytes with
    the even column in the high nibble."""
    return torch.ops.aten._convert_weight_to_int4pack((w[:, ::2] << 4 | w[:, 1::2]).contiguous(), tiles)


def tinygemm_codes(packed: torch.Tensor, n: int, k: int, tiles: int) -> torch.Tensor:
    """uint8 codes (n, k) read back from tinygemm's packed layout: tiles of 8 rows × 16·tiles
    columns, row-major over the matrix, each in `tinygemm_tile_order`."""
    cols = 16 * tiles
    nib = tinygemm_nibbles(packed)  # (n/8, k/cols, 8·cols) in memory order
    tile = torch.empty_like(nib)
    tile[..., tinygemm_tile_order(packed.device, tiles)] = nib
    return tile.view(nib.shape[0], nib.shape[1], 8, cols).permute(0, 2, 1, 3).reshape(n, k)


def tinygemm_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit fields of a tinygemm-packed int32 tensor (n/8, k/(16·tiles), 32, tiles/2),
    in memory order (least significant first), as uint8 (n/8, k/(16·tiles), 128·tiles).
    Read as bytes (little-endian, as on every CUDA host) so no temporary is wider than a byte."""
    b = packed.contiguous().view(torch.uint8)
    return torch.stack([b & 15, b >> 4], -1).reshape(packed.shape[0], packed.shape[1], -1)


_INT4_KERNEL: dict[tuple[str, torch.dtype], bool] = {}


def int4_kernel_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch's CUDA int4 kernel takes `dtype` activations here (bfloat16 always;
    float16 in some builds): probed once on a tiny problem, not assumed."""
    key = (device.type, dtype)
    if key not in _INT4_KERNEL:
        try:
            packed = tinygemm_pack(torch.zeros(8, 64, dtype=torch.uint8, device=device), 2)
            torch.ops.aten._weight_int4pack_mm(torch.ones(1, 64, dtype=dtype, device=device), packed, 32,
                                               torch.ones(2, 8, 2, dtype=dtype, device=device))
            _INT4_KERNEL[key] = True
        except (RuntimeError, NotImplementedError):
            _INT4_KERNEL[key] = False
    return _INT4_KERNEL[key]


_INT8_KERNEL: dict[tuple[str, torch.dtype], bool] = {}


def int8_kernel_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether aten._weight_int8pack_mm runs on this device type with these activations (CPU
    has it; CUDA only in some PyTorch builds): probed once on a tiny problem, not assumed."""
    key = (device.type, dtype)
    if key not in _INT8_KERNEL:
        try:
            x = torch.ones(1, 32, dtype=dtype, device=device)
            torch.ops.aten._weight_int8pack_mm(x, torch.ones(16, 32, dtype=torch.int8, device=device),
                                               torch.ones(16, dtype=dtype, device=device))
            _INT8_KERNEL[key] = True
        except (RuntimeError, NotImplementedError):
            _INT8_KERNEL[key] = False
    return _INT8_KERNEL[key]


class QuantLinear(nn.Module):
    """`Linear` for a weight held as integer codes: w = (code - zero) * scale per group.

    codes uint8 (in_padded, out), scales/zeros (in_padded / g, out); `in_features` is
    the activation width (in_padded - in_features trailing rows are zero padding). The
    tensors are moved to `device` first, so the packed form is built there and the fp
    weight never exists in host memory or, on CUDA, whole on the device. `mode` says
    which path a linear took (`EngineModel.linear_paths`):

    - "int4-triton": on CUDA where Triton is installed (PyTorch's CUDA wheels bring it), int4
      in float16, float32, and bfloat16 where `BF16_INT4` says so: runtime/triton_int4.py's
      kernel forms exactly the dequantized weight in registers ((q - zero) * scale in
      float32, rounded to the compute dtype), so the output equals "dequant"'s up to the
      order of sums; calls above triton_int4.MAX_M rows dequantize the linear from the
      packed codes and run a plain matmul;
    - "int4": PyTorch's packed int4 kernel, which computes (q - 8) * scale + zero_fp, so
      zero_fp = (8 - zero) * scale. On CUDA: tinygemm (`_weight_int4pack_mm`, bfloat16
      activations, scales and zeros in bfloat16, so weights differ from the dequantized
      ones by bfloat16 rounding of scale and zero_fp). On CPU (`_for_cpu`, only with
      `kernels=True`): in float32 both products and their sum are exact (small integers
      times an fp16 scale), so the weights equal the dequantized ones;
    - "int8": per-channel symmetric int8 (zero 128 and one scale per output column), int8
      weights code - 128. On CUDA (bf16/fp16): cast per call, matmul, scale per column
      (PyTorch's CUDA `_weight_int8pack_mm` measured 2.3x slower in decode and 160x in
      prefill on an H100); on CPU with `kernels=True`: aten._weight_int8pack_mm;
    - "dequant-live": on CUDA where no kernel fits (group size, widths, dtype): the codes
      stay packed on the device (int4 two per byte) and each call dequantizes this one
      linear in float32 into a temporary and runs a plain matmul: memory as the packed
      engine plus one linear's workspace, numerics identical to "dequant";
    - "dequant": on CPU by default: dequantized ONCE at load into the compute dtype
      (memory as an fp engine, numerics identical). On AVX2-only CPUs (no AVX-512, like
      our CI machines) PyTorch's int4 CPU kernel measured 10-40x slower than an fp32
      matmul (docs/BENCHMARKS.md), so speed wins over memory there.
    """

    PATHS = ("int4-triton", "int4", "int8", "dequant-live", "dequant")
    FORCED = ("dequant", "dequant-live", "int4-triton")  # what `path` may force (comparisons, tests)
    BF16_INT4 = "int4"  # which int4 path bf16 takes on CUDA where both fit: tinygemm ("int4") or "int4-triton"
    DEQUANT_CHUNK = 1 << 22  # weights per float32 block when dequantizing from packed codes (16 MiB of temporaries)
    LARGE_M = 256  # CUDA int4: from this many rows per call, dequantize from the packed codes and matmul (H100 crossover ~230)

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, in_features: int,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, device="cpu", kernels: bool = False,
                 path: str | None = None):
        """`path`: one of FORCED forces that path on any device where it can run (to compare
        the kernels against, and to test the live and Triton paths on CPU); None picks as above."""
        super().__init__()
        if path not in (None, *self.FORCED):
            raise ValueError(f"QuantLinear path {path!r}: choose {', '.join(self.FORCED)} (or None to pick)")
        device = torch.device(device)
        k, n = codes.shape
        g = k // scales.shape[0]
        self.in_features, self.k, self.n, self.group_size, self.bits, self.dtype = in_features, k, n, g, bits, dtype
        self.bias = None if bias is None else nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        codes = codes.to(device)
        stored_scales = scales.to(device)  # as the engine holds them (fp16): the Triton path keeps them so
        scales, zeros = stored_scales.float(), zeros.to(device).to(torch.int32)
        on_cuda = device.type == "cuda"
        kernel_ok = (dtype in (torch.bfloat16, torch.float16) and bits == 4 and int4_kernel_on(device, dtype)) if on_cuda \
            else (kernels and dtype in KERNEL_DTYPES)
        tiles = int4_inner_k_tiles(k)
        per_channel_sym = bits == 8 and bool((zeros == 128).all()) and bool((scales == scales[:1]).all())
        tinygemm_ok = kernel_ok and bits == 4 and g in INT4_KERNEL_GROUPS and (n % 8 == 0 and tiles if on_cuda else n % 16 == 0)
        live = on_cuda if path is None else path == "dequant-live"
        triton_ok = (bits == 4 and dtype in (torch.float16, torch.bfloat16, torch.float32) and triton_int4.k_tile(g, k) is not None
                     and triton_int4.available(device, dtype))
        if path == "int4-triton" and not triton_ok:
            raise ValueError(f"QuantLinear path 'int4-triton' cannot run here ({bits}-bit, group {g}, {dtype}, {device}, "
                             f"Triton {'usable' if triton_int4.available(device, dtype) else 'not usable'} there)")
        use_triton = path == "int4-triton" or (path is None and on_cuda and triton_ok and
                                               (dtype != torch.bfloat16 or self.BF16_INT4 == "int4-triton" or not tinygemm_ok))
        if path is not None:  # forced: no other kernel
            tinygemm_ok = kernels = False
        if use_triton:
            self.mode = "int4-triton"
            q, s, z = triton_int4.pack(codes, stored_scales, zeros)
            self.register_buffer("codes", q)
            self.register_buffer("scales", s)
            self.register_buffer("zeros", z)
        elif tinygemm_ok:
            self.mode = "int4"
            if on_cuda:  # tinygemm takes (n, k/2) bytes, even column in the high nibble
                w = codes.t().contiguous()
                packed = tinygemm_pack(w, tiles)
                self.tiles = tiles
                # Large M (prefill): tinygemm measured 20-26x slower than a bf16 matmul at
                # M = 2048 on an H100, so those calls dequantize from the packed codes instead;
                # only where reading the packed layout back gives exactly these codes.
                try:
                    self.large_m_dequant = bool(torch.equal(tinygemm_codes(packed, n, k, tiles), w))
                except RuntimeError:  # a layout other than the one read off: tinygemm for every M
                    self.large_m_dequant = False
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().to(torch.int32).contiguous(), 1)
            self.register_buffer("packed", packed)
            zero_fp = (8 - zeros).float() * scales
            self.register_buffer("scales_and_zeros", torch.stack([scales, zero_fp], -1).to(dtype).contiguous())
        elif path is None and per_channel_sym and (on_cuda and dtype != torch.float32 or kernels and int8_kernel_on(device, dtype)):
            self.mode = "int8"
            if on_cuda:  # (in, out) int8, cast per call (see the class docstring)
                self.register_buffer("qweight", (codes.to(torch.int32) - 128).to(torch.int8).contiguous())
            else:
                self.register_buffer("qweight", (codes.t().to(torch.int32) - 128).to(torch.int8).contiguous())
            self.register_buffer("scale", scales[0].to(dtype).contiguous())
        elif live:
            self.mode = "dequant-live"
            # int4 two per byte, low nibble = even column (formats.packing's layout), packed in
            # uint8 as pack_int4 does, without its range check: these codes came from an engine
            self.nibbles = bits == 4 and n % 2 == 0
            self.register_buffer("codes", (codes[:, 0::2] | (codes[:, 1::2] << 4)) if self.nibbles else codes.contiguous())
            self.register_buffer("scales", scales.contiguous())
            self.register_buffer("zeros", zeros.to(torch.uint8).contiguous())
        else:
            self.mode = "dequant"
            w = dequantize(codes.t(), scales.t(), zeros.t(), g).t()[:in_features]
            self.weight = nn.Parameter(w.to(dtype).contiguous(), requires_grad=False)

    def weight_from_packed(self) -> torch.Tensor:
        """The (k, n) weight tinygemm computes with ((q - 8) * scale + zero_fp, both bf16), for
        large-M calls: one linear's temporary."""
        k, n, g = self.k, self.n, self.group_size
        q = tinygemm_codes(self.packed, n, k, self.tiles).t().contiguous()  # (k, n) uint8
        sz = self.scales_and_zeros.float()
        out = torch.empty(k, n, dtype=self.dtype, device=q.device)
        rows = max(g, self.DEQUANT_CHUNK // n // g * g)  # float32 arithmetic on a bounded block at a time, in place
        for r in range(0, k, rows):
            blk = q[r:r + rows].float().view(-1, g, n)
            gs = slice(r // g, (r + rows) // g)
            out[r:r + rows] = blk.sub_(8).mul_(sz[gs, None, :, 0]).add_(sz[gs, None, :, 1]).view(-1, n)
        return out

    def live_weight(self) -> torch.Tensor:
        """"dequant-live": this linear's (in_features, out) weight, computed as "dequant" does."""
        codes = unpack_int4(self.codes) if self.nibbles else self.codes
        kg = self.k // self.group_size
        w = (codes.view(kg, self.group_size, self.n).float() - self.zeros.float()[:, None]) * self.scales[:, None]
        return w.view(self.k, self.n)[:self.in_features].to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dequant":
            y = x @ self.weight
        elif self.mode == "dequant-live":
            y = x @ self.live_weight()
        elif self.mode == "int4-triton":
            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[0] <= triton_int4.MAX_M:
                y = triton_int4.matmul(x2, self.codes, self.scales, self.zeros)
            else:  # prefill: one linear dequantized into a temporary, as "dequant" holds it
                y = x2 @ triton_int4.weight(self.codes, self.scales, self.zeros, self.dtype)[:, :self.in_features].t()
            y = y.reshape(*x.shape[:-1], self.n)
        else:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])  # the kernels take 2-D input only
            if self.k > self.in_features:
                x2 = F.pad(x2, (0, self.k - self.in_features))
            if self.mode == "int8":
                if x2.is_cuda:
                    y = (x2 @ self.qweight.to(x2.dtype)) * self.scale
                else:
                    y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
            elif x2.is_cuda and x2.shape[0] >= self.LARGE_M and self.large_m_dequant:
                y = x2 @ self.weight_from_packed()
            elif x2.is_cuda:
                y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
            y = y.reshape(*lead, self.n)
        return y if self.bias is None else y + self.bias
