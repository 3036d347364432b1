"""Outputs never destroy inputs or foreign files, and faults while writing them stay one line, exit 2.

Covers formats/atomic.py (resolved-path checks, stale temporaries, unwritable directories),
the side files (`--report`, `--plot`), verify's threshold ranges, `demo --workdir`, and
SIGTERM handled like Ctrl-C. Cases from a fault-injection audit (A1, A2, A5, A10, B1, B2, B9,
B10, C8): each used to delete an input, overwrite a file silently or end in exit 3.
"""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import copy_tree
from lmkiln.cli import app
from lmkiln.errors import InputError, OutputExistsError
from lmkiln.formats import atomic
from lmkiln.formats.atomic import atomic_dir, atomic_file, check_output, check_output_file, output_lock
from lmkiln.formats.engine import MANIFEST

ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
QUICK_VERIFY = ("--max-tokens", "64", "--max-new-tokens", "2")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def one_line_error(r, *needles) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.output and "internal error" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tiny_llama, tmp_path):
    return copy_tree(tiny_llama, tmp_path / "m")


# -- A1: an output spelled with `..` or through a symlink is compared resolved ------------------------------


def test_output_that_is_the_input_by_another_spelling_is_refused(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "mlink").symlink_to(model)
    before = snapshot(model)
    cases = [("m", "sub/../m"), ("mlink", "m"), ("m", "mlink"), ("m", "mlink/eng")]
    for src, out in cases:
        one_line_error(invoke("convert", "hf-to-engine", src, "-o", out, "--force"), "must not be, contain or sit inside the input")
        one_line_error(invoke("quantize", src, "-o", out, "--force", "--w4a16", "--group-size", "16", "--calib-samples", "2",
                              "--calib-seqlen", "16"), "must not be, contain or sit inside the input")
    one_line_error(invoke("export", "gguf", "mlink", "-o", "m/x.gguf"), "must not be or sit inside the input")
    assert snapshot(model) == before and not (model / "eng").exists()


def test_file_output_checks_resolve_symlinks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (tmp_path / "to_config").symlink_to(src / "config.json")
    (tmp_path / "to_src").symlink_to(src)
    for target in (tmp_path / "to_config", tmp_path / "to_src" / "new.json", tmp_path / "x" / ".." / "src" / "a.json"):
        with pytest.raises(InputError, match="must not be or sit inside the input"):
            check_output_file(target, True, inputs=(src,))
    with pytest.raises(InputError, match="must not be, contain or sit inside the input"):
        check_output(tmp_path / "to_src", True, inputs=(src / "config.json",))


# -- C8: --force over a symlinked output replaces the link and leaves nothing behind -------------------------


def test_force_over_a_symlinked_output_replaces_the_link(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(theirs)
    with pytest.raises(OutputExistsError, match="already exists"):
        check_output(link, False)
    with atomic_dir(link, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_dir() and not link.is_symlink() and (link / "new.txt").read_text() == "new"
    assert (theirs / "keep.txt").read_text() == "keep"  # what the link pointed to is not the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "theirs"]  # no .out.lmkiln-old-*, no lock


# -- B10: stale temporaries of a killed run are swept by the next writer, never a live one's -----------------


def test_next_writer_sweeps_stale_temporaries(tmp_path):
    out = tmp_path / "e"
    stale_dir = tmp_path / ".e.lmkiln-tmp-dead1"
    stale_dir.mkdir()
    (stale_dir / "rank0.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".e.lmkiln-tmp-dead2").write_bytes(b"partial")
    old = tmp_path / ".e.lmkiln-old-123"  # a kill between the two renames: the user's previous output
    old.mkdir()
    other = tmp_path / ".f.lmkiln-tmp-x"  # another output's temporary
    other.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".e.lmkiln-old-123", ".f.lmkiln-tmp-x", "e"]

    gguf = tmp_path / "m.gguf"
    (tmp_path / ".m.gguf.lmkiln-tmp-dead").write_bytes(b"half a gguf")
    with atomic_file(gguf) as tmp:
        tmp.write_bytes(b"GGUF")
    assert gguf.read_bytes() == b"GGUF" and not list(tmp_path.glob(".m.gguf.lmkiln-tmp-*"))


def test_a_live_writers_temporary_is_not_swept(tmp_path):
    out = tmp_path / "e"
    live = tmp_path / ".e.lmkiln-tmp-live"
    with output_lock(out):  # as another lmkiln process writing `out` holds it
        live.mkdir()
        with pytest.raises(InputError, match="another lmkiln process"):
            with atomic_dir(out):
                pass
        assert live.is_dir()


HANG = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lmkiln import cli
    from lmkiln.formats.atomic import atomic_dir
    from lmkiln.runtime.session import engine_dir

    @cli.app.command("hang")
    @cli.guarded
    def hang(out: Path, model: Path):
        with atomic_dir(out) as tmp, engine_dir(model) as eng:
            (tmp / "f").write_text("x")
            print("ready", tmp, eng, flush=True)
            time.sleep(120)

    sys.argv = ["lmkiln", "hang", *sys.argv[1:]]
    cli.main()
""")


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, tiny_llama):
    """`kill`, `timeout` and schedulers send SIGTERM: the output's temporary sibling and the
    on-the-fly engine in the system temp dir are removed, as for Ctrl-C."""
    p = subprocess.Popen([sys.executable, "-c", HANG, str(tmp_path / "out"), str(tiny_llama)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    try:
        line = p.stdout.readline().split()
        assert line and line[0] == "ready", p.stderr.read()
        tmp, eng = Path(line[1]), Path(line[2])
        assert tmp.is_dir() and eng.is_dir()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143, err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["terminated (SIGTERM); no output was left half-written"]
    assert not tmp.exists() and not eng.parent.exists()
    assert list(tmp_path.iterdir()) == []  # no output, no temporary, no lock


def test_sigkill_leftover_engine_is_swept_by_the_next_run(tmp_path, tiny_llama, monkeypatch):
    """SIGKILL (the OOM killer's signal) runs no cleanup: the temporary engine made from an HF directory
    stays in the system temp dir, model-sized. The next run that makes one removes every such engine
    whose owner is gone (its lock is free), and none that is in use or just being created."""
    from lmkiln.runtime import session

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    p = subprocess.Popen([sys.executable, "-c", HANG, str(tmp_path / "out"), str(tiny_llama)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **ENV, "TMPDIR": str(tmpdir)})
    try:
        line = p.stdout.readline().split()
        assert line and line[0] == "ready", p.stderr.read()
        dead = Path(line[2]).parent
        p.kill()
        p.wait(timeout=60)
    finally:
        p.kill()
    assert dead.is_dir() and dead.parent == tmpdir  # what SIGKILL leaves
    live = tmpdir / f"{session.TEMP_PREFIX}live"
    live.mkdir()
    young = tmpdir / f"{session.TEMP_PREFIX}young"
    young.mkdir()
    (young / session.IN_USE).touch()
    old = os.path.getmtime(dead / session.IN_USE) - 3600
    for d in (dead, live):
        (d / session.IN_USE).touch()
        os.utime(d / session.IN_USE, (old, old))
    fd = os.open(live / session.IN_USE, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process still using it
    try:
        assert session.sweep_temporary_engines(tmpdir) == [dead]
    finally:
        os.close(fd)
    assert not dead.exists() and live.is_dir() and young.is_dir()
    monkeypatch.setattr(session.tempfile, "tempdir", str(tmpdir))  # engine_dir sweeps before converting
    (young / session.IN_USE).touch()
    os.utime(young / session.IN_USE, (old, old))
    with session.engine_dir(tiny_llama) as eng:
        assert eng.parent.parent == tmpdir and not young.exists() and not live.exists()


# -- B1: an unwritable output directory is one line, exit 2, before any work ---------------------------------


def test_unwritable_output_directory_is_refused_up_front(model, tmp_path, monkeypatch):
    ro = tmp_path.resolve() / "ro"
    ro.mkdir()
    real_access = os.access  # as a read-only mount or chmod 555 answers (root ignores the mode bits)
    monkeypatch.setattr(atomic.os, "access", lambda p, mode, **k: Path(p).resolve() != ro and real_access(p, mode, **k))
    want = f"{ro}: not writable"
    one_line_error(invoke("convert", "hf-to-engine", model, "-o", ro / "e"), want, "choose another -o")
    one_line_error(invoke("quantize", model, "-o", ro / "q", "--w4a16", "--group-size", "16", "--calib-samples", "2",
                          "--calib-seqlen", "16"), want)
    # The report of a run whose output is fine: refused before the output is written, not after.
    one_line_error(invoke("quantize", model, "-o", tmp_path / "q", "--w4a16", "--group-size", "16", "--calib-samples", "2",
                          "--calib-seqlen", "16", "--report", ro / "r.json"), want, "choose another --report")
    assert not (tmp_path / "q").exists() and list(ro.iterdir()) == []


def test_permission_denied_creating_the_lock_or_temporary_is_exit_2(tmp_path, monkeypatch):
    """Where os.access says yes but the kernel still refuses (ACLs, root-squash, a remount)."""
    real_open, real_mkstemp = os.open, atomic.tempfile.mkstemp

    def open_(path, *a, **k):
        if str(path).endswith(".lmkiln-lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(atomic.os, "open", open_)
    with pytest.raises(InputError, match=re.escape(f"{tmp_path.resolve()}: not writable (") + ".*; choose another -o$"):
        with atomic_dir(tmp_path / "e"):
            pass
    monkeypatch.setattr(atomic.os, "open", real_open)

    def mkstemp(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    with pytest.raises(InputError, match=re.escape(f"{tmp_path.resolve()}: not writable (") + ".*; choose another --report$"):
        atomic.write_json(tmp_path / "r.json", {"a": 1})
    monkeypatch.setattr(atomic.tempfile, "mkstemp", real_mkstemp)
    assert list(tmp_path.iterdir()) == []


# -- A2, A10, B2: --report and --plot -----------------------------------------------------------------------


def test_report_and_plot_are_checked_before_the_work(tiny_llama, tiny_engine, tmp_path):
    eng = copy_tree(tiny_engine, tmp_path / "eng")
    before = snapshot(eng)
    keep = tmp_path / "keep.json"
    keep.write_text("precious")
    (tmp_path / "adir").mkdir()
    v = ("verify", tiny_llama, eng, *QUICK_VERIFY)
    cases = [
        (("--report", eng / MANIFEST), "--report must not be or sit inside the input"),
        (("--report", eng / "new.json"), "--report must not be or sit inside the input"),
        (("--report", keep), "already exists"),
        (("--report", tmp_path / "adir"), "is a directory"),
        (("--plot", tmp_path / "adir"), "is a directory"),
        (("--plot", tmp_path / "plot.txt"), "cannot write a .txt image"),
        (("--plot", tmp_path / "plot"), "no image type in the name"),
        (("--plot", keep.with_suffix(".png"), "--report", keep.with_suffix(".png")), "--report must not be the same file as (or sit inside) this run's other output"),
    ]
    for args, needle in cases:  # one line on stderr: refused before the progress bar, so before the work
        one_line_error(invoke(*v, *args), needle)
    one_line_error(invoke("export", "gguf", eng, "-o", tmp_path / "x.gguf", "--report", eng / "config.json"), "inside the input")
    one_line_error(invoke("export", "gguf", eng, "-o", tmp_path / "x.gguf", "--report", tmp_path / "adir"), "is a directory")
    one_line_error(invoke("export", "gguf", eng, "-o", tmp_path / "x.gguf", "--report", tmp_path / "x.gguf"), "must not be the same file as (or sit inside) this run's other output")
    assert not (tmp_path / "x.gguf").exists()
    assert snapshot(eng) == before and keep.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "eng", "keep.json"]


def test_report_and_plot_replace_a_file_only_with_force(tiny_llama, tiny_engine, tmp_path):
    report, plot = tmp_path / "r.json", tmp_path / "p.svg"
    report.write_text("old")
    plot.write_text("old")
    r = invoke("verify", tiny_llama, tiny_engine, *QUICK_VERIFY, "--report", report, "--plot", plot, "--force")
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["passed"] is True and plot.read_text().lstrip().startswith("<?xml")  # the type the name says
    # A5: 64 tokens decide nothing: said on stderr and in the report.
    assert any(ln.startswith("warning: only") and "tokens were scored" in ln for ln in r.stderr.splitlines()), r.stderr
    assert any("tokens were scored" in w for w in rep["warnings"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.svg", "r.json"]  # no temporaries, no locks


# -- A5: thresholds that cannot mean anything -----------------------------------------------------------------


@pytest.mark.parametrize("option,value,needle", [
    ("--min-top1", "5", "from 0 to 1"), ("--min-top5", "-3", "from 0 to 1"), ("--min-p-top", "1.5", "from 0 to 1"),
    ("--max-kl", "-1", "≥ 0"), ("--max-ppl-increase", "-0.5", "≥ 0"),
    # echoed as given: "--min-top1 1: choose a fraction from 0 to 1" read as if 1 were refused
    ("--min-top1", "1.0000001", "from 0 to 1"), ("--max-kl", "inf", "give a finite number")])
def test_impossible_thresholds_are_refused(option, value, needle, tiny_llama, tiny_engine):
    one_line_error(invoke("verify", tiny_llama, tiny_engine, *QUICK_VERIFY, option, value), f"{option} {float(value)!r}", needle)


def test_a_failing_value_is_never_printed_as_its_threshold():
    from lmkiln.verify.verify import _versus

    assert _versus(0.5, 0.25) == "0.5 vs threshold 0.25"
    assert _versus(0.27412212345, 0.27412212344) == "0.27412212345 vs threshold 0.27412212344"


# -- A3, B9: demo --workdir ------------------------------------------------------------------------------------


def test_demo_never_replaces_foreign_content(tmp_path):
    work = tmp_path / "w"
    (work / "stories260K-w4.onnx").mkdir(parents=True)
    (work / "stories260K-w4.onnx" / "mine.txt").write_text("precious")
    one_line_error(invoke("demo", "--workdir", work), "stories260K-w4.onnx: already exists", "--force")
    assert sorted(p.name for p in work.rglob("*")) == ["mine.txt", "stories260K-w4.onnx"]  # refused before step 1
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(invoke("demo", "--workdir", afile), "is a file, not a directory")


def test_demo_replaces_only_what_a_demo_wrote(tmp_path, tiny_engine):
    from lmkiln.cli import _demo_output

    assert _demo_output(tmp_path / "absent.engine", False) is False
    own = copy_tree(tiny_engine, tmp_path / "stories260K.engine")  # an lmkiln engine: an earlier demo's
    assert _demo_output(own, False) is True
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with pytest.raises(OutputExistsError):
        _demo_output(foreign, False)
    assert _demo_output(foreign, True) is True


# -- C8: quantize --dry-run runs the real run's output check -----------------------------------------------------


def test_dry_run_says_what_the_real_run_would_refuse(model, tmp_path):
    q = ("quantize", model, "--w4a16", "--group-size", "16", "--calib-samples", "2", "--calib-seqlen", "16", "--dry-run")
    (tmp_path / "exists").mkdir()
    r = invoke(*q, "-o", tmp_path / "exists")
    assert r.exit_code == 0, r.output
    assert "note the real run would stop here" in r.stdout and "already exists" in r.stdout
    r = invoke(*q, "-o", tmp_path / "exists", "--force")
    assert r.exit_code == 0 and "note" not in r.stdout
    one_line_error(invoke(*q, "-o", model / "x"), "must not be, contain or sit inside the input")
    one_line_error(invoke(*q, "-o", tmp_path / "nodir" / "x"), "does not exist")
    # options the real run refuses before any work printed a plan with exit 0 (fault sweep 4)
    for extra, says in [(("--calib", tmp_path / "missing.txt"), "does not exist"), (("--calib", "/dev/null"), "not a regular file"),
                        (("--report", model / "r.json"), "must not be or sit inside the input"),
                        (("--workers", "2"), "--workers goes with --ray"), (("--ray", ""), "--ray '': give a cluster address")]:
        one_line_error(invoke(*q, "-o", tmp_path / "new", *extra), says)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_output_on_a_filesystem_that_takes_no_new_files(tmp_path):
    """/proc answers ENOENT to creating a file in a directory that is there: one line naming it
    (was an internal error, exit 3, from the writer lock)."""
    with pytest.raises(InputError, match=r"^/proc: not writable"):
        with atomic_dir(Path("/proc/lmkiln-test-output")):
            pass


def test_force_does_not_delete_a_directory_of_other_files(tmp_path):
    """`-o ~/work --force` removed whatever the directory held (found by a fault sweep): --force
    replaces a model or export (or an empty directory), and refuses a directory of other files."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds files that are not a model or export .* refusing to delete them even "
                                                "with --force"):
        check_output(precious, force=True)
    assert (precious / "notes.txt").read_text() == "mine"
    for marker in ("manifest.json", "model.onnx", "config.json", "rank0.safetensors"):
        d = tmp_path / f"out-{marker}"
        d.mkdir()
        (d / marker).write_text("{}")
        assert check_output(d, force=True) == d.resolve()
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", force=True) == (tmp_path / "empty").resolve()


@pytest.mark.parametrize("spell", ["", ".", "..", "{cwd}"])
def test_the_current_directory_is_never_an_output(spell, model, tmp_path, monkeypatch):
    """`-o ""` (an unset $OUT) is `.` to a path: with --force the directory the user stood in, a model
    with their own notes in it, was deleted, then exit 3 on the relative paths read after it."""
    here = copy_tree(model, tmp_path / "mine" / "here")
    (here / "NOTES.txt").write_text("mine")
    monkeypatch.chdir(here)
    before = snapshot(tmp_path / "mine")
    r = invoke("convert", "hf-to-engine", model, "-o", spell.format(cwd=here), "--force")
    one_line_error(r, "current directory", "choose a new path")
    assert snapshot(tmp_path / "mine") == before


def test_force_never_replaces_a_fifo_or_device(tiny_llama, tiny_engine, tmp_path):
    """--force turned a FIFO given as --report (or /dev/null given to export gguf) into a regular file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = invoke("verify", tiny_llama, tiny_engine, "--report", fifo, "--force", *QUICK_VERIFY)
    one_line_error(r, "is a FIFO (named pipe), not a regular file", "--report")
    assert fifo.is_fifo()
    with pytest.raises(OutputExistsError, match="/dev/null: is a character device, not a regular file"):
        check_output_file(Path("/dev/null"), force=True)
    assert Path("/dev/null").is_char_device()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_report_where_no_file_can_be_created_is_refused_up_front(tmp_path):
    """os.access passes for root on /proc and /sys, so `quantize --report /sys/...` ran the whole
    job and failed when writing the report: the check now creates a file there."""
    with pytest.raises(InputError, match=r"^/proc: not writable"):
        check_output_file(Path("/proc/report.json"), False, (), "--report")
    assert check_output_file(tmp_path / "r.json", False, (), "--report") == (tmp_path / "r.json").resolve()
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


# -- signals outside a command's work, and a stdout that cannot be written (fault sweep, 2026-11-27) ----------

SIGNAL_IN_IMPORT = textwrap.dedent("""
    import builtins, os, signal, sys
    from lmkiln import cli
    assert "torch" not in sys.modules and "numpy" not in sys.modules
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, cli._on_signal)
    real = builtins.__import__
    def hook(name, *a, **k):  # the signal lands while numpy's C code is importing it (inside torch)
        if name == "numpy.core._multiarray_umath" or name == "numpy._core._multiarray_umath":
            builtins.__import__ = real
            os.kill(os.getpid(), signal.SIGTERM)
        return real(name, *a, **k)
    builtins.__import__ = hook
    try:
        cli._import_torch()
    except cli.Terminated:
        import numpy, torch
        print("raised after import", numpy.ones(2).sum(), torch.ones(2).sum().item())
    else:
        print("swallowed")
""")


def test_a_signal_during_the_torch_import_is_acted_on_after_it():
    """numpy's C import discards exceptions: a SIGTERM raised there was lost (the run went on to exit 0)
    or left numpy half-imported (exit 3). It is held until torch is imported, then raised."""
    r = subprocess.run([sys.executable, "-c", SIGNAL_IN_IMPORT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["raised", "after", "import", "2.0", "2.0"], (r.stdout, r.stderr)


SIGNAL_BEFORE_A_COMMAND = textwrap.dedent("""
    import os, signal, sys, time
    from lmkiln import cli
    sig = getattr(signal, sys.argv[1])
    def app(**kw):  # Ctrl-C or SIGTERM while Typer parses, before any command runs
        os.kill(os.getpid(), sig)
        time.sleep(5)
    cli.app = app
    sys.argv = ["lmkiln", "inspect", "x"]
    cli.main()
""")


@pytest.mark.parametrize("sig,code,says", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_a_signal_before_any_command_is_one_line(sig, code, says):
    r = subprocess.run([sys.executable, "-c", SIGNAL_BEFORE_A_COMMAND, sig], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **ENV})
    assert r.returncode == code, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [f"{says}; nothing was written yet"]


def test_verify_with_stdout_a_closed_pipe_still_writes_its_report(tiny_llama, tiny_engine, tmp_path):
    """`lmkiln verify ... | head -2`: rich exited 1 (verify's "failed") at the broken pipe, before the report."""
    report = tmp_path / "r.json"
    p = subprocess.Popen([sys.executable, "-m", "lmkiln", "verify", str(tiny_llama), str(tiny_engine), *QUICK_VERIFY,
                          "--report", str(report)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV})
    p.stdout.close()  # the reader is gone before the first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert "stdout" not in err and "Traceback" not in err  # a closed pipe is normal use: nothing to say
    assert json.loads(report.read_text())["passed"] is True


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_stdout_on_a_full_disk_is_one_warning_not_a_failure(tiny_llama, tmp_path):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "lmkiln", "convert", "hf-to-engine", str(tiny_llama), "-o", str(tmp_path / "e")],
                           stdout=full, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stderr.splitlines() if "stdout" in ln] == \
        ["warning: cannot write to stdout (No space left on device); its output is lost, the command goes on"]
    assert (tmp_path / "e" / MANIFEST).is_file()


def test_convert_with_stdout_closed(tiny_llama, tmp_path):
    """`>&-`: the fast exit flushed a stdout that is None (a traceback, exit 1, after the engine was written)."""
    r = subprocess.run([sys.executable, "-m", "lmkiln", "convert", "hf-to-engine", str(tiny_llama), "-o", str(tmp_path / "e")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV}, timeout=300,
                       preexec_fn=lambda: os.close(1))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "e" / MANIFEST).is_file()


@pytest.mark.parametrize("n", [240, 300])
def test_an_output_name_too_long_for_its_temporaries_is_one_line(tmp_path, n):
    """A legal 240-byte name failed with ENAMETOOLONG on `.NAME.lmkiln-tmp-*` as an internal error."""
    name = "a" * n
    with pytest.raises(InputError, match=rf"the name of the output is {n} bytes; at most {255 - atomic.SIBLING_EXTRA} here"):
        check_output(tmp_path / name, False)
    with pytest.raises(InputError, match=rf"the name of --report is {n} bytes"):
        check_output_file(tmp_path / name, False, option="--report")
    ok = tmp_path / ("b" * (255 - atomic.SIBLING_EXTRA))
    with atomic_dir(ok) as tmp:  # the longest name allowed: every temporary fits
        (tmp / "x").write_text("x")
    assert (ok / "x").is_file()
    r = invoke("export", "gguf", tmp_path, "-o", tmp_path / name)
    one_line_error(r, f"is {n} bytes")


def _lmkiln(*args, **env):
    return subprocess.run([sys.executable, "-m", "lmkiln", *map(str, args)], capture_output=True, timeout=300,
                          env={**os.environ, "NO_COLOR": "1", "TERM": "dumb", **env})


def test_generated_text_and_paths_are_printed_exactly(tiny_engine):
    """Piped, generate's text was wrapped at 80 columns by inserted newlines (and tabs, carriage
    returns dropped): a program reading it saw other text than the model wrote."""
    from lmkiln.runtime.session import generate_text

    prompt = "Once upon a time\tthere was a little girl named Lily who loved to play in the park\rwith her dog"
    r = _lmkiln("generate", tiny_engine, "-p", prompt, "-n", "24", COLUMNS="80")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == prompt + generate_text(tiny_engine, prompt, 24) + "\n"


def test_a_tiny_terminal_width_still_shows_the_error():
    """COLUMNS=0 printed nothing, not even the one error line (exit 2 with an empty stderr)."""
    r = _lmkiln("inspect", "/nonexistent", COLUMNS="0")
    assert r.returncode == 2 and r.stderr.decode().strip() == "error: /nonexistent: no such file or directory"


def test_a_stdout_without_the_characters_is_not_a_failure(tiny_engine):
    """PYTHONIOENCODING=ascii (or a Latin-1 locale): exit 3 after the work, at verify's `±`, a prompt's `é`."""
    r = _lmkiln("generate", tiny_engine, "-p", "héllo", "-n", "2", PYTHONIOENCODING="ascii")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode("ascii").startswith("h?llo")


def test_a_file_size_limit_is_one_line(tiny_llama, tmp_path):
    """`ulimit -f` (or FAT32's 4 GiB per file): EFBIG was an internal error in every writer."""
    import resource

    limit = 32 << 10
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    r = subprocess.run([sys.executable, "-m", "lmkiln", "convert", "hf-to-engine", str(tiny_llama), "-o", str(tmp_path / "e")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **ENV}, preexec_fn=small_files)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"error: {tmp_path}: a file of the output grew past the largest file allowed there; this process "
                                "may write files of at most 32.00 KiB (`ulimit -f`): raise the limit and re-run")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left
