"""The torch engine runner: a module tree built from an engine directory.

Built from the manifest and the weight files alone (no transformers model code), with
a preallocated KV cache, prefill + decode, and batches of prompts of different lengths
(left padding + attention mask). Tensor-parallel ranks are merged at load time, so an
engine written with any --tp runs on one device with the same logits as --tp 1.
int4/int8 engines merge their ranks in the integer domain (codes, scales and zeros
move like weights) and run each linear as a `QuantLinear` (runtime/qlinear.py: packed on
CUDA, dequantized at load on CPU). `step` is a fixed-shape decode step for CUDA graphs
(runtime/generate.py: static_greedy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.convert.blocks import ACTIVATIONS, mix_experts
from lmkiln.convert.rope import apply_rotary, cos_sin, inv_freq
from lmkiln.errors import InputError, check_flag, check_path
from lmkiln.formats.engine import Engine, kv_heads_per_rank
from lmkiln.formats.packing import unpack_int4
from lmkiln.runtime import triton_int4
from lmkiln.runtime.qlinear import QuantLinear


def runtime_dtype(name: str, device: str | torch.device, quantized: bool) -> torch.dtype:
    """The engine runner's compute dtype: `name` (fp32, bf16, fp16) or "auto": float32 on
    CPU and for fp engines (exact, as verify's fp thresholds expect). A quantized engine on
    CUDA: float16 where the Triton int4 kernel runs (it computes with exactly the
    dequantized weights, and fp16 rounds 8x finer than bf16: KL to the exact model 1.2e-5
    against 7.7e-4 on the bundled model), else bfloat16, the dtype of PyTorch's int4 kernel."""
    from lmkiln.quant.job import COMPUTE_DTYPES

    if name == "auto":
        device = torch.device(device)
        if not (quantized and device.type == "cuda"):
            return torch.float32
        return torch.float16 if triton_int4.available(device, torch.float16) else torch.bfloat16
    if name not in COMPUTE_DTYPES:
        raise InputError(f"--dtype {name!r}: choose auto, {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: scale by (offset + w) in float32, then cast, as its reference norm does
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        # Llama: normalise in float32 and scale after casting back
        return self.weight * xf.to(x.dtype)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): Gemma 2's soft-capping of attention scores and logits."""
    return x if cap is None else torch.tanh(x / cap) * cap


class Linear(nn.Module):
    """y = x @ W + b with W (in, out), as `Engine.get` returns it (a view of (out, in) bytes
    from format v4: the matmul reads it transposed, no copy)."""

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
        qpas = cfg["query_pre_attn_scalar"]
        self.scale = (qpas if qpas is not None else self.hd) ** -0.5
        self.softcap = cfg["attn_softcap"]

    def forward(self, x, cos, sin, mask, cache: KVCache, layer: int, start: int | torch.Tensor):
        """`start`: the cache slot of x's first token; an int, or for a fixed-shape decode
        step (`EngineModel.step`) a 1-element tensor, attending then over the whole cache."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.hq * self.hd, self.hkv * self.hd, self.hkv * self.hd], dim=-1)
        q, k, v = q.view(B, T, self.hq, self.hd), k.view(B, T, self.hkv, self.hd), v.view(B, T, self.hkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(start, torch.Tensor):  # slot on the device: no host sync, same shapes every step
            cache.k[layer].index_copy_(2, start, k.transpose(1, 2).to(cache.k[layer].dtype))
            cache.v[layer].index_copy_(2, start, v.transpose(1, 2).to(cache.v[layer].dtype))
            keys, values = cache.k[layer], cache.v[layer]
        else:
            cache.k[layer][:, :, start:start + T] = k.transpose(1, 2)
            cache.v[layer][:, :, start:start + T] = v.transpose(1, 2)
            keys, values = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
        q = q.transpose(1, 2)
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self.hq != self.hkv)
        else:  # SDPA has no soft-capping: scores by hand, softmax in float32 (as the reference)
            rep = self.hq // self.hkv
            keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
            scores = softcap(q @ keys.transpose(-1, -2) * self.scale, self.softcap)
            scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype) @ values
        return self.wo(out.transpose(1, 2).reshape(B, T, self.hq * self.hd))


class FeedForward(nn.Module):
    def __init__(self, w13: Linear, w2: Linear, act: str = "silu"):
        super().__init__()
        self.w13, self.w2, self.act = w13, w2, ACTIVATIONS[act]

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block; with `post_*` norms (Gemma's sandwich) each branch's output is
    normalised before its residual add."""

    def __init__(self, attn_norm, attention, ffn_norm, ffn, post_attn_norm=None, post_ffn_norm=None):
        super().__init__()
        self.attention_norm, self.attention, self.ffn_norm, self.feed_forward = attn_norm, attention, ffn_norm, ffn
        self.post_attention_norm, self.post_ffn_norm = post_attn_norm, post_ffn_norm

    def forward(self, x, cos, sin, mask, cache, layer, start):
        a = self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, start)
        x = x + (a if self.post_attention_norm is None else self.post_attention_norm(a))
        f = self.feed_forward(self.ffn_norm(x))
        return x + (f if self.post_ffn_norm is None else self.post_ffn_norm(f))


def merge_shards(kind: str, parts: list[torch.Tensor], m: dict, tp: int) -> torch.Tensor:
    """One linear's full (in, out) tensor from its per-rank (in_r, out_r) shards.

    Works for anything laid out like a weight along the output dim: weights, biases,
    int codes, and group scales/zeros (whose rows are groups of input rows). One rank's
    tensor is returned as it is (an fp weight stays the (in, out) view of its stored bytes).
    """
    if len(parts) == 1:
        return parts[0]
    if kind == "attention.w_qkv":
        hd, hq, hkv = m["size_per_head"], m["head_num"], m["kv_head_num"]
        kv_r = kv_heads_per_rank(hkv, tp)
        # With kv heads replicated over ranks, take each kv head from the first rank holding it.
        kv_ranks = [r for r in range(tp) if tp <= hkv or r % (tp // hkv) == 0]
        split = [t.split([hq // tp * hd, kv_r * hd, kv_r * hd], dim=-1) for t in parts]
        q = torch.cat([split[r][0] for r in range(tp)], -1)
        k = torch.cat([split[r][1] for r in kv_ranks], -1)
        v = torch.cat([split[r][2] for r in kv_ranks], -1)
        return torch.cat([q, k, v], -1).contiguous()
    if kind == "feed_forward.w13":
        halves = [t.chunk(2, dim=-1) for t in parts]
        return torch.cat([torch.cat([a for a, _ in halves], -1), torch.cat([b for _, b in halves], -1)], -1).contiguous()
    return torch.cat(parts, 0)  # wo, w2: split along the input dim


def merge_ranks(engine: Engine, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's full (in, out) weights from the tensor-parallel shards of an fp engine."""
    m, tp = engine.model, engine.tp
    p = f"layers.{layer}"
    shards = lambda kind, suffix: [engine.get(f"{p}.{kind}.{r}.{suffix}").to(dtype) for r in range(tp)]  # noqa: E731
    out = {"qkv.weight": merge_shards("attention.w_qkv", shards("attention.w_qkv", "weight"), m, tp)}
    if m["attn_bias"]:
        out["qkv.bias"] = merge_shards("attention.w_qkv", shards("attention.w_qkv", "bias"), m, tp)
    out["wo"] = merge_shards("attention.wo", shards("attention.wo", "weight"), m, tp)
    out["w13"] = merge_shards("feed_forward.w13", shards("feed_forward.w13", "weight"), m, tp)
    out["w2"] = merge_shards("feed_forward.w2", shards("feed_forward.w2", "weight"), m, tp)
    return out


def load_linear(engine: Engine, layer: int, kind: str, dtype: torch.dtype, device="cpu", kernels: bool = False,
                fetch=None, path: str | None = None) -> nn.Module:
    """Linear `layers.{layer}.{kind}` with its tensor-parallel ranks merged: `Linear` or `QuantLinear`.
    `fetch(name)` reads a rank's tensor (default engine.get; an expert's slice for MoE)."""
    m, tp = engine.model, engine.tp
    base = f"layers.{layer}.{kind}"
    fetch = fetch or engine.get
    shape_kind = kind.replace("moe.", "feed_forward.")  # an expert's linears split over ranks like the dense FFN's

    def merged(suffix, convert=lambda t: t):
        return merge_shards(shape_kind, [convert(fetch(f"{base}.{r}.{suffix}")) for r in range(tp)], m, tp)

    bias = merged("bias").to(device=device, dtype=dtype) if kind == "attention.w_qkv" and m["attn_bias"] else None
    if not engine.is_quantized(base):
        return Linear(merged("weight").to(device=device, dtype=dtype), bias)
    bits = engine.quant["bits"]
    codes = merged("qweight", unpack_int4 if bits == 4 else (lambda t: t))
    in_features = m["hidden_units"] if shape_kind in ("attention.w_qkv", "feed_forward.w13") else codes.shape[0]
    return QuantLinear(codes, merged("scales"), merged("zeros"), bits, in_features, bias, dtype, device, kernels, path)


class MoE(nn.Module):
    """Router and experts, as Mixtral / Qwen3-MoE compute them: softmax over the router's
    logits in float32, each token's top-k experts, their weights renormalised when
    `norm_topk`, every expert's output times its weight summed in expert order."""

    def __init__(self, router: Linear, experts: list[FeedForward], top_k: int, norm_topk: bool):
        super().__init__()
        self.router, self.experts, self.top_k, self.norm_topk = router, nn.ModuleList(experts), top_k, norm_topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = mix_experts(flat, self.router(flat), self.top_k, self.norm_topk, lambda e, rows, w: self.experts[e](rows) * w[:, None])
        return out.view_as(x)


def load_moe(engine: Engine, layer: int, dtype: torch.dtype, device="cpu", kernels: bool = False, path: str | None = None) -> MoE:
    """Layer `layer`'s router and experts; each rank's stacked tensors are read once."""
    m, p = engine.model, f"layers.{layer}.moe"
    cache: dict[str, torch.Tensor] = {}

    def expert(e: int):
        def fetch(name):
            if name not in cache:
                cache[name] = engine.get(name)
            return cache[name][e]
        return FeedForward(load_linear(engine, layer, "moe.w13", dtype, device, kernels, fetch, path),
                           load_linear(engine, layer, "moe.w2", dtype, device, kernels, fetch, path), m["hidden_act"])

    experts = [expert(e) for e in range(m["num_experts"])]
    return MoE(Linear(engine.get(f"{p}.router.weight").to(device=device, dtype=dtype)), experts, m["experts_per_token"], m["norm_topk"])


class EngineModel(nn.Module):
    def __init__(self, engine: Engine, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", kernels: bool = False,
                 linear_path: str | None = None):
        """Quantized linears (see QuantLinear): on CUDA they stay packed (int4/int8 kernels
        where they fit, else dequantized per call); on CPU `kernels=True` runs the packed
        CPU kernels where they fit, and by default they are dequantized once at load.
        `linear_path` forces "dequant" or "dequant-live" for every quantized linear."""
        super().__init__()
        self.config = cfg = engine.model
        self.compute_dtype = dtype
        eps = float(cfg["norm_eps"])
        # Every tensor goes to the device as it is read, one linear at a time: neither host
        # nor device memory ever holds the whole model in a wider form than it runs in.
        get = lambda n: engine.get(n).to(device=device, dtype=dtype)  # noqa: E731
        norm = lambda n: RMSNorm(get(n), eps, float(cfg["norm_offset"]))  # noqa: E731
        lin = lambda i, kind: load_linear(engine, i, kind, dtype, device, kernels, path=linear_path)  # noqa: E731
        self.tok_embeddings = nn.Parameter(get("tok_embeddings.weight"), requires_grad=False)
        layers = []
        for i in range(cfg["num_layer"]):
            p = f"layers.{i}"
            qn = kn = None
            if cfg["qk_norm"]:
                qn, kn = norm(f"{p}.attention.q_norm.weight"), norm(f"{p}.attention.k_norm.weight")
            attn = Attention(cfg, lin(i, "attention.w_qkv"), lin(i, "attention.wo"), qn, kn)
            ffn = (load_moe(engine, i, dtype, device, kernels, linear_path) if cfg["num_experts"] else
                   FeedForward(lin(i, "feed_forward.w13"), lin(i, "feed_forward.w2"), cfg["hidden_act"]))
            post = (norm(f"{p}.post_attention_norm.weight"), norm(f"{p}.post_ffn_norm.weight")) if cfg["sandwich_norm"] else ()
            layers.append(DecoderLayer(norm(f"{p}.attention_norm.weight"), attn, norm(f"{p}.ffn_norm.weight"), ffn, *post))
        self.layers = nn.ModuleList(layers)
        self.norm = norm("norm.weight")
        self.output = None if cfg["tie_word_embeddings"] else Linear(get("output.weight"))
        self.register_buffer("inv_freq", inv_freq(cfg["rope"]), persistent=False)
        self.register_buffer("inv_freq_local", inv_freq(cfg["rope_local"] or cfg["rope"]), persistent=False)
        # Per layer: (window or None, local rope?). Without layer_types every layer has the one window.
        types = cfg["layer_types"] or ["sliding_attention"] * cfg["num_layer"]
        self.layer_kinds = [(cfg.get("sliding_window") if t == "sliding_attention" else None,
                             t == "sliding_attention" and cfg["rope_local"] is not None) for t in types]
        self.eval().to(device)

    @classmethod
    def from_path(cls, path: str | Path, dtype: torch.dtype | str = torch.float32, device="cpu", check: bool = True,
                  kernels: bool = False, linear_path: str | None = None) -> "EngineModel":
        """`dtype` torch.float32/bfloat16/float16, or a name for `runtime_dtype` ("auto" picks by
        this engine); `device` as --device takes it (auto, cpu, cuda, cuda:N) or a torch.device.
        Both are refused in one line, as the CLI refuses them, before the engine is read."""
        from lmkiln.quant.job import dtype_name, resolve_device

        check_path("path", path)
        check_flag("check", check)
        check_flag("kernels", kernels)
        device = resolve_device(device)  # "gpu", or CUDA on a machine without it: one line, not a RuntimeError
        name = dtype_name(dtype)  # an integer dtype would cast the weights to it, and fail only in forward
        engine = Engine(path, check=check, background=True)  # checksums in threads while the weights load
        dtype = runtime_dtype(name, device, engine.quant is not None)
        try:
            model = cls(engine, dtype=dtype, device=device, kernels=kernels, linear_path=linear_path)
        except BaseException:
            engine.stop_check()
            raise
        engine.wait_checked()
        return model

    name = "torch-engine"

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.config["eos_token_id"])

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.device

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache.empty(c["num_layer"], batch, c["kv_head_num"], capacity, c["size_per_head"], self.compute_dtype, self.device)

    def _mask(self, cache: KVCache, qpos: torch.Tensor, qvalid: torch.Tensor, start: int, T: int, window: int | None) -> torch.Tensor:
        """(B, 1, T, S) bool: valid keys at or before the query's position, within the window."""
        kpos, kvalid = cache.kpos[:, :start + T], cache.valid[:, :start + T]
        allowed = kvalid[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])
        if window:
            allowed &= (qpos[:, :, None] - kpos[:, None, :]) < window
        # A padding query would attend to nothing, and softmax over nothing is NaN that
        # then leaks into the cache; let it see its own slot instead (its output is unused).
        own = torch.zeros_like(allowed)
        own[:, torch.arange(T), torch.arange(start, start + T)] = True
        allowed |= own & ~qvalid[:, :, None]
        return allowed[:, None]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.tok_embeddings)
        if self.config["embed_scale"] is not None:
            # rounded to the compute dtype first, as the reference does; a Python number here,
            # so a captured CUDA graph holds no host tensor
            x = x * float(torch.tensor(self.config["embed_scale"], dtype=torch.float32).to(x.dtype))
        return x

    def _layers_and_head(self, x, ropes, masks, cache, start) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            window, local = self.layer_kinds[i]
            x = layer(x, *ropes[local], masks[window], cache, i, start)
        x = self.norm(x)
        logits = self.output(x) if self.output is not None else x @ self.tok_embeddings.t()
        return softcap(logits.float(), self.config["final_softcap"])

    def _ropes(self, qpos: torch.Tensor) -> dict:
        ropes = {False: cos_sin(self.inv_freq, qpos)}
        if any(local for _, local in self.layer_kinds):
            ropes[True] = cos_sin(self.inv_freq_local, qpos)
        return ropes

    def _check_ids(self, input_ids, attention_mask) -> None:
        """Refuse in one line what would fail deep inside (an IndexError for an id outside the
        vocabulary, a ValueError unpacking a 1-D tensor): the shape and dtype, and the min/max of
        the ids (one host sync on CUDA; decoding through `step` never comes here)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point \
                or input_ids.dtype == torch.bool or input_ids.is_complex():
            what = (f"a {input_ids.dim()}-D {str(input_ids.dtype).removeprefix('torch.')} tensor"
                    if isinstance(input_ids, torch.Tensor) else f"a {type(input_ids).__name__}")
            raise InputError(f"input_ids: {what}; give a (batch, tokens) tensor of integer token ids "
                             "(one sequence: torch.tensor([ids]) or ids[None])")
        if input_ids.shape[1] == 0:
            raise InputError("input_ids: no tokens; give at least one token id per row")
        if attention_mask is not None and tuple(getattr(attention_mask, "shape", ())) != tuple(input_ids.shape):
            raise InputError(f"attention_mask: shape {tuple(getattr(attention_mask, 'shape', ()))} differs from input_ids' "
                             f"{tuple(input_ids.shape)}; give one 1/0 per token")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise InputError(f"input_ids: token id {bad} is outside the model's vocabulary (0..{self.vocab_size - 1}); "
                                 "encode the text with this model's tokenizer")

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), float32.

        `attention_mask` (B, T) marks real tokens (1) and padding (0) of *these* tokens;
        the cache remembers earlier ones. Without a cache, a throwaway one is used.
        """
        self._check_ids(input_ids, attention_mask)
        B, T = input_ids.shape
        input_ids = input_ids.to(self.device)
        if cache is None:
            cache = self.new_cache(B, T)
        start = cache.length
        if start + T > cache.capacity:
            raise InputError(f"the KV cache holds {cache.capacity} tokens and {start + T} are needed; make it with "
                             f"new_cache(batch, {start + T}) or more")
        qvalid = torch.ones(B, T, dtype=torch.bool, device=self.device) if attention_mask is None else attention_mask.to(self.device).bool()
        ctx = self.config.get("max_position_embeddings")
        if ctx and start + T > ctx:  # slots bound positions from above: only then count them (a host sync)
            n = int((cache.next_pos + qvalid.long().sum(1)).max())
            if n > ctx:  # rotary positions the model never saw: logits that are silently wrong
                raise InputError(f"{n} tokens exceed the model's context of {ctx} positions; give at most {ctx}")
        qpos = cache.next_pos[:, None] + qvalid.long().cumsum(1) - 1
        qpos = torch.where(qvalid, qpos, torch.zeros_like(qpos))
        cache.valid[:, start:start + T] = qvalid
        cache.kpos[:, start:start + T] = qpos
        masks = {w: self._mask(cache, qpos, qvalid, start, T, w) for w in {w for w, _ in self.layer_kinds}}
        logits = self._layers_and_head(self._embed(input_ids), self._ropes(qpos), masks, cache, start)
        cache.length = start + T
        cache.next_pos += qvalid.long().sum(1)
        return logits

    def linear_paths(self) -> dict[str, str]:
        """How each linear runs, by module name: a QuantLinear's `mode` ("int4", "int8",
        "dequant-live", "dequant") or "fp" for a plain weight."""
        return {name: getattr(mod, "mode", "fp") for name, mod in self.named_modules() if isinstance(mod, (Linear, QuantLinear))}

    def runtime_report(self) -> dict:
        """What `verify` records about this runner: device, dtype, and the count of linears per path."""
        counts: dict[str, int] = {}
        for mode in self.linear_paths().values():
            counts[mode] = counts.get(mode, 0) + 1
        return {"device": str(self.device), "dtype": str(self.compute_dtype).removeprefix("torch."), "linear_paths": counts}

    @property
    def graphable(self) -> bool:
        """Whether `step` can be captured as a CUDA graph: not with MoE layers, whose routing
        picks rows by data (shapes change per token, and it reads indices on the host)."""
        return not self.config["num_experts"]

    @torch.inference_mode()
    def step(self, token: torch.Tensor, cache: KVCache, slot: torch.Tensor) -> torch.Tensor:
        """One decode step at fixed shapes, for CUDA graphs: each row's next token `token`
        (B, 1), already on the device, goes to cache slot `slot` (a 1-element long tensor on
        the device, advanced in place), attending over the whole cache under a mask. Nothing
        here reads a value back to the host, so a captured step replays without a sync.
        -> logits (B, vocab) float32. The host's `cache.length` is not advanced (it cannot
        know it without a sync): set it from `slot` after the last step."""
        qpos = cache.next_pos[:, None]  # (B, 1): every row has a real token here
        cache.valid.index_fill_(1, slot, True)
        cache.kpos.index_copy_(1, slot, qpos)
        allowed = cache.valid[:, None, :] & (cache.kpos[:, None, :] <= qpos[:, :, None])  # (B, 1, capacity)
        masks = {}
        for w in {w for w, _ in self.layer_kinds}:
            masks[w] = (allowed & ((qpos[:, :, None] - cache.kpos[:, None, :]) < w) if w else allowed)[:, None]
        logits = self._layers_and_head(self._embed(token), self._ropes(qpos), masks, cache, slot)
        cache.next_pos += 1
        slot += 1
        return logits[:, 0]
