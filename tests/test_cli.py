"""The command line: exit codes, one-line errors, --debug tracebacks, and the main commands."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import lmkiln
from helpers import copy_tree, edit_json, make_tiny_model
from lmkiln.cli import app
from lmkiln.errors import InputError, OutputExistsError
from lmkiln.formats.engine import MANIFEST, VERSION, rank_file

ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def assert_one_line_error(result, code=2, *needles):
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert result.stdout.strip() == ""
    return lines[0]


def run_module(*args, cwd=None, timeout=120):
    env = {**os.environ, **ENV}
    return subprocess.run([sys.executable, "-m", "lmkiln", *[str(a) for a in args]], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


# -- success paths ------------------------------------------------------------------------


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0
    assert r.stdout.strip() == f"lmkiln {lmkiln.__version__}"


def test_no_args_shows_help():
    r = invoke()
    assert "convert" in r.output and "inspect" in r.output and "generate" in r.output


def test_convert_success(tiny_llama, tmp_path):
    out = tmp_path / "e"
    r = invoke("convert", "hf-to-engine", tiny_llama, "-o", out, "--dtype", "fp16", "--tp", "2")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stdout and str(out) in r.stdout
    from lmkiln.formats.engine import Engine

    eng = Engine(out, check=True)
    assert eng.tp == 2 and eng.dtype == torch.float16
    assert (out / rank_file(1)).is_file()


def test_inspect_hf(tiny_llama):
    r = invoke("inspect", tiny_llama)
    assert r.exit_code == 0, r.output
    assert "LlamaForCausalLM" in r.stdout
    assert "Hugging Face checkpoint" in r.stdout
    assert "float32" in r.stdout and "model.safetensors" in r.stdout
    assert "tokenizer.json" in r.stdout


def test_inspect_engine(tiny_engine):
    r = invoke("inspect", tiny_engine)
    assert r.exit_code == 0, r.output
    assert "LlamaForCausalLM" in r.stdout
    assert "lmkiln engine" in r.stdout
    assert "all hold (blake3)" in r.stdout
    assert "fp32" in r.stdout and "lmkiln-engine v4" in r.stdout


def test_inspect_tampered_engine(tiny_engine, tmp_path):
    eng = copy_tree(tiny_engine, tmp_path / "e")
    f = eng / rank_file(0)
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))
    r = invoke("inspect", eng)
    assert r.exit_code == 2, r.output  # a damaged engine is bad input, as in generate; exit 1 is verify's "failed"
    assert "MISMATCH" in r.stdout and rank_file(0) in r.stdout
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and f"checksum mismatch in {rank_file(0)}" in errors[0], r.stderr
    assert "all hold" not in r.stdout
    r = invoke("inspect", eng, "--no-check")
    assert r.exit_code == 0
    assert "not checked" in r.stdout


def test_generate_engine(tiny_engine):
    r = invoke("generate", tiny_engine, "-p", "Once upon a time", "-p", "The cat", "-n", "8")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 2
    assert lines[0].startswith("Once upon a time") and len(lines[0]) > len("Once upon a time")
    assert lines[1].startswith("The cat") and len(lines[1]) > len("The cat")


def test_generate_hf_dir_matches_engine(tiny_llama, tiny_engine):
    a = invoke("generate", tiny_llama, "-p", "Hello there", "-n", "6")
    b = invoke("generate", tiny_engine, "-p", "Hello there", "-n", "6")
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert a.stdout.startswith("Hello there") and len(a.stdout.strip()) > len("Hello there")
    assert a.stdout == b.stdout  # converted on the fly == converted ahead of time


def test_demo(tmp_path):
    work = tmp_path / "demo"
    r = invoke("demo", "--workdir", work)
    assert r.exit_code == 0, r.output
    assert "Once upon a time" in r.stdout
    story = r.stdout.split("Once upon a time", 1)[1]
    assert len(story.split()) >= 5  # a continuation, in words
    assert (work / "stories260K.engine" / MANIFEST).is_file()
    # Running it again replaces its own output.
    assert invoke("demo", "--workdir", work).exit_code == 0


def test_pickle_opt_in(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copyfile(tiny_llama / "config.json", d / "config.json")
    torch.save(load_file(str(tiny_llama / "model.safetensors")), d / "pytorch_model.bin")
    assert_one_line_error(invoke("convert", "hf-to-engine", d, "-o", tmp_path / "e"), 2, "--allow-pickle")
    r = invoke("convert", "hf-to-engine", d, "-o", tmp_path / "e", "--allow-pickle")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "e" / MANIFEST).is_file()


def test_inspect_pickle_follows_its_own_advice(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copyfile(tiny_llama / "config.json", d / "config.json")
    torch.save(load_file(str(tiny_llama / "model.safetensors")), d / "pytorch_model.bin")
    assert_one_line_error(invoke("inspect", d), 2, "--allow-pickle")
    r = invoke("inspect", d, "--allow-pickle")
    assert r.exit_code == 0, r.output
    assert "LlamaForCausalLM" in r.stdout


# -- one-line errors ----------------------------------------------------------------------


def test_error_missing_dir(tmp_path):
    line = assert_one_line_error(invoke("convert", "hf-to-engine", tmp_path / "absent", "-o", tmp_path / "e"), 2, "no such directory")
    assert str(tmp_path / "absent") in line
    assert not (tmp_path / "e").exists()


def test_error_no_config(tmp_path, tiny_llama):
    d = copy_tree(tiny_llama, tmp_path / "m")
    (d / "config.json").unlink()
    assert_one_line_error(invoke("convert", "hf-to-engine", d, "-o", tmp_path / "e"), 2, "no config.json")
    assert_one_line_error(invoke("inspect", d), 2, "no config.json")


def test_error_unsupported_architecture(tmp_path, tiny_llama):
    d = copy_tree(tiny_llama, tmp_path / "m")
    edit_json(d / "config.json", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    line = assert_one_line_error(invoke("convert", "hf-to-engine", d, "-o", tmp_path / "e"), 2, "GPT2LMHeadModel", "LlamaForCausalLM")
    assert "supported" in line
    assert_one_line_error(invoke("inspect", d), 2, "GPT2LMHeadModel")


def test_error_truncated_safetensors(tmp_path, tiny_llama):
    d = copy_tree(tiny_llama, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert_one_line_error(invoke("convert", "hf-to-engine", d, "-o", tmp_path / "e"), 2, "truncated", "model.safetensors")
    assert_one_line_error(invoke("generate", d, "-p", "hi"), 2, "truncated")
    assert not (tmp_path / "e").exists()


def test_error_bad_manifest(tmp_path, tiny_engine):
    eng = copy_tree(tiny_engine, tmp_path / "e")
    (eng / MANIFEST).write_text("{ this is not json")
    assert_one_line_error(invoke("inspect", eng), 2, "not valid JSON")
    assert_one_line_error(invoke("generate", eng, "-p", "hi"), 2, "not valid JSON")


def test_error_newer_engine_format(tmp_path, tiny_engine):
    eng = copy_tree(tiny_engine, tmp_path / "e")
    edit_json(eng / MANIFEST, lambda m: m.update(format_version=VERSION + 1))
    assert_one_line_error(invoke("inspect", eng), 2, "upgrade lmkiln")


def test_error_existing_output(tmp_path, tiny_llama):
    out = tmp_path / "e"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert_one_line_error(invoke("convert", "hf-to-engine", tiny_llama, "-o", out), 2, "already exists", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    # --force replaces a model or export, never a directory of other files
    assert_one_line_error(invoke("convert", "hf-to-engine", tiny_llama, "-o", out, "--force"), 2,
                          "holds files that are not a model or export", "refusing to delete them even with --force")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    (out / "mine.txt").unlink()
    assert invoke("convert", "hf-to-engine", tiny_llama, "-o", out, "--force").exit_code == 0  # an empty directory
    (out / "extra.txt").write_text("part of the old output")
    r = invoke("convert", "hf-to-engine", tiny_llama, "-o", out, "--force")  # an engine: replaced whole
    assert r.exit_code == 0, r.output
    assert (out / MANIFEST).is_file() and not (out / "extra.txt").exists()


def test_error_bad_options(tmp_path, tiny_llama):
    assert_one_line_error(invoke("convert", "hf-to-engine", tiny_llama, "-o", tmp_path / "e", "--tp", "3"), 2, "--tp 3")
    assert_one_line_error(invoke("convert", "hf-to-engine", tiny_llama, "-o", tmp_path / "e", "--dtype", "fp8"), 2, "--dtype")
    assert not (tmp_path / "e").exists()


def test_error_output_inside_input(tmp_path, tiny_llama):
    d = copy_tree(tiny_llama, tmp_path / "m")
    assert_one_line_error(invoke("convert", "hf-to-engine", d, "-o", d / "engine"), 2, "must not be")
    assert not (d / "engine").exists()


def test_internal_error_is_one_line_exit_3(monkeypatch, tiny_llama):
    import lmkiln.inspect_model

    def boom(*a, **k):
        raise ZeroDivisionError("synthetic bug")

    monkeypatch.setattr(lmkiln.inspect_model, "describe", boom)
    r = invoke("inspect", tiny_llama)
    assert r.exit_code == 3
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("internal error:")
    assert "ZeroDivisionError" in lines[0] and "--debug" in lines[0]
    r = invoke("--debug", "inspect", tiny_llama)
    assert isinstance(r.exception, ZeroDivisionError)


def test_debug_propagates_exception(tmp_path, tiny_llama):
    r = invoke("--debug", "convert", "hf-to-engine", tmp_path / "absent", "-o", tmp_path / "e")
    assert r.exit_code != 0
    assert isinstance(r.exception, InputError)
    out = tmp_path / "e2"
    out.mkdir()
    r = invoke("--debug", "convert", "hf-to-engine", tiny_llama, "-o", out)
    assert isinstance(r.exception, OutputExistsError)
    # --debug does not stick to the next invocation.
    assert_one_line_error(invoke("convert", "hf-to-engine", tmp_path / "absent", "-o", tmp_path / "e"), 2)


# -- real subprocesses --------------------------------------------------------------------


def test_subprocess_version():
    p = run_module("--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"lmkiln {lmkiln.__version__}"


def test_subprocess_error_and_debug(tmp_path):
    p = run_module("inspect", tmp_path / "absent")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no such file or directory" in lines[0]
    p = run_module("--debug", "inspect", tmp_path / "absent")
    assert p.returncode != 0
    assert "Traceback" in p.stderr
    assert "InputError" in p.stderr


def test_subprocess_convert_exits_fast_and_complete(tmp_path, tiny_llama):
    """`convert hf-to-engine` skips the interpreter's teardown on success (cli.FAST_EXIT): the
    process still exits 0 with its output printed, and the engine is complete and checks; a
    failure still exits 2 the normal way."""
    from lmkiln.cli import FAST_EXIT
    from lmkiln.formats.engine import Engine

    assert ("convert", "hf-to-engine") in FAST_EXIT
    p = run_module("convert", "hf-to-engine", tiny_llama, "-o", tmp_path / "e")
    assert p.returncode == 0, p.stderr
    assert f"wrote {tmp_path / 'e'}" in " ".join(p.stdout.split())
    assert Engine(tmp_path / "e", check=True).verify_checksums() == {"rank0.safetensors": True, "shared.safetensors": True}
    p = run_module("convert", "hf-to-engine", tiny_llama, "-o", tmp_path / "e")  # exists, no --force
    assert p.returncode == 2 and "--force" in p.stderr


def test_usage_errors_are_one_line(tiny_engine):
    """A typo'd command, a missing argument or a value out of range: one line naming it and where the
    help is, exit 2 (Typer alone drew a box of five lines and more); --help and --version still work."""
    for args, needle in ((["generate", tiny_engine, "-p", "Hi", "-n", "0"], "Invalid value for '--max-new-tokens'"),
                         (["frobnicate"], "No such command 'frobnicate'"),
                         (["convert", "hf-to-engine"], "Missing argument")):
        p = run_module(*args)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, p.stderr
        assert lines[0].startswith("error:") and needle in lines[0] and "--help`)" in lines[0], lines[0]
    p = run_module("generate", "--help")
    assert p.returncode == 0 and "--max-new-tokens" in p.stdout
    p = run_module("--version")
    assert p.returncode == 0 and p.stdout.startswith("lmkiln ")


def test_convert_notes_a_missing_or_unloadable_tokenizer(tmp_path, tiny_llama, monkeypatch):
    """A weights-only checkpoint still converts (exit 0), but the note says now, not at the first
    generate, that the engine has no tokenizer; the same for tokenizer files transformers cannot load."""
    src = tmp_path / "weights-only"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(tiny_llama / f, src / f)
    r = invoke("convert", "hf-to-engine", src, "-o", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert "has no tokenizer files: generate and verify need a tokenizer" in " ".join(r.stderr.split())
    (src / "tokenizer_config.json").write_text("[", encoding="utf-8")
    r = invoke("convert", "hf-to-engine", src, "-o", tmp_path / "e2")
    assert r.exit_code == 0 and "has tokenizer files transformers cannot load" in " ".join(r.stderr.split()), r.output
    r = invoke("convert", "hf-to-engine", tiny_llama, "-o", tmp_path / "e3")
    assert r.exit_code == 0 and "note:" not in r.output, r.output
    # generate from the weights-only directory says so before converting it on the fly
    (src / "tokenizer_config.json").unlink()
    import lmkiln.convert.hf_to_engine as h2e

    monkeypatch.setattr(h2e, "convert_hf_to_engine", lambda *a, **k: pytest.fail("converted before the tokenizer check"))
    r = invoke("generate", src, "-p", "Once", "-n", "2")
    assert r.exit_code == 2 and "no tokenizer" in r.stderr and "lmkiln-engine" not in r.output, r.output


def test_convert_and_inspect_qwen3(tmp_path):
    hf = make_tiny_model(tmp_path / "hf", "Qwen3ForCausalLM", seed=5)
    r = invoke("convert", "hf-to-engine", hf, "-o", tmp_path / "e")
    assert r.exit_code == 0, r.output
    r = invoke("inspect", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert "Qwen3ForCausalLM" in r.stdout and "all hold" in r.stdout
    assert "4 / 2 / 24" in r.stdout  # heads / kv heads / explicit head_dim


def test_two_runs_into_one_output(tmp_path, tiny_llama):
    """A second writer of the same output fails at once in one line (found by running two
    quantize runs into one -o: the later crashed with exit 3 on the other's files)."""
    from lmkiln.formats.atomic import output_lock

    out = tmp_path / "q"
    with output_lock(out):  # as another lmkiln process writing `out` holds it
        r = invoke("quantize", tiny_llama, "-o", out, "--w4a16", "--group-size", "16", "--calib-samples", "2", "--calib-seqlen", "32")
        assert_one_line_error(r, 2, "another lmkiln process is writing this output")
        r = invoke("convert", "hf-to-engine", tiny_llama, "-o", out)  # (its progress bar may have started)
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")][0].endswith("wait for it to finish, or choose another -o")
    assert not out.exists() and not list(tmp_path.glob(".q.*"))  # nothing written, the lock gone with its holder
    assert invoke("convert", "hf-to-engine", tiny_llama, "-o", out).exit_code == 0


def test_output_that_appears_midway_is_not_replaced(tmp_path):
    from lmkiln.formats.atomic import atomic_dir

    out = tmp_path / "o"
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        with atomic_dir(out) as tmp:
            (tmp / "mine").write_text("new")
            out.mkdir()
            (out / "theirs").write_text("old")
    assert (out / "theirs").read_text() == "old"


def test_interrupted_quantize_says_how_to_resume(tmp_path):
    """Ctrl-C (or SIGTERM) after some layers are done: one line saying how many are kept and
    that --resume continues after them; the same command with --resume then finishes."""
    from lmkiln.assets import bundled_model_path
    from lmkiln.quant.pipeline import STOP_ENV

    out = tmp_path / "q"
    args = ["quantize", bundled_model_path(), "-o", out, "--w4a16", "--group-size", "32", "--method", "rtn"]
    env = {**os.environ, **ENV, STOP_ENV: "1"}  # lmkiln's test hook: KeyboardInterrupt right after layer 1 is saved
    r = subprocess.run([sys.executable, "-m", "lmkiln", *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 130, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("layers", "device", "calibration"))]
    assert lines == [f"interrupted; 2 finished layer(s) kept beside {out}: run the same command with --resume to "
                     "continue after them"], r.stderr
    assert not out.exists()
    r = run_module(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming after 2 finished layer(s)" in r.stderr + r.stdout and (out / "config.json").is_file()


def test_an_engine_without_tokenizer_files(tmp_path):
    """An engine whose tokenizer files are gone: generate and verify say so in one line (the
    recorded class loaded as an empty tokenizer: generate printed the prompt back, exit 0; verify
    blamed the evaluation text); export onnx notes that onnxruntime-genai will need them."""
    from lmkiln.assets import bundled_model_path
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    eng = convert_hf_to_engine(bundled_model_path(), tmp_path / "e")
    for f in eng.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            f.unlink()
    assert_one_line_error(invoke("generate", eng, "-p", "Once", "-n", "2"), 2, f"{eng}: no tokenizer files")
    assert_one_line_error(invoke("verify", eng, bundled_model_path(), "--max-tokens", "64"), 2, f"{eng}: no tokenizer files")
    r = invoke("export", "onnx", eng, "-o", tmp_path / "x")
    assert r.exit_code == 0 and "no tokenizer files in" in r.stdout.replace("\n", " "), r.output
    r = invoke("inspect", eng)  # the manifest lists them: inspect says which are gone
    assert r.exit_code == 0 and "MISSING: tokenizer.json" in r.stdout.replace("\n", " "), r.output
    q = tmp_path / "q"
    assert invoke("quantize", bundled_model_path(), "-o", q, "--w4a16", "--group-size", "32", "--method", "rtn", "--to",
                  "engine").exit_code == 0
    for f in q.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            f.unlink()
    r = invoke("convert", "to-compressed-tensors", q, "-o", tmp_path / "ct")  # vLLM needs them too
    assert r.exit_code == 0 and "no tokenizer files in" in r.stdout.replace("\n", " "), r.output


def test_a_prompt_that_is_not_utf8(tmp_path):
    """Bytes that are not UTF-8 on the command line (lone surrogates in Python) were an internal
    error from the tokenizer; now one line."""
    from lmkiln.assets import bundled_model_path

    r = subprocess.run([os.fsencode(sys.executable), b"-m", b"lmkiln", b"generate", os.fsencode(bundled_model_path()), b"-p",
                        b"abc\xff\xfedef", b"-n", b"2"], capture_output=True, env={**os.environ, **ENV}, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.decode().strip() == "error: prompt 1 is not valid UTF-8 text; pass it in UTF-8"


def test_brackets_in_paths_and_text_are_not_markup(tmp_path):
    """Rich read '[x]' in a path (or in generated text) as markup and dropped it from 'wrote'
    lines, table titles and generate's output; and '[ray]' from the install hint in --help."""
    from lmkiln.assets import bundled_model_path

    out = tmp_path / "e [x] ü"
    r = invoke("convert", "hf-to-engine", bundled_model_path(), "-o", out)
    assert r.exit_code == 0 and f"wrote {out}" in r.stdout, r.output
    r = invoke("inspect", out)
    assert r.exit_code == 0 and f"{out} (lmkiln engine)" in r.stdout.replace("\n", ""), r.output
    r = invoke("generate", out, "-p", "[b]Once[/b] upon", "-n", "2")
    assert r.exit_code == 0 and r.stdout.startswith("[b]Once[/b] upon"), r.output
    r = invoke("quantize", "--help")
    assert "pip install 'lmkiln[ray]'" in r.stdout.replace("\n", "")


def test_an_error_after_the_bar_started_leaves_no_empty_line(tmp_path):
    """verify runs the reference (its bar appears) and then finds the candidate truncated: stderr
    is the error line alone (stopping the cleared bar wrote an empty line before it into logs)."""
    from lmkiln.assets import bundled_model_path
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    eng = convert_hf_to_engine(bundled_model_path(), tmp_path / "e")
    f = next(eng.glob("rank*.safetensors"))
    os.truncate(f, f.stat().st_size - 1000)
    r = invoke("verify", bundled_model_path(), eng, "--max-tokens", "64")
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, repr(r.stderr)


@pytest.mark.parametrize("exc", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 65536000 bytes"),
    OSError(12, "Cannot allocate memory"),
    RuntimeError("can't start new thread"),
    ImportError("libtorch_cpu.so: failed to map segment from shared object"),
])
def test_running_out_of_memory_is_one_line_not_an_internal_error(tiny_engine, monkeypatch, exc):
    """A memory limit (ulimit -v, a cgroup) made every command exit 3 'internal error'; verify even exited 1
    ('a threshold failed', to a CI gate) when printing the error needed memory too."""
    import lmkiln.inspect_model

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(lmkiln.inspect_model, "describe", boom)
    r = invoke("inspect", tiny_engine)
    assert r.exit_code == 2 and r.output.startswith("error: out of memory (") and len(r.output.splitlines()) == 1, r.output
    assert "internal error" not in r.output
    # with no memory left for rich's rendering, the same line plainly
    from lmkiln import cli

    monkeypatch.setattr(cli.err, "print", lambda *a, **k: boom())
    r = invoke("inspect", tiny_engine)
    assert r.exit_code == 2 and "error: out of memory (" in r.output, r.output


def test_a_real_internal_error_still_says_so(tiny_engine, monkeypatch):
    import lmkiln.inspect_model

    monkeypatch.setattr(lmkiln.inspect_model, "describe", lambda *a, **k: {}["x"])
    r = invoke("inspect", tiny_engine)
    assert r.exit_code == 3 and r.output.startswith("internal error: KeyError"), r.output


def test_named_choices_ignore_case_and_spaces_in_every_command(tiny_llama, tmp_path):
    """--device took CPU while --dtype FP16, --method RTN and --type Q8_0 were refused (and quantize alone took
    ' FP16 '): every named choice now reads as --device does."""
    r = invoke("convert", "hf-to-engine", tiny_llama, "-o", tmp_path / "e", "--dtype", " FP16 ")
    assert r.exit_code == 0, r.output
    assert json_load(tmp_path / "e" / MANIFEST)["weight_type"] == "fp16"
    r = invoke("quantize", tiny_llama, "-o", tmp_path / "q", "--w4a16", "--group-size", "32", "--method", "RTN",
               "--to", "Engine", "--dtype", "FP32", "--device", "CPU")
    assert r.exit_code == 0, r.output
    r = invoke("export", "gguf", tmp_path / "q", "-o", tmp_path / "q.gguf", "--type", "Q8_0")
    assert r.exit_code == 0, r.output
    r = invoke("export", "onnx", tmp_path / "q", "-o", tmp_path / "x", "--ep", "CPU")
    assert r.exit_code == 0, r.output
    r = invoke("generate", tmp_path / "e", "-p", "Hi", "-n", "2", "--dtype", "Fp32")
    assert r.exit_code == 0, r.output
    r = invoke("quantize", tiny_llama, "-o", tmp_path / "q2", "--w4a16", "--method", "RTNX")
    assert r.exit_code == 2 and "'rtnx'" in r.output  # still refused, as lowercased


@pytest.mark.parametrize("name,value,where", [
    ("model.layers.3.mlp.up_proj.weight", float("nan"), "decoder layer 3, shape (172, 64)"),
    ("model.embed_tokens.weight", float("-inf"), "shape (512, 64)"),
])
def test_convert_refuses_nan_or_inf_in_a_source_weight(name, value, where, tmp_path):
    """convert copied a NaN or Inf weight into the engine without a word (generate then failed on NaN
    logits, verify on the reference); now one line naming the tensor and its layer, and no engine."""
    from safetensors.torch import load_file, save_file

    from lmkiln.assets import bundled_model_path

    src = copy_tree(bundled_model_path(), tmp_path / "src")
    sd = load_file(str(src / "model.safetensors"))
    sd[name][5, 7] = value
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    for dtype in ("auto", "fp16"):
        r = invoke("convert", "hf-to-engine", src, "-o", tmp_path / "e", "--dtype", dtype)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert f"tensor '{name}' ({where}) contains NaN or Inf values" in lines[0], lines[0]
        assert not (tmp_path / "e").exists() and not list(tmp_path.glob("*partial*"))
    # the refusal came mid-copy while a thread resolved the tokenizer's class (importing transformers): the
    # call returns only once that thread is done, else the caller's next `import transformers` (the Python
    # API, the next test) finds a half-initialised module
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    with pytest.raises(InputError, match="contains NaN or Inf values"):
        convert_hf_to_engine(src, tmp_path / "e")
    spec = sys.modules["transformers"].__spec__
    assert not getattr(spec, "_initializing", False)
    assert sys.modules["transformers"].LlamaConfig.model_type == "llama"


@pytest.mark.parametrize("argv,needle", [
    (["convert", "hf-to-engine", "m", "-o", "x", "--tp", "2.0"], "'--tp': '2.0' is not a whole number"),
    (["quantize", "m", "-o", "x", "--calib-samples", "3_2"], "'--calib-samples': '3_2' is not a whole number"),
    (["quantize", "m", "-o", "x", "--group-size", "1e2"], "'--group-size': '1e2' is not a whole number"),
    (["verify", "a", "b", "--seqlen", "4"], "'--seqlen': 4 is below the smallest allowed, 8"),
    (["generate", "e", "-p", "Hi", "-n", "\uff13"], "'-n': '\uff13' is not a whole number"),
    (["export", "onnx", "e", "-o", "x", "--head-bits", "4.5"], "'--head-bits': '4.5' is not a whole number"),
    (["verify", "a", "b", "--max-kl", "0_5"], "'--max-kl': '0_5' is not a number"),
    (["quantize", "m", "-o", "x", "--damp", "1_0"], "'--damp': '1_0' is not a number"),
])
def test_number_options_take_only_numbers_as_written(argv, needle, monkeypatch, capsys):
    """Typer's lax coercion read `--tp 2.0` as 2, `--calib-samples 3_2` as 32, a full-width digit as a
    digit and `--max-kl 0_5` as 5.0; each is now a one-line usage error naming the value, before any
    input is read."""
    from lmkiln import cli

    monkeypatch.setattr(sys, "argv", ["lmkiln", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err


def test_number_options_still_take_plain_values_and_show_their_bounds(tiny_llama, tmp_path):
    r = invoke("convert", "hf-to-engine", tiny_llama, "-o", tmp_path / "e", "--tp", " 2 ")
    assert r.exit_code == 0, r.output
    assert json_load(tmp_path / "e" / MANIFEST)["tensor_parallel"] == 2
    r = invoke("quantize", "--help")
    assert r.exit_code == 0 and "(At least 1.)" in " ".join(r.output.split()), r.output
    from lmkiln.cli import _real

    assert [_real(v) for v in ("1e-2", " .5 ", "5.", "-3", "+2E1")] == [0.01, 0.5, 5.0, -3.0, 20.0]
    assert _real("inf") == float("inf") and _real("NaN") != _real("NaN")  # (left to the commands' own checks)


def json_load(p):
    import json

    return json.loads(p.read_text())


@pytest.mark.parametrize("argv,where", [
    (["convert", "hf-to-engine", "m", "-o", "x", "--force=false"], "lmkiln convert hf-to-engine --help"),
    (["generate", "x", "-p"], "lmkiln generate --help"),
    (["quantize", "--bogus"], "lmkiln quantize --help"),
    (["nosuch"], "lmkiln --help"),
])
def test_a_usage_error_points_at_its_own_command_help(argv, where, monkeypatch, capsys):
    """Option usage errors said `see lmkiln --help`, whose page lists none of the command's options."""
    from lmkiln import cli

    monkeypatch.setattr(sys, "argv", ["lmkiln", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.rstrip().endswith(f"(see `{where}`)"), err
