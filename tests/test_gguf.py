"""`lmkiln export gguf`: every file is read back with the `gguf` package's own reader and
dequantized with its own `gguf.quants`, then compared with lmkiln's dequantized weights.

- AWQ int4 g32 (stories260K, `lmkiln quantize`): Q4_1 blocks hold AWQ's codes and scales
  bit for bit; the weights differ only by the fp16 rounding of m = −scale·zero.
- RTN fixtures (tests/quant_fixtures.py): symmetric int4 -> Q4_0 and int8 -> Q8_0 exactly;
  Qwen2 (half-split rotary, biases) and Qwen3 (q/k norms; hidden 48, whose rows are not
  whole blocks -> f16); group 64 moves exactly, group 16 is re-quantized and says so.
- The GGUF runner (`lmkiln verify` candidate) gives the source's logits for f32 files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import make_tiny_model, torch_threads
from lmkiln.assets import bundled_model_path
from lmkiln.cli import app
from lmkiln.convert.architectures import LINEAR_ROLES, get_architecture
from lmkiln.convert.transforms import permute_rotary
from lmkiln.errors import InputError, OutputExistsError
from lmkiln.convert.hf_to_engine import convert_hf_to_engine
from lmkiln.export.gguf import export_gguf
from lmkiln.formats.engine import Engine
from lmkiln.formats.awq_gemm import awq_spec, read_qlinear
from lmkiln.formats.gguf import BLOCK, tensor_name, unpack_blocks
from lmkiln.formats.hf import HFCheckpoint
from lmkiln.quant.awq import QuantOptions
from lmkiln.quant.pipeline import CalibOptions, quantize_model
from lmkiln.runtime.engine_model import EngineModel
from lmkiln.runtime.gguf_runner import gguf_model
from lmkiln.runtime.session import engine_dir
from quant_fixtures import build_hf, write_awq

STORIES = bundled_model_path()
EVAL_TEXT = Path(__file__).parent / "fixtures" / "tinystories_eval.txt"  # in-domain text calibration never saw
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
IDS = torch.tensor([[1, 403, 89, 260, 16, 302, 72, 343, 30, 418, 5, 11, 200]])


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def awq_stories(tmp_path_factory) -> Path:
    """stories260K, AWQ int4 g32 asymmetric, as an AWQ-GEMM directory."""
    out = tmp_path_factory.mktemp("gguf-awq") / "awq"
    quantize_model(STORIES, out, QuantOptions(bits=4, group_size=32), CalibOptions(n_samples=16, seqlen=128), to="hf")
    return out


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """name -> (fp HF dir, fake-quantized fp dir, AWQ dir) for the RTN fixtures, built lazily."""
    root, cache = tmp_path_factory.mktemp("gguf-fix"), {}

    def get(family: str, bits: int, group: int, sym: bool):
        key = (family, bits, group, sym)
        if key not in cache:
            d = root / "-".join(map(str, key))
            hf = root / family if (root / family).exists() else build_hf(family, root / family)
            write_awq(hf, d / "awq", d / "fake", bits, group, sym)
            cache[key] = (hf, d / "fake", d / "awq")
        return cache[key]

    return get


def read(path: Path) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:
    """name -> (type, float32 (rows, row length)) with gguf's own reader and dequantizer."""
    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type, np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
                     .reshape(tuple(int(x) for x in reversed(t.shape.tolist())))) for t in r.tensors}


def field(path: Path, key: str):
    f = gguf.GGUFReader(str(path)).get_field(key)
    return None if f is None else f.contents()


def expected_linear(w: torch.Tensor, role: str, cfg: dict, n_ff: int, interleaved: bool) -> np.ndarray:
    """An HF (out, in) weight as the GGUF must hold it: llama.cpp's rotary row order, FFN zero-padded."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if interleaved and role in ("q", "k"):
        w = permute_rotary(w, cfg["num_attention_heads"] if role == "q" else cfg["num_key_value_heads"], hd)
    if role in ("gate", "up"):
        w = torch.cat([w, w.new_zeros(n_ff - w.shape[0], w.shape[1])])
    if role == "down":
        w = torch.cat([w, w.new_zeros(w.shape[0], n_ff - w.shape[1])], 1)
    return w.float().numpy()


def compare_linears(gg: Path, fake_dir: Path, tol: float) -> float:
    """Max |GGUF − lmkiln dequantized| over every linear; asserts shapes and `tol`."""
    cfg = json.loads((fake_dir / "config.json").read_text())
    arch = get_architecture(cfg["architectures"][0])
    sd = load_file(str(fake_dir / "model.safetensors"))
    t = read(gg)
    n_ff = int(field(gg, f"{arch.gguf_arch}.feed_forward_length"))
    assert n_ff % BLOCK == 0 and n_ff >= cfg["intermediate_size"]
    worst = 0.0
    for i in range(cfg["num_hidden_layers"]):
        for role in [r for r in LINEAR_ROLES if r in arch.tensors]:
            want = expected_linear(sd[arch.hf_name_of(role, i)], role, cfg, n_ff, arch.gguf_rope_interleaved)
            _, got = t[tensor_name(role, i)]
            assert got.shape == want.shape, (role, i)
            d = np.abs(got - want)
            if role == "down":  # padded columns multiply the padded (exactly zero) gate/up outputs
                d = d[:, :cfg["intermediate_size"]]
            if role in ("gate", "up"):
                assert not got[cfg["intermediate_size"]:].any(), "padded FFN rows must be exactly 0"
            worst = max(worst, float(d.max()))
    assert worst <= tol, worst
    return worst


def test_awq_q4_1_holds_awq_codes_and_scales(awq_stories, tmp_path):
    res = export_gguf(awq_stories, tmp_path / "m.gguf")
    rep = res.report
    assert rep["type"] == "q4_1" and rep["requantized"] == {} and rep["fallbacks"] == {}
    assert rep["counts"] == {"q4_1 exact": 35, "f32 fp": 11, "q8_0 quantized": 1}  # 5 layers x 7 linears; norms; embedding
    assert field(res.path, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_1)
    # bit for bit: GGUF codes = AWQ codes, d = AWQ scale, m = fp16(-scale * zero)
    ckpt = HFCheckpoint(awq_stories)
    spec, arch = awq_spec(ckpt.config), get_architecture(ckpt.architecture)
    r = {t.name: t for t in gguf.GGUFReader(str(res.path)).tensors}
    for role, shape in (("o", (64, 64)), ("down", (64, 172)), ("v", (32, 64))):
        qt = read_qlinear(ckpt.get, arch.hf_name_of(role, 2).rsplit(".", 1)[0], spec, *shape)
        codes, d, m = unpack_blocks(r[tensor_name(role, 2)].data, "q4_1")
        n = codes.shape[1]  # the GGUF row length: 64, or the FFN width padded to whole blocks
        assert qt.in_padded == n and np.array_equal(codes, qt.codes.numpy())
        assert np.array_equal(d, qt.scales.numpy()[:, : n // BLOCK])
        assert np.array_equal(m, (-qt.scales * qt.zeros).half().float().numpy()[:, : n // BLOCK])
    # the weights gguf dequantizes differ from lmkiln's only by m's rounding, at most 1/128 of a step
    from lmkiln.quant.dequant import write_fake_quant_checkpoint

    fake = write_fake_quant_checkpoint(awq_stories, tmp_path / "fake")
    worst = compare_linears(res.path, fake, tol=rep["m_rounding"]["max_abs_err"])
    assert 0 < worst == pytest.approx(rep["m_rounding"]["max_abs_err"])
    assert rep["m_rounding"]["max_err_steps"] <= 1 / 128


def test_symmetric_int4_is_q4_0_and_int8_is_q8_0_exactly(fixtures, tmp_path):
    _, fake, awq = fixtures("llama", 4, 32, True)
    res = export_gguf(awq, tmp_path / "q40.gguf")
    assert res.report["type"] == "q4_0" and res.report["m_rounding"] is None
    assert compare_linears(res.path, fake, tol=0.0) == 0.0
    _, fake8, awq8 = fixtures("llama", 8, 32, True)
    res8 = export_gguf(awq8, tmp_path / "q80.gguf")
    assert res8.report["type"] == "q8_0" and "q8_0 exact" in res8.report["counts"]
    assert compare_linears(res8.path, fake8, tol=0.0) == 0.0
    # symmetric int4 also fits Q4_1 exactly: m = -8·scale is an fp16 value
    res41 = export_gguf(awq, tmp_path / "q41.gguf", gtype="q4_1")
    assert compare_linears(res41.path, fake, tol=0.0) == 0.0


def test_qwen_families_keep_hf_rotary_order_and_fall_back_per_tensor(fixtures, tmp_path):
    _, fake, awq = fixtures("qwen2", 4, 32, False)
    res = export_gguf(awq, tmp_path / "qwen2.gguf")
    assert field(res.path, "general.architecture") == "qwen2"
    compare_linears(res.path, fake, tol=res.report["m_rounding"]["max_abs_err"])
    t = read(res.path)
    hf = load_file(str(fake / "model.safetensors"))
    assert np.array_equal(t["blk.1.attn_q.bias"][1], hf["model.layers.1.self_attn.q_proj.bias"].numpy())  # not permuted
    # Qwen3 fixture: hidden 48 is not whole 32-blocks, so q/k/v/gate/up and the embedding are f16 (said per tensor)
    _, fake3, awq3 = fixtures("qwen3", 4, 32, False)
    res3 = export_gguf(awq3, tmp_path / "qwen3.gguf")
    fb = res3.report["fallbacks"]
    assert set(fb) == {tensor_name(r, i) for r in ("q", "k", "v", "gate", "up") for i in range(2)} | {"token_embd.weight"}
    t3 = read(res3.path)
    assert t3["blk.0.attn_q.weight"][0] == gguf.GGMLQuantizationType.F16
    assert t3["blk.0.attn_output.weight"][0] == gguf.GGMLQuantizationType.Q4_1
    compare_linears(res3.path, fake3, tol=2e-3)  # f16 rounding of the dequantized weights
    hf3 = load_file(str(fake3 / "model.safetensors"))
    assert np.array_equal(t3["blk.0.attn_q_norm.weight"][1], hf3["model.layers.0.self_attn.q_norm.weight"].numpy())


def test_group_64_moves_exactly_group_16_and_asymmetric_int8_are_requantized(fixtures, tmp_path):
    _, fake, awq = fixtures("llama", 4, 64, False)
    res = export_gguf(awq, tmp_path / "g64.gguf")
    assert res.report["requantized"] == {}
    compare_linears(res.path, fake, tol=res.report["m_rounding"]["max_abs_err"])
    _, fake16, awq16 = fixtures("llama", 4, 16, False)
    said = []
    res16 = export_gguf(awq16, tmp_path / "g16.gguf", on_info=said.append)
    rq = res16.report["requantized"]
    assert len(rq) == 14 and all("group size 16" in why for why in rq.values())
    assert [s for s in said if "re-quantizing" in s] == [  # one line per reason, not per tensor
        "re-quantizing 14 tensor(s) to q4_1 (group size 16 is not a multiple of GGUF's 32-weight blocks), e.g. "
        f"{next(iter(rq))}; --report lists them all"]
    meta = json.loads(field(res16.path, "lmkiln.export"))  # the file itself says what was re-quantized
    assert meta["type"] == "q4_1" and meta["requantized"] == rq
    # re-quantized by GGUF's Q4_1 quantizer: close to, not equal to, lmkiln's weights
    worst = compare_linears(res16.path, fake16, tol=0.05)
    assert worst > 1e-3
    # GGUF has no int8 type with zero points: asymmetric int8 is re-quantized to Q8_0, and says why
    _, fake8, awq8 = fixtures("llama", 8, 32, False)
    res8 = export_gguf(awq8, tmp_path / "a8.gguf")
    assert res8.report["type"] == "q8_0" and len(res8.report["requantized"]) == 14
    assert all("8-bit asymmetric codes do not fit q8_0" == why for why in res8.report["requantized"].values())
    compare_linears(res8.path, fake8, tol=0.01)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_runner_on_f32_gguf_gives_the_source_logits(fixtures, tmp_path, family):
    """Fusion, rotary order and tying through GGUF and back: an f32 file is the same model."""
    hf, _, _ = fixtures(family, 4, 32, False)
    res = export_gguf(hf, tmp_path / "f32.gguf", gtype="f32")
    assert set(res.report["counts"]) == {"f32 fp"}
    with engine_dir(hf) as e:
        ref = EngineModel.from_path(e)(IDS)
    got = gguf_model(res.path)(IDS)
    assert (got - ref).abs().max() < 1e-4


def test_stories_tokenizer_and_metadata(tmp_path):
    from lmkiln.formats.tokenizer import load_tokenizer

    res = export_gguf(STORIES, tmp_path / "f16.gguf")
    p = res.path
    assert res.report["type"] == "f16"
    assert field(p, "llama.feed_forward_length") == 192  # 172 zero-padded to whole blocks
    assert (field(p, "llama.context_length"), field(p, "llama.block_count"), field(p, "llama.attention.head_count_kv")) == (512, 5, 4)
    assert field(p, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tok = load_tokenizer(STORIES)
    tokens = field(p, "tokenizer.ggml.tokens")
    assert tokens == tok.convert_ids_to_tokens(list(range(512)))
    assert field(p, "tokenizer.ggml.model") == "llama" and len(set(field(p, "tokenizer.ggml.scores"))) > 100
    assert (field(p, "tokenizer.ggml.bos_token_id"), field(p, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field(p, "tokenizer.ggml.add_bos_token") is True
    types = field(p, "tokenizer.ggml.token_type")
    assert types[:3] == [2, 3, 3] and types[3] == 6  # unknown, control x2, byte


def test_verify_accepts_a_gguf_candidate(awq_stories, tmp_path):
    """The GGUF scores like the AWQ checkpoint it came from (only the Q8_0 embedding and m's rounding differ)."""
    from lmkiln.verify.verify import VerifyOptions, run_verify

    gg = export_gguf(awq_stories, tmp_path / "m.gguf").path
    opts = VerifyOptions(data=EVAL_TEXT, max_tokens=1024, max_new_tokens=4)
    a, b = (run_verify(STORIES, c, opts).report for c in (awq_stories, gg))
    assert b["runners"]["candidate"] == "gguf@cpu" and b["candidate"]["weight_type"] == "int4"
    assert abs(b["kl"]["mean"] - a["kl"]["mean"]) < 0.01 and b["candidate"]["ppl"] == pytest.approx(a["candidate"]["ppl"], rel=0.01)
    rep = tmp_path / "v.json"
    r = CliRunner().invoke(app, ["verify", str(STORIES), str(gg), "--data", str(EVAL_TEXT), "--max-tokens", "600",
                                 "--max-new-tokens", "4", "--max-kl", "1", "--min-top1", "0.5", "--report", str(rep)], env=ENV)
    assert r.exit_code == 0, r.output
    assert json.loads(rep.read_text())["runners"]["candidate"] == "gguf@cpu"


def test_cli_errors_and_atomic_output(awq_stories, tmp_path):
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(app, ["export", "gguf", str(awq_stories), "-o", str(out)], env=ENV)
    assert r.exit_code == 0, r.output
    assert "35 q4_1 exact" in r.output and "m = -scale*zero rounded to fp16" in r.output
    before = out.read_bytes()
    r = CliRunner().invoke(app, ["export", "gguf", str(awq_stories), "-o", str(out)], env=ENV)
    assert r.exit_code == 2 and "--force" in r.output
    r = CliRunner().invoke(app, ["export", "gguf", str(awq_stories), "-o", str(out), "--type", "q5_k"], env=ENV)
    assert r.exit_code == 2 and "--type" in r.output
    assert out.read_bytes() == before
    with pytest.raises(OutputExistsError):
        export_gguf(awq_stories, tmp_path)  # a directory is not a file name
    with pytest.raises(InputError):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary siblings left
    assert export_gguf(awq_stories, out, force=True).path == out
    other = tmp_path / "model.onnx"  # a file that is not a GGUF: --force does not replace it
    other.write_bytes(b"not a gguf")
    with pytest.raises(OutputExistsError, match="exists and is not a GGUF file; refusing to replace it even with --force"):
        export_gguf(awq_stories, other, force=True)
    assert other.read_bytes() == b"not a gguf"


@pytest.mark.parametrize("damaged,needle", [("tokenizer.json", "tokenizer.json is not valid JSON"),
                                             ("tokenizer_config.json", "cannot read the tokenizer's special tokens")])
def test_damaged_tokenizer_is_one_line(awq_stories, damaged, needle, tmp_path):
    """A truncated tokenizer file is named in one line (exit 2), as generate and verify name it, and
    no GGUF is left behind."""
    src = tmp_path / "src"
    shutil.copytree(awq_stories, src)
    (src / damaged).write_text('{"version": ', encoding="utf-8")
    r = CliRunner().invoke(app, ["export", "gguf", str(src), "-o", str(tmp_path / "t.gguf")], env=ENV)
    assert r.exit_code == 2 and needle in r.output and "internal error" not in r.output, r.output
    assert not (tmp_path / "t.gguf").exists()


def test_nan_weights_are_refused_where_gguf_quantizes(tmp_path):
    """An fp source with a NaN in a weight: quantizing it to Q4_0 wrote NaN scales with numpy
    warnings and exit 0; now one line naming the GGUF tensor, and no file."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "nan"
    shutil.copytree(bundled_model_path(), src)
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    r = CliRunner().invoke(app, ["export", "gguf", str(src), "-o", str(tmp_path / "n.gguf"), "--type", "q4_0"], env=ENV)
    assert r.exit_code == 2, r.output
    # the conversion in between refuses it first, naming the source's tensor and layer
    assert "tensor 'model.layers.1.self_attn.q_proj.weight' (decoder layer 1, shape" in r.output and "NaN or Inf" in r.output
    assert not (tmp_path / "n.gguf").exists()
    # an engine that holds one all the same (damaged after it was written, read with --no-check): GGUF's own check
    from lmkiln.formats.safetensors_io import read_header

    eng = convert_hf_to_engine(bundled_model_path(), tmp_path / "e")
    f = eng / Engine(eng).manifest["tensors"]["layers.1.attention.w_qkv.0.weight"]["file"]
    info = read_header(f)[0]["layers.1.attention.w_qkv.0.weight"]
    with open(f, "r+b") as fh:
        fh.seek(info.begin)
        fh.write(torch.tensor([float("nan")], dtype=Engine(eng).dtype).view(torch.uint8).numpy().tobytes())
    r = CliRunner().invoke(app, ["export", "gguf", str(eng), "-o", str(tmp_path / "n.gguf"), "--type", "q4_0", "--no-check"],
                           env=ENV)
    assert r.exit_code == 2, r.output
    assert "blk.1.attn_q.weight (engine layer 1): weight of shape" in r.output and "NaN or Inf" in r.output, r.output
    assert not (tmp_path / "n.gguf").exists()


def test_unsupported_family_is_refused_before_converting(tmp_path, monkeypatch):
    """A family with no GGUF mapping given as an HF directory: refused from its config, naming the
    user's directory, before the conversion (minutes and a model-sized temporary for a big model)."""
    import lmkiln.convert.hf_to_engine as h2e

    hf = make_tiny_model(tmp_path / "gemma2", "Gemma2ForCausalLM", seed=1)
    monkeypatch.setattr(h2e, "convert_hf_to_engine", lambda *a, **k: pytest.fail("converted before refusing"))
    with pytest.raises(InputError, match=rf"^{hf}: GGUF export of Gemma2ForCausalLM is not supported yet") as e:
        export_gguf(hf, tmp_path / "g.gguf")
    assert "ONNX" not in str(e.value)  # ONNX export refuses Gemma too: not a way out to offer
    moe = make_tiny_model(tmp_path / "mixtral", "MixtralForCausalLM", seed=1)  # no GGUF mapping here, ONNX takes it
    with pytest.raises(InputError, match=r"use the AWQ-GEMM or compressed-tensors output, or export ONNX$"):
        export_gguf(moe, tmp_path / "m.gguf")
    assert not (tmp_path / "g.gguf").exists()


def test_non_silu_activation_is_refused(tmp_path):
    """A Llama with hidden_act gelu_pytorch_tanh (legal; the engine runs it) was written with exit 0 as a
    llama.cpp `llama`, which computes SiLU: a model that answers differently (top-1 0.81 against the source)."""
    hf = make_tiny_model(tmp_path / "gelu", "LlamaForCausalLM", seed=1, hidden_act="gelu_pytorch_tanh")
    with pytest.raises(InputError, match=r"hidden_act gelu_pytorch_tanh has no GGUF export \(llama.cpp's llama computes silu\)"):
        export_gguf(hf, tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()


def test_byte_level_bpe_tokenizer_becomes_a_gpt2_vocab(tmp_path):
    """Llama 3 / Qwen style tokenizers: tokens by id, merges, types, llama.cpp's pre-tokenizer name."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from lmkiln.formats.gguf import BPE_PRE, add_tokenizer

    llama3 = next(rx for rx, name in BPE_PRE.items() if name == "llama-bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([EVAL_TEXT.read_text(encoding="utf-8")[:20000]], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True,
         "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    summary = add_tokenizer(w, tmp_path, 512, {})
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    p = tmp_path / "t.gguf"
    assert (field(p, "tokenizer.ggml.model"), field(p, "tokenizer.ggml.pre")) == ("gpt2", "llama-bpe")
    vocab = tok.get_vocab()
    tokens = field(p, "tokenizer.ggml.tokens")
    assert len(tokens) == 512 and tokens[:len(vocab)] == sorted(vocab, key=vocab.get) and tokens[-1] == "[PAD511]"
    types = field(p, "tokenizer.ggml.token_type")
    assert types[vocab["<|end_of_text|>"]] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert types[vocab["a"]] == gguf.TokenType.NORMAL
    merges = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    assert len(field(p, "tokenizer.ggml.merges")) == len(merges) == summary["merges"] > 0
    assert field(p, "tokenizer.ggml.eos_token_id") == vocab["<|end_of_text|>"]
    assert field(p, "tokenizer.chat_template").startswith("{% for m in messages")
    assert summary["warnings"] == []
    # verify's id-by-id vocabulary check agrees with this byte-level vocabulary (and its [PAD] rows)
    from transformers import PreTrainedTokenizerFast

    from lmkiln.verify.verify import check_gguf_vocabulary

    check_gguf_vocabulary(p, PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json")))


def test_verify_refuses_a_gguf_whose_vocabulary_is_other_text(awq_stories, tmp_path):
    """Only the vocabulary size was compared: a GGUF whose token strings differ (llama.cpp would
    tokenize differently) passed verify. Now refused before any model runs, naming the id."""
    from lmkiln.verify.verify import VerifyOptions, run_verify

    gg = export_gguf(awq_stories, tmp_path / "m.gguf").path
    raw = gg.read_bytes()
    assert raw.count(b"<0x00>") == 1
    gg.write_bytes(raw.replace(b"<0x00>", b"<0xZZ>"))  # token 3's text, same length: the file stays valid
    with pytest.raises(InputError, match=r"m.gguf: its vocabulary names token 3 '<0xZZ>' where the reference's tokenizer "
                                         r"has '<0x00>'"):
        run_verify(STORIES, gg, VerifyOptions(data=EVAL_TEXT, max_tokens=64))


def test_tensor_parallel_int4_engine_exports_as_the_unsplit_one(tiny_llama, tmp_path):
    """With --tp 2 each rank's FFN share is padded to whole groups (FFN 96 -> 128 at group 32), which
    the merged w2 carried as real input width: `export gguf` ended in an internal error."""
    awq = tmp_path / "awq"
    quantize_model(tiny_llama, awq, QuantOptions(bits=4, group_size=32, method="rtn"), to="hf")
    e1, e2 = convert_hf_to_engine(awq, tmp_path / "e1"), convert_hf_to_engine(awq, tmp_path / "e2", tp=2)
    assert Engine(e2).model["inter_size_padded"] > Engine(e1).model["inter_size_padded"]  # the case: padding per rank
    one, two = export_gguf(e1, tmp_path / "1.gguf"), export_gguf(e2, tmp_path / "2.gguf")
    assert two.report["tensors"] == one.report["tensors"]
    a, b = gguf.GGUFReader(str(one.path)), gguf.GGUFReader(str(two.path))
    assert {t.name: t.data.tobytes() for t in a.tensors} == {t.name: t.data.tobytes() for t in b.tensors}


def test_disk_full_while_writing_is_one_line(awq_stories, tmp_path, monkeypatch):
    """numpy's tofile (inside the gguf package's writer) reports a short write as an OSError with no
    errno, "7680 requested and 0 written": it was an internal error, exit 3."""
    import lmkiln.formats.space as space

    def short_write(self, *a, **k):
        raise OSError("7680 requested and 0 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", short_write)
    real_free = space.free_bytes  # (the temporary engine converted from the AWQ directory has room)
    monkeypatch.setattr(space, "free_bytes", lambda p: 1000 if str(p).startswith(str(tmp_path)) else real_free(p))
    r = CliRunner().invoke(app, ["export", "gguf", str(awq_stories), "-o", str(tmp_path / "m.gguf")],
                           env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 2, r.output
    assert f"{tmp_path}: the disk is full (1000 B free" in r.output and "internal error" not in r.output
    assert list(tmp_path.iterdir()) == []  # no partial GGUF, no temporary


def test_inspect_describes_a_gguf_file(awq_stories, tmp_path):
    """`lmkiln inspect x.gguf` said "not a directory (pass the model directory that holds config.json)"."""
    res = export_gguf(awq_stories, tmp_path / "m.gguf")
    r = CliRunner().invoke(app, ["inspect", str(res.path)], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    assert "(GGUF file)" in r.output and "architecture (llama.cpp)" in r.output
    want = {t.tensor_type.name for t in gguf.GGUFReader(str(res.path)).tensors}
    assert all(f" {name}" in r.output for name in want)  # the tensor types it holds, counted
    assert f"--type {res.report['type']}" in r.output
