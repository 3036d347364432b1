"""examples/: every recipe users copy runs here, as they run it, on the bundled stories260K.

Each script is executed as a subprocess with its own defaults (only OUT_DIR points into a
temporary directory), and checked for what it promises: its outputs, its exit codes, its
messages. The CI workflow's `run:` steps are executed in order with GitHub's shell and
`if: always()` semantics, once for a good candidate and once for a degraded one. The
serving guide's conversion block and its onnxruntime-genai snippet run too; the commands
of runtimes that need a GPU or a server (vLLM, SGLang, Triton, Ollama) cannot, so every
`lmkiln ...` command written anywhere in examples/ is at least checked against the real
command's `--help` (subcommand and every option).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
# Settings the examples read from the environment: a developer's own values must not leak in.
KNOWN = {"MODEL", "OUT_DIR", "OUT", "AWQ", "TO", "GROUP_SIZE", "METHOD", "CALIB_SAMPLES", "CALIB_SEQLEN", "EVAL_DATA",
         "MAX_TOKENS", "MAX_NEW_TOKENS", "MAX_PPL_INCREASE", "MAX_KL", "MIN_TOP1", "FORCE", "DEVICE", "DTYPE", "PROBE",
         "RAY", "PROMPT", "LMKILN_SPEC", "LMKILN_STOP_AFTER_LAYER", "GITHUB_ENV", "GITHUB_STEP_SUMMARY"}
ENV = {k: v for k, v in os.environ.items() if k not in KNOWN}
ENV.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHON": sys.executable,
            "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
STOP_ENV = "LMKILN_STOP_AFTER_LAYER"  # lmkiln's own test hook: a crash right after layer N is saved
INTERRUPTED = 130


def run(cmd, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def bash(script: Path, cwd, **env) -> subprocess.CompletedProcess:
    return run(["bash", "-euo", "pipefail", script], cwd, env)


def script_default(path: Path, name: str) -> str:
    """The default a script gives NAME (`NAME="${NAME:-value}"`), so tests follow the file, not a copy of it."""
    m = re.search(rf'^{name}="\$\{{{name}:?-([^}}]*)\}}"', path.read_text(), re.M)
    assert m, f"{path.name} has no default for {name}"
    return m.group(1)


def is_png(p: Path) -> bool:
    return p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def load(p: Path) -> dict:
    return json.loads(p.read_text())


# -- every lmkiln command written in examples/ exists, with every option it uses ----------------------------


@lru_cache(maxsize=None)
def help_text(*sub: str) -> str:
    r = run(["lmkiln", *sub, "--help"], ROOT)
    assert r.returncode == 0, (sub, r.stdout, r.stderr)
    return r.stdout


def lmkiln_commands(text: str) -> list[list[str]]:
    """Command lines that start with `lmkiln` (in code, comments or `inline code`), continuations joined."""
    text = text.replace("\\\n", " ")
    found = [m.group(1) for m in re.finditer(r"`(lmkiln [^`]+)`", text)]
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line.startswith("lmkiln "):
            found.append(line)
    return [shlex.split(c, comments=True) for c in found]


def check_command(tokens: list[str]) -> None:
    rest = tokens[1:]
    sub = rest[:2] if rest and rest[0] in ("convert", "export") else rest[:1]
    if sub and sub[0].startswith("-"):
        sub = []
    helptext = help_text(*sub)
    for tok in rest[len(sub):]:
        if re.fullmatch(r"--?[a-z][a-z0-9-]*(=.*)?", tok):
            opt = tok.split("=")[0]
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", helptext), \
                f"`lmkiln {' '.join(sub)}` has no option {opt}: {' '.join(tokens)}"


EXAMPLE_FILES = ["quantize_and_verify.sh", "python_api.py", "ci_gate.yml", "big_model_on_one_gpu.sh", "serve_elsewhere.md"]


def test_examples_folder_holds_the_recipes_and_readme_links_it():
    for name in EXAMPLE_FILES:
        assert (EXAMPLES / name).is_file(), name
    for name in ("quantize_and_verify.sh", "big_model_on_one_gpu.sh", "python_api.py"):
        assert os.access(EXAMPLES / name, os.X_OK), f"{name} is not executable"
    assert re.search(r"\]\((\./)?examples/?\)", (ROOT / "README.md").read_text()), "README.md does not link examples/"


@pytest.mark.parametrize("name", [n for n in EXAMPLE_FILES if not n.endswith(".py")])  # python_api.py: test_python_api
def test_every_lmkiln_command_is_real(name):
    cmds = lmkiln_commands((EXAMPLES / name).read_text())
    assert cmds, f"no lmkiln commands found in {name}"
    for tokens in cmds:
        check_command(tokens)


def test_command_checker_catches_a_wrong_option():
    with pytest.raises(AssertionError, match="--grup-size"):
        check_command(shlex.split("lmkiln quantize ./m -o ./q --w4a16 --grup-size 128"))
    with pytest.raises(AssertionError):
        check_command(shlex.split("lmkiln export onnx ./e -o ./x --tritton"))


# -- quantize_and_verify.sh ---------------------------------------------------------------------------------

QV = EXAMPLES / "quantize_and_verify.sh"


@pytest.fixture(scope="module")
def qv(tmp_path_factory):
    out = tmp_path_factory.mktemp("qv") / "out"
    r = bash(QV, out.parent, OUT_DIR=out)
    return out, r


def test_quantize_and_verify_runs_every_step(qv):
    out, r = qv
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [ln for ln in r.stdout.splitlines() if ln.startswith("== ")]
    assert [s.split()[1] for s in steps] == ["1/5", "2/5", "3/5", "4/5", "5/5"], steps
    assert r.stdout.count("PASS") == 2

    group = int(script_default(QV, "GROUP_SIZE"))
    qcfg = load(out / "model-awq" / "config.json")["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["version"]) == ("awq", 4, group, "gemm")
    qrep = load(out / "quant-report.json")
    assert qrep["method"] == "awq"
    assert qrep["calibration"]["tokens"] == int(script_default(QV, "CALIB_SAMPLES")) * int(script_default(QV, "CALIB_SEQLEN"))

    manifest = load(out / "model-w4.engine" / "manifest.json")
    assert manifest["quantization"]["group_size"] == group

    gate = load(out / "verify.json")
    assert gate["passed"] is True
    assert gate["thresholds"] == {"max_ppl_increase": float(script_default(QV, "MAX_PPL_INCREASE")),
                                  "max_kl": float(script_default(QV, "MAX_KL")), "min_top1": float(script_default(QV, "MIN_TOP1"))}
    assert gate["protocol"]["data"].endswith("tinystories_sample.txt")
    assert gate["protocol"]["tokens"] <= int(script_default(QV, "MAX_TOKENS"))
    assert 0 < gate["kl"]["mean"] <= gate["thresholds"]["max_kl"]  # a real 4-bit model: not identical, within the gate
    assert is_png(out / "verify.png")

    onnx = out / "model-w4.onnx"
    assert (onnx / "model.onnx").is_file() and (onnx / "genai_config.json").is_file()
    parity = load(out / "verify-onnx.json")
    assert parity["passed"] is True and parity["runners"]["candidate"].startswith("onnxruntime")
    assert parity["kl"]["mean"] < 1e-4 and parity["top1_agreement"] >= 0.99


def test_quantize_and_verify_never_overwrites(qv):
    out, first = qv
    assert first.returncode == 0
    weights = out / "model-awq" / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.read_bytes())
    r = bash(QV, out.parent, OUT_DIR=out)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "error:" in r.stderr and "--force" in r.stderr
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == before


# -- python_api.py ------------------------------------------------------------------------------------------


def test_python_api(tmp_path):
    out = tmp_path / "api"
    script = EXAMPLES / "python_api.py"
    r = run([sys.executable, script], tmp_path, {"OUT_DIR": str(out)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    engine = out / "model-w4.engine"
    manifest = load(engine / "manifest.json")
    assert manifest["quantization"]["bits"] == 4
    prompt = re.search(r'PROMPT = os.environ.get\("PROMPT", "([^"]+)"\)', script.read_text()).group(1)
    said = {k: ast.literal_eval(v) for k, v in re.findall(r"^(engine runner|generate_text continuation): (.*)$", r.stdout, re.M)}
    text, continuation = said["engine runner"], said["generate_text continuation"]
    assert text.startswith(prompt) and len(text) > len(prompt) + 10, r.stdout
    # generate_text (the helper behind `lmkiln generate`) continues the prompt exactly as the runner did
    assert continuation.strip() and text.endswith(continuation), (text, continuation)
    assert re.search(r"^logits for the prompt: \(1, \d+, 512\)$", r.stdout, re.M)  # stories260K's vocabulary
    rep = load(out / "verify.json")
    assert rep["passed"] is True and r.stdout.rstrip().endswith("PASS")
    assert f"perplexity {rep['reference']['ppl']:.3f} -> {rep['candidate']['ppl']:.3f}" in r.stdout
    assert set(rep["checks"]) == {"max_ppl_increase", "max_kl", "min_top1"}

    # Run again: the existing engine is an lmkiln error (exit 2, one line), and it is left alone.
    before = (engine / "manifest.json").stat().st_mtime_ns
    again = run([sys.executable, script], tmp_path, {"OUT_DIR": str(out)})
    assert again.returncode == 2 and again.stderr.startswith("error:") and "already exists" in again.stderr, again.stderr
    assert (engine / "manifest.json").stat().st_mtime_ns == before


# -- ci_gate.yml --------------------------------------------------------------------------------------------

GATE = EXAMPLES / "ci_gate.yml"


def workflow() -> dict:
    return yaml.safe_load(GATE.read_text())


def run_workflow(cwd: Path, **overrides) -> dict:
    """The job's steps as GitHub runs them: `run:` steps in bash -eo pipefail with the workflow env,
    $GITHUB_ENV applied after each step, later steps skipped after a failure unless `if: always()`.
    The install step (pip) and `uses:` actions are not run; upload-artifact's paths are returned."""
    wf = workflow()
    env = {**{k: str(v) for k, v in wf["env"].items()}, **overrides,
           "GITHUB_ENV": str(cwd / "github_env"), "GITHUB_STEP_SUMMARY": str(cwd / "summary.md")}
    result = {"steps": {}, "artifacts": [], "failed": False}
    for step in wf["jobs"]["gate"]["steps"]:
        name = step.get("name") or step.get("uses")
        if result["failed"] and "always()" not in str(step.get("if", "")):
            result["steps"][name] = "skipped"
            continue
        if "uses" in step:
            if step["uses"].startswith("actions/upload-artifact"):
                paths = re.sub(r"\$\{\{\s*env\.(\w+)\s*\}\}", lambda m: env[m.group(1)], step["with"]["path"])
                result["artifacts"] = [cwd / p.strip() for p in paths.splitlines() if p.strip()]
            continue
        if "pip install" in step["run"]:
            result["steps"][name] = "install"
            continue
        (cwd / "github_env").write_text("")
        r = run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd, env)
        result["steps"][name] = r
        result["failed"] |= r.returncode != 0
        for line in (cwd / "github_env").read_text().splitlines():
            k, _, v = line.partition("=")
            env[k] = v
    return result


def test_ci_gate_is_a_pull_request_workflow():
    wf = workflow()
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "pull_request" in on
    assert wf["defaults"]["run"]["shell"] == "bash"  # run_workflow mirrors GitHub's bash -eo pipefail
    steps = wf["jobs"]["gate"]["steps"]
    assert sum("pip install" in s.get("run", "") for s in steps) == 1
    upload = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    assert len(upload) == 1 and "always()" in upload[0]["if"]
    assert any("lmkiln verify" in s.get("run", "") and "--max-ppl-increase" in s["run"] for s in steps)


def test_ci_gate_passes_a_good_candidate(tmp_path):
    res = run_workflow(tmp_path)
    ran = {k: v for k, v in res["steps"].items() if isinstance(v, subprocess.CompletedProcess)}
    assert not res["failed"], {k: (v.returncode, v.stdout[-2000:], v.stderr[-2000:]) for k, v in ran.items()}
    assert len(ran) == 4 and all(v.returncode == 0 for v in ran.values())
    assert res["artifacts"] and all(p.is_file() for p in res["artifacts"]), res["artifacts"]
    env = workflow()["env"]
    rep = load(tmp_path / env["OUT_DIR"] / "verify.json")
    assert rep["passed"] is True
    assert rep["thresholds"]["max_ppl_increase"] == float(env["MAX_PPL_INCREASE"])
    assert is_png(tmp_path / env["OUT_DIR"] / "verify.png")
    summary = (tmp_path / "summary.md").read_text()
    assert "**PASS**" in summary and "| max_kl |" in summary


def test_ci_gate_fails_a_degraded_candidate(tmp_path):
    # Round-to-nearest instead of AWQ, gated at a perplexity increase no 4-bit stories260K meets.
    res = run_workflow(tmp_path, METHOD="rtn", MAX_PPL_INCREASE="1")
    gate = next(v for k, v in res["steps"].items() if k.startswith("Gate"))
    assert gate.returncode == 1, (gate.stdout[-2000:], gate.stderr[-2000:])
    assert "FAIL max_ppl_increase" in gate.stderr
    assert res["failed"]
    out = tmp_path / workflow()["env"]["OUT_DIR"]
    assert load(out / "quant-report.json")["method"] == "rtn"
    rep = load(out / "verify.json")
    assert rep["passed"] is False and rep["checks"]["max_ppl_increase"]["passed"] is False
    assert rep["ppl_increase_pct"] > 1
    # The report and the plot are still kept, and the summary says why.
    assert isinstance(res["steps"]["Summary"], subprocess.CompletedProcess) and res["steps"]["Summary"].returncode == 0
    assert all(p.is_file() for p in res["artifacts"]), res["artifacts"]
    assert "**FAIL**" in (tmp_path / "summary.md").read_text()


# -- big_model_on_one_gpu.sh --------------------------------------------------------------------------------

BIG = EXAMPLES / "big_model_on_one_gpu.sh"


def test_big_model_plan_interrupt_resume(tmp_path):
    out = tmp_path / "big"
    # First run: the plan (dry run with a one-layer probe), then a crash after layer 1 is saved.
    r1 = bash(BIG, tmp_path, OUT_DIR=out, **{STOP_ENV: "1"})
    assert r1.returncode == INTERRUPTED, r1.stdout[-3000:] + r1.stderr[-3000:]
    assert "quantize plan" in r1.stdout and "seconds for one layer (probe)" in r1.stdout
    assert "run this script again" in r1.stderr
    partial = out / ".model-w4.lmkiln-partial"
    assert partial.is_dir() and not (out / "model-w4").exists()
    cpu = "no usable GPU" in r1.stderr

    # Second run: the script finds the resume state and continues after the finished layers.
    r2 = bash(BIG, tmp_path, OUT_DIR=out)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "resuming after 2 finished layer(s)" in r2.stderr
    assert "quantize plan" not in r2.stdout
    assert not partial.exists()
    cfg = load(out / "model-w4" / "config.json")["quantization_config"]
    assert cfg["group_size"] == int(script_default(BIG, "GROUP_SIZE")) and cfg["bits"] == 4
    rep = load(out / "quant-report.json")
    assert [lay["layer"] for lay in rep["layers"]] == list(range(len(rep["layers"])))
    assert rep["compute"]["device"].startswith("cpu" if cpu else "cuda")
    assert rep["compute"]["dtype"] == ("float32" if cpu else "bfloat16")

    # Third run: the output is there; nothing is redone or replaced.
    before = (out / "model-w4" / "model.safetensors").stat().st_mtime_ns
    r3 = bash(BIG, tmp_path, OUT_DIR=out)
    assert r3.returncode == 0 and "nothing to do" in r3.stdout
    assert (out / "model-w4" / "model.safetensors").stat().st_mtime_ns == before


# -- serve_elsewhere.md -------------------------------------------------------------------------------------

SERVE = EXAMPLES / "serve_elsewhere.md"


def marked_block(marker: str) -> str:
    m = re.search(rf"<!-- examples-test: {marker} -->\s*```\w+\n(.*?)```", SERVE.read_text(), re.S)
    assert m, f"no block marked {marker}"
    return m.group(1)


def test_serve_elsewhere_outputs_load(qv, tmp_path):
    awq = qv[0] / "model-awq"
    assert awq.is_dir(), qv[1].stderr[-2000:]
    served = tmp_path / "served"
    block = marked_block("run")
    block = re.sub(r"^AWQ=\S+", f"AWQ={shlex.quote(str(awq))}", block, flags=re.M)
    block = re.sub(r"^OUT=\S+", f"OUT={shlex.quote(str(served))}", block, flags=re.M)
    assert str(awq) in block and str(served) in block
    r = run(["bash", "-euo", "pipefail", "-c", block], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # compressed-tensors for vLLM / SGLang
    qc = load(served / "llama-ct" / "config.json")["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    # Triton: the repository the guide's docker command mounts, named as the guide shows
    doc = SERVE.read_text()
    mount = re.search(r'-v "\$PWD/(\S+):/models"', doc).group(1)
    repo = tmp_path / mount
    name = re.search(r"model_repository/\n\s+(\S+)/\n\s+config\.pbtxt", doc).group(1)
    assert (repo / name / "1" / "model.onnx").is_file()
    pbtxt = (repo / name / "config.pbtxt").read_text()
    assert f'name: "{name}"' in pbtxt and 'backend: "onnxruntime"' in pbtxt
    # GGUF + the Modelfile beside it
    from_line = (served / "Modelfile").read_text().strip()
    assert from_line.startswith("FROM ")
    gguf = served / from_line.split(maxsplit=1)[1]
    assert gguf.read_bytes()[:4] == b"GGUF"

    # The onnxruntime-genai snippet, as written, on the export.
    pytest.importorskip("onnxruntime_genai")
    code = marked_block("python").replace("./served", str(served))
    r = run([sys.executable, "-c", code], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout.strip()
    assert text.startswith("Once upon a time") and len(text.split()) > 8, text
