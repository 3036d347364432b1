"""The Triton int4 kernel (runtime/triton_int4.py) run by Triton's interpreter on the CPU.

The kernel is for CUDA, but Triton's interpreter (TRITON_INTERPRET=1) runs the same kernel
code on CPU tensors, so its indexing, masking, group handling and the dequantize-exactly
arithmetic are tested here without a GPU (float32 and float16; the interpreter's bfloat16
dot is not numpy-representable and gives garbage, so bf16 is left to the CUDA tests). Each
check runs in a child process: the interpreter must be chosen before Triton compiles
anything, and must not leak into CUDA tests in this process. Skipped where Triton is not
installed (it is a dev dependency; PyTorch's CUDA wheels bring it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SRC = Path(__file__).parent.parent / "src"


def run_interpreted(code: str, tmp_path: Path) -> str:
    link = tmp_path / "path" / "lmkiln"
    link.parent.mkdir()
    link.symlink_to(SRC)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{link.parent}{os.pathsep}{Path(__file__).parent}"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_kernel_equals_dequantized_matmul(tmp_path):
    """Against the "dequant" path (the same codes dequantized at load): float32 to rounding of
    the sums; float16 within one output rounding step. Shapes cover every k tile (groups 32,
    64, 128 and per-channel), in_features padded, widths that are no multiple of a column
    tile, each row tile (1..64 rows) and the large-row path (dequantize + matmul)."""
    run_interpreted("""
        import torch
        from lmkiln.runtime import triton_int4
        from lmkiln.runtime.qlinear import QuantLinear
        torch.manual_seed(0)
        cases = [(256, 96, 32, 250, [1, 17]), (256, 40, 64, 256, [5, 33]), (512, 72, 128, 500, [3, 64]),
                 (96, 24, 96, 96, [2]), (128, 48, 128, 100, [triton_int4.MAX_M + 1])]
        for k, n, g, kin, ms in cases:
            codes = torch.randint(0, 16, (k, n), dtype=torch.uint8)
            scales = (torch.rand(k // g, n) * 0.02 + 1e-3).half()
            zeros = torch.randint(0, 16, (k // g, n), dtype=torch.uint8)
            codes[kin:] = zeros.repeat_interleave(g, 0)[kin:]  # padded rows dequantize to 0, as quantize writes them
            for dt in (torch.float32, torch.float16):
                t = QuantLinear(codes, scales, zeros, 4, kin, dtype=dt, path="int4-triton")
                d = QuantLinear(codes, scales, zeros, 4, kin, dtype=dt, path="dequant")
                assert t.mode == "int4-triton" and t.codes.shape == (n, k // 2)
                for m in ms:
                    x = torch.randn(2, m, kin).to(dt)  # 3-D input, as the runner passes it
                    yt, yd = t(x), d(x)
                    assert yt.shape == (2, m, n) and yt.dtype == dt
                    exact = x.double() @ d.weight.double()
                    tol = 1e-5 if dt == torch.float32 else 2 ** -10 * exact.abs().max().item() * 2
                    err = (yt.double() - yd.double()).abs().max().item()
                    assert err <= tol, (k, n, g, m, dt, err, tol)
                    assert (yt.double() - exact).abs().max() <= (yd.double() - exact).abs().max() + tol
        # launch shapes: 16/32-row tiles, k split into partial sums (uneven splits too), column tiles
        k, n, g = 512, 40, 64
        codes = torch.randint(0, 16, (k, n), dtype=torch.uint8)
        scales, zeros = (torch.rand(k // g, n) * 0.02).half(), torch.randint(0, 16, (k // g, n), dtype=torch.uint8)
        q, s, z = triton_int4.pack(codes, scales, zeros)
        w = triton_int4.dequantize(q, s, z, torch.float32)
        for m, bm, bn, split in [(1, 16, 16, 1), (1, 16, 32, 3), (3, 16, 128, 2), (3, 16, 32, 8), (20, 32, 16, 2)]:
            x = torch.randn(m, k)
            y = triton_int4.matmul(x, q, s, z, triton_int4.Config(bm, bn, split))
            assert (y - x @ w.t()).abs().max() <= 1e-4, (m, bm, bn, split)
        assert triton_int4.matmul(torch.randn(0, k), q, s, z).shape == (0, n)
        # the prefill path's dequantization kernel: the reference's numbers exactly, widths not a tile multiple
        for n2, k2, g2 in [(40, 512, 64), (33, 96, 32), (70, 256, 128)]:
            c2 = torch.randint(0, 16, (k2, n2), dtype=torch.uint8)
            q2, s2, z2 = triton_int4.pack(c2, (torch.rand(k2 // g2, n2) * 0.02).half(), torch.randint(0, 16, (k2 // g2, n2), dtype=torch.uint8))
            for dt in (torch.float32, torch.float16):
                assert torch.equal(triton_int4.weight(q2, s2, z2, dt), triton_int4.dequantize(q2, s2, z2, dt)), (n2, k2, g2, dt)
        pick = triton_int4.pick(1, 2048, 5632, 128, 132)
        assert pick.block_m == 16 and pick.split > 1  # a narrow, deep linear at decode: split so every SM has work
        print("ok")
    """, tmp_path)


def test_engine_runner_on_the_kernel_equals_dequant(tmp_path):
    """The bundled model as an int4 g32 engine, every linear forced onto the kernel, against
    the same engine dequantized: float32 logits to 1e-4, and the same greedy tokens."""
    out = run_interpreted(f"""
        import torch
        from lmkiln.assets import bundled_model_path
        from lmkiln.quant.awq import QuantOptions
        from lmkiln.quant.pipeline import CalibOptions, quantize_model
        from lmkiln.runtime.engine_model import EngineModel
        from lmkiln.runtime.generate import greedy_generate
        eng = quantize_model(bundled_model_path(), {str(tmp_path / 'int4.engine')!r}, QuantOptions(bits=4, group_size=32,
                             method="rtn"), CalibOptions(n_samples=4, seqlen=64), to="engine", device="cpu").output
        tri = EngineModel.from_path(eng, linear_path="int4-triton")
        deq = EngineModel.from_path(eng, linear_path="dequant")
        assert set(tri.linear_paths().values()) == {{"int4-triton"}}, tri.linear_paths()
        x = torch.tensor([[1, 403, 261, 378, 289, 300, 90, 33, 77, 12]])
        diff = (tri.forward(x) - deq.forward(x)).abs().max().item()
        assert diff <= 1e-4, diff
        prompts = [[1, 403, 261, 378], [1, 90]]
        assert greedy_generate(tri, prompts, 12, ()) == greedy_generate(deq, prompts, 12, ())
        print("max |dlogit|", diff)
    """, tmp_path)
    assert "max |dlogit|" in out


def test_forced_kernel_refused_where_it_cannot_run():
    """Without the interpreter (this process), a CPU tensor cannot run the kernel: a forced
    path says why instead of failing inside Triton; 8-bit codes never take it."""
    import torch

    from lmkiln.runtime.qlinear import QuantLinear

    codes, scales, zeros = torch.zeros(64, 8, dtype=torch.uint8), torch.ones(2, 8), torch.zeros(2, 8, dtype=torch.uint8)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="int4-triton"):
            QuantLinear(codes, scales, zeros, 4, 64, path="int4-triton")
    with pytest.raises(ValueError, match="int4-triton"):
        QuantLinear(codes, scales, zeros, 8, 64, path="int4-triton")
