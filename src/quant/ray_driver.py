"""`lmkiln quantize --ray`: the layer jobs of one run as Ray tasks, across GPUs and machines.

Each AWQ layer searches against the fp output of the ORIGINAL previous layer, so once
a layer's input hidden states exist its job depends on nothing else. This driver runs
that fp chain itself, one cheap forward per layer (quant/awq.py `fp_forward`, the very
function the job's first pass uses, so the bits agree), and submits each layer's job
as soon as its input exists, the input in Ray's object store. Jobs run the same
`run_layer` as the single-process driver on the same kind of device and dtype, so the
output is bit-identical to a run without Ray.

- Where: a task asks for one GPU when the run computes on CUDA, else an equal share of
  the CPUs. Every node reads its layer's tensors from the checkpoint path the driver
  was given (a path every node must see; a task checks it sees the same checkpoint).
- Memory: at most `workers + 1` inputs are in flight (one queued per free slot), so the
  object store holds that many hidden-state tensors and the driver waits with its fp
  pass when all slots are busy.
- Faults: a task whose worker dies is retried by Ray (`max_retries`); a task that
  raises fails the run with its own message. Finished layers go to the resume state as
  they arrive, in any order, so `--resume` (with or without Ray) redoes only the rest.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

import lmkiln
from lmkiln.convert.architectures import get_architecture
from lmkiln.convert.hf_config import engine_config_from_hf
from lmkiln.errors import InputError, LmkilnError
from lmkiln.formats.awq_gemm import AwqSpec
from lmkiln.formats.hf import HFCheckpoint
from lmkiln.quant.awq import QuantOptions
from lmkiln.quant.job import COMPUTE_DTYPES, LayerModule, LayerResult, resolve_compute, run_layer
from lmkiln.quant.pipeline import LayerRun, threads_for, calibration_kwargs, model_fingerprint

CRASH_ENV = "LMKILN_RAY_CRASH_ONCE"  # test hook: "LAYER:MARKER" kills the worker of that layer's first try


class RayTaskFailed(LmkilnError):
    """A layer's Ray task failed for a reason other than the layer itself (worker lost, node gone)."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray, an optional extra: pip install 'lmkiln[ray]'") from None
    return ray


def unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to a Ray address's host:port does not open within `timeout`
    seconds, or None when it does. Ray itself retries a dead address for minutes, printing
    its own log lines; an address that is not host:port ("auto") is left to Ray."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


@dataclass
class RayDriver:
    """A driver for quantize_model(driver=...): yields finished layers in layer order.

    address: None starts a local Ray runtime with this machine's CPUs and GPUs (or uses
    the one this process already started); otherwise `ray.init(address=...)`.
    workers: concurrent layer jobs; 0 = one per GPU, or on CPUs as many as the CPUs and
    host memory allow."""

    address: str | None = None
    workers: int = 0
    max_retries: int = 3
    on_progress: Callable[[int, int, int, int], None] | None = None  # (done, running, queued, total)
    on_info: Callable[[str], None] | None = None
    info: dict = field(default_factory=dict)  # what the report records about the cluster

    def prepare(self, compute, plan, n_layers: int) -> int | None:
        """Join or start the cluster and place the jobs; the CPU threads each job gets."""
        ray = import_ray()
        self._owned = self._connect(ray)
        self._slots, self._request = self._placement(ray, compute, plan, n_layers)
        return self._request["num_cpus"] if compute.device.type == "cpu" else None

    def __call__(self, run: LayerRun, start: int, spec: AwqSpec) -> Iterator[LayerResult]:
        ray = import_ray()
        if not hasattr(self, "_slots"):
            self.prepare(run.compute, run.plan, run.n_layer)
        pending: dict = {}
        try:
            yield from self._layers(ray, run, start, spec, pending)
        finally:
            for ref in pending:  # stopped early (an error, ^C): leave nothing running
                ray.cancel(ref, force=True)
            if self._owned:
                ray.shutdown()

    # -- cluster ---------------------------------------------------------------------------

    def _connect(self, ray) -> bool:
        """Join or start a runtime; True when this driver started it (and stops it)."""
        local = self.address in (None, "", "local")
        why = None if local else unreachable(self.address)
        if why:
            raise InputError(f"--ray {self.address}: cannot reach a Ray cluster there ({why}); start one "
                             "(`ray start --head`) or check the address (host:6379 or ray://host:10001)")
        if ray.is_initialized():
            return False
        kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if local:
                ray.init(num_cpus=os.cpu_count(), **kw)
            else:
                ray.init(address=self.address, **kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"--ray {self.address or ''}: cannot start or join a Ray cluster ({first}); "
                             "check the address (host:6379 or ray://host:10001) or omit it for a local runtime") from None
        except OSError as e:  # Ray's session files go under RAY_TMPDIR (else TMPDIR) and ~/.ray
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            raise InputError(f"--ray: Ray cannot write its session files in {e.filename or 'its temporary directory'} "
                             f"({e.strerror}); set RAY_TMPDIR (or TMPDIR) and HOME to writable directories") from None
        return True

    def _placement(self, ray, compute, plan, n_layers: int) -> tuple[int, dict]:
        """(concurrent jobs, the task's resource request)."""
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        say = self.on_info or (lambda s: None)
        if compute.device.type == "cuda":
            if gpus == 0:
                raise InputError("--ray with a CUDA device: the Ray cluster has no GPUs; pass --device cpu or join a GPU cluster")
            slots = self.workers or gpus
            request = {"num_gpus": 1, "num_cpus": 1}
        else:
            if gpus:
                say(f"the cluster has {gpus} GPU(s) but this run computes on the CPU (bit-identical to a CPU run); "
                    "run the driver on a GPU node with --device cuda to use them")
            mem = res.get("memory", 0)
            by_memory = int(mem // max(1, plan.peak_host)) if mem else cpus
            slots = self.workers or max(1, min(cpus, by_memory, n_layers))
            request = {"num_cpus": max(1, cpus // slots)}
        slots = max(1, min(slots, n_layers))
        self.info.update({"kind": "ray", "address": self.address or "local", "workers": slots,
                          "task_resources": request, "cluster": {"CPU": cpus, "GPU": gpus,
                                                                 "nodes": len([n for n in ray.nodes() if n.get("Alive")])}})
        return slots, request

    # -- the run ---------------------------------------------------------------------------

    def _layers(self, ray, run: LayerRun, start: int, spec: AwqSpec, pending: dict) -> Iterator[LayerResult]:
        n = run.n_layer
        say = self.on_info or (lambda s: None)
        todo = [i for i in range(start, n) if not run.state.is_done(i)]
        slots, request = self._slots, self._request
        threads = request["num_cpus"] if run.compute.device.type == "cpu" else 0
        job = ray.remote(layer_task).options(**request, max_retries=self.max_retries, retry_exceptions=False)
        args = (str(run.ckpt.path), model_fingerprint(run.ckpt), lmkiln.__version__, run.compute.device.type,
                run.compute.dtype, threads, run.options, run.out_dtype, run.plan.hidden_on_device, os.environ.get(CRASH_ENV))
        awq = run.options.calibrated  # the jobs need hidden states (AWQ, GPTQ)
        mod = LayerModule(run.ckpt, run.arch, run.compute) if awq else None
        hidden = run.first_input(start)
        spare = torch.empty_like(hidden) if awq else None
        ready: dict[int, LayerResult] = {}
        done = [start + (n - start - len(todo))]  # finished layers, counted for progress
        t_fp = 0.0

        def progress():
            if self.on_progress:
                running = min(len(pending), slots)
                self.on_progress(done[0], running, n - done[0] - running, n)

        def collect(block: bool) -> None:
            refs = list(pending)
            if not refs:
                return
            finished, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
            failure = None
            for ref in finished:
                i = pending.pop(ref)
                try:
                    res = _get(ray, ref, i)
                except Exception as e:
                    failure = failure or e
                    continue
                run.state.save(res, run.module_of)
                ready[i] = res
                done[0] += 1
            progress()
            if failure is not None:
                # Keep what the other workers are finishing (a layer each at most), then fail.
                if pending:
                    say(f"{failure}; finishing the {len(pending)} running layer(s) first so they are not lost")
                while pending:
                    ref = ray.wait(list(pending), num_returns=1)[0][0]
                    i = pending.pop(ref)
                    try:
                        run.state.save(_get(ray, ref, i), run.module_of)
                    except Exception:
                        pass  # the first failure is the one reported
                raise failure

        emit = start

        def in_order() -> Iterator[LayerResult]:
            nonlocal emit
            while emit < n and (emit in ready or (emit not in todo_set)):
                yield ready.pop(emit) if emit in ready else run.state.load(emit, spec, run.linears(emit))
                emit += 1

        todo_set = set(todo)
        progress()
        for i in range(start, n):
            if i in todo_set:
                while len(pending) > slots:  # every slot busy and one queued: wait for a slot
                    collect(block=True)
                    yield from in_order()
                pending[job.remote(*args, i, ray.put(_to_wire(hidden)) if awq else None)] = i
                progress()
            if awq and i + 1 < n and any(j > i for j in todo):
                t0 = time.time()
                with threads_for(run.mcfg, run.compute, threads):  # the jobs' threads: the same bits as their first pass
                    run.forward(mod, i, hidden, spare)
                hidden, spare = spare, hidden  # the old input went into the object store: reuse its buffer
                if i + 1 in todo_set:
                    run.state.save_hidden(i, hidden)  # before any collect: a done layer's successor always has its input
                t_fp += time.time() - t0
            collect(block=False)
            yield from in_order()
        while pending:
            collect(block=True)
            yield from in_order()
        yield from in_order()
        self.info["fp_pass_seconds"] = round(t_fp, 3)


def _get(ray, ref, i: int) -> LayerResult:
    """The task's result; its own errors surface as themselves, Ray's as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise RayTaskFailed(f"layer {i}: the Ray task failed ({_first_line(e)}); rerun with --resume") from None
    except ray.exceptions.RayError as e:
        raise RayTaskFailed(f"layer {i}: the Ray task was lost after retries ({_first_line(e)}); "
                            "rerun with --resume to continue from the finished layers") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def _to_wire(t: torch.Tensor):
    """Hidden states as bytes Ray stores without pickling (numpy), whatever the dtype (bf16)."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).numpy(), t.dtype


def _from_wire(wire) -> torch.Tensor:
    arr, dtype = wire
    with warnings.catch_warnings():  # the object store's buffer is read-only; jobs only read their input
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr).view(dtype)


# -- the task (runs in a Ray worker) -------------------------------------------------------

_WORKER: dict = {}  # the layer module and config, kept between this worker's tasks


def _worker_module(path: str, fingerprint: str, version: str, compute):
    key = (path, compute)
    if _WORKER.get("key") != key:
        _WORKER.clear()
        host = socket.gethostname()
        if version != lmkiln.__version__:
            raise InputError(f"node {host}: lmkiln {lmkiln.__version__}, the driver has {version}; install the same version on every node")
        if not Path(path).is_dir():
            raise InputError(f"node {host}: the model {path} is not there; every node must see the checkpoint at the driver's path")
        ckpt = HFCheckpoint(path)
        if model_fingerprint(ckpt) != fingerprint:
            raise InputError(f"node {host}: the model at {path} differs from the driver's; every node must see the same checkpoint")
        arch = get_architecture(ckpt.architecture)
        _WORKER.update(key=key, mod=LayerModule(ckpt, arch, compute), mcfg=engine_config_from_hf(arch, ckpt.config))
    return _WORKER["mod"], _WORKER["mcfg"]


def layer_task(path: str, fingerprint: str, version: str, device_type: str, dtype: torch.dtype, threads: int,
               options: QuantOptions, out_dtype: torch.dtype, hidden_on_device: bool, crash: str | None,
               i: int, wire) -> LayerResult:
    """One layer's job in a Ray worker: the same run_layer as the single-process driver."""
    t0 = time.time()
    names = {v: k for k, v in COMPUTE_DTYPES.items()}
    compute = resolve_compute(device_type, names[dtype])  # a GPU task sees its one GPU as cuda:0
    if crash and crash.split(":", 1)[0] == str(i) and not Path(crash.split(":", 1)[1]).exists():
        Path(crash.split(":", 1)[1]).touch()
        os._exit(1)  # a worker dying mid-task, as on a lost node or an OOM kill
    mod, mcfg = _worker_module(path, fingerprint, version, compute)
    hidden = kwargs = None
    if wire is not None:
        hidden = _from_wire(wire)
        if hidden_on_device:
            hidden = hidden.to(compute.device)
        kwargs = calibration_kwargs(mcfg, hidden[:, :, 0], compute)[i]
    with threads_for(mcfg, compute, threads):  # the threads the fingerprint records (CPU results depend on them)
        res, _ = run_layer(mod, i, options, out_dtype, hidden, kwargs)
    for role in res.qtensors:
        res.awq_gemm(role)  # pack here, not on the driver
    import ray

    res.report.update({"node": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()[:12],
                       "pid": os.getpid(), "task_seconds": round(time.time() - t0, 3)})
    return res
