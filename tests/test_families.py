"""Every family in the architecture table, end to end on a tiny random model built from its
transformers config class: convert -> engine runner == transformers (fp32, --tp 1 and 2,
greedy identical); quantize W4 g32 (AWQ) -> engine and AWQ-GEMM -> engine == the
fake-quantized transformers model; what a family refuses, refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ARCHS, FAMILY_ARCHS, load_hf_model, make_tiny_model
from lmkiln.convert.architectures import ARCHITECTURES
from lmkiln.convert.hf_to_engine import convert_hf_to_engine
from lmkiln.formats.engine import MANIFEST, Engine
from lmkiln.runtime.engine_model import EngineModel

ALL = sorted(ARCHITECTURES)
TIED = {"Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen2ForCausalLM"}


def test_every_table_entry_is_tested():
    assert set(ALL) == set(ARCHS) | set(FAMILY_ARCHS)


@pytest.fixture(scope="module", params=ALL)
def family(request, tmp_path_factory):
    arch = request.param
    d = tmp_path_factory.mktemp(arch)
    hf = make_tiny_model(d / "hf", arch, seed=5, tie_word_embeddings=arch in TIED)
    return arch, d, hf


def _ids(T=12, B=2):
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(2))


def _greedy(step, ids, n=8):
    for _ in range(n):
        ids = torch.cat([ids, step(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_convert_matches_transformers(family):
    arch, d, hf = family
    ref_model = load_hf_model(hf, attn="eager")
    ids = _ids()
    with torch.no_grad():
        ref = ref_model(ids).logits
    for tp in (1, 2):
        eng = convert_hf_to_engine(hf, d / f"tp{tp}.engine", tp=tp, force=True)
        model = EngineModel.from_path(eng)
        got = model(ids)
        assert (got - ref).abs().max().item() <= 1e-4, f"{arch} tp{tp}"
        with torch.no_grad():
            want = _greedy(lambda x: ref_model(x).logits, ids[:1])
        assert torch.equal(_greedy(model, ids[:1]), want)


def test_manifest_version(family):
    """Families with v2 fields write format v2 (v1 readers refuse them); the others stay v1."""
    arch, d, hf = family
    eng = convert_hf_to_engine(hf, d / "v.engine", force=True)
    m = json.loads((eng / MANIFEST).read_text())
    assert m["format_version"] == (2 if arch.startswith("Gemma") else 1)
    assert Engine(eng).model["architecture"] == arch


def _fake_quantized_reference(hf, qdir, arch):
    """transformers' model with every linear replaced by the dequantized weights of the AWQ-GEMM
    output (and its folded norms): the fake-quantized model the engine must reproduce."""
    from lmkiln.quant.dequant import fake_quant_state_dict

    model = load_hf_model(hf, attn="eager")
    _, sd = fake_quant_state_dict(qdir)
    missing = model.load_state_dict(sd, strict=False)
    assert not missing.unexpected_keys
    return model


@pytest.mark.parametrize("arch", ALL)
def test_quantize_awq_matches_fake_quantized_transformers(arch, tmp_path):
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import CalibOptions, quantize_model

    hf = make_tiny_model(tmp_path / "hf", arch, seed=5, tie_word_embeddings=arch in TIED, intermediate_size=128)
    o = QuantOptions(bits=4, group_size=32, method="awq")
    calib = CalibOptions(n_samples=4, seqlen=16)
    qhf = quantize_model(hf, tmp_path / "q-hf", o, calib, to="hf").output
    qeng = quantize_model(hf, tmp_path / "q.engine", o, calib, to="engine").output
    via = convert_hf_to_engine(qhf, tmp_path / "via.engine")
    ids = _ids()
    with torch.no_grad():
        ref = _fake_quantized_reference(hf, qhf, arch)(ids).logits
    for eng in (qeng, via):
        got = EngineModel.from_path(eng)(ids)
        assert (got - ref).abs().max().item() <= 1e-4, f"{arch} {eng.name}"
    rep = json.loads((qeng / "lmkiln_quant_report.json").read_text())
    assert all(r["groups"] for r in rep["layers"])


@pytest.mark.parametrize("arch", ALL)
def test_awq_folds_are_exact(arch):
    """Folding a random scale into every applicable group (norms with Gemma's (1 + w), a fused
    linear's part for Phi-3) leaves the decoder layer's output unchanged: AWQ's premise."""
    from helpers import build_model
    from lmkiln.quant.awq import Master, fold_scale, group_applies

    a = ARCHITECTURES[arch]
    model = build_model(arch, seed=1, tie_word_embeddings=arch in TIED)
    model.config._attn_implementation = "eager"
    layer = model.get_submodule(a.layer_prefix.format(i=0))
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    T = x.shape[1]
    pos = torch.arange(T)[None].float()
    rot = model.model.rotary_emb
    kw = {"position_embeddings": rot(x, pos.long(), "full_attention") if arch == "Gemma3ForCausalLM" else rot(x, pos.long()),
          "attention_mask": torch.full((T, T), float("-inf")).triu(1)[None, None]}
    with torch.no_grad():
        ref = layer(x, **kw)
        ref = ref[0] if isinstance(ref, tuple) else ref
        master = Master(layer)
        g = torch.Generator().manual_seed(3)
        applied = [gr for gr in a.awq_groups if group_applies(gr, a, layer)]
        assert applied
        for gr in applied:
            width = layer.get_submodule(a.module_of(gr.linears[0])).weight.shape[1]
            fold_scale(master, a, gr, 0.5 + torch.rand(width, generator=g))
        got = layer(x, **kw)
        got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_onnx_export_or_clear_refusal(family):
    """ONNX where the graph builds the family (parity with the engine runner), else one line naming what it lacks."""
    from lmkiln.errors import InputError
    from lmkiln.export import export_onnx, onnx_unsupported
    from lmkiln.runtime.onnx_runner import OnnxRunner

    arch, d, hf = family
    eng = convert_hf_to_engine(hf, d / "onnx-src.engine", force=True)
    model = Engine(eng).model
    if onnx_unsupported(model):
        with pytest.raises(InputError, match=f"ONNX export of {arch} is not supported yet: the graph has no "):
            export_onnx(eng, d / "onnx")
        assert not (d / "onnx").exists()
        return
    ids = _ids()  # 12 tokens: longer than the tiny windows (6), so local attention is exercised
    want = EngineModel.from_path(eng)(ids)
    for portable in (False, True):
        out = export_onnx(eng, d / f"onnx-{portable}", portable=portable, force=True)
        torch.testing.assert_close(OnnxRunner(out).forward(ids), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_cli_end_to_end(arch, tmp_path):
    """As a user runs it: convert, quantize (AWQ-GEMM and engine), verify each against the source, export."""
    from typer.testing import CliRunner

    from lmkiln.cli import app

    def run(*args):
        r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})
        return r.exit_code, r.output

    hf = make_tiny_model(tmp_path / "hf", arch, seed=5, tie_word_embeddings=arch in TIED, intermediate_size=128)
    assert run("convert", "hf-to-engine", hf, "-o", tmp_path / "fp.engine")[0] == 0
    q = ("--w4a16", "--group-size", "32", "--calib-samples", "4", "--calib-seqlen", "32")
    assert run("quantize", hf, "-o", tmp_path / "q-hf", *q)[0] == 0
    assert run("quantize", hf, "-o", tmp_path / "q.engine", "--to", "engine", *q)[0] == 0
    v = ("--max-tokens", "256", "--seqlen", "64", "--max-new-tokens", "4")
    code, out = run("verify", hf, tmp_path / "fp.engine", *v)
    assert code == 0, out  # the fp engine is the source's math: every default threshold holds
    for cand in ("q-hf", "q.engine"):
        code, out = run("verify", hf, tmp_path / cand, *v, "--report", tmp_path / f"{cand}.json")
        assert code in (0, 1), out  # a random tiny model may miss thresholds; the report must exist
        rep = json.loads((tmp_path / f"{cand}.json").read_text())
        assert rep["candidate"]["weight_type"] == "int4" and rep["passed"] == (code == 0)
    code, out = run("export", "onnx", tmp_path / "q.engine", "-o", tmp_path / "onnx")
    if arch.startswith("Gemma"):
        assert code == 2 and "not supported yet" in out
    else:
        assert code == 0, out
