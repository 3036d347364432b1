"""Weight quantization primitives: group-wise integer quantization and packing.

Conventions (every function here):

- A linear weight ``w`` is in Hugging Face orientation ``(out, in)``; ``y = x @ w.T``.
- Groups of ``g`` consecutive weights run along the INPUT dimension, so qparams are
  ``(out, in // g)``. ``g = -1`` means one group per whole row (per output channel).
- Codes are always UNSIGNED, ``q in [0, 2**bits - 1]``, with an integer zero point, and
  dequantization is always ``w_hat = (q - zero) * scale``. Bits: 3 (reference only,
  unpacked), 4 and 8.
- Asymmetric (AutoAWQ's scheme): the group range is widened to include 0
  (``min <= 0 <= max``) so 0.0 is exactly representable;
  ``scale = (max - min) / (2**bits - 1)``, ``zero = round(-min / scale)`` in ``[0, 2**bits - 1]``.
- Symmetric: ``scale = absmax / (2**(bits-1) - 1)`` and ``zero = 2**(bits-1)`` for every
  group, so codes use ``[1, 2**bits - 1]`` (code 0 is never produced). Storing the fixed
  zero explicitly lets symmetric weights travel in the same AWQ-GEMM files as
  asymmetric ones.

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

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# AWQ_REVERSE_ORDER[c] = the nibble that holds column c of a word.
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

# Below this a scale is treated as zero (constant group): any positive scale reproduces
# such a group exactly, we only need to avoid dividing by 0.
SCALE_FLOOR = 1e-8
SUPPORTED_BITS = (3, 4, 8)
_FP16_MAX = 65504.0


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"unsupported bit width {bits}; use one of {SUPPORTED_BITS}")


def _group(in_features: int, group_size: int) -> int:
    """Resolve g = -1 to a whole row and check that groups tile the input dimension."""
    g = in_features if group_size == -1 else group_size
    if g <= 0 or in_features % g != 0:
        raise QuantizationError(
            f"input dimension {in_features} is not a multiple of group_size={group_size}; "
            "pad the weight with pad_to_multiple(w, dim=1, multiple=group_size) first"
        )
    return g


def pad_to_multiple(w: torch.Tensor, dim: int, multiple: int) -> tuple[torch.Tensor, int]:
    """Zero-pad ``w`` along ``dim`` to a multiple of ``multiple``.

    Returns ``(w_padded, original_size)``; ``w`` itself when no padding is needed.
    Padding the input dim with zeros is exact: padded input activations are zero too,
    and an all-zero tail quantizes to exactly zero.
    """
    if multiple <= 0:
        raise QuantizationError(f"pad multiple must be positive, got {multiple}")
    size = w.shape[dim]
    extra = (-size) % multiple
    if extra == 0:
        return w, size
    pad_shape = list(w.shape)
    pad_shape[dim] = extra
    return torch.cat([w, w.new_zeros(pad_shape)], dim=dim), size


def compute_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales and zero points for ``w`` (out, in).

    Objective: the smallest uniform grid ``(q - zero) * scale``, ``q`` unsigned, that covers
    the group's range, so rounding error is at most ``scale / 2`` for every element.

    ``clip_max`` (out, in//g), optional, positive: clamp each group's range to
    ``[-clip_max, clip_max]`` before computing qparams (AWQ clip search). Weights outside
    the clipped range saturate at the end codes.

    Returns ``scales`` float32 (out, in//g) and ``zeros`` int32 (out, in//g).
    """
    _check_bits(bits)
    if w.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = _group(in_f, group_size)
    wg = w.detach().to(torch.float32).reshape(out_f, in_f // g, g)
    if not torch.isfinite(wg).all():
        raise QuantizationError(f"weight of shape {tuple(w.shape)} contains NaN or Inf values")
    qmax = 2**bits - 1

    if clip_max is not None:
        clip_max = clip_max.detach().to(device=wg.device, dtype=torch.float32)
        if clip_max.shape != (out_f, in_f // g):
            raise QuantizationError(
                f"clip_max has shape {tuple(clip_max.shape)}, expected {(out_f, in_f // g)} "
                f"for weight {tuple(w.shape)} and group_size={group_size}"
            )
        if not torch.isfinite(clip_max).all() or (clip_max < 0).any():
            raise QuantizationError("clip_max must be finite and non-negative")

    if symmetric:
        absmax = wg.abs().amax(dim=-1)
        if clip_max is not None:
            absmax = torch.minimum(absmax, clip_max)
        scales = (absmax / (2 ** (bits - 1) - 1)).clamp(min=SCALE_FLOOR)
        zeros = torch.full_like(scales, 2 ** (bits - 1), dtype=torch.int32)
    else:
        # Including 0 in the range makes 0.0 exact and keeps the zero point inside [0, qmax].
        wmin = wg.amin(dim=-1).clamp(max=0.0)
        wmax = wg.amax(dim=-1).clamp(min=0.0)
        if clip_max is not None:
            wmin = torch.maximum(wmin, -clip_max)
            wmax = torch.minimum(wmax, clip_max)
        scales = ((wmax - wmin) / qmax).clamp(min=SCALE_FLOOR)
        zeros = torch.round(-wmin / scales).clamp(0, qmax).to(torch.int32)
    return scales, zeros


def quantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Codes ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)`` as uint8 (out, in)."""
    _check_bits(bits)
    out_f, in_f = w.shape
    g = _group(in_f, group_size)
    if scales.shape != (out_f, in_f // g) or zeros.shape != scales.shape:
        raise QuantizationError(
            f"qparams of shape {tuple(scales.shape)}/{tuple(zeros.shape)} do not match weight "
            f"{tuple(w.shape)} with group_size={group_size}"
        )
    wg = w.detach().to(torch.float32).reshape(out_f, in_f // g, g)
    q = torch.round(wg / scales.to(torch.float32).unsqueeze(-1)) + zeros.unsqueeze(-1)
    return q.clamp(0, 2**bits - 1).to(torch.uint8).reshape(out_f, in_f)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``w_hat = (q - zero) * scale`` as float32 (out, in) from codes (out, in)."""
    out_f, in_f = q.shape
    g = _group(in_f, group_size)
    if scales.shape != (out_f, in_f // g) or zeros.shape != scales.shape:
        raise QuantizationError(
            f"qparams of shape {tuple(scales.shape)}/{tuple(zeros.shape)} do not match codes "
            f"{tuple(q.shape)} with group_size={group_size}"
        )
    qg = q.to(torch.float32).reshape(out_f, in_f // g, g)
    w = (qg - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_f, in_f)


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round trip ``w`` through the integer grid; returns ``w_hat`` with ``w``'s dtype."""
    scales, zeros = compute_qparams(w, bits, group_size, symmetric, clip_max)
    q = quantize(w, scales, zeros, bits, group_size)
    return dequantize(q, scales, zeros, group_size).to(w.dtype)


# --- packing ---------------------------------------------------------------------------


def _check_codes(q: torch.Tensor, bits: int, per_word: int, what: str) -> torch.Tensor:
    if q.dim() != 2:
        raise QuantizationError(f"{what}: expected 2-D codes (in, out), got {tuple(q.shape)}")
    if q.shape[1] % per_word != 0:
        raise QuantizationError(
            f"{what}: output dimension {q.shape[1]} is not a multiple of {per_word} "
            f"(codes of shape {tuple(q.shape)})"
        )
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
    """Natural int4 pack: codes (in, out) in [0, 15] -> uint8 (in, out/2), low nibble = even column."""
    q64 = _check_codes(q_in_out, 4, 2, "pack_int4")
    pairs = q64.reshape(q64.shape[0], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


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
    n_groups = in_f // _group(in_f, group_size)
    if scales.shape[0] != n_groups or qzeros.shape[0] != n_groups:
        raise QuantizationError(
            f"from_awq_gemm: qweight {tuple(qweight.shape)} with group_size={group_size} needs "
            f"{n_groups} groups, but scales are {tuple(scales.shape)} and qzeros {tuple(qzeros.shape)}"
        )
    q = unpack(qweight, out_f).t().contiguous()
    zeros = unpack(qzeros, out_f).t().contiguous().to(torch.int32)
    return q, scales.t().contiguous().to(torch.float32), zeros
