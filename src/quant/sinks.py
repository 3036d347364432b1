"""Sinks: where finished layers go. A sink takes LayerResults in layer order and writes
one output format, streaming: `begin` writes what precedes the layers (and plans every
tensor up front, so each file's header is final before its first byte), `add` writes a
layer as soon as it is done, `finish` writes the rest. Sinks never quantize: they take
QTensors and move their codes bit-exactly.

- HfQuantSink: a Hugging Face directory, one model.safetensors, config.json with
  quantization_config, tokenizer files; its linears in AWQ-GEMM (formats/awq_gemm.py,
  `--to hf`) or compressed-tensors pack-quantized (formats/compressed_tensors.py, what
  vLLM and SGLang load).
- EngineSink: an int4/int8 lmkiln engine (formats/engine.py), through the converter's
  own per-layer producer, so no AWQ-GEMM checkpoint is written and read back.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from lmkiln.convert.architectures import LINEAR_ROLES, Architecture, is_linear
from lmkiln.convert.hf_to_engine import (
    Accounting, CheckpointSource, EnginePlan, engine_manifest, member_linear, produce_head, produce_layer, produce_tail, required_roles,
    role_shapes,
)
from lmkiln.convert.quantized import module_name, resolve_quant
from lmkiln.errors import InputError
from lmkiln.formats import compressed_tensors as ct
from lmkiln.formats.awq_gemm import PACK, AwqSpec, qlinear_shapes, write_qlinear
from lmkiln.formats.packing import round_up
from lmkiln.formats.engine import EngineWriter, copy_side_files, expected_tensors, write_manifest
from lmkiln.formats.hf import QUANT_REPORT, HFCheckpoint
from lmkiln.formats.qtensor import QTensor
from lmkiln.formats.safetensors_io import StreamWriter
from lmkiln.quant.job import LayerResult

REPORT = QUANT_REPORT


class Sink:
    def begin(self) -> None: ...

    def add(self, res: LayerResult) -> None: ...

    def finish(self, report: dict) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class LinearLayout:
    """How one HF-directory format stores a quantized linear: the part that differs
    between AWQ-GEMM and compressed-tensors (everything else is HfQuantSink's)."""

    flag: str  # the --to value, for messages
    out_multiple: int  # output widths must be multiples of this (codes packed along the output)
    shapes: Callable[[int, int], dict[str, tuple[torch.dtype, tuple]]]  # (out, in) -> {suffix: (dtype, shape)}
    pack: Callable[[LayerResult, str, QTensor], dict[str, torch.Tensor]]  # (result, role, padded QTensor) -> tensors
    config: Callable[[str], dict]  # method -> quantization_config


def awq_gemm_layout(spec: AwqSpec) -> LinearLayout:
    def shapes(out_f, in_f):
        return qlinear_shapes(spec, out_f, in_f)

    def pack(res, role, qt):
        # packed once per layer and shared with the resume state, unless the FFN width was padded here
        return res.awq_gemm(role) if qt is res.qtensors[role] else write_qlinear(qt)

    return LinearLayout("hf", PACK[spec.bits], shapes, pack, lambda method: spec.to_config(False, {"lmkiln_method": method}))


def compressed_tensors_layout(spec: AwqSpec) -> LinearLayout:
    sym = not spec.zero_point
    ct.require()

    def shapes(out_f, in_f):
        return ct.linear_shapes(spec.bits, spec.group_size, sym, out_f, in_f)

    def config(method):
        return {**ct.quantization_config(spec.bits, spec.group_size, sym, ["lm_head"]), "lmkiln_method": method}

    return LinearLayout("compressed-tensors", 1, shapes, lambda res, role, qt: ct.write_linear(qt, sym), config)


def standard_intermediate(arch: Architecture, model: dict, spec: AwqSpec, layout: LinearLayout) -> int:
    """The FFN width of a standard HF output, or a one-line refusal.

    HF readers (transformers, vLLM, SGLang, lmdeploy) take the shapes from config.json,
    so every input width must be whole groups (and, for AWQ-GEMM, every output width
    whole int32 words). The FFN's intermediate width alone can be zero-padded exactly
    (extra gate/up rows output 0, act(0)·0 = 0, extra down columns are 0), so it is padded
    to whole groups and config.json gets the padded value; any other width that does not
    fit is refused, naming the tensor and the group sizes that would work."""
    shapes = role_shapes(model)
    wider = role_shapes(dict(model, inter_size=model["inter_size"] + 1))  # the dims that follow inter_size
    linears = [r for r in LINEAR_ROLES if r in arch.tensors]
    m, g, inter = layout.out_multiple, spec.group_size, model["inter_size"]
    inter_p = round_up(inter, m if g == -1 else g)
    if inter_p % m or (g == -1 and inter_p != inter):
        raise InputError(f"--to {layout.flag}: per-channel scales need intermediate_size ({inter}) to be a multiple of {m} "
                         "(codes per int32), since a channel's one group cannot be padded" if g == -1 else
                         f"--to {layout.flag}: intermediate_size {inter} padded to whole groups of {g} is not whole int32 words "
                         f"of {m} codes")
    if inter_p != inter and arch.fused_parent("gate"):
        raise InputError(f"--to {layout.flag}: intermediate_size {inter} is not whole groups of {g}, and the fused "
                         f"{arch.tensors[arch.fused_parent('gate')].replace('.{i}.', '.*.')} cannot be padded in place")
    for r in linears:
        (out_f, in_f), (out_w, in_w) = shapes[r], wider[r]
        where = f"{module_name(arch, r, 0).replace('.0.', '.*.')}.weight"
        if in_f == in_w and g != -1 and in_f % g:
            raise InputError(f"--to {layout.flag}: {where} has input width {in_f}, not a multiple of --group-size {g} "
                             "(its readers need whole groups)")
        if out_f == out_w and out_f % m:
            raise InputError(f"--to {layout.flag}: {where} has output width {out_f}, not a multiple of {m} (codes per int32)")
    return inter_p


class HfQuantSink(Sink):
    """A Hugging Face directory with quantized linears (AWQ-GEMM or compressed-tensors):
    one model.safetensors streamed layer by layer, config.json with the format's
    quantization_config and the standard (padded) FFN width, tokenizer files, report."""

    def __init__(self, out: Path, ckpt: HFCheckpoint, arch: Architecture, model: dict, spec: AwqSpec,
                 method: str, dtype: torch.dtype, layout: LinearLayout):
        self.out, self.ckpt, self.arch, self.model, self.spec, self.method, self.dtype = out, ckpt, arch, model, spec, method, dtype
        self.layout = layout
        glob, self.layer_roles = required_roles(model, arch)
        self.tail = [arch.hf_name_of(r) for r in glob[1:]]
        self.inter_p = standard_intermediate(arch, model, spec, layout)
        self.shapes = role_shapes(dict(model, inter_size=self.inter_p))  # as config.json will say
        specs = [(arch.hf_name_of("embed"), dtype, tuple(ckpt.shape(arch.hf_name_of("embed"))))]
        for i in range(model["num_layer"]):
            for role in self.layer_roles:
                name = arch.hf_name_of(role, i)
                if not is_linear(role):
                    specs.append((name, dtype, self.shapes[role]))
                    continue
                module = module_name(arch, role, i)
                specs += [(f"{module}.{k}", dt, shape) for k, (dt, shape) in layout.shapes(*self.shapes[role]).items()]
        specs += [(n, dtype, tuple(ckpt.shape(n))) for n in self.tail]
        self.specs = specs

    def begin(self) -> None:
        self.w = StreamWriter(self.out / "model.safetensors", self.specs, {"format": "pt"})
        name = self.arch.hf_name_of("embed")
        self.w.write(name, self.ckpt.get(name).to(self.dtype))

    def add(self, res: LayerResult) -> None:
        i = res.index
        for role in self.layer_roles:
            name = self.arch.hf_name_of(role, i)
            if is_linear(role):
                module = module_name(self.arch, role, i)
                qt = res.qtensors[role]
                out_p = self.shapes[role][0]
                qt = qt if round_up(qt.out_features, self.layout.out_multiple) == out_p else qt.pad_out(out_p)
                for k, v in self.layout.pack(res, role, qt).items():
                    self.w.write(f"{module}.{k}", v.contiguous())
            else:
                self.w.write(name, res.fp[name].to(self.dtype).contiguous())

    def finish(self, report: dict) -> None:
        for n in self.tail:
            self.w.write(n, self.ckpt.get(n).to(self.dtype))
        self.w.close()
        cfg = dict(self.ckpt.config)
        if self.inter_p != self.model["inter_size"]:
            key = self.arch.config["inter_size"]
            cfg[key if isinstance(key, str) else key[0]] = self.inter_p
            report["padding"] = {"intermediate_size": {"source": self.model["inter_size"], "written": self.inter_p,
                                                       "why": "zero rows/columns: whole groups, exact for gated MLPs"}}
        cfg["quantization_config"] = self.layout.config(self.method)
        (self.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for p in self.ckpt.tokenizer_files():
            shutil.copyfile(p, self.out / p.name)
        (self.out / REPORT).write_text(json.dumps(report, indent=1))

    def abort(self) -> None:
        if hasattr(self, "w"):
            self.w.abort()


class _ResultSource:
    """The converter's tensor source for one finished layer: its QTensors and fp tensors,
    everything else (embedding, final norm, head) from the checkpoint."""

    def __init__(self, base: CheckpointSource, res: LayerResult | None = None):
        self.base, self.res = base, res

    def fp(self, role: str, i: int | None = None) -> torch.Tensor:
        name = self.base.arch.hf_name_of(role, i)
        if self.res is not None and name in self.res.fp:
            return self.res.fp[name].to(self.base.out_dtype)
        return self.base.fp(role, i)

    def linear(self, role: str, i: int, kind: str):
        return member_linear(self.base.arch, self.base.model, role, self.res.qtensors.__getitem__)


class EngineSink(Sink):
    def __init__(self, out: Path, ckpt: HFCheckpoint, arch: Architecture, model: dict, spec: AwqSpec,
                 method: str, dtype: torch.dtype, acc: Accounting):
        self.out, self.ckpt, self.arch = out, ckpt, arch
        self.model = dict(model)
        qcfg = spec.to_config(False, {"lmkiln_method": method})
        quant = resolve_quant(spec, qcfg, self.model, 1, [])
        quant["source_layout"] = None  # quantized straight to the engine: no interchange layout was read
        tensors = expected_tensors(self.model, 1, self.model["inter_size_padded"], dtype, quant)
        self.plan = EnginePlan(arch, self.model, acc, tensors, dtype, ckpt.source_dtype, spec, quant)
        self.src = _ResultSource(CheckpointSource(ckpt, arch, self.model, dtype))

    def _write(self, items) -> None:
        for name, t in items:
            self.writer.write(name, t)

    def begin(self) -> None:
        self.writer = EngineWriter(self.out, self.plan.tensors)
        self._write(produce_head(self.src, self.model))

    def add(self, res: LayerResult) -> None:
        self._write(produce_layer(_ResultSource(self.src.base, res), self.model, res.index, tp=1,
                                  quant=self.plan.quant))

    def finish(self, report: dict) -> None:
        self._write(produce_tail(self.src, self.model))
        files = self.writer.close()
        side = copy_side_files(self.ckpt.tokenizer_files(), self.out)
        (self.out / REPORT).write_text(json.dumps(report, indent=1))
        shutil.copyfile(self.ckpt.path / "config.json", self.out / "source_config.json")
        write_manifest(self.out, engine_manifest(self.plan, self.ckpt, 1, files, side))

    def abort(self) -> None:
        if hasattr(self, "writer"):
            self.writer.abort()


def stream(sink: Sink, layers: Iterable[LayerResult], report: dict) -> None:
    """A whole output from finished layers (the converters' job): begin, each layer, finish;
    on any failure the sink aborts, leaving nothing half-written."""
    try:
        sink.begin()
        for res in layers:
            sink.add(res)
        sink.finish(report)
    except BaseException:
        sink.abort()
        raise


LAYOUTS = {"hf": awq_gemm_layout, "compressed-tensors": compressed_tensors_layout}
TARGETS = ("hf", "engine", "compressed-tensors")  # --to


def make_sink(to: str, out: Path, ckpt: HFCheckpoint, arch: Architecture, model: dict, spec: AwqSpec,
              method: str, dtype: torch.dtype, acc: Accounting) -> Sink:
    if to == "engine":
        return EngineSink(out, ckpt, arch, model, spec, method, dtype, acc)
    return HfQuantSink(out, ckpt, arch, model, spec, method, dtype, LAYOUTS[to](spec))

