"""The quantized side of `convert hf-to-engine`: AWQ-GEMM linears -> int4/int8 engine tensors.

Quantized weights travel bit-exactly: codes, scales and zeros are unpacked from the
checkpoint into QTensors, moved by the very transforms the fp path uses (row
transforms act on codes, scales and zeros alike, since all three are output-major),
and repacked in the engine layout of docs/engine-format.md. Nothing is requantized.

Per-channel quantization (group_size -1) has one group per output channel and tensor;
a tensor-parallel input split then gives every rank the whole row's scale and zero,
so those are kept, not sliced (see `rank_in`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable

import torch

from lmkiln.convert.architectures import Architecture
from lmkiln.convert.transforms import pad_cols, rank_cols
from lmkiln.errors import CheckpointError, InputError
from lmkiln.formats.awq_gemm import AwqSpec
from lmkiln.formats.engine import quant_layout
from lmkiln.formats.packing import pack_int4
from lmkiln.formats.qtensor import QTensor

# Engine linear (per layer, see LINEAR_KINDS in formats/engine.py) <- the HF linear roles fused into it.
ENGINE_LINEARS = {
    "attention.w_qkv": ("q", "k", "v"),
    "attention.wo": ("o",),
    "feed_forward.w13": ("gate", "up"),
    "feed_forward.w2": ("down",),
}


def engine_linears(model: dict) -> dict[str, tuple[str, ...]]:
    """ENGINE_LINEARS of this model: a mixture-of-experts layer stacks every expert's gate/up
    into `moe.w13` and downs into `moe.w2`, which are quantized alike or not at all."""
    n = model.get("num_experts") or 0
    if not n:
        return ENGINE_LINEARS
    return {"attention.w_qkv": ("q", "k", "v"), "attention.wo": ("o",),
            "moe.w13": tuple(f"{r}.{e}" for e in range(n) for r in ("expert_gate", "expert_up")),
            "moe.w2": tuple(f"expert_down.{e}" for e in range(n))}


def module_name(arch: Architecture, role: str, layer: int) -> str:
    """The HF module of a linear role, e.g. 'model.layers.0.self_attn.q_proj'."""
    return arch.hf_name_of(role, layer).rsplit(".", 1)[0]


def listed(module: str, patterns: tuple[str, ...]) -> bool:
    """Whether `modules_to_not_convert` names `module`.

    AutoAWQ matches entries as substrings, transformers as a prefix up to a module
    boundary, a regex, or a suffix; a module either tool would leave unquantized counts.
    """
    for p in patterns:
        if p in module:
            return True
        try:
            if re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", module):
                return True
        except re.error:
            pass
    return False


def is_quantized(ckpt, arch: Architecture, role: str, layer: int, spec: AwqSpec) -> bool:
    """A linear is quantized unless the checkpoint holds its fp `.weight` instead of a
    `.qweight` (`.weight_packed`), which it may only for a module that modules_to_not_convert
    (compressed-tensors: ignore) lists."""
    module = module_name(arch, role, layer)
    if f"{module}.{spec.code_suffix}" in ckpt or f"{module}.weight" not in ckpt:
        return True  # a missing qweight is reported by the accounting
    if not listed(module, spec.modules_to_not_convert):
        key = "modules_to_not_convert" if spec.layout == "awq-gemm" else "ignore"
        raise CheckpointError(
            f"{ckpt.path}: {module} has an fp .weight but no .{spec.code_suffix}, and quantization_config.{key} "
            f"{list(spec.modules_to_not_convert)} does not list it; the checkpoint is inconsistent"
        )
    return False


def unquantized_linears(ckpt, arch: Architecture, model: dict, spec: AwqSpec) -> list[str]:
    """Engine linears kept fp, e.g. ['layers.0.feed_forward.w2']; fused roles must agree."""
    out = []
    for i in range(model["num_layer"]):
        for kind, roles in engine_linears(model).items():
            status = {r: is_quantized(ckpt, arch, r, i, spec) for r in roles}
            if len(set(status.values())) > 1:
                raise CheckpointError(
                    f"{ckpt.path}: layer {i}: {', '.join(r for r, q in status.items() if q)} quantized but "
                    f"{', '.join(r for r, q in status.items() if not q)} not; the engine fuses them into one {kind} weight, "
                    "so they must be quantized alike"
                )
            if not any(status.values()):
                out.append(f"layers.{i}.{kind}")
    return out


def resolve_quant(spec: AwqSpec, qcfg: dict, model: dict, tp: int, unquantized: list[str]) -> dict:
    """The manifest's `quantization` block; sets model['inter_size_padded']."""
    channel = spec.group_size == -1
    g = None if channel else spec.group_size
    if g is not None and g < 1:
        raise CheckpointError(f"quantization_config.group_size {spec.group_size} must be positive or -1 (per channel)")
    width = model["head_num"] * model["size_per_head"]
    if g is not None and (width // tp) % g:
        raise InputError(
            f"--tp {tp}: each rank's share of the attention output ({width} / {tp} = {width // tp}) must be a whole number "
            f"of the checkpoint's {g}-wide groups; use a smaller --tp, or quantize with a --group-size that divides {width // tp}"
        )
    if spec.bits == 4 and model["hidden_units"] % 2:
        raise InputError(f"int4 engines pack two columns per byte; hidden size {model['hidden_units']} is odd")
    hidden_p, model["inter_size_padded"] = quant_layout(model, tp, g)
    return {
        "bits": spec.bits,
        "group_size": g,
        "granularity": "channel" if channel else "group",
        "requested_group_size": spec.group_size,
        "symmetric": not spec.zero_point,
        "method": qcfg.get("lmkiln_method") or qcfg.get("quant_method"),  # rtn/awq as lmkiln wrote it, else the format name
        "source_layout": spec.layout,
        "hidden_padded": hidden_p,
        "unquantized": unquantized,
    }


def check_symmetric(qt: QTensor, spec: AwqSpec, module: str) -> None:
    """A checkpoint that declares zero_point=false must carry the fixed mid-range zero."""
    if not spec.zero_point and not bool((qt.zeros == 2 ** (spec.bits - 1)).all()):
        raise CheckpointError(f"{module}: quantization_config says zero_point=false, but its zeros are not all {2 ** (spec.bits - 1)}")


# -- transforms on fp tensors and QTensors alike -------------------------------------------


def rows(fn: Callable[..., torch.Tensor], *ws):
    """Apply an output-dimension transform of one or more weights (all fp, or all QTensors)."""
    if not isinstance(ws[0], QTensor):
        return fn(*ws)
    return replace(ws[0], codes=fn(*(w.codes for w in ws)), scales=fn(*(w.scales for w in ws)), zeros=fn(*(w.zeros for w in ws)))


def pad_in(w, cols: int, channel: bool):
    """Zero-pad the input dimension (HF dim 1) to `cols`."""
    if not isinstance(w, QTensor):
        return pad_cols(w, cols)
    if not channel:
        return w.pad_in(cols)
    if cols == w.in_padded:
        return w
    # One group per row: pad with the row's zero point so the new columns dequantize to 0,
    # and let the group grow to the new width.
    extra = w.zeros.to(w.codes.dtype).expand(-1, cols - w.in_padded)
    return replace(w, codes=torch.cat([w.codes, extra], 1), group_size=cols)


def rank_in(w, tp: int, rank: int, channel: bool):
    """Rank `rank`'s slice of the input dimension."""
    if not isinstance(w, QTensor):
        return rank_cols(w, tp, rank)
    if not channel:
        return w.rank_in(tp, rank)
    n = w.in_padded // tp
    # A row's single scale/zero holds for any part of the row, so every rank keeps them whole.
    return replace(w, codes=w.codes[:, rank * n:(rank + 1) * n], group_size=n,
                   in_features=min(max(w.in_features - rank * n, 0), n))


def engine_tensors(name: str, w) -> list[tuple[str, torch.Tensor]]:
    """One rank's linear (HF orientation) as engine tensors: an fp weight as it is, (out, in)
    (format v4 stores them so: no transpose); a quantized one's codes/scales/zeros (in, out)."""
    if not isinstance(w, QTensor):
        return [(f"{name}.weight", w.contiguous())]
    codes = w.codes.t().contiguous()
    return [
        (f"{name}.qweight", pack_int4(codes) if w.bits == 4 else codes.to(torch.uint8)),
        (f"{name}.scales", w.scales.t().to(torch.float16).contiguous()),
        (f"{name}.zeros", w.zeros.t().to(torch.uint8).contiguous()),
    ]
