#!/usr/bin/env python3
"""Benchmark: `lmkiln quantize` wall time per layer, peak RSS, and perplexity fp32 / RTN / AWQ.

Two models:

stories260K (bundled, a real TinyStories Llama: hidden 64, 5 layers, ffn 172, vocab 512)
    quality: perplexity of the fp32 engine and of every quantized engine on in-domain
    TinyStories text (default: tests/fixtures/tinystories_eval.txt), at W4 g32 / g64
    (g128 only where every linear's input width is >= 128, so not for this model), W8
    per-channel, and W3 g32 as a reference. Each W4/W8 row is `python -m lmkiln quantize
    ... --to engine` (RTN, and AWQ calibrated on the bundled WikiText-2 excerpt); with
    `--calib-text FILE` also AWQ calibrated on that (in-domain) text, after removing every
    paragraph that shares a line with the eval text.
    With `--peers gptq,awq`: llm-compressor's GPTQ and AWQ (bench/peers/llmcompressor_awq.py,
    in its own venv bench/out/venv-llmcompressor) on the very calibration ids lmkiln used for
    each calibration text, at every W4 group size; its fake-quantized fp32 checkpoint is
    converted to an fp32 engine and evaluated the same way. llm-compressor needs each input
    width to be a multiple of the group (stories260K's down_proj reads 172): `--peer-down
    channel` (default) quantizes down_proj per output channel, `ignore` keeps it in fp.
    W3: `lmkiln quantize` only writes 4- and 8-bit checkpoints, so W3 runs the same
    layer-by-layer loop in-process (a worker of this script calling
    lmkiln.quant.awq.awq_layer / rtn_layer with QuantOptions(bits=3) on the same
    calibration ids as the CLI), writes the fake-quantized (dequantized) fp32 checkpoint,
    converts it to an fp32 engine and evaluates it the same way. With `--quick` the same
    worker also reproduces the CLI's W4 g32 AWQ row as a cross-check of that path.

synthetic Llama (random seeded weights: hidden 1024, 16 heads, 4 kv heads, ffn 2816,
vocab 512 with the bundled stories tokenizer, fp16 sharded safetensors)
    cost: per-layer seconds and peak RSS against the model's fp32 size, for RTN and AWQ
    (W4 g128, `--to hf`), at 8 layers and at a second layer count (RTN 32 layers, AWQ 2
    layers) to show whether peak RSS follows the layer count. Random weights have no
    meaningful perplexity, so none is reported. A profile worker splits one AWQ layer's
    time into its phases (trial weights, scoring, clip search, ...; the forwards are the rest).

Perplexity: the eval text is tokenized whole (no special tokens), cut into
non-overlapping windows of ctx-1 tokens, each window scored with BOS prepended (so its
first token is predicted too) by lmkiln's EngineModel; ppl = exp(mean NLL over all
tokens). Gap = ppl - ppl(fp32); the target is gap(AWQ) <= 0.5 * gap(RTN).

Every measured step is a child process reaped with os.wait4: ru_maxrss is that child's
peak RSS (KiB on Linux), plus CPU seconds; a sampler polls /proc/PID/status to split the
peak into RssAnon (allocated) and RssFile (mapped files, e.g. the safetensors being
read, which the kernel can drop). This process never imports torch: Linux carries the
parent's RSS high-water mark into a forked child's ru_maxrss. A baseline child that only
imports torch + transformers + lmkiln gives the floor every run pays.

    .venv/bin/python bench/quantize.py --quick                # smoke run, a few minutes
    .venv/bin/python bench/quantize.py --calib-text TINYSTORIES.txt --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

from common import llama_tensors, machine as _machine

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EVAL = ROOT / "tests" / "fixtures" / "tinystories_eval.txt"
STORIES = ROOT / "src" / "assets" / "stories260K"  # == lmkiln.assets.bundled_model_path()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
MB = 1e6
MIB = 1 << 20

SYNTH = dict(hidden=1024, heads=16, kv_heads=4, inter=2816, vocab=512)
PEER_PY = ROOT / "bench" / "out" / "venv-llmcompressor" / "bin" / "python"
PEER = ROOT / "bench" / "peers" / "llmcompressor_awq.py"


# =========================================================================================
# workers: run as `python bench/quantize.py --_worker KIND JSON` (these import torch)
# =========================================================================================


def machine() -> dict:
    return _machine("torch", "transformers")

def synth_sizes(layers: int, shape: dict = SYNTH) -> dict:
    t = llama_tensors(**shape, layers=layers)
    n = sum(math.prod(s) for _, s in t)
    per_layer = sum(math.prod(s) for name, s in llama_tensors(**shape, layers=1) if ".layers." in name)
    return {"params": n, "fp32_bytes": 4 * n, "layer_fp32_bytes": 4 * per_layer}


def w_synth(a: dict) -> dict:
    """Write a seeded random LlamaForCausalLM (fp16, sharded + index) with the bundled tokenizer."""
    import torch
    from safetensors.torch import save_file

    out = Path(a["path"])
    shape = a["shape"]
    layers = a["layers"]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(a["seed"])
    shard_bytes = a["shard_mb"] * MB
    shards, cur, used = [], [], 0
    for name, s in llama_tensors(**shape, layers=layers):
        nb = 2 * math.prod(s)
        if cur and used + nb > shard_bytes:
            shards.append(cur)
            cur, used = [], 0
        cur.append((name, s))
        used += nb
    shards.append(cur)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        sd = {}
        for name, s in shard:
            if len(s) == 1:  # norms around 1, as in tests/helpers.init_weights
                t = 1.0 + 0.1 * torch.randn(s, generator=g)
            elif "embed_tokens" in name:
                t = 0.5 * torch.randn(s, generator=g)
            else:
                t = min(0.5, max(0.02, s[-1] ** -0.5)) * torch.randn(s, generator=g)
            sd[name] = t.to(torch.float16)
            weight_map[name] = fname
            total += 2 * math.prod(s)
        save_file(sd, str(out / fname), metadata={"format": "pt"})
        del sd
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape["hidden"], "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
        "head_dim": shape["hidden"] // shape["heads"], "intermediate_size": shape["inter"], "num_hidden_layers": layers,
        "vocab_size": shape["vocab"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for n in TOKENIZER_FILES:
        shutil.copyfile(STORIES / n, out / n)
    return {"file_bytes": total, "shards": len(shards)}


def _calibration(ckpt, mcfg, a: dict):
    """The calibration ids exactly as quantize_model builds them."""
    from lmkiln.formats.tokenizer import load_tokenizer
    from lmkiln.quant.calib import build_calibration_samples, load_calibration_texts

    tok = load_tokenizer(ckpt.path)
    return build_calibration_samples(load_calibration_texts(a.get("calib")), lambda s: tok(s, add_special_tokens=False).input_ids,
                                     a["samples"], a["seqlen"], a.get("seed", 0))


def w_ids(a: dict) -> dict:
    """The calibration ids quantize_model would use, saved as an int64 tensor for a peer."""
    import torch

    from lmkiln.convert.architectures import get_architecture
    from lmkiln.convert.hf_config import engine_config_from_hf
    from lmkiln.formats.hf import HFCheckpoint

    ckpt = HFCheckpoint(a["model"])
    cs = _calibration(ckpt, engine_config_from_hf(get_architecture(ckpt.architecture), ckpt.config), a)
    torch.save(cs.input_ids.to(torch.int64).contiguous(), a["out"])
    return {"summary": cs.describe(), "sha256": cs.sha256, "shape": list(cs.input_ids.shape)}


def w_fakequant(a: dict) -> dict:
    """Layer-by-layer quantization (any --method) at any bit width the primitives support
    (3 included), as quantize_model does it, then the dequantized fp32 checkpoint -> fp32 engine."""
    import torch
    from safetensors.torch import save_file

    from lmkiln.convert.architectures import get_architecture
    from lmkiln.convert.hf_config import engine_config_from_hf
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.formats.hf import HFCheckpoint
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.job import LayerModule, position_embeddings, resolve_compute, run_layer

    t_start = time.time()
    ckpt = HFCheckpoint(a["model"])
    arch = get_architecture(ckpt.architecture)
    mcfg = engine_config_from_hf(arch, ckpt.config)
    o = QuantOptions(bits=a["bits"], group_size=a["group"], method=a["method"], **a.get("options", {}))  # e.g. act_order, damp
    compute = resolve_compute("cpu", "fp32")
    mod = LayerModule(ckpt, arch, compute)
    hidden, kw, calib = None, {}, None
    if o.calibrated:
        cs = _calibration(ckpt, mcfg, a)
        calib = {"samples": cs.n_samples, "seqlen": cs.seqlen, "tokens": cs.n_tokens, "sha256": cs.sha256, "summary": cs.describe()}
        hidden = torch.nn.functional.embedding(cs.input_ids, ckpt.get(arch.hf_name_of("embed")).float())
        kw = {"position_embeddings": position_embeddings(mcfg["rope"], cs.seqlen, compute), "attention_mask": None}
    sd, secs = {}, []
    for i in range(mcfg["num_layer"]):
        t0 = time.time()
        res, out = run_layer(mod, i, o, torch.float32, hidden, kw)  # the job quantize_model runs, any method
        hidden = out if out is not None else hidden
        sd.update({n: t.float().clone() for n, t in res.fp.items()})  # norms carry the folded AWQ scales
        for role, qt in res.qtensors.items():
            sd[arch.hf_name_of(role, i)] = qt.dequantize().float().contiguous()
        secs.append(round(time.time() - t0, 3))
    for name in ckpt.keys():
        if name not in sd:
            sd[name] = ckpt.get(name).float().contiguous()
    hf = Path(a["out"] + ".fakequant-hf")
    if hf.exists():
        shutil.rmtree(hf)
    hf.mkdir(parents=True)
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(ckpt.config)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (hf / "config.json").write_text(json.dumps(cfg, indent=2))
    for p in ckpt.tokenizer_files():
        shutil.copyfile(p, hf / p.name)
    convert_hf_to_engine(hf, a["out"], force=True)
    shutil.rmtree(hf)
    report = {"method": o.method, "options": {"bits": o.bits, "group_size": o.group_size}, "calibration": calib,
              "totals": {"seconds": round(time.time() - t_start, 3), "seconds_per_layer": secs}}
    Path(a["report"]).write_text(json.dumps(report, indent=1))
    return {}


def w_ppl(a: dict) -> dict:
    """Perplexity of an engine on a text: non-overlapping windows of ctx-1 tokens, BOS first."""
    import torch

    from lmkiln.formats.tokenizer import load_tokenizer
    from lmkiln.runtime.engine_model import EngineModel

    tok = load_tokenizer(a["engine"])
    text = Path(a["text"]).read_text(encoding="utf-8")
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.long)
    model = EngineModel.from_path(a["engine"])
    window = a.get("window") or model.config["max_position_embeddings"] - 1
    bos = tok.bos_token_id
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, ids.numel(), window):
            inp = torch.cat([torch.tensor([bos]), ids[s:s + window]])[None]
            logits = model(inp)[0].double()
            total += float(torch.nn.functional.cross_entropy(logits[:-1], inp[0, 1:], reduction="sum"))
            count += inp.shape[1] - 1
    modes = sorted({m.mode for m in model.modules() if hasattr(m, "mode")})
    return {"ppl": math.exp(total / count), "tokens": count, "window": window, "linear_modes": modes}


def w_baseline(a: dict) -> dict:
    """Import what every quantize run imports, and build the empty HF decoder layer."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import lmkiln.cli  # noqa: F401
    from lmkiln.quant import pipeline  # noqa: F401
    from lmkiln.runtime import engine_model  # noqa: F401
    return {}


def w_profile(a: dict) -> dict:
    """Time the phases of awq_layer on the first `layers` layers (exclusive seconds)."""
    import torch

    from lmkiln.convert.architectures import get_architecture
    from lmkiln.convert.hf_config import engine_config_from_hf
    from lmkiln.formats.hf import HFCheckpoint
    from lmkiln.quant import awq as A
    from lmkiln.quant.job import LayerModule, position_embeddings, resolve_compute

    excl: dict[str, float] = {}
    calls: dict[str, int] = {}
    stack: list[list] = []

    def timed(name, fn):
        def wrapper(*args, **kw):
            stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kw)
            finally:
                n, t0, child = stack.pop()
                el = time.perf_counter() - t0
                excl[n] = excl.get(n, 0.0) + el - child
                calls[n] = calls.get(n, 0) + 1
                if stack:
                    stack[-1][2] += el
        return wrapper

    for name in ("trial_weight", "sq_err", "fold_scale", "search_clip", "apply_clip", "quantize_weight", "weight_mean"):
        setattr(A, name, timed(name, getattr(A, name)))

    ckpt = HFCheckpoint(a["model"])
    arch = get_architecture(ckpt.architecture)
    mcfg = engine_config_from_hf(arch, ckpt.config)
    o = A.QuantOptions(bits=a["bits"], group_size=a["group"])
    cs = _calibration(ckpt, mcfg, a)
    compute = resolve_compute("cpu", "fp32")
    mod = LayerModule(ckpt, arch, compute)
    hidden = torch.nn.functional.embedding(cs.input_ids, ckpt.get(arch.hf_name_of("embed")).float())
    kw = {"position_embeddings": position_embeddings(mcfg["rope"], cs.seqlen, compute), "attention_mask": None}
    t0 = time.perf_counter()
    for i in range(a["layers"]):
        layer, _ = mod.load(i)
        stack.append(["awq_layer (rest)", time.perf_counter(), 0.0])
        _, hidden, _ = A.awq_layer(layer, arch, hidden, kw, o, i)
        n, ts, child = stack.pop()
        excl[n] = excl.get(n, 0.0) + time.perf_counter() - ts - child
    total = time.perf_counter() - t0
    return {"seconds_per_layer": total / a["layers"], "threads": torch.get_num_threads(),
            "calibration": cs.describe(),
            "phases": {k: {"seconds_per_layer": v / a["layers"], "calls_per_layer": calls.get(k, a["layers"]) / a["layers"]}
                       for k, v in sorted(excl.items(), key=lambda kv: -kv[1])}}


WORKERS = {"synth": w_synth, "ids": w_ids, "fakequant": w_fakequant, "ppl": w_ppl, "baseline": w_baseline, "profile": w_profile}


def worker_main(kind: str, arg: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = json.loads(arg)
    res = WORKERS[kind](a)
    if a.get("result"):
        Path(a["result"]).write_text(json.dumps(res))


# =========================================================================================
# the bench (no torch in this process)
# =========================================================================================

def _status_kib(pid: int, keys=("RssAnon", "RssFile")) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


class Bench:
    def __init__(self, work: Path, log_path: Path, threads: int | None, save=lambda: None):
        self.work = work
        self.log = open(log_path, "a")
        self.threads = threads
        self.save = save  # called after each measured run, so a killed bench keeps its results

    def child(self, argv: list[str], what: str, threads: int | None = None) -> dict:
        """Run argv to completion; wall, CPU and peak memory of that child alone."""
        print(f"  {what} ...", file=sys.stderr, end="", flush=True)
        self.log.write(f"\n### {what}\n$ {' '.join(argv)}\n")
        self.log.flush()
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        threads = threads or self.threads
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        p = subprocess.Popen(argv, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
        peaks = {"RssAnon": 0, "RssFile": 0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                for k, v in _status_kib(p.pid).items():
                    peaks[k] = max(peaks[k], v)
                done.wait(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        th.join()
        p.returncode = os.waitstatus_to_exitcode(status)
        print(f" {wall:.1f} s", file=sys.stderr, flush=True)
        if p.returncode != 0:
            raise SystemExit(f"command failed (exit {p.returncode}): {' '.join(argv)}; see {self.log.name}")
        return {"wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "maxrss_mib": round(ru.ru_maxrss / 1024, 1),
                "rss_anon_mib": round(peaks["RssAnon"] / 1024, 1), "rss_file_mib": round(peaks["RssFile"] / 1024, 1),
                "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2)}

    def worker(self, kind: str, what: str, threads: int | None = None, **a) -> tuple[dict, dict]:
        res = self.work / f"result-{kind}-{time.monotonic_ns()}.json"
        a["result"] = str(res)
        m = self.child([sys.executable, str(Path(__file__).resolve()), "--_worker", kind, json.dumps(a)], what, threads)
        return json.loads(res.read_text()), m

    def quantize(self, model: Path, out: Path, bits: int, group: int, method: str, calib: Path | None,
                 samples: int, seqlen: int, to: str, what: str, in_process: bool = False) -> dict:
        """One quantization in a child: the CLI (W4/W8), or the in-process fake-quant worker
        (any width; always for W3, which the CLI does not write)."""
        report = out.with_suffix(".report.json")
        method, _, seq = method.partition("/")  # "gptq/seq": --calib-inputs quantized (each layer on quantized inputs)
        opts = {"calib_inputs": "quantized"} if seq == "seq" else {}
        if bits in (4, 8) and not in_process:
            argv = [sys.executable, "-m", "lmkiln", "quantize", str(model), "-o", str(out), f"--w{bits}a16",
                    "--method", method, "--group-size", str(group), "--calib-samples", str(samples),
                    "--calib-seqlen", str(seqlen), "--to", to, "--report", str(report), "--force"]
            if calib is not None:
                argv += ["--calib", str(calib)]
            if opts:
                argv += ["--calib-inputs", "quantized"]
            m = self.child(argv, what)
            path = "cli"
        else:
            _, m = self.worker("fakequant", what, model=str(model), out=str(out), bits=bits, group=group, method=method,
                               calib=str(calib) if calib else None, samples=samples, seqlen=seqlen, report=str(report),
                               **({"options": opts} if opts else {}))
            path = "in-process fake-quant"
        rep = json.loads(report.read_text())
        spl = rep["totals"]["seconds_per_layer"]
        if "layers" in rep:  # the per-linear output MSE sums (calibration tokens), where the method reports them
            lin = [v for lay in rep["layers"] for v in lay.get("linears", {}).values()]
            mse = {k: sum(v[k] for v in lin) for k in ("mse_rtn", "mse_awq", "mse_final") if lin and all(k in v for v in lin)}
        else:
            mse = {}
        return {"path": path, **m, "seconds_per_layer": spl, "median_layer_s": round(statistics.median(spl), 2),
                "calibration": (rep.get("calibration") or {}).get("summary"),
                "report_peak_rss_mb": rep["totals"].get("peak_rss_mb"), "linear_mse_sums": mse}

    def peer(self, model: Path, out: Path, group: int, method: str, calib: Path | None, samples: int, seqlen: int,
             down: str, what: str) -> dict:
        """llm-compressor on lmkiln's calibration ids, its fake-quant checkpoint -> an fp32 engine at `out`."""
        ids = out.with_suffix(".ids.pt")
        info, _ = self.worker("ids", f"{what}: calibration ids", model=str(model), calib=str(calib) if calib else None,
                              samples=samples, seqlen=seqlen, out=str(ids))
        hf, pj = out.with_suffix(".hf"), out.with_suffix(".peer.json")
        m = self.child([str(PEER_PY), str(PEER), "--model", str(model), "--ids", str(ids), "--out", str(hf),
                        "--group-size", str(group), "--method", method, "--down", down, "--json", str(pj)], what)
        peer = json.loads(pj.read_text())
        self.child([sys.executable, "-m", "lmkiln", "convert", "hf-to-engine", str(hf), "-o", str(out), "--force"],
                   f"{what}: to an fp32 engine")
        shutil.rmtree(hf)
        layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        spl = [peer["seconds"] / layers] * layers  # oneshot() is not split by layer: its mean
        return {"path": f"llm-compressor {peer['versions']['llmcompressor']}, down_proj {down}", **m,
                "seconds_per_layer": spl, "median_layer_s": round(spl[0], 2), "oneshot_s": peer["seconds"],
                "calibration": info["summary"], "calibration_sha256": info["sha256"]}


def filter_calib(calib: Path, eval_text: Path, dest: Path) -> dict:
    """Calibration text minus every blank-line paragraph sharing a line (>= 20 chars) with the eval text."""
    ev = {ln.strip() for ln in eval_text.read_text(encoding="utf-8").splitlines() if len(ln.strip()) >= 20}
    paras = [p for p in re.split(r"\n[ \t]*\n", calib.read_text(encoding="utf-8")) if p.strip()]
    keep = [p for p in paras if not any(ln.strip() in ev for ln in p.splitlines() if len(ln.strip()) >= 20)]
    dest.write_text("\n\n".join(keep) + "\n", encoding="utf-8")
    return {"source": str(calib), "paragraphs": len(paras), "kept": len(keep), "dropped_overlapping_eval": len(paras) - len(keep),
            "chars_kept": sum(len(p) for p in keep)}


def stories_bench(b: Bench, args, out: dict) -> None:
    print("stories260K", file=sys.stderr)
    w = b.work / "stories"
    w.mkdir(exist_ok=True)
    cfg = json.loads((STORIES / "config.json").read_text())
    q_width = cfg["num_attention_heads"] * cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    min_in = min(cfg["hidden_size"], cfg["intermediate_size"], q_width)  # narrowest linear input
    eval_text = Path(args.eval_text)
    calibs: dict[str, Path | None] = {"wikitext": None}
    if args.calib_text:
        info = filter_calib(Path(args.calib_text), eval_text, w / "calib_indomain.txt")
        out["stories_calib_indomain"] = info
        calibs["in-domain"] = w / "calib_indomain.txt"

    def ppl(engine: Path, what: str) -> dict:
        r, _ = b.worker("ppl", f"ppl {what}", threads=1, engine=str(engine), text=str(eval_text))
        return r

    fp = w / "fp32"
    b.child([sys.executable, "-m", "lmkiln", "convert", "hf-to-engine", str(STORIES), "-o", str(fp), "--force"], "fp32 engine")
    base = ppl(fp, "fp32")
    shutil.rmtree(fp)
    out["stories_fp32"] = base
    rows = []
    configs = [(4, 32), (4, 64), (4, 128), (8, -1), (3, 32)] if not args.quick else [(4, 32), (3, 32)]
    if args.configs:
        configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",") if c]
    for bits, group in configs:
        label = f"W{bits} " + ("per-channel" if group == -1 else f"g{group}")
        if group > min_in:
            rows.append({"config": label, "skipped": f"group {group} > smallest linear input width {min_in}"})
            continue
        variants = [("rtn", None, "-")] * ("rtn" in args.methods)
        variants += [(m, c, name) for m in args.methods if m != "rtn" for name, c in calibs.items()]
        if args.quick and bits == 4:  # cross-check: the in-process path must reproduce the CLI row
            variants.append(("awq", None, "wikitext [in-process]"))
        if bits == 4 and group != -1:  # llm-compressor side by side, on the same calibration ids
            variants += [(f"llm-compressor {m}", c, name) for m in args.peers for name, c in calibs.items()]
        for method, calib, cname in variants:
            what = f"{label} {method.upper()} calib={cname}"
            eng = w / re.sub(r"[^A-Za-z0-9]+", "_", what)
            if method.startswith("llm-compressor"):
                r = b.peer(STORIES, eng, group, method.split()[-1], calib, args.stories_samples, args.stories_seqlen,
                           args.peer_down, what)
            else:
                r = b.quantize(STORIES, eng, bits, group, method, calib, args.stories_samples, args.stories_seqlen, "engine",
                               what, in_process=bits not in (4, 8) or cname.endswith("[in-process]"))
            p = ppl(eng, what)
            shutil.rmtree(eng)
            r.update({"config": label, "bits": bits, "group": group, "method": method, "calib": cname,
                      "ppl": p["ppl"], "eval_tokens": p["tokens"], "linear_modes": p["linear_modes"]})
            rows.append(r)
            out["stories"] = rows
            b.save()
            print(f"    ppl {p['ppl']:.4f} (fp32 {base['ppl']:.4f})", file=sys.stderr, flush=True)
    out["stories"] = rows
    if args.profile:
        prof_s, _ = b.worker("profile", "profile stories260K AWQ layer 0", model=str(STORIES), bits=4, group=32,
                             samples=args.stories_samples, seqlen=args.stories_seqlen, layers=1)
        out.setdefault("profile", {})["stories260K, W4 g32, layer 0"] = prof_s


def synth_bench(b: Bench, args, out: dict) -> None:
    print("synthetic Llama", file=sys.stderr)
    shape = dict(SYNTH, hidden=args.synth_hidden, heads=args.synth_heads, kv_heads=args.synth_kv_heads, inter=args.synth_inter)
    runs = []
    if args.quick:
        plan = [(2, "rtn"), (2, "awq")]
    else:
        plan = [(n, "rtn") for n in args.synth_rtn_layers] + [(n, "awq") for n in args.synth_awq_layers]
    models: dict[int, dict] = {}
    for layers, method in plan:
        src = b.work / f"synth{layers}"
        if layers not in models:
            for other in list(models):  # keep one model on disk at a time
                shutil.rmtree(b.work / f"synth{other}", ignore_errors=True)
                del models[other]
            info, m = b.worker("synth", f"write synthetic {layers}-layer model", path=str(src), shape=shape, layers=layers,
                               seed=0, shard_mb=args.shard_mb)
            models[layers] = {**info, **synth_sizes(layers, shape)}
        dst = b.work / f"synth{layers}-{method}"
        what = f"synthetic {layers}L W4 g{args.synth_group} {method.upper()}"
        r = b.quantize(src, dst, 4, args.synth_group, method, None, args.synth_samples, args.synth_seqlen, "hf", what)
        shutil.rmtree(dst, ignore_errors=True)
        r.update({"layers": layers, "method": method, "group": args.synth_group, **models[layers]})
        runs.append(r)
        out["synthetic"] = {"shape": shape, "runs": runs}
        b.save()
    out["synthetic"] = {"shape": shape, "runs": runs}
    if args.profile:
        src = b.work / "synth-profile"
        b.worker("synth", "write synthetic 1-layer model (profile)", path=str(src), shape=shape, layers=1, seed=0,
                 shard_mb=args.shard_mb)
        prof, _ = b.worker("profile", "profile one synthetic AWQ layer", model=str(src), bits=4, group=args.synth_group,
                           samples=args.synth_samples, seqlen=args.synth_seqlen, layers=1)
        shutil.rmtree(src, ignore_errors=True)
        out.setdefault("profile", {})[f"synthetic, W4 g{args.synth_group}, layer 0"] = prof
    for k in list(models):
        shutil.rmtree(b.work / f"synth{k}", ignore_errors=True)


# -- reporting ------------------------------------------------------------------------------

def fmt_gap(x):
    return "–" if x is None else f"{x:+.4f}"


def cpu_per_layer(r: dict, res: dict) -> float:
    """The run's CPU seconds less the import baseline's, per layer (an upper bound: it also
    holds tokenizing, writing and, for `--to engine`, the conversion)."""
    return (r["cpu_s"] - res.get("baseline", {}).get("cpu_s", 0.0)) / len(r["seconds_per_layer"])


def markdown(res: dict) -> str:
    L = []
    m = res["machine"]
    L.append(f"Machine: {m['cores']} cores, {m['cpu']}, {m['mem']} RAM; Python {m['python']}, torch {m['torch']}, "
             f"transformers {m['transformers']}.")
    if "baseline" in res:
        bl = res["baseline"]
        L.append(f"Import baseline (a child that only imports torch + transformers + lmkiln): peak RSS {bl['maxrss_mib']:.0f} MiB.")
    if "stories" in res:
        fp = res["stories_fp32"]["ppl"]
        L.append("")
        L.append(f"### stories260K: perplexity on {res['eval_text_name']} ({res['stories_fp32']['tokens']} tokens, "
                 f"windows of {res['stories_fp32']['window']} + BOS); fp32 = {fp:.4f}")
        L.append("")
        L.append("| config | method | calibration | ppl | gap to fp32 | gap / RTN gap | Σ linear MSE / RTN's | median wall s/layer | CPU s/layer | peak RSS MiB (anon / file) | path |")
        L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        rtn_gap = {}
        for r in res["stories"]:
            if "skipped" in r:
                L.append(f"| {r['config']} | – | – | – | – | – | – | – | – | – | not run: {r['skipped']} |")
                continue
            gap = r["ppl"] - fp
            ratio = ""
            if r["method"] == "rtn":
                rtn_gap[r["config"]] = gap
            elif rtn_gap.get(r["config"]):
                ratio = f"{gap / rtn_gap[r['config']]:.2f}"
            lm = r.get("linear_mse_sums") or {}
            lin = f"{lm['mse_final'] / lm['mse_rtn']:.3f}" if lm.get("mse_rtn") else ""
            L.append(f"| {r['config']} | {r['method'].upper()} | {r['calib']} | {r['ppl']:.4f} | {gap:+.4f} | {ratio} | {lin} | "
                     f"{r['median_layer_s']:.2f} | {cpu_per_layer(r, res):.1f} | {r['maxrss_mib']:.0f} ({r['rss_anon_mib']:.0f} / {r['rss_file_mib']:.0f}) | {r['path']} |")
        cal = sorted({(r["calib"], r["calibration"]) for r in res["stories"] if r.get("method", "rtn") != "rtn"})
        L.append("")
        for c, s in cal:
            L.append(f"- calibration `{c}`: {s}")
        if "stories_calib_indomain" in res:
            ci = res["stories_calib_indomain"]
            L.append(f"- in-domain calibration file: {ci['kept']} of {ci['paragraphs']} paragraphs of `{Path(ci['source']).name}` "
                     f"kept ({ci['dropped_overlapping_eval']} dropped for sharing a line with the eval text), {ci['chars_kept']:,} chars")
    if "synthetic" in res:
        s = res["synthetic"]["shape"]
        L.append("")
        L.append(f"### synthetic Llama (random, hidden {s['hidden']}, {s['heads']} heads / {s['kv_heads']} kv, ffn {s['inter']}, "
                 f"vocab {s['vocab']}; fp16 shards; `--to hf`)")
        L.append("")
        L.append("| layers | method | fp32 model MiB | fp32 layer MiB | median wall s/layer | CPU s/layer | wall s | CPU s | peak RSS MiB | RssAnon MiB | RssFile MiB | (peak − baseline) / layer fp32 | calibration |")
        L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        base = res.get("baseline", {}).get("maxrss_mib", 0)
        for r in res["synthetic"]["runs"]:
            L.append(f"| {r['layers']} | {r['method'].upper()} | {r['fp32_bytes'] / MIB:.0f} | {r['layer_fp32_bytes'] / MIB:.1f} | "
                     f"{r['median_layer_s']:.2f} | {cpu_per_layer(r, res):.1f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['maxrss_mib']:.0f} | {r['rss_anon_mib']:.0f} | "
                     f"{r['rss_file_mib']:.0f} | {(r['maxrss_mib'] - base) * MIB / r['layer_fp32_bytes']:.1f} | {r['calibration'] or '–'} |")
    if "profile" in res:
        for name, p in res["profile"].items():
            L.append("")
            L.append(f"### where one AWQ layer's time goes ({name}; {p['calibration']}; {p['threads']} threads): "
                     f"{p['seconds_per_layer']:.1f} s/layer")
            L.append("")
            L.append("| phase (exclusive) | s/layer | share | calls/layer |")
            L.append("|---|---:|---:|---:|")
            for k, v in p["phases"].items():
                L.append(f"| {k} | {v['seconds_per_layer']:.2f} | {100 * v['seconds_per_layer'] / p['seconds_per_layer']:.0f}% | {v['calls_per_layer']:.0f} |")
    return "\n".join(L)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--_worker":
        worker_main(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small calibration, W4 g32 + W3 only, 2-layer synthetic")
    ap.add_argument("--methods", default="rtn,awq,gptq,awq+gptq", help="stories260K rows: comma list of --method values; "
                    "METHOD/seq adds --calib-inputs quantized (e.g. gptq/seq)")
    ap.add_argument("--eval-text", default=str(DEFAULT_EVAL), help="in-domain text for stories260K perplexity")
    ap.add_argument("--calib-text", default=None, help="in-domain calibration text: adds AWQ rows calibrated on it")
    ap.add_argument("--configs", default=None, help="stories260K configs as BITS:GROUP comma list (default "
                    "4:32,4:64,4:128,8:-1,3:32)")
    ap.add_argument("--peers", default="", help="llm-compressor rows (W4 only): comma list of gptq, awq")
    ap.add_argument("--peer-down", choices=("channel", "ignore"), default="channel",
                    help="llm-compressor's down_proj (input 172, no group multiple): per channel, or kept in fp")
    ap.add_argument("--stories-samples", type=int, default=None, help="calibration samples for stories260K (default 128; quick 16)")
    ap.add_argument("--stories-seqlen", type=int, default=None, help="calibration window (default 512; quick 256)")
    ap.add_argument("--synth-samples", type=int, default=None, help="calibration samples, synthetic (default 32; quick 4)")
    ap.add_argument("--synth-seqlen", type=int, default=None, help="default 512; quick 128")
    ap.add_argument("--synth-hidden", type=int, default=None, help="default 1024 (quick 256)")
    ap.add_argument("--synth-heads", type=int, default=None, help="default 16 (quick 4)")
    ap.add_argument("--synth-kv-heads", type=int, default=None, help="default 4 (quick 2)")
    ap.add_argument("--synth-inter", type=int, default=None, help="default 2816 (quick 704)")
    ap.add_argument("--synth-group", type=int, default=128)
    ap.add_argument("--synth-rtn-layers", default="8,32", help="layer counts of the synthetic RTN runs (comma list)")
    ap.add_argument("--synth-awq-layers", default="8,2", help="layer counts of the synthetic AWQ runs (comma list)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for the quantize runs (default: unset, torch's default)")
    ap.add_argument("--shard-mb", type=int, default=200, help="synthetic checkpoint shard size")
    ap.add_argument("--skip-stories", action="store_true")
    ap.add_argument("--skip-synth", action="store_true")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-phase AWQ profile")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a new temp dir, removed afterwards)")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()
    q = args.quick
    args.stories_samples = args.stories_samples or (16 if q else 128)
    args.stories_seqlen = args.stories_seqlen or (256 if q else 512)
    args.synth_samples = args.synth_samples or (4 if q else 32)
    args.synth_seqlen = args.synth_seqlen or (128 if q else 512)
    for k, quick in (("hidden", 256), ("heads", 4), ("kv_heads", 2), ("inter", 704)):
        if getattr(args, f"synth_{k}") is None:
            setattr(args, f"synth_{k}", quick if q else SYNTH[k])
    args.methods = [m for m in args.methods.split(",") if m]
    args.peers = [m for m in args.peers.split(",") if m]
    if set(args.peers) - {"gptq", "awq"}:
        raise SystemExit(f"--peers {','.join(args.peers)}: choose from gptq, awq")
    if args.peers and not PEER_PY.exists():
        raise SystemExit(f"{PEER_PY} missing: run bench/peers/setup_llmcompressor.sh first")
    args.synth_rtn_layers = [int(x) for x in args.synth_rtn_layers.split(",") if x]
    args.synth_awq_layers = [int(x) for x in args.synth_awq_layers.split(",") if x]
    if not Path(args.eval_text).is_file():
        raise SystemExit(f"--eval-text {args.eval_text}: no such file")

    own = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="lmkiln-bench-quantize-")) if own else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    print(f"scratch {work}; child output in {log}", file=sys.stderr)
    res: dict = {}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    b = Bench(work, log, args.threads, save)
    res.update({"date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:], "machine": machine(),
           "eval_text_name": Path(args.eval_text).name,
           "settings": {k: v for k, v in vars(args).items()}})
    try:
        _, res["baseline"] = b.worker("baseline", "import baseline")
        if not args.skip_stories:
            stories_bench(b, args, res)
        if not args.skip_synth:
            synth_bench(b, args, res)
    finally:
        save()
        if own:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(res))


if __name__ == "__main__":
    main()
