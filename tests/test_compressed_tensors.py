"""compressed-tensors output (`--to compressed-tensors`, `convert to-compressed-tensors`):
the format's own library decompresses every linear to exactly lmkiln's dequantized
weights, transformers loads the directory with its compressed-tensors support on the
CPU, and the conversion from AWQ-GEMM gives the same bytes as quantizing straight to it."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from helpers import make_tiny_model
from lmkiln.assets import bundled_model_path
from lmkiln.cli import app
from lmkiln.errors import InputError
from lmkiln.formats.awq_gemm import awq_spec, read_qlinear
from lmkiln.formats.hf import HFCheckpoint
from lmkiln.quant.awq import QuantOptions
from lmkiln.quant.pipeline import REPORT, CalibOptions, quantize_model
from lmkiln.quant.reformat import awq_to_compressed_tensors
from lmkiln.runtime.engine_model import EngineModel
from quant_fixtures import build_hf

STORIES = bundled_model_path()
CALIB = CalibOptions(n_samples=4, seqlen=64)
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {"stories": STORIES, "qwen3": build_hf("qwen3", tmp_path_factory.mktemp("ct") / "qwen3")}


def decompressed(d: Path) -> dict[str, torch.Tensor]:
    """Every quantized linear's weight as compressed-tensors' own decompressor gives it."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((d / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    out = {}
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        modules = sorted({k.rsplit(".", 1)[0] for k in f.keys() if k.endswith(".weight_packed")})
        for m in modules:
            local = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[0] == m}
            out[m] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    return out


def twin_weights(awq_dir: Path) -> dict[str, torch.Tensor]:
    """lmkiln's own dequantized weights of the AWQ-GEMM twin (same run, same codes), in fp16."""
    ckpt = HFCheckpoint(awq_dir)
    spec = awq_spec(ckpt.config)
    out = {}
    for name in ckpt.keys():
        if name.endswith(".qweight"):
            m = name[: -len(".qweight")]
            rows, words = ckpt.shape(name)
            scales = ckpt.shape(f"{m}.scales")
            qt = read_qlinear(ckpt.get, m, spec, scales[1], rows)
            out[m] = qt.dequantize().half()  # (q - z) · s of an fp16 s: exact in fp16
    return out


@pytest.mark.parametrize("model,bits,group,method,sym", [
    ("stories", 4, 32, "awq", False),
    ("stories", 4, 64, "rtn", True),
    ("stories", 8, 32, "awq", False),
    ("qwen3", 4, 16, "awq", False),
    ("qwen3", 4, -1, "rtn", True),
])
def test_library_decompresses_lmkiln_weights_bit_for_bit(models, model, bits, group, method, sym, tmp_path):
    opts = QuantOptions(bits=bits, group_size=group, method=method, symmetric=sym)
    ct = quantize_model(models[model], tmp_path / "ct", opts, CALIB, to="compressed-tensors").output
    cfg = json.loads((ct / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["ignore"] == ["lm_head"] and q["quantization_status"] == "compressed"
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["strategy"]) == (bits, sym, "channel" if group == -1 else "group")
    if group == -1:  # AWQ-GEMM cannot hold this FFN width (100) per channel: lmkiln's reader of the same bytes
        from lmkiln.formats.compressed_tensors import read_linear

        got = decompressed(ct)
        with safe_open(str(ct / "model.safetensors"), framework="pt") as f:
            for m, w in got.items():
                assert torch.equal(w, read_linear(f.get_tensor, m, bits, group, sym).dequantize().half()), m
    elif bits == 4:  # AWQ-GEMM has no 8-bit layout others read; lmkiln's own is compared through the engine below
        twin = quantize_model(models[model], tmp_path / "awq", opts, CALIB, to="hf").output
        want = twin_weights(twin)
        got = decompressed(ct)
        assert set(got) == set(want)
        for m in want:
            assert got[m].dtype == torch.float16 and torch.equal(got[m], want[m]), m
        # and the conversion from AWQ-GEMM writes the same tensors
        conv = awq_to_compressed_tensors(twin, tmp_path / "conv")
        assert sha(conv / "model.safetensors") == sha(ct / "model.safetensors")
        assert json.loads((conv / "config.json").read_text()) == cfg
        assert json.loads((conv / REPORT).read_text())["converted"]["from_format"] == "awq-gemm"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def transformers_model(ct: Path):
    """The directory loaded by transformers' compressed-tensors support (decompressing on
    load, CPU), after checking every weight it holds against lmkiln's: quantized linears
    equal lmkiln's dequantized weights rounded to fp16 (the library decompresses into the
    scale dtype; (q - z)·s needs up to 15 mantissa bits), everything else equal."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from lmkiln.formats.compressed_tensors import read_linear, spec_of

    model = AutoModelForCausalLM.from_pretrained(str(ct), local_files_only=True, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    bits, group, sym = spec_of(json.loads((ct / "config.json").read_text()))
    sd = model.state_dict()
    with safe_open(str(ct / "model.safetensors"), framework="pt") as f:
        modules = {k.rsplit(".", 1)[0] for k in f.keys() if k.endswith(".weight_packed")}
        for m in modules:
            want = read_linear(f.get_tensor, m, bits, group, sym).dequantize().half().float()
            assert torch.equal(sd[f"{m}.weight"].float(), want), m
        for k in f.keys():
            if k.rsplit(".", 1)[0] not in modules:
                assert torch.equal(sd[k], f.get_tensor(k).float()), k
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_loads_it_on_cpu(bits, tmp_path):
    """transformers' own loader against lmkiln's engine on the same codes (int8 has no
    public AWQ-GEMM twin; this is where it meets an outside reader)."""
    opts = QuantOptions(bits=bits, group_size=32)
    ct = quantize_model(STORIES, tmp_path / "ct", opts, CALIB, to="compressed-tensors").output
    eng = quantize_model(STORIES, tmp_path / "eng", opts, CALIB, to="engine").output
    model = transformers_model(ct)
    ids = torch.randint(3, 500, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = EngineModel.from_path(eng, check=True)(ids)
        got = model(ids).logits.float()
    # the engine computes with the exact fp32 dequantized weights, transformers with their fp16 roundings
    assert (got - want).abs().max() <= 1e-2, float((got - want).abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_cli_and_errors(tmp_path, monkeypatch):
    out = tmp_path / "ct"
    r = CliRunner().invoke(app, ["quantize", str(STORIES), "--w4a16", "--group-size", "32", "--method", "rtn",
                                 "--format", "compressed-tensors", "-o", str(out)], env=ENV)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    awq = quantize_model(STORIES, tmp_path / "awq", QuantOptions(bits=4, group_size=32, method="rtn"), CALIB).output
    r = CliRunner().invoke(app, ["convert", "to-compressed-tensors", str(awq), "-o", str(tmp_path / "conv")], env=ENV)
    assert r.exit_code == 0, r.output
    assert sha(tmp_path / "conv" / "model.safetensors") == sha(out / "model.safetensors")
    r = CliRunner().invoke(app, ["convert", "to-compressed-tensors", str(awq), "-o", str(tmp_path / "conv")], env=ENV)
    assert r.exit_code == 2 and "--force" in r.output  # never overwrites without it
    # lmkiln's own compressed-tensors output given back as an input: read (inspect, generate, verify), with the
    # same text as the AWQ-GEMM twin
    r = CliRunner().invoke(app, ["inspect", str(out)], env=ENV)
    assert r.exit_code == 0 and "format=pack-quantized, bits=4, group_size=32" in r.output, r.output
    texts = [CliRunner().invoke(app, ["generate", str(d), "-p", "Once upon a time", "-n", "8"], env=ENV) for d in (out, awq)]
    assert [t.exit_code for t in texts] == [0, 0] and texts[0].output == texts[1].output, texts[0].output
    with pytest.raises(InputError, match="not an AWQ-GEMM checkpoint"):
        awq_to_compressed_tensors(STORIES, tmp_path / "x")
    with pytest.raises(InputError, match="already compressed-tensors"):  # (it was converted, its report saying awq-gemm)
        awq_to_compressed_tensors(out, tmp_path / "x")
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # as if the extra were missing
    r = CliRunner().invoke(app, ["quantize", str(STORIES), "--w4a16", "--group-size", "32", "--to", "compressed-tensors",
                                 "-o", str(tmp_path / "none")], env=ENV)
    assert r.exit_code == 2 and "pip install 'lmkiln[compressed-tensors]'" in r.output
    assert not (tmp_path / "none").exists()
    r = CliRunner().invoke(app, ["convert", "hf-to-engine", str(out), "-o", str(tmp_path / "none")], env=ENV)
    assert r.exit_code == 2 and "pip install 'lmkiln[compressed-tensors]'" in r.output
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("arch,tp,bits,group,sym", [
    ("stories", 1, 4, 32, False), ("stories", 2, 4, 32, True), ("stories", 1, 8, 32, False), ("stories", 1, 4, -1, False),
    ("Qwen3MoeForCausalLM", 1, 4, 32, False),
])
def test_reads_back_as_the_engine_its_awq_twin_makes(arch, tp, bits, group, sym, tmp_path):
    """convert hf-to-engine of a compressed-tensors output writes the very weight files that converting
    the AWQ-GEMM output of the same run writes (per channel, which AWQ-GEMM cannot hold at stories260K's
    FFN width of 172: the engine quantized straight): the codes travel bit-exactly."""
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.formats.engine import Engine

    src = STORIES if arch == "stories" else make_tiny_model(tmp_path / "hf", arch)
    opts = QuantOptions(bits=bits, group_size=group, symmetric=sym, method="rtn")
    ct_dir = quantize_model(src, tmp_path / "ct", opts, to="compressed-tensors").output
    if group == -1:
        engines = [convert_hf_to_engine(ct_dir, tmp_path / "e-ct"), quantize_model(src, tmp_path / "e", opts, to="engine").output]
    else:
        engines = [convert_hf_to_engine(d, tmp_path / f"e-{d.name}", tp=tp)
                   for d in (ct_dir, quantize_model(src, tmp_path / "awq", opts, to="hf").output)]
    files = sorted(p.name for p in engines[0].glob("*.safetensors"))
    assert files == sorted(p.name for p in engines[1].glob("*.safetensors")) and len(files) == 1 + tp
    for f in files:
        assert sha(engines[0] / f) == sha(engines[1] / f), f
    quant = [Engine(e).manifest["quantization"] for e in engines]
    # the layout each read: the AWQ-GEMM twin, or none for the engine quantized straight (per channel)
    assert quant[0]["source_layout"] == "compressed-tensors" and quant[1]["source_layout"] == (None if group == -1 else "awq-gemm")
    assert {**quant[0], "source_layout": None} == {**quant[1], "source_layout": None}
    # the source's FFN width (172 for stories260K), not the padded one config.json says, on every route
    models = [Engine(e).manifest["model"] for e in engines]
    assert models[0] == models[1]
    if arch == "stories":
        assert (models[0]["inter_size"], models[0]["inter_size_padded"]) == (172, 192 if group == 32 else 172)


def test_both_routes_to_an_engine_write_the_same_manifest_model(tmp_path):
    """quantize --to engine recorded stories260K's FFN width (172), converting its AWQ-GEMM twin the padded
    192 of config.json: the same bytes, two descriptions (and two GGUF feed_forward_length)."""
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.formats.engine import Engine

    opts = QuantOptions(bits=4, group_size=32, method="rtn")
    direct = quantize_model(STORIES, tmp_path / "direct", opts, to="engine").output
    conv = convert_hf_to_engine(quantize_model(STORIES, tmp_path / "awq", opts, to="hf").output, tmp_path / "conv")
    assert Engine(direct).manifest["model"] == Engine(conv).manifest["model"]
    for f in ("rank0.safetensors", "shared.safetensors"):
        assert sha(direct / f) == sha(conv / f)


@pytest.mark.parametrize("tp,bits,sym", [(1, 4, False), (2, 4, True), (1, 8, False)])
def test_engine_converts_to_the_same_bytes(tp, bits, sym, models, tmp_path):
    """engine -> compressed-tensors (ranks merged, q/k rotary rows back in HF order, the
    FFN width trimmed to whole groups) writes what quantizing straight to it writes."""
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.export.compressed_tensors import engine_to_compressed_tensors

    opts = QuantOptions(bits=bits, group_size=32, symmetric=sym)
    direct = quantize_model(STORIES, tmp_path / "direct", opts, CALIB, to="compressed-tensors").output
    awq = quantize_model(STORIES, tmp_path / "awq", opts, CALIB, to="hf").output
    eng = convert_hf_to_engine(awq, tmp_path / "eng", tp=tp)
    conv = engine_to_compressed_tensors(eng, tmp_path / "conv")
    assert sha(conv / "model.safetensors") == sha(direct / "model.safetensors")
    assert json.loads((conv / "config.json").read_text()) == json.loads((direct / "config.json").read_text())
    assert json.loads((conv / REPORT).read_text())["converted"]["from_format"] == "lmkiln-engine"


def test_engine_conversion_refuses_an_fp_engine(tmp_path):
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    eng = convert_hf_to_engine(STORIES, tmp_path / "fp")
    r = CliRunner().invoke(app, ["convert", "to-compressed-tensors", str(eng), "-o", str(tmp_path / "ct")], env=ENV)
    assert r.exit_code == 2 and "an fp engine has no quantized codes" in r.output
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("arch,overrides", [
    ("Gemma2ForCausalLM", {}), ("Gemma3ForCausalLM", {}),
    # attention (4 heads x 32 = 128) wider than the FFN (96): o's input was cut to the FFN width (exit 3)
    ("LlamaForCausalLM", {"head_dim": 32, "intermediate_size": 96}),
])
def test_engine_converts_to_the_same_bytes_as_quantizing_straight(arch, overrides, tmp_path):
    """Gemma's engines were refused with the GGUF exporter's message ("GGUF export of Gemma... not
    supported"): the conversion only borrowed its rank merging. Their sandwich norms now travel too."""
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.export.compressed_tensors import engine_to_compressed_tensors

    hf = make_tiny_model(tmp_path / "hf", arch, **overrides)
    opts = QuantOptions(bits=4, group_size=32, method="rtn")
    direct = quantize_model(hf, tmp_path / "direct", opts, to="compressed-tensors").output
    eng = convert_hf_to_engine(quantize_model(hf, tmp_path / "awq", opts, to="hf").output, tmp_path / "eng")
    conv = engine_to_compressed_tensors(eng, tmp_path / "conv")
    assert sha(conv / "model.safetensors") == sha(direct / "model.safetensors")


def test_moe_engine_conversion_is_refused_in_one_line(tmp_path):
    hf = make_tiny_model(tmp_path / "hf", "MixtralForCausalLM")
    eng = quantize_model(hf, tmp_path / "e", QuantOptions(bits=4, group_size=32, method="rtn"), to="engine").output
    r = CliRunner().invoke(app, ["convert", "to-compressed-tensors", str(eng), "-o", str(tmp_path / "ct")], env=ENV)
    assert r.exit_code == 2 and "mixture-of-experts engine to compressed-tensors is not supported yet" in r.output
    assert "GGUF" not in r.output and not (tmp_path / "ct").exists()


@pytest.mark.parametrize("edit,said", [
    (lambda g: g["weights"].update(actorder="group"), "actorder 'group'"),
    (lambda g: g.update(input_activations={"num_bits": 8, "type": "int"}), "quantized activations"),
    (lambda g: g["weights"].update(type="float"), "lmkiln reads int4/int8"),
])
def test_schemes_lmkiln_does_not_read_are_refused_in_one_line(edit, said, tmp_path):
    out = quantize_model(STORIES, tmp_path / "ct", QuantOptions(bits=4, group_size=32, method="rtn"),
                         to="compressed-tensors").output
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["quantization_config"]["config_groups"]["group_0"])
    (out / "config.json").write_text(json.dumps(cfg))
    for cmd in (["inspect", str(out)], ["verify", str(STORIES), str(out)]):
        r = CliRunner().invoke(app, cmd, env=ENV)
        assert r.exit_code == 2 and said in r.output and len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.parametrize("edit,said", [
    (lambda q: q["config_groups"]["group_0"]["weights"].pop("group_size"), "group_size None"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size="32"), "group_size '32'"),
    (lambda q: q.update(ignore=5), "ignore must be a list"),
    (lambda q: q.update(config_groups=["group_0"]), "config_groups must map names to objects"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="dynamic"), "actorder 'dynamic'"),
    # what llm-compressor writes for schemes lmkiln does not run (said by name, not as unaccounted tensors)
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (lambda q: q.update(transform_config={"config_groups": {"v": {"apply": [{"location": "input"}]}}}),
     "transform 'v' applies rotations at run time"),
    (lambda q: q.update(format="int-quantized", config_groups={"g": {"weights": {"num_bits": 8, "type": "int"},
                                                                     "input_activations": {"num_bits": 8}}}),
     "quantized activations"),
    (lambda q: q.update(format="dense"), "save_compressed=True"),
])
def test_a_malformed_quantization_config_is_one_line(edit, said, tmp_path):
    """A damaged config.json was an internal error (KeyError, TypeError, AttributeError: exit 3)."""
    out = quantize_model(STORIES, tmp_path / "ct", QuantOptions(bits=4, group_size=32, method="rtn"),
                         to="compressed-tensors").output
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))
    for cmd in (["inspect", str(out)], ["convert", "hf-to-engine", str(out), "-o", str(tmp_path / "e")]):
        r = CliRunner().invoke(app, cmd, env=ENV)
        assert r.exit_code == 2 and said in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_a_quantized_output_head_is_said_so(tmp_path):
    """llm-compressor with ignore=[] quantizes lm_head too: it was reported as missing."""
    from safetensors.torch import load_file, save_file

    hf = make_tiny_model(tmp_path / "hf", "LlamaForCausalLM")
    out = quantize_model(hf, tmp_path / "ct", QuantOptions(bits=4, group_size=32, method="rtn"), to="compressed-tensors").output
    sd = load_file(str(out / "model.safetensors"))
    sd["lm_head.weight_packed"] = torch.zeros(1, dtype=torch.int32)
    del sd["lm_head.weight"]
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    r = CliRunner().invoke(app, ["inspect", str(out)], env=ENV)
    assert r.exit_code == 2 and "lm_head is quantized; lmkiln keeps the lm_head in floating point" in r.output, r.output


def test_bf16_scales_as_llm_compressor_writes_them_for_a_bf16_model(tmp_path):
    """The format keeps weight_scale in the model's dtype; a bf16 model's scales were refused as 'not float16'.
    The engine stores them as fp16 (exact at scale magnitudes), the codes unchanged."""
    from safetensors.torch import load_file, save_file

    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.formats.engine import Engine

    out = quantize_model(STORIES, tmp_path / "ct", QuantOptions(bits=4, group_size=32, method="rtn"),
                         to="compressed-tensors").output
    sd = load_file(str(out / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) if k.endswith("weight_scale") else v for k, v in sd.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    ref = quantize_model(STORIES, tmp_path / "e-ref", QuantOptions(bits=4, group_size=32, method="rtn"), to="engine").output
    eng = convert_hf_to_engine(out, tmp_path / "e")
    a, b = Engine(ref), Engine(eng)
    names = [n for n in a.manifest["tensors"] if n.endswith(".scales")]
    assert names
    for n in names:
        assert torch.equal(b.get(n), a.get(n).to(torch.bfloat16).to(torch.float16)), n
    for n in (n for n in a.manifest["tensors"] if n.endswith(".qweight")):
        assert torch.equal(b.get(n), a.get(n)), n
