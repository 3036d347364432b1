"""An int4/int8 lmkiln engine rewritten as compressed-tensors pack-quantized (vLLM, SGLang):
the engine's codes and scales, un-fused and put back in Hugging Face order (ranks merged,
q/k rows in HF's rotary layout), through the same sink `quantize --to compressed-tensors`
writes with. Nothing is re-quantized: converting an engine gives the bytes quantizing
straight to compressed-tensors gives.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

import lmkiln
from lmkiln.convert.architectures import FFN_IN_ROLES, base_role, is_linear
from lmkiln.convert.hf_to_engine import required_roles
from lmkiln.convert.quantized import rows
from lmkiln.errors import InputError, check_flag, check_path
from lmkiln.export.gguf import global_tensors, gguf_model, layer_tensors
from lmkiln.formats.atomic import atomic_dir, check_output
from lmkiln.formats.awq_gemm import AwqSpec
from lmkiln.formats.engine import WEIGHT_TYPES, Engine
from lmkiln.formats.qtensor import QTensor
from lmkiln.quant.job import LayerResult
from lmkiln.quant.sinks import REPORT, HfQuantSink, compressed_tensors_layout, standard_intermediate, stream

class _EngineCheckpoint:
    """What HfQuantSink reads from a source checkpoint, served from an engine: the source's
    config.json (kept as source_config.json), the global tensors under their HF names,
    the tokenizer files."""

    def __init__(self, engine: Engine, arch, gm):
        self.engine, self.path = engine, engine.path
        self.config = json.loads((engine.path / "source_config.json").read_text(encoding="utf-8"))
        # the GGUF export's reading of the engine's global tensors (HF orientation), by HF name
        self._tensors = {arch.hf_name_of(r): t for r, t in global_tensors(engine, gm).items() if arch.hf_name_of(r)}

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in self.engine.manifest.get("tokenizer_files", []) if (self.path / f).is_file()]


def _fit_in(qt: QTensor, n: int) -> QTensor:
    """Trim whole zero-padded input groups beyond n (an engine pads the FFN width to
    group × tensor-parallel multiples; the standard layout to whole groups only)."""
    if qt.in_padded <= n:
        return qt
    return dataclasses.replace(qt, codes=qt.codes[:, :n], scales=qt.scales[:, :n // qt.group_size],
                               zeros=qt.zeros[:, :n // qt.group_size])


def engine_to_compressed_tensors(source: str | Path, out: str | Path, force: bool = False) -> Path:
    check_path("source", source)
    check_path("out", out)
    check_flag("force", force)
    engine = Engine(source, check=True)
    q = engine.quant
    if q is None:
        raise InputError(f"{engine.path}: an fp engine has no quantized codes to move; quantize the HF model with "
                         "`lmkiln quantize ... --to compressed-tensors`")
    if not (engine.path / "source_config.json").is_file():
        raise InputError(f"{engine.path}: no source_config.json beside the engine; convert the AWQ-GEMM or HF model instead")
    if engine.model.get("num_experts"):  # the engine stacks each layer's experts; nothing here unstacks them yet
        raise InputError(f"{engine.path}: converting a mixture-of-experts engine to compressed-tensors is not supported yet; "
                         "run `lmkiln quantize MODEL --to compressed-tensors`, or convert its AWQ-GEMM directory")
    spec = AwqSpec(bits=q["bits"], group_size=q["group_size"] or -1, zero_point=not q["symmetric"])
    layout = compressed_tensors_layout(spec)
    gm, arch = gguf_model(engine, check=False)
    model = engine.model
    inter_p = standard_intermediate(arch, model, spec, layout)
    gm = dataclasses.replace(gm, n_ff=inter_p)  # gate/up rows fitted to the standard FFN width
    out = check_output(Path(out), force, inputs=(engine.path,))
    ckpt = _EngineCheckpoint(engine, arch, gm)
    _, layer_roles = required_roles(model, arch)
    report = json.loads((engine.path / REPORT).read_text()) if (engine.path / REPORT).is_file() else {}
    report["converted"] = {"from": str(engine.path), "from_format": "lmkiln-engine", "to_format": "compressed-tensors",
                           "lmkiln_version": lmkiln.__version__}
    with atomic_dir(out, force=force, inputs=(engine.path,)) as tmp:
        def layers():
            for i in range(model["num_layer"]):
                t = layer_tensors(engine, i, gm, interleaved=False)  # HF order: ranks merged, q/k rotary rows un-permuted
                for fused, parts in arch.fused.items():  # the engine holds them apart; the HF model fused
                    t[fused] = rows(lambda *w: torch.cat(w, 0), *(t[r] for r in parts))
                # only the FFN's input was padded: the attention's (o's heads x head_dim) may well be wider
                qts = {r: _fit_in(t[r], inter_p) if base_role(r) in FFN_IN_ROLES else t[r] for r in layer_roles if is_linear(r)}
                yield LayerResult(i, qts, {arch.hf_name_of(r, i): t[r] for r in layer_roles if not is_linear(r)})

        dtype = WEIGHT_TYPES[engine.manifest["fp_dtype"]]
        stream(HfQuantSink(tmp, ckpt, arch, model, spec, q.get("method", "awq"), dtype, layout), layers(), report)
    return out
