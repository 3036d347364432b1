#!/usr/bin/env python3
"""Benchmark: `lmkiln export onnx` decode / prefill tok/s on onnxruntime CPU.

Side by side, same model, same prompt, same harness (onnxruntime-genai, greedy):

  ours int4 acc4        export of an int4-g32 RTN engine (MatMulNBits), the CPU default accuracy_level 4
                        (int8 activations, as the builder's int4 CPU default)
  ours int4 acc0        the same with accuracy_level 0 (exact: bit-faithful to the engine)
  ours int4 acc4 head4  accuracy_level 4 and head_bits=4 (output head int4 too, as the builder does)
  ours int4 acc4 head8  accuracy_level 4 and head_bits=8 (output head int8, blocks of 128, level 4)
  ours int4 sym acc4    a symmetric RTN engine: no zero_points inputs (as the builder's graph)
  ours int4 g128 acc4   an int4-g128 RTN engine (`lmkiln quantize`'s default group size), the default export
  ours int8 acc4 / acc0 / portable
                        an int8-g128 RTN engine at level 4, at level 0 (onnxruntime has no 8-bit level-0
                        CPU kernel) and as DequantizeLinear + MatMul (`portable`)
  ours fp32             export of the fp32 engine
  builder int4     `python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu`
  transformers     fp32 `generate` (prefill = one forward over the prompt)

Models: stories260K (bundled) and a synthetic random-init seeded Llama big enough to be
bandwidth-bound (hidden 2048, FFN 5632, 8 layers, 16 heads / 8 kv heads, vocab 512 =
the bundled tokenizer, untied head; `--vocab 32000` gives the same model a realistic vocabulary,
where the output head is a large share of the bytes read per token: the prompt still comes from
the bundled tokenizer, whose ids < 512 are valid in any larger vocabulary). Memory bandwidth
is measured with a numpy copy of a 512 MiB array (read + write bytes / s); the roofline for decode is bandwidth / bytes
of weights read per token (every initializer except the embedding table, which is
gathered one row at a time unless tied).

    .venv/bin/python bench/onnx.py --out bench/out/onnx --json bench/out/onnx.json
    .venv/bin/python bench/onnx.py --models stories --tokens 32      # quick
    # the output head options on a vocabulary of 32000 (results keyed "synth-v32000"):
    .venv/bin/python bench/onnx.py --models synth --vocab 32000 --tokens 32 --loads 2 --repeats 4 \\
        --variants "ours int4 acc4,ours int4 acc4 head8,ours int4 acc4 head4,builder int4"
    # ours vs the builder only, 4 fresh loads x 6 rounds, an A/A control (the builder's folder again):
    .venv/bin/python bench/onnx.py --models synth --tokens 32 --loads 4 --repeats 6 \\
        --variants "ours int4 acc4,ours int4 acc4 head4,builder int4" --extra "builder again=DIR_WITH_SAME_FILES"

Timing: rounds interleave the variants (order reversed every other round), every model is loaded
`--loads` times (order rotated), and per-step decode times are kept (the first
`generate_next_token` only picks a token from the prefill's logits and is left out). Each
variant / builder ratio is given as the ratio of median steps, of fastest steps, of paired rounds
(median, p25, p75, rounds won) and per load.
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
        size = {1: 4, 10: 2, 2: 1, 3: 1, 21: 0.5, 7: 8, 6: 4, 22: 0.5}.get(t.data_type, 4) * n
        if ("embed" in t.name and not tied) or "cos_cache" in t.name or "sin_cache" in t.name:
            continue
        total += size
    return int(total)


def genai_speeds(dirs: dict[str, Path], prompt: list[int], n_new: int, repeats: int, loads: int = 1) -> dict:
    """genai_speed for every variant, rounds interleaved (variant A, B, ..., then again, the order
    reversed every other round so no variant always runs first or right after another), so
    load from other jobs on a shared machine falls on all variants alike; a variant that fails
    to load or run maps to its error string.

    `loads`: every model is loaded anew that many times (the load order rotated), `repeats` timed
    rounds after a warm-up round each time. Where a loaded model's weights land in memory moves its
    decode time by 1-2 % for the whole life of the load (measured: the same model loaded twice in
    one process, 1.01x), so one load per variant cannot resolve differences of that size.

    Per variant: median prefill / decode tok/s over all rounds; per-step decode times pooled over
    all rounds (min, p25, median, p75, ms); the median step of each load (`loads_step_ms`); each
    round's decode tok/s (`rounds_decode_tok_s`, in round order: round i of every variant ran within
    seconds of the others', which `versus` pairs)."""
    import gc

    import onnxruntime_genai as og

    out, labels = {}, list(dirs)
    samples = {label: [] for label in labels}
    for load in range(loads):
        k = load % len(labels)
        models = {}
        for label in labels[k:] + labels[:k]:
            if label in out:  # failed before
                continue
            try:
                models[label] = og.Model(str(dirs[label]))
            except RuntimeError as e:
                out[label] = str(e).splitlines()[0][:200]
        for r in range(repeats + 1):  # round 0 is a warm-up
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for label in order:
                try:
                    res = genai_speed(models[label], prompt, n_new, 1, warmup=False)
                except RuntimeError as e:  # the builder's graph can fail at run time (GQA needs head_dim % 16 == 0)
                    out[label] = str(e).splitlines()[0][:200]
                    del models[label]
                    continue
                if r:
                    samples[label].append((load, res))
        del models
        gc.collect()
    for label in labels:
        if label in out:
            continue
        xs = [x for _, x in samples[label]]
        steps = 1e3 * np.concatenate([x["steps_s"] for x in xs])
        per_load = [float(1e3 * np.median(np.concatenate([x["steps_s"] for ld, x in samples[label] if ld == load])))
                    for load in range(loads)]
        out[label] = {k: float(np.median([x[k] for x in xs])) for k in ("prefill_tok_s", "decode_tok_s")}
        out[label].update(step_ms={"min": float(steps.min()), "p25": float(np.percentile(steps, 25)),
                                   "median": float(np.median(steps)), "p75": float(np.percentile(steps, 75)),
                                   "n": int(steps.size)},
                          loads_step_ms=per_load, rounds_decode_tok_s=[x["decode_tok_s"] for x in xs])
    return out


def versus(a: dict, b: dict) -> dict:
    """Decode speed of a relative to b (> 1: a faster) four ways: ratio of the median steps,
    of the fastest steps (the least disturbed by other load), the median with p25 / p75
    of the per-round ratios (a's round i over b's round i, run back to back), and the ratio of
    the median steps of each load (`loads`: the spread there is the memory-placement noise)."""
    paired = np.array(a["rounds_decode_tok_s"]) / np.array(b["rounds_decode_tok_s"])
    loads = np.array(b["loads_step_ms"]) / np.array(a["loads_step_ms"])
    return {"loads": [round(float(x), 4) for x in loads],"median_step": b["step_ms"]["median"] / a["step_ms"]["median"], "min_step": b["step_ms"]["min"] / a["step_ms"]["min"],
            "paired_median": float(np.median(paired)), "paired_p25": float(np.percentile(paired, 25)),
            "paired_p75": float(np.percentile(paired, 75)), "paired_wins": f"{int((paired >= 1).sum())}/{paired.size}"}


def genai_speed(model, prompt: list[int], n_new: int, repeats: int, warmup: bool = True) -> dict:
    import onnxruntime_genai as og

    if not isinstance(model, og.Model):
        model = og.Model(str(model))
    pre, dec, step_s = [], [], []
    for i in range(repeats + int(warmup)):  # the first run is a warm-up
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n_new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array(prompt, dtype=np.int32))
        t1 = time.perf_counter()
        steps = 0
        while not gen.is_done() and steps < n_new:
            ts = time.perf_counter()
            gen.generate_next_token()
            if i >= int(warmup) and steps:  # the first call only picks the token from the prefill's logits
                step_s.append(time.perf_counter() - ts)
            steps += 1
        t2 = time.perf_counter()
        pre.append(len(prompt) / (t1 - t0))
        dec.append(steps / (t2 - t1))
    k = int(warmup)
    return {"prefill_tok_s": float(np.median(pre[k:])), "decode_tok_s": float(np.median(dec[k:])), "steps_s": step_s}


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
                builder_timeout: int, only: set[str] | None = None, extra: dict[str, Path] | None = None,
                loads: int = 1) -> dict:
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.export import export_onnx
    from lmkiln.formats.tokenizer import load_tokenizer
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import quantize_model

    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(hf_dir)
    text = (Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tinystories_eval.txt").read_text()
    prompt = tok(text).input_ids[:prompt_len]
    if not (work / "eng-fp32").exists() and (not only or "ours fp32" in only):
        convert_hf_to_engine(hf_dir, work / "eng-fp32")
    if not (work / "eng-int4").exists():
        quantize_model(hf_dir, work / "eng-int4", QuantOptions(bits=4, group_size=32, method="rtn"), to="engine")
    if not (work / "eng-int4-sym").exists() and (not only or "ours int4 sym acc4" in only):
        quantize_model(hf_dir, work / "eng-int4-sym", QuantOptions(bits=4, group_size=32, method="rtn", symmetric=True),
                       to="engine")
    if not (work / "eng-int4-g128").exists() and (not only or "ours int4 g128 acc4" in only):
        quantize_model(hf_dir, work / "eng-int4-g128", QuantOptions(bits=4, group_size=128, method="rtn"), to="engine")
    if not (work / "eng-int8").exists() and only and any(v.startswith("ours int8") for v in only):
        quantize_model(hf_dir, work / "eng-int8", QuantOptions(bits=8, group_size=128, method="rtn"), to="engine")
    t = time.perf_counter()
    if not (work / "ours-int4-acc4").exists():
        export_onnx(work / "eng-int4", work / "ours-int4-acc4")  # the CPU default: accuracy_level 4
    t_export = time.perf_counter() - t
    exports = {"ours int4 acc4": ("eng-int4", "ours-int4-acc4", {}),
               "ours int4 acc0": ("eng-int4", "ours-int4-acc0", {"accuracy_level": 0}),
               "ours int4 acc4 head4": ("eng-int4", "ours-int4-acc4-head4", {"head_bits": 4}),
               "ours int4 acc4 head8": ("eng-int4", "ours-int4-acc4-head8", {"head_bits": 8}),
               "ours int4 sym acc4": ("eng-int4-sym", "ours-int4-sym-acc4", {}),
               "ours int4 g128 acc4": ("eng-int4-g128", "ours-int4-g128-acc4", {}),
               "ours int8 acc4": ("eng-int8", "ours-int8-acc4", {}),
               "ours int8 acc0": ("eng-int8", "ours-int8-acc0", {"accuracy_level": 0}),
               "ours int8 portable": ("eng-int8", "ours-int8-portable", {"portable": True}),
               "ours fp32": ("eng-fp32", "ours-fp32", {})}
    variants = {}
    if only:
        exports = {k: v for k, v in exports.items() if k in only}
    for label, (eng, d, kw) in exports.items():
        if not (work / d).exists():
            export_onnx(work / eng, work / d, **kw)
        variants[label] = work / d
    variants.update(extra or {})
    why = run_builder(hf_dir, work / "builder-int4", builder_timeout) if not only or "builder int4" in only else "not selected"
    if why is None:
        variants["builder int4"] = work / "builder-int4"
    rows = {}
    load0 = os.getloadavg()
    speeds = genai_speeds(variants, prompt, n_new, repeats, loads)
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
        st = r["step_ms"]
        print(f"  {name:8s} {label:20s} prefill {r['prefill_tok_s']:9.1f} tok/s  decode {r['decode_tok_s']:8.1f} tok/s  "
              f"step ms min {st['min']:.2f} p25 {st['p25']:.2f} median {st['median']:.2f} p75 {st['p75']:.2f}  "
              f"weights {wb / 1e6:8.1f} MB  roofline {r['roofline_fraction']:.0%}", flush=True)
    load1 = os.getloadavg()
    if not only or "transformers fp32" in only:
        rows["transformers fp32"] = transformers_speed(hf_dir, prompt, n_new, repeats)
        print(f"  {name:8s} transformers fp32 prefill {rows['transformers fp32']['prefill_tok_s']:9.1f} tok/s  "
              f"decode {rows['transformers fp32']['decode_tok_s']:8.1f} tok/s", flush=True)
    res = {"rows": rows, "prompt_tokens": len(prompt), "new_tokens": n_new, "rounds": repeats, "loads": loads, "export_int4_s": t_export,
           "builder_error": why, "loadavg_before": load0, "loadavg_after_onnx": load1, "loadavg_after": os.getloadavg()}
    res["ratios"] = {}
    if "ours int4 acc4" in rows and "transformers fp32" in rows:
        res["ratios"]["ours_int4_vs_transformers_fp32"] = rows["ours int4 acc4"]["decode_tok_s"] / rows["transformers fp32"]["decode_tok_s"]
    if "builder int4" in rows:
        b = rows["builder int4"]
        for label in [*exports, *(extra or {})]:
            if label in rows:
                v = versus(rows[label], b)
                res["ratios"][label.replace(" ", "_") + "_vs_builder_int4"] = v
                print(f"  {name:8s} {label:20s} / builder int4 decode: median step {v['median_step']:.3f}x  "
                      f"min step {v['min_step']:.3f}x  per-round {v['paired_median']:.3f}x "
                      f"(p25 {v['paired_p25']:.3f}, p75 {v['paired_p75']:.3f}, rounds >= 1: {v['paired_wins']})  "
                      f"per load {v['loads']}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/out/onnx"))
    ap.add_argument("--models", default="stories,synth")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per variant, interleaved (after one warm-up round)")
    ap.add_argument("--loads", type=int, default=3,
                    help="load every model anew this many times (rotating the order), --repeats rounds each")
    ap.add_argument("--variants", default="",
                    help="comma list of row labels to run (default all), e.g. 'ours int4 acc4,builder int4'")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=DIR",
                    help="also time this ONNX folder (an ablation export) in the same interleaved rounds; repeatable")
    ap.add_argument("--vocab", type=int, default=512,
                    help="vocabulary of the synthetic model (default 512 = the bundled tokenizer's); a larger one "
                         "(e.g. 32000) gives the output head a realistic share of the bytes read per token. The "
                         "bundled tokenizer still makes the prompt (ids < 512, valid in any larger vocabulary); its "
                         "results are keyed 'synth-v{N}' with their own folders under --out")
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
        if name == "stories":
            hf = bundled_model_path()
        else:
            if a.vocab != 512:
                name = f"{name}-v{a.vocab}"
            hf = common.make_synthetic(a.out / ("synth-hf" if a.vocab == 512 else f"synth-hf-v{a.vocab}"), hidden=2048,
                                       inter=5632, layers=8, heads=16, kv_heads=8, vocab=a.vocab)
        results["models"][name] = bench_model(name, hf, a.out / name, a.prompt_len, a.tokens, a.repeats, bw, a.builder_timeout,
                                              {v.strip() for v in a.variants.split(",") if v.strip()} or None,
                                              {k: Path(v) for k, v in (e.split("=", 1) for e in a.extra)}, a.loads)
        print(json.dumps({name: results["models"][name]["ratios"], "builder_error": results["models"][name]["builder_error"]}), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
