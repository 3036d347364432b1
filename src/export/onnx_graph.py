"""The decoder graph: an engine -> an ONNX ModelProto (weights streamed to a TensorStore).

Two flavours over the same inputs/outputs (onnxruntime-genai's decoder convention):

    input_ids                    int64 (batch, sequence_length)
    attention_mask               int64 (batch, total_sequence_length)
    past_key_values.{i}.key|value T    (batch, kv_heads, past_sequence_length, head_dim)
 -> logits                       float32 (batch, sequence_length, vocab)
    present.{i}.key|value        T     (batch, kv_heads, total_sequence_length, head_dim)

- "contrib" (default): com.microsoft MatMulNBits (int4/int8 linears), GroupQueryAttention
  (packed qkv, rotary inside with interleaved pairs = the engine's rotary order, cos/sin
  caches from the manifest's rope), SkipSimplifiedLayerNormalization. Positions come
  from the attention mask's row sums inside GQA, so left padding is not supported.
- "portable": opset-21 standard ops only: blocked DequantizeLinear + MatMul, attention
  from MatMul/Softmax/Where with a causal mask built from positions = cumsum(mask) - 1
  (left-padded batches work), RMSNorm as ReduceMean/Sqrt/Div, rotary from Mul/Add.

T is float32 for `dtype=np.float32` (CPU) and float16 for the CUDA export.
Every RMSNorm normalises in float32, as the engine's reference norm does.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper

from lmkiln.convert.rope import inv_freq
from lmkiln.export.store import NP_TO_ONNX, Graph
from lmkiln.export.weights import (LinearW, dequantized, load_linear, np_fp, quantize_symmetric, split_columns, to_blocked_dq,
                                   to_matmulnbits)
from lmkiln.formats.engine import Engine
from lmkiln.quant.primitives import GRID_STEPS

OPSET = 21
MS = "com.microsoft"
# Symmetric int4/int8 weights (every zero = 8 / 128) go without MatMulNBits' zero_points input,
# whose absence means that same zero point; tests turn it off to compare both graphs.
DROP_DEFAULT_ZERO_POINTS = True
# Block size of the optional quantized output head, per width. int4: 32, as the onnxruntime-genai
# builder. int8: 128 (capped at the activation width rounded up to a power of two): with
# accuracy_level 4, onnxruntime 1.32's int8 MatMulNBits kernel ran a (2048 -> 32000) head in 3.69 ms
# at block 128 vs 3.93 ms at block 32 (median of 300 runs), and a decode step of the vocab-32000
# synthetic took 35.9-36.1 vs 37.2-37.9 ms, for 1.6x the (small) activation-quantization error;
# docs/export-onnx.md "Quantized output head".
HEAD_BLOCK = {4: 32, 8: 128}
# Range shrinks tried per head block (quant.primitives.grid_qparams, least squared error). int4: 20, the
# least-error of absmax ... 0.81 absmax, cut the head's KL on stories260K by a quarter at the same bytes
# (docs/export-onnx.md); int8: 1 (absmax), its rounding error is already ~500x smaller.
HEAD_GRID_STEPS = {4: GRID_STEPS, 8: 1}


def no_cpu_kernel(bits: int, level: int, dtype) -> bool:
    """Whether MatMulNBits would run without a kernel: onnxruntime (1.32) has no 8-bit CPU kernel at
    level 0 (the float32 graph) and dequantizes the whole weight on every call (an int8 engine decoded
    at 0.6 tok/s vs 26 at level 4, docs/BENCHMARKS.md); the dequantized float32 weight computes the
    same exact product, 40x faster, so such linears are exported dequantized."""
    return bits == 8 and level == 0 and np.dtype(dtype) == np.float32


def head_block(bits: int, k: int) -> int:
    """The quantized head's block size for `bits` and activation width `k` (a power of two >= 16)."""
    return max(16, min(HEAD_BLOCK[bits], 1 << max(k - 1, 1).bit_length()))


class DecoderBuilder:
    def __init__(self, engine: Engine, g: Graph, dtype=np.float32, portable: bool = False, accuracy_level: int = 0,
                 head_bits: int = 0):
        self.e, self.g, self.dtype, self.portable = engine, g, np.dtype(dtype), portable
        self.accuracy_level = accuracy_level
        self.head_bits = head_bits  # 0: the output head stays fp (as in the engine); 4/8: quantized at export
        self.m = m = engine.model
        self.h, self.hq, self.hkv, self.hd = m["hidden_units"], m["head_num"], m["kv_head_num"], m["size_per_head"]
        self.eps = float(m["norm_eps"])
        self.T = NP_TO_ONNX[self.dtype]
        self.fallbacks: list[str] = []  # quantized linears exported dequantized, and why

    # -- small helpers -------------------------------------------------------------

    def fp(self, name: str) -> str:
        return self.g.store.add(name, np_fp(self.e.get(name), self.dtype))

    def cast(self, x: str, to: int) -> str:
        return self.g.op1("Cast", [x], to=to)

    def rms(self, x: str, gamma: str) -> str:
        """RMSNorm from standard ops, normalising in float32 like the engine's norm. Squared with
        Pow(x, 2), not Mul(x, x): onnxruntime's SimplifiedLayerNormFusion matches Pow -> ReduceMean
        -> Add -> Sqrt -> Div -> Mul and runs one fused SimplifiedLayerNormalization instead."""
        g = self.g
        xf = x if self.T == TensorProto.FLOAT else self.cast(x, TensorProto.FLOAT)
        ms = g.op1("ReduceMean", [g.op1("Pow", [xf, g.const(2.0, np.float32)]), g.const([-1])], keepdims=1)
        r = g.op1("Sqrt", [g.op1("Add", [ms, g.const(self.eps, np.float32)])])
        y = g.op1("Div", [xf, r])
        if self.T != TensorProto.FLOAT:
            y = self.cast(y, self.T)
        return g.op1("Mul", [y, gamma])

    def linear(self, x: str, layer: int, kind: str, lw: LinearW | None = None) -> str:
        if lw is None:
            lw = load_linear(self.e, layer, kind, self.dtype)
        return self._linear(x, f"layers.{layer}.{kind}", lw)

    def _linear(self, x: str, name: str, lw: LinearW, accuracy_level: int | None = None) -> str:
        g = self.g
        if not lw.bits:
            y = g.op1("MatMul", [x, g.store.add(f"{name}.weight", lw.weight)])
        elif self.portable:
            y = g.op1("MatMul", [x, self._dq_weight(name, lw)])
        else:
            level = self.accuracy_level if accuracy_level is None else accuracy_level
            nb = to_matmulnbits(lw, self.dtype, DROP_DEFAULT_ZERO_POINTS)
            why = (f"group {lw.group}: no MatMulNBits block size" if nb is None else
                   "int8 at accuracy level 0: onnxruntime has no CPU kernel" if no_cpu_kernel(lw.bits, level, self.dtype)
                   else None)
            if why:  # run it dequantized
                self.fallbacks.append(f"{name} ({why})")
                y = g.op1("MatMul", [x, g.store.add(f"{name}.weight", dequantized(lw, self.dtype))])
            else:
                ins = [x, g.store.add(f"{name}.qweight", nb["B"]), g.store.add(f"{name}.scales", nb["scales"])]
                if nb["zero_points"] is not None:
                    ins.append(g.store.add(f"{name}.zero_points", nb["zero_points"]))
                y = g.op1("MatMulNBits", ins, domain=MS, K=nb["K"], N=nb["N"], bits=nb["bits"],
                          block_size=nb["block_size"], accuracy_level=level)
        if lw.bias is not None:
            y = g.op1("Add", [y, g.store.add(f"{name}.bias", lw.bias)])
        return y

    def _dq_weight(self, name: str, lw: LinearW) -> str:
        g, dq = self.g, to_blocked_dq(lw, self.dtype)
        if lw.bits == 4:
            x = g.store.add_raw(f"{name}.qweight", TensorProto.UINT4, dq["shape"], dq["x_raw"])
            z = g.store.add_raw(f"{name}.zeros", TensorProto.UINT4, dq["zshape"], dq["zero_raw"])
        else:
            x, z = g.store.add(f"{name}.qweight", dq["x"]), g.store.add(f"{name}.zeros", dq["zero"])
        s = g.store.add(f"{name}.scales", dq["scale"])
        w = g.op1("DequantizeLinear", [x, s, z], axis=0, block_size=dq["block_size"])
        if dq["shape"][0] > lw.in_features:  # padded input rows multiply nothing: drop them
            w = g.op1("Slice", [w, g.const([0]), g.const([lw.in_features]), g.const([0])])
        return w

    def rope_caches(self) -> tuple[str, str]:
        """cos/sin (max_position_embeddings, head_dim / 2) from the manifest's rope block."""
        pos = torch.arange(self.m["max_position_embeddings"], dtype=torch.float32)
        ang = pos[:, None] * inv_freq(self.m["rope"])[None, :]
        cos, sin = ang.cos().numpy().astype(self.dtype), ang.sin().numpy().astype(self.dtype)
        return self.g.store.add("cos_cache", cos), self.g.store.add("sin_cache", sin)

    # -- the graph -----------------------------------------------------------------

    def build(self, name: str = "lmkiln-decoder", metadata: dict | None = None):
        g, m, T = self.g, self.m, self.T
        L, V = m["num_layer"], m["vocab_size"]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", V])]
        kv_shape = lambda s: ["batch_size", self.hkv, s, self.hd]  # noqa: E731
        for i in range(L):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", T, kv_shape("past_sequence_length")))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", T, kv_shape("total_sequence_length")))

        emb = self.fp("tok_embeddings.weight")
        x = g.op1("Gather", [emb, "input_ids"])
        cos, sin = self.rope_caches()
        ctx = self._portable_context(cos, sin) if self.portable else self._gqa_context(cos, sin)

        resid, delta = x, None
        for i in range(L):
            p = f"layers.{i}"
            xn, resid = self.norm_add(resid, delta, self.fp(f"{p}.attention_norm.weight"))
            attn = self.attention(xn, i, ctx)
            delta = self.linear(attn, i, "attention.wo")
            xn, resid = self.norm_add(resid, delta, self.fp(f"{p}.ffn_norm.weight"))
            delta = self.ffn(xn, i)
        xn, _ = self.norm_add(resid, delta, self.fp("norm.weight"), last=True)

        if self.head_bits:  # quantized at export (symmetric, data-free): an approximation the engine does not make
            w = self.e.get("tok_embeddings.weight").T if m["tie_word_embeddings"] else self.e.get("output.weight")
            lw = quantize_symmetric(np_fp(w, np.float32), self.head_bits, head_block(self.head_bits, self.h),
                                    HEAD_GRID_STEPS[self.head_bits])
            # onnxruntime (1.32) has no CPU kernel for 8-bit MatMulNBits at accuracy_level 0: it would dequantize
            # the whole head to float32 on every call (7-23x slower than the fp32 head). The int8 head is an
            # approximation anyway, so on the float32 (CPU) graph it always runs at level 4 (int8 activations).
            acc = 4 if self.head_bits == 8 and self.T == TensorProto.FLOAT else None
            y = self._linear(xn, "output", lw, accuracy_level=acc)
        elif m["tie_word_embeddings"]:  # logits = x @ E^T without storing E twice
            x2 = g.op1("Reshape", [xn, g.const([-1, self.h])])
            y = g.op1("Gemm", [x2, emb], transB=1)
            shape = g.op1("Concat", [g.op1("Shape", ["input_ids"]), g.const([V])], axis=0)
            y = g.op1("Reshape", [y, shape])
        else:
            y = g.op1("MatMul", [xn, self.fp("output.weight")])
        if T == TensorProto.FLOAT:
            g.op("Identity", [y], ["logits"])
        else:
            g.op("Cast", [y], ["logits"], to=TensorProto.FLOAT)

        graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.store.tensors)
        opsets = [helper.make_opsetid("", OPSET)] + ([] if self.portable else [helper.make_opsetid(MS, 1)])
        model = helper.make_model(graph, opset_imports=opsets, producer_name="lmkiln", ir_version=10)
        if metadata:
            helper.set_model_props(model, metadata)
        return model

    def norm_add(self, resid: str, delta: str | None, gamma: str, last: bool = False) -> tuple[str, str]:
        """(norm(resid + delta), resid + delta); delta None = the first norm; `last`: the sum is not needed."""
        g = self.g
        if delta is None:
            return self.rms(resid, gamma), resid
        if self.portable:
            s = g.op1("Add", [resid, delta])
            return self.rms(s, gamma), s
        # Only the outputs used are named (mean / inv_std_var are never; the sum not after the last layer).
        name = g.fresh("SkipSimplifiedLayerNormalization")
        outs = [f"{name}/out0"] if last else [f"{name}/out0", "", "", f"{name}/out3"]
        out = g.op("SkipSimplifiedLayerNormalization", [resid, delta, gamma], outs, domain=MS, name=name, epsilon=self.eps)
        return out[0], out[-1]

    def ffn(self, x: str, i: int) -> str:
        if self.m.get("num_experts"):  # mixture of experts: onnxruntime's MoE node (export/onnx_moe.py)
            from lmkiln.export.onnx_moe import moe_ffn

            return moe_ffn(self, x, i)
        g = self.g
        ip = self.m["inter_size_padded"]
        # The fused w13 as two linears (gate w1, up w3): no Split copy of the (B, S, 2 * inter) output.
        w1, w3 = split_columns(load_linear(self.e, i, "feed_forward.w13", self.dtype), [ip, ip])
        gate, up = self.linear(x, i, "feed_forward.w1", w1), self.linear(x, i, "feed_forward.w3", w3)
        act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])
        return self.linear(act, i, "feed_forward.w2")

    # -- attention: contrib ---------------------------------------------------------

    def _gqa_context(self, cos: str, sin: str) -> dict:
        g = self.g
        seqlens = g.op1("Cast", [g.op1("Sub", [g.op1("ReduceSum", ["attention_mask", g.const([1])], keepdims=0), g.const(1)])],
                        to=TensorProto.INT32)
        total = g.op1("Cast", [g.op1("Gather", [g.op1("Shape", ["attention_mask"]), g.const(1)], axis=0)], to=TensorProto.INT32)
        ctx = {"seqlens_k": seqlens, "total": total, "cos": cos, "sin": sin, "rotary_in_gqa": self.hd % 16 == 0}
        if not ctx["rotary_in_gqa"]:  # GQA's rotary needs head_dim % 16 == 0: rotate with standard ops
            ctx["ext"] = self._portable_context(cos, sin)
        return ctx

    def attention(self, x: str, i: int, ctx: dict) -> str:
        if self.portable:
            return self._portable_attention(x, i, ctx)
        g, hq, hkv, hd = self.g, self.hq, self.hkv, self.hd
        qkv = self.linear(x, i, "attention.w_qkv")
        if self.m["qk_norm"] or not ctx["rotary_in_gqa"]:
            q, k, v = self._split_qkv(qkv)
            if self.m["qk_norm"]:  # per-head RMSNorm before the rotary
                q = self._head_norm(q, hq, f"layers.{i}.attention.q_norm.weight")
                k = self._head_norm(k, hkv, f"layers.{i}.attention.k_norm.weight")
            if not ctx["rotary_in_gqa"]:
                q = g.op1("Reshape", [self._rotary(q, hq, ctx["ext"]), g.const([0, 0, hq * hd])])
                k = g.op1("Reshape", [self._rotary(k, hkv, ctx["ext"]), g.const([0, 0, hkv * hd])])
        else:
            q, k, v = qkv, "", ""
        rot = dict(do_rotary=1, rotary_interleaved=1) if ctx["rotary_in_gqa"] else {}
        window = self.m.get("sliding_window") or 0
        ins = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", ctx["seqlens_k"], ctx["total"]]
        if rot:
            ins += [ctx["cos"], ctx["sin"]]
        outs = g.op("GroupQueryAttention", ins, [g.fresh("attn"), f"present.{i}.key", f"present.{i}.value"], domain=MS,
                    num_heads=hq, kv_num_heads=hkv, scale=float(hd) ** -0.5, **rot,
                    local_window_size=window if window else -1)
        return outs[0]

    def _split_qkv(self, qkv: str) -> list[str]:
        hq, hkv, hd = self.hq, self.hkv, self.hd
        return self.g.op("Split", [qkv, self.g.const([hq * hd, hkv * hd, hkv * hd])], 3, axis=-1)

    def _head_norm(self, x: str, heads: int, weight: str) -> str:
        g = self.g
        y = self.rms(g.op1("Reshape", [x, g.const([0, 0, heads, self.hd])]), self.fp(weight))
        return g.op1("Reshape", [y, g.const([0, 0, heads * self.hd])])

    # -- attention: portable ----------------------------------------------------------

    def _portable_context(self, cos: str, sin: str) -> dict:
        """Positions from the mask (left padding works), the boolean (B, 1, 1, S, T) mask
        of allowed keys, and the per-query cos/sin (B, S, 1, hd/2, 1)."""
        g = self.g
        pos_all = g.op1("Sub", [g.op1("CumSum", ["attention_mask", g.const(1)]), g.const(1)])  # (B, T)
        S = g.op1("Gather", [g.op1("Shape", ["input_ids"]), g.const([1])], axis=0)
        qpos = g.op1("Slice", [pos_all, g.op1("Neg", [S]), g.const([np.iinfo(np.int64).max]), g.const([1])])  # (B, S)
        qpos = g.op1("Max", [qpos, g.const(0)])
        allowed = g.op1("LessOrEqual", [g.op1("Unsqueeze", [pos_all, g.const([1])]), g.op1("Unsqueeze", [qpos, g.const([2])])])
        valid = g.op1("Cast", [g.op1("Unsqueeze", ["attention_mask", g.const([1])])], to=TensorProto.BOOL)
        allowed = g.op1("And", [allowed, valid])  # (B, S, T)
        window = self.m.get("sliding_window")
        if window:
            dist = g.op1("Sub", [g.op1("Unsqueeze", [qpos, g.const([2])]), g.op1("Unsqueeze", [pos_all, g.const([1])])])
            allowed = g.op1("And", [allowed, g.op1("Less", [dist, g.const(window)])])
        mask = g.op1("Unsqueeze", [allowed, g.const([1, 2])])  # (B, 1, 1, S, T)
        c = g.op1("Unsqueeze", [g.op1("Gather", [cos, qpos]), g.const([2, 4])])  # (B, S, 1, hd/2, 1)
        s = g.op1("Unsqueeze", [g.op1("Gather", [sin, qpos]), g.const([2, 4])])
        return {"mask": mask, "cos": c, "sin": s}

    def _rotary(self, x: str, heads: int, ctx: dict) -> str:
        """x (B, S, heads*hd) -> (B, S, heads, hd) with interleaved pairs rotated, in float32."""
        g = self.g
        x5 = g.op1("Reshape", [x, g.const([0, 0, heads, self.hd // 2, 2])])
        if self.T != TensorProto.FLOAT:
            x5 = self.cast(x5, TensorProto.FLOAT)
        x0, x1 = g.op("Split", [x5, g.const([1, 1])], 2, axis=-1)
        c, s = ctx["cos"], ctx["sin"]
        if self.T != TensorProto.FLOAT:
            c, s = self.cast(c, TensorProto.FLOAT), self.cast(s, TensorProto.FLOAT)
        o0 = g.op1("Sub", [g.op1("Mul", [x0, c]), g.op1("Mul", [x1, s])])
        o1 = g.op1("Add", [g.op1("Mul", [x1, c]), g.op1("Mul", [x0, s])])
        y = g.op1("Reshape", [g.op1("Concat", [o0, o1], axis=-1), g.const([0, 0, heads, self.hd])])
        return y if self.T == TensorProto.FLOAT else self.cast(y, self.T)

    def _portable_attention(self, x: str, i: int, ctx: dict) -> str:
        g, hq, hkv, hd = self.g, self.hq, self.hkv, self.hd
        q, k, v = self._split_qkv(self.linear(x, i, "attention.w_qkv"))
        if self.m["qk_norm"]:
            q = self._head_norm(q, hq, f"layers.{i}.attention.q_norm.weight")
            k = self._head_norm(k, hkv, f"layers.{i}.attention.k_norm.weight")
        q = g.op1("Transpose", [self._rotary(q, hq, ctx)], perm=[0, 2, 1, 3])  # (B, hq, S, hd)
        k = g.op1("Transpose", [self._rotary(k, hkv, ctx)], perm=[0, 2, 1, 3])  # (B, hkv, S, hd)
        v = g.op1("Transpose", [g.op1("Reshape", [v, g.const([0, 0, hkv, hd])])], perm=[0, 2, 1, 3])
        keys = g.op("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], axis=2)[0]
        vals = g.op("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], axis=2)[0]
        # Grouped heads without copying the cache: q (B, hkv, rep, S, hd) against k/v (B, hkv, 1, T, hd).
        q5 = g.op1("Reshape", [q, g.const([0, hkv, hq // hkv, -1, hd])])
        k5 = g.op1("Unsqueeze", [keys, g.const([2])])
        v5 = g.op1("Unsqueeze", [vals, g.const([2])])
        scores = g.op1("MatMul", [q5, g.op1("Transpose", [k5], perm=[0, 1, 2, 4, 3])])
        scores = g.op1("Mul", [scores, g.const(float(hd) ** -0.5, self.dtype)])
        if self.T != TensorProto.FLOAT:
            scores = self.cast(scores, TensorProto.FLOAT)
        # A query with no allowed key (left padding) gets a uniform row instead of NaN; unused.
        scores = g.op1("Where", [ctx["mask"], scores, g.const(-1e30, np.float32)])
        probs = g.op1("Softmax", [scores], axis=-1)
        if self.T != TensorProto.FLOAT:
            probs = self.cast(probs, self.T)
        out = g.op1("MatMul", [probs, v5])  # (B, hkv, rep, S, hd)
        out = g.op1("Transpose", [g.op1("Reshape", [out, g.const([0, hq, -1, hd])])], perm=[0, 2, 1, 3])
        return g.op1("Reshape", [out, g.const([0, 0, hq * hd])])
