"""Pieces the benchmarks share: synthetic Llama checkpoints and machine facts.

Scripts here import it as `common` (their folder is sys.path[0]); onnx.py and verify.py
drop their folder from sys.path (their names shadow libraries) and load it by path.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path


# The bundled stories260K's tokenizer files, which the synthetic models borrow (vocab 512).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def llama_tensors(hidden: int, heads: int, kv_heads: int, inter: int, vocab: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every LlamaForCausalLM tensor, in checkpoint order."""
    hd = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (heads * hd, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv_heads * hd, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv_heads * hd, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, heads * hd)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def make_synthetic(path: Path, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, dtype: str = "float32",
                   vocab: int = 512) -> Path:
    """A seeded random-init LlamaForCausalLM with the bundled tokenizer (vocab 512), reused if present.

    `dtype`: the dtype on disk ("float32", "bfloat16", "float16"). `vocab` > 512 gives a realistic
    embedding and head; the bundled tokenizer's ids (< 512) stay valid in it."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmkiln.assets import bundled_model_path

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(getattr(torch, dtype))
    path.mkdir(parents=True)
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copyfile(bundled_model_path() / f, path / f)
    return path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine(*packages: str) -> dict:
    """CPU, cores, memory, Python, kernel and the versions of `packages` (for benchmark records)."""
    import os
    from importlib import metadata

    mem = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "mem": mem, "python": platform.python_version()}
    info.update({p: metadata.version(p) for p in packages})
    info["kernel"] = platform.release()
    return info
