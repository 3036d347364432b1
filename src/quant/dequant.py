"""AWQ-GEMM checkpoint -> the equivalent fp ("fake-quantized") checkpoint.

The dequantized weights are what any correct int4/int8 kernel computes with, so the
fp model built from them is the reference for kernel parity and the candidate that
transformers can run for verification.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmkiln.convert.architectures import LINEAR_ROLES, base_role, expand_experts, get_architecture
from lmkiln.convert.hf_config import engine_config_from_hf
from lmkiln.errors import InputError
from lmkiln.formats.awq_gemm import awq_spec, qlinear_shapes, read_qlinear
from lmkiln.formats.hf import HFCheckpoint


def fake_quant_state_dict(awq_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config without quantization_config, fp state dict) of an AWQ-GEMM checkpoint."""
    ckpt = HFCheckpoint(awq_dir)
    spec = awq_spec(ckpt.config)
    if spec is None:
        raise InputError(f"{ckpt.path}: not a quantized checkpoint (no quantization_config)")
    arch = get_architecture(ckpt.architecture)
    m = engine_config_from_hf(arch, ckpt.config)
    from lmkiln.convert.hf_to_engine import role_shapes

    shapes = role_shapes(m)
    sd = {}
    modules = {}
    for i in range(m["num_layer"]):
        for role in expand_experts(LINEAR_ROLES, m.get("num_experts") or 0):  # as the checkpoint holds them: a fused linear, not its members
            name = arch.hf_name_of(role, i) if base_role(role) in arch.tensors else None
            if name is not None:
                modules[name.rsplit(".", 1)[0]] = shapes[role]
    for name in ckpt.keys():
        module, _, suffix = name.rpartition(".")
        if module in modules and suffix in qlinear_shapes(spec, *modules[module]):
            if suffix == spec.code_suffix:
                out_f, in_f = modules[module]
                sd[f"{module}.weight"] = read_qlinear(ckpt.get, module, spec, out_f, in_f).dequantize().to(dtype)
        else:
            sd[name] = ckpt.get(name).to(dtype)
    cfg = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    return cfg, sd


def write_fake_quant_checkpoint(awq_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    cfg, sd = fake_quant_state_dict(awq_dir, dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    for p in HFCheckpoint(awq_dir).tokenizer_files():
        shutil.copyfile(p, out_dir / p.name)
    return out_dir
