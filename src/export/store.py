"""Initializers streamed to disk: each tensor is written once and then dropped.

With `external=True` every initializer's bytes go straight into `model.onnx.data`
(page-aligned, so onnxruntime can map them) and the graph holds only a reference, so
the model never sits in memory twice; otherwise (small models, under the protobuf 2 GB
limit) the bytes live inside the ModelProto as raw_data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto, helper

DATA_FILE = "model.onnx.data"
ALIGN = 4096
SMALL = 1024  # tensors below this many bytes always stay inline

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int64): TensorProto.INT64,
              np.dtype(np.int32): TensorProto.INT32, np.dtype(np.bool_): TensorProto.BOOL}


class TensorStore:
    def __init__(self, out_dir: Path, external: bool, progress: Callable[[str, int], None] | None = None):
        self.out_dir = Path(out_dir)
        self.external = external
        self.progress = progress
        self.tensors: list[TensorProto] = []
        self.nbytes = 0
        self._f = open(self.out_dir / DATA_FILE, "wb") if external else None

    def add_raw(self, name: str, data_type: int, dims, raw: bytes) -> str:
        t = TensorProto()
        t.name, t.data_type = name, data_type
        t.dims.extend(int(d) for d in dims)
        if self._f is not None and len(raw) >= SMALL:
            off = self._f.tell()
            if off % ALIGN:
                self._f.write(b"\0" * (ALIGN - off % ALIGN))
                off = self._f.tell()
            self._f.write(raw)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", DATA_FILE), ("offset", str(off)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
        else:
            t.raw_data = raw
        self.tensors.append(t)
        self.nbytes += len(raw)
        if self.progress:
            self.progress(name, len(raw))
        return name

    def add(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        return self.add_raw(name, NP_TO_ONNX[arr.dtype], arr.shape, arr.tobytes())

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            import os

            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None


class Graph:
    """A list of nodes plus the store; `op` returns its output names."""

    def __init__(self, store: TensorStore):
        self.store = store
        self.nodes = []
        self._consts: dict = {}
        self._n = 0

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (deduplicated), e.g. axes and shapes."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.store.add(self.fresh("const"), arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", name: str | None = None,
           **attrs) -> list[str]:
        name = name or self.fresh(op_type)
        outs = [f"{name}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], **kw) -> str:
        return self.op(op_type, inputs, 1, **kw)[0]
