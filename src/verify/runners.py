"""Open any REFERENCE / CANDIDATE path as a Runner (src/runtime/base.py).

| path is                         | reference runner | candidate runner (auto)        |
|---------------------------------|------------------|--------------------------------|
| engine directory (manifest)     | torch engine     | torch engine                   |
| ONNX export (model.onnx)        | onnxruntime      | onnxruntime                    |
| HF directory, fp                | transformers     | torch engine (converted, temp) |
| HF directory, AWQ-GEMM          | transformers (dequantized) | torch engine (converted, temp) |
| GGUF file (`lmkiln export gguf`) | gguf (dequantized) | gguf: its weights dequantized by GGUF's own code, run by the torch engine |
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch

from lmkiln.errors import InputError
from lmkiln.formats.engine import Engine, is_engine
from lmkiln.formats.gguf import is_gguf

RUNNERS = ("auto", "torch", "onnx", "transformers")


def is_onnx_export(path: Path) -> bool:
    return (Path(path) / "model.onnx").is_file()


def kind_of(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if is_engine(path):
        return "engine"
    if is_gguf(path):
        return "gguf"
    if is_onnx_export(path):
        return "onnx"
    if (path / "config.json").is_file():
        return "hf"
    raise InputError(f"{path}: not an engine (manifest.json), an ONNX export (model.onnx), a GGUF file or an HF directory (config.json)")


def weight_type(path: Path) -> str:
    """fp32/fp16/bf16/int8/int4 of an artifact, for default thresholds."""
    kind = kind_of(path)
    if kind == "engine":
        return json.loads((Path(path) / "manifest.json").read_text())["weight_type"]
    if kind == "gguf":
        from lmkiln.formats.gguf import WEIGHT_TYPES, GgufFile

        return WEIGHT_TYPES.get(GgufFile(path).get("general.file_type"), "int4")
    if kind == "onnx":
        meta = Path(path) / "lmkiln_export.json"
        if meta.is_file():
            return json.loads(meta.read_text()).get("weight_type", "fp32")
        return "fp32"
    cfg = json.loads((Path(path) / "config.json").read_text())
    q = cfg.get("quantization_config")
    if q:
        return f"int{q.get('bits', 4)}"
    return {"float16": "fp16", "bfloat16": "bf16"}.get(str(cfg.get("dtype", cfg.get("torch_dtype", "float32"))), "fp32")


@contextlib.contextmanager
def open_runner(path: Path, role: str, runner: str = "auto", device: str = "cpu", check: bool = True) -> Iterator[object]:
    """Yield a Runner for `path`. `role` is "reference" or "candidate"; `check`: an
    engine's weight files are checked against their sha256 first."""
    if runner not in RUNNERS:
        raise InputError(f"--runner {runner!r}: choose one of {', '.join(RUNNERS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available to torch here")
    kind = kind_of(path)
    if kind == "gguf":
        if runner not in ("auto", "torch"):
            raise InputError(f"{path}: a GGUF file runs with --runner auto (its weights dequantized, on the torch engine)")
        from lmkiln.runtime.gguf_runner import gguf_model

        yield gguf_model(path, device=device)
        return
    if runner == "auto":
        runner = {"engine": "torch", "onnx": "onnx", "hf": "transformers" if role == "reference" else "torch"}[kind]
    if runner == "onnx":
        if kind != "onnx":
            raise InputError(f"{path}: --runner onnx needs an ONNX export folder (run `lmkiln export onnx` first)")
        from lmkiln.runtime.onnx_runner import OnnxRunner

        yield OnnxRunner(path, provider=device)
        return
    if runner == "transformers":
        if kind != "hf":
            raise InputError(f"{path}: the transformers runner needs a Hugging Face directory")
        from lmkiln.runtime.hf_runner import TransformersRunner

        yield TransformersRunner(path, device=device)
        return
    # torch engine runner
    if kind == "onnx":
        raise InputError(f"{path}: an ONNX export runs with --runner onnx (or auto)")
    from lmkiln.runtime.engine_model import EngineModel
    from lmkiln.runtime.session import engine_dir

    with engine_dir(path) as e:
        yield EngineModel(Engine(e, check=check), dtype=torch.float32, device=device)


