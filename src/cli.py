"""The `lmkiln` command line: parsing and presentation only; the work lives in modules.

Every user error is a LmkilnError: one red line on stderr and exit 2 (no traceback
unless --debug). Anything else is a bug; it is reported in one line too, with a hint
to re-run with --debug for the traceback.
"""

from __future__ import annotations

import errno
import functools
import importlib
import json
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import lmkiln
from lmkiln.errors import LmkilnError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Turn Hugging Face LLM checkpoints into verified, quantized engines.")
convert_app = typer.Typer(no_args_is_help=True, help="Convert between formats.")
app.add_typer(convert_app, name="convert")
export_app = typer.Typer(no_args_is_help=True, help="Export engines for other runtimes (ONNX, GGUF).")
app.add_typer(export_app, name="export")

class _Stdout:
    """stdout that a closed pipe (`| head`), a closed descriptor or a full disk cannot break: the work
    goes on, reports and outputs are still written and the exit code still says how it went (rich
    would exit 1 on a broken pipe, which `verify` uses for "failed", and a full disk was exit 3).
    After the first failed write the descriptor points at /dev/null, so interpreter teardown's flush
    cannot fail either; any failure but a broken pipe (`| head` is normal use) is said once on stderr."""

    def __init__(self):
        self.failed = False

    def _lost(self, e: OSError) -> None:
        self.failed = True
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, sys.stdout.fileno())
            os.close(fd)
        except (OSError, ValueError, AttributeError):
            pass
        if not isinstance(e, BrokenPipeError):
            err.print(f"[yellow]warning:[/] cannot write to stdout ({escape(e.strerror or str(e))}); its output is lost, "
                      "the command goes on", highlight=False, soft_wrap=True)

    def write(self, text: str) -> int:
        if not self.failed and sys.stdout is not None:
            try:
                sys.stdout.write(text)
                sys.stdout.flush()  # (a line is lost at most: the failure is seen where it happens)
            except OSError as e:
                self._lost(e)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return not self.failed and sys.stdout is not None and sys.stdout.isatty()

    def fileno(self) -> int:
        if sys.stdout is None:
            raise OSError("stdout is closed")
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        return getattr(sys.stdout, "encoding", None) or "utf-8"


def _width() -> int | None:
    """COLUMNS as rich reads it, except that a tiny one (0 printed nothing at all, not even an error
    line; 1 a character a line) is raised to what a table needs."""
    cols = os.environ.get("COLUMNS", "")
    return max(int(cols), MIN_WIDTH) if cols.isdigit() and int(cols) < MIN_WIDTH else None


def _replace_unencodable() -> None:
    """A stdout/stderr whose encoding lacks a character lmkiln prints (PYTHONIOENCODING=ascii, a
    Latin-1 locale: `±` in verify's table, a prompt's `é`) shows `?` for it: the work was done, and
    an exit 3 after it would lie (verify's 0/1 is what CI gates on)."""
    for f in (sys.stdout, sys.stderr):
        try:
            if f is not None and f.errors == "strict":
                f.reconfigure(errors="replace")
        except (AttributeError, ValueError, OSError):  # (not a TextIOWrapper, or closed)
            pass


MIN_WIDTH = 40
# soft_wrap: a path, a message or generated text is never broken at the terminal width (80 when
# piped) by inserted newlines; tables still fit the width
err = Console(stderr=True, soft_wrap=True, width=_width())
out = Console(file=_Stdout(), soft_wrap=True, width=_width())
STATE = {"debug": False, "signal": None, "said": False}  # (the first Ctrl-C/SIGTERM; whether a command said so)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a scheduler's preemption), raised in the main thread like Ctrl-C so
    every `finally` and context manager removes its temporaries: Python's default would exit
    at once and leave model-sized `.NAME.lmkiln-tmp-*` and /tmp/lmkiln-engine-* copies behind."""


def _on_signal(signum, frame):
    """Ctrl-C or SIGTERM: raised once in the main thread; a second one while the first one's cleanup
    runs (removing temporaries takes a moment) is ignored rather than breaking that cleanup with a
    traceback. SIGKILL still ends a cleanup that hangs."""
    _ignore_signals()
    STATE["signal"] = signum
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _ignore_signals() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _import_torch() -> None:
    """Import torch with Ctrl-C and SIGTERM held until it is done, then acted on. Importing numpy
    (inside torch) from C discards exceptions: a signal landing there was silently lost (the
    command ran on to exit 0) or left numpy half-imported (exit 3)."""
    if "torch" in sys.modules or signal.getsignal(signal.SIGINT) is not _on_signal:  # (tests: no handlers of ours)
        importlib.import_module("torch")
        return
    held: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        importlib.import_module("torch")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if held:
        _on_signal(held[0], None)


# What running out of memory (or of threads, which need memory for their stacks) looks like from
# Python, numpy, torch and the OS; said as a fault of the machine, not as lmkiln's internal error.
OOM_TEXT = ("can't allocate memory", "cannot allocate memory", "unable to mmap", "out of memory", "can't start new thread",
            "failed to map segment")  # (the last: a shared library, torch's or numpy's, loaded under `ulimit -v`)
OOM_ADVICE = {  # by command function
    "quantize_cmd": "--dry-run shows the memory plan, a smaller --chunk lowers calibration memory, and --resume continues "
                "after the layers already finished",
    "verify_cmd": "the reference and the candidate run one after the other; --max-tokens and --seqlen lower what each holds",
}


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
        return True
    return isinstance(e, (RuntimeError, ImportError, OSError)) and any(t in str(e).lower() for t in OOM_TEXT)


def _say(markup: str, plain: str) -> None:
    """Print an error line; with no memory left for rich's rendering (it imports lazily), plainly."""
    try:
        err.print(markup, highlight=False, soft_wrap=True)
    except Exception:  # noqa: BLE001
        sys.stderr.write(plain + "\n")


def _choice(value):
    """A named choice as the user typed it: case and surrounding spaces do not matter (`--dtype FP16`,
    `--method AWQ`, `--type Q4_0`), as for --device; the API takes the lowercase names."""
    return value.strip().lower() if isinstance(value, str) else value


def _whole(low: int | None = None):
    """A parser for an integer option that takes only what the user plainly wrote: typer's lax
    coercion read `--tp 2.0` as 2 and `--calib-samples 3_2` as 32. (A `parser` replaces typer's
    `min=`, so the bound is checked here and shown in the help by `_int_option`.)"""
    def parse(value):
        if isinstance(value, int) and not isinstance(value, bool):  # a default
            n = value
        else:
            text = str(value).strip()
            if not re.fullmatch(r"[+-]?[0-9]+", text):
                raise typer.BadParameter(f"{str(value)!r} is not a whole number")  # (typer names the option)
            n = int(text)
        if low is not None and n < low:
            raise typer.BadParameter(f"{n} is below the smallest allowed, {low}")
        return n
    return parse


_REAL = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf(?:inity)?|nan)", re.IGNORECASE)


def _real(value):
    """A number option as written: typer's coercion read `--max-kl 0_5` as 5.0. (inf and nan pass on to the
    command's own checks, which name the fix.)"""
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):  # a default
        return float(value)
    text = str(value).strip()
    if not _REAL.fullmatch(text):
        raise typer.BadParameter(f"{str(value)!r} is not a number")
    return float(text)


def _int_option(default, *decls: str, min: int | None = None, help: str | None = None, **kw):  # noqa: A002
    bound = f"(At least {min}.)" if min is not None else None
    return typer.Option(default, *decls, parser=_whole(min), metavar="<int>",
                        help=" ".join(t for t in (help, bound) if t) or None, **kw)


def guarded(fn):
    """Turn errors into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _import_torch()  # every command's work needs it
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except LmkilnError as e:
            if STATE["debug"]:
                raise
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt as e:
            term = isinstance(e, Terminated)
            hint = getattr(e, "hint", None) or "no output was left half-written"
            STATE["said"] = True
            err.print(f"[bold red]{'terminated (SIGTERM)' if term else 'interrupted'}[/]; {escape(hint)}", highlight=False, soft_wrap=True)
            raise typer.Exit(143 if term else 130) from None
        except Exception as e:
            if STATE["debug"]:
                raise
            if _out_of_memory(e):
                e.__traceback__ = None  # its frames hold the step's tensors: freed before anything is printed
                detail = " ".join(str(e).split())[:300] or type(e).__name__
                advice = OOM_ADVICE.get(fn.__name__, "free memory or use a machine with more")
                msg = f"out of memory ({detail}); {advice}"
                _say(f"[bold red]error:[/] {escape(msg)}", f"error: {msg}")
                raise typer.Exit(2) from None
            msg = f"{type(e).__name__}: {' '.join(str(e).split())[:500]} (re-run with --debug for the traceback)"
            _say(f"[bold red]internal error:[/] {escape(msg)}", f"internal error: {msg}")
            raise typer.Exit(3) from None

    return wrapper


def _version(value: bool):
    if value:
        out.print(f"lmkiln {lmkiln.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    STATE["debug"] = debug


class Bar(Progress):
    """A progress bar that an error (or Ctrl-C) clears, so what ends the run is its one line on stderr."""

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.live.transient = True  # read when the display stops
            if not self.console.is_terminal or self.console.is_dumb_terminal:
                with self.console.capture():  # a log, not a screen: nothing to clear, and stopping wrote an empty line
                    return super().__exit__(exc_type, exc, tb)
        return super().__exit__(exc_type, exc, tb)


def progress_bar() -> Progress:
    return Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), console=err, transient=False)


def check_writable(path: Optional[Path], option: str, force: bool, inputs=(), outputs=()) -> None:
    """Refuse a --report file before any work, not after it: what formats/atomic.check_output_file
    refuses (a directory, an existing file without --force, an input or a file inside one, a
    missing or unwritable directory), and a file that is or sits inside another output of the run."""
    from lmkiln.formats.atomic import check_output_file

    if path is not None:
        check_output_file(path, force, tuple(inputs), option, outputs)


class LazyProgress:
    """A progress bar that appears on the first update, so input errors found before
    any work starts stay a single line on stderr."""

    def __init__(self, description: str):
        self.description, self.bar, self.task = description, None, None

    def _start(self):
        if self.bar is None:
            self.bar = progress_bar()
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=None)
        return self.bar

    def update(self, completed: int, total: int | None = None, description: str | None = None) -> None:
        kw = {"description": description} if description else {}
        self._start().update(self.task, completed=completed, total=total, **kw)

    def advance(self) -> None:
        self._start().advance(self.task)

    def print(self, msg: str) -> None:
        # plain text from the library (paths may hold "[x]"), one line each, as logged
        (self.bar.console if self.bar else err).print(msg, highlight=False, soft_wrap=True, markup=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


@convert_app.command("hf-to-engine")
@guarded
def hf_to_engine(
    model: Path = typer.Argument(..., help="Hugging Face model directory (config.json + safetensors)."),
    output: Path = typer.Option(..., "-o", "--output", help="Engine directory to create."),
    dtype: str = typer.Option("auto", callback=_choice, help="Weight dtype: auto (keep the source's), fp32, fp16, bf16. For an AWQ checkpoint it "
                              "applies to the fp tensors; int4/int8 weights travel unchanged."),
    tp: int = _int_option(1, "--tp", help="Tensor-parallel ranks to split the weights into."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin pickle weights (loaded with weights_only=True)."),
):
    """Convert a Hugging Face checkpoint (fp, or AWQ-GEMM int4/int8) into an lmkiln engine."""
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine, plan_engine
    from lmkiln.formats.atomic import check_output
    from lmkiln.formats.hf import HFCheckpoint

    ckpt = HFCheckpoint(model, allow_pickle=allow_pickle)
    _, _, _, plan, _ = plan_engine(ckpt, tp, dtype)
    check_output(output, force, inputs=(ckpt.path,))  # refuse before drawing a progress bar
    with progress_bar() as bar:
        task = bar.add_task("converting", total=len(plan))
        convert_hf_to_engine(model, output, dtype=dtype, tp=tp, force=force, allow_pickle=allow_pickle,
                             progress=lambda name, nbytes: bar.advance(task))
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    if not manifest.get("tokenizer_class"):  # an engine is still made (weights-only checkpoints convert), but say so now
        why = "has no tokenizer files" if not manifest.get("tokenizer_files") else "has tokenizer files transformers cannot load"
        err.print(f"[yellow]note:[/] {escape(str(model))} {why}: generate and verify need a tokenizer; copy the model's "
                  f"tokenizer files into {escape(str(output))}", highlight=False, soft_wrap=True)
    out.print(f"[green]wrote[/] {escape(str(output))}", highlight=False)


@convert_app.command("to-compressed-tensors")
@guarded
def to_compressed_tensors(
    model: Path = typer.Argument(..., help="An int4/int8 lmkiln engine, or an AWQ-GEMM Hugging Face directory (lmkiln's, "
                                 "AutoAWQ's, lmdeploy's)."),
    output: Path = typer.Option(..., "-o", "--output", help="compressed-tensors directory to create."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
):
    """Rewrite an engine or AWQ-GEMM as compressed-tensors pack-quantized (vLLM, SGLang): same codes and scales, nothing re-quantized."""
    from lmkiln.formats.engine import is_engine

    if is_engine(model):
        from lmkiln.export.compressed_tensors import engine_to_compressed_tensors as convert
    else:
        from lmkiln.quant.reformat import awq_to_compressed_tensors as convert
    path = convert(model, output, force=force)
    _note_missing_tokenizer(path, model, "vLLM and SGLang")
    out.print(f"[green]wrote[/] {escape(str(path))}", highlight=False)


def _note_missing_tokenizer(path: Path, source: Path, who: str) -> None:
    """An output without tokenizer files is still written (weights-only sources exist); say so."""
    from lmkiln.formats.hf import has_tokenizer

    if not has_tokenizer(path):
        out.print(f"[yellow]note[/] no tokenizer files in {escape(str(source))}: {who} need them beside the weights; "
                  "copy the tokenizer files of the model it came from into the output", highlight=False, soft_wrap=True)


@export_app.command("onnx")
@guarded
def export_onnx_cmd(
    source: Path = typer.Argument(..., help="An engine (fp, int4, int8), or an HF / AWQ-GEMM directory (converted on the fly)."),
    output: Path = typer.Option(..., "-o", "--output", help="Export folder to create."),
    ep: str = typer.Option("cpu", "--ep", callback=_choice, help="Execution provider the graph targets: cpu (fp32) or cuda (fp16)."),
    portable: bool = typer.Option(False, "--portable", help="Standard ONNX ops only (opset 21 DequantizeLinear + MatMul, plain attention)."),
    triton: bool = typer.Option(False, "--triton", help="Also lay out a Triton Inference Server model repository."),
    accuracy_level: Optional[int] = _int_option(None, "--accuracy-level", help="MatMulNBits accuracy_level: 0 exact, 4 int8 activations (faster; the CPU default, see docs/export-onnx.md). Default: 4 on CPU, 0 on CUDA."),
    head_bits: Optional[int] = _int_option(None, "--head-bits", help="Output head: 0 keeps it fp (as in the engine); 4 or 8 quantizes it at export (symmetric RTN; int4 in blocks of 32, int8 in blocks of 128 at accuracy level 4 on CPU): smaller and faster, not bit-faithful. Default: 8 for an int4/int8 engine on CPU at accuracy level 4 (+0.3 % KL, a third of the bytes per token at real vocabularies), else 0 (docs/export-onnx.md)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip checking the engine's weight files against their checksums."),
):
    """Export to ONNX for onnxruntime (CPU/CUDA), onnxruntime-genai and Triton."""
    from lmkiln.errors import InputError
    from lmkiln.export import EXPORT_INFO, export_onnx

    if head_bits not in (None, 0, 4, 8):
        raise InputError(f"--head-bits {head_bits}: choose 0 (fp head), 4 or 8")
    with LazyProgress("exporting") as bar:
        path = export_onnx(source, output, ep=ep, portable=portable, triton=triton, force=force,
                           progress=lambda name, n: bar.advance(), accuracy_level=accuracy_level, head_bits=head_bits,
                           check=not no_check)
    _note_missing_tokenizer(path, source, "onnxruntime-genai and Triton's genai backend")
    dequantized = json.loads((path / EXPORT_INFO).read_text(encoding="utf-8")).get("dequantized_linears") or []
    if dequantized:
        out.print(f"[yellow]note[/] {len(dequantized)} quantized linear(s) exported as float weights (larger file), e.g. "
                  f"{dequantized[0]}", markup=True, highlight=False)
    out.print(f"[green]wrote[/] {escape(str(path))}", highlight=False)


@export_app.command("gguf")
@guarded
def export_gguf_cmd(
    source: Path = typer.Argument(..., help="An engine (fp, int4, int8), or an HF / AWQ-GEMM directory (converted on the fly)."),
    output: Path = typer.Option(..., "-o", "--output", help="GGUF file to create (e.g. model.gguf)."),
    gtype: str = typer.Option("auto", "--type", callback=_choice, help="auto (AWQ int4 -> q4_1, or q4_0 if symmetric; int8 -> q8_0; fp -> f16), "
                              "f32, f16, q8_0, q4_0, q4_1."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the export report (JSON) here."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output (and --report file)."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip checking the engine's weight files against their checksums."),
):
    """Export one GGUF file for llama.cpp and Ollama; AWQ codes become Q4_1/Q4_0/Q8_0 blocks as they are."""
    from lmkiln.export.gguf import export_gguf
    from lmkiln.formats.atomic import write_json

    check_writable(report, "--report", force, (source,), (output,))
    with LazyProgress("exporting") as bar:
        res = export_gguf(source, output, gtype=gtype, force=force, progress=lambda name, n: bar.advance(), on_info=bar.print,
                          check=not no_check)
    rep = res.report
    out.print("tensors: " + ", ".join(f"{n} {k}" for k, n in sorted(rep["counts"].items())), highlight=False)
    if rep["m_rounding"]:
        m = rep["m_rounding"]
        out.print(f"q4_1 m = -scale*zero rounded to fp16: max |error| {m['max_abs_err']:.3g} "
                  f"({m['max_err_steps']:.3g} of a step), rms {m['rms_err']:.3g} over {m['blocks']} blocks", highlight=False)
    if report is not None:
        write_json(report, rep, force, (source,))
    out.print(f"[green]wrote[/] {escape(str(res.path))}", highlight=False)


@app.command("quantize")
@guarded
def quantize_cmd(
    model: Path = typer.Argument(..., help="Hugging Face model directory (fp16/bf16/fp32)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory to create."),
    w4a16: bool = typer.Option(False, "--w4a16", help="4-bit weights, 16-bit activations."),
    w8a16: bool = typer.Option(False, "--w8a16", help="8-bit weights, 16-bit activations."),
    method: str = typer.Option("awq", callback=_choice, help="awq (activation-aware scales), gptq (Hessian-guided rounding), awq+gptq "
                               "(AWQ's scales, then GPTQ rounding), or rtn (round to nearest, no calibration)."),
    damp: float = typer.Option(0.01, "--damp", parser=_real, help="GPTQ: Hessian dampening, a fraction of its mean diagonal."),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: visit columns by decreasing activation energy (static groups: same layout)."),
    min_expert_tokens: int = _int_option(16, "--min-expert-tokens", min=1, help="Mixture of experts: an expert routed fewer calibration tokens gets round-to-nearest (reported)."),
    calib_inputs: str = typer.Option("fp", "--calib-inputs", callback=_choice, help="What the next layer calibrates on: fp (the original model's outputs; layers independent, --ray parallel) or quantized (the quantized layers' outputs, one after another; usually more accurate, see docs/quantize.md)."),
    group_size: int = _int_option(128, "--group-size", help="Weights per quantization group along the input; -1 = per channel."),
    sym: bool = typer.Option(False, "--sym", help="Symmetric quantization (no zero points)."),
    calib: Optional[str] = typer.Option(None, "--calib", help=".txt, .jsonl (text field) or a directory of them; default: bundled WikiText-2 validation excerpt."),
    calib_samples: int = _int_option(128, "--calib-samples", min=1),
    calib_seqlen: int = _int_option(512, "--calib-seqlen", min=8),
    seed: int = _int_option(0, "--seed", min=0, help="Seed for sampling calibration windows."),
    no_clip: bool = typer.Option(False, "--no-clip", help="Skip the weight clipping search."),
    duo_scaling: bool = typer.Option(True, "--duo-scaling/--no-duo-scaling", help="Scale by activation and weight magnitude (AutoAWQ's duo scaling)."),
    to: str = typer.Option("hf", "--to", "--format", callback=_choice, help="hf: AWQ-GEMM Hugging Face directory (transformers, vLLM, SGLang, "
                           "lmdeploy); compressed-tensors: pack-quantized HF directory (vLLM, SGLang; pip install "
                           "'lmkiln\\[compressed-tensors]'); engine: an lmkiln engine."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished layer."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output (and --report file)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the quantization report (JSON) here."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N: where every step runs."),
    dtype: str = typer.Option("auto", "--dtype", callback=_choice, help="Calibration precision: auto (fp32 on CPU, bf16 on CUDA), fp32, bf16, fp16. The output keeps the source dtype."),
    chunk: int = _int_option(0, "--chunk", min=0, help="Calibration samples resident on the device at once (0 = auto, by activation memory): bounds memory, never changes results."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (layers, memory, disk) from the headers alone and exit."),
    probe: bool = typer.Option(False, "--probe", help="With --dry-run: also time one layer to estimate the total."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                      help="Run the layer jobs as Ray tasks (pip install 'lmkiln\\[ray]'): alone, a local Ray "
                                           "runtime on this machine's CPUs/GPUs; with an address (host:6379, ray://host:10001, "
                                           "auto), that cluster. Output is bit-identical to a run without it."),
    workers: int = _int_option(0, "--workers", min=0, help="With --ray: concurrent layer jobs (0 = one per GPU, or by CPUs and memory)."),
):
    """Quantize weights to int4/int8 with AWQ (or RTN), one decoder layer at a time."""
    from lmkiln.errors import InputError
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.job import resolve_compute
    from lmkiln.quant.pipeline import (METHODS, CalibOptions, check_driver, finished_layers, plan_json, plan_quantize,
                                       quantize_model, unused_options)

    if w4a16 == w8a16:
        raise InputError("choose exactly one of --w4a16 or --w8a16")
    if probe and not dry_run:
        raise InputError("--probe goes with --dry-run")
    opts = QuantOptions(bits=4 if w4a16 else 8, group_size=group_size, symmetric=sym, method=method,
                        clip=not no_clip, duo_scaling=duo_scaling, chunk=chunk, damp=damp, act_order=act_order,
                        min_expert_tokens=min_expert_tokens, calib_inputs=calib_inputs)
    calib_opts = CalibOptions(path=calib, n_samples=calib_samples, seqlen=calib_seqlen, seed=seed)
    unused = unused_options(opts, calib_opts) if method in METHODS else []
    if unused:
        err.print(f"[yellow]note[/] {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by --method {method}"
                  + (": round-to-nearest needs no calibration text" if not opts.calibrated and calib is not None else ""),
                  highlight=False, soft_wrap=True)
    if workers and ray is None:
        raise InputError("--workers goes with --ray")
    if ray is not None and not ray.strip():
        raise InputError("--ray '': give a cluster address (HOST:PORT or auto), or --ray alone for this machine")
    if dry_run:
        note = _dry_run_output(output, force, model)
        check_writable(report, "--report", force, inputs=(model,), outputs=(output,))
        check_driver(opts, ray is not None)
        compute = resolve_compute(device, dtype)
        if not probe:
            plan = plan_quantize(model, output, opts, calib_opts, compute, to=to)
            _plan_table(plan)
            rep = {"dry_run": True, "plan": plan_json(plan)}
        else:
            res = quantize_model(model, output, opts, calib_opts, to=to, device=device, dtype=dtype, probe_only=True)
            secs = res.report["layers"][0]["seconds"]
            _plan_table(res.plan, [("seconds for one layer (probe)", f"{secs:.1f} s"),
                                   ("estimated total", f"{secs * res.plan.n_layers / 60:.1f} min for {res.plan.n_layers} layers")])
            rep = {"dry_run": True, "probe": True, "plan": plan_json(res.plan), **res.report}
        if report is not None:  # the plan (with --probe, the probed layer's report) as JSON
            from lmkiln.formats.atomic import write_json

            write_json(report, rep, force, (Path(model),))
            out.print(f"wrote {escape(str(report))}", highlight=False, soft_wrap=True)
        if note:
            out.print(f"[yellow]note[/] the real run would stop here: {escape(note)}", highlight=False, soft_wrap=True)
        return
    with LazyProgress("layers") as bar:
        driver, on_layer = None, (lambda i, n, rep: bar.update(i + 1, n))
        if ray is not None:
            from lmkiln.quant.ray_driver import RayDriver, import_ray

            import_ray()  # before any work: a missing extra is a one-line error
            driver = RayDriver(address=None if ray == "local" else ray, workers=workers, on_info=bar.print,
                               on_progress=lambda d, r, q, n: bar.update(d, n, f"layers: {d} done · {r} running · {q} queued"))
            on_layer = None
        try:
            result = quantize_model(model, output, opts, calib_opts, to=to, force=force, resume=resume, report_path=report,
                                    on_layer=on_layer, on_info=bar.print, device=device, dtype=dtype, driver=driver)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: say what was kept and how to go on
            done = finished_layers(output)
            if done:
                e.hint = (f"{done} finished layer(s) kept beside {output}: run the same command with --resume to continue "
                          "after them")
            raise
    _quant_table(result.report)
    drv = result.report.get("driver", {})
    if drv.get("kind") == "ray":
        out.print(f"ray: {drv['workers']} worker(s) on {drv['cluster']['nodes']} node(s), "
                  f"{drv['cluster']['CPU']} CPU(s), {drv['cluster']['GPU']} GPU(s); driver fp pass {drv.get('fp_pass_seconds', 0):.1f} s")
    from lmkiln.quant.pipeline import peak_rss_mb

    dev = result.report["totals"].get("peak_device_mb")
    # (the report's figure is taken before the embedding and head are written: the process's own is the peak)
    rss = max(result.report["totals"]["peak_rss_mb"], peak_rss_mb())
    out.print(f"[green]wrote[/] {escape(str(result.output))}  (peak RSS {rss:.0f} MiB"
              + (f", peak device memory {dev:.0f} MiB" if dev else "") + ")")


def _dry_run_output(output: Path, force: bool, model: Path) -> Optional[str]:
    """The output check the real run makes first: an output it could never write (inside the input,
    no parent, read-only) is refused as it would be; an existing one is a note, as --force may follow."""
    from lmkiln.errors import OutputExistsError
    from lmkiln.formats.atomic import check_output

    try:
        check_output(output, force, inputs=(model,))
    except OutputExistsError as e:
        return str(e)
    return None


def _plan_table(plan, extra=()) -> None:
    table = Table(title="quantize plan (estimates; see docs/quantize.md)")
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in [*plan.rows(), *extra]:
        table.add_row(what, value)
    out.print(table)


def _quant_table(report: dict) -> None:
    table = Table(title=f"{report['method'].upper()} W{report['options']['bits']} g{report['options']['group_size']}")
    nodes = any("node" in lay for lay in report["layers"])  # a --ray run: which node did each layer
    for col in ("layer", "group", "alpha", "MSE rtn", "MSE final", "layer MSE", "seconds") + (("node",) if nodes else ()):
        table.add_column(col, justify="right" if col not in ("group", "node") else "left")
    for lay in report["layers"]:
        groups = [g for g in lay["groups"] if "alpha" in g] or [{}]
        for j, g in enumerate(groups):
            row = [str(lay["layer"]) if j == 0 else "", "→".join([g.get("prev", "-"), ",".join(g.get("linears", []))]) if g else "all (rtn)",
                   f"{g['alpha']:.2f}" if "alpha" in g else "", f"{g['mse_rtn']:.3g}" if "mse_rtn" in g else "",
                   f"{g['mse_final']:.3g}" if "mse_final" in g else "",
                   f"{lay['mse_output']:.3g}" if j == 0 and "mse_output" in lay else "", f"{lay['seconds']:.1f}" if j == 0 else ""]
            if nodes:
                row.append(f"{lay.get('node', '')}:{lay['pid']}" if j == 0 and "pid" in lay else "")
            table.add_row(*row)
    out.print(table)


@app.command("verify")
@guarded
def verify_cmd(
    reference: Path = typer.Argument(..., help="The original: an HF directory (run with transformers, fp32), an engine, "
                                     "an AWQ-GEMM or compressed-tensors directory, or an ONNX export folder (not a GGUF file)."),
    candidate: Path = typer.Argument(..., help="An engine (fp or quantized), an HF directory (fp, AWQ-GEMM or "
                                     "compressed-tensors), an ONNX export folder, or a GGUF file."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation text (.txt, or .jsonl with a \"text\" field per line); default: bundled WikiText-2 test excerpt."),
    seqlen: Optional[int] = _int_option(None, "--seqlen", min=8, help="Window length; default min(2048, context length)."),
    max_tokens: int = _int_option(8192, "--max-tokens", min=2, help="Evaluate at most this many tokens of the text."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Greedy-generation prompts, one per line; default: bundled."),
    max_new_tokens: int = _int_option(32, "--max-new-tokens", min=1),
    runner: str = typer.Option("auto", "--runner", callback=_choice, help="Candidate runner: auto, torch, onnx or transformers."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto (CUDA when available)."),
    dtype: str = typer.Option("auto", "--dtype", callback=_choice, help="The candidate engine's compute dtype: auto (fp32; for a quantized engine on CUDA fp16 on the exact int4 kernel, bf16 where Triton is missing), fp32, bf16 (PyTorch's int4 kernel: faster, bf16-noisy) or fp16."),
    reference_device: Optional[str] = typer.Option(None, "--reference-device", help="Where the reference runs (default: --device). The two run one after the other, never both in memory."),
    score_second_half: bool = typer.Option(False, "--score-second-half", help="Score only the second half of each window (llama.cpp's protocol)."),
    max_ppl_increase: Optional[float] = typer.Option(None, "--max-ppl-increase", parser=_real, help="Fail above this perplexity increase, in percent."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", parser=_real, help="Fail above this mean KL(reference || candidate)."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", parser=_real, help="Fail below this top-1 agreement (0..1)."),
    min_top5: Optional[float] = typer.Option(None, "--min-top5", parser=_real, help="Fail below this top-5 agreement: share of positions where the reference's top-1 token is in the candidate's top 5 (0..1; no default)."),
    min_p_top: Optional[float] = typer.Option(None, "--min-p-top", parser=_real, help="Fail below this mean probability the candidate gives the reference's top-1 token (0..1; no default)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the full report as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write an image (type from the name: .png, .svg, .pdf, ...): per-window NLL of both, KL histogram."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip checking engines' weight files against their checksums."),
    force: bool = typer.Option(False, "--force", help="Replace existing --report / --plot files (never an input)."),
):
    """Compare REFERENCE with CANDIDATE: perplexity, KL, top-1, greedy match. Exit 0 pass, 1 fail, 2 bad input."""
    from lmkiln.formats.atomic import write_json
    from lmkiln.verify.verify import VerifyOptions, check_plot, run_verify, write_plot

    opts = VerifyOptions(data=data, seqlen=seqlen, max_tokens=max_tokens, prompts=prompts, max_new_tokens=max_new_tokens,
                         runner=runner, device=device, dtype=dtype, reference_device=reference_device,
                         score_second_half=score_second_half,
                         max_ppl_increase=max_ppl_increase, max_kl=max_kl, min_top1=min_top1, min_top5=min_top5,
                         min_p_top=min_p_top, check=not no_check)
    inputs = tuple(p for p in (reference, candidate, data, prompts) if p is not None)
    check_writable(report, "--report", force, inputs, (plot,))
    if plot is not None:
        check_plot(plot, force, inputs, (report,))
    with LazyProgress("windows") as bar:
        res = run_verify(reference, candidate, opts, progress=lambda k, n: bar.update(k, n))
    r = res.report
    for w in res.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    table = Table(title=escape(f"verify: {candidate} vs {reference}"))
    for col in ("metric", "reference", "candidate", "threshold", ""):
        table.add_column(col)
    ref_ppl, cand_ppl = r["reference"], r["candidate"]
    table.add_row("perplexity", f"{ref_ppl['ppl']:.4f} ± {ref_ppl['ppl_stderr']:.3f}", f"{cand_ppl['ppl']:.4f} ± {cand_ppl['ppl_stderr']:.3f}", "", "")
    rows = [("ppl increase %", "", r["ppl_increase_pct"], "max_ppl_increase", "≤"), ("mean KL", "", r["kl"]["mean"], "max_kl", "≤"),
            ("top-1 agreement", "", r["top1_agreement"], "min_top1", "≥"),
            ("top-5 agreement", "", r["top5_agreement"], "min_top5", "≥"),
            ("p(reference top-1)", f"{r['p_top']['reference']:.6g}", r["p_top"]["candidate"], "min_p_top", "≥")]
    for name, ref_val, val, key, op in rows:
        if key not in r["checks"]:  # an optional threshold that was not given: the value only
            table.add_row(name, ref_val, f"{val:.6g}", "", "")
            continue
        ok = r["checks"][key]["passed"]
        table.add_row(name, ref_val, f"{val:.6g}", f"{op} {r['thresholds'][key]:.6g}", "[green]pass[/]" if ok else "[bold red]FAIL[/]",
                      style=None if ok else "red")
    table.add_row("top-5 overlap", "", f"{r['top5_overlap']:.6g}", "", "")
    table.add_row("KL p99 / max", "", f"{r['kl']['p99']:.4g} / {r['kl']['max']:.4g}", "", "")
    table.add_row("max |Δlogit|", "", f"{r['max_abs_dlogit']:.4g}", "", "")
    g = r["greedy"]
    table.add_row("greedy match", "", f"{sum(x['match'] for x in g)}/{len(g)} prompts", "", "")
    if report:  # the files a CI reads first: printing cannot keep them from being written
        write_json(report, r, force, inputs)
    if plot:
        write_plot(res, plot, force, inputs)
    out.print(table)
    for x in g:
        if not x["match"]:
            out.print(f"  greedy output of {x['prompt']!r} diverges at new token {x['first_divergence']}", highlight=False)
    p = r["protocol"]
    n = p["windows"]
    out.print(f"  {p['scored_tokens']} tokens scored in {n} window{'' if n == 1 else 's'} of {p.get('window_length', p['seqlen'])}; "
              f"reference {r['runners']['reference']}, candidate {r['runners']['candidate']}", highlight=False)
    if not res.passed:
        for f in res.failures:
            err.print(f"[bold red]FAIL[/] {f}", highlight=False, soft_wrap=True)  # one line each: CI greps them
        raise typer.Exit(1)
    out.print("[green]PASS[/]")


@app.command("inspect")
@guarded
def inspect_cmd(
    path: Path = typer.Argument(..., help="An HF model directory, an engine, an ONNX export or a GGUF file."),
    check: bool = typer.Option(True, "--check/--no-check", help="Hash an engine's weight files against its manifest."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin pickle weights (loaded with weights_only=True)."),
):
    """Show architecture, sizes, dtype/quantization, ranks and checksum status. Exit 2 when a weight file fails its checksum."""
    from lmkiln.errors import ChecksumError
    from lmkiln.inspect_model import KINDS, describe

    kind, rows = describe(path, check=check, allow_pickle=allow_pickle)
    table = Table(title=escape(f"{path} ({KINDS[kind]})"))
    table.add_column("field", style="bold")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v, style="red" if "MISMATCH" in v or v.startswith("MISSING") else None)
    out.print(table)
    bad = [v.split(":", 1)[1].strip() for _, v in rows if v.startswith("MISMATCH")]
    if bad:  # exit 1 is verify's "failed a threshold"; a damaged engine is an input error, as in generate
        raise ChecksumError(f"{path}: checksum mismatch in {', '.join(bad)}; the engine is damaged: convert or copy it again")


@app.command("generate")
@guarded
def generate_cmd(
    source: Path = typer.Argument(..., help="An engine directory, or an HF directory (converted on the fly)."),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Prompt text; repeat for a batch."),
    max_new_tokens: int = _int_option(64, "--max-new-tokens", "-n", min=1),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin pickle weights (loaded with weights_only=True)."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip checking the engine's weight files against their checksums."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto (CUDA when available). On CUDA int4 engines stay packed and decode through CUDA graphs."),
    dtype: str = typer.Option("auto", "--dtype", callback=_choice, help="Compute dtype: auto (fp32; fp16 for a quantized engine on CUDA, bf16 where Triton is missing), fp32, bf16 or fp16."),
):
    """Greedy generation through the engine runner."""
    from lmkiln.runtime.session import generate_text

    texts = generate_text(source, prompt, max_new_tokens, allow_pickle=allow_pickle, check=not no_check, device=device, dtype=dtype)
    for p, text in zip(prompt, texts):
        if out.is_terminal:  # shown: rich drops control characters a model may emit (escape sequences)
            out.print(f"[bold]{escape(p)}[/]{escape(text)}", highlight=False)  # model text is not markup
        else:  # piped or in a file: the text exactly (tabs, carriage returns), for the program reading it
            out.file.write(f"{p}{text}\n")


@app.command("demo")
@guarded
def demo_cmd(
    workdir: Optional[Path] = typer.Option(None, help="Where to write the demo outputs (default: a temporary directory). "
                                           "What an earlier demo left there is replaced; anything else of the same name is refused."),
    force: bool = typer.Option(False, "--force", help="Also replace stories260K.engine, stories260K-w4.engine or stories260K-w4.onnx "
                               "in --workdir when they are not an earlier demo's outputs."),
):
    """Run the main job on the bundled model: convert, quantize (AWQ W4), generate, verify, export ONNX."""
    from lmkiln.assets import bundled_model_path
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.errors import InputError
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import CalibOptions, quantize_model
    from lmkiln.runtime.session import generate_text

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lmkiln-demo-")
        workdir = Path(tmp.name)
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir {workdir}: is a file, not a directory; choose another --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--workdir {workdir}: cannot create it ({e.strerror}); choose another --workdir") from None
    model = bundled_model_path()
    prompt = "Once upon a time"
    engine = workdir / "stories260K.engine"
    replace = {name: _demo_output(workdir / name, force) for name in DEMO_OUTPUTS}  # all refused before any work
    out.print(f"[bold]1. convert[/] {model.name} -> {engine}")
    convert_hf_to_engine(model, engine, force=replace[engine.name])
    out.print(f"[bold]2. quantize[/] AWQ W4 g32 on the bundled calibration text -> {workdir / 'stories260K-w4.engine'}")
    q = quantize_model(model, workdir / "stories260K-w4.engine", QuantOptions(bits=4, group_size=32),
                       CalibOptions(n_samples=32, seqlen=256), to="engine", force=replace["stories260K-w4.engine"],
                       on_info=lambda m: out.print(f"   {m}", highlight=False))
    out.print(f"   {len(q.report['layers'])} layers in {q.report['totals']['seconds']:.1f} s, peak RSS {q.report['totals']['peak_rss_mb']:.0f} MiB")
    out.print("[bold]3. generate[/] greedily with both engines")
    for name, path in (("fp32", engine), ("int4", q.output)):
        (text,) = generate_text(path, [prompt], 48)
        out.print(f"   [bold]{name}:[/] [italic]{escape(prompt + text)}[/]", highlight=False)
    out.print("[bold]4. verify[/] the int4 engine against the original on in-domain text")
    from lmkiln.assets import ASSETS
    from lmkiln.verify.verify import VerifyOptions, run_verify

    # A 260K-parameter model is far more fragile at 4 bits than a real one: looser
    # thresholds than the int4 defaults (docs/verify.md), on text it was trained for.
    res = run_verify(model, q.output, VerifyOptions(data=ASSETS / "eval" / "tinystories_sample.txt", max_new_tokens=16,
                                                    max_ppl_increase=15.0, max_kl=0.25, min_top1=0.7))
    r = res.report
    out.print(f"   perplexity {r['reference']['ppl']:.3f} -> {r['candidate']['ppl']:.3f} (+{r['ppl_increase_pct']:.2f}%), "
              f"mean KL {r['kl']['mean']:.4f}, top-1 {r['top1_agreement']:.3f}, "
              f"greedy match {sum(g['match'] for g in r['greedy'])}/{len(r['greedy'])}: "
              + ("[green]PASS[/]" if res.passed else "[bold red]FAIL[/] " + "; ".join(res.failures)), highlight=False)
    out.print("[bold]5. export[/] the int4 engine to ONNX (MatMulNBits) and check onnxruntime against the torch engine")
    from lmkiln.export import export_onnx

    onnx_dir = export_onnx(q.output, workdir / "stories260K-w4.onnx", force=replace["stories260K-w4.onnx"])
    res2 = run_verify(q.output, onnx_dir, VerifyOptions(data=ASSETS / "eval" / "tinystories_sample.txt", max_new_tokens=16))
    r2 = res2.report
    out.print(f"   {onnx_dir}: mean KL {r2['kl']['mean']:.2e}, top-1 {r2['top1_agreement']:.4f}, max |Δlogit| "
              f"{r2['max_abs_dlogit']:.1e}, greedy match {sum(g['match'] for g in r2['greedy'])}/{len(r2['greedy'])}: "
              + ("[green]PASS[/]" if res2.passed else "[bold red]FAIL[/] " + "; ".join(res2.failures)), highlight=False)
    if tmp is not None:
        tmp.cleanup()
    if not (res.passed and res2.passed):
        raise typer.Exit(1)


DEMO_OUTPUTS = ("stories260K.engine", "stories260K-w4.engine", "stories260K-w4.onnx")


def _demo_output(path: Path, force: bool) -> bool:
    """Whether the demo may replace `path`: what an earlier demo left there (an lmkiln engine or ONNX
    export, so `make demo` runs twice) or, with --force, any directory; anything else is refused now."""
    from lmkiln.export import EXPORT_INFO
    from lmkiln.formats.atomic import check_output
    from lmkiln.formats.engine import is_engine

    replace = force or is_engine(path) or (path / EXPORT_INFO).is_file()
    check_output(path, replace, option="--workdir")
    return replace


def optional_values(argv: list[str], options=("--ray",), default: str = "local") -> list[str]:
    """Let `--ray` stand alone (Typer options always take a value): give it `default`
    when nothing follows, an option follows, or what follows is a directory (the model) or no
    cluster address (HOST:PORT, ray://..., auto, local): a mistyped model path was taken as the
    address, and the error said the model was missing."""
    out = []
    for k, a in enumerate(argv):
        out.append(a)
        if a in options:
            nxt = argv[k + 1] if k + 1 < len(argv) else None
            address = nxt is not None and (nxt in ("auto", "local") or ":" in nxt)
            if nxt is None or nxt.startswith("-") or (nxt != "" and (Path(nxt).is_dir() or not address)):  # ("" is refused later)
                out.append(default)
    return out


# Commands whose outputs are complete (written, fsynced, renamed into place) when they return, and
# which leave no thread, temporary directory or cluster behind: on success they skip the interpreter's
# teardown, which takes ~0.4 s once torch is imported (its finalizers; docs/BENCHMARKS.md "convert").
FAST_EXIT = {("convert", "hf-to-engine")}


def _help_for(argv: list[str]) -> str:
    """The help of the command argv names (an option's usage error carries no context to say it)."""
    cmd, path = typer.main.get_command(app), ["lmkiln"]
    for a in argv:
        sub = getattr(cmd, "commands", {}).get(a)  # (a group's subcommands; Typer's group is not click's class)
        if sub is None:
            break
        cmd, path = sub, [*path, a]
    return " ".join(path) + " --help"


def main() -> None:
    argv = optional_values(sys.argv[1:])
    _replace_unencodable()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _on_signal)
    try:
        code = app(args=argv, prog_name="lmkiln", standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):  # (Typer turns one while parsing into a silent exit 130: said below)
        code = None
        STATE["signal"] = STATE["signal"] or signal.SIGINT
    except typer.TyperException as e:  # a typo'd command, option or value: one line, as every other error
        ctx = getattr(e, "ctx", None)  # (Typer would draw a box of five lines and more)
        # (an option's usage error carries the root's context, or none: the command is read from argv then)
        where = max(f"{ctx.command_path} --help" if ctx is not None else "", _help_for(argv), key=len)
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        if not msg.strip():  # (a group given no subcommand: its help is printed already)
            sys.exit(getattr(e, "exit_code", 2))
        err.print(f"[bold red]error:[/] {escape(msg)} (see `{where}`)", highlight=False, soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))
    if STATE["signal"] is not None and not STATE["said"]:  # before any command started its work
        _ignore_signals()
        term = STATE["signal"] == signal.SIGTERM
        err.print(f"[bold red]{'terminated (SIGTERM)' if term else 'interrupted'}[/]; nothing was written yet",
                  highlight=False, soft_wrap=True)
        sys.exit(143 if term else 130)
    code = code if isinstance(code, int) else 0
    # the command is over (its output renamed into place, or its error said): a signal now, during
    # the interpreter's teardown, would turn a finished run into a silent -2/-15
    _ignore_signals()
    if code == 0 and tuple(argv[:2]) in FAST_EXIT:
        for f in (sys.stdout, sys.stderr):
            if f is not None:  # (`>&-`: closed)
                try:
                    f.flush()
                except OSError:
                    pass
        os._exit(0)
    sys.exit(code)


if __name__ == "__main__":
    main()
