"""`lmkiln quantize --ray`: the Ray driver gives the single-process run's bytes, resumes
across drivers, survives a worker dying, and fails in one line without Ray.

One local Ray runtime with 2 CPUs serves the module (the CI machine has 2 cores);
the driver joins it instead of starting its own."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from helpers import torch_threads
from lmkiln.assets import bundled_model_path
from lmkiln.cli import app, optional_values
from lmkiln.errors import InputError
from lmkiln.quant.awq import QuantOptions
from lmkiln.quant.pipeline import REPORT, STOP_ENV, CalibOptions, quantize_model
from lmkiln.quant.ray_driver import CRASH_ENV, RayDriver, layer_task
from quant_fixtures import build_hf

STORIES = bundled_model_path()
CALIB = CalibOptions(n_samples=16, seqlen=128)
W4 = QuantOptions(bits=4, group_size=32)
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def digests(out: Path) -> dict[str, str]:
    """Every file's sha256, the report aside (it holds timings and the driver)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.name != REPORT}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # qwen3 of quant_fixtures: hidden 48 padded to whole groups, q/k norms, tied embeddings
    return build_hf("qwen3", tmp_path_factory.mktemp("qwen3") / "model")


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny):
    """The single-process outputs the Ray runs must equal."""
    root = tmp_path_factory.mktemp("single")
    cache = {}

    def get(model: str, opts: QuantOptions, to: str = "hf") -> Path:
        key = (model, opts, to)
        if key not in cache:
            src = STORIES if model == "stories" else tiny
            cache[key] = quantize_model(src, root / f"{model}-{len(cache)}", opts, CALIB, to=to).output
        return cache[key]

    return get


@pytest.mark.parametrize("model,opts,to", [
    ("stories", W4, "hf"),
    ("stories", W4, "engine"),
    ("stories", QuantOptions(bits=4, group_size=32, method="rtn"), "hf"),
    ("tiny", QuantOptions(bits=8, group_size=16), "hf"),
])
def test_ray_output_is_bit_identical(model, opts, to, single, tiny, tmp_path):
    ref = single(model, opts, to)
    progress = []
    drv = RayDriver(on_progress=lambda *a: progress.append(a))
    res = quantize_model(STORIES if model == "stories" else tiny, tmp_path / "out", opts, CALIB, to=to, driver=drv)
    assert digests(res.output) == digests(ref)
    layers = res.report["layers"]
    assert [lay["layer"] for lay in layers] == list(range(len(layers)))
    assert all(lay["node"] and lay["pid"] and lay["seconds"] > 0 for lay in layers)
    assert res.report["driver"]["kind"] == "ray" and res.report["driver"]["workers"] == 2
    # the progress callback saw work in flight and ended with everything done
    assert any(running for _, running, _, _ in progress)
    assert progress[-1] == (len(layers), 0, 0, len(layers))


def test_resume_across_drivers(single, tmp_path, monkeypatch):
    """A Ray run whose driver dies resumes with Ray or without it, to the same bytes;
    layers finished out of order before the crash are not redone."""
    ref = single("stories", W4)
    for resume_with_ray in (True, False):
        out = tmp_path / f"out{resume_with_ray}"
        partial = tmp_path / f".{out.name}.lmkiln-partial"
        monkeypatch.setenv(STOP_ENV, "1")
        with pytest.raises(KeyboardInterrupt):
            quantize_model(STORIES, out, W4, CALIB, driver=RayDriver())
        monkeypatch.delenv(STOP_ENV)
        assert not out.exists()
        done = sorted(int(p.stem[5:]) for p in (partial / "state").glob("layer*.safetensors"))
        assert done[:2] == [0, 1]
        seen = []
        res = quantize_model(STORIES, out, W4, CALIB, resume=True, driver=RayDriver() if resume_with_ray else None,
                             on_layer=lambda i, n, rep: seen.append(i))
        assert digests(res.output) == digests(ref)
        assert not partial.exists()
        if not resume_with_ray:
            assert seen == list(range(2, 5))


def test_a_dying_worker_is_retried(single, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, f"2:{marker}")
    res = quantize_model(STORIES, tmp_path / "out", W4, CALIB, driver=RayDriver())
    assert marker.exists()  # layer 2's first worker did die
    assert digests(res.output) == digests(single("stories", W4))


def test_a_dead_worker_past_its_retries_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_ENV, f"1:{tmp_path / 'crashed'}")
    with pytest.raises(Exception) as e:
        quantize_model(STORIES, tmp_path / "out", W4, CALIB, driver=RayDriver(max_retries=0))
    assert "layer 1" in str(e.value) and "--resume" in str(e.value)
    assert (tmp_path / ".out.lmkiln-partial" / "state" / "layer0.safetensors").exists()  # nothing finished is lost


def test_a_task_checks_it_sees_the_drivers_checkpoint(tmp_path):
    args = (W4, __import__("torch").float32, False, None, 0, None)
    with pytest.raises(InputError, match="differs from the driver's"):
        layer_task(str(STORIES), "0" * 64, __import__("lmkiln").__version__, "cpu", __import__("torch").float32, 1, *args)
    with pytest.raises(InputError, match="is not there"):
        layer_task(str(tmp_path / "gone"), "0" * 64, __import__("lmkiln").__version__, "cpu", __import__("torch").float32, 1, *args)


def test_cli_ray(single, tmp_path):
    out = tmp_path / "out"
    args = optional_values(["quantize", str(STORIES), "--w4a16", "--group-size", "32", "--calib-samples", "16",
                            "--calib-seqlen", "128", "--ray", "-o", str(out)])
    assert args[args.index("--ray") + 1] == "local"
    r = CliRunner().invoke(app, args, env=ENV)
    assert r.exit_code == 0, r.output
    assert "ray: 2 worker(s) on 1 node(s)" in r.output
    assert digests(out) == digests(single("stories", W4))


def test_optional_ray_value():
    assert optional_values(["quantize", "m", "--ray"]) == ["quantize", "m", "--ray", "local"]
    assert optional_values(["quantize", "--ray", str(STORIES)]) == ["quantize", "--ray", "local", str(STORIES)]
    assert optional_values(["quantize", "m", "--ray", "head:6379"]) == ["quantize", "m", "--ray", "head:6379"]
    assert optional_values(["quantize", "m", "--ray=auto"]) == ["quantize", "m", "--ray=auto"]
    # an empty value is a (bad) address, not the directory "" names (".": it became an extra argument)
    assert optional_values(["quantize", "m", "--ray", ""]) == ["quantize", "m", "--ray", ""]
    # a mistyped model path is no cluster address: it stays the model ("Missing argument 'model'" before)
    assert optional_values(["quantize", "--ray", "./typo-dir"]) == ["quantize", "--ray", "local", "./typo-dir"]
    assert optional_values(["quantize", "--ray", "ray://head:10001", "m"]) == ["quantize", "--ray", "ray://head:10001", "m"]
    assert optional_values(["quantize", "--ray", "auto", "m"]) == ["quantize", "--ray", "auto", "m"]
    r = CliRunner().invoke(app, ["quantize", str(STORIES), "-o", "x", "--w4a16", "--ray", ""], env={"NO_COLOR": "1"})
    assert r.exit_code == 2 and "--ray '': give a cluster address" in r.output, r.output


def test_cli_ray_errors(tmp_path, monkeypatch):
    base = ["quantize", str(STORIES), "--w4a16", "-o", str(tmp_path / "out")]
    r = CliRunner().invoke(app, base + ["--workers", "2"], env=ENV)
    assert r.exit_code == 2 and "--workers goes with --ray" in r.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    r = CliRunner().invoke(app, base + ["--ray", "local"], env=ENV)
    assert r.exit_code == 2, r.output
    assert "pip install 'lmkiln[ray]'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.lmkiln-partial").exists()


def test_unreachable_cluster_is_one_line_in_seconds(tmp_path):
    """An address nothing listens on: one line naming it, at once (Ray alone retried for minutes,
    printing its own log lines)."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    r = CliRunner().invoke(app, ["quantize", str(STORIES), "--w4a16", "--group-size", "32", "-o", str(tmp_path / "out"),
                                 "--ray", f"127.0.0.1:{port}"],
                           env=ENV)
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]  # after the plan's info lines: the one-line error
    assert last.startswith(f"error: --ray 127.0.0.1:{port}: cannot reach a Ray cluster there"), r.output
    assert time.monotonic() - t < 30
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["/ro/tmp/ray", "/ro/home/.ray"])
def test_an_unwritable_ray_session_directory_is_one_line(where):
    """A read-only TMPDIR or HOME: Ray's session files failed as an internal error (OSError EROFS)."""
    import errno
    import types

    def init(**kw):
        raise OSError(errno.EROFS, "Read-only file system", where)

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init)
    with pytest.raises(InputError, match=rf"^--ray: Ray cannot write its session files in {where} \(Read-only file system\); "
                                         r"set RAY_TMPDIR \(or TMPDIR\) and HOME to writable directories$"):
        RayDriver()._connect(fake)


def test_job_threads_are_part_of_the_fingerprint(tmp_path, monkeypatch):
    """CPU kernels round by thread count: the threads a job gets are recorded, so a resume
    under other threads is refused instead of mixing roundings."""
    import json as _json

    import torch

    from lmkiln.quant.job import Compute
    from lmkiln.quant.pipeline import job_threads

    cpu, cuda = Compute(torch.device("cpu"), torch.float32), Compute(torch.device("cuda"), torch.bfloat16)
    big, tiny = {"hidden_units": 2048}, {"hidden_units": 64}
    assert job_threads(big, cpu) == torch.get_num_threads()
    assert job_threads(big, cpu, 3) == 3  # a Ray task's CPUs
    assert job_threads(tiny, cpu, 3) == 1  # tiny models always run on one
    assert job_threads(big, cuda, 3) is None
    monkeypatch.setenv(STOP_ENV, "0")
    with pytest.raises(KeyboardInterrupt):
        quantize_model(STORIES, tmp_path / "out", W4, CALIB, driver=RayDriver())
    fp = _json.loads((tmp_path / ".out.lmkiln-partial" / "state" / "fingerprint.json").read_text())
    assert fp["compute"] == {"device": "cpu", "dtype": "torch.float32", "threads": 1}
