"""`lmkiln quantize` end to end on the bundled stories260K model: quality, the engine,
the AWQ-GEMM output layout, resume, and the command line.

stories260K (Llama, hidden 64, 5 layers, 8 heads / 4 kv heads, FFN 172, vocab 512,
context 512) is quantized once per configuration per session with a small calibration
budget (16 x 128 tokens of the bundled WikiText-2 excerpt). Quality is measured on
tests/fixtures/tinystories_eval.txt, in-domain text the model was trained for and that
calibration never sees.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import blake3
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from helpers import perplexity, torch_threads
from lmkiln.assets import bundled_model_path
from lmkiln.cli import app
from lmkiln.errors import InputError
from lmkiln.formats.awq_gemm import PACK
from lmkiln.formats.engine import MANIFEST
from lmkiln.formats.packing import unpack_awq_int4, unpack_int8
from lmkiln.quant.awq import QuantOptions
from lmkiln.quant.calib import build_calibration_samples, load_calibration_texts
from lmkiln.quant.dequant import fake_quant_state_dict
from lmkiln.quant.pipeline import REPORT, STOP_ENV, CalibOptions, quantize_model

STORIES = bundled_model_path()
EVAL_TEXT = Path(__file__).parent / "fixtures" / "tinystories_eval.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
PPL_SEQLEN = 511  # + BOS = the model's 512-token context

CALIB = CalibOptions(n_samples=16, seqlen=128)
W4 = QuantOptions(bits=4, group_size=32)
CONFIGS = {  # name -> (options, --to)
    "w4-awq": (W4, "hf"),
    "w4-awq-engine": (W4, "engine"),
    "w4-rtn": (QuantOptions(bits=4, group_size=32, method="rtn"), "hf"),
    "w8-awq": (QuantOptions(bits=8, group_size=64), "hf"),
}
# stories260K's linears, (out, in) in HF orientation
SHAPES = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (172, 64), "up": (172, 64), "down": (64, 172)}
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
N_LAYERS = 5


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def invoke(*args):
    with torch_threads(1):
        return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


@pytest.fixture(scope="session")
def quantized(tmp_path_factory):
    """name (see CONFIGS) -> output directory, each quantized once per session."""
    root = tmp_path_factory.mktemp("quantize")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            opts, to = CONFIGS[name]
            with torch_threads(1):
                res = quantize_model(STORIES, root / name, opts, CALIB, to=to)
            assert res.output == root / name
            cache[name] = res.output
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tok():
    from lmkiln.formats.tokenizer import load_tokenizer

    return load_tokenizer(STORIES)


@pytest.fixture(scope="session")
def eval_ids(tok):
    ids = tok(EVAL_TEXT.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    assert len(ids) > 15_000
    return torch.tensor(ids)


def hf_model(awq_dir: Path | None = None):
    """stories260K in transformers, fp32; with `awq_dir`, carrying its dequantized weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if awq_dir is None:
        return AutoModelForCausalLM.from_pretrained(str(STORIES), local_files_only=True, dtype=torch.float32).eval()
    cfg, sd = fake_quant_state_dict(awq_dir)
    assert "quantization_config" not in cfg
    # the output's own config: its intermediate_size is the padded width its tensors have
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32).eval()
    if awq_dir is not None:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert unexpected == [] and missing == ["lm_head.weight"], (missing, unexpected)  # tied to the embedding
    return model


@pytest.fixture(scope="session")
def ppl(quantized, eval_ids):
    """name ("fp32" or a CONFIGS name) -> perplexity on the TinyStories eval text."""
    cache: dict[str, float] = {}

    def get(name: str) -> float:
        if name not in cache:
            model = hf_model(None if name == "fp32" else quantized(name))
            with torch_threads(1), torch.no_grad():
                cache[name] = perplexity(lambda ids: model(ids).logits, eval_ids, PPL_SEQLEN, bos_id=1)
        return cache[name]

    return get


def load_report(out: Path) -> dict:
    return json.loads((out / REPORT).read_text())


def untimed(layers: list[dict]) -> list[dict]:
    """Per-layer report entries without their wall-clock seconds."""
    return [{k: v for k, v in lay.items() if k != "seconds"} for lay in layers]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# -- 1. quality ------------------------------------------------------------------------------


def test_perplexity_awq_beats_rtn(ppl):
    fp, rtn, awq = ppl("fp32"), ppl("w4-rtn"), ppl("w4-awq")
    print(f"\nperplexity fp32 {fp:.4f}  W4 g32 RTN {rtn:.4f}  W4 g32 AWQ {awq:.4f}")
    assert 5.0 < fp < 9.0  # stories260K on TinyStories
    assert fp < awq < rtn
    assert rtn < 1.5 * fp  # both still a working model


def test_perplexity_w8_within_half_percent(ppl):
    fp, w8 = ppl("fp32"), ppl("w8-awq")
    print(f"\nperplexity fp32 {fp:.4f}  W8 g128 AWQ {w8:.4f} ({100 * (w8 / fp - 1):+.3f}%)")
    assert abs(w8 / fp - 1) < 0.005


# -- 2. the engine runs exactly the fake-quantized model ----------------------------------------


def test_engine_matches_fake_quant_model(quantized, eval_ids, tok):
    from lmkiln.runtime.engine_model import EngineModel
    from lmkiln.runtime.generate import greedy_generate
    from lmkiln.runtime.session import generate_text

    engine = quantized("w4-awq-engine")
    ref = hf_model(quantized("w4-awq"))
    model = EngineModel.from_path(engine, check=True)

    ids = torch.cat([torch.tensor([1]), eval_ids[:300]])[None]
    with torch.no_grad():
        want = ref(ids).logits
    got = model(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4, float((got - want).abs().max())

    prompts = ["Once upon a time", "Lily and Ben went to the park. They saw"]
    texts = generate_text(engine, prompts, 40)
    for prompt, text in zip(prompts, texts):
        p = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            full = ref.generate(p, do_sample=False, max_new_tokens=40, pad_token_id=0)[0]
        new_hf = full[p.shape[1]:].tolist()
        (new_engine,) = greedy_generate(model, [p[0].tolist()], 40, model.config["eos_token_id"])
        assert new_engine == new_hf
        expected = tok.decode(full.tolist(), skip_special_tokens=True)[len(tok.decode(p[0].tolist(), skip_special_tokens=True)):]
        assert text == expected
        assert len(text.split()) >= 5


# -- 3. output layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, bits, group", [("w4-awq", 4, 32), ("w8-awq", 8, 64)])
def test_hf_output_layout(quantized, name, bits, group):
    out = quantized(name)
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((STORIES / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    inter_p = round_up(172, group)  # FFN 172 is a multiple of neither 32 nor 64: zero-padded to whole groups
    assert cfg == {**src_cfg, "intermediate_size": inter_p}
    assert qc["quant_method"] == "awq"
    assert qc["bits"] == bits and qc["group_size"] == group and qc["zero_point"] is True
    assert qc["version"] == ("gemm" if bits == 4 else "lmkiln-gemm-int8")
    assert "lmkiln_padded" not in qc  # the shapes are the standard ones for the config
    assert qc["lmkiln_method"] == "awq"
    assert load_report(out)["padding"]["intermediate_size"] == {
        "source": 172, "written": inter_p, "why": "zero rows/columns: whole groups, exact for gated MLPs"}

    for name_ in TOKENIZER_FILES:
        assert (out / name_).read_bytes() == (STORIES / name_).read_bytes(), name_

    t = tensors(out)
    per_word = PACK[bits]
    expected_keys = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}"
        expected_keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        for role, (o, n) in SHAPES.items():
            m = f"{p}.{MODULES[role]}"
            expected_keys |= {f"{m}.qweight", f"{m}.qzeros", f"{m}.scales"}
            i_p = round_up(n, group)
            o_p = inter_p if role in ("gate", "up") else round_up(o, per_word)
            assert t[f"{m}.qweight"].dtype == torch.int32 and t[f"{m}.qweight"].shape == (i_p, o_p // per_word)
            assert t[f"{m}.qzeros"].dtype == torch.int32 and t[f"{m}.qzeros"].shape == (i_p // group, o_p // per_word)
            assert t[f"{m}.scales"].dtype == torch.float16 and t[f"{m}.scales"].shape == (i_p // group, o_p)
            unpack = unpack_awq_int4 if bits == 4 else unpack_int8
            codes = unpack(t[f"{m}.qweight"])
            assert int(codes.max()) <= 2**bits - 1
            # Padding is inert: padded input rows hold zero weights, padded output columns zero scales.
            scales = t[f"{m}.scales"].float()
            assert (scales[:, :o] > 0).all() and (scales[:, o:] == 0).all()
    assert set(t) == expected_keys  # no fp linear weights, no lm_head (tied)
    with safe_open(str(STORIES / "model.safetensors"), framework="pt") as src:
        for k in ("model.embed_tokens.weight", "model.norm.weight"):
            assert torch.equal(t[k], src.get_tensor(k))
    assert all(v.dtype == torch.float32 for k, v in t.items() if k.endswith(".weight"))


def test_report(quantized):
    rep = load_report(quantized("w4-awq"))
    assert rep["method"] == "awq" and rep["options"]["bits"] == 4 and rep["options"]["group_size"] == 32
    assert rep["calibration"]["source"] == "bundled:wikitext2_valid_excerpt"
    assert (rep["calibration"]["samples"], rep["calibration"]["seqlen"], rep["calibration"]["tokens"]) == (16, 128, 2048)
    assert [lay["layer"] for lay in rep["layers"]] == list(range(N_LAYERS))
    total_rtn = total_final = 0.0
    for lay in rep["layers"]:
        assert lay["seconds"] >= 0
        groups = {g["prev"]: g for g in lay["groups"]}
        assert set(groups) == {"attn_norm", "v", "ffn_norm", "up"}
        assert "skipped" in groups["v"]  # GQA: 8 query heads share 4 kv heads
        for prev in ("attn_norm", "ffn_norm", "up"):
            g = groups[prev]
            assert 0 <= g["alpha"] < 1
            assert g["mse_rtn"] > 0 and g["mse_final"] > 0
            total_rtn += g["mse_rtn"]
            total_final += g["mse_final"]
        assert set(lay["linears"]) == set(SHAPES)
        assert lay["linears"]["q"]["clip"] is None and lay["linears"]["k"]["clip"] is None
        for role in ("v", "o", "gate", "up", "down"):
            assert 0.5 <= lay["linears"][role]["clip"] <= 1.0
    assert total_final < 0.9 * total_rtn
    tot = rep["totals"]
    assert tot["seconds"] > 0 and tot["peak_rss_mb"] > 0 and tot["calibration_tokens"] == 2048
    assert len(tot["seconds_per_layer"]) == N_LAYERS

    rtn = load_report(quantized("w4-rtn"))
    assert rtn["calibration"] is None and rtn["totals"]["calibration_tokens"] == 0
    assert all(lay["groups"] == [] and lay["linears"] == {} for lay in rtn["layers"])


def test_engine_equals_converted_hf_output(quantized, tmp_path):
    hf, engine = quantized("w4-awq"), quantized("w4-awq-engine")
    r = invoke("convert", "hf-to-engine", hf, "-o", tmp_path / "conv")
    assert r.exit_code == 0, r.output
    a = json.loads((engine / MANIFEST).read_text())
    b = json.loads((tmp_path / "conv" / MANIFEST).read_text())
    assert a["files"] == b["files"]
    assert a["weight_type"] == "int4" and a["quantization"]["method"] == "awq"
    for f, meta in a["files"].items():
        assert sha256(engine / f) == sha256(tmp_path / "conv" / f)
        assert meta["blake3"] == blake3.blake3((engine / f).read_bytes()).hexdigest()
    # Identical but for the source: the streamed engine names the fp checkpoint it came
    # from, the converted one the AWQ-GEMM directory in between (and the layout it read).
    from lmkiln.formats.engine import config_sha256

    assert a["source"].pop("config_sha256") == config_sha256(json.loads((STORIES / "config.json").read_text()))
    assert b["source"].pop("config_sha256") == config_sha256(json.loads((hf / "config.json").read_text()))
    # the AWQ-GEMM's config.json states the FFN width it stores (172 zero-padded to 192); both engines record
    # the source's, with the same padded width
    assert (a["model"]["inter_size"], a["model"]["inter_size_padded"]) == (172, 192)
    assert a["quantization"].pop("source_layout") is None and b["quantization"].pop("source_layout") == "awq-gemm"
    assert a == b
    assert untimed(load_report(engine)["layers"]) == untimed(load_report(hf)["layers"])  # the report travels with the engine
    assert not any(p.name.endswith(".lmkiln-partial") for p in engine.parent.iterdir())


# -- 4. resume -------------------------------------------------------------------------------------


def test_resume_is_bit_identical(quantized, tmp_path, monkeypatch):
    ref = quantized("w4-awq")
    out = tmp_path / "resumed"
    partial = tmp_path / ".resumed.lmkiln-partial"
    monkeypatch.setenv(STOP_ENV, "2")
    with pytest.raises(KeyboardInterrupt):
        quantize_model(STORIES, out, W4, CALIB)
    assert not out.exists()
    assert sorted(p.name for p in (partial / "state").glob("layer*.safetensors")) == [f"layer{i}.safetensors" for i in range(3)]

    monkeypatch.delenv(STOP_ENV)
    seen, info = [], []
    res = quantize_model(STORIES, out, W4, CALIB, resume=True, on_layer=lambda i, n, rep: seen.append(i), on_info=info.append)
    assert seen == [3, 4]
    assert any("resuming after 3 finished layer(s)" in m for m in info), info
    assert not partial.exists()
    assert [lay["layer"] for lay in res.report["layers"]] == list(range(N_LAYERS))

    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    assert sha256(out / "model.safetensors") == sha256(ref / "model.safetensors")
    for n in names:
        if n != REPORT:  # the report holds timings
            assert (out / n).read_bytes() == (ref / n).read_bytes(), n
    assert untimed(load_report(out)["layers"]) == untimed(load_report(ref)["layers"])


def test_resume_after_interrupt_while_saving_a_layer(tmp_path, monkeypatch):
    import lmkiln.quant.state as state

    small = CalibOptions(n_samples=4, seqlen=64)
    ref = quantize_model(STORIES, tmp_path / "ref", W4, small).output
    save = state._atomic_save

    def interrupted_save(tensors, path):
        if path.name == "layer2.safetensors":
            raise KeyboardInterrupt("Ctrl-C while layer 2 is being saved")
        return save(tensors, path)

    monkeypatch.setattr(state, "_atomic_save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(STORIES, tmp_path / "out", W4, small)
    monkeypatch.setattr(state, "_atomic_save", save)
    out = quantize_model(STORIES, tmp_path / "out", W4, small, resume=True).output
    assert sha256(out / "model.safetensors") == sha256(ref / "model.safetensors")


@pytest.mark.parametrize("damage,flip", [("layer0.safetensors", False), ("layer1.json", False), ("hidden1.pt", False),
                                         ("layer0.safetensors", True), ("hidden1.pt", True)])
def test_resume_from_damaged_state_is_one_line(damage, flip, tmp_path, monkeypatch):
    """A state file cut short (a disk fault; every state file is now fsynced before its rename, so a
    power loss should not do it) is named in one line with the way out, not an internal error. A
    flipped byte, which loaded fine and gave other output, fails its blake3 the same way."""
    small = CalibOptions(n_samples=4, seqlen=64)
    out = tmp_path / "q"
    monkeypatch.setenv(STOP_ENV, "1")
    with pytest.raises(KeyboardInterrupt):
        quantize_model(STORIES, out, W4, small)
    monkeypatch.delenv(STOP_ENV)
    f = tmp_path / ".q.lmkiln-partial" / "state" / damage
    if flip:
        raw = bytearray(f.read_bytes())
        raw[-10] ^= 0x01  # inside the last tensor's data: the file still parses
        f.write_bytes(bytes(raw))
    else:
        f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(InputError, match=r"the resume state of (layer \d|the input of layer 2) is damaged .*"
                                         r"run with --force instead of --resume to start over") as e:
        quantize_model(STORIES, out, W4, small, resume=True)
    assert "\n" not in str(e.value)
    assert quantize_model(STORIES, out, W4, small, force=True).output == out  # and starting over works


def test_resume_refuses_changed_options_or_calibration(tmp_path, monkeypatch):
    small = CalibOptions(n_samples=4, seqlen=64)
    out = tmp_path / "q"
    partial = tmp_path / ".q.lmkiln-partial"
    monkeypatch.setenv(STOP_ENV, "0")
    with pytest.raises(KeyboardInterrupt):
        quantize_model(STORIES, out, W4, small)
    monkeypatch.delenv(STOP_ENV)
    assert (partial / "state" / "layer0.safetensors").exists()
    before = sorted(str(p.relative_to(partial)) for p in partial.rglob("*"))

    with pytest.raises(InputError, match=r"the options\.group_size changed"):  # names the option
        quantize_model(STORIES, out, QuantOptions(bits=4, group_size=64), small, resume=True)
    with pytest.raises(InputError, match=r"the options\.symmetric changed"):
        quantize_model(STORIES, out, QuantOptions(bits=4, group_size=32, symmetric=True), small, resume=True)
    with pytest.raises(InputError, match=r"the output format \(--to\) changed"):  # its files were in the partial output
        quantize_model(STORIES, out, W4, small, to="engine", resume=True)
    with pytest.raises(InputError, match="calibration"):
        quantize_model(STORIES, out, W4, CalibOptions(n_samples=4, seqlen=64, seed=1), resume=True)
    with pytest.raises(InputError, match="calibration"):
        quantize_model(STORIES, out, W4, CalibOptions(n_samples=4, seqlen=32), resume=True)
    assert sorted(str(p.relative_to(partial)) for p in partial.rglob("*")) == before  # untouched
    assert not out.exists()

    # A plain re-run (after a SIGKILL nothing says "--resume") keeps the finished layers and says how to go on;
    # --force discards them and redoes the whole model.
    with pytest.raises(InputError, match=r"interrupted after 1 finished layer\(s\); pass --resume to continue after them, "
                                         r"or --force to discard them and start over"):
        quantize_model(STORIES, out, W4, small)
    assert sorted(str(p.relative_to(partial)) for p in partial.rglob("*")) == before
    seen, said = [], []
    quantize_model(STORIES, out, W4, small, force=True, on_layer=lambda i, n, rep: seen.append(i), on_info=said.append)
    assert seen == list(range(N_LAYERS)) and "discarded the 1 finished layer(s) of an earlier, interrupted run (--force)" in said
    assert out.is_dir() and not partial.exists()


RTN4 = QuantOptions(bits=4, group_size=32, method="rtn")


def test_a_state_killed_before_its_first_layer_starts_over(tmp_path, monkeypatch):
    """A disk-full (or quota) writing the fingerprint, the state's first file, was an internal error, and
    the state it left (no fingerprint, no layer) blocked every --resume: "no readable fingerprint"."""
    import errno

    import lmkiln.quant.state as state_mod
    from lmkiln.errors import DiskFullError

    out, partial = tmp_path / "q", tmp_path / ".q.lmkiln-partial"
    real = state_mod._atomic_write_text

    def full(path, text):
        if path.name == "fingerprint.json":
            path.with_suffix(".tmp").write_text(text[:5])  # what a short write leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(path.with_suffix(".tmp")))
        real(path, text)

    monkeypatch.setattr(state_mod, "_atomic_write_text", full)
    with pytest.raises(DiskFullError, match=rf"^{tmp_path}: the disk is full"):
        quantize_model(STORIES, out, RTN4)
    assert partial.exists() and not (partial / "state" / "fingerprint.json").exists()
    monkeypatch.setattr(state_mod, "_atomic_write_text", real)
    said = []
    assert quantize_model(STORIES, out, RTN4, resume=True, on_info=said.append).output == out
    assert "the partial run had finished no layer; starting from the first layer" in said and not partial.exists()


def test_a_state_left_beside_a_complete_output_is_swept(tmp_path):
    """SIGKILL after the rename, while the resume state was being removed: the state (about the output's
    size) and the lock stayed for good; every later run only said "already exists"."""
    from lmkiln.errors import OutputExistsError

    out, partial = tmp_path / "q", tmp_path / ".q.lmkiln-partial"
    quantize_model(STORIES, out, RTN4)
    (partial / "state").mkdir(parents=True)  # what the killed removal had not reached
    for name in ("fingerprint.json", "layer0.safetensors", "layer0.json"):
        (partial / "state" / name).write_text("{}")
    (tmp_path / ".q.lmkiln-lock").write_text("")
    said = []
    with pytest.raises(OutputExistsError, match="already exists"):
        quantize_model(STORIES, out, RTN4, on_info=said.append)
    assert not partial.exists() and not (tmp_path / ".q.lmkiln-lock").exists()
    assert said == [f"removed {partial.name}: the resume state of an earlier run whose output is complete"]


def test_resume_refuses_a_weight_file_edited_in_place(tmp_path, monkeypatch):
    """An edit between the fingerprint's sampled spans resumed, mixing old and new layers: each weight
    file's modification time is part of the fingerprint too."""
    import os
    import shutil

    model = tmp_path / "m"
    shutil.copytree(STORIES, model)
    monkeypatch.setenv(STOP_ENV, "0")
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, tmp_path / "q", RTN4)
    monkeypatch.delenv(STOP_ENV)
    w = model / "model.safetensors"
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes where sampled, written since
    with pytest.raises(InputError, match=r"the model files\.model\.safetensors changed since it started"):
        quantize_model(model, tmp_path / "q", RTN4, resume=True)


# -- 5-7. the command line ---------------------------------------------------------------------------


def assert_cli_error(result, *needles):
    """Exit 2, no traceback, nothing on stdout, and the error in stderr's last line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout.strip() == ""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), result.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines


def test_cli_quantize_with_report(tmp_path):
    out, rpath = tmp_path / "out", tmp_path / "R.json"
    r = invoke("quantize", STORIES, "-o", out, "--w4a16", "--group-size", "32", "--calib-samples", "8", "--calib-seqlen", "64",
               "--report", rpath)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    assert f"wrote {out}" in r.stdout
    assert "AWQ W4 g32" in r.stdout
    assert rpath.is_file()
    rep, inside = json.loads(rpath.read_text()), load_report(out)
    assert set(rep) == set(inside)
    assert set(rep["totals"]) == set(inside["totals"])
    for k in ("method", "options", "calibration", "source"):
        assert rep[k] == inside[k], k
    assert untimed(rep["layers"]) == untimed(inside["layers"])
    assert rep["calibration"]["tokens"] == 512 and rep["totals"]["calibration_tokens"] == 512
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32


def test_cli_quantize_rtn_needs_no_calibration(quantized, tmp_path):
    out = tmp_path / "rtn"
    r = invoke("quantize", STORIES, "-o", out, "--w4a16", "--method", "rtn", "--group-size", "32")
    assert r.exit_code == 0, r.output
    assert "calibration" not in r.stderr
    rep = load_report(out)
    assert rep["method"] == "rtn" and rep["calibration"] is None
    assert sha256(out / "model.safetensors") == sha256(quantized("w4-rtn") / "model.safetensors")  # same as the Python API


def test_cli_quantize_interrupt_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["quantize", STORIES, "-o", out, "--w4a16", "--group-size", "32", "--calib-samples", "8", "--calib-seqlen", "64"]
    monkeypatch.setenv(STOP_ENV, "1")
    r = invoke(*args)
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.stderr and "Traceback" not in r.output
    assert not out.exists() and (tmp_path / ".out.lmkiln-partial").is_dir()
    monkeypatch.delenv(STOP_ENV)
    r = invoke(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming after 2 finished layer(s)" in r.stderr
    assert [lay["layer"] for lay in load_report(out)["layers"]] == list(range(N_LAYERS))
    assert not (tmp_path / ".out.lmkiln-partial").exists()


@pytest.fixture(scope="module")
def bad_calib(tmp_path_factory):
    d = tmp_path_factory.mktemp("badcalib")
    (d / "empty.txt").write_text("")
    (d / "tiny.txt").write_text("Once upon a time there was a cat.\n")
    (d / "existing").mkdir()
    return d


# case id -> (args after MODEL, expected substrings of the error line, one line today)
CLI_ERRORS = {
    "both-widths": (["--w4a16", "--w8a16"], ["--w4a16", "--w8a16"], True),
    "no-width": ([], ["--w4a16", "--w8a16"], True),
    "output-exists": (["--w4a16", "-o", "{d}/existing"], ["already exists", "--force"], False),
    "missing-model": (["--w4a16", "MODEL={d}/no-such-model"], ["no-such-model"], False),
    "calib-missing": (["--w4a16", "--group-size", "32", "--calib", "{d}/missing.txt"], ["missing.txt", "does not exist"], False),
    "calib-empty": (["--w4a16", "--group-size", "32", "--calib", "{d}/empty.txt"], ["empty.txt", "no text"], False),
    "calib-too-small": (["--w4a16", "--group-size", "32", "--calib", "{d}/tiny.txt", "--calib-seqlen", "64"], ["too small"], False),
    "seqlen-over-context": (["--w4a16", "--group-size", "32", "--calib-seqlen", "1024"], ["1024", "512"], False),
    "already-quantized": (["--w4a16", "MODEL=AWQ"], ["already quantized"], False),
    "already-quantized-rtn": (["--w8a16", "--method", "rtn", "MODEL=AWQ"], ["already quantized"], False),
    "bad-to": (["--w4a16", "--to", "gguf"], ["gguf", "hf, engine, compressed-tensors"], False),
    "bad-method": (["--w4a16", "--method", "squeezellm"], ["squeezellm", "awq, rtn, gptq, awq+gptq"], False),
}


def _error_args(case, d: Path, awq: Path, out: Path):
    args, needles, _ = CLI_ERRORS[case]
    model, rest, has_o = STORIES, [], False
    for a in args:
        if a.startswith("MODEL="):
            v = a[len("MODEL="):]
            model = awq if v == "AWQ" else Path(v.format(d=d))
        else:
            rest.append(a.format(d=d))
            has_o |= a == "-o"
    return ["quantize", model, *([] if has_o else ["-o", out]), *rest], needles


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_quantize_errors(case, bad_calib, quantized, tmp_path):
    args, needles = _error_args(case, bad_calib, quantized("w4-rtn"), tmp_path / "out")
    r = invoke(*args)
    assert_cli_error(r, *needles)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.lmkiln-partial").exists()  # nothing left behind


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_quantize_error_is_one_line(case, bad_calib, quantized, tmp_path):
    args, _ = _error_args(case, bad_calib, quantized("w4-rtn"), tmp_path / "out")
    lines = assert_cli_error(invoke(*args))
    assert len(lines) == 1, lines


def _story_paragraphs() -> list[str]:
    return [p.strip() for p in EVAL_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def _calib_sha(path: Path, n: int, seqlen: int, tok) -> str:
    return build_calibration_samples(load_calibration_texts(path), lambda s: tok(s, add_special_tokens=False).input_ids,
                                     n, seqlen, 0).sha256


@pytest.mark.parametrize("kind", ["jsonl", "dir"])
def test_cli_quantize_custom_calibration(kind, tmp_path, tok):
    paras = _story_paragraphs()
    assert len(paras) > 40
    if kind == "jsonl":
        calib = tmp_path / "calib.jsonl"
        calib.write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paras[:40])))
    else:
        calib = tmp_path / "calib"
        (calib / "sub").mkdir(parents=True)
        (calib / "a.txt").write_text("\n\n".join(paras[:20]) + "\n")
        (calib / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[20:40]))
        (calib / "ignored.md").write_text("not calibration text " * 10)
        assert len(load_calibration_texts(calib)) == 40
    out = tmp_path / "out"
    r = invoke("quantize", STORIES, "-o", out, "--w4a16", "--group-size", "32", "--calib", calib,
               "--calib-samples", "8", "--calib-seqlen", "64")
    assert r.exit_code == 0, r.output
    c = load_report(out)["calibration"]
    assert c["source"] == str(calib)
    assert (c["samples"], c["seqlen"], c["tokens"]) == (8, 64, 512)
    assert c["documents"] > 1
    assert c["sha256"] == _calib_sha(calib, 8, 64, tok)  # the windows really came from these files
    assert c["sha256"] != _calib_sha(None, 8, 64, tok)


def test_cli_quantize_symmetric(tmp_path):
    out = tmp_path / "sym"
    r = invoke("quantize", STORIES, "-o", out, "--w4a16", "--sym", "--group-size", "32", "--calib-samples", "8",
               "--calib-seqlen", "64")
    assert r.exit_code == 0, r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["zero_point"] is False and qc["bits"] == 4 and qc["version"] == "gemm"
    t = tensors(out)
    n = 0
    for k, v in t.items():
        if not k.endswith(".qzeros"):
            continue
        m = k[: -len(".qzeros")]
        o = SHAPES[next(r for r, mod in MODULES.items() if m.endswith(mod))][0]
        zeros = unpack_awq_int4(v)
        assert (zeros[:, :o] == 8).all(), k  # every real output column: the fixed zero point 8
        assert (t[m + ".scales"][:, o:] == 0).all()  # output padding (172 -> 176) carries scale 0
        codes = unpack_awq_int4(t[m + ".qweight"])[:, :o]
        assert int(codes.min()) >= 1  # symmetric codes never use 0
        n += 1
    assert n == N_LAYERS * len(SHAPES)


def test_calibration_ids_outside_the_vocabulary(tmp_path):
    """A tokenizer with ids past the model's embedding (one that does not belong to it): the
    calibration text that reaches them is refused in one line before any layer (was an
    IndexError mid-run, exit 3, and a partial directory on every try)."""
    import json
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(STORIES, src)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["added_tokens"].append({"id": 700, "content": "zorb", "single_word": False, "lstrip": False, "rstrip": False,
                               "normalized": False, "special": False})
    (src / "tokenizer.json").write_text(json.dumps(tj))
    text = tmp_path / "cal.txt"
    text.write_text("Once upon a time zorb there was a cat. " * 40)
    with pytest.raises(InputError, match=r"calibration text tokenizes to id \d+, outside the model's vocabulary \(512 ids\)"):
        quantize_model(src, tmp_path / "q", W4, CalibOptions(path=text, n_samples=2, seqlen=64))
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.lmkiln-partial").exists()


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.norm.weight"])
def test_nan_outside_the_decoder_layers(name, tmp_path):
    """NaN in the embedding or the final norm went into the output with exit 0 (the layer jobs
    check only their own tensors): refused before any layer runs, naming the tensor."""
    import shutil

    from helpers import replace_tensor
    from safetensors.torch import load_file

    src = tmp_path / "hf"
    shutil.copytree(STORIES, src)
    t = load_file(str(src / "model.safetensors"))[name].clone()
    t.view(-1)[3] = float("nan")
    replace_tensor(src / "model.safetensors", name, t)
    with pytest.raises(InputError, match=rf"tensor '{name}' \(shape .*\) contains NaN or Inf"):
        quantize_model(src, tmp_path / "q", W4, CalibOptions(n_samples=2, seqlen=64))


def test_cli_notes_options_the_method_does_not_read(tmp_path):
    """`--method rtn --act-order --damp 0.5` ran with exit 0 and no word (--calib alone had a note)."""
    base = ["quantize", str(STORIES), "--w4a16", "--group-size", "32", "--dry-run", "-o", str(tmp_path / "q")]
    env = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    r = CliRunner().invoke(app, base + ["--method", "rtn", "--act-order", "--damp", "0.5", "--no-clip", "--calib-samples", "3"], env=env)
    assert r.exit_code == 0, r.output
    assert "note --no-clip, --damp, --act-order, --calib-samples are not used by --method rtn" in r.stderr
    r = CliRunner().invoke(app, base + ["--method", "gptq", "--no-clip", "--calib-samples", "16", "--calib-seqlen", "64"], env=env)
    assert r.exit_code == 0 and "note --no-clip is not used by --method gptq" in r.stderr
    r = CliRunner().invoke(app, base + ["--method", "awq+gptq", "--no-clip", "--act-order", "--calib-samples", "16", "--calib-seqlen", "64"],
                           env=env)
    assert r.exit_code == 0 and "not used" not in r.stderr


def test_padding_is_not_counted_and_the_report_follows_the_conversion(tmp_path):
    """An AWQ-GEMM output stores the FFN width padded to whole groups (172 -> 192 here): inspect counted
    the zero rows as parameters (279,232 for 260,032), and converting it to an engine dropped the report,
    so verify's warning about evaluating on calibration text went silent for the engine."""
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.inspect_model import describe
    from lmkiln.verify.verify import _calibration_shingles

    awq = quantize_model(STORIES, tmp_path / "awq", W4, CalibOptions(n_samples=4, seqlen=64)).output
    eng = convert_hf_to_engine(awq, tmp_path / "eng")
    rows = {p: dict(describe(p)[1]) for p in (STORIES, awq, eng)}
    assert rows[STORIES]["ffn width"] == "172"
    assert rows[awq]["ffn width"] == "172 (stored zero-padded to 192)"
    assert rows[eng]["ffn width"] == "172" and "ffn to 192" in rows[eng]["quantization"]  # as the engine quantized straight
    assert rows[STORIES]["parameters"] == rows[awq]["parameters"] == rows[eng]["parameters"] == "260,032"
    assert _calibration_shingles(eng) == _calibration_shingles(awq) != []


def test_layers_finished_out_of_order_are_kept_too(tmp_path):
    """A --ray run finishes layers out of order: one whose layer 0 never finished still holds work."""
    from lmkiln.quant.state import ResumeState

    partial = tmp_path / ".q.lmkiln-partial"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "layer2.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match=r"interrupted after 1 finished layer\(s\); pass --resume"):
        ResumeState(partial, {"model": "m"}, resume=False)
    assert (partial / "state" / "layer2.safetensors").exists()
