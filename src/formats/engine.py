"""Engine format: names, expected shapes, the validating reader and the writer.

docs/engine-format.md is normative; this module implements it. The reader checks the
manifest, the tensor index against the shapes the model config implies, and every
weight file's header (and, with `check=True`, its checksum: blake3, or sha256 in engines
written before format v3) before any weight is read.
Quantized engines (weight_type int4/int8) are the same layout with each linear
weight replaced by qweight/scales/zeros; `expected_tensors` defines both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from lmkiln.errors import ChecksumError, EngineFormatError, InputError, SafetensorsFormatError
from lmkiln.formats.packing import round_up
from lmkiln.formats.safetensors_io import CHECKSUMS, CODES, DTYPES, InFlight, StreamWriter, file_digest, read_header

FORMAT = "lmkiln-engine"
VERSION = 4  # what this lmkiln reads and writes; earlier lmkiln wrote 1, 2 (FAMILY_FIELDS) or 3 (blake3 checksums)
# Format v3 = v2 with each weight file's checksum a `blake3` (all cores, ~4.5 GB/s per core with AVX2/AVX-512)
# instead of a `sha256` (one core, 0.25 GB/s without SHA-NI: the bound of a conversion). A v2 reader would
# refuse a blake3-only `files` entry anyway, with a misleading message; v3 makes it say "upgrade lmkiln".
# Format v4 = v3 with every fp linear weight stored in Hugging Face's orientation, (out, in), instead of
# (in, out): a conversion then copies rows instead of transposing ~93 % of the bytes (the bound of
# `convert` at fp16: a 2-byte transpose runs at 0.7 GB/s here). Readers see no difference: `Engine.get`
# returns such a tensor as the (in, out) view of what is stored, for every version.
OUT_IN_SINCE = 4
CHECKSUM = "blake3"  # what the writer records; readers verify whichever of CHECKSUMS an entry has
CHECKSUM_SINCE = {"sha256": 1, "blake3": 3}  # the first format version each checksum may appear in
MANIFEST = "manifest.json"
SHARED_FILE = "shared.safetensors"
WEIGHT_TYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in WEIGHT_TYPES.items()}
QUANT_TYPES = {"int4": 4, "int8": 8}  # weight_type -> bits
ROPE_TYPES = ("default", "linear", "llama3")  # what src/convert/rope.py implements
# dtype names used in the manifest's tensor index (fp weight types plus the code/zero byte type)
TENSOR_DTYPES = {**WEIGHT_TYPES, "uint8": torch.uint8}
TENSOR_DTYPE_NAMES = {v: k for k, v in TENSOR_DTYPES.items()}
# Per-layer linear weights, by engine name without the `layers.{i}.` prefix and rank suffix.
LINEAR_KINDS = ("attention.w_qkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")
MOE_KINDS = ("attention.w_qkv", "attention.wo", "moe.w13", "moe.w2")  # a mixture-of-experts layer's: experts stacked
QUANT_REQUIRED = {"bits": int, "granularity": str, "group_size": (int, type(None)), "symmetric": bool,
                  "hidden_padded": int, "unquantized": list}
QUANT_OPTIONAL = {"requested_group_size": int, "method": (str, type(None)), "source_layout": (str, type(None))}
REQUIRED_MODEL = {
    "architecture": str, "head_num": int, "kv_head_num": int, "size_per_head": int, "hidden_units": int,
    "inter_size": int, "num_layer": int, "vocab_size": int, "norm_eps": float, "rope": dict,
    "attn_bias": bool, "qk_norm": bool, "tie_word_embeddings": bool, "max_position_embeddings": int,
    "eos_token_id": list, "hidden_act": str,
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Format v2 = v1 + these model fields (Gemma 2/3 and later families). Each has the value that
# means "as v1"; an engine whose model block leaves them all at that value is written as v1
# (byte-identical to earlier lmkiln, readable by it), any other as v2, which v1 readers refuse.
FAMILY_FIELDS = {
    "norm_offset": 0.0,  # RMSNorm computes x_hat * (norm_offset + w) in fp32 (Gemma: 1)
    "sandwich_norm": False,  # post-attention / post-FFN norms before each residual add (+2 tensors per layer)
    "embed_scale": None,  # embeddings multiplied by this, rounded to the compute dtype
    "attn_softcap": None,  # attention scores -> cap * tanh(score / cap) before the mask
    "final_softcap": None,  # logits -> cap * tanh(logit / cap)
    "query_pre_attn_scalar": None,  # attention scale = this ** -0.5 (default head_dim ** -0.5)
    "layer_types": None,  # per layer "full_attention" | "sliding_attention": the window applies to the latter only
    "rope_local": None,  # rope block of the sliding layers when it differs from `rope`
    "num_experts": None,  # mixture of experts: experts per layer (router + stacked experts replace the FFN)
    "experts_per_token": None,  # top-k experts each token is routed to
    "norm_topk": None,  # renormalise the top-k routing weights to sum to 1
}


def layer_kinds(model: dict) -> tuple[str, ...]:
    return MOE_KINDS if model.get("num_experts") else LINEAR_KINDS


def with_family_defaults(model: dict) -> dict:
    """The model block with every v2 field present (v1 manifests and v1-only models omit them)."""
    return {**FAMILY_FIELDS, **model}


def needed_version(model: dict, files: dict | None = None) -> int:
    """The lowest format version that can hold this model block (and these `files` checksums)."""
    v = 2 if any(model.get(k, d) != d for k, d in FAMILY_FIELDS.items()) else 1
    for meta in (files or {}).values():
        if (c := file_checksum(meta)) is not None:
            v = max(v, CHECKSUM_SINCE[c[0]])
    return v


def file_checksum(meta: dict) -> tuple[str, str] | None:
    """(algorithm, hex digest) a reader verifies for one `files` entry: the first of CHECKSUMS it
    has as a string; None when it has none of them."""
    return next(((a, meta[a]) for a in CHECKSUMS if isinstance(meta.get(a), str)), None)


def manifest_model(model: dict) -> dict:
    """The model block as written: v2 fields only where they differ from v1's meaning."""
    return {k: v for k, v in model.items() if not (k in FAMILY_FIELDS and v == FAMILY_FIELDS[k])}


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def check_tp(head_num: int, kv_head_num: int, tp: int) -> str | None:
    """Why `tp` cannot split these heads, or None when it can."""
    if tp < 1:
        return "--tp must be at least 1"
    if head_num % tp:
        return f"{head_num} attention heads do not split into {tp} ranks"
    if tp <= kv_head_num and kv_head_num % tp:
        return f"{kv_head_num} kv heads do not split into {tp} ranks"
    if tp > kv_head_num and tp % kv_head_num:
        return f"{tp} ranks cannot replicate {kv_head_num} kv heads evenly"
    return None


def kv_heads_per_rank(kv_head_num: int, tp: int) -> int:
    return max(kv_head_num // tp, 1)


def linear_names(model: dict) -> list[str]:
    """Every per-layer linear of the model, e.g. 'layers.0.attention.w_qkv' (no rank suffix)."""
    return [f"layers.{i}.{k}" for i in range(model["num_layer"]) for k in layer_kinds(model)]


def quant_layout(model: dict, tp: int, group_size: int | None) -> tuple[int, int]:
    """(hidden_padded, inter_size_padded) of a quantized engine; group_size None = per channel.

    Grouped: the unsplit inputs (hidden) pad to whole groups, the split one (FFN width)
    to whole groups on every rank. Per channel needs no group padding.
    """
    if group_size is None:
        return model["hidden_units"], round_up(model["inter_size"], tp)
    return round_up(model["hidden_units"], group_size), round_up(model["inter_size"], group_size * tp)


# The fp linear weights: stored (out, in) from format v4 on (`OUT_IN_SINCE`), read as (in, out).
_LINEAR_WEIGHT = re.compile(r"^(output|layers\.\d+\.(moe\.router|(%s)\.\d+))\.weight$"
                            % "|".join(re.escape(k) for k in sorted(set(LINEAR_KINDS + MOE_KINDS))))


def stored_out_in(name: str, version: int) -> bool:
    """Whether tensor `name` of a format-`version` engine is an fp linear weight stored (out, in)."""
    return version >= OUT_IN_SINCE and _LINEAR_WEIGHT.match(name) is not None


def _oriented(shape: tuple[int, ...], version: int) -> tuple[int, ...]:
    """An fp linear weight's stored shape from its (..., in, out) one."""
    return (*shape[:-2], shape[-1], shape[-2]) if version >= OUT_IN_SINCE else shape


def _linear(name: str, file: str, in_fp: int, in_q: int, out: int, dtype: torch.dtype, quant: dict | None,
            experts: int = 0, version: int = VERSION) -> list:
    """The tensor(s) of one rank's linear: fp `.weight` ((out, in) stored from v4, (in, out) before),
    or the quantized triple; `experts` > 0: that many experts' linears stacked along a leading dim."""
    e = (experts,) if experts else ()
    if quant is None or name.rsplit(".", 1)[0] in quant["unquantized"]:
        return [(f"{name}.weight", file, dtype, _oriented((*e, in_fp, out), version))]
    g = quant["group_size"] or in_q  # per channel: one group spanning this rank's input
    cols = out // 2 if quant["bits"] == 4 else out
    return [(f"{name}.qweight", file, torch.uint8, (*e, in_q, cols)),
            (f"{name}.scales", file, torch.float16, (*e, in_q // g, out)),
            (f"{name}.zeros", file, torch.uint8, (*e, in_q // g, out))]


def expected_tensors(model: dict, tp: int, inter_padded: int, dtype: torch.dtype,
                     quant: dict | None = None, version: int = VERSION) -> list[tuple[str, str, torch.dtype, tuple[int, ...]]]:
    """Every tensor an engine must hold, in file-writing order: (name, file, dtype, shape as stored).

    This is the single definition of the layout; the converter writes exactly this
    list and the reader demands exactly it. `dtype` is the dtype of the fp tensors;
    `quant` is the manifest's `quantization` block for int4/int8 engines; `version` the
    format version (fp linear weights are stored (out, in) from v4 on).
    """
    h, hd, hq = model["hidden_units"], model["size_per_head"], model["head_num"]
    h_q = quant["hidden_padded"] if quant else h
    kv_r = kv_heads_per_rank(model["kv_head_num"], tp)
    qkv_r = (hq // tp + 2 * kv_r) * hd
    out = [("tok_embeddings.weight", SHARED_FILE, dtype, (model["vocab_size"], h))]
    for i in range(model["num_layer"]):
        p = f"layers.{i}"
        out += [(f"{p}.attention_norm.weight", SHARED_FILE, dtype, (h,)), (f"{p}.ffn_norm.weight", SHARED_FILE, dtype, (h,))]
        if model.get("sandwich_norm"):
            out += [(f"{p}.post_attention_norm.weight", SHARED_FILE, dtype, (h,)), (f"{p}.post_ffn_norm.weight", SHARED_FILE, dtype, (h,))]
        if model["qk_norm"]:
            out += [(f"{p}.attention.q_norm.weight", SHARED_FILE, dtype, (hd,)), (f"{p}.attention.k_norm.weight", SHARED_FILE, dtype, (hd,))]
        for r in range(tp):
            f = rank_file(r)
            out += _linear(f"{p}.attention.w_qkv.{r}", f, h, h_q, qkv_r, dtype, quant, version=version)
            if model["attn_bias"]:
                out.append((f"{p}.attention.w_qkv.{r}.bias", f, dtype, (qkv_r,)))
            out += _linear(f"{p}.attention.wo.{r}", f, hq * hd // tp, hq * hd // tp, h, dtype, quant, version=version)
            ffn, n_exp = ("moe", model["num_experts"]) if model.get("num_experts") else ("feed_forward", 0)
            if n_exp and r == 0:  # the router is replicated, like the norms
                out.append((f"{p}.moe.router.weight", SHARED_FILE, dtype, _oriented((h, n_exp), version)))
            out += _linear(f"{p}.{ffn}.w13.{r}", f, h, h_q, 2 * inter_padded // tp, dtype, quant, n_exp, version)
            out += _linear(f"{p}.{ffn}.w2.{r}", f, inter_padded // tp, inter_padded // tp, h, dtype, quant, n_exp, version)
    out.append(("norm.weight", SHARED_FILE, dtype, (h,)))
    if not model["tie_word_embeddings"]:
        out.append(("output.weight", SHARED_FILE, dtype, _oriented((h, model["vocab_size"]), version)))
    return out


def manifest_index(plan: list[tuple[str, str, torch.dtype, tuple[int, ...]]]) -> dict[str, dict]:
    return {n: {"file": f, "dtype": TENSOR_DTYPE_NAMES[dt], "shape": list(s)} for n, f, dt, s in plan}


class EngineWriter:
    """Streams the planned tensors into their files inside an (atomic) output directory.

    `threads=True`: each file is written and hashed by its own background threads while the
    caller produces the next tensor (StreamWriter's `inflight` mode, at most `inflight_bytes`
    queued over all files); the caller must not modify a tensor after writing it."""

    def __init__(self, out_dir: Path, plan: list[tuple[str, str, torch.dtype, tuple[int, ...]]],
                 threads: bool = False, inflight_bytes: int = 128 << 20):
        self.out_dir = Path(out_dir)
        self.plan = plan
        files: dict[str, list] = {}
        for name, fname, dtype, shape in plan:
            files.setdefault(fname, []).append((name, dtype, shape))
        self._file_of = {name: fname for name, fname, _, _ in plan}
        inflight = InFlight(inflight_bytes) if threads else None
        self._writers = {}
        try:
            for f, specs in files.items():
                self._writers[f] = StreamWriter(self.out_dir / f, specs, {"format": "pt"}, inflight, checksum=CHECKSUM)
        except BaseException:
            self.abort()  # stops the threads of the files already opened
            raise

    def write(self, name: str, t: torch.Tensor) -> None:
        self._writers[self._file_of[name]].write(name, t)

    def close(self) -> dict[str, dict]:
        return {f: {CHECKSUM: w.close(), "size": w.size} for f, w in sorted(self._writers.items())}

    def abort(self) -> None:
        for w in self._writers.values():
            w.abort()


def write_manifest(out_dir: Path, manifest: dict) -> None:
    (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def config_sha256(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def copy_side_files(files: list[Path], out_dir: Path) -> list[str]:
    names = []
    for p in files:
        shutil.copyfile(p, Path(out_dir) / p.name)
        names.append(p.name)
    return names


def is_engine(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def headless_engine(path: Path) -> bool:
    """An engine's weight files without its manifest (written last: an interrupted or damaged engine)."""
    p = Path(path)
    return not (p / MANIFEST).is_file() and ((p / SHARED_FILE).is_file() or any(p.glob("rank*.safetensors")))


def missing_manifest(path: Path) -> str:
    return (f"{path}: an lmkiln engine's weight files without its {MANIFEST}; the engine is incomplete or damaged "
            "(the manifest is written last): convert it again")


class Engine:
    """A validated engine directory. Construction reads no weight data."""

    def __init__(self, path: str | Path, check: bool = False, background: bool = False):
        """`check`: verify every weight file's checksum against the manifest, before returning;
        with `background` too, in threads while the caller goes on (reading the weights):
        `wait_checked()` then waits for the result and raises ChecksumError."""
        self.path = Path(path)
        self._pending: dict | None = None
        if not self.path.is_dir():
            raise InputError(f"{self.path}: no such engine directory")
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            if headless_engine(self.path):
                raise EngineFormatError(missing_manifest(self.path))
            raise EngineFormatError(f"{self.path}: no {MANIFEST}; not an lmkiln engine (convert one with `lmkiln convert hf-to-engine`)")
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineFormatError(f"{mpath}: not valid JSON ({e}); the engine is corrupt, re-run the conversion") from None
        self.manifest = m
        self._validate_manifest()
        self._validate_files(check and not background)
        self._handles: dict[str, object] = {}
        if check and background:
            self._start_check()

    # -- validation ------------------------------------------------------------------

    def _fail(self, msg: str) -> None:
        raise EngineFormatError(f"{self.path}: {msg}")

    def _validate_manifest(self) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            self._fail(f"manifest format is {m.get('format') if isinstance(m, dict) else None!r}, expected {FORMAT!r}")
        v = m.get("format_version")
        if not isinstance(v, int) or isinstance(v, bool):
            self._fail("manifest has no integer format_version")
        if v > VERSION:
            self._fail(f"engine format version {v} is newer than this lmkiln reads ({VERSION}); upgrade lmkiln")
        if v < 1:
            self._fail(f"engine format version {v} is invalid")
        model = m.get("model")
        if not isinstance(model, dict):
            self._fail("manifest has no 'model' object")
        if v < needed_version(model):
            self._fail(f"model fields {[k for k, d in FAMILY_FIELDS.items() if model.get(k, d) != d]} need format version 2, "
                       f"the manifest says {v}")
        m["model"] = model = with_family_defaults(model)
        for key, typ in REQUIRED_MODEL.items():
            val = model.get(key)
            ok = isinstance(val, typ) or (typ is float and isinstance(val, int) and not isinstance(val, bool))
            if not ok or (typ is int and (isinstance(val, bool) or val < 1)):
                self._fail(f"manifest model.{key} must be {'a positive ' if typ is int else ''}{typ.__name__}, got {val!r}")
        wt = m.get("weight_type")
        if wt not in WEIGHT_TYPES and wt not in QUANT_TYPES:
            self._fail(f"weight_type {wt!r} is not one of {sorted(WEIGHT_TYPES) + sorted(QUANT_TYPES)}")
        tp = m.get("tensor_parallel")
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            self._fail(f"tensor_parallel must be a positive integer, got {tp!r}")
        why = check_tp(model["head_num"], model["kv_head_num"], tp)
        if why:
            self._fail(f"tensor_parallel {tp}: {why}")
        eos = model["eos_token_id"]
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < model["vocab_size"] for t in eos):
            self._fail(f"manifest model.eos_token_id must list token ids below vocab_size {model['vocab_size']}, got {eos!r}")
        self._validate_rope(model["rope"], model)
        if model["rope_local"] is not None:
            if not isinstance(model["rope_local"], dict):
                self._fail(f"model.rope_local must be null or a rope object, got {model['rope_local']!r}")
            self._validate_rope(model["rope_local"], model)
        self._validate_family(model)
        sw = model.get("sliding_window")
        if sw is not None and (not isinstance(sw, int) or isinstance(sw, bool) or sw < 1):
            self._fail(f"model.sliding_window must be null or a positive integer, got {sw!r}")
        inter_p = model.get("inter_size_padded")
        if not isinstance(inter_p, int) or inter_p < model["inter_size"] or inter_p % tp:
            self._fail(f"model.inter_size_padded {inter_p!r} must be >= inter_size and a multiple of tensor_parallel")
        quant = None
        if wt in QUANT_TYPES:
            fp = m.get("fp_dtype")
            if fp not in WEIGHT_TYPES:
                self._fail(f"weight_type {wt!r} needs fp_dtype, one of {sorted(WEIGHT_TYPES)}; got {fp!r}")
            quant = self._validate_quant(wt, model, tp, inter_p)
            dtype = WEIGHT_TYPES[fp]
        else:
            if "quantization" in m or ("fp_dtype" in m and m["fp_dtype"] != wt):
                self._fail(f"weight_type {wt!r} contradicts the manifest's quantization block or fp_dtype")
            dtype = WEIGHT_TYPES[wt]
        index = m.get("tensors")
        if not isinstance(index, dict):
            self._fail("manifest has no 'tensors' index")
        expected = expected_tensors(model, tp, inter_p, dtype, quant, v)
        want = {name: (f, TENSOR_DTYPE_NAMES[dt], list(shape)) for name, f, dt, shape in expected}
        for name in want:
            if name not in index:
                self._fail(f"tensor {name!r} is missing from the manifest index; the engine is incomplete, re-run the conversion")
        for name, entry in index.items():
            if name not in want:
                self._fail(f"tensor {name!r} in the manifest is not part of format v{v} for this model")
            got = (entry.get("file"), entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else entry
            if got != want[name]:
                self._fail(f"tensor {name!r}: manifest says file/dtype/shape {got}, the model config implies {want[name]}")
        side = m.get("tokenizer_files", [])
        # plain names beside the manifest: exports copy these files, so "../x" or "/etc/x" would copy any file anywhere
        if not isinstance(side, list) or not all(isinstance(f, str) and f and Path(f).name == f and f not in (".", "..")
                                                 for f in side):
            self._fail(f"manifest tokenizer_files must list file names inside the engine directory, got {side!r}")
        files = m.get("files")
        if not isinstance(files, dict) or set(files) != {f for f, _, _ in want.values()}:
            self._fail(f"manifest 'files' must list exactly the weight files {sorted({f for f, _, _ in want.values()})}")
        for fname, meta in files.items():
            if not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or isinstance(meta.get("size"), bool):
                self._fail(f"manifest files[{fname!r}] must be an object with an integer size and a checksum, got {meta!r}")
            algo = file_checksum(meta)
            if algo is None:
                self._fail(f"manifest files[{fname!r}] has no checksum this lmkiln knows (keys {sorted(meta)}, "
                           f"known: {', '.join(CHECKSUMS)}); upgrade lmkiln")
            if v < CHECKSUM_SINCE[algo[0]]:
                self._fail(f"manifest files[{fname!r}] has a {algo[0]} checksum, which needs format version "
                           f"{CHECKSUM_SINCE[algo[0]]}; the manifest says {v}")

    def _validate_family(self, model: dict) -> None:
        if model["hidden_act"] not in ACTIVATIONS:
            self._fail(f"model.hidden_act {model['hidden_act']!r} is not one of {list(ACTIVATIONS)}")
        for k in ("norm_offset", "embed_scale", "attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            val = model[k]
            if val is None and k != "norm_offset":
                continue
            if isinstance(val, bool) or not isinstance(val, (int, float)) or (k != "norm_offset" and val <= 0):
                self._fail(f"model.{k} must be {'a number' if k == 'norm_offset' else 'null or a positive number'}, got {val!r}")
        if not isinstance(model["sandwich_norm"], bool):
            self._fail(f"model.sandwich_norm must be true or false, got {model['sandwich_norm']!r}")
        ne, k = model["num_experts"], model["experts_per_token"]
        if ne is not None and (not isinstance(ne, int) or isinstance(ne, bool) or ne < 1 or not isinstance(k, int)
                               or isinstance(k, bool) or not 1 <= k <= ne or not isinstance(model["norm_topk"], bool)):
            self._fail(f"model.num_experts {ne!r} / experts_per_token {k!r} / norm_topk {model['norm_topk']!r}: "
                       "need experts >= 1, 1 <= top-k <= experts and a boolean norm_topk")
        lt = model["layer_types"]
        if lt is not None and (not isinstance(lt, list) or len(lt) != model["num_layer"] or not set(lt) <= set(LAYER_TYPES)):
            self._fail(f"model.layer_types must be null or one of {list(LAYER_TYPES)} per layer, got {lt!r}")
        if lt is not None and not model.get("sliding_window"):
            self._fail("model.layer_types has sliding_attention layers but sliding_window is null")

    def _validate_rope(self, rope: dict, model: dict) -> None:
        base, scaling = rope.get("base"), rope.get("scaling")
        if rope.get("type") not in ROPE_TYPES:
            self._fail(f"model.rope.type {rope.get('type')!r} is not one of {list(ROPE_TYPES)}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 0:
            self._fail(f"model.rope.base must be a positive number, got {base!r}")
        if rope.get("dim") != model["size_per_head"]:
            self._fail(f"model.rope.dim {rope.get('dim')!r} must equal size_per_head {model['size_per_head']}")
        if (rope["type"] == "default") != (scaling is None) or not (scaling is None or isinstance(scaling, dict)):
            self._fail(f"model.rope.scaling must be null for rope type 'default' and an object otherwise, got {scaling!r}")
        needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        missing = [k for k in needs.get(rope["type"], ()) if not isinstance(scaling.get(k), (int, float))]
        if missing:
            self._fail(f"model.rope.scaling for {rope['type']!r} needs numbers {missing}")

    def _validate_quant(self, wt: str, model: dict, tp: int, inter_p: int) -> dict:
        """The `quantization` block: known keys only, types, and the padding rules."""
        q = self.manifest.get("quantization")
        if not isinstance(q, dict):
            self._fail(f"weight_type {wt!r} needs a 'quantization' object")
        unknown = sorted(set(q) - set(QUANT_REQUIRED) - set(QUANT_OPTIONAL))
        if unknown:
            self._fail(f"quantization has keys this lmkiln does not know ({unknown}); upgrade lmkiln")
        for key, typ in [*QUANT_REQUIRED.items(), *((k, t) for k, t in QUANT_OPTIONAL.items() if k in q)]:
            if key not in q or not isinstance(q[key], typ) or (isinstance(q[key], bool) and typ is not bool):
                self._fail(f"quantization.{key} is missing or has the wrong type: {q.get(key)!r}")
        if q["bits"] != QUANT_TYPES[wt]:
            self._fail(f"quantization.bits {q['bits']} contradicts weight_type {wt!r}")
        h, width = model["hidden_units"], model["head_num"] * model["size_per_head"]
        g = q["group_size"]
        if q["granularity"] == "group":
            if g is None or g < 1:
                self._fail(f"quantization.group_size must be a positive integer for granularity 'group', got {g!r}")
            if (width // tp) % g:
                self._fail(f"attention output width {width} / {tp} ranks is not a multiple of group_size {g}")
            if inter_p % (g * tp):
                self._fail(f"model.inter_size_padded {inter_p} is not a multiple of group_size x tensor_parallel = {g * tp}")
        elif q["granularity"] == "channel":
            if g is not None:
                self._fail(f"quantization.group_size must be null for granularity 'channel', got {g!r}")
        else:
            self._fail(f"quantization.granularity must be 'group' or 'channel', got {q['granularity']!r}")
        if q["hidden_padded"] != quant_layout(model, tp, g)[0]:
            self._fail(f"quantization.hidden_padded {q['hidden_padded']} must be {quant_layout(model, tp, g)[0]}")
        if q["bits"] == 4 and (h % 2 or model["size_per_head"] % 2):
            self._fail("int4 packs two output columns per byte; hidden size and head dim must be even")
        names = set(linear_names(model))
        unq = q["unquantized"]
        if not all(isinstance(n, str) for n in unq) or len(set(unq)) != len(unq) or not set(unq) <= names:
            self._fail(f"quantization.unquantized must list distinct linears of this model (e.g. 'layers.0.feed_forward.w2'), got {q['unquantized']!r}")
        return q

    def _validate_files(self, check: bool) -> None:
        index = self.manifest["tensors"]
        for fname, meta in self.manifest["files"].items():
            fpath = self.path / fname
            if not fpath.is_file():
                self._fail(f"weight file {fname} is missing")
            size = fpath.stat().st_size
            if size != meta.get("size"):
                self._fail(f"weight file {fname} is {size} bytes, manifest says {meta.get('size')}; truncated or replaced, re-run the conversion")
            try:
                header, _ = read_header(fpath)
            except SafetensorsFormatError as e:
                raise EngineFormatError(f"{e}; re-run the conversion") from None
            in_file = {n for n, e in index.items() if e["file"] == fname}
            if set(header) != in_file:
                odd = sorted(set(header) ^ in_file)[:3]
                self._fail(f"weight file {fname} holds different tensors than the manifest says (e.g. {odd})")
            for n in in_file:
                info = header[n]
                if info.dtype != CODES[TENSOR_DTYPES[index[n]["dtype"]]] or list(info.shape) != index[n]["shape"]:
                    self._fail(f"tensor {n!r} in {fname} is {info.dtype} {list(info.shape)}, manifest says {index[n]['dtype']} {index[n]['shape']}")
        if check:
            self._check_files()

    def _start_check(self) -> None:
        """Hash every weight file in background threads (one per file; blake3 spreads each over
        the cores, both hashes release the GIL); `wait_checked` compares. The reads also warm
        the page cache for the weights' own reads."""
        from concurrent.futures import ThreadPoolExecutor

        files = self.manifest["files"]
        self._stop_check = threading.Event()
        pool = ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1)), thread_name_prefix="checksum")
        self._pending = {f: pool.submit(file_digest, self.path / f, file_checksum(meta)[0], stop=self._stop_check)
                         for f, meta in files.items()}
        pool.shutdown(wait=False)

    def wait_checked(self) -> None:
        """Wait for a background check (`background=True`); a mismatch raises ChecksumError."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._compare_digests({f: fut.result() for f, fut in pending.items()})

    def stop_check(self) -> None:
        """Abandon a background check (the caller failed anyway)."""
        if self._pending is not None:
            self._stop_check.set()
            self._pending = None

    def _compare_digests(self, digests: dict[str, str]) -> None:
        for fname, meta in self.manifest["files"].items():
            algo, want = file_checksum(meta)
            if digests[fname] != want:
                raise ChecksumError(f"{self.path / fname}: {algo} {digests[fname][:12]}… does not match the manifest's "
                                    f"{want[:12]}…; the file is corrupt: re-run the conversion "
                                    "(--no-check skips this check)")

    def _digests(self) -> dict[str, str]:
        """Every weight file's digest in the algorithm its manifest entry names, files in
        parallel (blake3 also spreads each file over the cores; both release the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        files = self.manifest["files"]
        with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
            return dict(zip(files, pool.map(lambda f: file_digest(self.path / f, file_checksum(files[f])[0]), files)))

    def _check_files(self) -> None:
        """Every weight file's checksum against the manifest: a flipped byte is a ChecksumError naming the file."""
        self._compare_digests(self._digests())

    def verify_checksums(self) -> dict[str, bool]:
        digests = self._digests()
        return {f: digests[f] == file_checksum(meta)[1] for f, meta in self.manifest["files"].items()}

    # -- access ----------------------------------------------------------------------

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def tp(self) -> int:
        return self.manifest["tensor_parallel"]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the fp tensors (all of them in an fp engine)."""
        return WEIGHT_TYPES[self.manifest.get("fp_dtype", self.manifest["weight_type"])]

    @property
    def quant(self) -> dict | None:
        """The `quantization` block of an int4/int8 engine, None for an fp engine."""
        return self.manifest.get("quantization")

    def is_quantized(self, linear: str) -> bool:
        """Whether per-layer linear `linear` (e.g. 'layers.0.attention.wo') is stored quantized."""
        q = self.quant
        return q is not None and linear not in q["unquantized"]

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`; an fp linear weight as (in, out) whatever the version stores (from v4
        the transposed view of its (out, in) bytes: a matmul reads it as it is, no copy)."""
        entry = self.manifest["tensors"].get(name)
        if entry is None:
            raise EngineFormatError(f"{self.path}: no tensor {name!r} in this engine")
        h = self._handles.get(entry["file"])
        if h is None:
            h = self._handles[entry["file"]] = safe_open(str(self.path / entry["file"]), framework="pt")
        t = h.get_tensor(name)
        return t.transpose(-2, -1) if stored_out_in(name, self.manifest["format_version"]) else t

    def has(self, name: str) -> bool:
        return name in self.manifest["tensors"]


__all__ = ["Engine", "EngineWriter", "expected_tensors", "is_engine", "DTYPES", "QUANT_TYPES", "quant_layout"]
