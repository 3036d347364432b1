"""Engine format v1: names, expected shapes, the validating reader and the writer.

docs/engine-format.md is normative; this module implements it. The reader checks the
manifest, the tensor index against the shapes the model config implies, and every
weight file's header (and, with `check=True`, its sha256) before any weight is read.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from lmkiln.errors import ChecksumError, EngineFormatError, InputError
from lmkiln.formats.safetensors_io import CODES, DTYPES, StreamWriter, read_header, sha256_file

FORMAT = "lmkiln-engine"
VERSION = 1
MANIFEST = "manifest.json"
SHARED_FILE = "shared.safetensors"
WEIGHT_TYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in WEIGHT_TYPES.items()}
REQUIRED_MODEL = {
    "architecture": str, "head_num": int, "kv_head_num": int, "size_per_head": int, "hidden_units": int,
    "inter_size": int, "num_layer": int, "vocab_size": int, "norm_eps": float, "rope": dict,
    "attn_bias": bool, "qk_norm": bool, "tie_word_embeddings": bool, "max_position_embeddings": int,
    "eos_token_id": list, "hidden_act": str,
}


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def kv_heads_per_rank(kv_head_num: int, tp: int) -> int:
    return max(kv_head_num // tp, 1)


def expected_tensors(model: dict, tp: int, inter_padded: int, dtype: torch.dtype) -> list[tuple[str, str, torch.dtype, tuple[int, ...]]]:
    """Every tensor an fp engine must hold, in file-writing order: (name, file, dtype, shape).

    This is the single definition of the layout; the converter writes exactly this
    list and the reader demands exactly it.
    """
    h, hd, hq = model["hidden_units"], model["size_per_head"], model["head_num"]
    kv_r = kv_heads_per_rank(model["kv_head_num"], tp)
    qkv_r = (hq // tp + 2 * kv_r) * hd
    out = [("tok_embeddings.weight", SHARED_FILE, dtype, (model["vocab_size"], h))]
    for i in range(model["num_layer"]):
        p = f"layers.{i}"
        out += [(f"{p}.attention_norm.weight", SHARED_FILE, dtype, (h,)), (f"{p}.ffn_norm.weight", SHARED_FILE, dtype, (h,))]
        if model["qk_norm"]:
            out += [(f"{p}.attention.q_norm.weight", SHARED_FILE, dtype, (hd,)), (f"{p}.attention.k_norm.weight", SHARED_FILE, dtype, (hd,))]
        for r in range(tp):
            f = rank_file(r)
            out.append((f"{p}.attention.w_qkv.{r}.weight", f, dtype, (h, qkv_r)))
            if model["attn_bias"]:
                out.append((f"{p}.attention.w_qkv.{r}.bias", f, dtype, (qkv_r,)))
            out += [
                (f"{p}.attention.wo.{r}.weight", f, dtype, (hq * hd // tp, h)),
                (f"{p}.feed_forward.w13.{r}.weight", f, dtype, (h, 2 * inter_padded // tp)),
                (f"{p}.feed_forward.w2.{r}.weight", f, dtype, (inter_padded // tp, h)),
            ]
    out.append(("norm.weight", SHARED_FILE, dtype, (h,)))
    if not model["tie_word_embeddings"]:
        out.append(("output.weight", SHARED_FILE, dtype, (h, model["vocab_size"])))
    return out


class EngineWriter:
    """Streams the planned tensors into their files inside an (atomic) output directory."""

    def __init__(self, out_dir: Path, plan: list[tuple[str, str, torch.dtype, tuple[int, ...]]]):
        self.out_dir = Path(out_dir)
        self.plan = plan
        files: dict[str, list] = {}
        for name, fname, dtype, shape in plan:
            files.setdefault(fname, []).append((name, dtype, shape))
        self._file_of = {name: fname for name, fname, _, _ in plan}
        self._writers = {f: StreamWriter(self.out_dir / f, specs, {"format": "pt"}) for f, specs in files.items()}

    def write(self, name: str, t: torch.Tensor) -> None:
        self._writers[self._file_of[name]].write(name, t)

    def close(self) -> dict[str, dict]:
        return {f: {"sha256": w.close(), "size": w.size} for f, w in sorted(self._writers.items())}

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


class Engine:
    """A validated engine directory. Construction reads no weight data."""

    def __init__(self, path: str | Path, check: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: no such engine directory")
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise EngineFormatError(f"{self.path}: no {MANIFEST}; not an lmkiln engine (convert one with `lmkiln convert hf-to-engine`)")
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineFormatError(f"{mpath}: not valid JSON ({e}); the engine is corrupt, re-run the conversion") from None
        self.manifest = m
        self._validate_manifest()
        self._validate_files(check)
        self._handles: dict[str, object] = {}

    # -- validation ------------------------------------------------------------------

    def _fail(self, msg: str) -> None:
        raise EngineFormatError(f"{self.path}: {msg}")

    def _validate_manifest(self) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            self._fail(f"manifest format is {m.get('format') if isinstance(m, dict) else None!r}, expected {FORMAT!r}")
        v = m.get("format_version")
        if not isinstance(v, int):
            self._fail("manifest has no integer format_version")
        if v > VERSION:
            self._fail(f"engine format version {v} is newer than this lmkiln reads ({VERSION}); upgrade lmkiln")
        if v < 1:
            self._fail(f"engine format version {v} is invalid")
        model = m.get("model")
        if not isinstance(model, dict):
            self._fail("manifest has no 'model' object")
        for key, typ in REQUIRED_MODEL.items():
            val = model.get(key)
            ok = isinstance(val, typ) or (typ is float and isinstance(val, int) and not isinstance(val, bool))
            if not ok or (typ is int and isinstance(val, bool)):
                self._fail(f"manifest model.{key} must be {typ.__name__}, got {val!r}")
        wt = m.get("weight_type")
        if wt not in WEIGHT_TYPES:
            self._fail(f"weight_type {wt!r} is not one of {sorted(WEIGHT_TYPES)}")
        tp = m.get("tensor_parallel")
        if not isinstance(tp, int) or tp < 1:
            self._fail(f"tensor_parallel must be a positive integer, got {tp!r}")
        inter_p = model.get("inter_size_padded")
        if not isinstance(inter_p, int) or inter_p < model["inter_size"] or inter_p % tp:
            self._fail(f"model.inter_size_padded {inter_p!r} must be >= inter_size and a multiple of tensor_parallel")
        index = m.get("tensors")
        if not isinstance(index, dict):
            self._fail("manifest has no 'tensors' index")
        expected = expected_tensors(model, tp, inter_p, WEIGHT_TYPES[wt])
        want = {name: (f, DTYPE_NAMES.get(dt, str(dt)), list(shape)) for name, f, dt, shape in expected}
        for name in want:
            if name not in index:
                self._fail(f"tensor {name!r} is missing from the manifest index; the engine is incomplete, re-run the conversion")
        for name, entry in index.items():
            if name not in want:
                self._fail(f"tensor {name!r} in the manifest is not part of format v{VERSION} for this model")
            got = (entry.get("file"), entry.get("dtype"), entry.get("shape"))
            if got != want[name]:
                self._fail(f"tensor {name!r}: manifest says file/dtype/shape {got}, the model config implies {want[name]}")
        files = m.get("files")
        if not isinstance(files, dict) or set(files) != {f for f, _, _ in want.values()}:
            self._fail(f"manifest 'files' must list exactly the weight files {sorted({f for f, _, _ in want.values()})}")

    def _validate_files(self, check: bool) -> None:
        index = self.manifest["tensors"]
        for fname, meta in self.manifest["files"].items():
            fpath = self.path / fname
            if not fpath.is_file():
                self._fail(f"weight file {fname} is missing")
            size = fpath.stat().st_size
            if size != meta.get("size"):
                self._fail(f"weight file {fname} is {size} bytes, manifest says {meta.get('size')}; truncated or replaced, re-run the conversion")
            header, _ = read_header(fpath)
            in_file = {n for n, e in index.items() if e["file"] == fname}
            if set(header) != in_file:
                odd = sorted(set(header) ^ in_file)[:3]
                self._fail(f"weight file {fname} holds different tensors than the manifest says (e.g. {odd})")
            for n in in_file:
                info = header[n]
                if info.dtype != CODES[WEIGHT_TYPES[index[n]["dtype"]]] or list(info.shape) != index[n]["shape"]:
                    self._fail(f"tensor {n!r} in {fname} is {info.dtype} {list(info.shape)}, manifest says {index[n]['dtype']} {index[n]['shape']}")
            if check:
                digest = sha256_file(fpath)
                if digest != meta.get("sha256"):
                    raise ChecksumError(f"{fpath}: sha256 {digest[:12]}… does not match the manifest's {str(meta.get('sha256'))[:12]}…; the file is corrupt, re-run the conversion")

    def verify_checksums(self) -> dict[str, bool]:
        return {f: sha256_file(self.path / f) == meta.get("sha256") for f, meta in self.manifest["files"].items()}

    # -- access ----------------------------------------------------------------------

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def tp(self) -> int:
        return self.manifest["tensor_parallel"]

    @property
    def dtype(self) -> torch.dtype:
        return WEIGHT_TYPES[self.manifest["weight_type"]]

    def get(self, name: str) -> torch.Tensor:
        entry = self.manifest["tensors"].get(name)
        if entry is None:
            raise EngineFormatError(f"{self.path}: no tensor {name!r} in this engine")
        h = self._handles.get(entry["file"])
        if h is None:
            h = self._handles[entry["file"]] = safe_open(str(self.path / entry["file"]), framework="pt")
        return h.get_tensor(name)

    def has(self, name: str) -> bool:
        return name in self.manifest["tensors"]


__all__ = ["Engine", "EngineWriter", "expected_tensors", "is_engine", "DTYPES"]
