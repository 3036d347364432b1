#!/usr/bin/env python3
"""Benchmark: `lmkiln quantize` at real widths — seconds per layer, peak RSS against the
plan's estimate, depth and calibration scaling, many-thread RTN memory, and AWQ side by
side with llm-compressor on the same layer and the same calibration tokens.

Models (written once under --workdir with bench/common.py, bf16 on disk, vocab 512 with
the bundled tokenizer, random seeded weights):
    1B-shaped: hidden 2048, intermediate 5632, 32 heads / 4 kv heads, 1, 2 and 4 layers
    8B-shaped: hidden 4096, intermediate 14336, 32 heads / 8 kv heads, 1 layer

Rows (each a child process reaped with os.wait4, so ru_maxrss is that run's peak RSS):
    depth     AWQ W4 g128, 1B-shaped, 1/2/4 layers, 16 x 512 tokens
    calib     AWQ W4 g128, 1B-shaped, 1 layer, 64 x 512 tokens
    8b        AWQ W4 g128, 8B-shaped, 1 layer, 16 x 512 tokens (and the --dry-run estimate)
    rtn       RTN W4 g128 on an fp32 1B-shaped 8-layer model with 2 and 16 intra-op threads
    ray       AWQ W4 g128, 1B-shaped, 4 layers, 16 x 512 tokens: single process vs --ray with 2
              workers, wall time side by side and whether the outputs are the same bytes
    rayexact  1B-shaped, 2 layers: --ray with 2 workers vs a single-process run on 1 thread
              (the same threads per job, so the same bits on a CPU)
    ray1      1B-shaped, 2 layers: --ray --workers 1 (both CPUs in one task) vs the single-process
              run: Ray's overhead
    peers     lmkiln vs llm-compressor AWQ (bench/peers, its own venv) on the 1-layer
              1B-shaped model, same calibration ids, both on the CPU: seconds, peak RSS,
              and the layer-0 output MSE of each fake-quantized model vs the fp model on
              those tokens (computed here, one script for both).

    .venv/bin/python bench/quantize_scale.py --rows depth,calib,8b,rtn,peers --json bench/out/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import machine, make_synthetic

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
PEER_PY = ROOT / "bench" / "out" / "venv-llmcompressor" / "bin" / "python"
SHAPES = {"1b": dict(hidden=2048, inter=5632, heads=32, kv_heads=4), "8b": dict(hidden=4096, inter=14336, heads=32, kv_heads=8)}
GIB = 1 << 30


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Run a child; wall seconds, peak RSS (ru_maxrss) and CPU seconds."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}\n{out[-3000:]}")
    return {"seconds": round(wall, 1), "peak_rss_gib": round(ru.ru_maxrss / (1 << 20), 3),
            "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 1), "output": out}


def model(work: Path, shape: str, layers: int, dtype: str = "bfloat16") -> Path:
    """Written by a child: this process must never import torch, since Linux carries a
    parent's RSS high-water mark into a forked child's ru_maxrss."""
    path = work / f"synth-{shape}-L{layers}-{dtype}"
    run([PY, __file__, "--_worker", "synth", json.dumps({"path": str(path), "shape": shape, "layers": layers, "dtype": dtype})])
    return path


def quantize(src: Path, out: Path, samples: int, seqlen: int, method: str = "awq", threads: int | None = None,
             extra: tuple[str, ...] = ()) -> dict:
    rep = out.with_suffix(".report.json")
    cmd = [PY, "-m", "lmkiln", "quantize", str(src), "-o", str(out), "--w4a16", "--group-size", "128", "--method", method,
           "--calib-samples", str(samples), "--calib-seqlen", str(seqlen), "--device", "cpu", "--force", "--report", str(rep),
           *extra]
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None  # torch's intra-op pool follows it
    r = run(cmd, env)
    report = json.loads(rep.read_text())
    plan = report["plan"]
    layers = report["layers"]
    return {"wall_s": r["seconds"], "peak_rss_gib": r["peak_rss_gib"], "cpu_s": r["cpu_seconds"],
            "s_per_layer": round(sum(x["seconds"] for x in layers) / len(layers), 1),
            "est_peak_host_gib": round(plan["peak_host"] / GIB, 3),
            "mse_output": [x.get("mse_output") for x in layers], "threads": threads}


def _sha(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def dry_run(src: Path, out: Path, samples: int, seqlen: int) -> str:
    return run([PY, "-m", "lmkiln", "quantize", str(src), "-o", str(out), "--w4a16", "--calib-samples", str(samples),
                "--calib-seqlen", str(seqlen), "--device", "cpu", "--dry-run"])["output"]


def worker(kind: str, arg: str) -> None:
    """In-process helpers run as children (they import torch)."""
    import torch

    a = json.loads(arg)
    if kind == "synth":
        s = SHAPES[a["shape"]]
        make_synthetic(Path(a["path"]), s["hidden"], s["inter"], a["layers"], s["heads"], s["kv_heads"], a["dtype"])
    elif kind == "ids":  # lmkiln's calibration ids for a model, saved for the peer
        from lmkiln.formats.hf import HFCheckpoint
        from lmkiln.formats.tokenizer import load_tokenizer
        from lmkiln.quant.calib import build_calibration_samples, load_calibration_texts

        tok = load_tokenizer(HFCheckpoint(a["model"]).path)
        cs = build_calibration_samples(load_calibration_texts(None), lambda s: tok(s, add_special_tokens=False).input_ids,
                                       a["samples"], a["seqlen"], 0)
        torch.save(cs.input_ids, a["out"])
    elif kind == "mse":  # layer-0 output MSE of fake-quant models vs the fp model on the ids
        from transformers import AutoModelForCausalLM

        from lmkiln.quant.dequant import fake_quant_state_dict

        ids = torch.load(a["ids"])
        fp = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32).eval()

        def layer0(m, x, pe):
            outs = []
            for i in range(0, len(x), 4):
                y = m.model.layers[0](x[i:i + 4], position_embeddings=pe, attention_mask=None)
                outs.append(y[0] if isinstance(y, tuple) else y)
            return torch.cat(outs)

        res = {}
        with torch.no_grad():
            x = fp.model.embed_tokens(ids)
            pe = fp.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
            ref = layer0(fp, x, pe)
            for name, path in a["candidates"].items():
                m = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32).eval()
                if name == "lmkiln":
                    _, sd = fake_quant_state_dict(path)
                else:
                    sd = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
                m.load_state_dict(sd, strict=False)
                res[name] = float((layer0(m, x, pe).double() - ref.double()).pow(2).mean())
        print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="depth,calib,8b,rtn,peers")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "scale"))
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--json", default=None)
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        return worker(*a._worker)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = a.rows.split(",")
    res: dict = {"machine": machine("torch", "transformers"), "date": time.strftime("%Y-%m-%d"), "rows": {}}

    def record(key, val):
        res["rows"][key] = val
        print(key, json.dumps({k: v for k, v in val.items() if k != "output"}), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))

    if "depth" in rows:
        for n in (1, 2, 4):
            record(f"awq-1b-L{n}-16x{a.seqlen}", quantize(model(work, "1b", n), work / f"q-1b-L{n}", 16, a.seqlen))
    if "calib" in rows:
        record(f"awq-1b-L1-64x{a.seqlen}", quantize(model(work, "1b", 1), work / "q-1b-L1-64", 64, a.seqlen))
    if "8b" in rows:
        src = model(work, "8b", 1)
        r = quantize(src, work / "q-8b-L1", 16, a.seqlen)
        r["dry_run"] = dry_run(src, work / "q-8b-dry", 16, a.seqlen)
        record(f"awq-8b-L1-16x{a.seqlen}", r)
    if "rtn" in rows:
        src = model(work, "1b", 8, "float32")
        for t in (2, 16):
            record(f"rtn-1b-L8-fp32-threads{t}", quantize(src, work / f"r-1b-L8-t{t}", 1, 8, "rtn", threads=t))
        r = run([PY, "-c", "import lmkiln.cli, lmkiln.quant.pipeline, transformers"])  # the runtime floor every run pays
        record("baseline-imports", {"peak_rss_gib": r["peak_rss_gib"]})
    def versus(layers: int, base: str, base_threads: int | None, workers: int) -> dict:
        """A single-process run and a --ray run of the same model, options and calibration,
        back to back; `peak_rss_gib` of the Ray side is the driver's alone."""
        src = model(work, "1b", layers)
        one = quantize(src, work / base, 16, a.seqlen, threads=base_threads)
        name = f"{base}-ray{workers}w"
        ray = quantize(src, work / name, 16, a.seqlen, extra=("--ray", "local", "--workers", str(workers)))
        rep = json.loads((work / f"{name}.report.json").read_text())
        return {"single": one, "ray": {**ray, "driver": rep["driver"],
                                       "layers": [(x["layer"], x.get("pid"), x["seconds"]) for x in rep["layers"]]},
                "speedup": round(one["wall_s"] / ray["wall_s"], 2),
                "identical_output": _sha(work / base / "model.safetensors") == _sha(work / name / "model.safetensors")}

    if "ray" in rows:  # the comparison: the default single-process run (2 threads) vs 2 one-CPU workers
        record(f"ray-1b-L4-16x{a.seqlen}", versus(4, "ray-single", None, 2))
    if "rayexact" in rows:  # CPU kernels round by thread count: 2 one-CPU workers vs one thread (OMP_NUM_THREADS=1)
        record(f"rayexact-1b-L2-16x{a.seqlen}", versus(2, "exact-single-1t", 1, 2))
    if "ray1" in rows:  # Ray's overhead: one worker with both CPUs, the same 2 threads as the single-process run
        record(f"ray1-1b-L2-16x{a.seqlen}", versus(2, "ray1-single", None, 1))
    if "peers" in rows:
        if not PEER_PY.exists():
            raise SystemExit(f"{PEER_PY} missing: run bench/peers/setup_llmcompressor.sh first")
        src = model(work, "1b", 1)
        ids = work / f"ids-16x{a.seqlen}.pt"
        me = [PY, __file__, "--_worker"]
        run(me + ["ids", json.dumps({"model": str(src), "samples": 16, "seqlen": a.seqlen, "out": str(ids)})])
        lk = quantize(src, work / "peer-lmkiln", 16, a.seqlen)
        lc = run([str(PEER_PY), str(ROOT / "bench" / "peers" / "llmcompressor_awq.py"), "--model", str(src), "--ids", str(ids),
                  "--out", str(work / "peer-llmc"), "--group-size", "128", "--json", str(work / "peer-llmc.json")])
        lc_json = json.loads((work / "peer-llmc.json").read_text())
        mse = json.loads(run(me + ["mse", json.dumps({"model": str(src), "ids": str(ids), "candidates": {
            "lmkiln": str(work / "peer-lmkiln"), "llmcompressor": str(work / "peer-llmc")}})])["output"].strip().splitlines()[-1])
        record("peers-1b-L1", {"lmkiln": {**lk, "layer0_mse": mse["lmkiln"]},
                               "llmcompressor": {"wall_s": lc["seconds"], "oneshot_s": lc_json.get("seconds"),
                                                 "peak_rss_gib": lc["peak_rss_gib"], "cpu_s": lc["cpu_seconds"],
                                                 "layer0_mse": mse["llmcompressor"], "versions": lc_json.get("versions")}})


if __name__ == "__main__":
    sys.exit(main())
