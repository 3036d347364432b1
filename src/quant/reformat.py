"""`lmkiln convert to-compressed-tensors`: an AWQ-GEMM checkpoint (lmkiln's, AutoAWQ's,
lmdeploy's) rewritten as compressed-tensors pack-quantized, codes and scales moved
bit-exactly, layer by layer through the same sink `quantize --to compressed-tensors`
uses. Nothing is re-quantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import lmkiln
from lmkiln.convert.architectures import is_linear
from lmkiln.convert.hf_to_engine import CheckpointSource, make_plan, required_roles
from lmkiln.errors import InputError, check_flag, check_path
from lmkiln.formats.atomic import atomic_dir, check_output
from lmkiln.formats.awq_gemm import awq_spec
from lmkiln.formats.hf import HFCheckpoint
from lmkiln.quant.job import LayerResult
from lmkiln.quant.sinks import REPORT, HfQuantSink, compressed_tensors_layout, stream


def awq_to_compressed_tensors(src: str | Path, out: str | Path, force: bool = False) -> Path:
    check_path("src", src)
    check_path("out", out)
    check_flag("force", force)
    ckpt = HFCheckpoint(src)
    spec = awq_spec(ckpt.config)
    if spec is None:
        raise InputError(f"{ckpt.path}: not an AWQ-GEMM checkpoint (no quantization_config); quantize it with "
                         "`lmkiln quantize ... --to compressed-tensors`")
    if spec.layout == "compressed-tensors":
        raise InputError(f"{ckpt.path}: already compressed-tensors; nothing to convert")
    plan = make_plan(ckpt, 1, "auto")  # checks and accounts for every tensor, as `convert hf-to-engine` does
    if plan.quant["unquantized"]:
        raise InputError(f"{ckpt.path}: modules_to_not_convert {list(plan.spec.modules_to_not_convert)} are not supported "
                         "by this conversion yet; quantize the fp model with --to compressed-tensors")
    if plan.spec.bits not in (4, 8):
        raise InputError(f"{ckpt.path}: {plan.spec.bits}-bit weights; compressed-tensors output takes int4 or int8")
    layout = compressed_tensors_layout(plan.spec)
    out = check_output(Path(out), force, inputs=(ckpt.path,))
    source = CheckpointSource(ckpt, plan.arch, plan.model, plan.fp_dtype, plan.quant, plan.spec)
    _, layer_roles = required_roles(plan.model, plan.arch)
    method = (ckpt.config.get("quantization_config") or {}).get("lmkiln_method", "awq")
    report = json.loads((ckpt.path / REPORT).read_text()) if (ckpt.path / REPORT).is_file() else {}
    report["converted"] = {"from": str(ckpt.path), "from_format": "awq-gemm", "to_format": "compressed-tensors",
                           "lmkiln_version": lmkiln.__version__}
    with atomic_dir(out, force=force, inputs=(ckpt.path,)) as tmp:
        def layers():
            for i in range(plan.model["num_layer"]):
                q = {r: source.linear(r, i, "") for r in layer_roles if is_linear(r)}
                fp = {plan.arch.hf_name_of(r, i): source.fp(r, i) for r in layer_roles if not is_linear(r)}
                yield LayerResult(i, q, fp)

        stream(HfQuantSink(tmp, ckpt, plan.arch, plan.model, plan.spec, method, plan.fp_dtype, layout), layers(), report)
    return out
