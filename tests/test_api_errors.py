"""User errors through the Python API (README: generate_text, EngineModel, quantize_model,
run_verify) and the CLI paths that share their checks: each is one lmkiln.errors line,
refused before the work it would spoil (a model load, calibration, the reference's pass),
never a TypeError/IndexError from deep inside or silently wrong output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import copy_tree, edit_json, make_tiny_model, torch_threads
from lmkiln.cli import app
from lmkiln.errors import InputError, LmkilnError
from lmkiln.quant.awq import QuantOptions
from lmkiln.quant.pipeline import CalibOptions, finished_layers, partial_dir, quantize_model
from lmkiln.runtime.engine_model import EngineModel
from lmkiln.runtime.generate import greedy_generate
from lmkiln.runtime.session import generate_text
from lmkiln.verify import verify as verify_mod
from lmkiln.verify.verify import VerifyOptions, check_options, run_verify

ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
RTN = QuantOptions(bits=4, group_size=32, method="rtn")  # no calibration: the quickest real quantize
QUICK = VerifyOptions(max_tokens=256, seqlen=32, max_new_tokens=2)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def one_line_error(r, *parts):
    """The CLI refused in one `error:` line holding `parts` (exit 2, not an internal error)."""
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.output
    for p in parts:
        assert p in lines[0], r.output
    return lines[0]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def no_bos_qwen(tmp_path_factory):
    """A tiny Qwen2 whose tokenizer adds no BOS (as every Qwen tokenizer): "" has no tokens."""
    d = make_tiny_model(tmp_path_factory.mktemp("qwen") / "q", "Qwen2ForCausalLM")
    edit_json(d / "tokenizer_config.json", lambda c: c.update(add_bos_token=False))
    edit_json(d / "tokenizer.json", lambda c: c.update(post_processor=None))
    return d


@pytest.fixture(scope="module")
def no_bos_engine(no_bos_qwen, tmp_path_factory):
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    return convert_hf_to_engine(no_bos_qwen, tmp_path_factory.mktemp("qwen-eng") / "e")


@pytest.fixture(scope="module")
def mixtral_awq(tmp_path_factory):
    """An MoE AWQ-GEMM directory (as `lmkiln quantize hf_mixtral -o qa --w4a16`), by RTN for speed."""
    root = tmp_path_factory.mktemp("mixtral")
    hf = make_tiny_model(root / "hf", "MixtralForCausalLM")
    with torch_threads(1):
        return quantize_model(hf, root / "qa", RTN, device="cpu").output


def no_load(monkeypatch):
    """Make loading either model a test failure: what is checked must be refused before it."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the refusal")
    monkeypatch.setattr(verify_mod, "open_runner", refuse)


# -- 1: a prompt with no tokens (tokenizer without BOS) -----------------------------------

@pytest.mark.parametrize("which", ["hf", "engine"])
def test_generate_empty_prompt_without_bos_names_the_prompt(which, no_bos_qwen, no_bos_engine):
    src = no_bos_qwen if which == "hf" else no_bos_engine
    r = invoke("generate", src, "-p", "Once", "-p", "", "-n", "3")
    one_line_error(r, "prompt 2 (-p '')", "empty after tokenization")


def test_verify_prompt_line_empty_after_tokenization_names_its_line(no_bos_qwen, no_bos_engine, tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"hello there\n\n\xc2\xad\n")  # line 3: a lone soft hyphen, which the tokenizer drops
    r = invoke("verify", no_bos_qwen, no_bos_engine, "--prompts", prompts, "--max-tokens", "256", "--seqlen", "32")
    one_line_error(r, f"line 3 of {prompts}", "empty after tokenization")
    no_load(monkeypatch)  # and refused before either model is loaded
    with pytest.raises(InputError, match="line 3"):
        run_verify(no_bos_qwen, no_bos_engine, VerifyOptions(prompts=prompts, max_tokens=256, seqlen=32))


def test_greedy_generate_refuses_empty_prompt_and_no_prompts(tiny_engine):
    model = EngineModel.from_path(tiny_engine)
    with pytest.raises(InputError, match="empty after tokenization"):
        greedy_generate(model, [[5, 6], []], 2)
    with pytest.raises(InputError, match="no prompts"):
        greedy_generate(model, [], 2)


# -- 2: verify refuses a bad candidate before the reference runs ---------------------------

def test_verify_compressed_tensors_candidate_refused_before_loading(tiny_llama, tmp_path, monkeypatch):
    ct = copy_tree(tiny_llama, tmp_path / "ct")
    edit_json(ct / "config.json", lambda c: c.update(quantization_config={"quant_method": "compressed-tensors", "format": "pack-quantized"}))
    no_load(monkeypatch)
    with pytest.raises(LmkilnError) as e:
        run_verify(tiny_llama, ct, QUICK)
    assert str(e.value).startswith(f"{ct}: ") and "compressed-tensors" in str(e.value)


def test_verify_candidate_without_weights_refused_before_loading(tiny_llama, tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_llama.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, bare / f.name)
    no_load(monkeypatch)
    with pytest.raises(InputError, match="no model weights") as e:
        run_verify(tiny_llama, bare, QUICK)
    assert str(e.value).startswith(str(bare))


def test_verify_moe_awq_candidate_with_transformers_runner_refused_before_loading(tiny_llama, mixtral_awq, monkeypatch):
    no_load(monkeypatch)
    with pytest.raises(InputError, match="--runner auto") as e:
        run_verify(tiny_llama, mixtral_awq, VerifyOptions(max_tokens=256, seqlen=32, runner="transformers"))
    assert str(e.value).startswith(str(mixtral_awq)) and "\n" not in str(e.value)


# -- 3: an MoE AWQ-GEMM reference runs on the torch engine --------------------------------

def test_verify_moe_awq_reference_runs_on_the_engine(mixtral_awq, tmp_path):
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    engine = convert_hf_to_engine(mixtral_awq, tmp_path / "qa.engine")
    res = run_verify(mixtral_awq, engine, VerifyOptions(max_tokens=256, seqlen=32, max_new_tokens=4))
    assert res.report["runners"]["reference"].startswith("torch-engine@")
    # the same int4 weights on both sides: the same model
    assert res.passed and res.report["top1_agreement"] == 1.0 and res.report["greedy_match"]


# -- 4: the Python API's argument checks --------------------------------------------------

def test_generate_text_takes_one_str_as_one_prompt(tiny_engine):
    one = generate_text(tiny_engine, "Once upon", 3)
    assert isinstance(one, str)
    assert one == generate_text(tiny_engine, ["Once upon"], 3)[0]


@pytest.mark.parametrize("prompts, n, match", [
    ([], 3, "no prompts"),
    (["Once"], -1, "max_new_tokens -1"),
    (["Once"], 0, "max_new_tokens 0"),
    (["Once"], "3", "max_new_tokens '3'"),
    (["Once"], True, "max_new_tokens True"),
    ([None], 3, "prompt 1 is a NoneType"),
    (["Once", 7], 3, "prompt 2 is a int"),
    (b"Once", 3, "not bytes"),
])
def test_generate_text_refuses_bad_arguments(tiny_engine, prompts, n, match):
    with pytest.raises(InputError, match=match) as e:
        generate_text(tiny_engine, prompts, n)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float64, "int8"])
def test_engine_model_refuses_non_compute_dtypes(tiny_engine, dtype):
    with pytest.raises(InputError, match="fp32"):
        EngineModel.from_path(tiny_engine, dtype=dtype)


def test_engine_model_takes_torch_and_named_dtypes_alike(tiny_engine):
    assert EngineModel.from_path(tiny_engine, dtype=torch.bfloat16).compute_dtype == torch.bfloat16
    assert EngineModel.from_path(tiny_engine, dtype="bf16").compute_dtype == torch.bfloat16


def test_engine_model_device_refused_as_the_cli_refuses_it(tiny_engine):
    with pytest.raises(InputError, match="--device 'gpu': use auto, cpu, cuda or cuda:N"):
        EngineModel.from_path(tiny_engine, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            EngineModel.from_path(tiny_engine, device="cuda")
    assert EngineModel.from_path(tiny_engine, device=torch.device("cpu")).device.type == "cpu"


def test_engine_model_call_refuses_bad_token_ids(tiny_engine):
    model = EngineModel.from_path(tiny_engine)
    vocab, ctx = model.vocab_size, model.config["max_position_embeddings"]
    ok = torch.tensor([[1, 5, 9]])
    assert model(ok).shape == (1, 3, vocab)
    for bad, match in [(torch.tensor([[1, -1]]), "token id -1"), (torch.tensor([[1, vocab]]), f"token id {vocab}"),
                       (torch.tensor([1, 5, 9]), "1-D"), (torch.tensor([[1.0, 2.0]]), "float"),
                       (torch.zeros(1, 0, dtype=torch.long), "no tokens"), ([[1, 2]], "a list")]:
        with pytest.raises(InputError, match=match):
            model(bad)
    assert model(torch.ones(1, ctx, dtype=torch.long)).shape[1] == ctx  # the whole context is fine
    with pytest.raises(InputError, match=f"context of {ctx}"):
        model(torch.ones(1, ctx + 1, dtype=torch.long))
    # ... and so is a cache filled to it, one token more is not
    cache = model.new_cache(1, ctx + 1)
    model(torch.ones(1, ctx, dtype=torch.long), cache=cache)
    with pytest.raises(InputError, match=f"{ctx + 1} tokens exceed"):
        model(torch.ones(1, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("options, calib, match", [
    (QuantOptions(group_size=32.0, method="rtn"), None, r"group_size=32\.0"),
    (QuantOptions(group_size="32", method="rtn"), None, "group_size='32'"),
    (QuantOptions(group_size=None, method="rtn"), None, "group_size=None"),
    (QuantOptions(damp="0.01"), None, "damp='0.01'"),
    (QuantOptions(chunk=None), None, "chunk=None"),
    (QuantOptions(symmetric="yes"), None, "symmetric='yes'"),
    (QuantOptions(), "calib.txt", "calib: a CalibOptions"),
    ("w4", None, "options: a QuantOptions"),
    (QuantOptions(), CalibOptions(seqlen=4), r"seqlen=4\): give at least 8"),
    (QuantOptions(), CalibOptions(n_samples=16.0), r"n_samples=16\.0"),
])
def test_quantize_model_refuses_bad_types_before_any_output(tiny_llama, tmp_path, options, calib, match):
    out = tmp_path / "q"
    with pytest.raises(InputError, match=match) as e:
        quantize_model(tiny_llama, out, options, calib, device="cpu")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no output, no .q.lmkiln-partial


@pytest.mark.parametrize("cls", [QuantOptions, CalibOptions])
def test_every_option_field_is_type_checked(cls):
    """A field added to the options is checked by its annotation without being listed anywhere."""
    import dataclasses

    from lmkiln.quant.pipeline import check_arguments

    for f in dataclasses.fields(cls):
        if f.name == "path":  # (a path or None: checked on its own)
            continue
        bad = cls(**{f.name: object()})
        args = (bad, None) if cls is QuantOptions else (None, bad)
        with pytest.raises(InputError, match=rf"^{cls.__name__}\({f.name}=<object"):
            check_arguments(*args)


def test_quantize_model_takes_a_torch_dtype_and_default_options(tiny_llama, tmp_path):
    res = quantize_model(tiny_llama, tmp_path / "q", RTN, device="cpu", dtype=torch.float32)
    assert res.report["compute"]["dtype"] == "float32"
    with pytest.raises(InputError, match="--dtype torch.int8"):
        quantize_model(tiny_llama, tmp_path / "q2", RTN, device="cpu", dtype=torch.int8)
    assert not (tmp_path / "q2").exists()


def test_verify_options_checked_up_front(tiny_llama, tiny_engine, monkeypatch):
    assert check_options(None) == VerifyOptions()  # None: the defaults
    assert check_options(VerifyOptions(dtype=torch.bfloat16)).dtype == "bf16"  # a torch dtype, as EngineModel takes
    no_load(monkeypatch)
    for o, match in [("fast", "a VerifyOptions, not str"), (VerifyOptions(seqlen=2), "--seqlen 2"),
                     (VerifyOptions(max_tokens="128"), "--max-tokens '128'"), (VerifyOptions(max_tokens=1), "--max-tokens 1"),
                     (VerifyOptions(max_new_tokens=0), "--max-new-tokens 0"), (VerifyOptions(seqlen=16.0), r"--seqlen 16\.0"),
                     (VerifyOptions(data=3), "--data 3"), (VerifyOptions(dtype=torch.int8), "--dtype torch.int8"),
                     (VerifyOptions(runner=None), "--runner None")]:
        with pytest.raises(InputError, match=match) as e:
            run_verify(tiny_llama, tiny_engine, o)
        assert "\n" not in str(e.value)


# -- 5: an interrupt while a finished run removes its resume state --------------------------

def test_interrupt_during_state_removal_finishes_it(tiny_llama, tmp_path, monkeypatch):
    import lmkiln.quant.pipeline as pipeline

    out, partial = tmp_path / "q", partial_dir(tmp_path / "q")
    real = shutil.rmtree
    hits = []

    def interrupted_rmtree(path, *a, **k):
        if Path(path) == partial and not hits:  # Ctrl-C just as the removal starts
            hits.append(path)
            real(Path(path) / "state", *a, **k)  # part of it gone already
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(pipeline.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_llama, out, RTN, device="cpu")
    assert hits, "the interrupt was not simulated"
    assert (out / "config.json").is_file() and json.loads((out / "config.json").read_text())["quantization_config"]
    assert not partial.exists()  # removed all the same
    assert finished_layers(out) == 0  # so the CLI says nothing about --resume


def test_finished_layers_zero_once_output_is_complete(tiny_llama, tmp_path):
    out = quantize_model(tiny_llama, tmp_path / "q", RTN, device="cpu").output
    state = partial_dir(out) / "state"
    state.mkdir(parents=True)
    (state / "layer0.safetensors").write_bytes(b"")  # what a kill mid-removal could leave
    assert finished_layers(out) == 0
    (partial_dir(out) / "out").mkdir()  # a run into it interrupted while writing: resumable again
    assert finished_layers(out) == 1


def test_cli_interrupt_after_the_rename_gives_no_resume_hint(tiny_llama, tmp_path, monkeypatch):
    import lmkiln.quant.pipeline as pipeline

    out = tmp_path / "q"
    real = shutil.rmtree

    def interrupted_rmtree(path, *a, **k):
        if Path(path) == partial_dir(out) and not getattr(interrupted_rmtree, "hit", False):
            interrupted_rmtree.hit = True
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(pipeline.shutil, "rmtree", interrupted_rmtree)
    r = invoke("quantize", tiny_llama, "-o", out, "--w4a16", "--group-size", "32", "--method", "rtn", "--device", "cpu")
    assert r.exit_code != 0 and "--resume" not in r.output, r.output
    assert (out / "config.json").is_file() and not partial_dir(out).exists()


@pytest.mark.parametrize("kw, match", [({"tp": "2"}, r"^tp '2': give a whole number"), ({"tp": 2.0}, r"^tp 2\.0: give a whole number"),
                                       ({"tp": True}, r"^tp True"), ({"dtype": torch.float16}, r"^dtype torch\.float16: give one of"),
                                       ({"extra_files": "/etc/hostname"}, r"^extra_files '/etc/hostname': give a list of paths")])
def test_convert_api_refuses_bad_types(tiny_llama, tmp_path, kw, match):
    """These failed as a TypeError deep inside (or, for a str of extra files, read them letter by letter)."""
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    with pytest.raises(InputError, match=match):
        convert_hf_to_engine(tiny_llama, tmp_path / "e", **kw)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw, match", [({"head_bits": 8.0}, r"^head_bits 8\.0: choose"), ({"head_bits": True}, r"^head_bits True"),
                                       ({"accuracy_level": "4"}, r"^--accuracy-level '4': choose one of 0, 1, 2, 3, 4")])
def test_export_onnx_api_refuses_bad_types(tiny_engine, tmp_path, kw, match):
    from lmkiln.export import export_onnx

    with pytest.raises(InputError, match=match):
        export_onnx(tiny_engine, tmp_path / "x", **kw)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_calib_or_a_negative_seed_is_refused(tiny_llama, tmp_path, monkeypatch):
    """`--calib "$CALIB"` with CALIB unset read the current directory's text files; `--seed -1` repeated
    `--seed 1`'s calibration (random.Random seeds from abs) while the report said -1."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("my shopping list " * 500)
    for extra in ([], ["--dry-run"]):
        r = invoke("quantize", tiny_llama, "-o", tmp_path / "q", "--w4a16", "--group-size", "32", "--calib", "", *extra)
        one_line_error(r, "--calib '' is empty")
    r = invoke("quantize", tiny_llama, "-o", tmp_path / "q", "--w4a16", "--group-size", "32", "--seed", "-1")
    assert r.exit_code == 2 and "'--seed': -1 is below the smallest allowed, 0" in r.output, r.output
    for bad in (CalibOptions(path=""), CalibOptions(seed=-1)):
        with pytest.raises(InputError):
            quantize_model(tiny_llama, tmp_path / "q", QuantOptions(group_size=32), bad)
    assert not (tmp_path / "q").exists()


def test_the_disk_check_counts_the_samples_the_corpus_gave(tiny_llama, tmp_path):
    """Asking for far more samples than a small corpus holds calibrates on what it holds; the free-disk
    check sized the resume state by the request (here petabytes) and refused a run that fits."""
    res = quantize_model(tiny_llama, tmp_path / "q", QuantOptions(group_size=32), CalibOptions(n_samples=10**12, seqlen=64))
    assert 0 < res.report["calibration"]["samples"] < 10**5


def test_public_functions_refuse_flags_paths_and_callbacks_of_the_wrong_type(tiny_llama, tiny_engine, tmp_path):
    """force="False" is true to Python: convert_hf_to_engine replaced an existing engine with it. Every public
    function now refuses a non-bool flag, a path that is not one (None was a TypeError) and a callback that
    cannot be called, in one line, before it reads or writes anything."""
    import numpy as np

    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.export import export_onnx
    from lmkiln.export.compressed_tensors import engine_to_compressed_tensors
    from lmkiln.export.gguf import export_gguf
    from lmkiln.inspect_model import describe
    from lmkiln.quant.pipeline import plan_quantize
    from lmkiln.quant.reformat import awq_to_compressed_tensors

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    calls = {
        "force": [lambda: convert_hf_to_engine(tiny_llama, out, force="False"),
                  lambda: quantize_model(tiny_llama, out, RTN, force="False"),
                  lambda: export_onnx(tiny_engine, out, force="no"), lambda: export_gguf(tiny_engine, out, force="no"),
                  lambda: engine_to_compressed_tensors(tiny_engine, out, force="no"),
                  lambda: awq_to_compressed_tensors(tiny_llama, out, force="no")],
        "allow_pickle": [lambda: convert_hf_to_engine(tiny_llama, tmp_path / "e", allow_pickle="False"),
                         lambda: generate_text(tiny_llama, "Hi", 2, allow_pickle="no"),
                         lambda: describe(tiny_llama, allow_pickle="no")],
        "check": [lambda: generate_text(tiny_engine, "Hi", 2, check="no"), lambda: describe(tiny_engine, check="no"),
                  lambda: EngineModel.from_path(tiny_engine, check="no"), lambda: export_gguf(tiny_engine, out / "g", check=0)],
        "kernels": [lambda: EngineModel.from_path(tiny_engine, kernels="yes")],
        "portable": [lambda: export_onnx(tiny_engine, tmp_path / "x", portable="no")],
        "triton": [lambda: export_onnx(tiny_engine, tmp_path / "x", triton=1)],
        "give a path": [lambda: generate_text(None, "Hi", 2), lambda: quantize_model(tiny_llama, None, RTN),
                        lambda: plan_quantize(None, tmp_path / "p", RTN), lambda: convert_hf_to_engine(tiny_llama, None),
                        lambda: run_verify(None, tiny_engine, QUICK), lambda: export_onnx(None, tmp_path / "x"),
                        lambda: export_gguf(tiny_engine, None), lambda: describe(None),
                        lambda: EngineModel.from_path(None)],
        "give a function": [lambda: convert_hf_to_engine(tiny_llama, tmp_path / "e", progress=5),
                            lambda: quantize_model(tiny_llama, tmp_path / "q", RTN, on_info=5),
                            lambda: run_verify(tiny_llama, tiny_engine, QUICK, progress=5)],
        "give device= and dtype=": [lambda: plan_quantize(tiny_llama, tmp_path / "p", RTN, compute="cpu")],
    }
    for said, fns in calls.items():
        for fn in fns:
            with pytest.raises(InputError, match=said):
                fn()
    assert sorted(p.name for p in out.iterdir()) == ["keep"] and not (tmp_path / "e").exists()
    # the numbers, flags and devices one function took and the next refused
    assert describe(tiny_engine, check=np.False_)[0] == "engine"
    assert plan_quantize(tiny_llama, tmp_path / "p", RTN, device="cpu").peak_host > 0
    r = run_verify(tiny_llama, tiny_engine, dataclasses_replace(QUICK, device=torch.device("cpu"), max_kl=np.float32(0.5)))
    assert r.report["thresholds"]["max_kl"] == 0.5
    for bad, said in ((True, "give a number"), (float("nan"), "0 for no limit")):
        with pytest.raises(InputError, match=said):
            run_verify(tiny_llama, tiny_engine, dataclasses_replace(QUICK, min_top1=bad))


def dataclasses_replace(o, **kw):
    import dataclasses

    return dataclasses.replace(o, **kw)


def test_options_that_do_not_apply_are_named_and_bad_values_are_refused_first(tiny_llama, tmp_path):
    """--min-expert-tokens on a dense model ran without a word; --damp -1 under awq was first called
    'not used' and then refused."""
    said = []
    quantize_model(tiny_llama, tmp_path / "q", QuantOptions(group_size=32, min_expert_tokens=3),
                   CalibOptions(n_samples=2, seqlen=32), on_info=said.append)
    assert "note --min-expert-tokens is not used: LlamaForCausalLM has no experts" in said
    r = invoke("quantize", tiny_llama, "-o", tmp_path / "q2", "--w4a16", "--group-size", "32", "--damp", "-1")
    one_line_error(r, "--damp -1.0")
    assert "not used" not in r.output
