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

import ctypes
import errno
import hashlib
import json
import mmap
import os
import queue
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkiln.errors import SafetensorsFormatError

try:
    import fcntl
except ImportError:  # not POSIX: no O_DIRECT either
    fcntl = None

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


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """n bytes at offset (pread may return fewer at once); fewer only where the file ends."""
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, offset + got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def read_header(path: Path, fd: int | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and fully validate a safetensors header; returns (tensors, metadata).

    Checks: header length sane, JSON well formed, known dtypes, non-negative shapes,
    each tensor's byte span equal to prod(shape) * itemsize, spans contiguous and
    non-overlapping from offset 0, and the file exactly as long as header + data.
    With `fd` (a descriptor the caller keeps open on `path`) the header is read through it, so it
    describes the very file the caller reads tensors from later; `path` then only names it in errors.
    """
    path = Path(path)
    try:
        st = os.stat(path) if fd is None else os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # (a FIFO would block the open below for good)
            raise SafetensorsFormatError(f"{path}: not a regular file; a safetensors file is expected here")
        size = st.st_size
        own = os.open(path, os.O_RDONLY) if fd is None else fd
        try:
            raw_len = os.pread(own, 8, 0)
            if len(raw_len) < 8:
                raise SafetensorsFormatError(f"{path}: truncated safetensors file ({size} bytes, no header); re-download or re-export it")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsFormatError(f"{path}: header length {n} does not fit the {size}-byte file; the file is truncated or not safetensors")
            raw = _pread_all(own, n, 8)
        finally:
            if fd is None:
                os.close(own)
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


# the integer dtype of each item size: torch copies (transposes) these faster than fp16/bf16,
# 0.9 against 0.5 GB/s for a (5632, 2048) fp16 weight on a 2-core Xeon, and the bytes are the same
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Rows:
    """Tensors that make one planned tensor, concatenated along dim 0, handed to a writer as they
    are: it copies each part into the file in turn, so a fused linear ([q | k | v], [gate | up])
    is never concatenated in memory (that `torch.cat` was a third of the converter's main thread
    once nothing was transposed any more). Has what a writer asks of a tensor."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = [p.detach() for p in parts]
        first = self.parts[0]
        if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in self.parts):
            raise ValueError(f"Rows: parts differ in dtype or trailing shape: {[(p.dtype, tuple(p.shape)) for p in self.parts]}")
        self.dtype = first.dtype
        self.shape = torch.Size((sum(p.shape[0] for p in self.parts), *first.shape[1:]))

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.parts[0].element_size()

    def detach(self) -> "Rows":
        return self

    def contiguous(self) -> "Rows":
        return self


def byte_parts(t: torch.Tensor | Rows) -> list[memoryview]:
    """The raw bytes of a tensor, or of each part of a `Rows`, in file order."""
    return [tensor_bytes(p) for p in t.parts] if isinstance(t, Rows) else [tensor_bytes(t)]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (contiguous, on CPU), without a copy when possible."""
    t = t.detach().to("cpu")
    if not t.is_contiguous() and t.numel() and t.element_size() in _BITS_DTYPE and not t.is_complex():
        bits = _BITS_DTYPE[t.element_size()]
        t = torch.empty(t.shape, dtype=bits).copy_(t.view(bits))  # e.g. a transposed view: the copy transposes
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # uint8 view works for every dtype including bf16, which numpy cannot represent.
    return memoryview(t.view(-1).view(torch.uint8).numpy())


SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_EVERY = 64 << 20  # a threaded writer without O_DIRECT starts the writeback of every 64 MiB it wrote
STAGE_BYTES = 16 << 20  # a threaded writer's O_DIRECT staging buffer
DIRECT_ALIGN = 4096  # O_DIRECT offset/length alignment (any logical block size up to a page)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for an open file; returns whether it is on."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or fcntl is None:
        return False
    try:
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (fl | flag) if on else (fl & ~flag))
    except OSError:
        return False
    return on


def _load_sync_file_range():
    """libc's sync_file_range (Linux), or None: starts writeback of a range without waiting for it."""
    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_sync_file_range = _load_sync_file_range()


class InFlight:
    """A bound on the bytes handed to background writer/hasher threads and not yet done.

    `acquire` blocks while taking `n` more would pass the limit (an item larger than the
    limit still goes through, alone), so a fast producer holds at most about `limit`
    bytes of finished tensors waiting for the disk and the hash. One instance can be
    shared by the writers of several files."""

    def __init__(self, limit: int = 256 << 20):
        self.limit, self.used = limit, 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cv:
            while self.used and self.used + n > self.limit:
                self._cv.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


class StreamWriter:
    """Write a safetensors file tensor by tensor, in the declared order, hashing as it goes.

    The full list of (name, dtype, shape) must be known up front because the header
    comes first; conversion plans every target before producing any, so it is.

    With `inflight` (an InFlight bound), `write` only queues the tensor: a writer thread
    makes it contiguous (a transposed view is transposed there), copies it into a staging
    buffer that an I/O thread writes with O_DIRECT (see `_write_loop`), and a hasher thread
    feeds the same bytes to the checksum (`checksum`: sha256 or blake3) in order, all mostly
    without the GIL, while the caller produces the next tensor. The file and digest are the same as
    without threads; the caller must not modify a tensor after handing it to `write`. An
    error in a thread (a full disk) is raised by the next `write` or by `close`. The file is
    not left in the page cache.
    """

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None,
                 inflight: InFlight | None = None, checksum: str = "sha256"):
        self.path = Path(path)
        self.checksum = checksum
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
        self._f = open(self.path, "wb", buffering=0 if inflight is not None else -1)
        self._sha = new_hash(checksum)
        self._inflight = inflight
        self._direct = False
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._stop = False
        if inflight is not None:
            self._to_write: queue.SimpleQueue = queue.SimpleQueue()
            self._to_hash: queue.SimpleQueue = queue.SimpleQueue()
            self._written = self._synced = 0
            threads = [threading.Thread(target=self._write_loop, name=f"write {self.path.name}", daemon=True),
                       threading.Thread(target=self._hash_loop, name=f"{checksum} {self.path.name}", daemon=True)]
            try:
                for th in threads:
                    th.start()
                    self._threads.append(th)
            except BaseException:  # (no thread to be had): end the one started, leave no file open
                self._to_hash.put(None)
                self.abort()
                raise
        try:
            self._emit(struct.pack("<Q", len(raw)))
            self._emit(raw)
        except BaseException:
            self.abort()
            raise
        self._next = 0
        self.size = 8 + len(raw) + offset

    def _emit(self, b, n: int | None = None) -> None:
        """Bytes to write and hash; in inflight mode also a tensor (or `Rows`) of `n` bytes."""
        if self._inflight is None:
            for part in b if isinstance(b, list) else [b]:
                self._f.write(part)
                self._sha.update(part)
            return
        self._raise_error()
        n = len(b) if n is None else n
        self._inflight.acquire(n)
        self._to_write.put((b, n))

    # -- the threads (inflight mode) -------------------------------------------------

    def _write_loop(self) -> None:
        """Copy the queued bytes into aligned staging buffers that an I/O thread writes with
        O_DIRECT (DMA from the buffer: no page-cache copy, no dirty pages for the final fsync to
        wait on); two buffers, so the copy into one overlaps the disk write of the other. Where
        the file system refuses O_DIRECT, the same writes go through the page cache with their
        writeback started every WRITEBACK_EVERY bytes."""
        import numpy as np

        fd = self._f.fileno()
        stages: list[mmap.mmap] = []
        free: queue.SimpleQueue = queue.SimpleQueue()
        to_disk: queue.SimpleQueue = queue.SimpleQueue()
        io = sv = None
        fill = 0
        try:
            stages = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]  # page-aligned, reused for the whole file
            for st in stages:
                free.put(st)
            th = threading.Thread(target=self._io_loop, args=(fd, to_disk, free), name=f"io {self.path.name}", daemon=True)
            th.start()
            io = th  # (only once started: the cleanup joins it)
            stage = free.get()
            sv = np.frombuffer(stage, np.uint8)
            self._direct = _set_direct(fd, True)
        except BaseException as e:  # noqa: BLE001 - no memory for the buffers, no thread: the caller raises it
            self._error = self._error or e
        try:
            # every queued item goes on to the hasher, which returns its in-flight budget: skipped after an
            # error, never dropped (a producer waiting for budget would wait for good)
            while (item := self._to_write.get()) is not None:
                if self._error is None and not self._stop:
                    try:
                        item = (byte_parts(item[0]) if isinstance(item[0], (torch.Tensor, Rows)) else [item[0]], item[1])
                        for part in item[0]:
                            off, n = 0, len(part)
                            src = np.frombuffer(part, np.uint8) if n else None
                            while off < n:  # numpy's copy releases the GIL
                                k = min(n - off, STAGE_BYTES - fill)
                                sv[fill:fill + k] = src[off:off + k]
                                fill, off = fill + k, off + k
                                if fill == STAGE_BYTES:
                                    to_disk.put((stage, fill, False))
                                    stage = free.get()  # back once the I/O thread wrote it (or failed)
                                    sv = np.frombuffer(stage, np.uint8)
                                    fill = 0
                    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                        self._error = self._error or e
                self._to_hash.put(item)
            if fill and self._error is None and not self._stop:
                to_disk.put((stage, fill, True))
        finally:
            if io is not None:
                to_disk.put(None)
                io.join()
            self._to_hash.put(None)
            del sv
            for st in stages:
                try:
                    st.close()
                except BufferError:  # a view of it lives on in the stored error's traceback; freed with it
                    pass

    def _io_loop(self, fd: int, to_disk: queue.SimpleQueue, free: queue.SimpleQueue) -> None:
        """Write full staging buffers in order, then the last (partial) one: its whole blocks with
        O_DIRECT, the tail without (not a whole block). Every buffer goes back to `free`."""
        while (job := to_disk.get()) is not None:
            stage, n, last = job
            try:
                if self._error is None and not self._stop:
                    aligned = n // DIRECT_ALIGN * DIRECT_ALIGN if last else n
                    self._write_out(fd, memoryview(stage)[:aligned])
                    if last:
                        self._direct = _set_direct(fd, False)
                        self._write_out(fd, memoryview(stage)[aligned:n])
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = self._error or e
            finally:
                free.put(stage)

    def _write_out(self, fd: int, buf: memoryview) -> None:
        while len(buf):
            try:
                n = os.write(fd, buf)
            except OSError as e:
                if e.errno != errno.EINVAL or not self._direct:
                    raise
                self._direct = _set_direct(fd, False)  # O_DIRECT accepted by open, refused by write
                continue
            buf = buf[n:]
            self._written += n
        if not self._direct and _sync_file_range is not None and self._written - self._synced >= WRITEBACK_EVERY:
            _sync_file_range(fd, self._synced, self._written - self._synced, SYNC_FILE_RANGE_WRITE)
            self._synced = self._written

    def _hash_loop(self) -> None:
        while (item := self._to_hash.get()) is not None:
            try:
                if self._error is None and not self._stop:
                    for part in item[0] if isinstance(item[0], list) else [item[0]]:
                        self._sha.update(part)
            except BaseException as e:  # noqa: BLE001
                self._error = self._error or e
            finally:
                self._inflight.release(item[1])

    def _join(self) -> None:
        """Let the threads finish what is queued (skipping it after `abort`) and end."""
        if self._threads:
            self._to_write.put(None)
            for th in self._threads:
                th.join()
            self._threads = []

    def _raise_error(self) -> None:
        if self._error is not None:
            self._stop = True
            raise self._error

    def write(self, name: str, t: torch.Tensor | Rows) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"{self.path.name}: got tensor {name!r}, expected {expected!r} next")
        dtype, shape = self._specs[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{self.path.name}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}")
        if self._inflight is None:
            self._emit(byte_parts(t))
        else:
            self._emit(t.detach(), t.numel() * t.element_size())  # made contiguous (transposed) by the writer thread
        self._next += 1

    def close(self) -> str:
        """Finish the file; returns its `checksum` hex digest. Fails if a planned tensor is missing."""
        if self._next != len(self._order):
            self.abort()
            raise ValueError(f"{self.path.name}: {len(self._order) - self._next} planned tensors never written, first {self._order[self._next]!r}")
        try:
            self._join()
            self._raise_error()
            self._f.flush()
            os.fsync(self._f.fileno())
        except BaseException:
            self.abort()
            raise
        self._f.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._stop = True
        self._join()
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:  # a full disk: the buffered tail cannot be flushed; the file is being discarded
                pass


CHECKSUMS = ("blake3", "sha256")  # the whole-file checksums lmkiln computes and verifies, preferred first
FILE_SLICE = 64 << 20  # file_digest hashes a mapped file in slices this long (a `stop` is noticed between them)


def new_hash(algo: str, threads: bool = False):
    """A fresh hash object of checksum `algo` ('blake3' or 'sha256'). `threads`: blake3 spreads
    each large update over all cores (worth it for whole files; the writer's hasher thread
    runs single-threaded beside the producer and the writer thread)."""
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "blake3":
        import blake3

        return blake3.blake3(max_threads=blake3.blake3.AUTO if threads else 1)
    raise ValueError(f"unknown checksum {algo!r}; known: {', '.join(CHECKSUMS)}")


def file_digest(path: Path, algo: str = "sha256", stop: threading.Event | None = None) -> str | None:
    """The file's `algo` hex digest (blake3 on all cores), hashed from a read-only mapping in
    FILE_SLICE slices (no copy; both hashes release the GIL); None if `stop` is set before the end."""
    h = new_hash(algo, threads=True)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if hasattr(m, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                m.madvise(mmap.MADV_SEQUENTIAL)
            mv = memoryview(m)
            try:
                for off in range(0, size, FILE_SLICE):
                    if stop is not None and stop.is_set():
                        return None
                    h.update(mv[off:off + FILE_SLICE])
            finally:
                mv.release()
    return h.hexdigest()


def sha256_file(path: Path, stop: threading.Event | None = None) -> str | None:
    """The file's sha256 hex digest (engines written before format v3 record it)."""
    return file_digest(path, "sha256", stop)
