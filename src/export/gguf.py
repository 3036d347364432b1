"""`lmkiln export gguf`: an engine (or an HF / AWQ-GEMM directory) -> one GGUF file that
llama.cpp and Ollama load.

    export_gguf(source, out, gtype="auto", force=False, progress=None, on_info=None) -> GgufExport

AWQ's int4 codes and scales go into Q4_1 (asymmetric) or Q4_0 (symmetric) blocks as
they are, int8 symmetric into Q8_0: nothing is re-quantized when the group size is a
multiple of 32 (only Q4_1's m = −scale·zero is rounded to fp16; the report measures it).
Every tensor's type and how it got there are decided from the engine's manifest before
any weight is read (`decide`), stored in the file under `lmkiln.export`, returned in the
report, and re-quantization is announced through `on_info`:
- "exact": the codes and scales moved, as above;
- "re-quantized": a quantized weight whose groups do not tile GGUF's 32-blocks (or that
  needs a type its codes do not fit, e.g. asymmetric int8 -> Q8_0) is dequantized and
  quantized again by GGUF's own quantizer;
- "quantized": an fp weight quantized by GGUF's own quantizer (fp sources; embeddings
  and the output head of a quantized GGUF go to Q8_0, as the AWQ checkpoint keeps them fp);
- f16 fallback (in "fallbacks"): a weight whose row length is not a multiple of 32, which
  no block type can hold (llama.cpp's converter falls back the same way);
- "dequantized" / "fp": --type f16/f32.
The FFN width is zero-padded to a multiple of 32 (exact for SwiGLU: padded gate/up rows
give silu(0)·0 = 0) and feed_forward_length states the padded width.
See docs/export-gguf.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import lmkiln
from lmkiln.convert.architectures import get_architecture
from lmkiln.convert.quantized import ENGINE_LINEARS, rows
from lmkiln.convert.rope import inv_freq
from lmkiln.convert.transforms import unpermute_rotary
from lmkiln.errors import InputError, OutputExistsError, check_callable, check_flag, check_path
from lmkiln.formats import gguf as G
from lmkiln.formats.engine import FAMILY_FIELDS, Engine, is_engine
from lmkiln.formats.qtensor import QTensor

GTYPES = ("auto", "f32", "f16", "q8_0", "q4_0", "q4_1")


@dataclass
class GgufExport:
    path: Path
    report: dict = field(default_factory=dict)


class ReadLog:
    """An engine that remembers which of its tensors were read, so the export can prove
    it used every one (the HF -> engine step accounted for the checkpoint's)."""

    def __init__(self, engine: Engine):
        self._engine, self.seen = engine, set()

    def get(self, name: str) -> torch.Tensor:
        self.seen.add(name)
        return self._engine.get(name)

    def __getattr__(self, attr):
        return getattr(self._engine, attr)


def resolve_type(engine: Engine, gtype: str) -> str:
    """--type auto: the block type that holds the engine's codes as they are, f16 for fp."""
    if gtype not in GTYPES:
        raise InputError(f"--type {gtype!r}: choose one of {', '.join(GTYPES)}")
    if gtype != "auto":
        return gtype
    q = engine.quant
    if q is None:
        return "f16"
    if q["bits"] == 8:
        return "q8_0"
    return "q4_0" if q["symmetric"] else "q4_1"


def _onnx_unsupported(m: dict) -> list[str]:
    from lmkiln.export import onnx_unsupported  # (the package imports this module)

    return onnx_unsupported(m)


def gguf_unsupported(m: dict) -> str | None:
    """Why an engine model block (the manifest's, or the one a conversion would write) has no
    GGUF export, or None."""
    arch = get_architecture(m["architecture"])
    family = [k for k, d in FAMILY_FIELDS.items() if m.get(k, d) != d]
    if not arch.gguf_arch or family:
        return (f"GGUF export of {arch.hf_name} is not supported yet"
                + (f" (its {', '.join(family)} have no mapping here)" if family else "")
                + "; use the AWQ-GEMM or compressed-tensors output"
                + ("" if _onnx_unsupported(m) else ", or export ONNX"))
    if m["rope"]["type"] not in ("default", "linear", "llama3"):
        return f"rope type {m['rope']['type']!r} has no GGUF export yet"
    if m["hidden_act"] != "silu":  # llama.cpp's llama (and qwen2/3, phi3) compute SiLU whatever the file says
        return (f"hidden_act {m['hidden_act']} has no GGUF export (llama.cpp's {arch.gguf_arch} computes silu); use the "
                "AWQ-GEMM or compressed-tensors output")
    return None


def gguf_model(engine: Engine, check: bool = True) -> tuple[G.GgufModel, object]:
    """The GGUF-side shape of an engine's model, and its architecture table entry; `check=False`
    for the shapes alone (the compressed-tensors conversion, which needs no llama.cpp mapping)."""
    m = engine.model
    why = gguf_unsupported(m) if check else None
    if why:
        raise InputError(f"{engine.path}: {why}")
    arch, rope = get_architecture(m["architecture"]), m["rope"]
    return G.GgufModel(
        arch=arch.gguf_arch, hidden=m["hidden_units"], heads=m["head_num"], kv_heads=m["kv_head_num"],
        head_dim=m["size_per_head"], n_ff=G.round_up(m["inter_size"], G.BLOCK), n_layer=m["num_layer"],
        vocab=m["vocab_size"], context=m["max_position_embeddings"], norm_eps=float(m["norm_eps"]),
        rope_base=float(rope["base"]), rope_linear=float(rope["scaling"]["factor"]) if rope["type"] == "linear" else None,
        rope_freqs=rope["type"] == "llama3", attn_bias=m["attn_bias"], qk_norm=m["qk_norm"],
        tied=m["tie_word_embeddings"]), arch


def _quantized_linear(engine: Engine, slot: G.Slot) -> tuple[int, bool, int] | None:
    """(bits, symmetric, group size) when the slot's weight is quantized in the engine, else None."""
    if engine.quant is None or slot.role not in G.LINEARS:
        return None
    kind = next(k for k, roles in ENGINE_LINEARS.items() if slot.role in roles)
    base = f"layers.{slot.layer}.{kind}"
    if not engine.is_quantized(base):
        return None
    idx = engine.manifest["tensors"]
    group = idx[f"{base}.0.qweight"]["shape"][0] // idx[f"{base}.0.scales"]["shape"][0]  # per channel: the rank's row
    return engine.quant["bits"], engine.quant["symmetric"], group


def decide(engine: Engine, slot: G.Slot, gtype: str) -> tuple[str, str, str | None]:
    """(storage type, how, why) of a planned tensor, from the manifest alone, before any
    weight is read: the file's `lmkiln.export` record states it up front."""
    q = _quantized_linear(engine, slot)
    if len(slot.shape) == 1:
        return "f32", "fp", None  # norms, biases, rope factors: llama.cpp keeps 1-D tensors f32
    if gtype in G.BLOCK_TYPES and not G.fits_blocks(slot.shape[-1]):
        return "f16", "dequantized" if q else "fp", f"f16: rows of {slot.shape[-1]} are not whole {G.BLOCK}-weight blocks"
    if gtype in G.BLOCK_TYPES and slot.role in ("embed", "lm_head"):
        return "q8_0", "quantized", None  # fp in every AWQ checkpoint; Q8_0 as llama.cpp's quantizer keeps heads at 6-8 bits
    if q is None:
        return gtype, "quantized" if gtype in G.BLOCK_TYPES else "fp", None
    if gtype not in G.BLOCK_TYPES:
        return gtype, "dequantized", None
    bits, sym, group = q
    if group % G.BLOCK:
        return gtype, "re-quantized", f"group size {group} is not a multiple of GGUF's {G.BLOCK}-weight blocks"
    if not ((gtype == "q4_1" and bits == 4) or (gtype == "q4_0" and bits == 4 and sym) or (gtype == "q8_0" and bits == 8 and sym)):
        return gtype, "re-quantized", f"{bits}-bit {'symmetric' if sym else 'asymmetric'} codes do not fit {gtype}"
    return gtype, "exact", None


# -- the engine's tensors in llama.cpp's terms ---------------------------------------------


def _merged(engine: Engine, layer: int, kind: str):
    """`layers.{layer}.{kind}` with ranks merged, HF orientation (out, in): fp tensor or QTensor; and its bias."""
    from lmkiln.export.weights import load_linear

    lw = load_linear(engine, layer, kind, np.float32)
    bias = None if lw.bias is None else torch.from_numpy(lw.bias)
    if lw.bits == 0:
        return torch.from_numpy(np.ascontiguousarray(lw.weight.T)), bias
    n_groups = lw.scales.shape[0]
    # w2's stored input width is the FFN width padded to whole groups on every rank (with --tp, beyond
    # the block padding GGUF needs): the real width is the model's, the rest padding that may be cut
    real_in = min(lw.in_features, engine.model["inter_size"]) if kind == "feed_forward.w2" else lw.in_features
    qt = QTensor(codes=torch.from_numpy(np.ascontiguousarray(lw.codes.T)),
                 scales=torch.from_numpy(np.ascontiguousarray(lw.scales.T.astype(np.float32))),
                 zeros=torch.from_numpy(np.ascontiguousarray(lw.zeros.T.astype(np.int32))),
                 bits=lw.bits, group_size=lw.codes.shape[0] // n_groups, in_features=real_in)
    return qt, bias


def _fit_rows(x, n: int):
    """Trim (padding only) or zero-pad the output dimension to n (FFN width -> whole blocks)."""
    def fit(t):
        if t.shape[0] >= n:
            return t[:n]
        return torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])])
    return rows(fit, x)


def layer_tensors(engine: Engine, i: int, gm: G.GgufModel, interleaved: bool) -> dict[str, object]:
    """Decoder layer i by lmkiln role, HF orientation, in llama.cpp's rotary row order."""
    m = engine.model
    hd, hq, kv, ip = m["size_per_head"], m["head_num"], m["kv_head_num"], m["inter_size_padded"]
    p = f"layers.{i}"
    # the engine holds q/k (and their biases and norms) with rotary pairs adjacent; "NEOX" families want HF's half split
    unperm = (lambda t, n: t) if interleaved else (lambda t, n: unpermute_rotary(t, n, hd))
    qkv, qkv_b = _merged(engine, i, "attention.w_qkv")
    cut = [0, hq * hd, (hq + kv) * hd, (hq + 2 * kv) * hd]
    part = lambda x, j: rows(lambda t: t[cut[j]:cut[j + 1]], x)  # noqa: E731
    out = {"attn_norm": engine.get(f"{p}.attention_norm.weight").float(),
           "q": rows(lambda t: unperm(t, hq), part(qkv, 0)), "k": rows(lambda t: unperm(t, kv), part(qkv, 1)), "v": part(qkv, 2)}
    if gm.attn_bias:
        out.update(q_bias=unperm(qkv_b[cut[0]:cut[1]], hq), k_bias=unperm(qkv_b[cut[1]:cut[2]], kv), v_bias=qkv_b[cut[2]:cut[3]])
    if gm.qk_norm:
        out["q_norm"] = unperm(engine.get(f"{p}.attention.q_norm.weight").float(), 1)
        out["k_norm"] = unperm(engine.get(f"{p}.attention.k_norm.weight").float(), 1)
    out["o"], _ = _merged(engine, i, "attention.wo")
    out["ffn_norm"] = engine.get(f"{p}.ffn_norm.weight").float()
    if m["sandwich_norm"]:  # (Gemma 2/3: only the compressed-tensors conversion gets here, GGUF refuses them)
        out["post_attn_norm"] = engine.get(f"{p}.post_attention_norm.weight").float()
        out["post_ffn_norm"] = engine.get(f"{p}.post_ffn_norm.weight").float()
    w13, _ = _merged(engine, i, "feed_forward.w13")
    out["gate"] = _fit_rows(rows(lambda t: t[:ip], w13), gm.n_ff)
    out["up"] = _fit_rows(rows(lambda t: t[ip:], w13), gm.n_ff)
    out["down"], _ = _merged(engine, i, "feed_forward.w2")  # its input width is fitted when encoded
    return out


def global_tensors(engine: Engine, gm: G.GgufModel) -> dict[str, torch.Tensor]:
    out = {"embed": engine.get("tok_embeddings.weight").float(), "final_norm": engine.get("norm.weight").float()}
    if not gm.tied:
        out["lm_head"] = engine.get("output.weight").float().t()
    if gm.rope_freqs:
        # llama.cpp divides each base frequency by rope_freqs[j]: Llama 3.1's scaling as factors
        rope = engine.model["rope"]
        out["rope_freqs"] = inv_freq({**rope, "type": "default", "scaling": None}) / inv_freq(rope)
    return out


# -- encoding ------------------------------------------------------------------------------


def _dense(x, row_len: int) -> np.ndarray:
    """float32 (rows, row_len): a QTensor dequantized, or an fp tensor, cut/padded to row_len."""
    w = x.dequantize(unpad=False) if isinstance(x, QTensor) else x.float()
    if w.dim() == 2:
        w = w[:, :row_len] if w.shape[1] >= row_len else torch.cat([w, w.new_zeros(w.shape[0], row_len - w.shape[1])], 1)
    return np.ascontiguousarray(w.numpy(), dtype=np.float32)


def encode(x, stype: str, how: str, shape: tuple[int, ...]) -> tuple[np.ndarray, dict]:
    """(data as written, q4_1 m-rounding stats) for one tensor stored as `stype`, as `decide` said."""
    row_len = shape[-1]
    if how == "exact":
        return G.qtensor_blocks(x, stype, row_len)  # raises if the codes do not fit after all
    w = _dense(x, row_len)
    if tuple(w.shape) != tuple(shape):
        raise AssertionError(f"internal: tensor of shape {w.shape}, planned {shape}")
    if stype in G.BLOCK_TYPES:
        if not np.isfinite(w).all():  # GGUF's quantizer would write NaN scales (numpy warnings) and exit 0
            raise InputError(f"weight of shape {tuple(w.shape)} contains NaN or Inf values; the source is damaged")
        return G.quantize(w, stype), {}
    return w.astype(np.float16 if stype == "f16" else np.float32), {}


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def export_gguf(source, out, gtype: str = "auto", force: bool = False,
                progress: Callable[[str, int], None] | None = None, on_info: Callable[[str], None] | None = None,
                check: bool = True) -> GgufExport:
    """Write `source` (engine, HF or AWQ-GEMM directory) as GGUF file `out` (atomic; an
    existing file only with force). Returns the path and the report (see the module doc)."""
    import gguf

    from lmkiln.convert.hf_to_engine import make_plan
    from lmkiln.formats.atomic import atomic_file, check_output_file
    from lmkiln.formats.hf import HFCheckpoint
    from lmkiln.runtime.session import engine_dir

    check_path("source", source)
    check_path("out", out)
    check_flag("force", force)
    check_flag("check", check)
    check_callable("progress", progress)
    check_callable("on_info", on_info)
    source, out = Path(source), Path(out)
    if gtype not in GTYPES:
        raise InputError(f"--type {gtype!r}: choose one of {', '.join(GTYPES)}")
    if not source.exists():
        raise InputError(f"{source}: no such engine or model directory")
    check_output_file(out, force, (source,))
    if force and out.is_file() and out.stat().st_size and not _is_gguf(out):
        # --force replaces a GGUF, not any file that happens to have the name (an export's model.onnx, a document)
        raise OutputExistsError(f"{out}: exists and is not a GGUF file; refusing to replace it even with --force: remove it "
                                "yourself or choose another -o")
    if source.is_dir() and not is_engine(source):  # before converting it: minutes and a model-sized temporary copy
        why = gguf_unsupported(make_plan(HFCheckpoint(source)).model)
        if why:
            raise InputError(f"{source}: {why}")
    info = on_info or (lambda msg: None)
    with engine_dir(source) as epath:
        engine = ReadLog(Engine(epath, check=check))  # a corrupt weight file is refused, not converted
        stype_all = resolve_type(engine, gtype)
        gm, arch = gguf_model(engine)
        plan = G.plan_tensors(gm)
        decided = {s.name: decide(engine, s, stype_all) for s in plan}
        header = {
            "lmkiln_version": lmkiln.__version__, "type": stype_all,
            "source": {"name": source.name, "weight_type": engine.manifest["weight_type"], "quantization": engine.quant,
                       "architecture": engine.model["architecture"],
                       "skipped_tensors": engine.manifest.get("source", {}).get("skipped_tensors", {})},
            "feed_forward_length": {"model": engine.model["inter_size"], "stored": gm.n_ff},
            "tensors": {s.name: {"type": t, "how": how, "shape": list(s.shape)} for s in plan for t, how, _ in [decided[s.name]]},
            "requantized": {n: why for n, (_, how, why) in decided.items() if how == "re-quantized"},
            "fallbacks": {n: why for n, (t, how, why) in decided.items() if why and how != "re-quantized"},
        }
        if engine.model.get("sliding_window"):
            info(f"warning: the model attends to the last {engine.model['sliding_window']} keys only; llama.cpp's "
                 f"{gm.arch} runs full attention, which differs beyond that length")
        report = {**header, "m_rounding": None}
        # one line per reason (the tensors are in the report): an int8 engine's 35+ linears were 71 lines
        by_why: dict[tuple[str, str], list[str]] = {}
        for name, why in header["requantized"].items():
            by_why.setdefault((decided[name][0], why), []).append(name)
        for (stype, why), names in by_why.items():
            info(f"re-quantizing {len(names)} tensor(s) to {stype} ({why}), e.g. {names[0]}"
                 + ("" if len(names) == 1 else "; --report lists them all"))
        with atomic_file(out, force=force, inputs=(source,)) as tmp:
            w = gguf.GGUFWriter(str(tmp), gm.arch)
            G.write_model_metadata(w, gm, stype_all, source.name)
            eos = engine.model["eos_token_id"]
            # a second stop id (generation_config.json's, e.g. Llama 3 Instruct's <|eot_id|>) as llama.cpp's
            # end-of-turn token, which it stops on as on eos
            ids = {"bos": engine.model.get("bos_token_id"), "eos": eos[0] if eos else None,
                   "pad": engine.model.get("pad_token_id"), "eot": eos[1] if len(eos) > 1 else None}
            report["tokenizer"] = G.add_tokenizer(w, engine.path, gm.vocab, ids)
            for msg in report["tokenizer"]["warnings"]:
                info(f"warning: {msg}")
            w.add_string(G.LMKILN_KEY, json.dumps(header, sort_keys=True))
            for s in plan:
                st = decided[s.name][0]
                if st in G.BLOCK_TYPES:
                    _, ts = G.type_size(st)
                    w.add_tensor_info(s.name, (*s.shape[:-1], s.shape[-1] // G.BLOCK * ts), np.dtype(np.uint8),
                                      G.nbytes(s.shape, st), raw_dtype=G.TYPES[st])
                else:
                    dt = np.dtype(np.float16 if st == "f16" else np.float32)
                    w.add_tensor_info(s.name, s.shape, dt, int(np.prod(s.shape)) * dt.itemsize)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            m_stats = []
            glob = global_tensors(engine, gm)
            layer, cache = None, {}
            for s in plan:
                if s.layer is not None and s.layer != layer:
                    layer, cache = s.layer, layer_tensors(engine, s.layer, gm, arch.gguf_rope_interleaved)
                x = cache[s.role] if s.layer is not None else glob[s.role]
                st, how, _ = decided[s.name]
                try:
                    data, stats = encode(x, st, how, s.shape)
                except InputError as e:
                    raise InputError(f"{s.name} (engine layer {s.layer}): {e}" if s.layer is not None else f"{s.name}: {e}") from None
                if stats:
                    m_stats.append(stats)
                w.write_tensor_data(data)
                if progress:
                    progress(s.name, data.nbytes)
            w.close()
            unread = sorted(set(engine.manifest["tensors"]) - engine.seen)
            if unread:  # a bug, not bad input: never publish a GGUF that silently dropped weights
                raise AssertionError(f"internal: engine tensors not exported: {unread[:3]}")
        if m_stats:
            n = sum(st["blocks"] for st in m_stats)
            report["m_rounding"] = {
                "blocks": n, "max_abs_err": max(st["m_max_abs_err"] for st in m_stats),
                "max_err_steps": max(st["m_max_err_steps"] for st in m_stats),
                "rms_err": float(np.sqrt(sum(st["m_rms_err"] ** 2 * st["blocks"] for st in m_stats) / n)),
            }
    report["counts"] = {}
    for t in report["tensors"].values():
        key = f"{t['type']} {t['how']}"
        report["counts"][key] = report["counts"].get(key, 0) + 1
    return GgufExport(out, report)


__all__ = ["export_gguf", "GgufExport", "GTYPES"]
