"""The torch engine runner: a module tree built from an engine directory.

Built from the manifest and the weight files alone (no transformers model code), with
a preallocated KV cache, prefill + decode, and batches of prompts of different lengths
(left padding + attention mask). Tensor-parallel ranks are merged at load time, so an
engine written with any --tp runs on one device with the same logits as --tp 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.formats.engine import Engine, kv_heads_per_rank
from lmkiln.runtime.rope import apply_rotary, cos_sin, inv_freq


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale after casting back, as the reference Llama norm does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Module):
    """y = x @ W + b with W stored (in, out), as in the engine files."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


@dataclass
class KVCache:
    """Per-layer keys/values (B, kv_heads, capacity, head_dim) plus, per slot, validity
    and the token position (positions differ from slots under left padding)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor  # (B, capacity) bool
    kpos: torch.Tensor  # (B, capacity) long
    next_pos: torch.Tensor  # (B,) long: position of each row's next real token
    length: int = 0

    @classmethod
    def empty(cls, n_layer, batch, kv_heads, capacity, head_dim, dtype, device) -> "KVCache":
        z = lambda: torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)  # noqa: E731
        return cls([z() for _ in range(n_layer)], [z() for _ in range(n_layer)],
                   torch.zeros(batch, capacity, dtype=torch.bool, device=device),
                   torch.zeros(batch, capacity, dtype=torch.long, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


class Attention(nn.Module):
    def __init__(self, cfg: dict, wqkv: Linear, wo: Linear, q_norm=None, k_norm=None):
        super().__init__()
        self.hq, self.hkv, self.hd = cfg["head_num"], cfg["kv_head_num"], cfg["size_per_head"]
        self.wqkv, self.wo = wqkv, wo
        self.q_norm, self.k_norm = q_norm, k_norm

    def forward(self, x, cos, sin, mask, cache: KVCache, layer: int, start: int):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.hq * self.hd, self.hkv * self.hd, self.hkv * self.hd], dim=-1)
        q, k, v = q.view(B, T, self.hq, self.hd), k.view(B, T, self.hkv, self.hd), v.view(B, T, self.hkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache.k[layer][:, :, start:start + T] = k.transpose(1, 2)
        cache.v[layer][:, :, start:start + T] = v.transpose(1, 2)
        keys, values = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=self.hq != self.hkv)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.hq * self.hd))


class FeedForward(nn.Module):
    def __init__(self, w13: Linear, w2: Linear):
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, attn_norm, attention, ffn_norm, ffn):
        super().__init__()
        self.attention_norm, self.attention, self.ffn_norm, self.feed_forward = attn_norm, attention, ffn_norm, ffn

    def forward(self, x, cos, sin, mask, cache, layer, start):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, start)
        return x + self.feed_forward(self.ffn_norm(x))


def merge_ranks(engine: Engine, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's full (in, out) weights from its tensor-parallel shards."""
    m, tp = engine.model, engine.tp
    hd, hq, hkv = m["size_per_head"], m["head_num"], m["kv_head_num"]
    kv_r = kv_heads_per_rank(hkv, tp)
    split = [hq // tp * hd, kv_r * hd, kv_r * hd]
    # With kv heads replicated over ranks, take each kv head from the first rank holding it.
    kv_ranks = [r for r in range(tp) if tp <= hkv or r % (tp // hkv) == 0]
    p = f"layers.{layer}"
    get = lambda n: engine.get(n).to(dtype)  # noqa: E731
    out = {}
    for kind in ("weight", "bias") if m["attn_bias"] else ("weight",):
        parts = [get(f"{p}.attention.w_qkv.{r}.{kind}").split(split, dim=-1) for r in range(tp)]
        q = torch.cat([parts[r][0] for r in range(tp)], -1)
        k = torch.cat([parts[r][1] for r in kv_ranks], -1)
        v = torch.cat([parts[r][2] for r in kv_ranks], -1)
        out[f"qkv.{kind}"] = torch.cat([q, k, v], -1).contiguous()
    out["wo"] = torch.cat([get(f"{p}.attention.wo.{r}.weight") for r in range(tp)], 0)
    w13 = [get(f"{p}.feed_forward.w13.{r}.weight").chunk(2, dim=-1) for r in range(tp)]
    out["w13"] = torch.cat([torch.cat([a for a, _ in w13], -1), torch.cat([b for _, b in w13], -1)], -1).contiguous()
    out["w2"] = torch.cat([get(f"{p}.feed_forward.w2.{r}.weight") for r in range(tp)], 0)
    return out


class EngineModel(nn.Module):
    def __init__(self, engine: Engine, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        self.config = cfg = engine.model
        self.compute_dtype = dtype
        eps = float(cfg["norm_eps"])
        get = lambda n: engine.get(n).to(dtype)  # noqa: E731
        self.tok_embeddings = nn.Parameter(get("tok_embeddings.weight"), requires_grad=False)
        layers = []
        for i in range(cfg["num_layer"]):
            w = merge_ranks(engine, i, dtype)
            p = f"layers.{i}"
            qn = kn = None
            if cfg["qk_norm"]:
                qn, kn = RMSNorm(get(f"{p}.attention.q_norm.weight"), eps), RMSNorm(get(f"{p}.attention.k_norm.weight"), eps)
            attn = Attention(cfg, Linear(w["qkv.weight"], w.get("qkv.bias")), Linear(w["wo"]), qn, kn)
            layers.append(DecoderLayer(RMSNorm(get(f"{p}.attention_norm.weight"), eps), attn,
                                       RMSNorm(get(f"{p}.ffn_norm.weight"), eps), FeedForward(Linear(w["w13"]), Linear(w["w2"]))))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(get("norm.weight"), eps)
        self.output = None if cfg["tie_word_embeddings"] else Linear(get("output.weight"))
        self.register_buffer("inv_freq", inv_freq(cfg["rope"]), persistent=False)
        self.sliding_window = cfg.get("sliding_window")
        self.eval().to(device)

    @classmethod
    def from_path(cls, path: str | Path, dtype: torch.dtype = torch.float32, device="cpu", check: bool = False) -> "EngineModel":
        return cls(Engine(path, check=check), dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.device

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache.empty(c["num_layer"], batch, c["kv_head_num"], capacity, c["size_per_head"], self.compute_dtype, self.device)

    def _mask(self, cache: KVCache, qpos: torch.Tensor, qvalid: torch.Tensor, start: int, T: int) -> torch.Tensor:
        """(B, 1, T, S) bool: valid keys at or before the query's position, within the window."""
        kpos, kvalid = cache.kpos[:, :start + T], cache.valid[:, :start + T]
        allowed = kvalid[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])
        if self.sliding_window:
            allowed &= (qpos[:, :, None] - kpos[:, None, :]) < self.sliding_window
        # A padding query would attend to nothing, and softmax over nothing is NaN that
        # then leaks into the cache; let it see its own slot instead (its output is unused).
        own = torch.zeros_like(allowed)
        own[:, torch.arange(T), torch.arange(start, start + T)] = True
        allowed |= own & ~qvalid[:, :, None]
        return allowed[:, None]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), float32.

        `attention_mask` (B, T) marks real tokens (1) and padding (0) of *these* tokens;
        the cache remembers earlier ones. Without a cache, a throwaway one is used.
        """
        B, T = input_ids.shape
        input_ids = input_ids.to(self.device)
        if cache is None:
            cache = self.new_cache(B, T)
        start = cache.length
        if start + T > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} tokens; {start + T} needed")
        qvalid = torch.ones(B, T, dtype=torch.bool, device=self.device) if attention_mask is None else attention_mask.to(self.device).bool()
        qpos = cache.next_pos[:, None] + qvalid.long().cumsum(1) - 1
        qpos = torch.where(qvalid, qpos, torch.zeros_like(qpos))
        cache.valid[:, start:start + T] = qvalid
        cache.kpos[:, start:start + T] = qpos
        mask = self._mask(cache, qpos, qvalid, start, T)
        cos, sin = cos_sin(self.inv_freq, qpos)
        x = F.embedding(input_ids, self.tok_embeddings)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, start)
        x = self.norm(x)
        logits = self.output(x) if self.output is not None else x @ self.tok_embeddings.t()
        cache.length = start + T
        cache.next_pos += qvalid.long().sum(1)
        return logits.float()
