"""GPTQ (`--method gptq`, `--method awq+gptq`): the rounding itself against RTN, the
layout its codes land in, and the methods end to end."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import BUNDLED, torch_threads
from lmkiln.assets import bundled_model_path
from lmkiln.formats.awq_gemm import AwqSpec, read_qlinear, write_qlinear
from lmkiln.quant.awq import QuantOptions, quantize_weight
from lmkiln.quant.gptq import gptq_quantize, hessian_update, output_mse
from lmkiln.quant.pipeline import REPORT, CalibOptions, quantize_model
from lmkiln.runtime.engine_model import EngineModel

CALIB = CalibOptions(n_samples=8, seqlen=64)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def weight_and_inputs(seed=0, out_f=48, in_f=100, tokens=2000):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(tokens, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g)  # correlated features
    h, n = hessian_update(None, x)
    return w, h, n


def test_hessian_update_in_blocks_equals_one_product(monkeypatch):
    """H is added a block of tokens at a time, in place (no (in, in) temporary): the same
    2·XᵀX as one product, to fp32 rounding, and chunks add up to the whole."""
    import lmkiln.quant.gptq as gptq

    x = torch.randn(1000, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    want = 2 * x.double().t() @ x.double()
    monkeypatch.setattr(gptq, "HESSIAN_ROWS", 96)  # 11 blocks, the last partial
    h, n = hessian_update(None, x[:700])
    h, n2 = hessian_update(h, x[700:].reshape(3, 100, 64))  # (..., in) inputs too
    assert (n, n2) == (700, 300) and h.dtype == torch.float32
    torch.testing.assert_close(h.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("group,sym", [(32, False), (32, True), (-1, False), (64, True)])
def test_identity_hessian_is_rtn(group, sym):
    """With H = I no error is pushed to other columns: GPTQ on min/max grids is round-to-nearest, bit for bit."""
    w, _, _ = weight_and_inputs()
    q = gptq_quantize(w, torch.eye(w.shape[1]), 4, group, sym, grid_steps=1)
    r = quantize_weight(w, QuantOptions(bits=4, group_size=group, symmetric=sym))
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales) and torch.equal(q.zeros.int(), r.zeros.int())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_beats_rtn_on_its_objective(act_order, bits):
    w, h, n = weight_and_inputs(seed=1)
    q = gptq_quantize(w, h, bits, 32, False, act_order=act_order)
    rtn = quantize_weight(w, QuantOptions(bits=bits, group_size=32)).dequantize()
    assert output_mse(w, q.dequantize(), h, n) < 0.8 * output_mse(w, rtn, h, n)
    # output_mse is the mean squared output error: check it against the outputs themselves
    x = torch.randn(500, w.shape[1], generator=torch.Generator().manual_seed(2))
    h2, n2 = hessian_update(None, x)
    direct = float(((x @ (w - q.dequantize()).t()) ** 2).mean())
    assert output_mse(w, q.dequantize(), h2, n2) == pytest.approx(direct, rel=1e-4)


def test_output_mse_of_a_folded_linear_is_on_its_real_outputs():
    """A linear that reads X / s (AWQ's fold): output_mse with in_scale=s and the unscaled
    inputs' Hessian is the squared error of its outputs on X / s, and the same as handing it
    the folded Hessian H / (s sᵀ) (what awq_layer built before, an in x in copy)."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(24, 64, generator=g), torch.randn(400, 64, generator=g)
    s = torch.rand(64, generator=g) + 0.5
    w_hat = quantize_weight(w, QuantOptions(bits=4, group_size=32)).dequantize()
    h, n = hessian_update(None, x)
    direct = float((((x / s) @ (w - w_hat).t()) ** 2).mean())
    assert output_mse(w, w_hat, h, n, in_scale=s) == pytest.approx(direct, rel=1e-4)
    assert output_mse(w, w_hat, h, n, in_scale=s) == pytest.approx(output_mse(w, w_hat, h / (s[:, None] * s[None, :]), n), rel=1e-5)


def test_act_order_codes_stay_in_the_standard_layout():
    """Static groups: every group's scale and zero come from the original weights in input
    order, so the QTensor packs to AWQ-GEMM and reads back unchanged."""
    w, h, _ = weight_and_inputs(seed=3, in_f=96)
    q = gptq_quantize(w, h, 4, 32, False, act_order=True, grid_steps=1)
    rtn = quantize_weight(w, QuantOptions(bits=4, group_size=32))
    assert torch.equal(q.scales, rtn.scales) and torch.equal(q.zeros.int(), rtn.zeros.int())
    q = gptq_quantize(w, h, 4, 32, False, act_order=True)  # searched grids: still set up front, same layout
    packed = write_qlinear(q)
    back = read_qlinear(lambda k: packed[k.rsplit(".", 1)[1]], "m", AwqSpec(bits=4, group_size=32, zero_point=True), *w.shape)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("act_order", [False, True])
def test_searched_grids_beat_min_max_grids(act_order):
    """grid_qparams: each group's range shrink is chosen by the diag-H-weighted rounding error.
    With uncorrelated inputs (diagonal H) GPTQ pushes no error across columns, so that is
    exactly the output error: the searched grids can only lower it, and with heavy-tailed
    weights (Student t, 3 degrees of freedom, as trained weights are) whose outliers stretch
    min/max grids they do."""
    from lmkiln.quant.primitives import grid_qparams

    g = torch.Generator().manual_seed(6)
    h = torch.diag(torch.rand(128, generator=g) * 10 + 0.1) * 2000  # channels of different energy
    torch.manual_seed(6)
    w = torch.distributions.StudentT(torch.tensor(3.0)).sample((48, 128))
    plain = gptq_quantize(w, h, 4, 32, False, act_order=act_order, grid_steps=1, damp=0.0)
    searched = gptq_quantize(w, h, 4, 32, False, act_order=act_order, damp=0.0)
    assert output_mse(w, searched.dequantize(), h, 1000) < 0.97 * output_mse(w, plain.dequantize(), h, 1000)
    assert (searched.scales < plain.scales).any()  # some groups did shrink
    w, h, n = weight_and_inputs(seed=5, in_f=128)
    # One group by hand: the chosen grid's weighted error is the least of the 20 shrinks.
    blk, hd = w[:, :32], torch.diag(h)[:32]
    s, z = grid_qparams(blk, 4, 32, False, hd)

    def err(s, z):
        s16 = s.half().float()
        return ((torch.clamp(torch.round(blk / s16) + z, 0, 15) - z) * s16 - blk) ** 2 @ hd

    amax = blk.abs().amax(1, keepdim=True)
    from lmkiln.quant.primitives import compute_qparams

    errs = torch.stack([err(*compute_qparams(blk, 4, 32, False, clip_max=amax * (1 - i / 100))) for i in range(20)])
    torch.testing.assert_close(err(s, z), errs.min(0).values)


def test_dead_and_padded_inputs():
    """Inputs that never fire get weight 0; an input width that is not whole groups is padded."""
    w, h, _ = weight_and_inputs(seed=4, in_f=90)
    h[5, :] = 0
    h[:, 5] = 0
    q = gptq_quantize(w, h, 4, 32, False)
    assert q.in_features == 90 and q.in_padded == 96
    assert float(q.dequantize()[:, 5].abs().max()) == 0.0
    assert torch.isfinite(q.dequantize()).all()


@pytest.fixture(scope="module")
def eval_ids():
    from pathlib import Path

    from lmkiln.formats.tokenizer import load_tokenizer

    text = (Path(__file__).parent / "fixtures" / "tinystories_eval.txt").read_text(encoding="utf-8")
    return torch.tensor(load_tokenizer(bundled_model_path())(text, add_special_tokens=False).input_ids)[:8000]


def engine_ppl(engine, ids) -> float:
    from helpers import perplexity

    model = EngineModel.from_path(engine)
    with torch.no_grad():
        return perplexity(lambda x: model(x), ids, 511, bos_id=1)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq", "awq"])
def test_methods_end_to_end(method, eval_ids, tmp_path):
    """quantize -> engine: the report's per-linear errors, and in-domain perplexity below RTN's."""
    calib = CalibOptions(n_samples=16, seqlen=128)
    res = quantize_model(bundled_model_path(), tmp_path / "eng", QuantOptions(bits=4, group_size=32, method=method), calib,
                         to="engine")
    rtn = quantize_model(bundled_model_path(), tmp_path / "rtn", QuantOptions(bits=4, group_size=32, method="rtn"), calib,
                         to="engine")
    rep = json.loads((res.output / REPORT).read_text())
    assert rep["method"] == method
    for lay in rep["layers"]:
        lin = lay["linears"]
        assert set(lin) == {"q", "k", "v", "o", "gate", "up", "down"}
        # per linear: RTN's and the method's output MSE on the calibration tokens (and AWQ's for awq+gptq)
        # AWQ's search scores q and k through the attention block's output (softmax), not their own
        # outputs, and may trade theirs up (measured: k's often rises); every other linear gains.
        own = [v for r, v in lin.items() if method != "awq" or r not in ("q", "k")]
        assert sum(v["mse_final"] for v in own) < sum(v["mse_rtn"] for v in own)
        assert all(("mse_awq" in v) == (method != "gptq") for v in lin.values())
        if method == "awq":  # what plain AWQ stores is its scaled, clipped RTN
            assert all(v["mse_awq"] == v["mse_final"] for v in lin.values())
        assert lay["mse_output"] > 0
    assert engine_ppl(res.output, eval_ids) < engine_ppl(rtn.output, eval_ids)


def test_act_order_end_to_end_and_cli(tmp_path):
    from typer.testing import CliRunner

    from lmkiln.cli import app

    out = tmp_path / "awq"
    r = CliRunner().invoke(app, ["quantize", str(bundled_model_path()), "-o", str(out), "--w4a16", "--group-size", "32",
                                 "--method", "gptq", "--act-order", "--damp", "0.05", "--calib-samples", "8",
                                 "--calib-seqlen", "64"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    rep = json.loads((out / REPORT).read_text())
    assert rep["options"]["act_order"] is True and rep["options"]["damp"] == 0.05
    r = CliRunner().invoke(app, ["quantize", str(bundled_model_path()), "-o", str(tmp_path / "x"), "--w4a16",
                                 "--method", "gptq", "--damp", "1.5"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 2 and "--damp 1.5" in r.output


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calib_inputs_quantized(method, tmp_path):
    """--calib-inputs quantized: layer i+1 calibrates on the quantized layer i's output. Layer 0 sees
    the same inputs either way (identical codes); later layers see other inputs (other codes)."""
    from lmkiln.formats.engine import Engine
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import CalibOptions, quantize_model

    calib = CalibOptions(n_samples=4, seqlen=64)
    runs = {ci: quantize_model(BUNDLED, tmp_path / ci, QuantOptions(bits=4, group_size=32, method=method, calib_inputs=ci),
                               calib, to="engine").output for ci in ("fp", "quantized")}
    a, b = Engine(runs["fp"]), Engine(runs["quantized"])
    q0 = "layers.0.attention.w_qkv.0.qweight"
    assert torch.equal(a.get(q0), b.get(q0))
    last = f"layers.{a.model['num_layer'] - 1}.feed_forward.w2.0.qweight"
    assert not torch.equal(a.get(last), b.get(last))


def test_calib_inputs_quantized_refuses_ray_and_bad_values(tmp_path):
    from lmkiln.errors import InputError
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import quantize_model

    with pytest.raises(InputError, match="--calib-inputs 'int8': choose fp, quantized"):
        quantize_model(BUNDLED, tmp_path / "x", QuantOptions(calib_inputs="int8"))
    with pytest.raises(InputError, match="cannot run side by side: drop --ray"):
        quantize_model(BUNDLED, tmp_path / "y", QuantOptions(calib_inputs="quantized"), driver=lambda *a: iter(()))
