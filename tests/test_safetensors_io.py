"""The validating safetensors header reader and the streaming, hashing writer."""

import hashlib
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import read_raw_header, rewrite_header, write_raw
from lmkiln.errors import SafetensorsFormatError
from lmkiln.formats.safetensors_io import CODES, DTYPES, ITEMSIZE, MAX_HEADER, StreamWriter, read_header, sha256_file, tensor_bytes


def _sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.half": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(2, 2, 3, generator=g).bfloat16(),
        "d.int": torch.arange(-6, 6, dtype=torch.int32).reshape(4, 3),
        "e.bytes": torch.arange(0, 250, 25, dtype=torch.uint8),
        "f.scalar": torch.tensor(1.5, dtype=torch.float64),
        "g.empty": torch.zeros(0, 4),
    }


@pytest.fixture
def st_file(tmp_path):
    tensors = _sample_tensors()
    p = tmp_path / "x.safetensors"
    save_file(tensors, str(p), metadata={"format": "pt", "note": "hello"})
    return p, tensors


# -- read_header on valid files -----------------------------------------------------------


def test_read_header_valid(st_file):
    path, tensors = st_file
    infos, meta = read_header(path)
    assert meta == {"format": "pt", "note": "hello"}
    assert set(infos) == set(tensors)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + n
    for name, t in tensors.items():
        info = infos[name]
        assert DTYPES[info.dtype] == t.dtype
        assert info.dtype == CODES[t.dtype]
        assert info.shape == tuple(t.shape)
        assert info.nbytes == t.numel() * t.element_size() == t.numel() * ITEMSIZE[info.dtype]
        assert data_start <= info.begin <= info.end <= len(raw)
        # The absolute offsets point at exactly this tensor's bytes.
        assert raw[info.begin:info.end] == bytes(tensor_bytes(t))
    # Spans tile the data region exactly.
    assert max(i.end for i in infos.values()) == len(raw)
    assert min(i.begin for i in infos.values()) == data_start


def test_read_header_without_metadata(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(p))
    infos, meta = read_header(p)
    assert meta == {}
    assert infos["w"].shape == (2, 2) and infos["w"].dtype == "F32"


def test_read_header_accepts_str_path(st_file):
    path, tensors = st_file
    infos, _ = read_header(str(path))
    assert set(infos) == set(tensors)


# -- read_header errors -------------------------------------------------------------------


def test_truncated_file(st_file):
    path, _ = st_file
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    with pytest.raises(SafetensorsFormatError, match="truncated") as ei:
        read_header(path)
    assert str(path) in str(ei.value)


def test_truncated_inside_header(st_file):
    path, _ = st_file
    raw = path.read_bytes()
    path.write_bytes(raw[:20])  # the 8-byte length survives, the header does not
    with pytest.raises(SafetensorsFormatError, match="header length"):
        read_header(path)


@pytest.mark.parametrize("content", [b"", b"abc", b"\x01\x00\x00\x00\x00\x00\x00"])
def test_shorter_than_8_bytes(tmp_path, content):
    p = tmp_path / "short.safetensors"
    p.write_bytes(content)
    with pytest.raises(SafetensorsFormatError, match="truncated") as ei:
        read_header(p)
    assert str(p) in str(ei.value)


def test_header_length_larger_than_file(st_file):
    path, _ = st_file
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw))  # 8 + n > size
    path.write_bytes(bytes(raw))
    with pytest.raises(SafetensorsFormatError, match="header length"):
        read_header(path)


def test_header_length_above_limit(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", MAX_HEADER + 1) + b"{}")
    with pytest.raises(SafetensorsFormatError, match="header length"):
        read_header(p)


def test_header_invalid_json(st_file):
    path, _ = st_file
    raw = bytearray(path.read_bytes())
    # Flip the bytes of the header's opening brace and of a quote: no longer JSON.
    assert raw[8:9] == b"{"
    raw[8] ^= 0xFF
    raw[9] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SafetensorsFormatError, match="not valid JSON"):
        read_header(path)


def test_header_json_not_utf8_text(tmp_path):
    p = tmp_path / "garbage.safetensors"
    hb = b"\xff\xfe{}\x00\x00\x00\x00"
    p.write_bytes(struct.pack("<Q", len(hb)) + hb)
    with pytest.raises(SafetensorsFormatError, match="not valid JSON"):
        read_header(p)


def test_header_not_an_object(tmp_path):
    p = tmp_path / "list.safetensors"
    hb = b"[1, 2]  "
    p.write_bytes(struct.pack("<Q", len(hb)) + hb)
    with pytest.raises(SafetensorsFormatError, match="not a JSON object"):
        read_header(p)


def test_shape_disagrees_with_offsets(st_file):
    path, _ = st_file
    rewrite_header(path, lambda h: h["a.weight"].update(shape=[3, 6]))
    with pytest.raises(SafetensorsFormatError, match="a.weight") as ei:
        read_header(path)
    assert "spans" in str(ei.value) and "[3, 6]" in str(ei.value)


def test_dtype_disagrees_with_offsets(st_file):
    path, _ = st_file
    rewrite_header(path, lambda h: h["a.weight"].update(dtype="F16"))  # 15 elements need 30 bytes, not 60
    with pytest.raises(SafetensorsFormatError, match="a.weight"):
        read_header(path)


def _two_tensor_file(path, offsets_b, data_len):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": list(offsets_b)},
    }
    write_raw(path, header, bytes(range(data_len)))


def test_two_tensor_file_baseline_is_valid(tmp_path):
    p = tmp_path / "ok.safetensors"
    _two_tensor_file(p, (16, 32), 32)
    infos, _ = read_header(p)
    assert infos["b"].nbytes == 16 and infos["b"].begin == infos["a"].end


def test_gap_between_tensors(tmp_path):
    p = tmp_path / "gap.safetensors"
    _two_tensor_file(p, (20, 36), 36)
    with pytest.raises(SafetensorsFormatError, match="gap or overlap") as ei:
        read_header(p)
    assert "'b'" in str(ei.value)


def test_overlapping_tensors(tmp_path):
    p = tmp_path / "overlap.safetensors"
    _two_tensor_file(p, (8, 24), 24)
    with pytest.raises(SafetensorsFormatError, match="gap or overlap"):
        read_header(p)


def test_data_not_starting_at_zero(tmp_path):
    p = tmp_path / "offset.safetensors"
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [4, 20]}}
    write_raw(p, header, bytes(20))
    with pytest.raises(SafetensorsFormatError, match="gap or overlap"):
        read_header(p)


def test_trailing_extra_bytes(st_file):
    path, _ = st_file
    with open(path, "ab") as f:
        f.write(b"\x00" * 5)
    with pytest.raises(SafetensorsFormatError, match="longer than its header says"):
        read_header(path)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"dtype": "F7", "shape": [4], "data_offsets": [0, 16]}, "unsupported dtype"),
        ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "invalid shape"),
        ({"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}, "invalid shape"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16]}, "invalid shape or offsets"),
        ({"dtype": "F32", "shape": [4]}, "malformed"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}, "malformed"),
        ({"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}, "malformed"),
        ("not an entry", "malformed"),
    ],
)
def test_malformed_entries(tmp_path, entry, match):
    p = tmp_path / "bad.safetensors"
    write_raw(p, {"a": entry}, bytes(16))
    with pytest.raises(SafetensorsFormatError, match=match):
        read_header(p)


def test_missing_file(tmp_path):
    with pytest.raises(SafetensorsFormatError, match="cannot read"):
        read_header(tmp_path / "nope.safetensors")


def test_metadata_not_an_object(tmp_path):
    p = tmp_path / "meta.safetensors"
    header = {"__metadata__": ["not", "a", "dict"], "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    write_raw(p, header, bytes(16))
    with pytest.raises(SafetensorsFormatError):
        read_header(p)


# -- StreamWriter -------------------------------------------------------------------------


def _specs(tensors):
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def test_stream_writer_round_trip(tmp_path):
    tensors = _sample_tensors()
    p = tmp_path / "w.safetensors"
    w = StreamWriter(p, _specs(tensors), {"format": "pt", "k": "v"})
    for n, t in tensors.items():
        w.write(n, t)
    digest = w.close()
    # What the reference library reads back is bit-identical.
    with safe_open(str(p), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == {"format": "pt", "k": "v"}
        for n, t in tensors.items():
            got = f.get_tensor(n)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got, t), n
    # The writer's own output passes the strict reader, with the data region 8-byte aligned.
    infos, meta = read_header(p)
    assert meta == {"format": "pt", "k": "v"}
    assert min(i.begin for i in infos.values()) % 8 == 0
    # Hash and size describe the file on disk.
    assert digest == hashlib.sha256(p.read_bytes()).hexdigest() == sha256_file(p)
    assert w.size == p.stat().st_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.uint8])
def test_stream_writer_each_dtype(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    if dtype.is_floating_point:
        t = (torch.randn(5, 3, generator=g) * 100).to(dtype)
    else:
        t = torch.randint(0, 200, (5, 3), generator=g).to(dtype)
    p = tmp_path / "one.safetensors"
    w = StreamWriter(p, [("t", dtype, (5, 3))])
    w.write("t", t)
    digest = w.close()
    with safe_open(str(p), framework="pt") as f:
        got = f.get_tensor("t")
    assert got.dtype == dtype
    assert torch.equal(got, t)
    assert digest == hashlib.sha256(p.read_bytes()).hexdigest()


def test_stream_writer_non_contiguous_input(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = base.t()  # a transposed view: its logical order must be written
    assert not t.is_contiguous()
    p = tmp_path / "t.safetensors"
    w = StreamWriter(p, [("t", torch.float32, (4, 3))])
    w.write("t", t)
    w.close()
    with safe_open(str(p), framework="pt") as f:
        assert torch.equal(f.get_tensor("t"), t)


def test_stream_writer_out_of_order(tmp_path):
    w = StreamWriter(tmp_path / "o.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(ValueError, match="'b'.*expected 'a'"):
        w.write("b", torch.zeros(2))
    w.abort()


def test_stream_writer_unknown_or_extra_tensor(tmp_path):
    w = StreamWriter(tmp_path / "o.safetensors", [("a", torch.float32, (2,))])
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="expected 'nothing'"):
        w.write("a", torch.zeros(2))
    w.close()


def test_stream_writer_wrong_shape(tmp_path):
    w = StreamWriter(tmp_path / "s.safetensors", [("a", torch.float32, (2, 3))])
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(3, 2))
    w.abort()


def test_stream_writer_wrong_dtype(tmp_path):
    w = StreamWriter(tmp_path / "d.safetensors", [("a", torch.float32, (2, 3))])
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(2, 3, dtype=torch.float16))
    w.abort()


def test_stream_writer_close_with_missing_tensors(tmp_path):
    w = StreamWriter(tmp_path / "c.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,)), ("c", torch.int32, (1,))])
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="2 planned tensors never written, first 'b'"):
        w.close()


def test_stream_writer_duplicate_names(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        StreamWriter(tmp_path / "dup.safetensors", [("a", torch.float32, (2,)), ("a", torch.float32, (2,))])


def test_stream_writer_incomplete_file_is_rejected_by_reader(tmp_path):
    """A writer that dies midway leaves a file the strict reader calls truncated."""
    p = tmp_path / "partial.safetensors"
    w = StreamWriter(p, [("a", torch.float32, (4,)), ("b", torch.float32, (4,))])
    w.write("a", torch.ones(4))
    w.abort()
    with pytest.raises(SafetensorsFormatError, match="truncated"):
        read_header(p)


def test_stream_writer_header_matches_plan(tmp_path):
    specs = [("x", torch.bfloat16, (3, 2)), ("y", torch.uint8, (5,)), ("z", torch.float32, ())]
    p = tmp_path / "h.safetensors"
    w = StreamWriter(p, specs)
    w.write("x", torch.zeros(3, 2, dtype=torch.bfloat16))
    w.write("y", torch.zeros(5, dtype=torch.uint8))
    w.write("z", torch.tensor(2.0))
    w.close()
    header, data = read_raw_header(p)
    assert "__metadata__" not in header
    assert [header[n]["shape"] for n, _, _ in specs] == [[3, 2], [5], []]
    assert [header[n]["dtype"] for n, _, _ in specs] == ["BF16", "U8", "F32"]
    assert len(data) == 12 + 5 + 4


# -- StreamWriter with background writer/hasher threads (inflight mode) ------------------------


def _threaded_cases():
    g = torch.Generator().manual_seed(3)
    big = torch.randn(300, 70, generator=g).to(torch.float16)  # 42000 bytes: several staging buffers
    return {
        "t_f16": big.t(),  # transposed views: the writer thread transposes them
        "t_bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16).t(),
        "f32": torch.randn(5, 7, generator=g),
        "t_f32": torch.randn(9, 4, generator=g).t(),
        "u8": torch.randint(0, 255, (13,), generator=g).to(torch.uint8),
        "empty": torch.zeros(0, 4),
        "i32_cols": torch.randint(-9, 9, (6, 8), generator=g, dtype=torch.int32)[:, ::2],  # strided, not transposed
        "scalar": torch.tensor(2.5),
    }


@pytest.mark.parametrize("direct", [True, False])
def test_threaded_stream_writer_same_bytes_and_digest(tmp_path, monkeypatch, direct):
    import lmkiln.formats.safetensors_io as sio

    monkeypatch.setattr(sio, "STAGE_BYTES", 8192)  # tiny staging buffer: many full flushes, an aligned part and a tail
    if not direct:  # a file system without O_DIRECT: the page-cache path
        monkeypatch.setattr(sio, "_set_direct", lambda fd, on: False)
    tensors = _threaded_cases()
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    plain = StreamWriter(tmp_path / "plain.safetensors", specs, {"format": "pt"})
    threaded = StreamWriter(tmp_path / "threaded.safetensors", specs, {"format": "pt"}, sio.InFlight(10_000))
    for n, t in tensors.items():
        plain.write(n, t)
        threaded.write(n, t)
    d1, d2 = plain.close(), threaded.close()
    data = (tmp_path / "threaded.safetensors").read_bytes()
    assert data == (tmp_path / "plain.safetensors").read_bytes()
    assert d1 == d2 == hashlib.sha256(data).hexdigest() and threaded.size == len(data)
    with safe_open(str(tmp_path / "threaded.safetensors"), framework="pt") as f:
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t), n


@pytest.mark.parametrize("threads", [True, False])
def test_rows_are_written_as_their_concatenation(tmp_path, monkeypatch, threads):
    """A `Rows` (a fused linear's members, never concatenated in memory) writes exactly the bytes,
    and gives the digest, of the concatenated tensor; parts may be views, cross staging buffers,
    and be empty."""
    import lmkiln.formats.safetensors_io as sio

    monkeypatch.setattr(sio, "STAGE_BYTES", 8192)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(70, 40, generator=g).to(torch.bfloat16), torch.randn(40, 70, generator=g).to(torch.bfloat16).t()
    cases = {"qkv": [q, k, q[:10]], "one": [torch.randn(3, 40, generator=g).to(torch.bfloat16)],
             "with_empty": [q[:0], q[5:9]], "u8": [torch.arange(9, dtype=torch.uint8).reshape(3, 3)] * 3}
    specs = [(n, parts[0].dtype, (sum(p.shape[0] for p in parts), *parts[0].shape[1:])) for n, parts in cases.items()]
    inflight = sio.InFlight(10_000) if threads else None
    rows_w = StreamWriter(tmp_path / "rows.safetensors", specs, {"format": "pt"}, inflight)
    cat_w = StreamWriter(tmp_path / "cat.safetensors", specs, {"format": "pt"})
    for n, parts in cases.items():
        rows_w.write(n, sio.Rows(parts))
        cat_w.write(n, torch.cat(parts, 0))
    d_rows, d_cat = rows_w.close(), cat_w.close()
    assert (tmp_path / "rows.safetensors").read_bytes() == (tmp_path / "cat.safetensors").read_bytes()
    assert d_rows == d_cat
    r = sio.Rows(cases["qkv"])
    assert (r.dtype, tuple(r.shape), r.numel(), r.element_size()) == (torch.bfloat16, (150, 40), 6000, 2)
    with pytest.raises(ValueError, match="parts differ"):
        sio.Rows([q, q.float()])
    with pytest.raises(ValueError, match="planned"):  # the writer checks a Rows' dtype and shape like a tensor's
        StreamWriter(tmp_path / "x.safetensors", [("a", torch.bfloat16, (5, 40))]).write("a", sio.Rows([q[:2], q[:2]]))


def test_inflight_bounds_queued_bytes():
    import threading

    from lmkiln.formats.safetensors_io import InFlight

    b = InFlight(100)
    b.acquire(500)  # more than the limit goes through when nothing else is queued
    b.release(500)
    b.acquire(60)
    got = []
    th = threading.Thread(target=lambda: (b.acquire(30), got.append(1)))
    th.start()
    th.join(0.2)
    assert got == [1] and b.used == 90  # 60 + 30 fit the limit
    th = threading.Thread(target=lambda: (b.acquire(20), got.append(2)))
    th.start()
    th.join(0.2)
    assert got == [1]  # 90 + 20 > 100: waits
    b.release(60)
    th.join(5)
    assert got == [1, 2] and b.used == 50


def test_threaded_stream_writer_error_surfaces_and_cleans_up(tmp_path, monkeypatch):
    import errno

    import lmkiln.formats.safetensors_io as sio

    def full(self, fd, buf):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sio.StreamWriter, "_write_out", full)
    monkeypatch.setattr(sio, "STAGE_BYTES", 4096)
    specs = [(f"t{i}", torch.float32, (1024,)) for i in range(50)]
    w = StreamWriter(tmp_path / "x.safetensors", specs, None, sio.InFlight(8192))
    with pytest.raises(OSError) as e:
        for i in range(50):
            w.write(f"t{i}", torch.ones(1024))
        w.close()
    assert e.value.errno == errno.ENOSPC
    w.abort()
    assert w._f.closed and not w._threads


def test_tensor_bytes_of_transposed_views():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.uint8, torch.bool):
        t = (torch.arange(35).reshape(5, 7) % 3).to(dtype).t()
        assert bytes(tensor_bytes(t)) == bytes(tensor_bytes(t.contiguous())), dtype


def test_blake3_writer_and_file_digest(tmp_path):
    """The engine writer's checksum: the threaded writer's blake3 is the whole file's, and
    file_digest (mapped slices, all cores) agrees for both algorithms, also across slices."""
    import blake3

    import lmkiln.formats.safetensors_io as sio

    tensors = _threaded_cases()
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = StreamWriter(tmp_path / "b3.safetensors", specs, {"format": "pt"}, sio.InFlight(10_000), checksum="blake3")
    for n, t in tensors.items():
        w.write(n, t)
    digest = w.close()
    data = (tmp_path / "b3.safetensors").read_bytes()
    assert digest == blake3.blake3(data).hexdigest() == sio.file_digest(tmp_path / "b3.safetensors", "blake3")
    assert sio.file_digest(tmp_path / "b3.safetensors", "sha256") == hashlib.sha256(data).hexdigest()
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 1000 + b"x")
    old = sio.FILE_SLICE
    try:
        sio.FILE_SLICE = 4096  # many slices and a short last one
        assert sio.file_digest(big, "blake3") == blake3.blake3(big.read_bytes()).hexdigest()
        assert sio.file_digest(big, "sha256") == hashlib.sha256(big.read_bytes()).hexdigest()
    finally:
        sio.FILE_SLICE = old
    (tmp_path / "empty").write_bytes(b"")
    assert sio.file_digest(tmp_path / "empty", "blake3") == blake3.blake3(b"").hexdigest()
    with pytest.raises(ValueError, match="unknown checksum 'md5'"):
        sio.new_hash("md5")


@pytest.mark.parametrize("fail", ["mmap", "thread"])
def test_threaded_writer_without_memory_or_threads_raises_instead_of_hanging(tmp_path, monkeypatch, fail):
    """Under a memory limit the writer thread could not map its staging buffers and died before it
    forwarded anything: the hasher never ended, the producer waited for in-flight budget for good, and a
    convert hung (SIGTERM ignored mid-cleanup). Now the failure reaches the caller at its next write or
    close; a thread that cannot be started is raised at once, with nothing left running."""
    import errno
    import threading

    import lmkiln.formats.safetensors_io as sio

    monkeypatch.setattr(sio, "STAGE_BYTES", 8192)
    tensors = _threaded_cases()
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    if fail == "mmap":
        def no_memory(*a, **k):
            raise OSError(errno.ENOMEM, "Cannot allocate memory")

        monkeypatch.setattr(sio.mmap, "mmap", no_memory)
    else:
        real_start, started = threading.Thread.start, []

        def start(th):
            if started:
                raise RuntimeError("can't start new thread")
            started.append(th)
            real_start(th)

        monkeypatch.setattr(threading.Thread, "start", start)
    result = []

    def run():
        try:
            w = StreamWriter(tmp_path / "x.safetensors", specs, {"format": "pt"}, sio.InFlight(1000))
            for n, t in tensors.items():
                w.write(n, t)
            w.close()
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    th = threading.Thread(target=run, daemon=True)
    real = getattr(threading.Thread, "start") if fail == "mmap" else real_start
    real(th)
    th.join(30)
    assert not th.is_alive(), "the writer hung"
    assert len(result) == 1 and ("Cannot allocate memory" in str(result[0]) or "can't start new thread" in str(result[0]))
    if fail == "thread":
        started[0].join(5)
        assert not started[0].is_alive()  # the thread that did start was ended
