"""The AWQ-GEMM interchange layout: what `lmkiln quantize --to hf` writes and what
`lmkiln convert hf-to-engine` reads (ours, AutoAWQ's, lmdeploy lite's).

Per quantized linear `M` (HF module path): `M.qweight` int32 (in, out/8), `M.qzeros`
int32 (in/g, out/8), `M.scales` fp16 (in/g, out), `M.bias` when the module has one;
config.json carries `quantization_config = {quant_method: "awq", bits, group_size,
zero_point, version: "gemm", modules_to_not_convert}`.

8-bit has no ecosystem layout; lmkiln writes `version: "lmkiln-gemm-int8"` (four codes
per int32, plain byte order) so other tools refuse it instead of misreading it.
Widths that are not multiples of the group (input) or of the pack width (output) are
zero-padded; the padded shapes are visible in the tensors and flagged in
`quantization_config.lmkiln_padded`, since other loaders require unpadded shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmkiln.errors import CheckpointError, QuantizationError
from lmkiln.formats import compressed_tensors as ct
from lmkiln.formats.packing import from_awq_gemm, round_up, to_awq_gemm
from lmkiln.formats.qtensor import QTensor

SUFFIXES = ("qweight", "qzeros", "scales")
VERSIONS = {4: "gemm", 8: "lmkiln-gemm-int8"}
PACK = {4: 8, 8: 4}  # codes per int32 word


@dataclass(frozen=True)
class AwqSpec:
    """A quantized HF checkpoint's settings. `layout` says how its linears are stored: AWQ-GEMM (this
    module) or compressed-tensors pack-quantized (formats/compressed_tensors.py, read so that lmkiln's
    own output can be inspected and verified); either way the codes become the same QTensors."""
    bits: int
    group_size: int  # -1 = per channel
    zero_point: bool
    modules_to_not_convert: tuple[str, ...] = ()
    layout: str = "awq-gemm"

    @property
    def code_suffix(self) -> str:
        """The tensor that marks a linear as quantized (`M.qweight` / `M.weight_packed`)."""
        return "qweight" if self.layout == "awq-gemm" else "weight_packed"

    def to_config(self, padded: bool, extra: dict | None = None) -> dict:
        cfg = {
            "quant_method": "awq",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "version": VERSIONS[self.bits],
            "modules_to_not_convert": list(self.modules_to_not_convert) or None,
        }
        if padded:
            cfg["lmkiln_padded"] = True
        if extra:
            cfg.update(extra)
        return cfg


def awq_spec(config: dict) -> AwqSpec | None:
    """The AWQ settings of a checkpoint's config.json, None if it is not quantized."""
    q = config.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"config.json: quantization_config must be an object (e.g. {{\"quant_method\": \"awq\", ...}}), not {q!r}")
    method = str(q.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        bits, group_size, symmetric = ct.spec_of(config)
        # ignore entries are module names or "re:" regexes, which `listed` (convert/quantized.py) matches
        ignore = tuple(str(x).removeprefix("re:") for x in q.get("ignore") or ())
        return AwqSpec(bits=bits, group_size=group_size, zero_point=not symmetric, modules_to_not_convert=ignore,
                       layout="compressed-tensors")
    version = str(q.get("version", "gemm")).lower()
    bits = q.get("bits", q.get("w_bit"))
    if method != "awq" or bits not in VERSIONS or version != VERSIONS[bits]:
        raise CheckpointError(
            f"quantization_config {method!r} version {version!r} bits {bits!r} is not supported; lmkiln reads AWQ-GEMM 4-bit "
            "(AutoAWQ/lmdeploy/lmkiln) and lmkiln's 8-bit layout"
        )
    gs = q.get("group_size", q.get("q_group_size", 128))
    if isinstance(gs, bool) or not isinstance(gs, int):
        raise CheckpointError(f"config.json: quantization_config.group_size must be a whole number (-1: per channel), "
                              f"not {gs!r}")
    skip = q.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(x, str) for x in skip):
        raise CheckpointError(f"config.json: quantization_config.modules_to_not_convert must be a list of module names, "
                              f"not {skip!r}")
    return AwqSpec(bits=bits, group_size=gs, zero_point=bool(q.get("zero_point", True)), modules_to_not_convert=tuple(skip))


def qlinear_shapes(spec: AwqSpec, out_features: int, in_features: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The stored tensors of one quantized linear, by suffix: (dtype, shape)."""
    if spec.layout == "compressed-tensors":
        return ct.linear_shapes(spec.bits, spec.group_size, not spec.zero_point, out_features, in_features)
    g = in_features if spec.group_size == -1 else spec.group_size
    i_p, o_p = round_up(in_features, g), round_up(out_features, PACK[spec.bits])
    return {"qweight": (torch.int32, (i_p, o_p // PACK[spec.bits])), "qzeros": (torch.int32, (i_p // g, o_p // PACK[spec.bits])),
            "scales": (torch.float16, (i_p // g, o_p))}


def read_dtypes(spec: AwqSpec, suffix: str, dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes a reader accepts for tensor `suffix` (written as `dtype`, see qlinear_shapes): compressed-tensors
    keeps weight_scale in the model's dtype."""
    return ct.SCALE_DTYPES if spec.layout == "compressed-tensors" and suffix == "weight_scale" else (dtype,)


def read_qlinear(get, module: str, spec: AwqSpec, out_features: int, in_features: int) -> QTensor:
    """Unpack module `module` (via `get(name) -> tensor`) into a QTensor without output padding."""
    if spec.layout == "compressed-tensors":
        try:
            qt = ct.read_linear(get, module, spec.bits, spec.group_size, not spec.zero_point)
        except (ValueError, RuntimeError, QuantizationError) as e:  # a weight_shape that does not fit the packed codes
            raise CheckpointError(f"{module}: {' '.join(str(e).split())[:200]}; the compressed-tensors checkpoint is "
                                  "damaged: re-quantize it") from None
        # wider only where lmkiln zero-padded the FFN to whole groups (the caller asks for the source's width)
        if qt.out_features < out_features or qt.in_features < in_features:
            raise CheckpointError(f"{module}.weight_shape is {[qt.out_features, qt.in_features]}, config.json implies "
                                  f"{[out_features, in_features]}")
        if not bool(torch.isfinite(qt.scales.to(torch.float16)).all()):  # (the engine stores fp16 scales)
            raise CheckpointError(f"{module}.weight_scale contains NaN or Inf values (or ones beyond fp16's range); the "
                                  "checkpoint is damaged: re-quantize it")
        return dataclasses.replace(qt.map_rows(lambda t: t[:out_features]), in_features=in_features)
    g = in_features if spec.group_size == -1 else spec.group_size
    qweight, qzeros, scales = (get(f"{module}.{s}") for s in SUFFIXES)
    if scales.is_floating_point() and not bool(torch.isfinite(scales).all()):  # every output would carry them, exit 0
        raise CheckpointError(f"{module}.scales contains NaN or Inf values; the AWQ checkpoint is damaged: re-quantize it")
    codes, sc, z = from_awq_gemm(qweight, qzeros, scales, g, bits=spec.bits)
    qt = QTensor(codes=codes, scales=sc, zeros=z, bits=spec.bits, group_size=g, in_features=in_features)
    return qt.map_rows(lambda t: t[:out_features])


def write_qlinear(qt: QTensor) -> dict[str, torch.Tensor]:
    """QTensor -> {qweight, qzeros, scales}, padding the output width to the pack width."""
    qt = qt.pad_out(round_up(qt.out_features, PACK[qt.bits]))
    return to_awq_gemm(qt.codes, qt.scales, qt.zeros, bits=qt.bits)
