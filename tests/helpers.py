"""Shared helpers for the tests: tiny random Hugging Face models built locally, and
byte-level tampering of safetensors files and engine manifests.

Nothing here touches the network: models come from transformers config classes with
a seeded random init and are written with `save_pretrained`; the tokenizer files are
copied from the bundled stories260K model (vocab 512, so the tiny models use 512 too).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lmkiln.assets import bundled_model_path  # noqa: E402

BUNDLED = bundled_model_path()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
VOCAB = 512

ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Families with their own quirks (tests/test_families.py runs every table entry).
FAMILY_ARCHS = ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM")

# What each family's tiny model sets beyond BASE so its quirks are exercised at 12 tokens:
# windows shorter than the prompt, local/global layers, soft-caps that bite, a scale that is
# not head_dim's, per-layer-type rope bases with scaling on the global one.
FAMILY_OVERRIDES = {
    "Gemma2ForCausalLM": dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                              attn_logit_softcapping=4.0, final_logit_softcapping=8.0),
    "Gemma3ForCausalLM": dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                               "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}),
    "Phi3ForCausalLM": dict(sliding_window=6),
    "MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen3MoeForCausalLM": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16,
                                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
}

# Small but GQA (4 q heads, 2 kv heads) and with an FFN width that is not a power of two.
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _classes(arch: str):
    import transformers

    table = {
        "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM"),
        "MistralForCausalLM": ("MistralConfig", "MistralForCausalLM"),
        "Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM"),
        "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM"),
        "Gemma2ForCausalLM": ("Gemma2Config", "Gemma2ForCausalLM"),
        "Gemma3ForCausalLM": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        "Phi3ForCausalLM": ("Phi3Config", "Phi3ForCausalLM"),
        "MixtralForCausalLM": ("MixtralConfig", "MixtralForCausalLM"),
        "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    }
    if arch not in table:
        raise ValueError(f"make_tiny_model: unsupported arch {arch!r}")
    c, m = table[arch]
    return getattr(transformers, c), getattr(transformers, m)


def tiny_config(arch: str = "LlamaForCausalLM", rope_scaling: str | dict | None = None, **overrides):
    """The transformers config object for a tiny model of `arch`."""
    config_cls, _ = _classes(arch)
    kw = dict(BASE)
    if arch == "Qwen3ForCausalLM":
        kw["head_dim"] = 24  # Qwen3 sets head_dim explicitly, here != hidden / heads
    if arch == "MistralForCausalLM":
        kw["sliding_window"] = None  # full attention: the engine and HF then agree at any length
    kw.update(FAMILY_OVERRIDES.get(arch, {}))
    if rope_scaling is not None:
        rp = dict(LLAMA3_ROPE) if rope_scaling == "llama3" else dict(rope_scaling)
        kw["rope_parameters"] = rp
    kw.update(overrides)
    return config_cls(**kw)


def init_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-initialise every parameter (norms included) with a seeded generator, so no
    weight is left at exactly 0 or 1 and parity tests exercise every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are yielded once
            shape = p.shape
            if name.endswith("norm.weight"):
                new = 1.0 + 0.1 * torch.randn(shape, generator=g)
            elif name.endswith(".bias"):
                new = 0.1 * torch.randn(shape, generator=g)
            elif "embed_tokens" in name:
                new = 0.5 * torch.randn(shape, generator=g)
            else:
                fan_in = shape[-1]
                std = min(0.5, max(0.02, fan_in ** -0.5))
                new = std * torch.randn(shape, generator=g)
            p.copy_(new.to(p.dtype))


def build_model(arch: str = "LlamaForCausalLM", seed: int = 0, tie_word_embeddings: bool = False,
                rope_scaling=None, **overrides):
    """An in-memory tiny HF model (float32, eval mode)."""
    _, model_cls = _classes(arch)
    torch.manual_seed(seed)
    cfg = tiny_config(arch, rope_scaling=rope_scaling, tie_word_embeddings=tie_word_embeddings, **overrides)
    model = model_cls(cfg)
    init_weights(model, seed)
    model.eval()
    return model


def copy_tokenizer(dest: str | Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(BUNDLED / name, Path(dest) / name)


def make_tiny_model(
    path: str | Path,
    arch: str = "LlamaForCausalLM",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    tie_word_embeddings: bool = False,
    rope_scaling: str | dict | None = None,
    max_shard_size: str | int | None = None,
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """Build, re-initialise and `save_pretrained` a tiny `arch` model into `path`.

    `rope_scaling="llama3"` gives Llama 3.1 style rope scaling; `max_shard_size` (e.g.
    "40KB") forces several safetensors shards plus an index. Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(arch, seed, tie_word_embeddings=tie_word_embeddings, rope_scaling=rope_scaling, **overrides)
    model = model.to(dtype)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    if tokenizer:
        copy_tokenizer(path)
    return path


def load_hf_model(path: str | Path, attn: str | None = None):
    """Load a tiny model saved by `make_tiny_model` (local files only), float32, eval.
    `attn="eager"` for references whose sdpa path drops a quirk (Gemma 2's soft-capping)."""
    from transformers import AutoModelForCausalLM

    kw = {} if attn is None else {"attn_implementation": attn}
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32, **kw).eval()


# -- safetensors byte surgery ---------------------------------------------------------


def read_raw_header(path: str | Path) -> tuple[dict, bytes]:
    """(header dict, data region bytes) of a safetensors file, with no validation."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: str | Path, header: dict, data: bytes) -> None:
    """Write a safetensors file from a header dict and a data region, verbatim."""
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def rewrite_header(path: str | Path, mutate) -> None:
    """Apply `mutate(header_dict)` (in place) and write the file back with the same data."""
    header, data = read_raw_header(path)
    mutate(header)
    write_raw(path, header, data)


def add_tensor(path: str | Path, name: str, tensor: torch.Tensor) -> None:
    """Append a tensor to an existing safetensors file (via the reference writer)."""
    from safetensors.torch import load_file, save_file

    header, _ = read_raw_header(path)
    meta = header.get("__metadata__")
    tensors = load_file(str(path))
    tensors[name] = tensor.contiguous()
    save_file(tensors, str(path), metadata=meta)


def remove_tensor(path: str | Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    header, _ = read_raw_header(path)
    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path), metadata=header.get("__metadata__"))


def replace_tensor(path: str | Path, name: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    header, _ = read_raw_header(path)
    tensors = load_file(str(path))
    tensors[name] = tensor.contiguous()
    save_file(tensors, str(path), metadata=header.get("__metadata__"))


def as_earlier_engine(path: str | Path, version: int) -> None:
    """Rewrite an engine in place as an lmkiln before format v4 wrote it: fp linear weights
    stored (in, out), the manifest's `format_version`, shapes and checksums (sha256 before
    v3, blake3 from v3) to match. Weight values are unchanged."""
    import hashlib

    import blake3
    from safetensors.torch import load_file, save_file

    from lmkiln.formats.engine import MANIFEST, VERSION, stored_out_in

    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    assert version < 4 <= manifest["format_version"] == VERSION
    for fname in manifest["files"]:
        tensors = load_file(str(path / fname))
        for name in tensors:
            if stored_out_in(name, VERSION):
                tensors[name] = tensors[name].transpose(-2, -1).contiguous()
                manifest["tensors"][name]["shape"] = list(tensors[name].shape)
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        data = (path / fname).read_bytes()
        digest = {"sha256": hashlib.sha256(data).hexdigest()} if version < 3 else {"blake3": blake3.blake3(data).hexdigest()}
        manifest["files"][fname] = {**digest, "size": len(data)}
    manifest["format_version"] = version
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def edit_json(path: str | Path, mutate) -> dict:
    """Load a JSON file, apply `mutate(obj)` in place, write it back; returns the object."""
    path = Path(path)
    obj = json.loads(path.read_text())
    mutate(obj)
    path.write_text(json.dumps(obj, indent=2))
    return obj


def copy_tree(src: str | Path, dst: str | Path) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


# -- evaluation -----------------------------------------------------------------------


@torch.no_grad()
def perplexity(logits_fn, ids, seqlen: int, bos_id: int | None) -> float:
    """Perplexity of token stream `ids` (1-D) in non-overlapping windows of `seqlen` tokens.

    Each window is scored on its own, with `bos_id` prepended (when not None) so its first
    token is predicted too; `logits_fn(input_ids (1, T)) -> logits (1, T, vocab)`. A
    trailing partial window is scored as well. Returns exp(mean NLL over all tokens).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0 or seqlen < 1:
        raise ValueError("perplexity needs at least one token and seqlen >= 1")
    total, count = 0.0, 0
    for start in range(0, ids.numel(), seqlen):
        window = ids[start:start + seqlen]
        prefix = [bos_id] if bos_id is not None else []
        inp = torch.cat([torch.tensor(prefix, dtype=torch.long), window])[None]
        logits = logits_fn(inp)
        logits = getattr(logits, "logits", logits).float()
        pred, target = logits[0, :-1], inp[0, 1:]  # position t predicts token t + 1
        if target.numel() == 0:
            continue
        nll = torch.nn.functional.cross_entropy(pred, target, reduction="sum")
        total += float(nll)
        count += target.numel()
    return float(torch.exp(torch.tensor(total / count, dtype=torch.float64)))


class torch_threads:
    """Context manager: run torch ops on `n` intra-op threads, restoring the old count.

    The quantization tests push many tiny matrices through torch; on a loaded 2-core
    machine extra threads only spin, so they run single-threaded (also keeps results
    independent of the thread count within one session)."""

    def __init__(self, n: int = 1):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)
        return False


def genai_greedy(export_dir: str | Path, ids: list[int], n: int) -> list[int]:
    """The first n greedy tokens onnxruntime-genai generates after `ids` from an ONNX export (skips the
    test when onnxruntime_genai is not installed)."""
    import numpy as np
    import pytest

    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(export_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(ids):]
