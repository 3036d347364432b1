"""`lmkiln export onnx`: an engine (or an HF / AWQ-GEMM directory) -> an ONNX decoder
folder that onnxruntime runs, onnxruntime-genai loads and Triton can serve.

    export_onnx(source, out_dir, ep="cpu", portable=False, triton=False, force=False, progress=None) -> Path

See docs/export-onnx.md for the graph, the options and the parity numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

import lmkiln
from lmkiln.errors import InputError, check_callable, check_flag, check_path

MODEL_FILE = "model.onnx"
EXPORT_INFO = "lmkiln_export.json"
EXTERNAL_THRESHOLD = 1 << 30  # weights above 1 GiB go to model.onnx.data (protobuf's limit is 2 GB)
EPS = ("cpu", "cuda")
# MatMulNBits accuracy_level when none is given: int8 activations on CPU (the onnxruntime-genai
# builder's CPU default; docs/export-onnx.md "Accuracy level" has the measured cost), exact on CUDA.
DEFAULT_ACCURACY_LEVEL = {"cpu": 4, "cuda": 0}
HEAD_BITS = (0, 4, 8)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits' accuracy_level: the type its activations are computed in


def default_head_bits(ep: str, accuracy_level: int, quantized: bool, portable: bool) -> int:
    """The output head's bits when none is given: int8 where the CPU graph already runs its int4/int8
    linears on int8 activations (level 4), else fp as in the engine. At a real vocabulary the fp32 head
    is a third of the bytes read per token (vocab 32000: decode 0.665x the onnxruntime-genai builder
    with it, 0.951x with the int8 head) and int8 adds +0.3 % KL on stories260K, about what level 4
    itself adds; the int4 head (the builder's) adds +43 % there: an option. docs/export-onnx.md."""
    return 8 if ep == "cpu" and accuracy_level == 4 and quantized and not portable else 0


def source_summary(engine) -> dict:
    """The manifest subset recorded in the ONNX metadata (key lmkiln.source_manifest)."""
    m = engine.manifest
    return {k: m[k] for k in ("format", "format_version", "weight_type", "fp_dtype", "tensor_parallel", "quantization",
                              "files", "source") if k in m} | {"architecture": m["model"].get("architecture")}


def onnx_unsupported(model: dict, portable: bool = False) -> list[str]:
    """The engine model's features the decoder graph does not build (engine format v2 fields;
    mixture of experts only as onnxruntime's contrib MoE node, not in the portable graph)."""
    from lmkiln.formats.engine import FAMILY_FIELDS

    moe = ("num_experts", "experts_per_token", "norm_topk")
    return [k for k, d in FAMILY_FIELDS.items() if model.get(k, d) != d and k not in moe] + (
        ["mixture of experts in the --portable graph (standard ops have no MoE)"] if model.get("num_experts") and portable else []) + (
        [f"hidden_act {model['hidden_act']}"] if model["hidden_act"] != "silu" else [])


def export_onnx(source, out_dir, ep: str = "cpu", portable: bool = False, triton: bool = False, force: bool = False,
                progress: Callable[[str, int], None] | None = None, accuracy_level: int | None = None,
                head_bits: int | None = None, check: bool = True) -> Path:
    """Export `source` into `out_dir` (atomic; an existing one only with force). Returns out_dir.

    ep "cpu": float32 graph; "cuda": float16 activations and fp weights (same ops).
    portable: standard opset-21 ops only. triton: also lay out model_repository/.
    accuracy_level: MatMulNBits' (0 = dequantize to the activation type, exact; 4 = int8
    activations, faster on CPU); None = DEFAULT_ACCURACY_LEVEL[ep] (4 on CPU, 0 on CUDA).
    head_bits: 0 keeps the output head fp (as in the engine); 4 or 8 quantizes it at
    export (symmetric RTN; int4 in blocks of 32, int8 in blocks of 128 and, on CPU, always at
    accuracy_level 4: smaller and faster, not bit-faithful; docs/export-onnx.md); None =
    `default_head_bits` (8 for a quantized engine on CPU at level 4, else 0).
    """
    from lmkiln.formats.atomic import atomic_dir, check_output
    from lmkiln.formats.engine import Engine
    from lmkiln.runtime.session import engine_dir

    check_path("source", source)
    check_path("out_dir", out_dir)
    for name, v in (("portable", portable), ("triton", triton), ("force", force), ("check", check)):
        check_flag(name, v)
    check_callable("progress", progress)
    if ep not in EPS:
        raise InputError(f"--ep {ep!r}: choose one of {', '.join(EPS)}")
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731  (8.0 and "4" are not levels)
    if head_bits is not None and not (whole(head_bits) and head_bits in HEAD_BITS):
        raise InputError(f"head_bits {head_bits!r}: choose 0 (fp head), 4 or 8")
    if accuracy_level is None:
        accuracy_level = DEFAULT_ACCURACY_LEVEL[ep]
    if not (whole(accuracy_level) and accuracy_level in ACCURACY_LEVELS):  # onnxruntime refuses others only at load
        raise InputError(f"--accuracy-level {accuracy_level!r}: choose one of {', '.join(map(str, ACCURACY_LEVELS))} "
                         "(0 exact, 4 int8 activations)")
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such engine or model directory")
    out_dir = Path(out_dir)
    check_output(out_dir, force, (source,))
    with engine_dir(source) as epath:
        engine = Engine(epath, check=check)  # a corrupt weight file is refused, not exported under its manifest's checksum
        if head_bits is None:
            head_bits = default_head_bits(ep, accuracy_level, engine.quant is not None, portable)
        unsupported = onnx_unsupported(engine.model, portable)
        if unsupported:
            raise InputError(f"{source}: ONNX export of {engine.model['architecture']} is not supported yet: the graph has "
                             f"no {', '.join(unsupported)}; verify or serve the engine, AWQ-GEMM or compressed-tensors output")
        with atomic_dir(out_dir, force=force, inputs=(source,)) as tmp:
            files, dequantized = write_model(engine, tmp, ep, portable, progress, accuracy_level, head_bits)
            side = [f for f in engine.manifest.get("tokenizer_files", []) if (engine.path / f).is_file()]
            for f in side:
                shutil.copyfile(engine.path / f, tmp / f)
            from lmkiln.export.layout import genai_config, write_triton

            # GroupQueryAttention updates a preallocated cache in place; the portable graph concatenates.
            cfg = genai_config(engine.model, ep, share_buffer=not portable)
            (tmp / "genai_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
            # What `lmkiln verify` reads to pick default thresholds and check calibration overlap.
            (tmp / EXPORT_INFO).write_text(json.dumps({
                "weight_type": engine.manifest["weight_type"], "ep": ep, "portable": portable,
                "accuracy_level": accuracy_level, "head_bits": head_bits, "lmkiln_version": lmkiln.__version__,
                "dequantized_linears": dequantized,  # quantized linears exported as float weights, and why
                "tokenizer_class": engine.manifest.get("tokenizer_class"),  # what `verify` loads here (formats/tokenizer.py)
                "source": source_summary(engine)}, indent=1) + "\n", encoding="utf-8")
            if (engine.path / "lmkiln_quant_report.json").is_file():
                shutil.copyfile(engine.path / "lmkiln_quant_report.json", tmp / "lmkiln_quant_report.json")
            if triton:
                import onnx

                write_triton(tmp, onnx.load(str(tmp / MODEL_FILE), load_external_data=False), out_dir.name, ep, files)
    return out_dir


def write_model(engine, out: Path, ep: str, portable: bool, progress, accuracy_level: int,
                head_bits: int = 0) -> tuple[list[str], list[str]]:
    """model.onnx (+ model.onnx.data) in `out`, checked; returns the files written and the
    quantized linears exported dequantized (with why)."""
    import onnx

    from lmkiln.export.onnx_graph import DecoderBuilder, no_cpu_kernel
    from lmkiln.export.store import DATA_FILE, Graph, TensorStore

    dtype = np.float16 if ep == "cuda" else np.float32
    weight_bytes = sum(f["size"] for f in engine.manifest["files"].values())
    if engine.quant is None and dtype == np.float32 and engine.dtype.itemsize == 2:
        weight_bytes *= 2
    if engine.quant is not None and not portable and no_cpu_kernel(engine.quant["bits"], accuracy_level, dtype):
        weight_bytes *= 4  # its int8 linears become float32 weights
    # the rope caches the graph adds (cos and sin, positions x head_dim / 2): 2 GiB alone at a 4M-position
    # context, which a small model may have
    m = engine.model
    weight_bytes += 2 * m["max_position_embeddings"] * (m["size_per_head"] // 2) * np.dtype(dtype).itemsize
    store = TensorStore(out, external=weight_bytes > EXTERNAL_THRESHOLD, progress=progress)
    try:
        b = DecoderBuilder(engine, Graph(store), dtype, portable, accuracy_level, head_bits)
        meta = {
            "lmkiln.version": lmkiln.__version__,
            "lmkiln.graph": "portable" if portable else "contrib",
            "lmkiln.ep": ep,
            "lmkiln.accuracy_level": str(accuracy_level),
            "lmkiln.head_bits": str(head_bits),
            "lmkiln.model": json.dumps(engine.model, sort_keys=True),
            "lmkiln.source_manifest": json.dumps(source_summary(engine), sort_keys=True),
        }
        model = b.build(metadata=meta)
        if b.fallbacks:
            model.metadata_props.add(key="lmkiln.dequantized_linears", value=json.dumps(b.fallbacks))
    finally:
        store.close()
    onnx.save_model(model, str(out / MODEL_FILE))
    del model
    onnx.checker.check_model(str(out / MODEL_FILE))
    files = [MODEL_FILE]
    if store.external:
        files.append(DATA_FILE)
    else:
        (out / DATA_FILE).unlink(missing_ok=True)
    return files, b.fallbacks


__all__ = ["export_onnx"]
