#!/usr/bin/env python3
"""Benchmark: `lmkiln export onnx` decode / prefill tok/s on onnxruntime CPU.

Side by side, same model, same prompt, same harness (onnxruntime-genai, greedy):

  ours int4 acc4        export of an int4-g32 RTN engine (MatMulNBits), the CPU default accuracy_level 4
                        (int8 activations, as the builder's int4 CPU default)
  ours int4 acc0        the same with accuracy_level 0 (exact: bit-faithful to the engine)
  ours int4 acc4 head4  accuracy_level 4 and head_bits=4 (output head int4 too, as the builder does)
  ours int4 sym acc4    a symmetric RTN engine: no zero_points inputs (as the builder's graph)
  ours fp32             export of the fp32 engine
  builder int4     `python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu`
  transformers     fp32 `generate` (prefill = one forward over the prompt)

Models: stories260K (bundled) and a synthetic random-init seeded Llama big enough to be
bandwidth-bound (hidden 2048, FFN 5632, 8 layers, 16 heads / 8 kv heads, vocab 512 =
the bundled tokenizer, untied head). Memory bandwidth is measured with a numpy copy of
a 512 MiB array (read + write bytes / s); the roofline for decode is bandwidth / bytes
of weights read per token (every initializer except the embedding table, which is
gathered one row at a time unless tied).

    .venv/bin/python bench/onnx.py --out bench/out/onnx --json bench/out/onnx.json
    .venv/bin/python bench/onnx.py --models stories --tokens 32      # quick
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named onnx.py: keep its folder off sys.path so `import onnx` finds the library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import platform
import shutil
import subprocess
import time

import numpy as np

import importlib.util as _ilu

_spec = _ilu.spec_from_file_location("lmkiln_bench_common", Path(__file__).with_name("common.py"))
common = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(common)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    a = np.ones(mib * 2**20 // 8)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    return 2 * a.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes(onnx_dir: Path) -> int:
    import onnx

    m = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    total = 0
    tied = not any(i.name.startswith("output") or "lm_head" in i.name for i in m.graph.initializer)
    for t in m.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        size = {1: 4, 10: 2, 2: 1, 21: 0.5, 7: 8, 6: 4, 22: 0.5}.get(t.data_type, 4) * n
        if ("embed" in t.name and not tied) or "cos_cache" in t.name or "sin_cache" in t.name:
            continue
        total += size
    return int(total)


def genai_speeds(dirs: dict[str, Path], prompt: list[int], n_new: int, repeats: int) -> dict:
    """genai_speed for every variant, rounds interleaved (variant A, B, ..., then again), so
    load from other jobs on a shared machine falls on all variants alike; a variant that fails
    to load or run maps to its error string."""
    import onnxruntime_genai as og

    models, out = {}, {}
    for label, d in dirs.items():
        try:
            models[label] = og.Model(str(d))
        except RuntimeError as e:
            out[label] = str(e).splitlines()[0][:200]
    samples = {label: [] for label in models}
    for r in range(repeats + 1):  # round 0 is a warm-up
        for label in list(models):
            try:
                res = genai_speed(models[label], prompt, n_new, 1, warmup=False)
            except RuntimeError as e:  # the builder's graph can fail at run time (GQA needs head_dim % 16 == 0)
                out[label] = str(e).splitlines()[0][:200]
                del models[label]
                continue
            if r:
                samples[label].append(res)
    for label in models:
        out[label] = {k: float(np.median([x[k] for x in samples[label]])) for k in ("prefill_tok_s", "decode_tok_s")}
    return out


def genai_speed(model, prompt: list[int], n_new: int, repeats: int, warmup: bool = True) -> dict:
    import onnxruntime_genai as og

    if not isinstance(model, og.Model):
        model = og.Model(str(model))
    pre, dec = [], []
    for _ in range(repeats + int(warmup)):  # the first run is a warm-up
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n_new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array(prompt, dtype=np.int32))
        t1 = time.perf_counter()
        steps = 0
        while not gen.is_done() and steps < n_new:
            gen.generate_next_token()
            steps += 1
        t2 = time.perf_counter()
        pre.append(len(prompt) / (t1 - t0))
        dec.append(steps / (t2 - t1))
    k = int(warmup)
    return {"prefill_tok_s": float(np.median(pre[k:])), "decode_tok_s": float(np.median(dec[k:]))}


def transformers_speed(hf_dir: Path, prompt: list[int], n_new: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    ids = torch.tensor([prompt])
    pre, dec = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            tp = _timed(lambda: model(ids))
            tg = _timed(lambda: model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                               pad_token_id=0))
            pre.append(len(prompt) / tp)
            dec.append((n_new - 1) / max(tg - tp, 1e-9))  # generate = one prefill + n_new - 1 decode steps
    return {"prefill_tok_s": float(np.median(pre[1:])), "decode_tok_s": float(np.median(dec[1:]))}


def run_builder(hf_dir: Path, out: Path, timeout: int) -> str | None:
    """The onnxruntime-genai builder's int4 CPU export; None on success, else why not."""
    if (out / "genai_config.json").exists():
        return None
    cache = out.parent / (out.name + "-cache")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out), "-p", "int4", "-e", "cpu",
           "-c", str(cache)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"builder timed out after {timeout}s"
    if r.returncode or not (out / "genai_config.json").exists():
        return f"builder failed (rc {r.returncode}): {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return None


def bench_model(name: str, hf_dir: Path, work: Path, prompt_len: int, n_new: int, repeats: int, bw: float,
                builder_timeout: int) -> dict:
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.export import export_onnx
    from lmkiln.formats.tokenizer import load_tokenizer
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import quantize_model

    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(hf_dir)
    text = (Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tinystories_eval.txt").read_text()
    prompt = tok(text).input_ids[:prompt_len]
    if not (work / "eng-fp32").exists():
        convert_hf_to_engine(hf_dir, work / "eng-fp32")
    if not (work / "eng-int4").exists():
        quantize_model(hf_dir, work / "eng-int4", QuantOptions(bits=4, group_size=32, method="rtn"), to="engine")
    if not (work / "eng-int4-sym").exists():
        quantize_model(hf_dir, work / "eng-int4-sym", QuantOptions(bits=4, group_size=32, method="rtn", symmetric=True),
                       to="engine")
    t = time.perf_counter()
    if not (work / "ours-int4-acc4").exists():
        export_onnx(work / "eng-int4", work / "ours-int4-acc4")  # the CPU default: accuracy_level 4
    t_export = time.perf_counter() - t
    exports = {"ours int4 acc4": ("eng-int4", "ours-int4-acc4", {}),
               "ours int4 acc0": ("eng-int4", "ours-int4-acc0", {"accuracy_level": 0}),
               "ours int4 acc4 head4": ("eng-int4", "ours-int4-acc4-head4", {"head_bits": 4}),
               "ours int4 sym acc4": ("eng-int4-sym", "ours-int4-sym-acc4", {}),
               "ours fp32": ("eng-fp32", "ours-fp32", {})}
    variants = {}
    for label, (eng, d, kw) in exports.items():
        if not (work / d).exists():
            export_onnx(work / eng, work / d, **kw)
        variants[label] = work / d
    why = run_builder(hf_dir, work / "builder-int4", builder_timeout)
    if why is None:
        variants["builder int4"] = work / "builder-int4"
    rows = {}
    load0 = os.getloadavg()
    speeds = genai_speeds(variants, prompt, n_new, repeats)
    for label, d in variants.items():
        r = speeds[label]
        if isinstance(r, str):
            why = f"{label} failed to run: {r}"
            print(f"  {name:8s} {label:20s} {why}", flush=True)
            continue
        wb = weight_bytes(d)
        r.update(weight_mb=wb / 1e6, roofline_tok_s=bw * 1e9 / wb)
        r["roofline_fraction"] = r["decode_tok_s"] / r["roofline_tok_s"]
        rows[label] = r
        print(f"  {name:8s} {label:20s} prefill {r['prefill_tok_s']:9.1f} tok/s  decode {r['decode_tok_s']:8.1f} tok/s  "
              f"weights {wb / 1e6:8.1f} MB  roofline {r['roofline_fraction']:.0%}", flush=True)
    rows["transformers fp32"] = transformers_speed(hf_dir, prompt, n_new, repeats)
    print(f"  {name:8s} transformers fp32 prefill {rows['transformers fp32']['prefill_tok_s']:9.1f} tok/s  "
          f"decode {rows['transformers fp32']['decode_tok_s']:8.1f} tok/s", flush=True)
    res = {"rows": rows, "prompt_tokens": len(prompt), "new_tokens": n_new, "export_int4_s": t_export, "builder_error": why,
           "loadavg_before": load0, "loadavg_after": os.getloadavg()}
    base = rows["ours int4 acc4"]["decode_tok_s"]
    res["ratios"] = {"ours_int4_vs_transformers_fp32": base / rows["transformers fp32"]["decode_tok_s"]}
    if "builder int4" in rows:
        b = rows["builder int4"]["decode_tok_s"]
        for label in exports:
            if label in rows:
                res["ratios"][label.replace(" ", "_") + "_vs_builder_int4"] = rows[label]["decode_tok_s"] / b
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/out/onnx"))
    ap.add_argument("--models", default="stories,synth")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--builder-timeout", type=int, default=1800)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from lmkiln.assets import bundled_model_path

    bw = bandwidth_gbs()
    info = {"cpu": common.cpu_model(), "cores": os.cpu_count(), "bandwidth_gbs": bw, "python": platform.python_version(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "loadavg_start": os.getloadavg()}
    import onnxruntime
    import onnxruntime_genai

    info.update(onnxruntime=onnxruntime.__version__, onnxruntime_genai=onnxruntime_genai.__version__)
    print(json.dumps(info), flush=True)
    results = {"machine": info, "models": {}}
    for name in a.models.split(","):
        hf = bundled_model_path() if name == "stories" else common.make_synthetic(a.out / "synth-hf", hidden=2048, inter=5632, layers=8, heads=16, kv_heads=8)
        results["models"][name] = bench_model(name, hf, a.out / name, a.prompt_len, a.tokens, a.repeats, bw, a.builder_timeout)
        print(json.dumps({name: results["models"][name]["ratios"], "builder_error": results["models"][name]["builder_error"]}), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
