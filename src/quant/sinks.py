"""Sinks: where finished layers go. A sink takes LayerResults in layer order and writes
one output format, streaming: `begin` writes what precedes the layers (and plans every
tensor up front, so each file's header is final before its first byte), `add` writes a
layer as soon as it is done, `finish` writes the rest. Sinks never quantize: they take
QTensors and move their codes bit-exactly.

- AwqGemmSink: the AWQ-GEMM Hugging Face layout (formats/awq_gemm.py), one
  model.safetensors, config.json with quantization_config, tokenizer files.
- EngineSink: an int4/int8 lmkiln engine (formats/engine.py), through the converter's
  own per-layer producer, so no AWQ-GEMM checkpoint is written and read back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lmkiln.convert.architectures import LINEAR_ROLES, Architecture
from lmkiln.convert.hf_to_engine import (
    Accounting, CheckpointSource, EnginePlan, engine_manifest, produce_head, produce_layer, produce_tail, required_roles,
    role_shapes,
)
from lmkiln.convert.quantized import module_name, resolve_quant
from lmkiln.formats.awq_gemm import AwqSpec, qlinear_shapes
from lmkiln.formats.engine import EngineWriter, copy_side_files, expected_tensors, write_manifest
from lmkiln.formats.hf import HFCheckpoint
from lmkiln.formats.safetensors_io import StreamWriter
from lmkiln.quant.job import LayerResult

REPORT = "lmkiln_quant_report.json"


class Sink:
    def begin(self) -> None: ...

    def add(self, res: LayerResult) -> None: ...

    def finish(self, report: dict) -> None: ...

    def abort(self) -> None: ...


class AwqGemmSink(Sink):
    def __init__(self, out: Path, ckpt: HFCheckpoint, arch: Architecture, model: dict, spec: AwqSpec,
                 method: str, dtype: torch.dtype):
        self.out, self.ckpt, self.arch, self.model, self.spec, self.method, self.dtype = out, ckpt, arch, model, spec, method, dtype
        glob, self.layer_roles = required_roles(model)
        self.tail = [arch.hf_name_of(r) for r in glob[1:]]
        shapes = role_shapes(model)
        specs = [(arch.hf_name_of("embed"), dtype, tuple(ckpt.shape(arch.hf_name_of("embed"))))]
        self.padded = False
        for i in range(model["num_layer"]):
            for role in self.layer_roles:
                name = arch.hf_name_of(role, i)
                if role not in LINEAR_ROLES:
                    specs.append((name, dtype, shapes[role]))
                    continue
                module = module_name(arch, role, i)
                qs = qlinear_shapes(spec, *shapes[role])
                for k, dt in (("qweight", torch.int32), ("qzeros", torch.int32), ("scales", torch.float16)):
                    specs.append((f"{module}.{k}", dt, qs[k]))
                out_f, in_f = shapes[role]
                self.padded |= qs["qweight"][0] != in_f or qs["scales"][1] != out_f
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
            if role in LINEAR_ROLES:
                module = module_name(self.arch, role, i)
                for k, v in res.awq_gemm(role).items():
                    self.w.write(f"{module}.{k}", v)
            else:
                self.w.write(name, res.fp[name].to(self.dtype).contiguous())

    def finish(self, report: dict) -> None:
        for n in self.tail:
            self.w.write(n, self.ckpt.get(n).to(self.dtype))
        self.w.close()
        cfg = dict(self.ckpt.config)
        cfg["quantization_config"] = self.spec.to_config(self.padded, {"lmkiln_method": self.method})
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
        return self.res.qtensors[role]


class EngineSink(Sink):
    def __init__(self, out: Path, ckpt: HFCheckpoint, arch: Architecture, model: dict, spec: AwqSpec,
                 method: str, dtype: torch.dtype, acc: Accounting):
        self.out, self.ckpt, self.arch = out, ckpt, arch
        self.model = dict(model)
        qcfg = spec.to_config(False, {"lmkiln_method": method})
        quant = resolve_quant(spec, qcfg, self.model, 1, [])
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


def make_sink(to: str, out: Path, ckpt: HFCheckpoint, arch: Architecture, model: dict, spec: AwqSpec,
              method: str, dtype: torch.dtype, acc: Accounting) -> Sink:
    if to == "engine":
        return EngineSink(out, ckpt, arch, model, spec, method, dtype, acc)
    return AwqGemmSink(out, ckpt, arch, model, spec, method, dtype)

