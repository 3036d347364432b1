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


from lmkiln.errors import InputError
from lmkiln.formats.engine import is_engine
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


def read_json(file: Path) -> dict:
    """A metadata file (manifest.json, config.json, lmkiln_export.json) as a dict, or one line
    naming it: verify reads these before loading anything, so a damaged one must not be an internal error."""
    try:
        d = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{file}: not readable JSON ({type(e).__name__}); the file is damaged: re-create it") from None
    if not isinstance(d, dict):
        raise InputError(f"{file}: holds a JSON {type(d).__name__}, not an object; the file is damaged: re-create it")
    return d


def weight_type(path: Path) -> str:
    """fp32/fp16/bf16/int8/int4 of an artifact, for default thresholds."""
    kind = kind_of(path)
    if kind == "engine":
        wt = read_json(Path(path) / "manifest.json").get("weight_type")
        if wt not in ("fp32", "fp16", "bf16", "int8", "int4"):
            raise InputError(f"{Path(path) / 'manifest.json'}: weight_type {wt!r} is not fp32/fp16/bf16/int8/int4; "
                             "the manifest is damaged: re-create the engine")
        return wt
    if kind == "gguf":
        from lmkiln.formats.gguf import WEIGHT_TYPES, GgufFile

        return WEIGHT_TYPES.get(GgufFile(path).get("general.file_type"), "int4")
    if kind == "onnx":
        meta = Path(path) / "lmkiln_export.json"
        if meta.is_file():
            return str(read_json(meta).get("weight_type", "fp32"))
        return onnx_weight_type(Path(path) / "model.onnx")
    cfg = read_json(Path(path) / "config.json")
    q = cfg.get("quantization_config")
    if isinstance(q, dict) and q:
        return f"int{q.get('bits', 4)}"
    return {"float16": "fp16", "bfloat16": "bf16"}.get(str(cfg.get("dtype", cfg.get("torch_dtype", "float32"))), "fp32")


def onnx_weight_type(model_file: Path) -> str:
    """Another exporter's ONNX (e.g. onnxruntime-genai's builder): int4/int8 from its
    MatMulNBits nodes' bits, else fp32 (read without the external weights)."""
    import onnx

    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception:  # unreadable: OnnxRunner says so in one line when it loads it
        return "fp32"
    bits = [next((a.i for a in n.attribute if a.name == "bits"), 4)  # 4: the operator's default
            for n in graph.node if n.op_type == "MatMulNBits"]
    return f"int{min(bits)}" if bits else "fp32"


def vocab_of(path: Path) -> int | None:
    """The vocabulary size an artifact declares, read without loading it (None: not known
    before loading), so a mismatch is refused before any model runs."""
    kind = kind_of(path)
    try:
        if kind == "engine":
            return int(json.loads((Path(path) / "manifest.json").read_text())["model"]["vocab_size"])
        if kind == "hf":
            cfg = json.loads((Path(path) / "config.json").read_text())
            return int(cfg.get("vocab_size") or cfg["text_config"]["vocab_size"])
        if kind == "gguf":
            from lmkiln.formats.gguf import GgufFile

            return int(GgufFile(path).model().vocab)
    except (KeyError, TypeError, ValueError, OSError):
        pass
    return None


def resolve_runner(path: Path, role: str, runner: str = "auto", device: str = "cpu") -> tuple[str, str]:
    """(kind of `path`, runner that will run it), refusing bad combinations in one line
    before anything is loaded."""
    from lmkiln.runtime.session import check_device

    if runner not in RUNNERS:
        raise InputError(f"--runner {runner!r}: choose one of {', '.join(RUNNERS)}")
    check_device(device)
    kind = kind_of(path)
    if kind == "gguf":
        if runner not in ("auto", "torch"):
            raise InputError(f"{path}: a GGUF file runs with --runner auto (its weights dequantized, on the torch engine)")
        return kind, "gguf"
    if runner == "auto":
        runner = {"engine": "torch", "onnx": "onnx", "hf": "transformers" if role == "reference" else "torch"}[kind]
    if runner == "onnx" and kind != "onnx":
        raise InputError(f"{path}: --runner onnx needs an ONNX export folder (run `lmkiln export onnx` first)")
    if runner == "transformers" and kind != "hf":
        raise InputError(f"{path}: the transformers runner needs a Hugging Face directory")
    if runner == "torch" and kind == "onnx":
        raise InputError(f"{path}: an ONNX export runs with --runner onnx (or auto)")
    return kind, runner


@contextlib.contextmanager
def open_runner(path: Path, role: str, runner: str = "auto", device: str = "cpu", check: bool = True,
                dtype: str = "auto") -> Iterator[object]:
    """Yield a Runner for `path`. `role` is "reference" or "candidate"; `check`: an
    engine's weight files are checked against their checksums first; `dtype`: the engine
    runner's compute dtype (runtime.engine_model.runtime_dtype)."""
    from lmkiln.runtime.session import check_device

    kind, runner = resolve_runner(path, role, runner, device)
    dev = check_device(device)  # "auto" and "cuda" become the device itself (cuda:0)
    device = str(dev)
    if runner == "gguf":
        from lmkiln.runtime.gguf_runner import gguf_model

        yield gguf_model(path, device=device)
    elif runner == "onnx":
        from lmkiln.runtime.onnx_runner import OnnxRunner

        yield OnnxRunner(path, provider=dev.type)  # onnxruntime's CUDA provider takes its device from its own options
    elif runner == "transformers":
        from lmkiln.runtime.hf_runner import TransformersRunner

        yield TransformersRunner(path, device=device)
    else:  # the torch engine runner
        from lmkiln.runtime.engine_model import EngineModel
        from lmkiln.runtime.session import engine_dir

        with engine_dir(path) as e:  # checksums verified in background threads while the weights load
            yield EngineModel.from_path(e, dtype=dtype, device=device, check=check)
