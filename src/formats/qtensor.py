"""QTensor: one quantized linear weight in HF orientation, unpacked, ready to transform.

QTensor is the in-memory form every quantized format reads and writes (AWQ-GEMM files,
the engine's int4/int8 tensors) and what quantization produces. Conversion applies the
same row transforms (rotary permute, padding, rank slices, fusion) to quantized weights
as to fp ones. Codes, scales and zeros all have the output dimension first, so a row
transform applied to each of the three is exact. Input-dimension slices (tensor
parallel wo/w2) must fall on group boundaries.

Dequantization is defined here, once: ``w_hat = (q - zero) * scale`` per group of
``group_size`` consecutive input columns (the conventions of src/quant/primitives.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from lmkiln.errors import QuantizationError


def resolve_group(in_features: int, group_size: int) -> int:
    """Resolve g = -1 to a whole row and check that groups tile the input dimension."""
    g = in_features if group_size == -1 else group_size
    if g <= 0 or in_features % g != 0:
        raise QuantizationError(
            f"input dimension {in_features} is not a multiple of group_size={group_size}; "
            "pad the weight with pad_to_multiple(w, dim=1, multiple=group_size) first"
        )
    return g


def check_qparams(t: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, what: str) -> int:
    """The resolved group size, after checking that (out, in/g) scales and zeros fit `t`."""
    out_f, in_f = t.shape
    g = resolve_group(in_f, group_size)
    if scales.shape != (out_f, in_f // g) or zeros.shape != scales.shape:
        raise QuantizationError(
            f"qparams of shape {tuple(scales.shape)}/{tuple(zeros.shape)} do not match {what} "
            f"{tuple(t.shape)} with group_size={group_size}"
        )
    return g


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``w_hat = (q - zero) * scale`` as float32 (out, in) from codes (out, in)."""
    out_f, in_f = q.shape
    g = check_qparams(q, scales, zeros, group_size, "codes")
    qg = q.to(torch.float32).reshape(out_f, in_f // g, g)
    w = (qg - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_f, in_f)


@dataclass(frozen=True)
class QTensor:
    codes: torch.Tensor  # uint8 (out, in_padded), values in [0, 2**bits - 1]
    scales: torch.Tensor  # float (out, in_padded // group_size)
    zeros: torch.Tensor  # integer (out, in_padded // group_size)
    bits: int
    group_size: int  # resolved: never -1
    in_features: int  # the model's true input width (<= in_padded)

    def __post_init__(self):
        o, i = self.codes.shape
        if i % self.group_size or self.scales.shape != (o, i // self.group_size) or self.zeros.shape != self.scales.shape:
            raise QuantizationError(
                f"inconsistent quantized weight: codes {tuple(self.codes.shape)}, scales {tuple(self.scales.shape)}, "
                f"zeros {tuple(self.zeros.shape)}, group {self.group_size}"
            )

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_padded(self) -> int:
        return self.codes.shape[1]

    def dequantize(self, unpad: bool = True) -> torch.Tensor:
        """float32 (out, in_features), or (out, in_padded) with unpad=False."""
        w = dequantize(self.codes, self.scales.float(), self.zeros.to(torch.int32), self.group_size)
        return w[:, : self.in_features] if unpad else w

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "QTensor":
        """Apply a transform along the output dimension to codes, scales and zeros alike."""
        return replace(self, codes=fn(self.codes), scales=fn(self.scales), zeros=fn(self.zeros))

    @staticmethod
    def cat_rows(parts: list["QTensor"]) -> "QTensor":
        first = parts[0]
        if any((p.bits, p.group_size, p.in_padded) != (first.bits, first.group_size, first.in_padded) for p in parts):
            raise QuantizationError("cannot fuse quantized weights with different bits, group size or input width")
        return replace(first, codes=torch.cat([p.codes for p in parts]), scales=torch.cat([p.scales for p in parts]),
                       zeros=torch.cat([p.zeros for p in parts]))

    def pad_out(self, out_padded: int) -> "QTensor":
        """Append inert output rows up to `out_padded`: scale 0, and zero point and codes
        equal to the first row's zero points (so q - z = 0 whatever the reader does, and a
        symmetric tensor keeps its fixed mid-range zero everywhere)."""
        extra = out_padded - self.out_features
        if extra <= 0:
            return self
        z = self.zeros[:1].expand(extra, -1)
        return replace(
            self,
            codes=torch.cat([self.codes, z.repeat_interleave(self.group_size, 1).to(self.codes.dtype)]),
            scales=torch.cat([self.scales, self.scales.new_zeros(extra, self.scales.shape[1])]),
            zeros=torch.cat([self.zeros, z]),
        )

    def pad_in(self, in_padded: int) -> "QTensor":
        """Zero-pad the input dimension (codes, and whole groups of scales/zeros)."""
        if in_padded == self.in_padded:
            return self
        if in_padded < self.in_padded or in_padded % self.group_size:
            raise QuantizationError(f"cannot pad input width {self.in_padded} to {in_padded} with group size {self.group_size}")
        extra = in_padded - self.in_padded
        ng = extra // self.group_size
        return replace(
            self,
            codes=torch.cat([self.codes, self.codes.new_zeros(self.out_features, extra)], 1),
            scales=torch.cat([self.scales, self.scales.new_zeros(self.out_features, ng)], 1),
            zeros=torch.cat([self.zeros, self.zeros.new_zeros(self.out_features, ng)], 1),
        )

    def rank_in(self, tp: int, rank: int) -> "QTensor":
        """Rank `rank`'s 1/tp slice of the input dimension, on group boundaries."""
        n = self.in_padded // tp
        if self.in_padded % tp or n % self.group_size:
            raise QuantizationError(
                f"input width {self.in_padded} does not split into {tp} ranks on group boundaries of {self.group_size}; "
                "choose a smaller --group-size or --tp"
            )
        g0, g1 = rank * n // self.group_size, (rank + 1) * n // self.group_size
        return replace(
            self,
            codes=self.codes[:, rank * n:(rank + 1) * n],
            scales=self.scales[:, g0:g1],
            zeros=self.zeros[:, g0:g1],
            in_features=min(max(self.in_features - rank * n, 0), n),
        )
