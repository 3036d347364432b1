"""`lmkiln quantize`: the single-process driver. plan -> per-layer jobs -> sink.

- the plan (quant/plan.py) is made from headers before anything heavy, printed, and
  checked against the free disk;
- calibration tokens become the first layer's hidden states (on the device when they
  fit, else on the host), then each decoder layer is a job (quant/job.py) on the
  chosen device, whose output hidden states feed the next;
- every finished layer is saved to the resume state (quant/state.py) and handed to
  the sink (quant/sinks.py), which streams it into the output format right away.

The output is built in `.NAME.lmkiln-partial/out` and renamed into place at the end;
an interrupted run continues with `resume=True` from its last finished layer and gives
bit-identical output (finished layers are replayed from the state into the sink).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

import lmkiln
from lmkiln.convert.architectures import Architecture, get_architecture
from lmkiln.convert.hf_to_engine import account, read_model
from lmkiln.errors import InputError, check_callable, check_flag, check_path
from lmkiln.formats.atomic import atomic_dir, check_output, check_output_file, output_lock, write_json
from lmkiln.formats.awq_gemm import AwqSpec
from lmkiln.formats.engine import config_sha256
from lmkiln.formats.hf import HFCheckpoint
from lmkiln.formats.space import disk_full_guard
from lmkiln.quant.awq import QuantOptions, fp_forward, layer_chunk
from lmkiln.quant.job import Compute, LayerModule, LayerResult, causal_mask, position_embeddings, resolve_compute, run_layer
from lmkiln.quant.plan import QuantPlan, human, layer_linears, make_plan
from lmkiln.quant.sinks import LAYOUTS, REPORT, TARGETS, make_sink, standard_intermediate
from lmkiln.quant.state import ResumeState, finished_layers as layers_finished_in

METHODS = ("awq", "rtn", "gptq", "awq+gptq")
CALIB_INPUTS = ("fp", "quantized")
STOP_ENV = "LMKILN_STOP_AFTER_LAYER"  # test hook: simulate a crash after layer N is saved


@dataclass
class CalibOptions:
    path: Path | None = None  # None = bundled WikiText-2 validation excerpt
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0


@dataclass
class QuantResult:
    output: Path | None
    report: dict = field(default_factory=dict)
    plan: QuantPlan | None = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_device_mb(compute: Compute) -> float | None:
    if compute.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(compute.device) / (1 << 20)


def partial_dir(out_dir: Path) -> Path:
    """Where a run into out_dir builds its output and keeps its resume state."""
    return out_dir.parent / f".{out_dir.name}.lmkiln-partial"


def finished_layers(out_dir: str | Path) -> int:
    """Layers an interrupted run into out_dir has finished (what --resume would skip). 0 once
    the output is complete: its build directory (`partial/out`, kept by an interrupted run)
    has been renamed to out_dir, and a state still there is only what its removal had not
    reached when the run was killed — nothing to resume."""
    out_dir = Path(out_dir)
    partial = partial_dir(out_dir)
    if out_dir.exists() and not (partial / "out").exists():
        return 0
    return layers_finished_in(partial)


def remove_state(partial: Path) -> None:
    """Remove a finished run's resume state (model-sized), even through Ctrl-C: an interrupt
    mid-way would leave it for good, since the output is complete and no run resumes it. The
    interrupt is re-raised once it is gone (a second one is held the same way)."""
    interrupt = None
    while True:
        try:
            shutil.rmtree(partial, ignore_errors=True)
            break
        except KeyboardInterrupt as e:
            interrupt = e
    if interrupt is not None:
        raise interrupt


def _sweep_finished_state(out_dir: Path, info) -> None:
    """A run killed outright (SIGKILL, power loss) after its output was renamed into place left
    the resume state (about the output's size) and nothing would ever remove it: the next run
    writing that output removes it, holding the output's lock (a live run's state is never touched)."""
    partial = partial_dir(out_dir)
    if not ((out_dir.exists() or out_dir.is_symlink()) and partial.exists() and not (partial / "out").exists()):
        return
    try:
        with output_lock(out_dir):
            if partial.exists() and not (partial / "out").exists():
                remove_state(partial)
                info(f"removed {partial.name}: the resume state of an earlier run whose output is complete")
    except InputError:  # another run holds the lock: the state is its own
        return


class StateCleanup:
    """Wraps atomic_dir: once the output is written (`written`, set by the run) and renamed into
    place (its build directory `partial/out` gone), the resume state is removed, also when an
    interrupt comes after the rename (atomic_dir still removing a replaced output, say): it
    would be left for good, as nothing resumes a complete output."""

    def __init__(self, partial: Path):
        self.partial, self.written = partial, False

    def __enter__(self) -> "StateCleanup":
        return self

    def __exit__(self, *exc) -> bool:
        if self.written and not (self.partial / "out").exists():
            remove_state(self.partial)
        return False  # an exception goes on


# Bytes of each weight file the fingerprint reads, at 8 places from its start (header included) to
# its end: a checkpoint swapped for one of the same size and header that differed after its first
# MiB was resumed without a word, mixing old and new layers. 8 x 1 MiB per file stays cheap (< 0.1 s
# per 5 GB shard from page cache) where hashing whole shards would cost minutes on a 70B model.
FINGERPRINT_SAMPLES, FINGERPRINT_BYTES = 8, 1 << 20


def model_fingerprint(ckpt: HFCheckpoint) -> str:
    """Cheap identity of a checkpoint: config plus each weight file's name, size, header and
    FINGERPRINT_SAMPLES spans spread over its weights."""
    h = hashlib.sha256(config_sha256(ckpt.config).encode())
    for p in ckpt.weight_files():
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            for k in range(FINGERPRINT_SAMPLES):
                f.seek(max(0, (size - FINGERPRINT_BYTES) * k // (FINGERPRINT_SAMPLES - 1)))
                h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()


# The Python API's QuantOptions / CalibOptions fields must have their annotated types (the CLI's
# parser already gives these): a float group size or a str dampening would otherwise pass the range
# checks and fail as a TypeError after calibration, leaving a partial output behind.
KINDS = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"), "bool": ((bool,), "True or False")}
CHOICES = {"method": METHODS, "calib_inputs": CALIB_INPUTS}  # str fields: what to give
# Smallest values, as the CLI's options enforce them (min_expert_tokens: --min-expert-tokens min=1,
# --calib-samples min=1, --calib-seqlen min=8); the others have no CLI option.
# seed: random.Random seeds from abs(seed), so -1 would repeat 1's calibration while its report said otherwise.
LEAST = {"n_grid": 1, "clip_tokens": 1, "min_expert_tokens": 1, "n_samples": 1, "seqlen": 8, "seed": 0}


def _check_fields(obj) -> None:
    cls = type(obj).__name__
    for f in dataclasses.fields(obj):
        if f.type == "str":
            types, what = (str,), f"one of {', '.join(CHOICES[f.name])}"
        elif f.type in KINDS:
            types, what = KINDS[f.type]
        else:  # (CalibOptions.path: checked by check_arguments)
            continue
        v = getattr(obj, f.name)
        # bool is an int to Python: group_size=True is a mistake, not 1
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise InputError(f"{cls}({f.name}={v!r}): give {what}")
        if f.name in LEAST and v < LEAST[f.name]:
            raise InputError(f"{cls}({f.name}={v!r}): give at least {LEAST[f.name]}")


def check_arguments(options: QuantOptions | None, calib: CalibOptions | None) -> tuple[QuantOptions, CalibOptions]:
    """The Python API's arguments with their types checked, None meaning the defaults; before
    any work or output, each wrong one refused in one line that names it."""
    options = QuantOptions() if options is None else options
    calib = CalibOptions() if calib is None else calib
    if not isinstance(options, QuantOptions):
        raise InputError(f"options: a QuantOptions (e.g. QuantOptions(bits=4, group_size=128)), not {type(options).__name__}")
    if not isinstance(calib, CalibOptions):
        raise InputError(f"calib: a CalibOptions (e.g. CalibOptions(path='calib.txt')), not {type(calib).__name__}")
    _check_fields(options)
    _check_fields(calib)
    if calib.path is not None and not isinstance(calib.path, (str, os.PathLike)):
        raise InputError(f"CalibOptions(path={calib.path!r}): give the path of a calibration file or directory")
    if calib.path is not None and not os.fspath(calib.path).strip():  # (an unset "$CALIB": it read the current directory)
        raise InputError(f"--calib {os.fspath(calib.path)!r} is empty; give a calibration file or directory, or leave "
                         "--calib out for the bundled text")
    if not (0 <= options.max_shrink < 1):
        raise InputError(f"QuantOptions(max_shrink={options.max_shrink!r}): the clip search's largest shrink, a fraction in [0, 1)")
    return options, calib


# QuantOptions fields that only some methods read: field -> (the CLI's flag, the methods that read it)
CALIBRATED = tuple(m for m in METHODS if QuantOptions(method=m).calibrated)
METHOD_FIELDS = {"clip": ("--no-clip", ("awq", "awq+gptq")), "duo_scaling": ("--no-duo-scaling", ("awq", "awq+gptq")),
                 "damp": ("--damp", ("gptq", "awq+gptq")), "act_order": ("--act-order", ("gptq", "awq+gptq")),
                 "calib_inputs": ("--calib-inputs", CALIBRATED), "chunk": ("--chunk", CALIBRATED),
                 "min_expert_tokens": ("--min-expert-tokens", CALIBRATED)}
CALIB_FLAGS = {"path": "--calib", "n_samples": "--calib-samples", "seqlen": "--calib-seqlen", "seed": "--seed"}


def unused_options(options: QuantOptions, calib: CalibOptions) -> list[str]:
    """The flags set away from their defaults that `options.method` does not read (a run that
    silently ignores --act-order under --method rtn looks like it honoured it)."""
    options, calib = check_arguments(options, calib)  # a bad value is refused, not first called unused
    _check_options(options, TARGETS[0])
    qd, cd = QuantOptions(), CalibOptions()
    unused = [flag for f, (flag, methods) in METHOD_FIELDS.items()
              if options.method not in methods and getattr(options, f) != getattr(qd, f)]
    if options.method not in CALIBRATED:
        unused += [flag for f, flag in CALIB_FLAGS.items() if getattr(calib, f) != getattr(cd, f)]
    return unused


def _check_options(options: QuantOptions, to: str) -> None:
    if not isinstance(to, str) or to not in TARGETS:
        raise InputError(f"--to {to!r}: choose {', '.join(TARGETS)}")
    if options.bits not in (4, 8):
        raise InputError(f"{options.bits}-bit output is not supported; use --w4a16 or --w8a16")
    if options.group_size != -1 and options.group_size < 8:
        raise InputError(f"--group-size {options.group_size}: use -1 (per channel) or a size of at least 8, e.g. 32, 64, 128")
    if options.method not in METHODS:
        raise InputError(f"--method {options.method!r}: choose {', '.join(METHODS)}")
    if options.calib_inputs not in CALIB_INPUTS:
        raise InputError(f"--calib-inputs {options.calib_inputs!r}: choose {', '.join(CALIB_INPUTS)}")
    if not 0 < options.damp < 1:
        raise InputError(f"--damp {options.damp}: GPTQ's dampening is a fraction of the Hessian's mean diagonal, in (0, 1)")
    if options.chunk < 0:
        raise InputError(f"--chunk {options.chunk}: calibration samples per chunk must be at least 1 (0 = auto)")


GROUP_SIZES = (-1, 8, 16, 32, 64, 128, 256)  # what a refusal checks to say which would fit


def layout_problem(to: str, arch: Architecture, mcfg: dict, spec: AwqSpec) -> str | None:
    """Why output format `to` cannot hold this model with `spec`, or None."""
    attn_width = mcfg["head_num"] * mcfg["size_per_head"]
    if to == "engine":
        if spec.group_size != -1 and attn_width % spec.group_size:  # the engine splits wo's input on group boundaries
            return f"--to engine: the attention width {attn_width} is not a multiple of --group-size {spec.group_size}"
        return None
    try:
        standard_intermediate(arch, mcfg, spec, LAYOUTS[to](spec))
    except InputError as e:
        return str(e)
    return None


def _check_layout(to: str, arch: Architecture, mcfg: dict, options: QuantOptions) -> AwqSpec:
    """Widths the output format cannot hold, found before calibration, not after it; the
    refusal says which group sizes fit this format and which other formats take this one."""
    spec = AwqSpec(bits=options.bits, group_size=options.group_size, zero_point=not options.symmetric)
    problem = layout_problem(to, arch, mcfg, spec)
    if problem:
        fits = [str(g) for g in GROUP_SIZES if not layout_problem(to, arch, mcfg, dataclasses.replace(spec, group_size=g))]
        others = [t for t in TARGETS if t != to and not layout_problem(t, arch, mcfg, spec)]
        raise InputError(f"{problem}; group sizes that fit --to {to}: {', '.join(fits) or 'none'}"
                         + (f" (--to {' or '.join(others)} takes --group-size {spec.group_size})" if others else ""))
    return spec


def _check_seqlen(calib: CalibOptions, mcfg: dict) -> None:
    if calib.seqlen > mcfg["max_position_embeddings"]:
        raise InputError(f"--calib-seqlen {calib.seqlen} exceeds the model's context ({mcfg['max_position_embeddings']})")


def _calibration(ckpt: HFCheckpoint, mcfg: dict, calib: CalibOptions, info):
    from lmkiln.formats.tokenizer import load_tokenizer
    from lmkiln.quant.calib import build_calibration_samples, load_calibration_texts, pack_shingles, shingles

    _check_seqlen(calib, mcfg)
    tok = load_tokenizer(ckpt.path)
    cs = build_calibration_samples(load_calibration_texts(calib.path),
                                   lambda s: tok(s, add_special_tokens=False).input_ids,
                                   calib.n_samples, calib.seqlen, calib.seed)
    ids = cs.input_ids
    top, vocab = int(ids.max()), mcfg["vocab_size"]
    if top >= vocab:  # the embedding lookup would fail with an IndexError mid-run
        raise InputError(f"{ckpt.path}: the calibration text tokenizes to id {top}, outside the model's vocabulary ({vocab} ids): "
                         "the tokenizer does not belong to this model")
    calib_info = {"source": str(calib.path) if calib.path else "bundled:wikitext2_valid_excerpt",
                  "samples": cs.n_samples, "seqlen": cs.seqlen, "tokens": cs.n_tokens,
                  "documents": cs.n_documents_used, "seed": calib.seed, "sha256": cs.sha256, "summary": cs.describe(),
                  # lets `verify` warn when its evaluation text overlaps the calibration text
                  "shingles_b64": pack_shingles([h for row in ids.tolist() for h in shingles(row)])}
    info(f"calibration: {cs.describe()}")
    return ids, calib_info


def check_driver(options: QuantOptions, side_by_side: bool) -> None:
    """What a driver running layers side by side (--ray) cannot do; the dry run refuses it as the run does."""
    if side_by_side and options.calib_inputs == "quantized" and options.calibrated:
        raise InputError("--calib-inputs quantized feeds each layer the previous quantized layer's output, so layers "
                         "cannot run side by side: drop --ray, or keep --calib-inputs fp")


def plan_json(plan: QuantPlan) -> dict:
    """The plan as the report records it (sizes in bytes)."""
    return {"device": plan.compute.describe(), **{k: v for k, v in dataclasses.asdict(plan).items() if k != "compute"}}


def plan_quantize(model_dir: str | Path, out_dir: str | Path, options: QuantOptions, calib: CalibOptions | None = None,
                  compute: Compute | None = None, to: str = "hf", device: str = "auto", dtype: str | torch.dtype = "auto") -> QuantPlan:
    """The plan alone (`--dry-run`): reads config.json and safetensors headers only. `device`/`dtype` as
    quantize_model takes them (`compute`, their resolved form, wins when given)."""
    check_path("model_dir", model_dir)
    check_path("out_dir", out_dir)
    options, calib = check_arguments(options, calib)
    _check_options(options, to)
    if compute is not None and not isinstance(compute, Compute):
        raise InputError(f"compute={compute!r}: give device= and dtype= (as quantize_model takes them) instead")
    compute = compute or resolve_compute(device, dtype)
    ckpt = HFCheckpoint(model_dir)
    arch, mcfg, quantized = read_model(ckpt)
    if quantized is not None:
        raise InputError(f"{ckpt.path}: already quantized (quantization_config present); quantize the original fp checkpoint")
    _check_layout(to, arch, mcfg, options)
    if options.calibrated:  # what the real run refuses first: the plan must not promise it (it printed a plan, exit 0)
        from lmkiln.quant.calib import load_calibration_texts

        _check_seqlen(calib, mcfg)
        load_calibration_texts(calib.path)  # (a missing, empty or unreadable --calib; the text is read whole, as the run does)
    free = torch.cuda.mem_get_info(compute.device)[0] if compute.device.type == "cuda" else None
    return make_plan(ckpt, arch, mcfg, options, compute, calib.n_samples, calib.seqlen, Path(out_dir), free)


def quantize_model(
    model_dir: str | Path,
    out_dir: str | Path,
    options: QuantOptions | None = None,
    calib: CalibOptions | None = None,
    to: str = "hf",
    force: bool = False,
    resume: bool = False,
    report_path: Path | None = None,
    on_layer: Callable[[int, int, dict], None] | None = None,
    on_info: Callable[[str], None] | None = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    on_plan: Callable[[QuantPlan], None] | None = None,
    probe_only: bool = False,
    driver: Callable[["LayerRun", int, AwqSpec], Iterator[LayerResult]] | None = None,
) -> QuantResult:
    """Quantize `model_dir` into `out_dir` (`to` = "hf" for AWQ-GEMM, "engine").

    `options`/`calib` None: the defaults; `dtype` a name (auto, fp32, bf16, fp16) or a torch dtype.
    Arguments of the wrong type are refused (InputError) before any work or output.

    `probe_only`: quantize layer 0 only, write nothing, and return the plan with the
    measured seconds in report["totals"] (`--dry-run --probe`).
    `driver`: what schedules the layer jobs (default local_layers, this process; see
    quant/ray_driver.py): `driver.prepare(compute, plan, n_layers)` returns the CPU
    threads each job will get (None: this process's), then `driver(run, start, spec)`
    yields finished layers in order, each already saved to the resume state."""
    t_start = time.time()
    check_path("model_dir", model_dir)
    check_path("out_dir", out_dir)
    for name, fn in (("on_layer", on_layer), ("on_info", on_info), ("on_plan", on_plan), ("driver", driver)):
        check_callable(name, fn)
    info = on_info or (lambda s: None)
    options, calib = check_arguments(options, calib)
    _check_options(options, to)
    for name, v in (("force", force), ("resume", resume), ("probe_only", probe_only)):
        check_flag(name, v)
    if report_path is not None and not isinstance(report_path, (str, os.PathLike)):
        raise InputError(f"report_path={report_path!r}: give the path of the JSON file to write")
    compute = resolve_compute(device, dtype)
    check_driver(options, driver is not None)
    ckpt = HFCheckpoint(model_dir)
    arch, mcfg, quantized = read_model(ckpt)
    if quantized is not None:
        raise InputError(f"{ckpt.path}: already quantized (quantization_config present); quantize the original fp checkpoint")
    if options.calibrated and not mcfg.get("num_experts") and options.min_expert_tokens != QuantOptions().min_expert_tokens:
        info(f"note --min-expert-tokens is not used: {arch.hf_name} has no experts")
    acc = account(ckpt, arch, mcfg)
    if not probe_only:
        _sweep_finished_state(Path(out_dir), info)
    out_dir = Path(out_dir) if probe_only else check_output(Path(out_dir), force, inputs=(ckpt.path,))
    if report_path is not None and not probe_only:  # refused now, not after the run has committed the output
        report_path = check_output_file(Path(report_path), force, (ckpt.path, *filter(None, [calib.path])), "--report", (out_dir,))
    with contextlib.ExitStack() as held:
        if not probe_only:  # one writer per output and resume state: a second run fails at once
            held.enter_context(output_lock(out_dir))
        n_layer = mcfg["num_layer"]
        spec = _check_layout(to, arch, mcfg, options)
        _check_finite_outside_layers(ckpt, arch, mcfg)
        src_dtype = ckpt.source_dtype if ckpt.source_dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        ids = calib_info = None
        if options.calibrated:
            ids, calib_info = _calibration(ckpt, mcfg, calib, info)

        free = torch.cuda.mem_get_info(compute.device)[0] if compute.device.type == "cuda" else None
        # the samples the corpus gave (fewer than asked when it is small), not the request, size the state
        n_samples = calib.n_samples if ids is None else int(ids.shape[0])
        plan = make_plan(ckpt, arch, mcfg, options, compute, n_samples, calib.seqlen, out_dir, free)
        partial = partial_dir(out_dir)
        if not probe_only and plan.disk_needed > plan.free_disk + (_du(partial) if resume else 0):
            raise InputError(f"{out_dir.parent}: {human(plan.free_disk)} free, the output needs {human(plan.output_bytes)} "
                             f"and its resume state {human(plan.state_bytes)}; free space or choose another -o")
        if on_plan:
            on_plan(plan)
        info(f"device {compute.describe()}; estimated peak "
             + (f"device memory {human(plan.peak_device)}, " if compute.device.type == "cuda" else "")
             + f"host RAM {human(plan.peak_host)} (docs/quantize.md, memory)")

        fingerprint = {
            "model": model_fingerprint(ckpt),
            "calibration": calib_info["sha256"] if calib_info else None,
            # --chunk changes memory, not results, so a resume may use another one
            "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "chunk"},
            "compute": {"device": compute.device.type, "dtype": str(compute.dtype),
                        "threads": job_threads(mcfg, compute, driver.prepare(compute, plan, n_layer) if driver else None)},
            "lmkiln_version": lmkiln.__version__,
            "output format (--to)": to,  # the partial output holds that format's files
            # an edit in place between the fingerprint's samples changes a file's modification time (the
            # samples stay the content check, which Ray tasks on other nodes' copies of the model also make)
            "model files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in ckpt.weight_files()},
        }
        layer_kwargs = calibration_kwargs(mcfg, ids, compute) if options.calibrated else None

        if probe_only:
            mod = LayerModule(ckpt, arch, compute)
            hidden = _embed(ckpt, arch, mcfg, ids, compute, plan) if options.calibrated else None
            if compute.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(compute.device)
            with threads_for(mcfg, compute):
                res, _ = run_layer(mod, 0, options, src_dtype, hidden, layer_kwargs and layer_kwargs[0])
            report = {"layers": [res.report], "totals": _totals(t_start, [res.report], calib_info, compute)}
            return QuantResult(None, report, plan)

        with disk_full_guard(out_dir.parent, plan.disk_needed):  # (the fingerprint is the state's first file)
            state = ResumeState(partial, fingerprint, resume, info, force)
        start = state.done(n_layer)
        if resume and start:
            info(f"resuming after {start} finished layer(s)")
        stop_after = int(os.environ.get(STOP_ENV, "-1"))
        reports = []
        run = LayerRun(ckpt, arch, mcfg, options, compute, plan, src_dtype, ids, layer_kwargs, state)
        with (StateCleanup(partial) as cleanup,
              atomic_dir(out_dir, force=force, inputs=(ckpt.path,), tmp=partial / "out", needed=plan.disk_needed, lock=False,
                         then="re-run with --resume (finished layers are kept)") as tmp, threads_for(mcfg, compute)):
            sink = make_sink(to, tmp, ckpt, arch, mcfg, spec, options.method, src_dtype, acc)
            try:
                sink.begin()
                for i in range(start):  # replay: the sink rebuilds its output from the state
                    res = state.load(i, spec, run.linears(i))
                    sink.add(res)
                    reports.append(res.report)
                layers = driver(run, start, spec) if driver else local_layers(run, start, spec)
                with contextlib.closing(layers):  # a failure here stops the driver's work too
                    for res in layers:
                        sink.add(res)
                        reports.append(res.report)
                        if on_layer:
                            on_layer(res.index, n_layer, res.report)
                        i = res.index
                        del res  # written: do not hold it through the next layer's job
                        if i == stop_after:
                            raise KeyboardInterrupt(f"{STOP_ENV}={stop_after}")
                report = {
                    "lmkiln_version": lmkiln.__version__,
                    "source": str(ckpt.path),
                    "method": options.method,
                    "options": dataclasses.asdict(options),
                    "compute": {"device": compute.describe(), "dtype": str(compute.dtype).replace("torch.", "")},
                    "calibration": calib_info,
                    "plan": plan_json(plan),
                    "driver": getattr(driver, "info", None) or {"kind": "local"},
                    "layers": reports,
                    "totals": _totals(t_start, reports, calib_info, compute),
                }
                sink.finish(report)
                cleanup.written = True
            except BaseException:
                sink.abort()
                raise
        if report_path:
            write_json(report_path, report, force, (ckpt.path,))
        return QuantResult(out_dir, report, plan)


@dataclass
class LayerRun:
    """Everything a driver needs to run a quantize run's layer jobs."""

    ckpt: HFCheckpoint
    arch: Architecture
    mcfg: dict
    options: QuantOptions
    compute: Compute
    plan: QuantPlan
    out_dtype: torch.dtype
    ids: torch.Tensor | None  # calibration token ids (AWQ), None for RTN
    layer_kwargs: list[dict] | None  # per layer (calibration_kwargs)
    state: ResumeState

    @property
    def n_layer(self) -> int:
        return self.mcfg["num_layer"]

    def linears(self, i: int) -> dict:
        return layer_linears(self.arch, self.mcfg, i)

    def module_of(self, role: str, i: int) -> str:
        return self.linears(i)[role][0]

    def forward(self, mod: LayerModule, i: int, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Layer i's fp output into `out`: the same bits its job's first pass computes."""
        layer, _ = mod.load(i, with_master=False)
        return fp_forward(layer, hidden, self.layer_kwargs[i], layer_chunk(layer, hidden, self.options), out, i)

    def first_input(self, start: int) -> torch.Tensor | None:
        """The input of layer `start`: the embedding, or the state's saved hidden states."""
        if not self.options.calibrated:
            return None
        if start == 0:
            return _embed(self.ckpt, self.arch, self.mcfg, self.ids, self.compute, self.plan)
        return _place(self.state.hidden(start - 1), self.compute, self.plan)


def calibration_kwargs(mcfg: dict, ids: torch.Tensor, compute: Compute) -> list[dict]:
    """Each decoder layer's keyword arguments for calibration windows like `ids`: the cos/sin
    of its rope (local layers may have their own) and its attention mask. The mask is None
    (plain causal attention) unless the layer's window is shorter than the windows or the
    table's calibration attention is eager, which applies only the mask it is given."""
    T, n = ids.shape[1], mcfg["num_layer"]
    eager = get_architecture(mcfg["architecture"]).hf_attention == "eager"
    types = mcfg["layer_types"] or ["sliding_attention" if mcfg["sliding_window"] else "full_attention"] * n
    kinds: dict[tuple, dict] = {}
    out = []
    for t in types:
        window = mcfg["sliding_window"] if t == "sliding_attention" and mcfg["sliding_window"] < T else None
        local = t == "sliding_attention" and mcfg["rope_local"] is not None
        if (window, local) not in kinds:
            rope = mcfg["rope_local"] if local else mcfg["rope"]
            kinds[window, local] = {"position_embeddings": position_embeddings(rope, T, compute),
                                    "attention_mask": causal_mask(T, window, compute) if window or eager else None}
        out.append(kinds[window, local])
    return out


def local_layers(run: LayerRun, start: int, spec: AwqSpec) -> Iterator[LayerResult]:
    """The single-process driver: layer jobs one after another on run.compute; each
    job's output hidden states are the next one's input (two buffers for the run)."""
    mod = LayerModule(run.ckpt, run.arch, run.compute)
    hidden = run.first_input(start)
    spare = torch.empty_like(hidden) if hidden is not None else None
    for i in range(start, run.n_layer):
        if run.state.is_done(i):  # finished out of order by a --ray run: only its fp output is needed
            res = run.state.load(i, spec, run.linears(i))
            out = run.forward(mod, i, hidden, spare) if hidden is not None else None
            if out is not None:
                run.state.save_hidden(i, out)
        else:
            res, out = run_layer(mod, i, run.options, run.out_dtype, hidden, run.layer_kwargs and run.layer_kwargs[i], hidden_out=spare)
            run.state.save(res, run.module_of, out)
        if out is not None:
            hidden, spare = out, hidden  # ping-pong
        yield res
        del res


def job_threads(mcfg: dict, compute: Compute, available: int | None = None) -> int | None:
    """Intra-op threads a layer job computes with on the CPU (None on CUDA, where it does
    not matter). CPU matmul kernels split work by thread count, so results are
    bit-identical only between runs with the same number (the resume fingerprint has it).
    Threads only pay off on large matmuls; on tiny models (the bundled one) they cost
    several times the work itself, badly so on a busy machine: those run on one."""
    if compute.device.type != "cpu":
        return None
    if mcfg["hidden_units"] <= 256:
        return 1
    return available or torch.get_num_threads()


@contextlib.contextmanager
def threads_for(mcfg: dict, compute: Compute, available: int | None = None):
    """Run the enclosed jobs with job_threads(...) intra-op threads."""
    before = torch.get_num_threads()
    n = job_threads(mcfg, compute, available)
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_finite_outside_layers(ckpt: HFCheckpoint, arch, mcfg: dict) -> None:
    """The embedding, final norm and head go to the output as they are (layer jobs check their
    own tensors on load): refuse NaN/Inf in them now, not after every layer has run."""
    roles = ["embed", "final_norm"] + ([] if mcfg["tie_word_embeddings"] else ["lm_head"])
    for role in roles:
        name = arch.hf_name_of(role)
        ckpt.check_finite(name, ckpt.get(name))


def _totals(t_start: float, reports: list[dict], calib_info, compute: Compute) -> dict:
    return {
        "seconds": round(time.time() - t_start, 3),
        "seconds_per_layer": [r["seconds"] for r in reports],
        "calibration_tokens": calib_info["tokens"] if calib_info else 0,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_device_mb": None if peak_device_mb(compute) is None else round(peak_device_mb(compute), 1),
    }


def _place(hidden: torch.Tensor, compute: Compute, plan: QuantPlan) -> torch.Tensor:
    """Hidden states live on the device when the plan says they fit, else on the host."""
    where = compute.device if plan.hidden_on_device else torch.device("cpu")
    return hidden.to(device=where, dtype=compute.dtype)


def _embed(ckpt: HFCheckpoint, arch, mcfg: dict, ids: torch.Tensor, compute: Compute, plan: QuantPlan) -> torch.Tensor:
    """The first layer's input: embedding rows of the calibration tokens (the table stays on the host)."""
    table = ckpt.get(arch.hf_name_of("embed"))
    x = torch.nn.functional.embedding(ids, table)
    scale = mcfg["embed_scale"]
    if scale is not None:  # Gemma: times sqrt(hidden) rounded to the table's dtype, as the reference embeds
        x = x * torch.tensor(scale).to(table.dtype)
    return _place(x.float(), compute, plan)


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
