"""`lmkiln export onnx`: parity of onnxruntime (CPU) on the export against the torch
engine runner on the same engine, for fp32 / int4 / int8 engines, the contrib and the
portable graphs, HF sources converted on the fly, Triton layout, onnxruntime-genai."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from helpers import genai_greedy, make_tiny_model
from lmkiln.assets import bundled_model_path
from lmkiln.convert.hf_to_engine import convert_hf_to_engine
from lmkiln.errors import InputError, OutputExistsError
from lmkiln.export import export_onnx
from lmkiln.formats.tokenizer import load_tokenizer
from lmkiln.quant.awq import QuantOptions
from lmkiln.quant.pipeline import quantize_model
from lmkiln.runtime.engine_model import EngineModel
from lmkiln.runtime.generate import greedy_generate
from lmkiln.runtime.onnx_runner import OnnxRunner

FIXTURE = Path(__file__).parent / "fixtures" / "tinystories_eval.txt"
PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben"]
N_TOKENS = 300


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled_model_path())


@pytest.fixture(scope="module")
def text_ids(tok):
    return torch.tensor([tok(FIXTURE.read_text(encoding="utf-8")).input_ids[:N_TOKENS]])


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """stories260K as fp32, int4-g32 and int8-g32 (RTN) engines."""
    d = tmp_path_factory.mktemp("onnx-eng")
    out = {"fp32": convert_hf_to_engine(bundled_model_path(), d / "fp32")}
    for bits in (4, 8):
        quantize_model(bundled_model_path(), d / f"int{bits}", QuantOptions(bits=bits, group_size=32, method="rtn"), to="engine")
        out[f"int{bits}"] = d / f"int{bits}"
    return out


@pytest.fixture(scope="module")
def exports(engines, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx-out")
    out = {}
    for name, eng in engines.items():  # accuracy_level 0: MatMulNBits dequantizes exactly (the CPU default is 4)
        out[name] = export_onnx(eng, d / name, accuracy_level=0)
        out[name + "-portable"] = export_onnx(eng, d / (name + "-portable"), portable=True, accuracy_level=0)
    return out


def _stats(ref: torch.Tensor, got: torch.Tensor) -> dict:
    lr, lg = ref.log_softmax(-1), got.log_softmax(-1)
    return {"max_abs": (ref - got).abs().max().item(),
            "top1": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "kl": (lr.exp() * (lr - lg)).sum(-1).mean().item()}


def _greedy(model, tok, n=40, prompts=PROMPTS):
    return [greedy_generate(model, [tok(p).input_ids], n)[0] for p in prompts]


@pytest.mark.parametrize("kind", ["fp32", "int4", "int8", "fp32-portable", "int4-portable", "int8-portable"])
def test_parity_with_engine_runner(kind, engines, exports, text_ids, tok):
    eng = EngineModel.from_path(engines[kind.split("-")[0]])
    runner = OnnxRunner(exports[kind])
    s = _stats(eng.forward(text_ids), runner.forward(text_ids))
    print(kind, s)
    if kind.startswith("fp32"):
        assert s["max_abs"] <= 1e-3
    assert s["top1"] >= 0.999 and s["kl"] <= 1e-4
    # Decoding token by token through the KV cache reproduces the prefill logits.
    cache = runner.new_cache(1, 40)
    steps = torch.cat([runner.forward(text_ids[:, i:i + 1], None, cache) for i in range(40)], 1)
    assert (steps - runner.forward(text_ids[:, :40])).abs().max().item() <= 1e-4
    prompts = PROMPTS if "portable" not in kind else PROMPTS[:1]  # the graphs share everything else
    assert _greedy(runner, tok, prompts=prompts) == _greedy(eng, tok, prompts=prompts)


def test_model_checks_and_metadata(engines, exports):
    path = exports["int4"] / "model.onnx"
    onnx.checker.check_model(str(path))
    m = onnx.load(str(path))
    meta = {p.key: p.value for p in m.metadata_props}
    src = json.loads(meta["lmkiln.source_manifest"])
    manifest = json.loads((engines["int4"] / "manifest.json").read_text())
    assert src["quantization"] == manifest["quantization"] and src["files"] == manifest["files"]
    ops = {(n.domain, n.op_type) for n in m.graph.node}
    assert ("com.microsoft", "MatMulNBits") in ops and ("com.microsoft", "GroupQueryAttention") in ops
    assert ("com.microsoft", "SkipSimplifiedLayerNormalization") in ops
    names = [i.name for i in m.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert [o.name for o in m.graph.output][:2] == ["logits", "present.0.key"]
    portable = onnx.load(str(exports["int4-portable"] / "model.onnx"))
    assert {n.domain for n in portable.graph.node} <= {"", "ai.onnx"}
    assert {o.domain: o.version for o in portable.opset_import} == {"": 21}
    assert "DequantizeLinear" in {n.op_type for n in portable.graph.node}
    cfg = json.loads((exports["fp32"] / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 4 and cfg["model"]["vocab_size"] == 512
    # GQA writes into genai's preallocated cache; the portable graph concatenates past and new.
    assert cfg["search"]["past_present_share_buffer"] is True
    assert json.loads((exports["fp32-portable"] / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False
    # The fused w13 runs as two MatMulNBits (gate, up), RTN's asymmetric zero points kept.
    nbits = {n.input[1].rsplit(".", 1)[0]: n for n in m.graph.node if n.op_type == "MatMulNBits"}
    assert {"layers.0.feed_forward.w1", "layers.0.feed_forward.w3"} <= set(nbits)
    assert len(nbits["layers.0.feed_forward.w1"].input) == 4
    assert meta["lmkiln.accuracy_level"] == "0" and meta["lmkiln.head_bits"] == "0"
    assert (exports["fp32"] / "tokenizer.json").is_file()


@pytest.mark.parametrize("kind", ["int4", "int4-portable"])
def test_onnxruntime_fuses_rmsnorm(kind, exports, tmp_path):
    """The standard-op RMSNorm (the first norm; every norm of the portable graph) squares with
    Pow(x, 2), the pattern onnxruntime's SimplifiedLayerNormFusion turns into one node."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(exports[kind] / "model.onnx"), so, providers=["CPUExecutionProvider"])
    n_norms = [n.op_type for n in onnx.load(str(exports[kind] / "model.onnx")).graph.node].count("ReduceMean")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("SimplifiedLayerNormalization") == n_norms >= 1 and "ReduceMean" not in ops


def test_portable_left_padded_batch(engines, exports, tok):
    """The portable graph takes positions from the mask, so left-padded batches work."""
    prompts = [tok(p).input_ids for p in ["Once upon a time there was a big red ball", *PROMPTS]]
    assert len({len(p) for p in prompts}) > 1
    eng = EngineModel.from_path(engines["fp32"])
    assert greedy_generate(OnnxRunner(exports["fp32-portable"]), prompts, 20) == greedy_generate(eng, prompts, 20)
    with pytest.raises(InputError, match="--portable"):
        greedy_generate(OnnxRunner(exports["fp32"]), prompts, 5)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_hf_source_families(arch, tmp_path):
    """HF sources are converted on the fly. Llama's head_dim 16 runs rotary inside GQA,
    Qwen3 (head_dim 24, q/k norm) rotates with standard ops before GQA; Qwen2 has qkv bias."""
    hf = make_tiny_model(tmp_path / "hf", arch, seed=1)
    eng = EngineModel.from_path(convert_hf_to_engine(hf, tmp_path / "eng"))
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    ref = eng.forward(ids)
    for portable in (False, True):
        out = export_onnx(hf, tmp_path / f"onnx-{portable}", portable=portable)
        runner = OnnxRunner(out)
        assert _stats(ref, runner.forward(ids))["max_abs"] <= 1e-3
        assert greedy_generate(runner, [[1, 5, 9]], 20) == greedy_generate(eng, [[1, 5, 9]], 20)


def test_awq_gemm_source(tmp_path, engines):
    """An AWQ-GEMM checkpoint (lmkiln quantize --to hf) exports through the same path."""
    awq = tmp_path / "awq"
    quantize_model(bundled_model_path(), awq, QuantOptions(bits=4, group_size=64, method="rtn"), to="hf")
    out = export_onnx(awq, tmp_path / "onnx", accuracy_level=0)
    eng = EngineModel.from_path(convert_hf_to_engine(awq, tmp_path / "eng"))
    ids = torch.randint(3, 512, (1, 100), generator=torch.Generator().manual_seed(0))
    s = _stats(eng.forward(ids), OnnxRunner(out).forward(ids))
    assert s["top1"] >= 0.999 and s["kl"] <= 1e-4


def test_triton_layout(engines, tmp_path):
    out = export_onnx(engines["int4"], tmp_path / "my model", triton=True)
    repo = out / "model_repository" / "my_model"
    assert (repo / "1" / "model.onnx").is_file()
    cfg = (repo / "config.pbtxt").read_text()
    assert 'name: "my_model"' in cfg and 'backend: "onnxruntime"' in cfg and "max_batch_size: 0" in cfg
    assert 'name: "input_ids"\n    data_type: TYPE_INT64\n    dims: [ -1, -1 ]' in cfg
    assert 'name: "logits"\n    data_type: TYPE_FP32\n    dims: [ -1, -1, 512 ]' in cfg
    assert 'name: "present.4.value"\n    data_type: TYPE_FP32\n    dims: [ -1, 4, -1, 8 ]' in cfg
    assert "kind: KIND_CPU" in cfg
    onnx.checker.check_model(str(repo / "1" / "model.onnx"))


def test_external_data(engines, tmp_path, monkeypatch):
    """Above the threshold weights go to model.onnx.data; the path-based checker and
    onnxruntime read them, and the Triton copy carries the data file."""
    import lmkiln.export as ex

    monkeypatch.setattr(ex, "EXTERNAL_THRESHOLD", 0)
    out = export_onnx(engines["fp32"], tmp_path / "ext", triton=True)
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    assert (out / "model_repository" / "ext" / "1" / "model.onnx.data").is_file()
    onnx.checker.check_model(str(out / "model.onnx"))
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    ref = EngineModel.from_path(engines["fp32"]).forward(ids)
    assert (OnnxRunner(out).forward(ids) - ref).abs().max().item() <= 1e-3


def test_bad_input(engines, tmp_path):
    with pytest.raises(InputError, match="--ep"):
        export_onnx(engines["fp32"], tmp_path / "x", ep="tpu")
    with pytest.raises(InputError):
        export_onnx(tmp_path / "missing", tmp_path / "y")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        export_onnx(engines["fp32"], tmp_path / "exists")
    assert not list(tmp_path.glob(".*lmkiln-tmp*"))


def test_onnxruntime_genai_loads_and_generates(exports, tok):
    og = pytest.importorskip("onnxruntime_genai")
    for kind in ("fp32", "int4", "int4-portable"):  # shared KV buffer (contrib) and concatenated (portable)
        ids = tok(PROMPTS[0]).input_ids
        new = genai_greedy(exports[kind], ids, 20)
        assert new == greedy_generate(OnnxRunner(exports[kind]), [ids], 20)[0][: len(new)]
        assert len(new) == 20
        assert og.Tokenizer(og.Model(str(exports[kind]))).decode(np.array(new, dtype=np.int32))


def test_cuda_export(engines, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDAExecutionProvider")
    out = export_onnx(engines["int4"], tmp_path / "cuda", ep="cuda")
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    ids = torch.randint(3, 512, (1, 100), generator=torch.Generator().manual_seed(0))
    s = _stats(EngineModel.from_path(engines["int4"]).forward(ids), OnnxRunner(out, provider="cuda").forward(ids))
    assert s["top1"] >= 0.99


@pytest.mark.parametrize("portable", [False, True])
def test_cuda_flavour_graph_runs_on_cpu(engines, tmp_path, portable):
    """--ep cuda only changes dtypes (fp16 activations, fp weights and KV cache; logits
    stay float32); onnxruntime's CPU kernels run that graph too, so it is checked here."""
    out = export_onnx(engines["int4"], tmp_path / "cuda", ep="cuda", portable=portable)
    m = onnx.load(str(out / "model.onnx"))
    assert m.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ids = torch.randint(3, 512, (1, 100), generator=torch.Generator().manual_seed(0))
    s = _stats(EngineModel.from_path(engines["int4"]).forward(ids), OnnxRunner(out).forward(ids))
    assert s["top1"] >= 0.98 and s["max_abs"] < 0.2


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_without_zero_points(bits, tmp_path, text_ids, monkeypatch):
    """Symmetric weights (every zero = 2^(bits-1)) go without MatMulNBits' zero_points input,
    whose default is that zero: the same logits as the graph that carries them. int8 at level 4:
    at level 0 an int8 engine's linears go dequantized, without MatMulNBits (see below); level 4's
    int8 activations cost more than 1e-4 KL against the engine, so that bound is level 0's."""
    import lmkiln.export.onnx_graph as og_mod

    eng = quantize_model(bundled_model_path(), tmp_path / "sym", QuantOptions(bits=bits, group_size=32, method="rtn",
                                                                            symmetric=True), to="engine").output
    level = 0 if bits == 4 else 4
    lean = export_onnx(eng, tmp_path / "lean", accuracy_level=level, head_bits=0)
    monkeypatch.setattr(og_mod, "DROP_DEFAULT_ZERO_POINTS", False)
    full = export_onnx(eng, tmp_path / "full", accuracy_level=level, head_bits=0)
    names = lambda d: {t.name for t in onnx.load(str(d / "model.onnx")).graph.initializer}  # noqa: E731
    assert not any(n.endswith(".zero_points") for n in names(lean))
    assert any(n.endswith(".zero_points") for n in names(full))
    a, b = OnnxRunner(lean).forward(text_ids), OnnxRunner(full).forward(text_ids)
    assert (a - b).abs().max().item() <= 1e-5
    s = _stats(EngineModel.from_path(eng).forward(text_ids), a)
    print(bits, level, s)
    assert s["top1"] >= (0.999 if level == 0 else 0.98) and s["kl"] <= (1e-4 if level == 0 else 1e-3)


def test_default_accuracy_level(engines, exports, tmp_path, text_ids):
    """No accuracy_level: 4 (int8 activations) on CPU, and with it (no head_bits) an int8 output
    head for a quantized engine; both recorded in the metadata and the export info; close to the
    exact level-0 graph with its fp head (measured cost: docs/export-onnx.md)."""
    out = export_onnx(engines["int4"], tmp_path / "default")
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props}
    assert meta["lmkiln.accuracy_level"] == "4" and meta["lmkiln.head_bits"] == "8"
    info = json.loads((out / "lmkiln_export.json").read_text())
    assert (info["accuracy_level"], info["head_bits"]) == (4, 8)
    attrs = {a.name: a.i for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
             for a in n.attribute if a.name == "accuracy_level"}
    assert attrs == {"accuracy_level": 4}
    s = _stats(OnnxRunner(exports["int4"]).forward(text_ids), OnnxRunner(out).forward(text_ids))
    print("acc4 vs acc0", s)
    assert s["top1"] >= 0.95 and s["kl"] <= 2e-3
    cuda = export_onnx(engines["int4"], tmp_path / "cuda", ep="cuda")
    assert json.loads((cuda / "lmkiln_export.json").read_text())["accuracy_level"] == 0


@pytest.mark.parametrize("case, kw, want", [
    ("int4 cpu", {}, 8), ("int4 cpu level 0", {"accuracy_level": 0}, 0), ("int4 cuda", {"ep": "cuda"}, 0),
    ("int4 cpu portable", {"portable": True}, 0), ("fp32 cpu", {}, 0), ("int4 cpu, asked fp", {"head_bits": 0}, 0),
])
def test_default_head_bits(engines, tmp_path, case, kw, want):
    """The head is int8 by default only where the graph already runs on int8 activations (a quantized
    engine on CPU at level 4, MatMulNBits); exact exports, CUDA, portable and fp engines keep it fp."""
    out = export_onnx(engines["fp32" if case.startswith("fp32") else "int4"], tmp_path / "x", **kw)
    assert json.loads((out / "lmkiln_export.json").read_text())["head_bits"] == want
    heads = [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits" and n.input[1] == "output.qweight"]
    assert len(heads) == (want == 8)


@pytest.mark.parametrize("source", ["int4 tied", "fp32 untied"])
def test_quantized_head(source, engines, tmp_path):
    """head_bits=4: the output head (tied: the embedding table, still gathered in fp) as
    symmetric int4 blocks of 32; MatMulNBits and the portable DequantizeLinear agree."""
    if source == "int4 tied":
        eng = engines["int4"]
    else:
        eng = convert_hf_to_engine(make_tiny_model(tmp_path / "hf", seed=2), tmp_path / "eng")
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    outs = {p: export_onnx(eng, tmp_path / f"h4-{p}", portable=p, accuracy_level=0, head_bits=4) for p in (False, True)}
    m = onnx.load(str(outs[False] / "model.onnx"))
    head = [n for n in m.graph.node if n.op_type == "MatMulNBits" and n.input[1] == "output.qweight"]
    assert len(head) == 1 and len(head[0].input) == 3  # symmetric: no zero points
    assert {p.key: p.value for p in m.metadata_props}["lmkiln.head_bits"] == "4"
    a, b = OnnxRunner(outs[False]).forward(ids), OnnxRunner(outs[True]).forward(ids)
    assert (a - b).abs().max().item() <= 1e-3
    s = _stats(EngineModel.from_path(eng).forward(ids), a)
    print(source, "int4 head vs engine", s)
    assert s["top1"] >= 0.7 and 0 < s["kl"] <= 0.2
    with pytest.raises(InputError, match="head_bits"):
        export_onnx(eng, tmp_path / "bad", head_bits=3)


def test_int4_head_grid_search():
    """quantize_symmetric, the quantized head's quantizer: each block's scale is the least-error
    of 20 range shrinks (data-free), not absmax / 7 as the builder's RTN: on heavy-tailed weights
    (Student t, 3 degrees of freedom) the reconstruction error drops, with codes in [0, 15] around
    the fixed zero 8 and fp16 scales as before; steps=1 is absmax RTN."""
    from lmkiln.export.weights import quantize_symmetric

    rng = np.random.default_rng(7)
    w = (rng.standard_t(3, size=(96, 40)) * 0.02).astype(np.float32)  # (in, out): 96 rows = 3 blocks of 32
    deq = lambda lw: ((lw.codes.astype(np.float32).reshape(3, 32, 40) - 8)  # noqa: E731
                      * lw.scales.astype(np.float32)[:, None, :]).reshape(96, 40)
    searched, plain = quantize_symmetric(w, 4, 32), quantize_symmetric(w, 4, 32, steps=1)
    assert (plain.scales == (np.abs(w.reshape(3, 32, 40)).max(1) / 7).astype(np.float16)).all()
    for lw in (searched, plain):
        assert lw.codes.max() <= 15 and (lw.zeros == 8).all() and lw.scales.dtype == np.float16
    assert ((deq(searched) - w) ** 2).sum() < 0.97 * ((deq(plain) - w) ** 2).sum()
    assert (searched.scales <= plain.scales).all() and (searched.scales < plain.scales).any()


def test_cli_head_bits(engines, tmp_path):
    """`lmkiln export onnx --head-bits 8`: the API's head_bits from the command line; a width
    other than 0/4/8 is one line and exit 2, before anything is written."""
    from typer.testing import CliRunner

    from lmkiln.cli import app

    env = {"COLUMNS": "200", "NO_COLOR": "1"}
    out = tmp_path / "h8"
    r = CliRunner().invoke(app, ["export", "onnx", str(engines["int4"]), "-o", str(out), "--head-bits", "8"], env=env)
    assert r.exit_code == 0, r.output
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {p.key: p.value for p in m.metadata_props}["lmkiln.head_bits"] == "8"
    assert json.loads((out / "lmkiln_export.json").read_text())["head_bits"] == 8
    head = [n for n in m.graph.node if n.op_type == "MatMulNBits" and n.input[1] == "output.qweight"]
    assert len(head) == 1 and {a.name: a.i for a in head[0].attribute}["bits"] == 8
    r = CliRunner().invoke(app, ["export", "onnx", str(engines["int4"]), "-o", str(tmp_path / "h3"), "--head-bits", "3"], env=env)
    assert r.exit_code == 2, r.output
    assert "--head-bits 3: choose 0 (fp head), 4 or 8" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "h3").exists()


def test_int8_engine_at_level_0_runs_dequantized(engines, exports, tmp_path):
    """onnxruntime (1.32) has no 8-bit MatMulNBits CPU kernel at accuracy level 0: it dequantizes the
    whole weight on every call (an int8 engine decoded at 0.6 tok/s vs 26 at level 4, docs/BENCHMARKS.md).
    An int8 engine exported at level 0 for CPU gets its linears as float32 weights instead (the same
    exact product: parity is test_parity_with_engine_runner's "int8"), each listed with why in
    lmkiln_export.json and reported by the CLI; at level 4 they stay 8-bit MatMulNBits, and int4
    linears stay MatMulNBits at either level. The portable graph's exactness: test_parity's "int8-portable"."""
    from typer.testing import CliRunner

    from lmkiln.cli import app

    m = onnx.load(str(exports["int8"] / "model.onnx"), load_external_data=False)
    assert not [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    linears = [n.input[1].removesuffix(".weight") for n in m.graph.node
               if n.op_type == "MatMul" and n.input[1].startswith("layers.")]
    listed = json.loads((exports["int8"] / "lmkiln_export.json").read_text())["dequantized_linears"]
    assert linears and sorted(d.split(" ")[0] for d in listed) == sorted(linears)
    assert all(d.endswith("(int8 at accuracy level 0: onnxruntime has no CPU kernel)") for d in listed)
    assert json.loads((exports["int4"] / "lmkiln_export.json").read_text())["dequantized_linears"] == []

    env = {"COLUMNS": "200", "NO_COLOR": "1"}
    r = CliRunner().invoke(app, ["export", "onnx", str(engines["int8"]), "-o", str(tmp_path / "l0"), "--accuracy-level", "0"], env=env)
    assert r.exit_code == 0, r.output
    assert f"note {len(linears)} quantized linear(s) exported as float weights" in r.output
    r = CliRunner().invoke(app, ["export", "onnx", str(engines["int8"]), "-o", str(tmp_path / "l4")], env=env)
    assert r.exit_code == 0 and "note" not in r.output, r.output
    nbits = [{a.name: a.i for a in n.attribute} for n in onnx.load(str(tmp_path / "l4" / "model.onnx")).graph.node
             if n.op_type == "MatMulNBits" and n.input[1].startswith("layers.")]
    assert len(nbits) == len(linears) and all(a["bits"] == 8 and a["accuracy_level"] == 4 for a in nbits)
    # The portable graph's DequantizeLinear + MatMul pairs: onnxruntime would fuse them into the same 8-bit
    # level-0 MatMulNBits, so OnnxRunner turns QDQ fusions off for an int8 portable export at level 0 (the
    # int8 weights fold to float32 at load); an int4 one keeps the fusion at its recorded level.
    opts = lambda kind: OnnxRunner(exports[kind]).session.get_session_options()  # noqa: E731
    assert opts("int8-portable").get_session_config_entry("session.disable_quant_qdq") == "1"
    assert opts("int4-portable").get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"


def test_bad_accuracy_level_and_damaged_exports(engines, exports, tmp_path):
    """An accuracy level onnxruntime would refuse only at load time is refused at export, before
    anything is written; a truncated model.onnx, or one onnxruntime cannot load, is one line naming
    the file (InputError: exit 2), not an internal error after the reference model has run."""
    for level in (7, -1):
        with pytest.raises(InputError, match=f"--accuracy-level {level}: choose one of 0, 1, 2, 3, 4"):
            export_onnx(engines["int4"], tmp_path / f"l{level}", accuracy_level=level)
        assert not (tmp_path / f"l{level}").exists()
    cut = tmp_path / "cut"
    shutil.copytree(exports["int4"], cut)
    (cut / "model.onnx").write_bytes((exports["int4"] / "model.onnx").read_bytes()[:3000])
    with pytest.raises(InputError, match=r"model.onnx: not a readable ONNX model .*re-export it"):
        OnnxRunner(cut)
    bad = tmp_path / "bad"
    shutil.copytree(exports["int4"], bad)
    m = onnx.load(str(bad / "model.onnx"))
    del m.graph.node[0]  # a node whose output others read: the graph no longer holds together
    onnx.save(m, str(bad / "model.onnx"))
    with pytest.raises(InputError, match=r"model.onnx: onnxruntime cannot load it \(\w+: .*re-export it") as e:
        OnnxRunner(bad)
    from lmkiln.runtime.session import generate_text

    with pytest.raises(InputError, match=r"an ONNX export; this takes an engine or a Hugging Face directory"):
        generate_text(exports["int4"], ["Once"], 2)  # was "no config.json here; is this a Hugging Face model directory?"
    assert "\n" not in str(e.value)


def _as_foreign(src: Path, dst: Path) -> Path:
    """An export as another exporter (onnxruntime-genai's builder) writes one: no lmkiln
    metadata or lmkiln_export.json, the cache's head count and width symbolic in the graph
    and given only by genai_config.json."""
    shutil.copytree(src, dst)
    (dst / "lmkiln_export.json").unlink()
    m = onnx.load(str(dst / "model.onnx"))
    del m.metadata_props[:]
    for v in list(m.graph.input) + list(m.graph.output):
        if v.name.startswith(("past_key_values.", "present.")):
            dims = v.type.tensor_type.shape.dim
            dims[1].dim_param, dims[3].dim_param = "kv_heads", "kv_cache_dim"
    onnx.save(m, str(dst / "model.onnx"))
    return dst


def test_another_exporters_onnx(exports, text_ids, tmp_path):
    """verify and generate run another exporter's ONNX folder (the builder's, say) from its
    genai_config.json: the same logits as with lmkiln's metadata, int4 thresholds from its
    MatMulNBits; a graph that loads and then fails to run is one line naming the file."""
    from lmkiln.verify.runners import weight_type

    foreign = _as_foreign(exports["int4"], tmp_path / "foreign")
    assert weight_type(foreign) == "int4" and weight_type(exports["fp32"]) == "fp32"
    ours, theirs = OnnxRunner(exports["int4"]), OnnxRunner(foreign)
    assert theirs.vocab_size == ours.vocab_size and theirs.eos_token_ids == ours.eos_token_ids
    assert torch.equal(theirs.forward(text_ids[:, :64]), ours.forward(text_ids[:, :64]))
    cfg = json.loads((foreign / "genai_config.json").read_text())
    cfg["model"]["decoder"]["head_size"] //= 2  # a cache narrower than the graph's attention: fails at run time
    (foreign / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"model.onnx: onnxruntime cannot run it \(\w+: ") as e:
        OnnxRunner(foreign).forward(text_ids[:, :8])
    assert "\n" not in str(e.value)
    (foreign / "genai_config.json").unlink()
    with pytest.raises(InputError, match=r"symbolic shape .* no genai_config.json .*num_key_value_heads and head_size"):
        OnnxRunner(foreign)


def test_verify_refuses_a_dtype_an_onnx_candidate_would_ignore(exports):
    """--dtype picks the torch engine runner's compute dtype; an ONNX export runs in the dtype
    it was exported in, so `verify ... --dtype bf16` passed while ignoring it. One line now."""
    from typer.testing import CliRunner

    from lmkiln.cli import app

    r = CliRunner().invoke(app, ["verify", str(bundled_model_path()), str(exports["int4"]), "--dtype", "bf16"],
                           env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 2 and r.stderr.strip() == ("error: --dtype bf16: this candidate runs in the dtype it was exported in "
                                                     "(an ONNX export); leave --dtype auto"), r.output


def test_int8_head_close_to_fp_head(tmp_path):
    """head_bits=8: the output head as a symmetric int8 MatMulNBits in blocks of 128 (hidden 256 here:
    two blocks), run at accuracy_level 4 even in a level-0 export (onnxruntime has no 8-bit CPU kernel
    at level 0: it would dequantize the head on every call). Its logits stay close to the same
    export's fp head: int8 weights (RTN, absmax / 127 per block) and int8 activations per block of
    128 each put ~0.5-1 % relative error on the logits, so the bound is 3 % of the logits' spread,
    top-1 >= 95 % (this random tiny model has near ties) and KL <= 1e-3; and at least 10x less KL than
    the int4 head (blocks of 32)."""
    hf = make_tiny_model(tmp_path / "hf", seed=3, hidden_size=256, intermediate_size=384)
    eng = convert_hf_to_engine(hf, tmp_path / "eng")
    ids = torch.randint(3, 512, (1, 96), generator=torch.Generator().manual_seed(1))
    for acc in (0, 4):
        ref = OnnxRunner(export_onnx(eng, tmp_path / f"h0-{acc}", accuracy_level=acc)).forward(ids)
        got = {}
        for bits in (8, 4):
            out = export_onnx(eng, tmp_path / f"h{bits}-{acc}", accuracy_level=acc, head_bits=bits)
            m = onnx.load(str(out / "model.onnx"))
            head = [n for n in m.graph.node if n.op_type == "MatMulNBits" and n.input[1] == "output.qweight"]
            assert len(head) == 1 and len(head[0].input) == 3  # symmetric: no zero points
            attrs = {a.name: a.i for a in head[0].attribute}
            assert (attrs["bits"], attrs["block_size"]) == (bits, 128 if bits == 8 else 32)
            assert attrs["accuracy_level"] == (4 if bits == 8 else acc)
            got[bits] = OnnxRunner(out).forward(ids)
        s8, s4 = _stats(ref, got[8]), _stats(ref, got[4])
        rel = ((got[8] - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm()).item()
        print(f"acc {acc}: int8 head vs fp head {s8} rel {rel:.4f}; int4 head {s4}")
        assert rel <= 0.03 and s8["top1"] >= 0.95 and s8["kl"] <= 1e-3
        assert s8["kl"] * 10 <= s4["kl"]


def test_inspect_describes_an_onnx_export(exports):
    """`lmkiln inspect` on an export said "no config.json here; is this a Hugging Face model directory?"."""
    from lmkiln.inspect_model import describe

    kind, rows = describe(exports["int4"])
    rows = dict(rows)
    meta = json.loads((exports["int4"] / "lmkiln_export.json").read_text())
    assert kind == "onnx" and rows["exported by"] == f"lmkiln {meta['lmkiln_version']}"
    assert rows["weight type"] == meta["weight_type"] == "int4" and rows["output head"].startswith(("fp", "int"))
    assert rows["onnxruntime-genai"].startswith("type llama, ") and "model.onnx (" in rows["files"]


def test_rope_caches_count_toward_the_external_data_threshold(engines, tmp_path, monkeypatch):
    """The 2 GB protobuf decision counted only the weights: a small model with a long context (cos/sin
    caches of 1 GiB each at 4M positions) failed to serialize (exit 3). The threshold here sits just
    above the weights, below weights + caches."""
    import lmkiln.export as ex
    from lmkiln.formats.engine import Engine

    files = sum(f["size"] for f in Engine(engines["fp32"]).manifest["files"].values())
    monkeypatch.setattr(ex, "EXTERNAL_THRESHOLD", files + 1)
    out = export_onnx(engines["fp32"], tmp_path / "x")
    assert (out / "model.onnx.data").is_file()
