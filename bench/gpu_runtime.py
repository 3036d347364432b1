"""The engine runner on CUDA against transformers, side by side in one run (issue #12).

On a 1.1B synthetic Llama (TinyLlama's shape: hidden 2048, intermediate 5632, 22 layers,
32 heads / 4 kv heads, vocab 512; seeded random weights, fp16 on disk, written here with
bench/common.py), for: engine fp16, engine int4 (RTN W4 g128, packed: bf16 on tinygemm,
bf16 and fp16 on the Triton kernel), engine int8 (RTN per-channel symmetric), transformers
fp16 (dynamic cache, and static cache; no torch.compile). Per row: GPU memory after load and peak while decoding batch 8, decode
tok/s at batch 1 and 8 (new tokens only: time(N+1 tokens) - time(1 token), so prefill and
CUDA-graph capture cancel out), prefill tok/s at 2048 tokens. Also: the int4 kernels
(tinygemm, Triton) against a bf16 matmul per shape and M, a sweep of the Triton kernel's
launch shapes around `triton_int4.pick`, and the exactness of packed int4 against the same
engine dequantized on the bundled model and eval text.

    python bench/gpu_runtime.py --out bench/out/gpu/runtime.json   # on a GPU machine
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_synthetic  # noqa: E402

NEW = 128  # decode tokens timed
PROMPT = 32


DEV = "cuda"  # --smoke runs the same code on the CPU with a tiny model (checks the script, not speed)
SHAPE = dict(hidden=2048, inter=5632, layers=22, heads=32, kv_heads=4)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def mem() -> float:
    """MiB allocated on the GPU now (0 on the CPU)."""
    return torch.cuda.memory_allocated() / 2**20 if DEV == "cuda" else 0.0


def peak() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else 0.0


def reset() -> float:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
    return mem()


def timed(fn, repeats=3) -> float:
    """Best of `repeats` wall seconds of fn() on the GPU (synchronised)."""
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def prompts(batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, 512, (batch, PROMPT), generator=g)


def engine_row(path: Path, dtype: torch.dtype) -> dict:
    from lmkiln.runtime.engine_model import EngineModel
    from lmkiln.runtime.generate import static_greedy

    base = reset()
    t = time.perf_counter()
    model = EngineModel.from_path(path, dtype=dtype, device=DEV, check=False)
    sync()
    row = {"load_s": round(time.perf_counter() - t, 2), "loaded_mib": mem() - base, "load_peak_mib": peak() - base}
    paths = model.runtime_report()["linear_paths"]
    row["linear_paths"] = paths
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()  # from here: peaks while running, the load's temporaries apart
    for b in (1, 8):
        ids = prompts(b).tolist()
        gen = lambda n: static_greedy(model, ids, n)  # noqa: E731
        gen(4)  # warm-up: kernels, cuBLAS, the graph pool
        t_all, t_one = timed(lambda: gen(NEW + 1)), timed(lambda: gen(1))
        row[f"decode_b{b}_tok_s"] = b * NEW / (t_all - t_one)
        row[f"decode_b{b}_ms_per_step"] = (t_all - t_one) / NEW * 1e3
        if b == 8:
            row["decode_peak_mib"] = peak() - base
    x = torch.randint(3, 512, (1, 2048))

    def prefill():
        model.forward(x, None, model.new_cache(1, 2048))
    prefill()
    row["prefill_2048_tok_s"] = 2048 / timed(prefill)
    row["prefill_peak_mib"] = peak() - base
    return row  # the model goes with this frame


def hf_row(path: Path, static: bool) -> dict:
    from transformers import AutoModelForCausalLM

    base = reset()
    dtype = torch.float16 if DEV == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True).to(DEV).eval()
    row = {"loaded_mib": mem() - base}
    extra = {"cache_implementation": "static"} if static else {}
    for b in (1, 8):
        ids = prompts(b).to(DEV)
        mask = torch.ones_like(ids)

        def gen(n):
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, **extra)
        gen(4)
        t_all, t_one = timed(lambda: gen(NEW + 1)), timed(lambda: gen(1))
        row[f"decode_b{b}_tok_s"] = b * NEW / (t_all - t_one)
        row[f"decode_b{b}_ms_per_step"] = (t_all - t_one) / NEW * 1e3
        if b == 8:
            row["decode_peak_mib"] = peak() - base
    x = torch.randint(3, 512, (1, 2048), device=DEV)

    def prefill():
        with torch.inference_mode():
            model(input_ids=x)
    prefill()
    row["prefill_2048_tok_s"] = 2048 / timed(prefill)
    return row


def kernels() -> list[dict]:
    """PyTorch's int4 kernel (tinygemm) vs a bf16 matmul and vs dequantize-per-call, per shape and M."""
    from lmkiln.runtime import triton_int4
    from lmkiln.runtime.qlinear import QuantLinear

    rows = []
    for k, n in ((2048, 5632), (5632, 2048), (4096, 14336), (8192, 28672)):
        if DEV != "cuda":
            k, n = k // 16, n // 16
        g = torch.Generator(device=DEV).manual_seed(0)
        codes = torch.randint(0, 16, (k, n), dtype=torch.uint8, device=DEV, generator=g)
        scales = torch.rand(k // 128, n, device=DEV, generator=g).half() * 0.01
        zeros = torch.full((k // 128, n), 8, dtype=torch.uint8, device=DEV)
        packed = QuantLinear(codes, scales, zeros, 4, k, dtype=torch.bfloat16, device=DEV, kernels=True)
        live = QuantLinear(codes, scales, zeros, 4, k, dtype=torch.bfloat16, device=DEV, path="dequant-live")
        tri = {dt: QuantLinear(codes, scales, zeros, 4, k, dtype=dt, device=DEV, path="int4-triton")
               for dt in (torch.bfloat16, torch.float16) if triton_int4.available(torch.device(DEV), dt)}
        w = live.live_weight()
        for m in (1, 8, 64, 2048):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=DEV)
            reps = 50 if m < 2048 else 10
            t = lambda f: timed(lambda: [f() for _ in range(reps)], 3) / reps * 1e6  # noqa: E731
            row = {"k": k, "n": n, "m": m, "int4_path": packed.mode, "int4_us": t(lambda: packed(x)), "bf16_us": t(lambda: x @ w),
                   "dequant_live_us": t(lambda: live(x))}
            for dt, ql in tri.items():  # a CUDA graph of reps calls: the kernel's time without Triton's Python launch cost
                xd = x.to(dt)
                row[f"triton_{str(dt)[6:]}_us"] = t(lambda: ql(xd))
                if DEV == "cuda" and m < 2048:
                    row[f"triton_{str(dt)[6:]}_graph_us"] = graph_us(lambda: ql(xd), reps)
            if DEV == "cuda":
                row["tinygemm_us"] = t(lambda: torch.ops.aten._weight_int4pack_mm(x, packed.packed, 128, packed.scales_and_zeros))
                row["large_m_dequant"] = packed.large_m_dequant
            rows.append(row)
    return rows


def graph_us(fn, reps=20) -> float:
    """µs per call of fn replayed from a CUDA graph of `reps` calls (no launch cost from Python)."""
    fn(), sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return timed(graph.replay, 3) / reps * 1e6


def neighbours(pick):
    """The launch shapes swept around the picked one: pipelining depth and warps at its tiles,
    and the neighbouring k splits. (Run 2 of 2026-11-27 swept rows 1/16 x columns 16-128 x
    splits 1-16 and `pick` was fixed from it: docs/BENCHMARKS.md.)"""
    from dataclasses import replace

    yield from (replace(pick, stages=st, warps=w) for st in (2, 3, 4) for w in (4, 8))
    yield from (replace(pick, split=sp) for sp in (pick.split // 2, pick.split * 2) if 1 <= sp <= 32)


def sweep() -> list[dict]:
    """The Triton kernel's launch shapes (rows/columns per program, k splits) per linear shape
    at decode sizes, bf16, each timed from a CUDA graph; `pick` marks the one the runner uses."""
    from lmkiln.runtime import triton_int4 as T

    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for k, n in ((2048, 2560), (2048, 5632), (2048, 11264), (5632, 2048), (4096, 14336), (14336, 4096), (8192, 28672)):
        g = torch.Generator(device=DEV).manual_seed(0)
        codes = torch.randint(0, 16, (k, n), dtype=torch.uint8, device=DEV, generator=g)
        q, s, z = T.pack(codes, torch.rand(k // 128, n, device=DEV, generator=g).half() * 0.01,
                         torch.full((k // 128, n), 8, dtype=torch.uint8, device=DEV))
        for m in (1, 8):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=DEV)
            pick = T.pick(m, n, k, 128, sms)
            cands = {pick} | set(neighbours(pick))
            res = []
            for c in sorted(cands, key=str):
                try:
                    res.append((graph_us(lambda: T.matmul(x, q, s, z, c)), c))
                except Exception as e:  # noqa: BLE001 - a shape that does not compile is a result too
                    res.append((float("inf"), c)) if "out of resource" in str(e) else res.append((float("nan"), c))
            best = min((r for r in res if r[0] == r[0]), key=lambda r: r[0])
            pick_us = next(us for us, c in res if c == pick)
            rows.append({"k": k, "n": n, "m": m, "best": str(best[1]), "best_us": best[0], "pick": str(pick), "pick_us": pick_us,
                         "all": {str(c): us for us, c in res}})
            print(f"sweep {k}x{n} m={m}: best {best[0]:.1f} us {best[1]}; pick {pick_us:.1f} us {pick}", flush=True)
    return rows


def exactness(tmp: Path) -> dict:
    """Packed int4 vs the same engine dequantized (bf16 on the GPU both), bundled model and eval text."""
    from lmkiln.assets import bundled_model_path
    from lmkiln.formats.tokenizer import load_tokenizer
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import CalibOptions, quantize_model
    from lmkiln.runtime.engine_model import EngineModel
    from lmkiln.runtime.qlinear import QuantLinear

    src = bundled_model_path()
    out = {}
    eval_text = (Path(__file__).parent.parent / "tests" / "fixtures" / "tinystories_eval.txt").read_text()
    tok = load_tokenizer(src)
    ids = tok(eval_text, add_special_tokens=False).input_ids
    wins = [torch.tensor([[tok.bos_token_id] + ids[i:i + 511]]) for i in range(0, len(ids) - 511, 511)]
    for method in ("rtn", "awq"):
        eng = quantize_model(src, tmp / f"stories-{method}.engine", QuantOptions(bits=4, group_size=32, method=method),
                             CalibOptions(n_samples=32, seqlen=256), to="engine", force=True, device=DEV).output
        models = {"exact_fp32": EngineModel.from_path(eng, dtype=torch.float32, device=DEV, linear_path="dequant"),
                  "dequant_bf16": EngineModel.from_path(eng, dtype=torch.bfloat16, device=DEV, linear_path="dequant"),
                  "packed_bf16": EngineModel.from_path(eng, dtype=torch.bfloat16, device=DEV, kernels=True),
                  "dequant_fp16": EngineModel.from_path(eng, dtype=torch.float16, device=DEV, linear_path="dequant"),
                  "packed_fp16": EngineModel.from_path(eng, dtype=torch.float16, device=DEV, kernels=True)}
        before, QuantLinear.BF16_INT4 = QuantLinear.BF16_INT4, "int4-triton" if QuantLinear.BF16_INT4 == "int4" else "int4"
        models["other_bf16"] = EngineModel.from_path(eng, dtype=torch.bfloat16, device=DEV, kernels=True)
        QuantLinear.BF16_INT4 = before
        logp = {k: [m.forward(x)[0].double().log_softmax(-1).cpu() for x in wins] for k, m in models.items()}
        large_m, QuantLinear.LARGE_M = QuantLinear.LARGE_M, 10 ** 9  # tinygemm for every call, 511-row windows too
        tiny = "packed_bf16" if models["packed_bf16"].linear_paths().get("layers.0.attention.wqkv") == "int4" else "other_bf16"
        logp["tinygemm_bf16"] = [models[tiny].forward(x)[0].double().log_softmax(-1).cpu() for x in wins]
        QuantLinear.LARGE_M = large_m

        def kl_top1(a, b):
            kl = torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(logp[a], logp[b])])
            agree = torch.cat([p.argmax(-1) == q.argmax(-1) for p, q in zip(logp[a], logp[b])])
            return {"kl_mean": float(kl.mean()), "top1": float(agree.double().mean())}
        out[method] = {"paths": models["packed_bf16"].runtime_report()["linear_paths"], "tokens": sum(len(x) for x in logp["exact_fp32"]),
                       "packed_vs_dequant_bf16": kl_top1("dequant_bf16", "packed_bf16"),
                       "tinygemm_vs_packed_large_m": kl_top1("tinygemm_bf16", "packed_bf16"),
                       "tinygemm_bf16_vs_exact": kl_top1("exact_fp32", "tinygemm_bf16"),
                       "packed_bf16_vs_exact": kl_top1("exact_fp32", "packed_bf16"),
                       "dequant_bf16_vs_exact": kl_top1("exact_fp32", "dequant_bf16"),
                       "fp16_paths": models["packed_fp16"].runtime_report()["linear_paths"],
                       "other_bf16_paths": models["other_bf16"].runtime_report()["linear_paths"],
                       "other_vs_dequant_bf16": kl_top1("dequant_bf16", "other_bf16"),
                       "other_bf16_vs_exact": kl_top1("exact_fp32", "other_bf16"),
                       "packed_vs_dequant_fp16": kl_top1("dequant_fp16", "packed_fp16"),
                       "packed_fp16_vs_exact": kl_top1("exact_fp32", "packed_fp16")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/out/gpu/runtime.json"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/lmkiln-gpu-runtime"))
    ap.add_argument("--skip", default="", help="comma list of sections to skip: kernels,sweep,exact,rows,hf,hf_static,int8,fp16,triton")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks this script runs, measures nothing")
    a = ap.parse_args()
    global DEV, NEW
    if a.smoke:
        DEV, NEW = "cpu", 8
        SHAPE.update(hidden=256, inter=512, layers=2, heads=4, kv_heads=2)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    skip = set(a.skip.split(","))
    import transformers

    res = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (smoke)", "shape": SHAPE, "torch": torch.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d"), "new_tokens": NEW, "prompt_tokens": PROMPT}

    def section(name, fn):
        if name in skip:
            return
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception:  # one broken section must not cost the others' numbers
            res[name] = {"error": traceback.format_exc()[-2000:]}
        print(f"== {name} ({time.perf_counter() - t:.0f} s)", json.dumps(res[name], indent=1, default=str)[:4000], flush=True)
        a.out.write_text(json.dumps(res, indent=1, default=str))

    section("kernels", kernels)
    if DEV == "cuda":
        section("sweep", sweep)
    if "rows" not in skip:
        rows(a, res, skip, section)
    section("exact", lambda: exactness(a.work))  # last: the CUDA tests check the same bars
    a.out.write_text(json.dumps(res, indent=1, default=str))


def rows(a, res: dict, skip: set, section) -> None:
    """The 1.1B synthetic: engine rows and transformers rows, side by side, and the targets."""
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import quantize_model

    src = make_synthetic(a.work / f"synth-h{SHAPE['hidden']}-l{SHAPE['layers']}", SHAPE["hidden"], SHAPE["inter"], SHAPE["layers"],
                         SHAPE["heads"], SHAPE["kv_heads"], "float16")
    t = time.perf_counter()
    fp16 = convert_hf_to_engine(src, a.work / "fp16.engine", force=True)
    res["convert_s"] = round(time.perf_counter() - t, 1)
    engines = {"fp16": fp16}
    for name, opts in (("int4", QuantOptions(bits=4, group_size=128, method="rtn")),
                       ("int8", QuantOptions(bits=8, group_size=-1, symmetric=True, method="rtn")))[:1 if "int8" in skip else 2]:
        t = time.perf_counter()
        engines[name] = quantize_model(src, a.work / f"{name}.engine", opts, to="engine", force=True, device=DEV).output
        res[f"quantize_{name}_s"] = round(time.perf_counter() - t, 1)
    section("engine_fp16", lambda: engine_row(engines["fp16"], torch.float16 if DEV == "cuda" else torch.float32))
    section("engine_int4", lambda: engine_row(engines["int4"], torch.bfloat16))
    if "triton" not in skip:
        from lmkiln.runtime.qlinear import QuantLinear

        def other_bf16():
            before, QuantLinear.BF16_INT4 = QuantLinear.BF16_INT4, "int4-triton" if QuantLinear.BF16_INT4 == "int4" else "int4"
            try:
                return engine_row(engines["int4"], torch.bfloat16)
            finally:
                QuantLinear.BF16_INT4 = before
        section("engine_int4_other_bf16", other_bf16)
    if "fp16" not in skip:
        section("engine_int4_fp16", lambda: engine_row(engines["int4"], torch.float16 if DEV == "cuda" else torch.float32))
    if "int8" not in skip:
        section("engine_int8", lambda: engine_row(engines["int8"], torch.bfloat16))
    if "hf" not in skip:
        section("transformers_fp16_dynamic", lambda: hf_row(src, static=False))
        if "hf_static" not in skip:
            section("transformers_fp16_static", lambda: hf_row(src, static=True))
    res["targets"] = {}
    for row in ("engine_int4", "engine_int4_other_bf16", "engine_int4_fp16"):  # each int4 path against the same baselines
        try:
            e4, f16, hf = res[row], res["engine_fp16"], res["transformers_fp16_dynamic"]
            res["targets"][row] = {"decode_b1_vs_transformers_dynamic": e4["decode_b1_tok_s"] / hf["decode_b1_tok_s"],
                                   "decode_b8_vs_transformers_dynamic": e4["decode_b8_tok_s"] / hf["decode_b8_tok_s"],
                                   "memory_vs_fp16_engine_loaded": e4["loaded_mib"] / f16["loaded_mib"],
                                   "memory_vs_fp16_engine_decode_peak": e4["decode_peak_mib"] / f16["decode_peak_mib"]}
        except (KeyError, TypeError, ZeroDivisionError):
            pass
    print("== targets", json.dumps(res["targets"], indent=1))


if __name__ == "__main__":
    main()
