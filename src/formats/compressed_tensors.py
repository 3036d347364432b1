"""compressed-tensors `pack-quantized`: the layout vLLM and SGLang load natively (what
llm-compressor writes for W4A16 / W8A16).

Per quantized linear `M` (HF module path):

| tensor | dtype | shape |
|---|---|---|
| `M.weight_packed` | int32 | (out, ceil(in · bits / 32)): codes along the input, dense, little-endian |
| `M.weight_scale` | float16 | (out, in / g); (out, 1) per channel |
| `M.weight_zero_point` | int32 | (ceil(out · bits / 32), in / g), packed along the output; asymmetric only |
| `M.weight_shape` | int64 | (2,) = [out, in] |

Values are signed: the code q ∈ [0, 2^b) is stored as q − 2^(b−1) (the packer adds the
offset back), the zero point likewise, and w = (q − z) · s. lmkiln's symmetric scheme
has the fixed zero 2^(b−1), i.e. a signed zero of 0: compressed-tensors' symmetric.
config.json carries `quantization_config` {quant_method: compressed-tensors, format:
pack-quantized, config_groups: {group_0: {targets: [Linear], weights: {num_bits, type:
int, symmetric, strategy: group|channel, group_size}}}, ignore: [lm_head], quantization_status:
compressed}.

The `compressed-tensors` package (the format's own library, an optional extra) builds
the config and packs the codes, so the bytes are the library's by construction; this
module only maps QTensors onto its conventions and back.
"""

from __future__ import annotations

import math

import torch

from lmkiln.errors import CheckpointError, InputError
from lmkiln.formats.qtensor import QTensor

SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
FORMAT = "pack-quantized"


def _lib():
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] != "compressed_tensors":
            raise InputError(f"the compressed-tensors library cannot load: it needs {e.name!r} ({e}); install it") from None
        raise InputError("the compressed-tensors format needs its library, an optional extra: "
                         "pip install 'lmkiln[compressed-tensors]'") from None
    except ImportError as e:  # installed but broken, e.g. a transformers it does not support
        raise InputError(f"the compressed-tensors library is installed but does not load ({e}); install a release "
                         "that matches this transformers: pip install -U 'lmkiln[compressed-tensors]'") from None
    return pack_to_int32, unpack_from_int32


def require() -> None:
    """Fail in one line, before any work, when the library is missing."""
    _lib()


def quantization_config(bits: int, group_size: int, symmetric: bool, ignore: list[str]) -> dict:
    """The config.json block, built by the library's own pydantic models."""
    _lib()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, QuantizationStatus

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, dynamic=False,
                            **({"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}))
    cfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                             format=FORMAT, ignore=ignore, quantization_status=QuantizationStatus.COMPRESSED)
    return cfg.model_dump(mode="json")


def _online_transforms(tc) -> list[str]:
    """The transform groups of a transform_config applied at run time. Rotations fused into the weights
    (location weight_input / weight_output: SpinQuant R1, R2) leave plain weights, which read as any others."""
    if not tc:
        return []
    groups = tc.get("config_groups") if isinstance(tc, dict) else None
    if not isinstance(groups, dict):
        return ["transform_config"]
    fused = ("weight_input", "weight_output")
    return [name for name, t in groups.items()
            if not isinstance(t, dict) or any(not isinstance(a, dict) or a.get("location") not in fused
                                              for a in t.get("apply") or [])]


def spec_of(config: dict) -> tuple[int, int, bool] | None:
    """(bits, group_size, symmetric) of a compressed-tensors checkpoint's config.json, None if it is not one."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "compressed-tensors":
        return None
    if q.get("kv_cache_scheme"):  # k_scale/v_scale per layer: a quantized KV cache lmkiln's runners do not keep
        raise CheckpointError("compressed-tensors with a kv_cache_scheme (a quantized KV cache): lmkiln reads weight-only "
                              "schemes; quantize without the KV cache scheme")
    online = _online_transforms(q.get("transform_config"))
    if online:
        raise CheckpointError(f"compressed-tensors transform {online[0]!r} applies rotations at run time (e.g. QuIP, "
                              "SpinQuant R3/R4): lmkiln runs plain linears; quantize without them")
    cg = q.get("config_groups") or {}
    if not isinstance(cg, dict) or not all(isinstance(g, dict) for g in cg.values()):
        raise CheckpointError(f"config.json: quantization_config.config_groups must map names to objects, not {cg!r}")
    groups = list(cg.values())
    if any(g.get("input_activations") or g.get("output_activations") for g in groups):
        raise CheckpointError("compressed-tensors with quantized activations (e.g. W8A8): lmkiln reads weight-only schemes "
                              "(W4A16, W8A16)")
    if q.get("format") in ("dense", "naive-quantized") or q.get("quantization_status") == "frozen":
        raise CheckpointError(f"compressed-tensors saved uncompressed (format {q.get('format')!r}): re-save it with "
                              "save_compressed=True (pack-quantized)")
    if q.get("format") != FORMAT or len(groups) != 1 or not isinstance(groups[0].get("weights"), dict):
        raise CheckpointError(f"compressed-tensors format {q.get('format')!r} with {len(groups)} config group(s): "
                              f"lmkiln reads {FORMAT} with one group of integer weights")
    w = groups[0]["weights"]
    if w.get("type") != "int" or w.get("num_bits") not in (4, 8) or w.get("strategy") not in ("group", "channel"):
        raise CheckpointError(f"compressed-tensors weights of type {w.get('type')!r}, {w.get('num_bits')!r} bits, strategy "
                              f"{w.get('strategy')!r}: lmkiln reads int4/int8 with group or channel strategy")
    gs = w.get("group_size")
    if w["strategy"] == "group" and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
        raise CheckpointError(f"config.json: compressed-tensors group strategy with group_size {gs!r}; it must be a positive "
                              "whole number")
    # a g_idx tensor per linear permutes the groups' columns ("dynamic": compressed-tensors' alias of "group")
    if w.get("actorder") in ("group", "dynamic", True):
        raise CheckpointError(f"compressed-tensors weights with actorder {w.get('actorder')!r} (a weight_g_idx per linear): "
                              "lmkiln reads groups in column order only")
    ignore = q.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise CheckpointError(f"config.json: quantization_config.ignore must be a list of module names, not {ignore!r}")
    return w["num_bits"], (-1 if w["strategy"] == "channel" else gs), bool(w.get("symmetric"))


# The scale dtypes a reader accepts: the format keeps weight_scale in the model's dtype (llm-compressor's output
# of a bf16 model has bf16 scales); lmkiln writes fp16, and its engines store fp16 scales whatever they read.
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_shapes(bits: int, group_size: int, symmetric: bool, out_f: int, in_f: int) -> dict[str, tuple[torch.dtype, tuple]]:
    """The tensors of one linear of width (out_f, in_f), which must be whole groups."""
    ng = 1 if group_size == -1 else in_f // group_size
    shapes = {"weight_packed": (torch.int32, (out_f, math.ceil(in_f * bits / 32))),
              "weight_scale": (torch.float16, (out_f, ng)),
              "weight_shape": (torch.int64, (2,))}
    if not symmetric:
        shapes["weight_zero_point"] = (torch.int32, (math.ceil(out_f * bits / 32), ng))
    return shapes


def write_linear(qt: QTensor, symmetric: bool) -> dict[str, torch.Tensor]:
    """A QTensor's codes, scales and zeros in the layout above (no re-quantization).
    Its input must be whole groups already (qt.in_padded is the width written)."""
    pack, _ = _lib()
    offset = 1 << (qt.bits - 1)
    out = {"weight_packed": pack((qt.codes.to(torch.int16) - offset).to(torch.int8), qt.bits),
           "weight_scale": qt.scales.to(torch.float16).contiguous(),
           "weight_shape": torch.tensor([qt.out_features, qt.in_padded], dtype=torch.int64)}
    if symmetric:
        if not bool((qt.zeros == offset).all()):
            raise CheckpointError("a symmetric compressed-tensors weight needs the zero point 2^(bits-1) in every group")
    else:
        out["weight_zero_point"] = pack((qt.zeros.to(torch.int16) - offset).to(torch.int8), qt.bits, packed_dim=0)
    return out


def read_linear(get, module: str, bits: int, group_size: int, symmetric: bool) -> QTensor:
    """Module `module`'s tensors (via `get(name)`) as a QTensor; codes as stored."""
    _, unpack = _lib()
    offset = 1 << (bits - 1)
    shape = torch.Size(int(x) for x in get(f"{module}.weight_shape"))
    codes = unpack(get(f"{module}.weight_packed"), bits, shape).to(torch.int16) + offset
    scales = get(f"{module}.weight_scale").float()
    if symmetric:
        zeros = torch.full(scales.shape, offset, dtype=torch.int16)
    else:
        zeros = unpack(get(f"{module}.weight_zero_point"), bits, torch.Size((shape[0], scales.shape[1])), packed_dim=0)
        zeros = zeros.to(torch.int16) + offset
    g = shape[1] if group_size == -1 else group_size
    return QTensor(codes=codes.to(torch.uint8), scales=scales, zeros=zeros.to(torch.int32), bits=bits, group_size=g,
                   in_features=shape[1])
