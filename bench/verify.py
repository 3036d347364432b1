#!/usr/bin/env python3
"""Benchmark: perplexity throughput of the `lmkiln verify` runners on CPU, side by side.

Every runner computes next-token logits for the same windows of 512 tokens ([BOS] + 511
tokens of the bundled WikiText-2 test excerpt, as `verify` windows them) and the NLL of
the scored tokens, exactly the work `verify` does per runner; tokens/s = scored tokens /
seconds. Runners:

  transformers fp32       the reference runner (transformers' own Llama, sdpa)
  engine fp32             the torch engine runner on the fp32 engine
  engine int4             the torch engine runner on an RTN int4 engine, default path:
                          weights dequantized once at load, fp32 matmuls
  engine int4 kernels     the same engine with `EngineModel.from_path(p, kernels=True)`:
                          packed int4 weights, aten._weight_int4pack_mm_for_cpu
  onnx fp32 / onnx int4   the onnxruntime runner on `lmkiln.export.export_onnx` of the
                          fp32 / int4 engine (skipped with a note when unavailable)

Models: stories260K (bundled, int4 g32, 4 windows) and a synthetic seeded random Llama big enough
for the matmuls to dominate (hidden 1024, 8 layers, 16 heads / 4 kv heads, FFN 2816,
vocab 512 = the bundled tokenizer, untied head; int4 g128; 2 windows).

Each repeat runs every runner once (the order rotates between repeats); the table gives
the median over repeats and the CPU time other processes used meanwhile ("others",
in cores, from /proc/stat minus this process's CPU time). A runner whose warm-up says a
repeat would take longer than --slow-s is measured once on one window (the int4 kernel
path on the synthetic model: minutes per window on an AVX2-only CPU).

Also a microbenchmark of one linear: fp32 `x @ W` against
`torch.ops.aten._weight_int4pack_mm_for_cpu` (group 128) for M in {1, 512} and
(K, N) in {(2048, 2048), (4096, 11008)}.

    .venv/bin/python bench/verify.py --json bench/out/verify.json    # ~15 min on 2 busy cores
    .venv/bin/python bench/verify.py --models stories --repeats 3 --no-micro     # quick
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named verify.py: keep its folder off sys.path so no import can pick it up.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import importlib.util as _ilu

_spec = _ilu.spec_from_file_location("lmkiln_bench_common", Path(__file__).with_name("common.py"))
common = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(common)

import argparse
import json
import math
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

SEQLEN = 512


# -- machine and load -------------------------------------------------------------------


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    return []


def mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall time, and the cores other processes kept busy meanwhile."""

    def __enter__(self):
        self.t, self.busy, self.own = time.perf_counter(), busy_cpu_s(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        others = (busy_cpu_s() - self.busy) - (time.process_time() - self.own)
        self.others = max(0.0, others / self.wall) if self.wall > 0 else 0.0


# -- models -----------------------------------------------------------------------------


def build_artifacts(hf: Path, work: Path, group_size: int) -> tuple[dict, dict]:
    """(paths, notes): fp32 and int4 engines and, where possible, their ONNX exports."""
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import quantize_model

    work.mkdir(parents=True, exist_ok=True)
    paths, notes = {"hf": hf, "eng-fp32": work / "eng-fp32", "eng-int4": work / f"eng-int4-g{group_size}"}, {}
    if not paths["eng-fp32"].exists():
        convert_hf_to_engine(hf, paths["eng-fp32"])
    if not paths["eng-int4"].exists():
        quantize_model(hf, paths["eng-int4"], QuantOptions(bits=4, group_size=group_size, method="rtn"), to="engine")
    try:
        import lmkiln.runtime.onnx_runner  # noqa: F401
        from lmkiln.export import export_onnx
    except ImportError as e:
        notes["onnx"] = f"skipped: {e}"
        return paths, notes
    for kind in ("fp32", "int4"):
        out = work / f"onnx-{kind}"
        try:
            if not (out / "model.onnx").exists():
                export_onnx(paths[f"eng-{kind}"], out)
            paths[f"onnx-{kind}"] = out
        except Exception as e:  # noqa: BLE001 - a benchmark records why, and goes on
            notes[f"onnx-{kind}"] = f"export failed: {type(e).__name__}: {e}"
    return paths, notes


def open_runners(paths: dict, threads: int | None = None) -> dict:
    """label -> zero-argument constructor of the runner."""
    from lmkiln.runtime.engine_model import EngineModel
    from lmkiln.runtime.hf_runner import TransformersRunner

    runners = {
        "transformers fp32": lambda: TransformersRunner(paths["hf"]),
        "engine fp32": lambda: EngineModel.from_path(paths["eng-fp32"]),
        "engine int4": lambda: EngineModel.from_path(paths["eng-int4"]),
        "engine int4 kernels": lambda: EngineModel.from_path(paths["eng-int4"], kernels=True),
    }
    if "onnx-fp32" in paths or "onnx-int4" in paths:
        from lmkiln.runtime.onnx_runner import OnnxRunner

        for kind in ("fp32", "int4"):
            if f"onnx-{kind}" in paths:
                runners[f"onnx {kind}"] = (lambda p: lambda: OnnxRunner(p, threads=threads))(paths[f"onnx-{kind}"])
    return runners


# -- perplexity throughput --------------------------------------------------------------


@torch.inference_mode()
def score(runner, wins: list[list[int]]) -> list[tuple[float, int]]:
    """(sum of NLL, scored tokens) per window, as verify's compare() scores one side."""
    out = []
    for w in wins:
        x = torch.tensor([w], dtype=torch.long)
        logits = runner.forward(x)[0].float().cpu()
        lp = logits[:-1].double().log_softmax(-1)
        out.append((float(torch.nn.functional.nll_loss(lp, x[0, 1:], reduction="sum")), len(w) - 1))
    return out


def bench_model(name: str, hf: Path, work: Path, group_size: int, n_windows: int, repeats: int, slow_s: float,
                only: set[str] | None, threads: int | None = None) -> dict:
    from lmkiln.formats.tokenizer import load_tokenizer
    from lmkiln.verify.data import load_eval_text
    from lmkiln.verify.metrics import windows

    t = time.perf_counter()
    paths, notes = build_artifacts(hf, work, group_size)
    print(f"[{name}] artifacts ready in {time.perf_counter() - t:.1f} s; notes: {notes or 'none'}", flush=True)
    tok = load_tokenizer(hf)
    ids = tok(load_eval_text(None), add_special_tokens=False).input_ids
    wins = windows(ids, SEQLEN, tok.bos_token_id)[:n_windows]
    makers = open_runners(paths, threads)
    if only:
        makers = {k: v for k, v in makers.items() if k in only}
    loaded, plan = {}, {}
    for label, make in makers.items():
        t = time.perf_counter()
        r = make()
        load_s = time.perf_counter() - t
        modes = sorted({m.mode for m in r.modules() if hasattr(m, "mode")}) if isinstance(r, torch.nn.Module) else []
        # Warm-up (lazy initialisation), then 64 tokens timed to predict what a repeat costs.
        score(r, [wins[0][:16]])
        t = time.perf_counter()
        score(r, [wins[0][:64]])
        est = (time.perf_counter() - t) * SEQLEN / 64 * len(wins)
        slow = est > slow_s
        plan[label] = {"windows": wins[:1] if slow else wins, "repeats": 1 if slow else repeats}
        loaded[label] = r
        notes_l = f", kernel modes {modes}" if modes else ""
        print(f"[{name}] {label:20s} loaded in {load_s:5.1f} s{notes_l}; "
              f"{'SLOW: one window, once' if slow else f'{repeats} repeats of {len(wins)} windows'}", flush=True)
        plan[label].update(load_s=load_s, modes=modes, slow=slow)
    samples = {k: [] for k in loaded}
    others = {k: [] for k in loaded}
    ppl = {}
    labels = list(loaded)
    for rep in range(repeats):
        order = labels[rep % len(labels):] + labels[:rep % len(labels)]
        for label in order:
            p = plan[label]
            if rep >= p["repeats"]:
                continue
            with Meter() as m:
                per_window = score(loaded[label], p["windows"])
            nll, n = sum(a for a, _ in per_window), sum(b for _, b in per_window)
            samples[label].append(n / m.wall)
            others[label].append(m.others)
            ppl[label] = (math.exp(nll / n), n, math.exp(per_window[0][0] / per_window[0][1]))
            print(f"[{name}] repeat {rep + 1}/{repeats} {label:20s} {n / m.wall:10.1f} tok/s  "
                  f"({n} tokens in {m.wall:6.2f} s; others {m.others:.2f} cores)", flush=True)
    base = statistics.median(samples["transformers fp32"]) if "transformers fp32" in samples else None
    rows = {}
    for label in labels:
        med = statistics.median(samples[label])
        rows[label] = {
            "tok_s_median": med, "tok_s_all": samples[label], "n": len(samples[label]),
            "scored_tokens": ppl[label][1], "ppl": ppl[label][0], "ppl_first_window": ppl[label][2], "vs_transformers": med / base if base else None,
            "others_cores_median": statistics.median(others[label]), "load_s": plan[label]["load_s"],
            "modes": plan[label]["modes"], "slow_single_window": plan[label]["slow"],
        }
    return {"rows": rows, "notes": notes, "windows": len(wins), "seqlen": SEQLEN, "group_size": group_size,
            "params_m": sum(p.numel() for p in loaded[labels[0]].model.parameters()) / 1e6
            if hasattr(loaded[labels[0]], "model") else None}


# -- one linear: fp32 matmul vs the int4 CPU kernel -------------------------------------


def _time(fn, repeats: int, slow_s: float = 2.0) -> tuple[float, int]:
    """Median seconds of fn() over repeats (after a warm-up); a call slower than slow_s is timed once."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    if first > slow_s:
        return first, 1
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), repeats


def micro(repeats: int, group: int = 128) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for K, N in ((2048, 2048), (4096, 11008)):
        W = torch.randn(K, N, generator=g)
        codes = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([torch.rand(K // group, N, generator=g) * 0.01, torch.randn(K // group, N, generator=g) * 0.01], -1)
        for M in (1, 512):
            x = torch.randn(M, K, generator=g)
            with Meter() as m1:
                fp, n1 = _time(lambda: x @ W, repeats)
            with Meter() as m2:
                q, n2 = _time(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz), repeats)
            flops = 2 * M * K * N
            row = {"M": M, "K": K, "N": N, "fp32_ms": fp * 1e3, "int4_ms": q * 1e3, "int4_over_fp32": q / fp,
                   "fp32_gflops": flops / fp / 1e9, "int4_gflops": flops / q / 1e9, "n_fp32": n1, "n_int4": n2,
                   "others_cores": max(m1.others, m2.others)}
            rows.append(row)
            print(f"[micro] M={M:4d} K={K:5d} N={N:6d}  fp32 {fp * 1e3:10.2f} ms  int4 {q * 1e3:10.2f} ms  "
                  f"x{q / fp:6.1f} slower  (n {n1}/{n2}, others {row['others_cores']:.2f} cores)", flush=True)
    return rows


# -- output -----------------------------------------------------------------------------


def markdown(results: dict) -> str:
    m = results["machine"]
    out = [f"torch threads {m['torch_threads']}, onnxruntime threads {m.get('ort_threads') or 'default'}; "
           f"load average {m['loadavg_start'][0]:.1f} at the start"]
    for name, res in results["models"].items():
        out.append(f"\n{name} ({res['windows']} windows of {res['seqlen']}, int4 g{res['group_size']}):\n")
        out.append("| runner | tok/s (median) | vs transformers | n | ppl | ppl, window 1 | others (cores) |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for label, r in res["rows"].items():
            vs = f"{r['vs_transformers']:.2f}x" if r["vs_transformers"] else ""
            n = f"{r['n']}" + (" (1 window)" if r["slow_single_window"] else "")
            out.append(f"| {label} | {r['tok_s_median']:.1f} | {vs} | {n} | {r['ppl']:.4f} | {r['ppl_first_window']:.4f} | {r['others_cores_median']:.2f} |")
        for k, v in res["notes"].items():
            out.append(f"\nnote ({k}): {v}")
    if results.get("micro"):
        out.append("\none linear, fp32 `x @ W` vs `aten._weight_int4pack_mm_for_cpu` (group 128):\n")
        out.append("| M | K | N | fp32 ms | int4 ms | int4 / fp32 | fp32 GFLOP/s | int4 GFLOP/s | n fp32/int4 | others (cores) |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in results["micro"]:
            out.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['fp32_ms']:.2f} | {r['int4_ms']:.2f} | {r['int4_over_fp32']:.1f}x | "
                       f"{r['fp32_gflops']:.1f} | {r['int4_gflops']:.2f} | {r['n_fp32']}/{r['n_int4']} | {r['others_cores']:.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/out/verify"), help="work directory (models, engines, exports)")
    ap.add_argument("--models", default="stories,synth")
    ap.add_argument("--windows", type=int, default=4, help="windows of 512 tokens per measurement (stories260K)")
    ap.add_argument("--synth-windows", type=int, default=2, help="windows of 512 tokens per measurement (synthetic model)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slow-s", type=float, default=180.0, help="measure a runner once on one window when a repeat would take longer")
    ap.add_argument("--runners", default=None, help="comma-separated subset of runner labels")
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--micro-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads and onnxruntime intra-op threads (default: each library's own)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from lmkiln.assets import bundled_model_path

    info = {"cpu": common.cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "mem_gb": round(mem_total_gb(), 1),
            "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "ort_threads": a.threads, "loadavg_start": os.getloadavg(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    try:
        import onnxruntime
        import transformers

        info.update(onnxruntime=onnxruntime.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    print(json.dumps(info), flush=True)
    results = {"machine": info, "models": {}}
    only = set(a.runners.split(",")) if a.runners else None
    for name in a.models.split(","):
        if name == "stories":
            hf, g = bundled_model_path(), 32
        elif name == "synth":
            hf, g = common.make_synthetic(a.out / "synth-hf", hidden=1024, inter=2816, layers=8, heads=16, kv_heads=4), 128
        else:
            raise SystemExit(f"unknown model {name!r}: choose stories or synth")
        n_windows = a.windows if name == "stories" else a.synth_windows
        results["models"][name] = bench_model(name, hf, a.out / name, g, n_windows, a.repeats, a.slow_s, only, a.threads)
    if not a.no_micro:
        results["micro"] = micro(a.micro_repeats)
    info["loadavg_end"] = os.getloadavg()
    md = markdown(results)
    print(md)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
