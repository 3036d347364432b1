"""Quantization primitives (quant/primitives.py: qparams, round-trip error bounds) and
packing layouts (formats/packing.py, formats/qtensor.py's dequantize)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkiln.errors import QuantizationError
from lmkiln.formats.packing import (
    AWQ_ORDER,
    from_awq_gemm,
    pack_awq_int4,
    pack_int4,
    pack_int8,
    to_awq_gemm,
    unpack_awq_int4,
    unpack_int4,
    unpack_int8,
)
from lmkiln.formats.qtensor import dequantize
from lmkiln.quant.primitives import compute_qparams, fake_quantize, grid_qparams, pad_to_multiple, quantize


def _weight(out_f, in_f, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * scale


def _codes(rows, cols, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int64).to(torch.uint8)


# --- error bounds ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_at_most_half_a_step(bits, group_size, symmetric):
    w = _weight(24, 256, seed=bits * 1000 + group_size)
    w[0, :5] = 0.3  # an outlier group
    scales, zeros = compute_qparams(w, bits, group_size, symmetric)
    g = 256 if group_size == -1 else group_size
    assert scales.shape == zeros.shape == (24, 256 // g)
    assert scales.dtype == torch.float32 and zeros.dtype == torch.int32
    assert (scales > 0).all()

    q = quantize(w, scales, zeros, bits, group_size)
    assert q.shape == w.shape and q.dtype == torch.uint8
    assert int(q.max()) <= 2**bits - 1
    w_hat = dequantize(q, scales, zeros, group_size)
    assert w_hat.dtype == torch.float32 and w_hat.shape == w.shape

    step = scales.repeat_interleave(g, dim=1)
    assert ((w - w_hat).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    torch.testing.assert_close(fake_quantize(w, bits, group_size, symmetric), w_hat)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([3, 4, 8]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    shift=st.floats(-1.0, 1.0),
)
def test_error_bound_property(bits, symmetric, seed, shift):
    # Shifted weights make groups all-positive or all-negative: the clamp-to-include-0 path.
    w = _weight(8, 64, seed=seed, scale=0.2) + shift
    scales, zeros = compute_qparams(w, bits, 32, symmetric)
    w_hat = dequantize(quantize(w, scales, zeros, bits, 32), scales, zeros, 32)
    step = scales.repeat_interleave(32, dim=1)
    assert ((w - w_hat).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()


def test_asymmetric_zero_point_and_exact_zero():
    w = _weight(16, 128, seed=3)
    scales, zeros = compute_qparams(w, 4, 64, symmetric=False)
    assert ((zeros >= 0) & (zeros <= 15)).all()
    w[:, :64] = 0.0
    w_hat = fake_quantize(w, 4, 64, symmetric=False)
    assert (w_hat[:, :64] == 0).all()


def test_symmetric_convention():
    w = _weight(8, 64, seed=4)
    scales, zeros = compute_qparams(w, 4, 32, symmetric=True)
    assert (zeros == 8).all()
    absmax = w.abs().reshape(8, 2, 32).amax(-1)
    torch.testing.assert_close(scales, absmax / 7)
    q = quantize(w, scales, zeros, 4, 32)
    assert int(q.min()) >= 1  # code 0 is never produced


def test_constant_and_zero_groups():
    w = torch.zeros(8, 64)
    w[1] = 0.25
    w[2] = -0.5
    for symmetric in (False, True):
        scales, zeros = compute_qparams(w, 4, 32, symmetric)
        assert torch.isfinite(scales).all() and (scales > 0).all()
        torch.testing.assert_close(fake_quantize(w, 4, 32, symmetric), w)


def test_fake_quantize_keeps_dtype():
    w = _weight(8, 64).to(torch.bfloat16)
    assert fake_quantize(w, 4, 32, False).dtype == torch.bfloat16


def test_clip_max_clamps_range():
    w = _weight(4, 64, seed=5)
    w[0, 0] = 5.0  # outlier
    clip = torch.full((4, 2), 0.1)
    for symmetric in (False, True):
        scales, _ = compute_qparams(w, 4, 32, symmetric, clip_max=clip)
        unclipped, _ = compute_qparams(w, 4, 32, symmetric)
        assert (scales <= unclipped + 1e-9).all()
        assert scales[0, 0] < unclipped[0, 0] / 10
        w_hat = fake_quantize(w, 4, 32, symmetric, clip_max=clip)
        assert w_hat.abs().max() <= 0.1 + scales.max()
    with pytest.raises(QuantizationError, match="clip_max"):
        compute_qparams(w, 4, 32, False, clip_max=torch.ones(4, 3))


def test_padding_is_harmless():
    w = _weight(16, 172, seed=6)
    w_pad, original = pad_to_multiple(w, dim=1, multiple=64)
    assert original == 172 and w_pad.shape == (16, 192)
    assert (w_pad[:, 172:] == 0).all() and torch.equal(w_pad[:, :172], w)
    w_hat = fake_quantize(w_pad, 4, 64, symmetric=False)
    assert (w_hat[:, 172:] == 0).all()
    x = torch.randn(3, 172)
    x_pad, _ = pad_to_multiple(x, dim=1, multiple=64)
    torch.testing.assert_close(x_pad @ w_hat.T, x @ w_hat[:, :172].T)
    same, size = pad_to_multiple(w_pad, dim=1, multiple=64)
    assert same is w_pad and size == 192
    rows, size = pad_to_multiple(w, dim=0, multiple=24)
    assert rows.shape == (24, 172) and size == 16


def test_errors():
    with pytest.raises(QuantizationError, match="172"):
        compute_qparams(_weight(8, 172), 4, 64, False)
    bad = _weight(8, 64)
    bad[3, 3] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        compute_qparams(bad, 4, 32, False)
    bad[3, 3] = float("inf")
    with pytest.raises(QuantizationError):
        fake_quantize(bad, 4, 32, True)
    with pytest.raises(QuantizationError, match="bit width"):
        compute_qparams(_weight(8, 64), 5, 32, False)
    with pytest.raises(QuantizationError, match="multiple of 8"):
        pack_awq_int4(_codes(4, 12, 4))
    with pytest.raises(QuantizationError, match="multiple of 4"):
        pack_int8(_codes(4, 6, 8))
    with pytest.raises(QuantizationError, match="multiple of 2"):
        pack_int4(_codes(4, 3, 4))
    with pytest.raises(QuantizationError, match="codes must lie"):
        pack_awq_int4(torch.full((2, 8), 16, dtype=torch.uint8))
    with pytest.raises(QuantizationError, match="out_features"):
        unpack_awq_int4(torch.zeros(2, 2, dtype=torch.int32), 24)


# --- packing ---------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_qparams_picks_each_groups_least_error_shrink(symmetric):
    """grid_qparams without input weights (the data-free grid of the ONNX export's int4 head):
    every group gets, of the 20 shrinks of its range (absmax * (1 - i / 100)), the one whose
    fp16-rounded grid has the least squared rounding error, computed here group by group; with
    heavy-tailed weights (Student t, 3 degrees of freedom, as trained weights are) some groups
    shrink and the whole error drops below min/max's. steps=1 is compute_qparams."""
    torch.manual_seed(3)
    w = torch.distributions.StudentT(torch.tensor(3.0)).sample((24, 96)) * 0.02
    s, z = grid_qparams(w, 4, 32, symmetric)
    s1, z1 = grid_qparams(w, 4, 32, symmetric, steps=1)
    s0, z0 = compute_qparams(w, 4, 32, symmetric)
    assert torch.equal(s1, s0) and torch.equal(z1, z0)

    def err(s, z, grp):  # (out,) squared error of group grp under grid (s, z) (out, n_groups)
        blk, s16, zz = w[:, grp * 32:(grp + 1) * 32], s[:, grp:grp + 1].half().float(), z[:, grp:grp + 1]
        return (((torch.clamp(torch.round(blk / s16) + zz, 0, 15) - zz) * s16 - blk) ** 2).sum(1)

    amax = w.reshape(24, 3, 32).abs().amax(-1)
    for grp in range(3):
        shrinks = torch.stack([err(*compute_qparams(w, 4, 32, symmetric, clip_max=amax * (1 - i / 100)), grp) for i in range(20)])
        torch.testing.assert_close(err(s, z, grp), shrinks.min(0).values)
    total = sum(err(s, z, grp).sum() for grp in range(3))
    assert total < 0.97 * sum(err(s0, z0, grp).sum() for grp in range(3))
    assert (s < s0).any() and (s <= s0).all()


def test_awq_nibble_order_hand_computed():
    q = torch.arange(8, dtype=torch.uint8).reshape(1, 8)  # column c holds value c
    word = int(pack_awq_int4(q)[0, 0])
    nibbles = [((word & 0xFFFFFFFF) >> (4 * k)) & 0xF for k in range(8)]
    assert nibbles == list(AWQ_ORDER) == [0, 2, 4, 6, 1, 3, 5, 7]
    assert word == 0x75316420

    q = torch.tensor([[15, 0, 0, 0, 0, 0, 0, 9]], dtype=torch.uint8)
    # column 0 -> nibble 0, column 7 -> nibble 7: top nibble 9 makes the word negative.
    word = int(pack_awq_int4(q)[0, 0])
    assert word == 0x9000000F - 2**32 and word < 0


def test_int8_and_int4_byte_order_hand_computed():
    q = torch.tensor([[1, 2, 3, 200]], dtype=torch.uint8)
    assert int(pack_int8(q)[0, 0]) == 0xC8030201 - 2**32
    q = torch.tensor([[1, 2, 15, 4]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x21, 0x4F]]


@pytest.mark.parametrize(
    "pack, unpack, bits, per_word, dtype",
    [
        (pack_awq_int4, unpack_awq_int4, 4, 8, torch.int32),
        (pack_int8, unpack_int8, 8, 4, torch.int32),
        (pack_int4, unpack_int4, 4, 2, torch.uint8),
    ],
)
@pytest.mark.parametrize("seed", range(3))
def test_pack_round_trip(pack, unpack, bits, per_word, dtype, seed):
    q = _codes(40, 64, bits, seed)
    q[0, :] = 2**bits - 1  # all-high codes: negative int32 words
    packed = pack(q)
    assert packed.dtype == dtype and packed.shape == (40, 64 // per_word)
    if dtype == torch.int32:
        assert (packed[0] < 0).all()
    assert torch.equal(unpack(packed, 64), q)
    assert torch.equal(unpack(packed), q)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=8, max_size=8), st.integers(1, 4))
def test_awq_pack_property(values, rows):
    q = torch.tensor([values] * rows, dtype=torch.uint8)
    packed = pack_awq_int4(q)
    word = int(packed[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * k)) & 0xF for k in range(8)] == [values[c] for c in AWQ_ORDER]
    assert torch.equal(unpack_awq_int4(packed, 8), q)


@pytest.mark.parametrize("bits, per_word", [(4, 8), (8, 4)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [64, -1])
def test_gemm_round_trip(bits, per_word, symmetric, group_size):
    out_f, in_f = 48, 256
    w = _weight(out_f, in_f, seed=7)
    scales, zeros = compute_qparams(w, bits, group_size, symmetric)
    q = quantize(w, scales, zeros, bits, group_size)
    n_groups = 1 if group_size == -1 else in_f // group_size

    tensors = to_awq_gemm(q, scales, zeros, bits=bits)
    assert set(tensors) == {"qweight", "qzeros", "scales"}
    assert tensors["qweight"].dtype == torch.int32
    assert tensors["qweight"].shape == (in_f, out_f // per_word)
    assert tensors["qzeros"].dtype == torch.int32
    assert tensors["qzeros"].shape == (n_groups, out_f // per_word)
    assert tensors["scales"].dtype == torch.float16
    assert tensors["scales"].shape == (n_groups, out_f)

    q2, scales2, zeros2 = from_awq_gemm(**tensors, group_size=group_size, bits=bits)
    assert torch.equal(q2, q)
    assert zeros2.dtype == torch.int32 and torch.equal(zeros2, zeros)
    assert scales2.dtype == torch.float32
    torch.testing.assert_close(scales2, scales.half().float())
    w_hat = dequantize(q2, scales2, zeros2, group_size)
    torch.testing.assert_close(w_hat, dequantize(q, scales, zeros, group_size), rtol=2e-3, atol=1e-5)


def test_awq_gemm_matches_reference_dequant():
    # AutoAWQ's dequant: unpack, reorder with AWQ_REVERSE_ORDER, (q - z) * s, (in, out).
    w = _weight(16, 128, seed=8)
    scales, zeros = compute_qparams(w, 4, 64, False)
    t = to_awq_gemm(quantize(w, scales, zeros, 4, 64), scales, zeros)
    shifts = torch.arange(0, 32, 4)
    iw = (t["qweight"][:, :, None] >> shifts[None, None, :]).to(torch.int8).view(128, -1)
    iz = (t["qzeros"][:, :, None] >> shifts[None, None, :]).to(torch.int8).view(2, -1)
    reverse = torch.arange(iw.shape[-1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    iw, iz = iw[:, reverse] & 0xF, iz[:, reverse] & 0xF
    ref = (iw - iz.repeat_interleave(64, dim=0)) * t["scales"].float().repeat_interleave(64, dim=0)
    torch.testing.assert_close(ref.T, fake_quantize(w, 4, 64, False), rtol=2e-3, atol=1e-5)


def test_gemm_errors():
    q = _codes(12, 64, 4)
    scales, zeros = torch.ones(12, 1), torch.zeros(12, 1, dtype=torch.int32)
    with pytest.raises(QuantizationError, match="multiple of 8"):
        to_awq_gemm(q, scales, zeros)
    with pytest.raises(QuantizationError, match="4 or 8 bits"):
        to_awq_gemm(q, scales, zeros, bits=3)
    with pytest.raises(QuantizationError, match="float16"):
        to_awq_gemm(_codes(8, 64, 4), torch.full((8, 1), 1e6), torch.zeros(8, 1, dtype=torch.int32))
    t = to_awq_gemm(_codes(8, 64, 4), torch.ones(8, 2), torch.zeros(8, 2, dtype=torch.int32))
    with pytest.raises(QuantizationError, match="groups"):
        from_awq_gemm(**t, group_size=16)


def test_pack_int4_packs_uint8_codes_in_uint8():
    """pack_int4 gives the same bytes from uint8 codes as from wider ones, without an int64 copy:
    that copy (8 bytes a code, plus two int64 halves) on the engine's fused gate+up was the
    `quantize --method rtn --to engine` peak, above the memory plan's packing term."""
    import subprocess
    import sys
    from pathlib import Path

    q = _codes(64, 128, 4, seed=3).to(torch.uint8)
    assert torch.equal(pack_int4(q), pack_int4(q.to(torch.int32)))
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    bad = q.clone()
    bad[3, 5] = 16  # out of range: refused on the uint8 path as on the widening one
    with pytest.raises(QuantizationError, match=r"codes must lie in \[0, 15\]"):
        pack_int4(bad)
    assert torch.equal(pack_int4(q.t()), pack_int4(q.t().contiguous()))  # a strided view (the engine transposes)
    assert pack_int4(q).is_contiguous() and pack_int4(q.t()).is_contiguous()
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc")
    code = (
        "import torch\n"
        "from lmkiln.formats.packing import pack_int4\n"
        "def mem(k): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(k)) << 10\n"
        "q = torch.randint(0, 16, (4096, 4096), dtype=torch.uint8)\n"  # 16 MiB of codes
        "try:\n"  # VmHWM := VmRSS, so that earlier peaks do not count (where the kernel lets us)
        "    open('/proc/self/clear_refs', 'w').write('5')\n"
        "except OSError:\n"
        "    pass\n"
        "before = mem('VmRSS')\n"
        "pack_int4(q)\n"
        "print(mem('VmHWM') - before)\n"
    )
    extra = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    # uint8: the 8 MiB result and its 8 MiB shifted half (20 MiB measured); int64 widening: 260 MiB
    assert extra < 2 * (16 << 20), f"pack_int4 of 16 MiB of codes peaked {extra >> 20} MiB above its input"
