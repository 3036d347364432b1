"""Weight quantization primitives: group-wise integer quantization.

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

The packed layouts these codes travel in are in src/formats/packing.py; ``dequantize``
and QTensor, the unpacked in-memory form, are in src/formats/qtensor.py.
"""

from __future__ import annotations

import torch

from lmkiln.errors import QuantizationError
from lmkiln.formats.qtensor import check_qparams, dequantize, resolve_group

# Below this a scale is treated as zero (constant group): any positive scale reproduces
# such a group exactly, we only need to avoid dividing by 0.
SCALE_FLOOR = 1e-8
SUPPORTED_BITS = (3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"unsupported bit width {bits}; use one of {SUPPORTED_BITS}")


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
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales and zero points for ``w`` (out, in).

    ``check=False`` skips the finiteness check of ``w`` (a full pass), for search loops
    whose weights were checked once up front.

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
    g = resolve_group(in_f, group_size)
    wg = w.detach().to(torch.float32).reshape(out_f, in_f // g, g)
    if check and not torch.isfinite(wg).all():
        raise QuantizationError(f"weight of shape {tuple(w.shape)} contains NaN or Inf values")

    if clip_max is not None:
        clip_max = clip_max.detach().to(device=wg.device, dtype=torch.float32)
        if clip_max.shape != (out_f, in_f // g):
            raise QuantizationError(
                f"clip_max has shape {tuple(clip_max.shape)}, expected {(out_f, in_f // g)} "
                f"for weight {tuple(w.shape)} and group_size={group_size}"
            )
        if not torch.isfinite(clip_max).all() or (clip_max < 0).any():
            raise QuantizationError("clip_max must be finite and non-negative")
    return qparams_of_range(group_range(wg, symmetric), bits, symmetric, clip_max)


def group_range(wg: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) (out, n_groups) of grouped weights wg (out, n_groups, g): (0, absmax) for a
    symmetric grid; for an asymmetric one (min, max) widened to include 0, which makes 0.0
    exact and keeps the zero point inside [0, qmax]."""
    if symmetric:
        return wg.new_zeros(()), wg.abs().amax(dim=-1)
    return wg.amin(dim=-1).clamp(max=0.0), wg.amax(dim=-1).clamp(min=0.0)


def qparams_of_range(rng: tuple[torch.Tensor, torch.Tensor], bits: int, symmetric: bool,
                     clip_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales float32 and zeros int32 of the grids covering `group_range`'s ranges, each
    clamped to [-clip_max, clip_max] first (see compute_qparams)."""
    lo, hi = rng
    qmax = 2**bits - 1
    if symmetric:
        absmax = hi if clip_max is None else torch.minimum(hi, clip_max)
        scales = (absmax / (2 ** (bits - 1) - 1)).clamp(min=SCALE_FLOOR)
        return scales, torch.full_like(scales, 2 ** (bits - 1), dtype=torch.int32)
    if clip_max is not None:
        lo, hi = torch.maximum(lo, -clip_max), torch.minimum(hi, clip_max)
    scales = ((hi - lo) / qmax).clamp(min=SCALE_FLOOR)
    zeros = torch.round(-lo / scales).clamp(0, qmax).to(torch.int32)
    return scales, zeros


# The shrinks grid_qparams tries: each group's range shrunk by 0, 1, ..., GRID_STEPS-1 percent.
GRID_STEPS = 20


def grid_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    weight: torch.Tensor | None = None,
    clip_max: torch.Tensor | None = None,
    steps: int = GRID_STEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales and zeros (out, in // g) for ``w`` (out, in): of the min/max grids of
    each group's range shrunk by i percent, i < steps, the one with the least rounding error.

    Min/max alone spends the levels on a few outliers; a shrink trades their clipping for
    finer steps everywhere else. ``weight`` (in,) weights each input's squared error: GPTQ
    passes diag H (the inputs' energy, so the choice is judged by what the outputs feel);
    None weighs inputs alike (a data-free MSE grid, for weights quantized without
    calibration). ``clip_max`` (out, in // g): a bound from a clip search, kept. The error is
    judged on fp16-rounded scales, which is what every format stores and dequantizes.
    ``steps=1`` is plain :func:`compute_qparams`.
    """
    out_f, in_f = w.shape
    g = resolve_group(in_f, group_size)
    wf = w.detach().to(torch.float32)
    wg = wf.reshape(out_f, in_f // g, g)
    hw = None if weight is None else weight.to(device=wf.device, dtype=torch.float32).reshape(1, in_f // g, g)
    qmax = 2 ** bits - 1
    rng = group_range(wg, symmetric)  # once: each shrink only narrows it
    amax = rng[1] if symmetric else wg.abs().amax(-1)
    buf = torch.empty_like(wg)  # the error, in place: temporaries were most of the time (allocation, page faults)
    best = None
    for i in range(steps):
        cm = amax * (1 - i / 100)
        if clip_max is not None:
            cm = torch.minimum(cm, clip_max)
        s, z = qparams_of_range(rng, bits, symmetric, cm)
        s16, zf = s.half().float().unsqueeze(-1), z.unsqueeze(-1)
        torch.div(wg, s16, out=buf).round_().add_(zf).clamp_(0, qmax).sub_(zf).mul_(s16).sub_(wg).square_()
        err = buf.mul_(hw).sum(-1) if weight is not None else buf.sum(-1)
        if best is None:
            best = [err, s, z]
        else:
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better, s, best[1]), torch.where(better, z, best[2])]
    return best[1], best[2]


def quantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Codes ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)`` as uint8 (out, in)."""
    _check_bits(bits)
    out_f, in_f = w.shape
    g = check_qparams(w, scales, zeros, group_size, "weight")
    wg = w.detach().to(torch.float32).reshape(out_f, in_f // g, g)
    q = torch.round(wg / scales.to(torch.float32).unsqueeze(-1)) + zeros.unsqueeze(-1)
    return q.clamp(0, 2**bits - 1).to(torch.uint8).reshape(out_f, in_f)


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


def fake_quantize_(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_max: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """:func:`fake_quantize` in place on a contiguous float32 ``w``: the same values, bit
    for bit (the same operations in the same order), without the code and float
    temporaries. Search loops call this thousands of times; their large temporaries
    were most of their time on the CPU (allocation and page faults)."""
    if w.dtype != torch.float32 or not w.is_contiguous():
        raise QuantizationError("fake_quantize_ needs a contiguous float32 tensor")
    scales, zeros = compute_qparams(w, bits, group_size, symmetric, clip_max, check=check)
    out_f, in_f = w.shape
    s, z = scales.unsqueeze(-1), zeros.unsqueeze(-1)
    w.view(out_f, scales.shape[1], -1).div_(s).round_().add_(z).clamp_(0, 2**bits - 1).sub_(z).mul_(s)
    return w
