"""The `lmkiln` command line: parsing and presentation only; the work lives in modules.

Every user error is a LmkilnError: one red line on stderr and exit 2 (no traceback
unless --debug). Anything else is a bug; it is reported in one line too, with a hint
to re-run with --debug for the traceback.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import lmkiln
from lmkiln.errors import LmkilnError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Turn Hugging Face LLM checkpoints into verified, quantized engines.")
convert_app = typer.Typer(no_args_is_help=True, help="Convert between formats.")
app.add_typer(convert_app, name="convert")

out = Console()
err = Console(stderr=True)
STATE = {"debug": False}


def guarded(fn):
    """Turn errors into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except LmkilnError as e:
            if STATE["debug"]:
                raise
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]; no output was left half-written")
            raise typer.Exit(130) from None
        except Exception as e:
            if STATE["debug"]:
                raise
            err.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} (re-run with --debug for the traceback)", highlight=False, soft_wrap=True)
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


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, transient=False)


@convert_app.command("hf-to-engine")
@guarded
def hf_to_engine(
    model: Path = typer.Argument(..., help="Hugging Face model directory (config.json + safetensors)."),
    output: Path = typer.Option(..., "-o", "--output", help="Engine directory to create."),
    dtype: str = typer.Option("auto", help="Weight dtype: auto (keep the source's), fp32, fp16, bf16. For an AWQ checkpoint it "
                              "applies to the fp tensors; int4/int8 weights travel unchanged."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel ranks to split the weights into."),
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
    out.print(f"[green]wrote[/] {output}")


@app.command("inspect")
@guarded
def inspect_cmd(
    path: Path = typer.Argument(..., help="An HF model directory or an engine directory."),
    check: bool = typer.Option(True, "--check/--no-check", help="Hash an engine's weight files against its manifest."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin pickle weights (loaded with weights_only=True)."),
):
    """Show architecture, sizes, dtype/quantization, ranks and checksum status."""
    from lmkiln.inspect_model import describe

    kind, rows = describe(path, check=check, allow_pickle=allow_pickle)
    table = Table(title=f"{path} ({'lmkiln engine' if kind == 'engine' else 'Hugging Face checkpoint'})")
    table.add_column("field", style="bold")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v, style="red" if "MISMATCH" in v else None)
    out.print(table)
    if any("MISMATCH" in v for _, v in rows):
        raise typer.Exit(1)


@app.command("generate")
@guarded
def generate_cmd(
    source: Path = typer.Argument(..., help="An engine directory, or an HF directory (converted on the fly)."),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Prompt text; repeat for a batch."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
):
    """Greedy generation through the engine runner."""
    from lmkiln.runtime.session import generate_text

    for p, text in zip(prompt, generate_text(source, prompt, max_new_tokens, allow_pickle=allow_pickle)):
        out.print(f"[bold]{p}[/]{text}", highlight=False)


@app.command("demo")
@guarded
def demo_cmd(
    workdir: Optional[Path] = typer.Option(None, help="Where to write the demo outputs (default: a temporary directory)."),
):
    """Run the main job on the bundled model: convert it, then generate with the engine."""
    from lmkiln.assets import bundled_model_path
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.runtime.session import generate_text

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lmkiln-demo-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    model = bundled_model_path()
    engine = workdir / "stories260K.engine"
    out.print(f"[bold]1. convert[/] {model.name} -> {engine}")
    convert_hf_to_engine(model, engine, force=True)
    out.print("[bold]2. generate[/] with the engine runner")
    prompt = "Once upon a time"
    (text,) = generate_text(engine, [prompt], 48)
    out.print(f"   [italic]{prompt}{text}[/]", highlight=False)
    if tmp is not None:
        tmp.cleanup()


def main() -> None:
    app(prog_name="lmkiln")


if __name__ == "__main__":
    main()
