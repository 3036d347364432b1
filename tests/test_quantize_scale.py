"""Quantize at scale: the device option, chunked (memory-bounded) calibration that never
changes results, the plan (--dry-run), the disk check, and the job/sink structure.

CUDA tests skip without a GPU; everything else runs on the CPU in CI.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import build_model, make_tiny_model, torch_threads
from lmkiln.assets import bundled_model_path
from lmkiln.cli import app
from lmkiln.convert.architectures import get_architecture
from lmkiln.errors import InputError
from lmkiln.formats.engine import Engine
from lmkiln.quant.awq import QuantOptions, awq_layer
from lmkiln.quant.job import resolve_compute
from lmkiln.quant.pipeline import CalibOptions, plan_quantize, quantize_model

STORIES = bundled_model_path()
ARCH = get_architecture("LlamaForCausalLM")
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
SMALL = CalibOptions(n_samples=8, seqlen=64)
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def read_all(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "lmkiln_quant_report.json"}


def choices(report: dict) -> list:
    """What the searches chose, per layer: each group's alpha and each linear's clip ratio."""
    return [([g.get("alpha") for g in lay["groups"]], lay["linears"]) for lay in report["layers"]]


@torch.no_grad()
def _layer_inputs(n=8, t=32, seed=1):
    model = build_model("LlamaForCausalLM", seed=0, attn_implementation="sdpa")
    ids = torch.randint(3, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))
    x = model.model.embed_tokens(ids)
    kw = {"position_embeddings": model.model.rotary_emb(x, torch.arange(t)[None]), "attention_mask": None}
    return model, x, kw


# -- chunking bounds memory and changes nothing --------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5])
def test_awq_layer_chunking_changes_nothing(chunk):
    model, x, kw = _layer_inputs(n=12)  # chunks of 4 (or 8 then 4) against one of 12
    whole = QuantOptions(bits=4, group_size=32, chunk=x.shape[0])
    runs = []
    for o in (whole, QuantOptions(bits=4, group_size=32, chunk=chunk)):
        layer = copy.deepcopy(model.model.layers[0])
        runs.append(awq_layer(layer, ARCH, x, kw, o, layer_idx=0))
    (qa, ya, ra), (qb, yb, rb) = runs
    assert torch.equal(ya, yb)
    assert [g.get("alpha") for g in ra["groups"]] == [g.get("alpha") for g in rb["groups"]]
    assert ra["linears"] == rb["linears"]
    for role in qa:
        assert torch.equal(qa[role].codes, qb[role].codes), role
        assert torch.equal(qa[role].scales, qb[role].scales), role
        assert torch.equal(qa[role].zeros, qb[role].zeros), role


def test_bundled_model_chunked_and_unchunked_are_bit_identical(tmp_path):
    w4 = dict(bits=4, group_size=32)
    a = quantize_model(STORIES, tmp_path / "whole", QuantOptions(**w4, chunk=SMALL.n_samples), SMALL)
    b = quantize_model(STORIES, tmp_path / "chunked", QuantOptions(**w4, chunk=1), SMALL)
    assert choices(a.report) == choices(b.report)
    assert read_all(a.output) == read_all(b.output)


def test_awq_layer_allocates_nothing_on_the_default_device():
    """Run the whole layer job with the default device set to `meta`: any tensor created
    without an explicit device (torch.zeros(...) instead of zeros(..., device=w.device))
    lands on meta and the job fails, so this catches on a CPU what would put tensors on
    the wrong device on a GPU."""
    model, x, kw = _layer_inputs(n=4)
    ref_layer = copy.deepcopy(model.model.layers[0])
    o = QuantOptions(bits=4, group_size=32, chunk=2)
    qref, yref, _ = awq_layer(ref_layer, ARCH, x, kw, o, layer_idx=0)
    layer = copy.deepcopy(model.model.layers[0])
    with torch.device("meta"):
        qts, y, _ = awq_layer(layer, ARCH, x, kw, o, layer_idx=0)
    assert y.device.type == "cpu" and torch.equal(y, yref)
    for role, qt in qts.items():
        assert qt.codes.device.type == "cpu" and torch.equal(qt.codes, qref[role].codes), role


# -- the device and dtype options ---------------------------------------------------------------


def test_resolve_compute_defaults():
    c = resolve_compute("auto", "auto")
    assert c.device.type == ("cuda" if CUDA else "cpu")
    assert c.dtype == (torch.bfloat16 if CUDA else torch.float32)
    assert resolve_compute("cpu", "bf16").dtype == torch.bfloat16
    with pytest.raises(InputError, match="--dtype"):
        resolve_compute("cpu", "int8")
    with pytest.raises(InputError, match="--device"):
        resolve_compute("tpu", "auto")


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="no CUDA device"):
        resolve_compute("cuda", "auto")
    r = invoke("quantize", STORIES, "-o", tmp_path / "q", "--w4a16", "--device", "cuda:1")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cuda" in lines[0] and "--device cpu" in lines[0], r.output
    assert not (tmp_path / "q").exists()


def test_bf16_calibration_on_cpu(tmp_path):
    """bf16 calibration (the CUDA default) works on any device and only perturbs choices."""
    o = QuantOptions(bits=4, group_size=32)
    fp32 = quantize_model(STORIES, tmp_path / "fp32", o, SMALL, device="cpu", dtype="fp32")
    bf16 = quantize_model(STORIES, tmp_path / "bf16", o, SMALL, device="cpu", dtype="bf16")
    assert bf16.report["compute"]["dtype"] == "bfloat16"
    mse32 = [lay["mse_output"] for lay in fp32.report["layers"]]
    mse16 = [lay["mse_output"] for lay in bf16.report["layers"]]
    # bf16 forwards are noisier, but the quantized layers must stay as good within 2x
    assert all(b < 2 * a + 1e-6 for a, b in zip(mse32, mse16)), (mse32, mse16)
    # the output keeps the source's dtype: the fp tensors are fp32 like stories260K
    from safetensors import safe_open

    with safe_open(str(bf16.output / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.input_layernorm.weight").dtype == torch.float32


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_fp32_matches_cpu(tmp_path):
    """The same job in fp32 on CUDA and on the CPU: the same algorithm up to the order of
    floating-point sums, so the searches choose (nearly) the same and the layers come out as
    good. Not bit-identical: a grid point whose loss ties to rounding may flip (seen on an
    H100: the per-linear MSEs differ in the last digits, which made an exact comparison fail)."""
    o = QuantOptions(bits=4, group_size=32)
    cpu = quantize_model(STORIES, tmp_path / "cpu", o, SMALL, device="cpu", dtype="fp32")
    gpu = quantize_model(STORIES, tmp_path / "gpu", o, SMALL, device="cuda", dtype="fp32")
    alphas = [(a, b) for (ac, _), (ag, _) in zip(choices(cpu.report), choices(gpu.report)) for a, b in zip(ac, ag)]
    assert alphas and sum(a == b for a, b in alphas) >= 0.9 * len(alphas), alphas
    for lc, lg in zip(cpu.report["layers"], gpu.report["layers"]):
        assert lg["mse_output"] <= 1.1 * lc["mse_output"] + 1e-7, (lc["mse_output"], lg["mse_output"])
        for name, linear in lc["linears"].items():
            assert lg["linears"][name]["mse_final"] == pytest.approx(linear["mse_final"], rel=0.1, abs=1e-7), name


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_bf16_default_runs_and_reports_device_memory(tmp_path):
    res = quantize_model(STORIES, tmp_path / "q", QuantOptions(bits=4, group_size=32), SMALL, to="engine")
    assert res.report["compute"]["device"].startswith("cuda")
    assert res.report["totals"]["peak_device_mb"] > 0
    Engine(res.output, check=True)


# -- the plan -----------------------------------------------------------------------------------


def test_dry_run_reads_headers_only(tmp_path, monkeypatch):
    from lmkiln.formats.hf import HFCheckpoint

    def no_reads(self, name):
        raise AssertionError(f"--dry-run read tensor {name}")

    monkeypatch.setattr(HFCheckpoint, "get", no_reads)
    r = invoke("quantize", STORIES, "-o", tmp_path / "q", "--w4a16", "--group-size", "32", "--dry-run", "--device", "cpu")
    assert r.exit_code == 0, r.output
    for what in ("decoder layers", "peak host RAM", "output on disk", "resume state on disk", "free disk"):
        assert what in r.output, (what, r.output)
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []
    # the plan of an output in a folder that does not exist yet: free disk of the nearest existing folder (it raised)
    plan = plan_quantize(STORIES, tmp_path / "new" / "q", QuantOptions(bits=4, group_size=32), compute=resolve_compute("cpu", "fp32"))
    assert plan.free_disk > 0 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["awq", "rtn"])
def test_dry_run_probe_measures_one_layer(tmp_path, method):
    r = invoke("quantize", STORIES, "-o", tmp_path / "q", "--w4a16", "--group-size", "32", "--dry-run", "--probe",
               "--method", method, "--calib-samples", "4", "--calib-seqlen", "64")
    assert r.exit_code == 0, r.output
    assert "seconds for one layer" in r.output and "estimated total" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_dry_run_writes_its_plan_to_report_and_refuses_what_the_run_refuses(tmp_path):
    """--dry-run --report exited 0 and wrote nothing; --dry-run --calib-inputs quantized --ray printed a plan
    for a run that is refused."""
    import json

    base = ("quantize", STORIES, "-o", tmp_path / "q", "--w4a16", "--group-size", "32", "--dry-run")
    r = invoke(*base, "--report", tmp_path / "plan.json")
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["dry_run"] is True and plan["plan"]["n_layers"] == 5 and plan["plan"]["peak_host"] > 0
    r = invoke(*base, "--probe", "--method", "rtn", "--report", tmp_path / "probe.json")
    assert r.exit_code == 0, r.output
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["probe"] is True and probe["plan"]["n_layers"] == 5 and len(probe["layers"]) == 1
    r = invoke(*base, "--calib-inputs", "quantized", "--ray", "local")
    assert r.exit_code == 2 and "cannot run side by side" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "probe.json"]


def test_plan_grows_with_calibration_not_depth(tmp_path):
    shallow = make_tiny_model(tmp_path / "a", num_hidden_layers=2)
    deep = make_tiny_model(tmp_path / "b", num_hidden_layers=6)
    c = resolve_compute("cpu", "fp32")
    o = QuantOptions(bits=4, group_size=32, chunk=8)  # a fixed chunk (auto takes all samples of a tiny model)
    p2 = plan_quantize(shallow, tmp_path / "o", o, CalibOptions(n_samples=16, seqlen=256), c)
    p6 = plan_quantize(deep, tmp_path / "o", o, CalibOptions(n_samples=16, seqlen=256), c)
    p6_more = plan_quantize(deep, tmp_path / "o", o, CalibOptions(n_samples=64, seqlen=256), c)
    assert p2.peak_host == p6.peak_host
    assert p6.output_bytes > p2.output_bytes
    # more calibration samples add exactly their hidden states
    assert p6_more.peak_host - p6.peak_host == p6_more.hidden - p6.hidden == 2 * 48 * 256 * 64 * 4


def test_refuses_to_start_without_disk_space(tmp_path, monkeypatch):
    import lmkiln.quant.plan as plan

    monkeypatch.setattr(plan, "free_bytes", lambda p: 1000)
    r = invoke("quantize", STORIES, "-o", tmp_path / "q", "--w4a16", "--group-size", "32", "--method", "rtn")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and " free, the output needs" in lines[0] and "needs" in lines[0], r.output
    assert list(tmp_path.iterdir()) == []


# -- structure: --to engine streams layers, no AWQ-GEMM detour -----------------------------------


def test_to_engine_writes_no_awq_checkpoint(tmp_path, monkeypatch):
    import lmkiln.convert.hf_to_engine as h2e

    def no_conversion(*a, **k):
        raise AssertionError("--to engine went through an AWQ-GEMM checkpoint and convert_hf_to_engine")

    monkeypatch.setattr(h2e, "convert_hf_to_engine", no_conversion)
    res = quantize_model(STORIES, tmp_path / "e", QuantOptions(bits=4, group_size=32, method="rtn"), to="engine")
    eng = Engine(res.output, check=True)
    assert eng.manifest["weight_type"] == "int4" and eng.quant["method"] == "rtn"
    # no interchange layout was read, so none is recorded (it said "awq-gemm"), and inspect says so
    assert "source_layout" in eng.quant and eng.quant["source_layout"] is None
    from lmkiln.inspect_model import describe

    assert dict(describe(res.output)[1])["quantization"].startswith("rtn, quantized straight to the engine;")


def test_report_has_per_layer_output_error_and_device(tmp_path):
    res = quantize_model(STORIES, tmp_path / "q", QuantOptions(bits=4, group_size=32), SMALL)
    rtn = quantize_model(STORIES, tmp_path / "r", QuantOptions(bits=4, group_size=32, method="rtn"), SMALL)
    for lay in res.report["layers"]:
        assert lay["device"] == "cpu" and lay["mse_output"] > 0
        for g in lay["groups"]:
            if "alpha" in g:
                assert g["mse_final"] <= g["mse_rtn"] * 1.0001, g
    assert rtn.report["layers"][0]["groups"] == []
    saved = json.loads((res.output / "lmkiln_quant_report.json").read_text())
    assert saved["plan"]["n_layers"] == 5 and saved["compute"]["device"].startswith("cpu")


# -- the in-place search kernels are the reference ones, bit for bit ------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape, group", [((48, 80), 32), ((16, 172), -1), ((64, 64), 8)])
def test_in_place_fake_quantize_matches_reference(shape, group, symmetric):
    from lmkiln.quant.awq import qdq, trial_weight
    from lmkiln.quant.primitives import fake_quantize, fake_quantize_, pad_to_multiple

    g = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, generator=g) * torch.rand(shape[1], generator=g) * 4
    gs = shape[1] if group == -1 else group
    wp, _ = pad_to_multiple(w, 1, gs)
    assert torch.equal(fake_quantize_(wp.clone(), 4, gs, symmetric), fake_quantize(wp, 4, gs, symmetric))
    o = QuantOptions(bits=4, group_size=group, symmetric=symmetric)
    s = 0.5 + torch.rand(shape[1], generator=g)
    assert torch.equal(trial_weight(w, s, o), qdq(w * s, o) / s)
    assert torch.equal(trial_weight(w, None, o), qdq(w, o))


def test_dry_run_refuses_what_the_run_refuses(tmp_path):
    rtn = quantize_model(STORIES, tmp_path / "q", QuantOptions(bits=4, group_size=32, method="rtn"))
    r = invoke("quantize", rtn.output, "-o", tmp_path / "again", "--w4a16", "--dry-run")
    assert r.exit_code == 2 and "already quantized" in r.output, r.output
    r = invoke("quantize", STORIES, "-o", tmp_path / "x", "--w4a16", "--dry-run", "--group-size", "4")
    assert r.exit_code == 2 and "--group-size 4" in r.output, r.output
    ctx = json.loads((STORIES / "config.json").read_text())["max_position_embeddings"]
    r = invoke("quantize", STORIES, "-o", tmp_path / "x", "--w4a16", "--dry-run", "--group-size", "32",
               "--calib-seqlen", str(2 * ctx))  # (printed a plan, exit 0, for a run that stops at calibration)
    assert r.exit_code == 2 and f"--calib-seqlen {2 * ctx} exceeds the model's context ({ctx})" in r.output, r.output
    r = invoke("quantize", STORIES, "-o", tmp_path / "x", "--w4a16", "--dry-run", "--group-size", "32", "--method", "rtn",
               "--calib-seqlen", str(2 * ctx))  # RTN reads no calibration text: nothing to refuse
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("method", ["awq", "rtn"])
def test_nan_in_a_source_weight_names_the_tensor(method, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "model"
    shutil.copytree(bundled_model_path(), src)
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.3.mlp.up_proj.weight"][5, 7] = float("nan")
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    r = invoke("quantize", src, "-o", tmp_path / "out", "--w4a16", "--group-size", "32", "--method", method,
               "--calib-samples", "4", "--calib-seqlen", "64")
    assert r.exit_code == 2, r.output
    assert "'model.layers.3.mlp.up_proj.weight' (decoder layer 3, shape (172, 64)) contains NaN or Inf" in r.output
    assert not (tmp_path / "out").exists()


def test_disk_full_while_quantizing_is_one_line_and_resumable(tmp_path, monkeypatch):
    """torch.save reports a short write as "unexpected pos"; with the disk (nearly) full
    that is a DiskFullError: one line, exit 2, the finished layers kept for --resume."""
    import lmkiln.formats.space as space
    import lmkiln.quant.state as state

    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # layer 1's hidden states: the disk fills up here
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
        return real_save(obj, f, *a, **kw)

    real_free = space.free_bytes
    monkeypatch.setattr(state.torch, "save", failing_save)
    monkeypatch.setattr(space, "free_bytes", lambda p: 1000)  # once the run has started: the plan saw enough
    out = tmp_path / "out"
    args = ["quantize", bundled_model_path(), "-o", out, "--w4a16", "--group-size", "32", "--calib-samples", "8",
            "--calib-seqlen", "64"]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert "the disk is full (1000 B free; the output needs about" in r.output
    assert "re-run with --resume (finished layers are kept)" in r.output and "Traceback" not in r.output
    assert not out.exists() and (tmp_path / ".out.lmkiln-partial" / "state" / "layer0.safetensors").exists()

    monkeypatch.setattr(state.torch, "save", real_save)
    monkeypatch.setattr(space, "free_bytes", real_free)
    r = invoke(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming after 1 finished layer(s)" in r.output
    ref = quantize_model(bundled_model_path(), tmp_path / "ref", QuantOptions(bits=4, group_size=32),
                         CalibOptions(n_samples=8, seqlen=64)).output
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_output_directory_removed_during_quantize_is_one_line(tmp_path, monkeypatch):
    """`rm -rf` (or `mv`) of the output's parent under a running quantize: torch.save's "Parent
    directory ... does not exist" was an internal error, exit 3."""
    import shutil

    import lmkiln.quant.state as state

    real_save = torch.save
    parent = tmp_path / "sub"
    parent.mkdir()

    def save_after_rm(obj, f, *a, **kw):
        shutil.rmtree(parent, ignore_errors=True)
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(state.torch, "save", save_after_rm)
    r = invoke("quantize", bundled_model_path(), "-o", parent / "out", "--w4a16", "--group-size", "32", "--calib-samples", "4",
               "--calib-seqlen", "64")
    assert r.exit_code == 2, r.output
    assert f"{parent}: the output's directory disappeared during the run (removed or renamed)" in r.output
    assert "internal error" not in r.output and not parent.exists()


def test_disk_full_while_converting_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from lmkiln.formats.safetensors_io import StreamWriter

    def full(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StreamWriter, "_emit", full)
    r = invoke("convert", "hf-to-engine", bundled_model_path(), "-o", tmp_path / "eng")
    assert r.exit_code == 2, r.output
    assert "the disk is full" in r.output and "the output needs about" in r.output and "free space and re-run" in r.output
    assert list(tmp_path.iterdir()) == []  # no output, no temporary sibling


def test_convert_checks_free_disk_up_front(tmp_path, monkeypatch):
    """convert refuses an engine the disk cannot hold before writing (quantize did; convert wrote until full)."""
    import lmkiln.formats.space as space
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    src = bundled_model_path()
    size = sum(p.stat().st_size for p in convert_hf_to_engine(src, tmp_path / "ref").iterdir() if p.suffix == ".safetensors")
    monkeypatch.setattr(space, "free_bytes", lambda p: size // 2)
    r = invoke("convert", "hf-to-engine", src, "-o", tmp_path / "eng")
    assert r.exit_code == 2, r.output
    assert f"{tmp_path}: " in r.output and "free, the output needs about" in r.output and "choose another -o" in r.output
    assert not (tmp_path / "eng").exists()


def test_plan_counts_the_hessians(tmp_path):
    """Every calibrated method holds one in x in fp32 Hessian per distinct linear input for the
    layer job: q/k/v share the attention norm's output, gate/up the FFN norm's; o and down their own;
    plus the one fp32 block of tokens hessian_update adds at a time."""
    from lmkiln.assets import bundled_model_path
    from lmkiln.formats.hf import HFCheckpoint
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import CalibOptions, plan_quantize

    cfg = HFCheckpoint(bundled_model_path()).config
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    attn = cfg["num_attention_heads"] * (cfg.get("head_dim") or h // cfg["num_attention_heads"])
    from lmkiln.quant.gptq import HESSIAN_ROWS

    want = 4 * (h * h + attn * attn + h * h + inter * inter) + 4 * HESSIAN_ROWS * max(h, attn, inter)
    for method in ("awq", "gptq", "awq+gptq"):
        plan = plan_quantize(bundled_model_path(), tmp_path / "x", QuantOptions(method=method, group_size=32), CalibOptions())
        assert plan.hessians == want
        value, unit = dict(plan.rows())["X Hessians (one per linear input, fp32)"].split()
        assert float(value) * {"KiB": 1 << 10, "MiB": 1 << 20}[unit] == pytest.approx(want, rel=0.01)
    assert plan_quantize(bundled_model_path(), tmp_path / "x", QuantOptions(method="rtn", group_size=32), CalibOptions()).hessians == 0


def test_resume_fingerprint_sees_weights_past_the_first_mib(tmp_path):
    """The fingerprint read each weight file's first MiB only: a checkpoint swapped for one with the same
    size and header that differed further in was resumed, mixing old and new layers."""
    from safetensors.torch import save_file

    from lmkiln.formats.hf import HFCheckpoint
    from lmkiln.quant.pipeline import FINGERPRINT_BYTES, FINGERPRINT_SAMPLES, model_fingerprint

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file({"w": torch.zeros(3 << 20, dtype=torch.float32)}, str(d / "model.safetensors"))  # 12 MiB
    before = model_fingerprint(HFCheckpoint(d))
    assert model_fingerprint(HFCheckpoint(d)) == before
    raw = bytearray((d / "model.safetensors").read_bytes())
    n, b, k = len(raw), FINGERPRINT_BYTES, FINGERPRINT_SAMPLES
    # a byte inside the 2nd and the middle sampled spans, and the last byte: all past the first MiB (a weight
    # swapped by a fine-tune differs all over; no sample finds a single byte between the spans)
    for at in ((n - b) // (k - 1) + b // 2, (n - b) * (k // 2) // (k - 1) + 1, n - 1):
        changed = raw.copy()
        changed[at] ^= 0x40
        (d / "model.safetensors").write_bytes(changed)
        assert model_fingerprint(HFCheckpoint(d)) != before, at
