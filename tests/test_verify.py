"""`lmkiln verify`: reference vs candidate through the command line.

Everything runs on the bundled stories260K model (context 512, vocab 512) and artifacts
built from it once per module: its fp32 engine, int4 / int8 RTN engines, an int4 engine
with one layer's scales deliberately doubled, an AWQ engine calibrated on the TinyStories
fixture, and an AWQ-GEMM Hugging Face directory. Runs use 1024 tokens (two windows of
512) and 8 new tokens per greedy prompt to stay fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import blake3
import pytest
import torch
from typer.testing import CliRunner

from helpers import copy_tree, edit_json, make_tiny_model, replace_tensor
from lmkiln.assets import bundled_model_path
from lmkiln.cli import app
from lmkiln.errors import InputError
from lmkiln.formats.engine import Engine
from lmkiln.verify.verify import DEFAULT_THRESHOLDS

ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
STORIES = bundled_model_path()
TINYSTORIES = Path(__file__).parent / "fixtures" / "tinystories_eval.txt"
FAST = ("--max-tokens", "1024", "--max-new-tokens", "8")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def verify(reference, candidate, *args, report: Path | None = None, expect: int | None = 0):
    """Run `lmkiln verify`; returns (CliRunner result, report dict or None)."""
    extra = ("--report", report) if report is not None else ()
    r = invoke("verify", reference, candidate, *FAST, *args, *extra)
    if expect is not None:
        assert r.exit_code == expect, (r.exit_code, r.stdout, r.stderr)
    rep = None
    if report is not None and Path(report).exists():
        rep = json.loads(Path(report).read_text(), parse_constant=_no_constants)
    return r, rep


def _no_constants(name):
    raise AssertionError(f"report JSON holds {name}, which is not valid JSON")


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


# -- artifacts, built once per module --------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module's tiny-model forwards on one intra-op thread (restored afterwards).

    With torch's default of one thread per core on a 2-core machine that other processes
    also load, thread hand-offs dominate forwards this small: one `verify` measured
    5-16 s with 2 threads and 1.1 s with 1. Numerics are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vdir(one_thread, tmp_path_factory):
    return tmp_path_factory.mktemp("verify")


@pytest.fixture(scope="module")
def one_prompt(vdir):
    p = vdir / "one_prompt.txt"
    p.write_text("Once upon a time\n")
    return p


@pytest.fixture(scope="module")
def fp_engine(vdir):
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    return convert_hf_to_engine(STORIES, vdir / "fp32.engine")


@pytest.fixture(scope="module")
def fp_engine_copy(fp_engine, vdir):
    """The same engine under another path (verify refuses one path on both sides)."""
    return copy_tree(fp_engine, vdir / "fp32-copy.engine")


def _rtn(out: Path, bits: int, to: str = "engine") -> Path:
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import quantize_model

    return quantize_model(STORIES, out, QuantOptions(bits=bits, group_size=32, method="rtn"), to=to).output


@pytest.fixture(scope="module")
def w4_engine(vdir):
    return _rtn(vdir / "w4.engine", 4)


@pytest.fixture(scope="module")
def w8_engine(vdir):
    return _rtn(vdir / "w8.engine", 8)


@pytest.fixture(scope="module")
def awq_hf(vdir):
    """An AWQ-GEMM Hugging Face directory (int4 g32; codes found by RTN, the layout is the same)."""
    return _rtn(vdir / "w4-awq-gemm", 4, to="hf")


@pytest.fixture(scope="module")
def awq_tinystories_engine(vdir):
    """AWQ W4 g32 calibrated on the TinyStories evaluation fixture (on purpose: overlap).

    A coarse scale grid and no clip search keep it quick; only its calibration record matters here."""
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import CalibOptions, quantize_model

    return quantize_model(STORIES, vdir / "awq-ts.engine", QuantOptions(bits=4, group_size=32, clip=False, n_grid=5),
                          CalibOptions(path=TINYSTORIES, n_samples=8, seqlen=128), to="engine").output


DAMAGED_TENSOR = "layers.0.attention.w_qkv.0.scales"


@pytest.fixture(scope="module")
def damaged_engine(w4_engine, vdir):
    """The W4 engine with one layer's q/k/v scales doubled, manifest updated so it still reads."""
    d = copy_tree(w4_engine, vdir / "w4-damaged.engine")
    f = d / "rank0.safetensors"
    from safetensors.torch import load_file

    t = load_file(str(f))[DAMAGED_TENSOR]
    replace_tensor(f, DAMAGED_TENSOR, (t.float() * 2).to(t.dtype))

    def fix(m):
        m["files"]["rank0.safetensors"]["blake3"] = blake3.blake3(f.read_bytes()).hexdigest()
        m["files"]["rank0.safetensors"]["size"] = f.stat().st_size

    edit_json(d / "manifest.json", fix)
    Engine(d, check=True)  # sizes and checksums agree with the manifest again
    return d


@pytest.fixture(scope="module")
def w4_run(w4_engine, one_prompt, vdir):
    """stories260K vs its W4 engine on in-domain text, with --report and --plot."""
    report, plot = vdir / "w4-report.json", vdir / "w4.png"
    r, rep = verify(STORIES, w4_engine, "--data", TINYSTORIES, "--prompts", one_prompt, "--plot", plot, report=report,
                    expect=None)
    return r, rep, plot


# -- 1. a model against itself ---------------------------------------------------------


@pytest.mark.parametrize("pair", ["hf-vs-engine", "engine-vs-engine"])
def test_model_against_itself_passes(pair, fp_engine, fp_engine_copy, vdir):
    reference = STORIES if pair == "hf-vs-engine" else fp_engine_copy
    r, rep = verify(reference, fp_engine, report=vdir / f"self-{pair}.json")
    assert "PASS" in r.stdout and "FAIL" not in r.output
    assert rel(rep["reference"]["ppl"], rep["candidate"]["ppl"]) < 1e-5
    assert abs(rep["ppl_increase_pct"]) < 1e-3
    assert 0 <= rep["kl"]["mean"] < 1e-8 and rep["kl"]["max"] < 1e-6
    assert rep["top1_agreement"] == 1.0
    assert rep["greedy_match"] is True and len(rep["greedy"]) == 5  # the bundled prompts
    assert rep["passed"] is True and all(c["passed"] for c in rep["checks"].values())
    assert rep["candidate"]["weight_type"] == "fp32" and rep["thresholds"] == DEFAULT_THRESHOLDS["fp32"]
    assert rep["runners"]["candidate"] == "torch-engine@cpu"
    if pair == "hf-vs-engine":
        assert rep["runners"]["reference"] == "transformers@cpu"
        assert rep["max_abs_dlogit"] < 1e-3  # two implementations, same fp32 weights
    else:
        assert rep["runners"]["reference"] == "torch-engine@cpu"
        assert rep["max_abs_dlogit"] == 0.0 and rep["kl"]["mean"] == 0.0  # the very same computation


# -- 2. a quantized candidate, good and damaged ----------------------------------------


def test_w4_candidate_numbers_are_sensible(w4_run):
    r, rep, _ = w4_run
    assert r.exit_code in (0, 1), r.output  # the gate may or may not pass stories260K W4 at the int4 defaults
    ref, cand = rep["reference"], rep["candidate"]
    assert cand["weight_type"] == "int4"
    assert 1 < ref["ppl"] < cand["ppl"] < 2 * ref["ppl"]  # in-domain text: the fp model is good at it
    assert rep["ppl_increase_pct"] == pytest.approx((cand["ppl"] / ref["ppl"] - 1) * 100)
    assert 0 < rep["kl"]["mean"] < 1 and rep["kl"]["mean"] <= rep["kl"]["p99"] <= rep["kl"]["max"]
    assert 0.5 < rep["top1_agreement"] < 1
    assert 0 < ref["ppl_stderr"] < ref["ppl"] and 0 < cand["ppl_stderr"] < cand["ppl"]
    assert math.isclose(ref["mean_nll"], math.log(ref["ppl"]), rel_tol=1e-9)
    assert rep["runners"] == {"reference": "transformers@cpu", "candidate": "torch-engine@cpu"}


def test_damaged_candidate_fails_the_ppl_gate_and_the_good_one_passes(w4_run, w4_engine, damaged_engine, one_prompt, vdir):
    good = w4_run[1]["ppl_increase_pct"]
    threshold = good + 10  # percent; doubling one layer's q/k/v scales costs far more than that
    # Only the perplexity gate matters here: the KL and top-1 gates are opened wide.
    gate = ("--data", TINYSTORIES, "--prompts", one_prompt, "--max-ppl-increase", threshold, "--max-kl", 10, "--min-top1", 0)
    r_good, rep_good = verify(STORIES, w4_engine, *gate, report=vdir / "gate-good.json", expect=0)
    assert "PASS" in r_good.stdout and "FAIL" not in r_good.output
    assert rep_good["ppl_increase_pct"] == pytest.approx(good, rel=1e-9)  # deterministic
    r_bad, rep_bad = verify(STORIES, damaged_engine, *gate, report=vdir / "gate-bad.json", expect=1)
    assert "FAIL" in r_bad.output and "PASS" not in r_bad.output
    fail_lines = [ln for ln in r_bad.stderr.splitlines() if ln.startswith("FAIL")]
    assert len(fail_lines) == 1 and "max_ppl_increase" in fail_lines[0], r_bad.stderr
    assert "Traceback" not in r_bad.output
    # The report is still written on failure, and says why.
    assert rep_bad["passed"] is False and rep_bad["ppl_increase_pct"] > threshold > good
    assert rep_bad["checks"]["max_ppl_increase"] == {"value": rep_bad["ppl_increase_pct"], "passed": False}
    assert rep_bad["checks"]["max_kl"]["passed"] and rep_bad["checks"]["min_top1"]["passed"]
    assert rep_bad["thresholds"] == {"max_ppl_increase": threshold, "max_kl": 10.0, "min_top1": 0.0}
    assert rep_bad["reference"]["ppl"] == rep_good["reference"]["ppl"]  # same reference, same text


def test_explicit_threshold_overrides_only_its_own_default(w4_engine, one_prompt, vdir):
    r, rep = verify(STORIES, w4_engine, "--data", TINYSTORIES, "--prompts", one_prompt, "--min-top1", 0.25,
                    report=vdir / "override.json", expect=None)
    assert rep["thresholds"] == {**DEFAULT_THRESHOLDS["int4"], "min_top1": 0.25}
    assert rep["checks"]["min_top1"]["passed"] is True
    assert r.exit_code == (0 if rep["passed"] else 1)


@pytest.mark.parametrize("key,value", [("min_top1", 1.01), ("min_top5", -0.1), ("min_p_top", 2.0), ("max_kl", -1e-6),
                                       ("max_ppl_increase", -1.0)])
def test_threshold_out_of_range_is_refused_before_any_run(key, value, fp_engine, monkeypatch):
    # A top-1 of 5 "failed" an identical model and a top-5 of -3 passed anything: neither means anything.
    import lmkiln.verify.verify as V

    monkeypatch.setattr(V, "open_runner", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(InputError, match=f"--{key.replace('_', '-')} {value!r}: choose"):
        V.run_verify(STORIES, fp_engine, V.VerifyOptions(**{key: value}))


def test_refused_before_any_run(fp_engine, tmp_path, monkeypatch):
    """What would make a verdict meaningless or waste the reference's whole pass is refused first:
    one path on both sides (however spelled: a CI gate would pass by construction), a GGUF as the
    reference (it has no tokenizer directory), a prompt longer than the context (named, with the
    way out), and a device or pipe as the evaluation text (was read forever or reported missing)."""
    import os

    import lmkiln.verify.verify as V

    monkeypatch.setattr(V, "open_runner", lambda *a, **k: pytest.fail("a model was loaded"))
    link = tmp_path / "link"
    link.symlink_to(fp_engine)
    for cand in (fp_engine, Path(str(fp_engine) + "/"), link):
        with pytest.raises(InputError, match=r"reference and candidate are the same .*give the original model"):
            V.run_verify(fp_engine, cand, V.VerifyOptions())
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(InputError, match="a GGUF file can be verify's candidate only"):
        V.run_verify(gguf, fp_engine, V.VerifyOptions())
    long = tmp_path / "long.txt"
    long.write_text("Once upon a time\n" + "the cat sat on the mat " * 300 + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"the prompt on line 2 of {long} \(\d+ tokens\) plus 2 new tokens exceed the model's context "
                                         r"of 512 positions; shorten it to at most 510 tokens"):
        V.run_verify(STORIES, fp_engine, V.VerifyOptions(prompts=long, max_new_tokens=2))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for data in (fifo, Path("/dev/zero")):
        with pytest.raises(InputError, match="--data .*: not a regular file"):
            V.run_verify(STORIES, fp_engine, V.VerifyOptions(data=data))
    with pytest.raises(InputError, match=r"--prompts .*: not a regular file \(a directory\); pass a file of prompts$"):
        V.run_verify(STORIES, fp_engine, V.VerifyOptions(prompts=tmp_path))  # (said "a file of prompts file")


@pytest.mark.parametrize("damage", ["not json", "a list", "no weight_type", "no context length", "hf config"])
def test_damaged_metadata_is_one_line(damage, fp_engine, tmp_path):
    """verify reads manifest.json / config.json / lmkiln_export.json before loading anything:
    a damaged one is one line naming the file (exit 2), not an internal error."""
    eng = copy_tree(fp_engine, tmp_path / "e")
    ref, cand, file = STORIES, eng, eng / "manifest.json"
    if damage == "not json":
        file.write_text("{")
    elif damage == "a list":
        file.write_text("[1, 2]")
    elif damage == "no weight_type":
        edit_json(file, lambda d: d.pop("weight_type"))
    elif damage == "no context length":
        edit_json(file, lambda d: d["model"].pop("max_position_embeddings"))
    else:
        ref = copy_tree(STORIES, tmp_path / "hf")
        file = ref / "config.json"
        file.write_text("{")
        cand = fp_engine
    line = assert_input_error(invoke("verify", ref, cand, "--max-tokens", "64"), str(file))
    assert "damaged" in line


# -- 3. the report and the plot --------------------------------------------------------


def test_report_schema_and_plot(w4_run):
    r, rep, plot = w4_run
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and plot.stat().st_size > 1000
    for side in ("reference", "candidate"):
        assert isinstance(rep[side]["path"], str)
        for k in ("ppl", "ppl_stderr", "mean_nll"):
            assert isinstance(rep[side][k], float) and math.isfinite(rep[side][k]), (side, k)
    assert rep["candidate"]["weight_type"] == "int4"
    assert isinstance(rep["ppl_increase_pct"], float)
    assert set(rep["kl"]) == {"mean", "p99", "max"} and all(isinstance(v, float) for v in rep["kl"].values())
    assert isinstance(rep["top1_agreement"], float) and isinstance(rep["max_abs_dlogit"], float)
    assert isinstance(rep["greedy_match"], bool)
    assert isinstance(rep["greedy"], list) and len(rep["greedy"]) == 1
    g = rep["greedy"][0]
    assert g["prompt"] == "Once upon a time" and isinstance(g["match"], bool)
    assert isinstance(g["reference"], str) and isinstance(g["candidate"], str)
    assert g["first_divergence"] is None if g["match"] else isinstance(g["first_divergence"], int)
    assert set(rep["thresholds"]) == {"max_ppl_increase", "max_kl", "min_top1"}
    assert all(isinstance(v, (int, float)) for v in rep["thresholds"].values())
    assert set(rep["checks"]) == set(rep["thresholds"])
    assert isinstance(rep["passed"], bool) and rep["passed"] == all(c["passed"] for c in rep["checks"].values())
    assert r.exit_code == (0 if rep["passed"] else 1)
    p = rep["protocol"]
    assert p["seqlen"] == 512 and p["windows"] == 2 and p["tokens"] == 1024
    assert p["scored_tokens"] == 2 * 511  # [BOS] + 511 text tokens per window, every text token scored
    assert p["bos_per_window"] is True and p["score_second_half"] is False
    assert p["data"] == str(TINYSTORIES) and p["max_new_tokens"] == 8
    for k in ("seqlen", "windows", "scored_tokens", "tokens", "max_new_tokens"):
        assert type(p[k]) is int, k
    assert isinstance(rep["windows"], list) and len(rep["windows"]) == p["windows"]
    assert all(set(w) == {"reference_nll", "candidate_nll", "top1_agreement", "top5_agreement", "top5_overlap",
                          "reference_p_top", "candidate_p_top"} for w in rep["windows"])
    for k in ("top5_agreement", "top5_overlap"):
        assert isinstance(rep[k], float) and 0 <= rep[k] <= 1, k
    assert set(rep["p_top"]) == {"reference", "candidate"} and all(0 < v < 1 for v in rep["p_top"].values())
    assert rep["warnings"] == []  # RTN: no calibration text to overlap with
    assert isinstance(rep["lmkiln_version"], str) and isinstance(rep["seconds"], (int, float))


# -- 4. exit codes for bad input -------------------------------------------------------


def assert_input_error(r, *needles) -> str:
    """Exit 2, no traceback, nothing on stdout, and stderr is exactly one 'error:' line.

    Also for errors found after the progress bar was set up (--data, --prompts, --seqlen,
    --runner, --device, vocabularies): the bar appears only on its first update."""
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.output and "internal error" not in r.output
    assert r.stdout.strip() == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def vocab256_model(vdir):
    """A tiny random Llama whose vocabulary (256) differs from stories260K's (512)."""
    return make_tiny_model(vdir / "vocab256", "LlamaForCausalLM", seed=0, vocab_size=256)


@pytest.mark.parametrize("case", ["missing-reference", "candidate-not-a-model", "data-missing", "data-empty",
                                  "prompts-missing", "seqlen-above-context", "runner-onnx-on-engine",
                                  "unknown-runner", "unknown-device", "nan-threshold", "vocab-mismatch"])
def test_input_errors_exit_2(case, fp_engine, one_prompt, vdir, request):
    empty = vdir / "empty.txt"
    empty.write_text("  \n\n")
    not_a_model = vdir / "not-a-model"
    not_a_model.mkdir(exist_ok=True)
    (not_a_model / "notes.txt").write_text("hello")
    cases = {
        "missing-reference": ((vdir / "no-such-dir", fp_engine), (), ("no-such-dir", "no such file")),
        "candidate-not-a-model": ((STORIES, not_a_model), (), ("not-a-model", "not an engine")),
        "data-missing": ((STORIES, fp_engine), ("--data", vdir / "nope.txt"), ("nope.txt", "not found")),
        "data-empty": ((STORIES, fp_engine), ("--data", empty), ("empty.txt", "empty")),
        "prompts-missing": ((STORIES, fp_engine), ("--prompts", vdir / "nope-prompts.txt"), ("nope-prompts.txt", "not found")),
        "seqlen-above-context": ((STORIES, fp_engine), ("--seqlen", 1024), ("--seqlen 1024", "512")),
        "runner-onnx-on-engine": ((STORIES, fp_engine), ("--runner", "onnx"), ("--runner onnx", "ONNX export")),
        "unknown-runner": ((STORIES, fp_engine), ("--runner", "tensorrt"), ("'tensorrt'",)),
        "unknown-device": ((STORIES, fp_engine), ("--device", "tpu"), ("--device 'tpu'",)),
        "nan-threshold": ((STORIES, fp_engine), ("--max-kl", "nan"), ("--max-kl",)),
        "vocab-mismatch": ((STORIES, None), (), ("vocabularies differ", "512", "256")),
    }
    (ref, cand), args, needles = cases[case]
    if case == "vocab-mismatch":
        cand = request.getfixturevalue("vocab256_model")
    r = invoke("verify", ref, cand, *FAST, "--prompts", one_prompt, *args) if case != "prompts-missing" \
        else invoke("verify", ref, cand, *FAST, *args)
    assert_input_error(r, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here, so --device cuda is not an input error")
def test_device_cuda_without_cuda_is_an_input_error(fp_engine, one_prompt):
    r = invoke("verify", STORIES, fp_engine, *FAST, "--prompts", one_prompt, "--device", "cuda")
    assert_input_error(r, "--device cuda", "no CUDA")


@pytest.mark.parametrize("option", ["--report", "--plot"])
def test_output_into_missing_directory_is_refused_up_front(option, fp_engine, one_prompt, vdir):
    # Regression: this used to fail only after the whole evaluation, as "internal error" with exit 3.
    target = vdir / "no-such-dir" / ("report.json" if option == "--report" else "plot.png")
    r = invoke("verify", STORIES, fp_engine, *FAST, "--prompts", one_prompt, option, target)
    assert_input_error(r, option, "does not exist")
    assert not target.parent.exists()


# -- 5. protocol options and per-weight-type defaults ----------------------------------


def test_score_second_half_halves_scored_tokens(w4_run, w4_engine, one_prompt, vdir):
    full = w4_run[1]
    r, rep = verify(STORIES, w4_engine, "--data", TINYSTORIES, "--prompts", one_prompt, "--score-second-half",
                    report=vdir / "second-half.json", expect=None)
    assert r.exit_code in (0, 1)
    p, pf = rep["protocol"], full["protocol"]
    assert p["score_second_half"] is True and p["windows"] == pf["windows"] == 2
    assert 0.45 < p["scored_tokens"] / pf["scored_tokens"] < 0.55, (p["scored_tokens"], pf["scored_tokens"])
    assert p["scored_tokens"] == 2 * 256  # positions 255..510 of each 512-token window
    assert f"{p['scored_tokens']} tokens scored in 2 windows of 512" in r.stdout
    # Later positions have more context: on this text the reference predicts them better.
    assert rep["reference"]["ppl"] < full["reference"]["ppl"]


def test_default_thresholds_depend_on_weight_type(w4_run, w8_engine, one_prompt, vdir):
    r, rep8 = verify(STORIES, w8_engine, "--data", TINYSTORIES, "--prompts", one_prompt, report=vdir / "w8.json",
                     expect=None)
    rep4 = w4_run[1]
    assert rep8["candidate"]["weight_type"] == "int8" and rep4["candidate"]["weight_type"] == "int4"
    t8, t4 = rep8["thresholds"], rep4["thresholds"]
    assert t8 == DEFAULT_THRESHOLDS["int8"] and t4 == DEFAULT_THRESHOLDS["int4"]
    assert t8["max_ppl_increase"] < t4["max_ppl_increase"]
    assert t8["max_kl"] < t4["max_kl"]
    assert t8["min_top1"] > t4["min_top1"]
    # int8 is much closer to the reference than int4 on the same text.
    assert rep8["kl"]["mean"] < rep4["kl"]["mean"] / 10
    assert abs(rep8["ppl_increase_pct"]) < rep4["ppl_increase_pct"]
    assert rep8["top1_agreement"] > rep4["top1_agreement"]
    assert r.exit_code == 0 and rep8["passed"], r.output  # W8 of stories260K meets the int8 defaults


# -- 6. calibration overlap ------------------------------------------------------------


def test_calibration_overlap_warning(awq_tinystories_engine, one_prompt, vdir):
    # Calibrated on the TinyStories fixture; evaluated on it: warn.
    r, rep = verify(STORIES, awq_tinystories_engine, "--data", TINYSTORIES, "--prompts", one_prompt,
                    report=vdir / "overlap.json", expect=None)
    assert r.exit_code in (0, 1), r.output
    assert len(rep["warnings"]) == 1, rep["warnings"]
    w = rep["warnings"][0]
    assert "calibration" in w and "32-token spans" in w and "optimistic" in w
    assert any(ln.startswith("warning:") and "calibration" in ln for ln in r.stderr.splitlines()), r.stderr
    # The default evaluation text (WikiText-2 test) shares nothing with it: no warning.
    r, rep = verify(STORIES, awq_tinystories_engine, "--prompts", one_prompt, report=vdir / "no-overlap.json",
                    expect=None)
    assert rep["warnings"] == [] and "warning:" not in r.stderr
    assert rep["protocol"]["data"] == "bundled:wikitext2_test_excerpt"


# -- 7. an AWQ-GEMM Hugging Face directory as the candidate ----------------------------


def test_awq_gemm_hf_candidate_auto_and_transformers_agree(awq_hf, one_prompt, vdir):
    args = ("--data", TINYSTORIES, "--prompts", one_prompt)
    r_auto, auto = verify(STORIES, awq_hf, *args, report=vdir / "awq-auto.json", expect=None)
    r_tf, tf = verify(STORIES, awq_hf, *args, "--runner", "transformers", report=vdir / "awq-tf.json", expect=None)
    assert r_auto.exit_code in (0, 1) and r_tf.exit_code == r_auto.exit_code, (r_auto.output, r_tf.output)
    assert auto["runners"]["candidate"] == "torch-engine@cpu"  # converted to a temporary engine
    assert tf["runners"]["candidate"] == "transformers@cpu"  # dequantized into transformers' model
    assert auto["candidate"]["weight_type"] == tf["candidate"]["weight_type"] == "int4"
    assert auto["reference"]["ppl"] == tf["reference"]["ppl"]
    assert auto["candidate"]["ppl"] > auto["reference"]["ppl"]
    assert rel(auto["candidate"]["ppl"], tf["candidate"]["ppl"]) < 1e-4
    assert rel(auto["ppl_increase_pct"], tf["ppl_increase_pct"]) < 1e-4
    assert rel(auto["kl"]["mean"], tf["kl"]["mean"]) < 1e-4
    assert abs(auto["top1_agreement"] - tf["top1_agreement"]) <= 1 / auto["protocol"]["scored_tokens"]
    assert auto["greedy"][0]["candidate"] == tf["greedy"][0]["candidate"]


# -- 8. CUDA ---------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_vs_hf(fp_engine, vdir):
    r, rep = verify(STORIES, fp_engine, "--device", "cuda", report=vdir / "cuda.json")
    assert rep["runners"] == {"reference": "transformers@cuda:0", "candidate": "torch-engine@cuda:0"}
    assert rel(rep["reference"]["ppl"], rep["candidate"]["ppl"]) < 1e-4
    assert rep["kl"]["mean"] < 1e-6 and rep["top1_agreement"] > 0.999 and rep["passed"]
    _, cpu = verify(STORIES, fp_engine, report=vdir / "cuda-vs-cpu.json")
    assert rel(rep["reference"]["ppl"], cpu["reference"]["ppl"]) < 1e-3  # TF32 etc. may differ slightly


# -- 9. top-5 agreement, top-5 overlap, p(reference's top token) ------------------------


def _direct_stats(ref: list[list[float]], cand: list[list[float]]) -> dict:
    """The agreement statistics computed position by position in plain Python (no topk)."""
    def ranked(row):
        return sorted(range(len(row)), key=lambda i: -row[i])

    def probs(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        return [v / sum(e) for v in e]

    k = min(5, len(ref[0]))
    top1 = top5 = overlap = p_ref = p_cand = 0.0
    for r, c in zip(ref, cand):
        rr, cr = ranked(r), ranked(c)
        top1 += rr[0] == cr[0]
        top5 += rr[0] in cr[:k]
        overlap += len(set(rr[:k]) & set(cr[:k])) / k
        p_ref += probs(r)[rr[0]]
        p_cand += probs(c)[rr[0]]
    n = len(ref)
    return {"top1_agreement": top1 / n, "top5_agreement": top5 / n, "top5_overlap": overlap / n,
            "reference_p_top": p_ref / n, "candidate_p_top": p_cand / n}


@pytest.mark.parametrize("vocab", [16, 4])  # 4 < 5: the sets are the whole top 4
def test_agreement_statistics_match_a_direct_computation(vocab):
    from lmkiln.verify.metrics import Accumulator

    g = torch.Generator().manual_seed(vocab)
    acc, wins = Accumulator(), []
    for T in (7, 5):  # two windows of different lengths: the overall value weighs positions, not windows
        ref = torch.randn(T, vocab, generator=g, dtype=torch.float64)
        cand = ref + 1.5 * torch.randn(T, vocab, generator=g, dtype=torch.float64)  # near, so some agree and some do not
        acc.add(ref, cand, torch.randint(0, vocab, (T,), generator=g))
        wins.append((ref.tolist(), cand.tolist()))
    s = acc.summary()
    for got, (ref, cand) in zip(s["windows"], wins):
        want = _direct_stats(ref, cand)
        for key, v in want.items():
            assert got[key] == pytest.approx(v, rel=1e-12, abs=1e-15), (key, got[key], v)
    want = _direct_stats(wins[0][0] + wins[1][0], wins[0][1] + wins[1][1])
    assert s["top1_agreement"] == pytest.approx(want["top1_agreement"])
    assert s["top5_agreement"] == pytest.approx(want["top5_agreement"])
    assert s["top5_overlap"] == pytest.approx(want["top5_overlap"])
    assert s["p_top"]["reference"] == pytest.approx(want["reference_p_top"], rel=1e-12)
    assert s["p_top"]["candidate"] == pytest.approx(want["candidate_p_top"], rel=1e-12)
    if vocab == 4:  # every top "5" is the whole vocabulary
        assert s["top5_agreement"] == s["top5_overlap"] == 1.0
    else:  # the test is only worth something if the statistics tell the cases apart
        assert want["top1_agreement"] < want["top5_agreement"] < 1 and 0 < want["top5_overlap"] < 1


def test_agreement_statistics_of_a_model_against_itself(fp_engine, fp_engine_copy, one_prompt, vdir):
    _, rep = verify(fp_engine_copy, fp_engine, "--prompts", one_prompt, report=vdir / "self-top5.json")
    assert rep["top5_agreement"] == rep["top5_overlap"] == 1.0
    assert rep["p_top"]["reference"] == rep["p_top"]["candidate"]
    assert all(w["top5_overlap"] == 1.0 and w["reference_p_top"] == w["candidate_p_top"] for w in rep["windows"])


def test_w4_agreement_statistics_are_consistent(w4_run):
    _, rep, _ = w4_run
    # top-1 agreement implies top-5 agreement, and quantization costs the reference's favourite some probability
    assert rep["top1_agreement"] < rep["top5_agreement"] < 1
    assert 0 < rep["top5_overlap"] < 1
    assert rep["p_top"]["candidate"] < rep["p_top"]["reference"]
    w = rep["windows"]
    n = rep["protocol"]["scored_tokens"] // len(w)  # equal windows: the overall value is the windows' mean
    assert all(rep["protocol"]["scored_tokens"] == n * len(w) for _ in w)
    for key, overall in (("top5_agreement", rep["top5_agreement"]), ("top5_overlap", rep["top5_overlap"]),
                         ("candidate_p_top", rep["p_top"]["candidate"])):
        assert sum(x[key] for x in w) / len(w) == pytest.approx(overall, rel=1e-9), key


def test_optional_top5_and_p_top_thresholds(w4_run, w4_engine, one_prompt, vdir):
    rep0 = w4_run[1]
    assert "min_top5" not in rep0["thresholds"] and "min_p_top" not in rep0["checks"]  # not given: not checked
    wide = ("--data", TINYSTORIES, "--prompts", one_prompt, "--max-ppl-increase", 1000, "--max-kl", 10, "--min-top1", 0)
    top5, p_top = rep0["top5_agreement"], rep0["p_top"]["candidate"]
    r, rep = verify(STORIES, w4_engine, *wide, "--min-top5", top5 - 0.01, "--min-p-top", p_top - 0.01,
                    report=vdir / "top5-pass.json", expect=0)
    assert rep["checks"]["min_top5"] == {"value": top5, "passed": True}
    assert rep["checks"]["min_p_top"] == {"value": p_top, "passed": True}
    assert "top-5 agreement" in r.stdout and "p(reference top-1)" in r.stdout
    r, rep = verify(STORIES, w4_engine, *wide, "--min-top5", top5 + 0.01, report=vdir / "top5-fail.json", expect=1)
    fail_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("FAIL")]
    assert len(fail_lines) == 1 and "min_top5" in fail_lines[0], r.stderr
    assert rep["thresholds"]["min_top5"] == top5 + 0.01 and "min_p_top" not in rep["thresholds"]
    assert rep["passed"] is False and rep["checks"]["min_top5"]["passed"] is False


def test_jsonl_data_scores_the_text_fields(tmp_path):
    """`--data x.jsonl` scored the raw JSON, braces and keys included (exit 0), though `quantize --calib`
    reads the same file's "text" fields."""
    from lmkiln.verify.data import load_eval_text

    docs = ["Once upon a time there was a cat.", "The cat sat on the mat."]
    jl = tmp_path / "eval.jsonl"
    jl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n", encoding="utf-8")
    assert load_eval_text(jl) == "\n\n".join(docs)
    jl.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf'{jl}:2: no string "text" field'):
        load_eval_text(jl)


def test_swapped_reference_and_candidate_are_warned_about(fp_engine):
    """`verify ENGINE HF` ran without a hint that the order is REFERENCE CANDIDATE."""
    import lmkiln.verify.verify as V

    res = V.run_verify(fp_engine, STORIES, V.VerifyOptions(max_tokens=64, max_new_tokens=2))
    assert any("the order is REFERENCE (the original) CANDIDATE" in w for w in res.warnings)
    res = V.run_verify(STORIES, fp_engine, V.VerifyOptions(max_tokens=64, max_new_tokens=2))
    assert not any("the order is" in w for w in res.warnings)


def test_a_text_shorter_than_a_window_is_said_as_it_was_scored(fp_engine, one_prompt, vdir):
    """The summary said "100 tokens scored in 1 windows of 512" when the one window held 101 positions."""
    r, rep = verify(STORIES, fp_engine, "--max-tokens", "100", "--prompts", one_prompt, report=vdir / "short.json",
                    expect=None)
    p = rep["protocol"]
    assert p["windows"] == 1 and p["window_length"] == p["scored_tokens"] + 1 < p["seqlen"]
    assert f"{p['scored_tokens']} tokens scored in 1 window of {p['window_length']};" in r.stdout
