"""Bit packing of quantization codes: the packed layouts of the on-disk formats.

Codes are unsigned integers, ``q in [0, 2**bits - 1]``, with ``w_hat = (q - zero) * scale``
(src/formats/qtensor.py); how they are chosen is quantization's business
(src/quant/primitives.py). This module only moves them into and out of words.

Packed layouts (``q_in_out`` is the code matrix TRANSPOSED to ``(in, out)``):

- ``awq-gemm`` int4 (AutoAWQ ``version="gemm"``, loaded by AutoAWQ, vLLM, transformers):
  ``qweight`` int32 ``(in, out/8)``; nibble ``k`` (bits ``4k..4k+3``) of word ``j`` holds
  output column ``8j + AWQ_ORDER[k]`` with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
  ``qzeros`` int32 ``(in/g, out/8)`` packed the same way; ``scales`` float16 ``(in/g, out)``.
- lmkiln ``gemm-int8``: like awq-gemm, but byte ``k`` (bits ``8k..8k+7``) of word ``j``
  holds output column ``4j + k`` (plain little-endian order), words ``(in, out/4)``.
  No ecosystem layout exists for 8-bit AWQ; this one is lmkiln's own.
- natural int4 (lmkiln engine): uint8 ``(in, out/2)``, low nibble = even column,
  high nibble = odd column.
"""

from __future__ import annotations

import torch

from lmkiln.errors import QuantizationError
from lmkiln.formats.qtensor import resolve_group

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# AWQ_REVERSE_ORDER[c] = the nibble that holds column c of a word.
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

_FP16_MAX = 65504.0


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= x (pack widths, group and rank padding)."""
    return -(-x // multiple) * multiple


def _check_codes(q: torch.Tensor, bits: int, per_word: int, what: str, widen: bool = True) -> torch.Tensor:
    """The codes checked, as int64; `widen=False`: uint8 codes are checked and returned as they are
    (no int64 copy, 8 bytes a code)."""
    if q.dim() != 2:
        raise QuantizationError(f"{what}: expected 2-D codes (in, out), got {tuple(q.shape)}")
    if q.shape[1] % per_word != 0:
        raise QuantizationError(
            f"{what}: output dimension {q.shape[1]} is not a multiple of {per_word} "
            f"(codes of shape {tuple(q.shape)})"
        )
    if not widen and q.dtype == torch.uint8:
        if q.numel() and int(q.max()) > 2**bits - 1:
            raise QuantizationError(f"{what}: codes must lie in [0, {2**bits - 1}]")
        return q
    q64 = q.to(torch.int64)
    if q64.numel() and (q64.min() < 0 or q64.max() > 2**bits - 1):
        raise QuantizationError(f"{what}: codes must lie in [0, {2**bits - 1}]")
    return q64


def _words_to_int32(words: torch.Tensor) -> torch.Tensor:
    # Words are assembled in int64 as values in [0, 2**32); wrap to two's complement.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack32(q: torch.Tensor, bits: int, order: tuple[int, ...], what: str) -> torch.Tensor:
    per_word = 32 // bits
    q64 = _check_codes(q, bits, per_word, what)
    cols = q64.reshape(q64.shape[0], -1, per_word)[..., list(order)]
    shifts = torch.arange(per_word, dtype=torch.int64, device=q.device) * bits
    return _words_to_int32((cols << shifts).sum(dim=-1))


def _unpack32(
    packed: torch.Tensor, bits: int, reverse: tuple[int, ...], out_features: int | None, what: str
) -> torch.Tensor:
    per_word = 32 // bits
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise QuantizationError(f"{what}: expected 2-D int32 words, got {packed.dtype} {tuple(packed.shape)}")
    if out_features is not None and packed.shape[1] * per_word != out_features:
        raise QuantizationError(
            f"{what}: {packed.shape[1]} words per row hold {packed.shape[1] * per_word} "
            f"columns, not out_features={out_features}"
        )
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
    fields = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return fields[..., list(reverse)].reshape(packed.shape[0], -1).to(torch.uint8)


def pack_awq_int4(q_in_out: torch.Tensor) -> torch.Tensor:
    """AWQ-GEMM pack: codes (in, out) in [0, 15] -> int32 (in, out/8), AWQ nibble order."""
    return _pack32(q_in_out, 4, AWQ_ORDER, "pack_awq_int4")


def unpack_awq_int4(packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_awq_int4`: int32 (in, out/8) -> uint8 codes (in, out)."""
    return _unpack32(packed, 4, AWQ_REVERSE_ORDER, out_features, "unpack_awq_int4")


def pack_int8(q_in_out: torch.Tensor) -> torch.Tensor:
    """gemm-int8 pack: codes (in, out) in [0, 255] -> int32 (in, out/4), byte k = column 4j+k."""
    return _pack32(q_in_out, 8, (0, 1, 2, 3), "pack_int8")


def unpack_int8(packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int8`: int32 (in, out/4) -> uint8 codes (in, out)."""
    return _unpack32(packed, 8, (0, 1, 2, 3), out_features, "unpack_int8")


def pack_int4(q_in_out: torch.Tensor) -> torch.Tensor:
    """Natural int4 pack: codes (in, out) in [0, 15] -> uint8 (in, out/2), low nibble = even column.

    Packed in uint8 (15 << 4 = 240 fits): widening the codes to int64 first held 8 bytes a code
    plus two int64 halves, 4 x 8 bytes per weight of the engine's fused gate+up (twice the
    largest linear) at once, past the packing term of the quantize memory plan (quant/plan.py)."""
    q = _check_codes(q_in_out, 4, 2, "pack_int4", widen=False).to(torch.uint8)  # (other integer codes: in range, exact)
    # (row-major whatever the codes' strides: a transposed view would otherwise give a column-major result)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (in, out/2) -> uint8 codes (in, out)."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise QuantizationError(f"unpack_int4: expected 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if out_features is not None and packed.shape[1] * 2 != out_features:
        raise QuantizationError(
            f"unpack_int4: {packed.shape[1]} bytes per row hold {packed.shape[1] * 2} columns, "
            f"not out_features={out_features}"
        )
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


_PACKERS = {4: (pack_awq_int4, unpack_awq_int4), 8: (pack_int8, unpack_int8)}


def _packer(bits: int):
    if bits not in _PACKERS:
        raise QuantizationError(f"gemm layout supports 4 or 8 bits, not {bits}")
    return _PACKERS[bits]


def to_awq_gemm(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int = 4
) -> dict[str, torch.Tensor]:
    """HF-orientation codes (out, in), scales/zeros (out, in/g) -> on-disk tensors.

    Returns ``qweight`` int32 (in, out/8 or out/4), ``qzeros`` int32 (in/g, same),
    ``scales`` float16 (in/g, out): awq-gemm for bits=4, lmkiln gemm-int8 for bits=8.
    """
    pack, _ = _packer(bits)
    if (
        q.dim() != 2
        or scales.dim() != 2
        or scales.shape != zeros.shape
        or scales.shape[0] != q.shape[0]
        or scales.shape[1] == 0
        or q.shape[1] % scales.shape[1] != 0
    ):
        raise QuantizationError(
            f"to_awq_gemm: codes {tuple(q.shape)} and qparams {tuple(scales.shape)}/"
            f"{tuple(zeros.shape)} do not describe one (out, in) weight"
        )
    if not torch.isfinite(scales).all() or scales.abs().max() > _FP16_MAX:
        raise QuantizationError("to_awq_gemm: scales do not fit in float16")
    return {
        "qweight": pack(q.t().contiguous()),
        "qzeros": pack(zeros.t().contiguous()),
        "scales": scales.t().contiguous().to(torch.float16),
    }


def from_awq_gemm(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bits: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_awq_gemm`.

    Returns codes uint8 (out, in), scales float32 (out, in/g), zeros int32 (out, in/g).
    """
    _, unpack = _packer(bits)
    if scales.dim() != 2:
        raise QuantizationError(f"from_awq_gemm: scales must be 2-D, got {tuple(scales.shape)}")
    in_f, out_f = qweight.shape[0], scales.shape[1]
    n_groups = in_f // resolve_group(in_f, group_size)
    if scales.shape[0] != n_groups or qzeros.shape[0] != n_groups:
        raise QuantizationError(
            f"from_awq_gemm: qweight {tuple(qweight.shape)} with group_size={group_size} needs "
            f"{n_groups} groups, but scales are {tuple(scales.shape)} and qzeros {tuple(qzeros.shape)}"
        )
    q = unpack(qweight, out_f).t().contiguous()
    zeros = unpack(qzeros, out_f).t().contiguous().to(torch.int32)
    return q, scales.t().contiguous().to(torch.float32), zeros
