"""The GGUF runner: a GGUF file's weights, dequantized by GGUF's own code, run by the torch
engine runner (so `lmkiln verify REF model.gguf` measures exactly what the file holds).

`GgufWeights` presents the file under the engine's tensor names (docs/engine-format.md):
q/k/v fused into w_qkv with rotary pairs adjacent (families that llama.cpp runs with
half-split rotary are permuted back), gate/up into w13, everything (in, out). The model
config comes from the GGUF's own metadata, as llama.cpp reads it, not from lmkiln's
notes in the file. llama.cpp computes with int8-quantized activations for Q4/Q8 weights;
this runner computes in float32, so it shows the weights' error alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmkiln.convert.architectures import ARCHITECTURES
from lmkiln.convert.rope import inv_freq
from lmkiln.convert.transforms import permute_rotary
from lmkiln.errors import InputError
from lmkiln.formats import gguf as G
from lmkiln.formats.engine import with_family_defaults
from lmkiln.runtime.engine_model import EngineModel


def rope_interleaved(gguf_arch: str) -> bool:
    """Whether llama.cpp's `gguf_arch` rotates adjacent pairs, from the architecture table."""
    for a in ARCHITECTURES.values():
        if a.gguf_arch == gguf_arch:
            return a.gguf_rope_interleaved
    raise InputError(f"GGUF architecture {gguf_arch!r} is not one lmkiln runs "
                     f"({', '.join(sorted({a.gguf_arch for a in ARCHITECTURES.values()}))})")


class GgufWeights:
    """Duck-types `formats.engine.Engine` (fp, tp 1) over a GGUF file."""

    tp = 1
    quant = None

    def __init__(self, path: str | Path):
        self.file = G.GgufFile(path)
        self.path = self.file.path
        gm = self.gm = self.file.model()
        self.interleaved = rope_interleaved(gm.arch)
        # llama.cpp stops on eos and on the end-of-turn/-message ids (its end-of-generation set)
        stops = [self.file.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        rope = {"type": "default", "base": gm.rope_base, "dim": gm.head_dim, "scaling": None}
        if gm.rope_linear is not None:
            rope.update(type="linear", scaling={"factor": gm.rope_linear})
        self.model = with_family_defaults({
            "architecture": gm.arch, "hidden_units": gm.hidden, "head_num": gm.heads, "kv_head_num": gm.kv_heads,
            "size_per_head": gm.head_dim, "inter_size": gm.n_ff, "inter_size_padded": gm.n_ff, "num_layer": gm.n_layer,
            "vocab_size": gm.vocab, "max_position_embeddings": gm.context, "norm_eps": gm.norm_eps, "rope": rope,
            "attn_bias": gm.attn_bias, "qk_norm": gm.qk_norm, "tie_word_embeddings": gm.tied, "hidden_act": "silu",
            "eos_token_id": list(dict.fromkeys(int(t) for t in stops if t is not None)), "sliding_window": None,
        })

    def is_quantized(self, linear: str) -> bool:
        return False

    def _t(self, role: str, layer: int | None = None) -> torch.Tensor:
        return torch.from_numpy(self.file.dequantize(G.tensor_name(role, layer)))

    def _perm(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        return t if self.interleaved else permute_rotary(t, heads, self.gm.head_dim)

    def get(self, name: str) -> torch.Tensor:
        gm = self.gm
        if name == "tok_embeddings.weight":
            return self._t("embed")
        if name == "norm.weight":
            return self._t("final_norm")
        if name == "output.weight":
            return self._t("lm_head").t().contiguous()
        parts = name.split(".")
        i, rest = int(parts[1]), ".".join(p for p in parts[2:] if p != "0")
        simple = {"attention_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm"}
        if rest in simple:
            return self._t(simple[rest], i)
        if rest in ("attention.q_norm.weight", "attention.k_norm.weight"):
            return self._perm(self._t(rest.split(".")[1], i), 1)
        if rest in ("attention.w_qkv.weight", "attention.w_qkv.bias"):
            suf = "" if rest.endswith("weight") else "_bias"
            q, k, v = (self._t(r + suf, i) for r in "qkv")
            w = torch.cat([self._perm(q, gm.heads), self._perm(k, gm.kv_heads), v])
            return w.t().contiguous() if w.dim() == 2 else w
        if rest == "attention.wo.weight":
            return self._t("o", i).t().contiguous()
        if rest == "feed_forward.w13.weight":
            return torch.cat([self._t("gate", i), self._t("up", i)]).t().contiguous()
        if rest == "feed_forward.w2.weight":
            return self._t("down", i).t().contiguous()
        raise KeyError(name)


def gguf_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> EngineModel:
    """An EngineModel running the GGUF's dequantized weights (Runner interface)."""
    weights = GgufWeights(path)
    model = EngineModel(weights, dtype=dtype, device=device)
    model.name = "gguf"
    if weights.gm.rope_freqs:  # llama.cpp divides each base frequency by its factor
        base = inv_freq(weights.model["rope"])
        model.inv_freq = (base / weights._t("rope_freqs").float()).to(model.inv_freq.device)
    return model
