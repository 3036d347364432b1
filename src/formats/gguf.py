"""GGUF, llama.cpp's single-file format: the one layout `lmkiln export gguf` writes and
the GGUF runner reads back (docs/export-gguf.md).

The `gguf` package (llama.cpp's own Python writer, reader, constants and reference
quantizers) does the bytes, so tensor names, metadata keys and block layouts are
llama.cpp's by construction. What lmkiln adds here:

- `plan_tensors`: every tensor a GGUF of a model holds, by lmkiln role, in writing
  order. The writer writes exactly this list and the reader demands exactly it.
- QTensor <-> Q4_0 / Q4_1 / Q8_0 blocks without re-quantizing. A block is 32
  consecutive weights of a row: Q4_0 w = d·(q − 8), Q4_1 w = d·q + m, Q8_0 w = d·q
  (q int8); d and m are fp16. An lmkiln group of g = 32·k weights is k blocks sharing
  (scale, zero), so the codes move bit-exactly with d = scale; Q4_1 also needs
  m = −scale·zero, which is rounded to fp16: the only rounding, at most 1/128 of a step.
- the model metadata (sizes, rope, norm eps) and the tokenizer (SentencePiece or
  byte-level BPE: vocab, scores, types, merges, special ids, chat template).
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmkiln.errors import InputError
from lmkiln.formats.hf import read_json
from lmkiln.formats.qtensor import QTensor

try:  # a declared dependency; imported lazily by the commands, so keep the error one line
    import gguf
    from gguf import MODEL_TENSOR as MT
    from gguf import GGMLQuantizationType as GT
except ImportError as e:  # pragma: no cover
    raise InputError(f"the `gguf` package is missing ({e}); pip install 'gguf>=0.17'") from None

BLOCK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block, along a row
TYPES = {"f32": GT.F32, "f16": GT.F16, "q8_0": GT.Q8_0, "q4_0": GT.Q4_0, "q4_1": GT.Q4_1}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
# lmkiln's weight_type of a GGUF (verify's default thresholds) by general.file_type
WEIGHT_TYPES = {int(FILE_TYPES[k]): w for k, w in {"f32": "fp32", "f16": "fp16", "q8_0": "int8", "q4_0": "int4", "q4_1": "int4"}.items()}

# lmkiln role (src/convert/architectures.py) -> (GGUF tensor, suffix). `rope_freqs` is not
# a checkpoint tensor: llama.cpp's per-frequency divisors of Llama 3.1's rope scaling.
ROLE_TENSORS = {
    "embed": (MT.TOKEN_EMBD, "weight"), "rope_freqs": (MT.ROPE_FREQS, "weight"),
    "final_norm": (MT.OUTPUT_NORM, "weight"), "lm_head": (MT.OUTPUT, "weight"),
    "attn_norm": (MT.ATTN_NORM, "weight"),
    "q": (MT.ATTN_Q, "weight"), "q_bias": (MT.ATTN_Q, "bias"),
    "k": (MT.ATTN_K, "weight"), "k_bias": (MT.ATTN_K, "bias"),
    "v": (MT.ATTN_V, "weight"), "v_bias": (MT.ATTN_V, "bias"),
    "q_norm": (MT.ATTN_Q_NORM, "weight"), "k_norm": (MT.ATTN_K_NORM, "weight"),
    "o": (MT.ATTN_OUT, "weight"),
    "ffn_norm": (MT.FFN_NORM, "weight"),
    "gate": (MT.FFN_GATE, "weight"), "up": (MT.FFN_UP, "weight"), "down": (MT.FFN_DOWN, "weight"),
}
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
LMKILN_KEY = "lmkiln.export"  # JSON: provenance and what was exact, re-quantized or fell back


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def tensor_name(role: str, layer: int | None = None) -> str:
    kind, suffix = ROLE_TENSORS[role]
    return f"{gguf.TENSOR_NAMES[kind].format(bid=layer)}.{suffix}"


@dataclass(frozen=True)
class GgufModel:
    """A model's shape as a GGUF states it (metadata + which tensors exist)."""

    arch: str  # llama.cpp's general.architecture, e.g. "llama"
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    n_ff: int  # the FFN width as stored: the model's, zero-padded to whole blocks
    n_layer: int
    vocab: int
    context: int
    norm_eps: float
    rope_base: float
    rope_linear: float | None = None  # linear rope scaling factor
    rope_freqs: bool = False  # per-frequency divisors in a rope_freqs tensor (Llama 3.1 scaling)
    attn_bias: bool = False
    qk_norm: bool = False
    tied: bool = False

    @property
    def model_arch(self):
        for a, name in gguf.MODEL_ARCH_NAMES.items():
            if name == self.arch:
                return a
        raise InputError(f"GGUF architecture {self.arch!r} is unknown to the installed gguf package; upgrade gguf")


@dataclass(frozen=True)
class Slot:
    name: str  # GGUF tensor name
    role: str  # lmkiln role
    layer: int | None
    shape: tuple[int, ...]  # numpy order: (rows, row length); a linear is HF's (out, in)


def plan_tensors(m: GgufModel) -> list[Slot]:
    """Every tensor of a GGUF for `m`, in writing order: the layout's single definition."""
    h, hd = m.hidden, m.head_dim
    q, kv = m.heads * hd, m.kv_heads * hd
    glob = {"embed": (m.vocab, h), "rope_freqs": (hd // 2,), "final_norm": (h,), "lm_head": (m.vocab, h)}
    layer = {"attn_norm": (h,), "q": (q, h), "q_bias": (q,), "k": (kv, h), "k_bias": (kv,), "v": (kv, h), "v_bias": (kv,),
             "q_norm": (hd,), "k_norm": (hd,), "o": (h, q), "ffn_norm": (h,),
             "gate": (m.n_ff, h), "up": (m.n_ff, h), "down": (h, m.n_ff)}
    wanted = lambda r: not ((r.endswith("_bias") and not m.attn_bias) or (r in ("q_norm", "k_norm") and not m.qk_norm))  # noqa: E731
    out = [Slot(tensor_name("embed"), "embed", None, glob["embed"])]
    if m.rope_freqs:
        out.append(Slot(tensor_name("rope_freqs"), "rope_freqs", None, glob["rope_freqs"]))
    for i in range(m.n_layer):
        out += [Slot(tensor_name(r, i), r, i, s) for r, s in layer.items() if wanted(r)]
    out.append(Slot(tensor_name("final_norm"), "final_norm", None, glob["final_norm"]))
    if not m.tied:
        out.append(Slot(tensor_name("lm_head"), "lm_head", None, glob["lm_head"]))
    allowed = set(gguf.MODEL_TENSORS[m.model_arch])
    for s in out:
        if ROLE_TENSORS[s.role][0] not in allowed:
            raise InputError(f"llama.cpp's {m.arch!r} architecture has no {s.name!r} tensor; this model cannot be a {m.arch} GGUF")
    return out


# -- blocks ------------------------------------------------------------------------------


def type_size(gtype: str) -> tuple[int, int]:
    """(weights per block, bytes per block)."""
    return gguf.GGML_QUANT_SIZES[TYPES[gtype]]


def nbytes(shape: tuple[int, ...], gtype: str) -> int:
    bs, ts = type_size(gtype)
    n = int(np.prod(shape))
    return n // bs * ts


def fits_blocks(row_len: int) -> bool:
    return row_len % BLOCK == 0


def exact_type(qt: QTensor) -> str | None:
    """The block type that holds `qt`'s codes as they are, or None (groups straddle blocks,
    or int8 with zero points, which no GGUF weight type stores)."""
    if qt.group_size % BLOCK:
        return None
    # symmetric: every group's zero is mid-range, except groups with scale 0 (padding), which are 0 anyway
    sym = bool(((qt.zeros == 2 ** (qt.bits - 1)) | (qt.scales == 0)).all())
    if qt.bits == 4:
        return "q4_0" if sym else "q4_1"
    if qt.bits == 8 and sym:
        return "q8_0"
    return None


def holds_exactly(qt: QTensor, gtype: str) -> bool:
    """Whether `gtype` stores `qt`'s codes and scales unchanged (q4_1 also takes symmetric int4)."""
    e = exact_type(qt)
    return e == gtype or (e == "q4_0" and gtype == "q4_1")


def _per_block(qt: QTensor, row_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes (out, row_len) and per-block scales/zeros (out, row_len / 32): groups expanded
    to their blocks, then trimmed or zero-padded to `row_len` (padding dequantizes to 0)."""
    rep = qt.group_size // BLOCK
    codes, scales, zeros = qt.codes, qt.scales.float().repeat_interleave(rep, 1), qt.zeros.to(torch.int32).repeat_interleave(rep, 1)
    if row_len <= qt.in_padded:
        return codes[:, :row_len], scales[:, : row_len // BLOCK], zeros[:, : row_len // BLOCK]
    pad = row_len - qt.in_padded
    return (torch.cat([codes, codes.new_zeros(codes.shape[0], pad)], 1),
            torch.cat([scales, scales.new_zeros(scales.shape[0], pad // BLOCK)], 1),
            torch.cat([zeros, zeros.new_zeros(zeros.shape[0], pad // BLOCK)], 1))


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).numpy().view(np.uint8).reshape(*t.shape, 2)


def _nibbles(codes: torch.Tensor) -> np.ndarray:
    """(..., 32) codes < 16 -> (..., 16) bytes: byte j = code j | code j+16 << 4 (ggml's order)."""
    c = codes.to(torch.uint8).numpy()
    return c[..., :16] | (c[..., 16:] << 4)


def qtensor_blocks(qt: QTensor, gtype: str, row_len: int) -> tuple[np.ndarray, dict]:
    """`qt` as raw `gtype` blocks, (out, row_len / 32 · bytes per block) uint8, codes unchanged.

    `row_len` (a multiple of 32) is the GGUF row length: the QTensor's input width is
    trimmed (padding only) or zero-padded to it. Returns the bytes and, for q4_1, the
    fp16 rounding of m = −scale·zero: max |error| (absolute and in steps d) and its
    RMS over all weights; the dequantized GGUF weight differs from lmkiln's by exactly that.
    """
    if not holds_exactly(qt, gtype) or row_len % BLOCK:
        raise ValueError(f"a {qt.bits}-bit QTensor with group {qt.group_size} does not fit {gtype} blocks exactly")
    if row_len < qt.in_features:
        raise ValueError(f"row length {row_len} would cut real weights (input width {qt.in_features})")
    codes, scales, zeros = _per_block(qt, row_len)
    out_f, nb = scales.shape
    if not torch.equal(scales.half().float(), scales):
        raise ValueError("scales are not fp16 values; GGUF would round them")
    cb = codes.reshape(out_f, nb, BLOCK)
    d = _f16_bytes(scales)
    stats: dict = {}
    if gtype == "q8_0":
        qs = (cb.to(torch.int16) - 128).to(torch.int8).numpy().view(np.uint8)
        blocks = np.concatenate([d, qs], -1)
    elif gtype == "q4_0":
        blocks = np.concatenate([d, _nibbles(cb)], -1)
    else:
        m = -scales * zeros.float()  # exact in fp32: an fp16 value times an integer < 16
        m16 = m.half().float()
        err = (m16 - m).abs()
        step = torch.where(scales > 0, err / scales.clamp_min(1e-30), torch.zeros_like(err))
        stats = {"m_max_abs_err": float(err.max()) if err.numel() else 0.0,
                 "m_max_err_steps": float(step.max()) if step.numel() else 0.0,
                 "m_rms_err": float(err.double().pow(2).mean().sqrt()) if err.numel() else 0.0,
                 "blocks": int(err.numel())}
        blocks = np.concatenate([d, _f16_bytes(m), _nibbles(cb)], -1)
    return np.ascontiguousarray(blocks.reshape(out_f, -1)), stats


def unpack_blocks(raw: np.ndarray, gtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inverse of `qtensor_blocks`: codes (rows, row_len) uint8 as stored (q8_0: q + 128,
    so every type reads (code − zero)·d with zero 8 / 128 / −m/d), d (rows, blocks) float32,
    m (rows, blocks) float32 for q4_1 else None."""
    _, ts = type_size(gtype)
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, -1, ts)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if gtype == "q8_0":
        codes = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return codes.reshape(rows, -1), d, None
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if gtype == "q4_1" else None
    qs = b[..., 4:] if gtype == "q4_1" else b[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], -1)
    return codes.reshape(rows, -1), d, m


def quantize(w: np.ndarray, gtype: str) -> np.ndarray:
    """GGUF's own reference quantizer (llama.cpp's, bit-exact for these types) or an fp cast."""
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), TYPES[gtype])


def dequantize(raw: np.ndarray, gtype: str) -> np.ndarray:
    """float32 (rows, row_len) by GGUF's own dequantizer."""
    return np.asarray(gguf.quants.dequantize(raw, TYPES[gtype]), dtype=np.float32)


# -- metadata ----------------------------------------------------------------------------


def write_model_metadata(w, m: GgufModel, file_type: str, name: str) -> None:
    """general.* and the architecture's hyperparameters, as llama.cpp's converter writes them."""
    w.add_name(name)
    w.add_file_type(int(FILE_TYPES[file_type]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(m.context)
    w.add_embedding_length(m.hidden)
    w.add_block_count(m.n_layer)
    w.add_feed_forward_length(m.n_ff)
    w.add_head_count(m.heads)
    w.add_head_count_kv(m.kv_heads)
    w.add_key_length(m.head_dim)
    w.add_value_length(m.head_dim)
    w.add_rope_dimension_count(m.head_dim)
    w.add_rope_freq_base(m.rope_base)
    if m.rope_linear is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(m.rope_linear)
    w.add_layer_norm_rms_eps(m.norm_eps)
    w.add_vocab_size(m.vocab)


class GgufFile:
    """A GGUF file opened with gguf's reader: metadata, tensors, and the model it states."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such GGUF file")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/struct errors on a bad file
            raise InputError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:160]})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=None):
        f = self.reader.get_field(key)
        return default if f is None else f.contents()

    @property
    def arch(self) -> str:
        return self.get(gguf.Keys.General.ARCHITECTURE)

    def type_of(self, name: str) -> str:
        t = self.tensors[name].tensor_type
        if t not in TYPE_NAMES:
            raise InputError(f"{self.path}: tensor {name} is {t.name}; lmkiln reads f32, f16, q8_0, q4_0 and q4_1")
        return TYPE_NAMES[t]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self.tensors[name].shape.tolist()))  # ggml's ne is reversed

    def raw(self, name: str) -> np.ndarray:
        return self.tensors[name].data

    def dequantize(self, name: str) -> np.ndarray:
        """float32 in numpy order (rows, row length), by GGUF's own dequantizer (a writable copy)."""
        return np.array(dequantize(self.raw(name), self.type_of(name)).reshape(self.shape(name)), dtype=np.float32)

    def model(self) -> GgufModel:
        """The model the metadata and tensor names state; checks the tensors against `plan_tensors`."""
        a = self.arch
        if a is None:
            raise InputError(f"{self.path}: no general.architecture")
        k = lambda key, default=None: self.get(key.format(arch=a), default)  # noqa: E731
        K = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
        try:
            hidden, heads = int(k(K[0].EMBEDDING_LENGTH)), int(k(K[1].HEAD_COUNT))
            m = GgufModel(
                arch=a, hidden=hidden, heads=heads, kv_heads=int(k(K[1].HEAD_COUNT_KV, heads)),
                head_dim=int(k(K[1].KEY_LENGTH, hidden // heads)), n_ff=int(k(K[0].FEED_FORWARD_LENGTH)),
                n_layer=int(k(K[0].BLOCK_COUNT)), vocab=self.shape(tensor_name("embed"))[0],
                context=int(k(K[0].CONTEXT_LENGTH)), norm_eps=float(k(K[1].LAYERNORM_RMS_EPS)),
                rope_base=float(k(K[2].FREQ_BASE, 10000.0)),
                rope_linear=float(k(K[2].SCALING_FACTOR)) if k(K[2].SCALING_TYPE) == "linear" else None,
                rope_freqs=tensor_name("rope_freqs") in self.tensors,
                attn_bias=tensor_name("q_bias", 0) in self.tensors, qk_norm=tensor_name("q_norm", 0) in self.tensors,
                tied=tensor_name("lm_head") not in self.tensors)
        except (TypeError, KeyError) as e:
            raise InputError(f"{self.path}: incomplete {a} metadata or tensors ({e}); not a GGUF lmkiln can run") from None
        want = {s.name: s.shape for s in plan_tensors(m)}
        got = {n: self.shape(n) for n in self.tensors}
        if want != got:
            odd = sorted(set(want.items()) ^ set(got.items()))[:3]
            raise InputError(f"{self.path}: tensors differ from the {a} layout lmkiln runs (e.g. {odd})")
        return m

    def export_info(self) -> dict:
        v = self.get(LMKILN_KEY)
        return json.loads(v) if v else {}


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == struct.pack("<I", gguf.GGUF_MAGIC)


# -- tokenizer ---------------------------------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, i


def _proto_fields(buf: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wt = key & 7
        if wt == 0:
            val, i = _varint(buf, i)
        elif wt == 1:
            val, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wt == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wt}")
        yield key >> 3, val


def sentencepiece_model(path: Path) -> tuple[list[tuple[str, float, int]], bool]:
    """(piece, score, type) of every piece of a SentencePiece `tokenizer.model`, and its
    normalizer's add_dummy_prefix. Read from the protobuf directly (ModelProto: 1 pieces
    {1 piece, 2 score, 3 type}, 3 normalizer_spec {3 add_dummy_prefix}); SentencePiece's
    type numbers are GGUF's token types."""
    pieces, add_prefix = [], True
    try:
        for field, val in _proto_fields(Path(path).read_bytes()):
            if field == 1:
                p = {f: v for f, v in _proto_fields(val)}
                pieces.append((p.get(1, b"").decode("utf-8"), struct.unpack("<f", p[2])[0] if 2 in p else 0.0, p.get(3, 1)))
            elif field == 3:
                add_prefix = bool(dict(_proto_fields(val)).get(3, 1))
    except (ValueError, IndexError, struct.error, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a SentencePiece model ({e})") from None
    return pieces, add_prefix


# Byte-level BPE pre-tokenizer regexes -> llama.cpp's tokenizer.ggml.pre names.
BPE_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def _bpe_pre(tj: dict) -> str | None:
    def regexes(node):
        if isinstance(node, dict):
            if node.get("type") == "Split" and isinstance(node.get("pattern"), dict):
                yield node["pattern"].get("Regex")
            for v in node.values():
                yield from regexes(v)
        elif isinstance(node, list):
            for v in node:
                yield from regexes(v)

    for rx in regexes(tj.get("pre_tokenizer") or {}):
        if rx in BPE_PRE:
            return BPE_PRE[rx]
    return None


def add_tokenizer(w, tok_dir: Path, vocab_size: int, model_ids: dict[str, int | None]) -> dict:
    """Write the tokenizer keys for the files in `tok_dir`; returns a summary (and warnings).

    SentencePiece (`tokenizer.model`): llama.cpp's "llama" vocab: pieces, scores, types.
    Byte-level BPE (`tokenizer.json` only): its "gpt2" vocab: tokens, types, merges and
    the pre-tokenizer name. Either way, tokens the model has beyond the tokenizer become
    unused `[PAD{i}]` tokens, and special ids, add_bos/eos and the chat template come
    from tokenizer_config.json / tokenizer.json (gguf.SpecialVocab). `model_ids` ("bos", "eos", "pad":
    the model's own ids) fill the ones the tokenizer files do not name, as SpecialVocab does from an HF
    directory's config.json (an engine keeps that file only as source_config.json).
    """
    tok_dir = Path(tok_dir)
    tj = read_json(tok_dir / "tokenizer.json", "tokenizer.json") if (tok_dir / "tokenizer.json").is_file() else {}
    added = {int(t["id"]): t for t in tj.get("added_tokens", [])}
    warnings: list[str] = []
    if (tok_dir / "tokenizer.model").is_file():
        kind = "llama"
        pieces, add_prefix = sentencepiece_model(tok_dir / "tokenizer.model")
        tokens, scores, types = [p for p, _, _ in pieces], [s for _, s, _ in pieces], [t for _, _, t in pieces]
        merges = False
    elif tj.get("model", {}).get("type") == "BPE" and not tj["model"].get("byte_fallback"):
        kind = "gpt2"
        vocab = tj["model"]["vocab"]
        tokens = [None] * (max(vocab.values()) + 1)
        for t, i in vocab.items():
            tokens[i] = t
        tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
        scores, types = None, [int(gguf.TokenType.NORMAL)] * len(tokens)
        add_prefix, merges = None, True
    else:
        raise InputError(f"{tok_dir}: no tokenizer.model (SentencePiece) and no byte-level BPE tokenizer.json; "
                         "lmkiln writes GGUF vocabularies of those two kinds only")
    for i, t in sorted(added.items()):
        typ = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
        while len(tokens) <= i:
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(int(gguf.TokenType.UNUSED))
            if scores is not None:
                scores.append(-1000.0)
        if tokens[i] != t["content"] or types[i] == gguf.TokenType.NORMAL:
            tokens[i], types[i] = t["content"], typ
    if len(tokens) > vocab_size:
        raise InputError(f"{tok_dir}: the tokenizer has {len(tokens)} tokens, the model's embedding only {vocab_size} rows")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
        if scores is not None:
            scores.append(-1000.0)
    w.add_tokenizer_model(kind)
    if kind == "gpt2":
        pre = _bpe_pre(tj)
        if pre is None:
            pre = "default"
            warnings.append("the tokenizer's pre-tokenizer regex is not one lmkiln maps to a llama.cpp name; "
                            "wrote tokenizer.ggml.pre = default, so llama.cpp may split text differently")
        w.add_tokenizer_pre(pre)
    else:
        w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    if add_prefix is not None:
        w.add_add_space_prefix(add_prefix)
    log = logging.getLogger("gguf.vocab")  # it warns about post-processor details llama.cpp ignores too
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(tok_dir, load_merges=merges, n_vocab=vocab_size)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError) as e:  # a damaged tokenizer_config.json & co
        raise InputError(f"{tok_dir}: cannot read the tokenizer's special tokens ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); repair or replace the tokenizer files") from None
    finally:
        log.setLevel(level)
    for typ, tid in model_ids.items():
        if typ not in special.special_token_ids and isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < vocab_size:
            special.special_token_ids[typ] = tid
    special.add_to_gguf(w, quiet=True)
    return {"model": kind, "tokens": len(tokens), "merges": len(special.merges), "special": dict(special.special_token_ids),
            "chat_template": special.chat_template is not None, "warnings": warnings}
