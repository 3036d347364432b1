"""Tiny quantized checkpoints for the int4/int8 engine tests, built locally.

`build_hf` makes a seeded random transformers model (Llama with GQA, Qwen2 with q/k/v
biases and one kv head, Qwen3 with q/k norms, a hidden size that needs group padding
and tied embeddings). `write_awq` quantizes a checkpoint's linears with plain
round-to-nearest into the AWQ-GEMM layout (what `lmkiln quantize --to hf` writes) and,
alongside, writes the "fake-quantized" fp checkpoint: the same codes dequantized, saved
as ordinary weights. An int4/int8 engine must reproduce the fake-quantized model's
logits, since both hold exactly the same weight values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmkiln.assets import bundled_model_path
from lmkiln.convert.architectures import LINEAR_ROLES, get_architecture
from lmkiln.formats.awq_gemm import PACK, AwqSpec, write_qlinear
from lmkiln.formats.qtensor import QTensor, dequantize
from lmkiln.quant.primitives import compute_qparams, pad_to_multiple, quantize

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

COMMON = dict(vocab_size=512, num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=None)
MODELS = {
    # GQA; FFN width 172 is a multiple of neither 32 nor 64, so w2's input is padded.
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=2)),
    # One kv head: with --tp 2 it is replicated on both ranks.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=1)),
    # hidden 48: padded to whole groups on the input of q/k/v and gate/up; attention width 128
    # (head_dim 32) splits into two ranks of 64-wide groups; tied embeddings.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(hidden_size=48, intermediate_size=100, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   tie_word_embeddings=True)),
}


def copy_tokenizer(dest: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(bundled_model_path() / name, Path(dest) / name)


def build_hf(name: str, path: Path, seed: int = 0) -> Path:
    """A seeded random tiny model of family `name` (see MODELS), saved with save_pretrained."""
    import transformers

    config_cls, model_cls, kw = MODELS[name]
    cfg = getattr(transformers, config_cls)(**COMMON, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in pname:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    path.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(path)
    copy_tokenizer(path)
    return path


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[QTensor, torch.Tensor]:
    """Round-to-nearest quantization of an HF weight (out, in): (QTensor as stored, its dequantized weight).

    The QTensor carries fp16-rounded scales, as the AWQ-GEMM file will, and the
    dequantized weight is computed from exactly those.
    """
    w = w.float()
    in_f = w.shape[1]
    wp = w if group_size == -1 else pad_to_multiple(w, 1, group_size)[0]
    g = wp.shape[1] if group_size == -1 else group_size
    scales, zeros = compute_qparams(wp, bits, group_size, symmetric)
    codes = quantize(wp, scales, zeros, bits, group_size)
    scales16 = scales.half().float()
    qt = QTensor(codes=codes, scales=scales16, zeros=zeros, bits=bits, group_size=g, in_features=in_f)
    return qt, dequantize(codes, scales16, zeros, g)[:, :in_f]


def write_awq(src: Path, awq_dir: Path, fake_dir: Path | None, bits: int, group_size: int, symmetric: bool,
              keep_fp: tuple[str, ...] = ()) -> Path:
    """Quantize every linear of HF checkpoint `src` (RTN) into an AWQ-GEMM checkpoint.

    Modules whose path contains an entry of `keep_fp` stay fp and are listed in
    modules_to_not_convert. With `fake_dir`, also writes the fake-quantized fp model.
    """
    config = json.loads((Path(src) / "config.json").read_text())
    arch = get_architecture(config["architectures"][0])
    tensors = load_file(str(Path(src) / "model.safetensors"))
    linears = {arch.hf_name_of(role, i) for role in LINEAR_ROLES if role in arch.tensors for i in range(config["num_hidden_layers"])}
    out, fake, padded = {}, dict(tensors), False
    for name, w in tensors.items():
        module = name.rsplit(".", 1)[0]
        if name not in linears or any(k in module for k in keep_fp):
            out[name] = w
            continue
        qt, w_hat = rtn(w, bits, group_size, symmetric)
        padded |= qt.in_padded != w.shape[1] or w.shape[0] % PACK[bits] != 0
        out.update({f"{module}.{s}": t for s, t in write_qlinear(qt).items()})
        fake[name] = w_hat.to(w.dtype).contiguous()
    for d in (awq_dir, fake_dir):
        if d is not None:
            Path(d).mkdir(parents=True, exist_ok=True)
            copy_tokenizer(d)
    spec = AwqSpec(bits=bits, group_size=group_size, zero_point=not symmetric, modules_to_not_convert=tuple(keep_fp))
    save_file(out, str(Path(awq_dir) / "model.safetensors"), metadata={"format": "pt"})
    (Path(awq_dir) / "config.json").write_text(json.dumps({**config, "quantization_config": spec.to_config(padded=padded)}, indent=2))
    if fake_dir is not None:
        save_file(fake, str(Path(fake_dir) / "model.safetensors"), metadata={"format": "pt"})
        (Path(fake_dir) / "config.json").write_text(json.dumps(config, indent=2))
    return Path(awq_dir)
