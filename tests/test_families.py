"""Every family in the architecture table, end to end on a tiny random model built from its
transformers config class: convert -> engine runner == transformers (fp32, --tp 1 and 2,
greedy identical); quantize W4 g32 (AWQ) -> engine and AWQ-GEMM -> engine == the
fake-quantized transformers model; what a family refuses, refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ARCHS, FAMILY_ARCHS, genai_greedy, load_hf_model, make_tiny_model
from lmkiln.convert.architectures import ARCHITECTURES
from lmkiln.convert.hf_to_engine import convert_hf_to_engine
from lmkiln.formats.engine import FAMILY_FIELDS, MANIFEST, Engine
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
    """Every engine is written as format v4 (fp linears stored (out, in); older readers refuse it), and only families
    with v2 fields write them into the model block."""
    arch, d, hf = family
    eng = convert_hf_to_engine(hf, d / "v.engine", force=True)
    m = json.loads((eng / MANIFEST).read_text())
    assert m["format_version"] == 4
    v2 = arch.startswith("Gemma") or ARCHITECTURES[arch].moe
    assert bool(set(FAMILY_FIELDS) & set(m["model"])) == v2
    assert Engine(eng).model["architecture"] == arch


def _fake_quantized_reference(qdir, out):
    """transformers' own model of the AWQ-GEMM output's dequantized weights (and folded norms):
    the fake-quantized model the engine must reproduce (loaded as transformers loads any
    checkpoint, so MoE experts go through its own per-expert -> stacked conversion)."""
    from lmkiln.quant.dequant import write_fake_quant_checkpoint

    return load_hf_model(write_fake_quant_checkpoint(qdir, out), attn="eager")


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
    engines = [qeng, via]
    m = Engine(qeng).model
    if (m["head_num"] * m["size_per_head"] // 2) % 32 == 0:  # each rank's attention output whole groups
        engines.append(convert_hf_to_engine(qhf, tmp_path / "via-tp2.engine", tp=2))  # codes split over ranks, merged at load
    ids = _ids()
    with torch.no_grad():
        ref = _fake_quantized_reference(qhf, tmp_path / "fq")(ids).logits
    for eng in engines:
        got = EngineModel.from_path(eng)(ids)
        assert (got - ref).abs().max().item() <= 1e-4, f"{arch} {eng.name}"
    rep = json.loads((qeng / "lmkiln_quant_report.json").read_text())
    assert all(r["groups"] for r in rep["layers"])
    from lmkiln.export import export_onnx, onnx_unsupported
    from lmkiln.runtime.onnx_runner import OnnxRunner

    if not onnx_unsupported(Engine(qeng).model):  # int4 ONNX (exact accuracy level 0) runs the same weights
        out = export_onnx(qeng, tmp_path / "onnx", accuracy_level=0)
        torch.testing.assert_close(OnnxRunner(out).forward(ids), EngineModel.from_path(qeng)(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ALL)
def test_awq_folds_are_exact(arch, tmp_path):
    """Folding a random scale into every applicable group (norms with Gemma's (1 + w), a fused
    linear's part for Phi-3, every expert and the router for MoE) leaves the decoder layer as
    calibration runs it unchanged: AWQ's premise."""
    from lmkiln.convert.hf_config import engine_config_from_hf
    from lmkiln.formats.hf import HFCheckpoint
    from lmkiln.quant.awq import Master, fold_scale, group_applies
    from lmkiln.quant.job import LayerModule, resolve_compute
    from lmkiln.quant.moe import layer_experts
    from lmkiln.quant.pipeline import calibration_kwargs

    a = ARCHITECTURES[arch]
    hf = make_tiny_model(tmp_path / "hf", arch, seed=1, tie_word_embeddings=arch in TIED, tokenizer=False)
    ckpt, compute = HFCheckpoint(hf), resolve_compute("cpu", "fp32")
    mcfg = engine_config_from_hf(a, ckpt.config)
    x = torch.randn(2, 12, mcfg["hidden_units"], generator=torch.Generator().manual_seed(0))
    mod = LayerModule(ckpt, a, compute)
    for i in range(mcfg["num_layer"]):
        kw = calibration_kwargs(mcfg, x[:, :, 0], compute)[i]
        layer, _ = mod.load(i)
        with torch.no_grad():
            ref = layer(x, **kw)
            ref = ref[0] if isinstance(ref, tuple) else ref
            master = Master(layer)
            g = torch.Generator().manual_seed(3)
            applied = [gr for gr in a.scale_groups(layer_experts(a, layer)) if group_applies(gr, a, layer)]
            assert applied
            for gr in applied:
                width = layer.get_submodule(a.module_of(gr.linears[0])).weight.shape[1]
                fold_scale(master, a, gr, 0.5 + torch.rand(width, generator=g))
            got = layer(x, **kw)
            got = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_calibration_layer_is_the_reference_layer(family):
    """What calibration runs for each layer (transformers' layer, MoE blocks replaced by
    quant/moe.py, per-layer rope and masks) chains to transformers' own hidden states."""
    from lmkiln.convert.hf_config import engine_config_from_hf
    from lmkiln.formats.hf import HFCheckpoint
    from lmkiln.quant.job import LayerModule, resolve_compute
    from lmkiln.quant.pipeline import calibration_kwargs

    arch, _, hf = family
    a, ckpt, compute = ARCHITECTURES[arch], HFCheckpoint(hf), resolve_compute("cpu", "fp32")
    mcfg = engine_config_from_hf(a, ckpt.config)
    ids = _ids()
    with torch.no_grad():
        hs = load_hf_model(hf, attn="eager")(ids, output_hidden_states=True).hidden_states
    from types import SimpleNamespace

    from lmkiln.quant.pipeline import _embed
    torch.testing.assert_close(_embed(ckpt, a, mcfg, ids, compute, SimpleNamespace(hidden_on_device=False)), hs[0])  # Gemma's scale
    mod = LayerModule(ckpt, a, compute)
    kws = calibration_kwargs(mcfg, ids, compute)
    for i in range(mcfg["num_layer"] - 1):  # the last hidden state has the final norm applied
        layer, _ = mod.load(i)
        with torch.no_grad():
            y = layer(hs[i], **kws[i])
        y = y[0] if isinstance(y, tuple) else y
        torch.testing.assert_close(y, hs[i + 1], rtol=1e-4, atol=1e-4)


def test_onnx_export_or_clear_refusal(family):
    """ONNX where the graph builds the family (parity with the engine runner), else one line naming what it lacks."""
    from lmkiln.errors import InputError
    from lmkiln.export import export_onnx, onnx_unsupported
    from lmkiln.runtime.generate import greedy_generate
    from lmkiln.runtime.onnx_runner import OnnxRunner

    arch, d, hf = family
    eng = convert_hf_to_engine(hf, d / "onnx-src.engine", force=True)
    model = Engine(eng).model
    ids = _ids()  # 12 tokens: longer than the tiny windows (6), so local attention is exercised
    want = EngineModel.from_path(eng)(ids)
    for portable in (False, True):
        out = d / f"onnx-{portable}"
        if onnx_unsupported(model, portable):
            with pytest.raises(InputError, match=f"ONNX export of {arch} is not supported yet: the graph has no "):
                export_onnx(eng, out, portable=portable)
            assert not out.exists()
            continue
        export_onnx(eng, out, portable=portable, force=True)
        torch.testing.assert_close(OnnxRunner(out).forward(ids), want, rtol=1e-4, atol=1e-4)
    if ARCHITECTURES[arch].moe:  # onnxruntime's MoE node: the contrib graph must have been built
        assert (d / "onnx-False" / "model.onnx").is_file()
    if (d / "onnx-False" / "genai_config.json").is_file():  # onnxruntime-genai loads it as written and agrees
        prompt = ids[0].tolist()  # (Mixtral / Qwen3-MoE had model types genai 0.18 refuses)
        assert genai_greedy(d / "onnx-False", prompt, 4) == greedy_generate(OnnxRunner(d / "onnx-False"), [prompt], 4)[0]


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


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_moe_expert_without_tokens_falls_back_to_rtn(method, tmp_path):
    """An expert the router never picks gets no calibration token: the run finishes, the report
    names its round-to-nearest fallback and why, and nothing is NaN (llm-compressor's NaN scales)."""
    from safetensors.torch import load_file, save_file

    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import CalibOptions, quantize_model

    hf = make_tiny_model(tmp_path / "hf", "MixtralForCausalLM", seed=5, num_local_experts=5, intermediate_size=64)
    f = hf / "model.safetensors"
    sd = load_file(str(f))
    g = torch.Generator().manual_seed(0)
    for name in [n for n in sd if n.endswith("block_sparse_moe.gate.weight")]:
        u, v = 0.3 * torch.randn(2, sd[name].shape[1], generator=g)  # moderate logits: no softmax underflow to ties at 0
        # for any token one of +-u and one of +-v scores > 0 = expert 4's logit: expert 4 is never in the top 2
        sd[name] = torch.stack([u, -u, v, -v, torch.zeros_like(u)])
    save_file(sd, str(f), metadata={"format": "pt"})
    o = QuantOptions(bits=4, group_size=32, method=method)
    res = quantize_model(hf, tmp_path / "q.engine", o, CalibOptions(n_samples=4, seqlen=32), to="engine")
    for layer in res.report["layers"]:
        fb = layer["rtn_fallback"]
        assert set(fb) == {"expert_gate.4", "expert_up.4", "expert_down.4"}
        assert all(v["tokens"] == 0 and "expert 4" in v["why"] for v in fb.values())
        assert not any(k.endswith(f".{e}") for k in fb for e in range(4))  # the others were calibrated
        if method == "awq":
            skipped = [gr for gr in layer["groups"] if gr["prev"] == "expert_up.4"]
            assert skipped and "round-to-nearest" in skipped[0]["skipped"]
    model = EngineModel.from_path(res.output)
    eng = Engine(res.output)
    for i in range(2):
        for suffix in ("scales", "qweight"):
            assert torch.isfinite(eng.get(f"layers.{i}.moe.w13.0.{suffix}").float()).all()
    assert torch.isfinite(model(_ids())).all()


def test_gguf_export_or_clear_refusal(family):
    """GGUF where llama.cpp's architectures hold the family (read back through gguf's own
    dequantizer: the engine runner's logits), else one line saying it is not supported yet."""
    pytest.importorskip("gguf")
    from lmkiln.errors import InputError
    from lmkiln.export.gguf import export_gguf
    from lmkiln.runtime.gguf_runner import gguf_model

    arch, d, hf = family
    eng = convert_hf_to_engine(hf, d / "gguf-src.engine", force=True)
    if not ARCHITECTURES[arch].gguf_arch or Engine(eng).model["num_experts"] or arch.startswith("Gemma"):
        with pytest.raises(InputError, match=f"GGUF export of {arch} is not supported yet"):
            export_gguf(eng, d / "m.gguf")
        assert not (d / "m.gguf").exists()
        return
    out = export_gguf(eng, d / "m.gguf", gtype="f32", force=True).path
    # llama.cpp's llama architecture has no sliding window (the export warns): compare within it
    ids = _ids(T=min(12, Engine(eng).model["sliding_window"] or 12))
    torch.testing.assert_close(gguf_model(out)(ids), EngineModel.from_path(eng)(ids), rtol=1e-4, atol=1e-4)


def _cfg(arch, **kw):
    base = dict(architectures=[arch], hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-6, max_position_embeddings=256)
    return {**base, **kw}


def test_gemma3_pre_v5_config():
    """A Gemma 3 config as released (rope_local_base_freq, sliding_window_pattern, rope_scaling) maps
    to the same layer kinds and ropes transformers derives."""
    from lmkiln.convert.hf_config import engine_config_from_hf

    cfg = _cfg("Gemma3ForCausalLM", head_dim=16, sliding_window=512, sliding_window_pattern=3, rope_theta=1e6,
               rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    m = engine_config_from_hf(ARCHITECTURES["Gemma3ForCausalLM"], cfg)
    assert m["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    assert m["rope"] == {"type": "linear", "base": 1e6, "dim": 16, "scaling": {"factor": 8.0}}
    assert m["rope_local"] == {"type": "default", "base": 10000.0, "dim": 16, "scaling": None}
    assert m["embed_scale"] == 8.0 and m["norm_offset"] == 1.0 and m["query_pre_attn_scalar"] == 256.0


@pytest.mark.parametrize("arch, kw, match", [
    ("Phi3ForCausalLM", {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
     "rope type 'longrope' is not supported"),
    ("Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [0]},
     "dense FFN layers among the mixture-of-experts layers"),
    ("MixtralForCausalLM", {"num_local_experts": 2, "num_experts_per_tok": 3}, "3 experts per token of 2"),
    ("Gemma3ForConditionalGeneration", {}, "is not supported"),
])
def test_refusals_name_what_is_missing(arch, kw, match):
    from lmkiln.convert.architectures import get_architecture
    from lmkiln.convert.hf_config import engine_config_from_hf
    from lmkiln.errors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match=match):
        engine_config_from_hf(get_architecture(arch), _cfg(arch, **kw))
