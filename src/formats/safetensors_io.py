"""Safetensors at the byte level: a validating header reader and a streaming writer.

The safetensors library loads a file's tensors lazily but trusts its header and only
fails (or reads garbage) once data is touched, and its writer needs every tensor in
memory at once. lmkiln needs both ends done differently: a reader that checks a file
completely *before* touching data (so a truncated download is a clear error naming
the file), and a writer that streams tensors one at a time (so converting a 70B model
never holds it twice) while hashing the bytes as they go.

File layout (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
"__metadata__": {str: str}}, then the data region; offsets are relative to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkiln.errors import SafetensorsFormatError

# safetensors dtype code <-> torch dtype, and the item size that validates offsets.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}

MAX_HEADER = 100 * 1024 * 1024  # same bound as the reference implementation


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and fully validate a safetensors header; returns (tensors, metadata).

    Checks: header length sane, JSON well formed, known dtypes, non-negative shapes,
    each tensor's byte span equal to prod(shape) * itemsize, spans contiguous and
    non-overlapping from offset 0, and the file exactly as long as header + data.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise SafetensorsFormatError(f"{path}: truncated safetensors file ({size} bytes, no header); re-download or re-export it")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsFormatError(f"{path}: header length {n} does not fit the {size}-byte file; the file is truncated or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsFormatError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsFormatError(f"{path}: the header is not valid JSON; the file is corrupt, re-download or re-export it") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsFormatError(f"{path}: __metadata__ must be a JSON object of strings")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in ITEMSIZE:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if any((not isinstance(d, int)) or d < 0 for d in shape) or not (isinstance(b, int) and isinstance(e, int)):
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has an invalid shape or offsets")
        numel = 1
        for d in shape:
            numel *= d
        if e - b != numel * ITEMSIZE[dtype] or b < 0:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} spans {e - b} bytes but shape {list(shape)} of {dtype} needs {numel * ITEMSIZE[dtype]}"
            )
        tensors[name] = TensorInfo(dtype, shape, data_start + b, data_start + e)
        spans.append((b, e, name))
    spans.sort()
    cursor = 0
    for b, e, name in spans:
        if b != cursor:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} starts at data offset {b}, expected {cursor} (gap or overlap)")
        cursor = e
    if data_start + cursor != size:
        what = "truncated" if data_start + cursor > size else "longer than its header says"
        raise SafetensorsFormatError(
            f"{path}: file is {what} ({size} bytes, header describes {data_start + cursor}); re-download or re-export it"
        )
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (contiguous, on CPU), without a copy when possible."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # uint8 view works for every dtype including bf16, which numpy cannot represent.
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class StreamWriter:
    """Write a safetensors file tensor by tensor, in the declared order, hashing as it goes.

    The full list of (name, dtype, shape) must be known up front because the header
    comes first; conversion plans every target before producing any, so it is.
    """

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._order = [name for name, _, _ in specs]
        self._specs = {name: (dtype, tuple(shape)) for name, dtype, shape in specs}
        if len(self._specs) != len(self._order):
            raise ValueError(f"{path}: duplicate tensor names in the plan")
        header: dict = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, dtype, shape in specs:
            code = CODES[dtype]
            numel = 1
            for d in shape:
                numel *= d
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + numel * ITEMSIZE[code]]}
            offset += numel * ITEMSIZE[code]
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data region, as the reference writer does
        self._f = open(self.path, "wb")
        self._sha = hashlib.sha256()
        self._emit(struct.pack("<Q", len(raw)))
        self._emit(raw)
        self._next = 0
        self.size = 8 + len(raw) + offset

    def _emit(self, b) -> None:
        self._f.write(b)
        self._sha.update(b)

    def write(self, name: str, t: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"{self.path.name}: got tensor {name!r}, expected {expected!r} next")
        dtype, shape = self._specs[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{self.path.name}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}")
        self._emit(tensor_bytes(t))
        self._next += 1

    def close(self) -> str:
        """Finish the file; returns its sha256 hex digest. Fails if a planned tensor is missing."""
        if self._next != len(self._order):
            self._f.close()
            raise ValueError(f"{self.path.name}: {len(self._order) - self._next} planned tensors never written, first {self._order[self._next]!r}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
