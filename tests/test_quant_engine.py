"""int4/int8 engines: AWQ-GEMM checkpoints -> engine -> runner.

The reference for every quantized engine is the "fake-quantized" fp model: the same
codes dequantized and run by transformers. Both hold exactly the same weight values,
so logits must agree to float32 noise (1e-4), for every family, quantization and --tp.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lmkiln.assets import bundled_model_path
from lmkiln.cli import app
from lmkiln.convert.hf_to_engine import convert_hf_to_engine
from lmkiln.convert.transforms import permute_rotary
from lmkiln.errors import CheckpointError, EngineFormatError, InputError
from lmkiln.formats.awq_gemm import awq_spec, read_qlinear
from lmkiln.formats.engine import MANIFEST, Engine, rank_file
from lmkiln.formats.hf import HFCheckpoint
from lmkiln.formats.packing import unpack_int4
from lmkiln.formats.qtensor import dequantize
from lmkiln.inspect_model import describe
from lmkiln.runtime.engine_model import EngineModel
from lmkiln.runtime.qlinear import QuantLinear
from lmkiln.runtime.generate import check_finite, greedy_generate, static_greedy
from lmkiln.runtime.session import generate_text
from helpers import copy_tree, edit_json
from quant_fixtures import MODELS, build_hf, write_awq

# name -> (bits, group_size, symmetric)
QCONFIGS = {
    "int4-g32": (4, 32, False),
    "int4-g64-sym": (4, 64, True),
    "int8-g32": (8, 32, False),
    "int8-channel-sym": (8, -1, True),
    "int4-g16": (4, 16, False),  # the CPU int4 kernel takes no 16-wide groups: the dequantized fallback runs
}
# Which QuantLinear path each runs on CPU in float32.
EXPECTED_MODE = {"int4-g32": "int4", "int4-g64-sym": "int4", "int8-g32": "dequant", "int8-channel-sym": "int8", "int4-g16": "dequant"}
IDS = torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(0))
PROMPTS = [[1, 45, 300, 12, 7], [1, 99, 4]]


@pytest.fixture(scope="session")
def quant_models(tmp_path_factory):
    """(family, qconfig name, keep_fp) -> (awq dir, fake-quantized dir), built once per session."""
    root = tmp_path_factory.mktemp("quant")
    cache: dict = {}

    def get(family: str, qname: str, keep_fp: tuple[str, ...] = ()):
        if family not in cache:
            cache[family] = build_hf(family, root / family)
        key = (family, qname, keep_fp)
        if key not in cache:
            tag = "-".join([family, qname, *keep_fp])
            cache[key] = (write_awq(cache[family], root / f"{tag}-awq", root / f"{tag}-fake", *QCONFIGS[qname], keep_fp=keep_fp),
                          root / f"{tag}-fake")
        return cache[key]

    return get


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        nxt = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return ids[0, len(prompt):].tolist()


def modes(model: EngineModel) -> set[str]:
    return {m.mode for m in model.modules() if isinstance(m, QuantLinear)}


def attention_width(family: str) -> int:
    kw = MODELS[family][2]
    return kw["num_attention_heads"] * kw.get("head_dim", kw["hidden_size"] // kw["num_attention_heads"])


# -- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("qname", list(QCONFIGS))
@pytest.mark.parametrize("family", list(MODELS))
def test_logits_and_generation_match_fake_quantized(quant_models, tmp_path, family, qname, tp):
    awq, fake = quant_models(family, qname)
    bits, g, _ = QCONFIGS[qname]
    if g > 0 and (attention_width(family) // tp) % g:
        with pytest.raises(InputError, match="--group-size"):
            convert_hf_to_engine(awq, tmp_path / "e", tp=tp)
        return
    engine = convert_hf_to_engine(awq, tmp_path / "e", tp=tp)
    model = EngineModel.from_path(engine, check=True, kernels=True)  # the default (dequantized) path: test below
    assert modes(model) == {EXPECTED_MODE[qname]}
    ref = hf_model(fake)
    with torch.no_grad():
        want = ref(IDS).logits
    assert (model(IDS) - want).abs().max().item() < 1e-4
    got = greedy_generate(model, PROMPTS, 8)  # a batch of different lengths: left padding
    assert got == [hf_greedy(ref, p, 8) for p in PROMPTS]


def test_kernels_agree_with_dequantized_fallback(quant_models, tmp_path):
    awq, _ = quant_models("llama", "int4-g32")
    engine = convert_hf_to_engine(awq, tmp_path / "e", tp=2)
    fast, slow = EngineModel.from_path(engine, kernels=True), EngineModel.from_path(engine)
    assert modes(fast) == {"int4"} and modes(slow) == {"dequant"}
    assert (fast(IDS) - slow(IDS)).abs().max().item() < 1e-5


def test_bf16_compute_runs_the_kernels(quant_models, tmp_path):
    awq, fake = quant_models("llama", "int4-g32")
    engine = convert_hf_to_engine(awq, tmp_path / "e")
    model = EngineModel.from_path(engine, dtype=torch.bfloat16, kernels=True)
    assert modes(model) == {"int4"}
    with torch.no_grad():
        want = hf_model(fake)(IDS).logits
    got = model(IDS)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 0.25  # bf16 activations, not an exactness check


@pytest.mark.parametrize("n, k, in_features, g", [(48, 64, 64, 32), (48, 96, 80, 32), (24, 64, 64, 32), (32, 64, 64, 16)])
def test_quant_linear_paths_equal_dequantized_matmul(n, k, in_features, g):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // g, n, generator=gen) * 0.1).half().float()
    zeros = torch.randint(0, 16, (k // g, n), generator=gen, dtype=torch.uint8)
    codes[in_features:] = 0  # padded input rows
    layer = QuantLinear(codes, scales, zeros, 4, in_features, kernels=True)
    assert layer.mode == ("int4" if n % 16 == 0 and g in (32, 64) else "dequant")
    w = dequantize(codes.t(), scales.t(), zeros.t().int(), g).t()[:in_features]
    x = torch.randn(2, 3, in_features, generator=gen)
    assert (layer(x) - x @ w).abs().max().item() < 1e-5


# -- conversion -----------------------------------------------------------------------------


def test_codes_scales_zeros_travel_bit_exactly(quant_models, tmp_path):
    awq, _ = quant_models("llama", "int4-g32")
    ckpt = HFCheckpoint(awq)
    spec = awq_spec(ckpt.config)
    o = read_qlinear(ckpt.get, "model.layers.0.self_attn.o_proj", spec, 64, 64)
    q = read_qlinear(ckpt.get, "model.layers.0.self_attn.q_proj", spec, 64, 64)
    eng = Engine(convert_hf_to_engine(awq, tmp_path / "e", tp=2))
    wo = [eng.get(f"layers.0.attention.wo.{r}.qweight") for r in range(2)]
    assert torch.equal(torch.cat([unpack_int4(t) for t in wo]), o.codes.t())
    scales = torch.cat([eng.get(f"layers.0.attention.wo.{r}.scales") for r in range(2)])
    assert scales.dtype == torch.float16 and torch.equal(scales, o.scales.t().half())
    zeros = torch.cat([eng.get(f"layers.0.attention.wo.{r}.zeros") for r in range(2)])
    assert torch.equal(zeros, o.zeros.t().to(torch.uint8))
    # rank 0's fused qkv starts with the first half of q's rows, rotary-permuted
    qkv0 = unpack_int4(eng.get("layers.0.attention.w_qkv.0.qweight"))
    assert torch.equal(qkv0[:, :32], permute_rotary(q.codes, 4, 16)[:32].t())


@pytest.mark.parametrize("family, qname, tp, inter_p, hidden_p, g", [
    ("llama", "int4-g32", 2, 192, 64, 32),
    ("llama", "int8-channel-sym", 2, 172, 64, None),
    ("qwen3", "int4-g64-sym", 2, 128, 64, 64),
    ("qwen3", "int8-channel-sym", 1, 100, 48, None),
])
def test_manifest_records_the_quantized_layout(quant_models, tmp_path, family, qname, tp, inter_p, hidden_p, g):
    awq, _ = quant_models(family, qname)
    bits, requested, sym = QCONFIGS[qname]
    m = json.loads((convert_hf_to_engine(awq, tmp_path / "e", tp=tp) / MANIFEST).read_text())
    assert m["weight_type"] == f"int{bits}" and m["fp_dtype"] == "fp32"
    assert m["model"]["inter_size_padded"] == inter_p
    assert m["quantization"] == {
        "bits": bits, "group_size": g, "granularity": "channel" if g is None else "group", "requested_group_size": requested,
        "symmetric": sym, "method": "awq", "source_layout": "awq-gemm", "hidden_padded": hidden_p, "unquantized": [],
    }
    w2 = m["tensors"]["layers.0.feed_forward.w2.0.qweight"]
    assert w2 == {"file": rank_file(0), "dtype": "uint8", "shape": [inter_p // tp, m["model"]["hidden_units"] // (2 if bits == 4 else 1)]}
    assert m["tensors"]["layers.0.feed_forward.w2.0.scales"]["dtype"] == "fp16"
    assert "layers.0.feed_forward.w2.0.weight" not in m["tensors"]


def test_dtype_option_applies_to_fp_tensors_only(quant_models, tmp_path):
    awq, _ = quant_models("qwen2", "int4-g32")
    eng = Engine(convert_hf_to_engine(awq, tmp_path / "e", dtype="bf16"))
    assert eng.manifest["fp_dtype"] == "bf16" and eng.dtype == torch.bfloat16
    assert eng.get("tok_embeddings.weight").dtype == torch.bfloat16
    assert eng.get("layers.0.attention.w_qkv.0.bias").dtype == torch.bfloat16
    assert eng.get("layers.0.attention.w_qkv.0.scales").dtype == torch.float16
    assert torch.isfinite(EngineModel(eng)(IDS)).all()


def test_modules_to_not_convert_stay_fp(quant_models, tmp_path):
    awq, fake = quant_models("llama", "int4-g32", ("layers.1.mlp.down_proj",))
    engine = convert_hf_to_engine(awq, tmp_path / "e", tp=2)
    eng = Engine(engine)
    assert eng.quant["unquantized"] == ["layers.1.feed_forward.w2"]
    assert eng.manifest["tensors"]["layers.1.feed_forward.w2.1.weight"]["shape"] == [64, 96]  # (out, in); inter padded to 192
    model = EngineModel(eng)
    assert isinstance(model.layers[1].feed_forward.w2, torch.nn.Module) and not isinstance(model.layers[1].feed_forward.w2, QuantLinear)
    with torch.no_grad():
        want = hf_model(fake)(IDS).logits
    assert (model(IDS) - want).abs().max().item() < 1e-4


def test_partly_quantized_fused_linear_is_refused(quant_models, tmp_path):
    awq, _ = quant_models("llama", "int4-g32", ("layers.0.self_attn.q_proj",))
    with pytest.raises(CheckpointError, match="fuses"):
        convert_hf_to_engine(awq, tmp_path / "e")


def _edit_config(path, mutate):
    cfg = json.loads((path / "config.json").read_text())
    mutate(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_fp_weight_of_an_unlisted_module_is_refused(quant_models, tmp_path):
    import shutil

    awq, _ = quant_models("llama", "int4-g32", ("layers.1.mlp.down_proj",))
    bad = shutil.copytree(awq, tmp_path / "awq")
    _edit_config(bad, lambda c: c["quantization_config"].update(modules_to_not_convert=None))
    with pytest.raises(CheckpointError, match="modules_to_not_convert"):
        convert_hf_to_engine(bad, tmp_path / "e")


@pytest.mark.parametrize("tamper, match", [
    (lambda t: t.pop("model.layers.0.mlp.up_proj.qzeros"), "qzeros.*missing"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.scales": t["model.layers.0.mlp.up_proj.scales"].float()}), "float16"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.scales": t["model.layers.0.mlp.up_proj.scales"][:1]}), "shape"),
])
def test_bad_awq_tensors_are_refused(quant_models, tmp_path, tamper, match):
    import shutil

    awq, _ = quant_models("llama", "int4-g32")
    bad = shutil.copytree(awq, tmp_path / "awq")
    tensors = load_file(str(bad / "model.safetensors"))
    tamper(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=match):
        convert_hf_to_engine(bad, tmp_path / "e")


def test_symmetric_claim_is_checked(quant_models, tmp_path):
    import shutil

    awq, _ = quant_models("llama", "int4-g32")  # asymmetric zeros
    bad = shutil.copytree(awq, tmp_path / "awq")
    _edit_config(bad, lambda c: c["quantization_config"].update(zero_point=False))
    with pytest.raises(CheckpointError, match="zero_point=false"):
        convert_hf_to_engine(bad, tmp_path / "e")


# -- the reader -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int4_engine(quant_models, tmp_path_factory):
    awq, _ = quant_models("llama", "int4-g32")
    return convert_hf_to_engine(awq, tmp_path_factory.mktemp("q") / "llama-int4.engine", tp=2)


@pytest.fixture
def engine_copy(int4_engine, tmp_path):
    import shutil

    return shutil.copytree(int4_engine, tmp_path / "copy.engine")


def _edit_manifest(engine, mutate):
    m = json.loads((engine / MANIFEST).read_text())
    mutate(m)
    (engine / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("mutate, match", [
    (lambda m: m["tensors"]["layers.0.attention.wo.0.scales"].update(shape=[2, 64]), "wo.0.scales"),
    (lambda m: m["tensors"]["layers.0.attention.wo.0.zeros"].update(dtype="fp16"), "wo.0.zeros"),
    (lambda m: m["quantization"].update(group_size=64), "group_size|tensor"),
    (lambda m: m["quantization"].update(group_size=-1), "group_size"),
    (lambda m: m["quantization"].update(bits=8), "bits"),
    (lambda m: m["quantization"].update(hidden_padded=96), "hidden_padded"),
    (lambda m: m["quantization"].update(act_order=True), "does not know"),
    (lambda m: m["quantization"].pop("symmetric"), "symmetric"),
    (lambda m: m["quantization"].update(unquantized=["layers.9.attention.wo"]), "unquantized"),
    (lambda m: m["quantization"].update(unquantized=["layers.0.attention.wo"]), "wo.0"),
    (lambda m: m.pop("quantization"), "quantization"),
    (lambda m: m.pop("fp_dtype"), "fp_dtype"),
    (lambda m: m.update(weight_type="int8"), "tensor|bits"),
    (lambda m: m.update(weight_type="fp32"), "contradicts"),
    (lambda m: m["model"].update(inter_size_padded=176), "inter_size_padded"),
])
def test_reader_validates_quantized_manifests(engine_copy, mutate, match):
    _edit_manifest(engine_copy, mutate)
    with pytest.raises(EngineFormatError, match=match):
        Engine(engine_copy)


def test_reader_checks_quantized_file_headers(engine_copy):
    path = engine_copy / rank_file(0)
    tensors = load_file(str(path))
    name = "layers.0.attention.wo.0.scales"
    tensors[name] = tensors[name].float()  # right shape, wrong dtype
    save_file(tensors, str(path), metadata={"format": "pt"})
    m = json.loads((engine_copy / MANIFEST).read_text())
    m["files"][rank_file(0)]["size"] = path.stat().st_size
    (engine_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EngineFormatError, match="wo.0.scales"):
        Engine(engine_copy)


def test_int4_engine_of_earlier_layout_loads_the_same(int4_engine, tmp_path):
    """An int4 engine as lmkiln wrote it before format v4 (its fp head stored (in, out); codes
    never moved) reads back the same tensors and logits."""
    import shutil

    from helpers import as_earlier_engine

    old = shutil.copytree(int4_engine, tmp_path / "old.engine")
    as_earlier_engine(old, 3)
    new_e, old_e = Engine(int4_engine), Engine(old, check=True)
    assert old_e.manifest["tensors"]["output.weight"]["shape"][::-1] == new_e.manifest["tensors"]["output.weight"]["shape"]
    for name in new_e.manifest["tensors"]:
        assert torch.equal(new_e.get(name), old_e.get(name)), name
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(EngineModel.from_path(old)(ids), EngineModel.from_path(int4_engine)(ids), rtol=0, atol=0)


# -- the real bundled model, and the commands ------------------------------------------------


@pytest.fixture(scope="module")
def stories_w4(tmp_path_factory):
    """stories260K quantized RTN W4 g32 (AWQ-GEMM) and its fake-quantized twin."""
    root = tmp_path_factory.mktemp("stories")
    awq = write_awq(bundled_model_path(), root / "awq", root / "fake", bits=4, group_size=32, symmetric=False)
    return awq, root / "fake", convert_hf_to_engine(awq, root / "w4.engine", tp=2)


def test_stories260k_w4_engine_matches_and_generates(stories_w4):
    awq, fake, engine = stories_w4
    model = EngineModel.from_path(engine, check=True, kernels=True)
    assert modes(model) == {"int4"}
    ref = hf_model(fake)
    with torch.no_grad():
        want = ref(IDS).logits
    assert (model(IDS) - want).abs().max().item() < 1e-4
    assert greedy_generate(model, PROMPTS, 12) == [hf_greedy(ref, p, 12) for p in PROMPTS]
    (text,) = generate_text(engine, ["Once upon a time"], 24)
    assert text.strip()
    # the same as running the fake-quantized fp model, and as running the AWQ dir directly
    assert generate_text(fake, ["Once upon a time"], 24) == [text]
    assert generate_text(awq, ["Once upon a time"], 24) == [text]


def test_generation_refuses_past_the_context_and_vocabulary(stories_w4):
    """Prompt + new tokens past the model's 512 positions would degrade without a word (and a
    huge count allocated a cache for all of it: exit 3); ids past the vocabulary mean a tokenizer
    of another model (was an IndexError). Both are one-line input errors, before any work."""
    _, _, engine = stories_w4
    model = EngineModel.from_path(engine)
    assert greedy_generate(model, [[1] * 500], 12)  # 512 positions: fits
    with pytest.raises(InputError, match=r"the prompt \(500 tokens\) plus 13 new tokens exceed the model's context of 512 "
                                         r"positions; .* at most 12 new tokens"):
        greedy_generate(model, [[1] * 500], 13)
    with pytest.raises(InputError, match="exceed the model's context of 512"):
        generate_text(engine, ["Once upon a time"], 10 ** 9)
    with pytest.raises(InputError, match=r"token id 512 is outside the model's vocabulary \(512 ids\)"):
        greedy_generate(model, [[1, 512]], 2)
    # NaN in a weight (convert copies bytes without reading them): the first logits say so, not an empty text
    norm = model.layers[0].attention_norm
    bad = norm.weight.detach().clone()  # a copy: the model's tensors may map the engine's files
    bad[0] = float("nan")
    norm.weight = torch.nn.Parameter(bad, requires_grad=False)
    with pytest.raises(InputError, match="logits are NaN or Inf"):
        greedy_generate(model, [[1, 2, 3]], 2)
    with pytest.raises(InputError, match="logits are NaN or Inf"):  # the device-side loop CUDA decodes with, too
        static_greedy(model, [[1, 2, 3]], 2, graphs=False)
    from lmkiln.verify.metrics import compare

    with pytest.raises(InputError, match="logits are NaN or Inf"):  # and verify's candidate pass
        compare([torch.zeros(3, 512)], model, [[1, 2, 3]])
    # in float16 (the CUDA default for quantized engines) the likelier cause is named with its fix
    with pytest.raises(InputError, match=r"overflow float16 \(rerun with --dtype bf16\)"):
        check_finite(torch.tensor([1.0, float("inf")]), torch.float16)


def test_generate_names_the_users_paths(tmp_path):
    """Errors after an on-the-fly conversion name the user's directory, not the temporary engine
    made from it (a tokenizer file transformers cannot load is found only then; no tokenizer
    at all is said before converting); a file (a GGUF, say) is called a file, not 'no such directory'."""
    src = tmp_path / "weights-only"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(bundled_model_path() / f, src / f)
    with pytest.raises(InputError, match=rf"^{src}: no tokenizer \(tokenizer.json, tokenizer.model, vocab.json\)"):
        generate_text(src, ["Once"], 2)
    (src / "tokenizer.json").write_text("[", encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{src} \(as a temporary engine\): cannot load the tokenizer") as e:
        generate_text(src, ["Once"], 2)
    assert "lmkiln-engine-" not in str(e.value)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(InputError, match=r"m.gguf: a file, not an engine or model directory \(GGUF files are read by"):
        generate_text(gguf, ["Once"], 2)


def test_an_error_mid_conversion_is_one_line(stories_w4, tmp_path):
    """An error found halfway through (asymmetric codes in a checkpoint whose config says zero_point
    false): the progress bar is cleared, so stderr holds the error line alone."""
    import subprocess
    import sys

    awq, _, _ = stories_w4
    bad = copy_tree(awq, tmp_path / "zp")
    edit_json(bad / "config.json", lambda c: c["quantization_config"].update(zero_point=False))
    p = subprocess.run([sys.executable, "-m", "lmkiln", "convert", "hf-to-engine", str(bad), "-o", str(tmp_path / "e")],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert not (tmp_path / "e").exists()


def test_inspect_shows_quantization(stories_w4, quant_models, tmp_path):
    _, _, engine = stories_w4
    rows = dict(describe(engine)[1])
    assert rows["weight type"] == "int4 g32 asym"
    assert rows["checksums"] == "all hold (blake3)"
    assert "awq" in rows["quantization"] and "fp32" in rows["fp tensors"]
    assert rows["quantization"].startswith("awq, from awq-gemm;"), rows["quantization"]  # the layout it was read from
    old = copy_tree(engine, tmp_path / "old")  # written before lmkiln recorded the layout
    edit_json(old / MANIFEST, lambda m: m["quantization"].pop("source_layout"))
    assert dict(describe(old, check=False)[1])["quantization"].startswith("awq, from unknown layout;")
    awq8, _ = quant_models("llama", "int8-channel-sym")
    assert dict(describe(convert_hf_to_engine(awq8, tmp_path / "e8"))[1])["weight type"] == "int8 per-channel sym"
    result = CliRunner().invoke(app, ["inspect", str(engine)], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    assert "int4 g32 asym" in result.output


def test_inspect_hf_validates_as_convert_does(stories_w4, tmp_path):
    """inspect of an HF directory runs convert's checks (every tensor accounted for, shapes as
    config.json implies) instead of calling a checkpoint "validated" that convert refuses; an AWQ
    checkpoint's parameters are the model's (qweight unpacked), not its int32 words."""
    awq, fake, _ = stories_w4
    fp = dict(describe(fake)[1])
    assert dict(describe(awq)[1])["parameters"] == fp["parameters"]
    assert "shapes validated" in fp["checksums"]
    bad = copy_tree(fake, tmp_path / "layers9")
    edit_json(bad / "config.json", lambda c: c.update(num_hidden_layers=9))
    with pytest.raises(CheckpointError, match="model.layers.5.input_layernorm.weight.*missing"):
        describe(bad)
    qstr = copy_tree(awq, tmp_path / "qstr")
    edit_json(qstr / "config.json", lambda c: c.update(quantization_config="awq"))
    with pytest.raises(CheckpointError, match="quantization_config must be an object"):
        describe(qstr)
    result = CliRunner().invoke(app, ["inspect", str(qstr)], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 2 and "quantization_config must be an object" in result.output, result.output


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_awq_scales_that_are_not_finite_are_refused(bad, tmp_path):
    """NaN/Inf AWQ scales went through convert and to-compressed-tensors with exit 0 (a server
    would then produce NaN): refused, naming the module."""
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import quantize_model
    from lmkiln.quant.reformat import awq_to_compressed_tensors

    awq = quantize_model(bundled_model_path(), tmp_path / "awq", QuantOptions(bits=4, group_size=32, method="rtn")).output
    sd = load_file(str(awq / "model.safetensors"))
    name = "model.layers.2.mlp.up_proj.scales"
    sd[name][0, 1] = bad
    save_file(sd, str(awq / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.up_proj.scales contains NaN or Inf values"):
        convert_hf_to_engine(awq, tmp_path / "e")
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.up_proj.scales contains NaN or Inf values"):
        awq_to_compressed_tensors(awq, tmp_path / "ct")
