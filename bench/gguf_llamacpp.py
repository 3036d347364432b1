#!/usr/bin/env python3
"""GGUF from lmkiln's AWQ against llama.cpp's own Q4_1, both run by llama.cpp itself.

On the bundled stories260K model (a real TinyStories Llama):
  f32          `lmkiln export gguf STORIES --type f32` (the FFN zero-padded 172 -> 192): the
               model itself, base of the KL divergences
  f16          the same with --type f16
  llama.cpp    `llama-quantize --token-embedding-type q8_0 f32.gguf Q4_1`: llama.cpp's own
               round-to-nearest Q4_1 of every linear (from the f32 weights)
  lmkiln AWQ   `lmkiln quantize --w4a16 --group-size 32` (AWQ, default calibration) then
               `lmkiln export gguf`: AWQ's codes and scales as Q4_1 blocks, not re-quantized
  lmkiln RTN   the same with `--method rtn` (separates AWQ's gain from the format)
The three Q4_1 files have byte-identical Q8_0 token embeddings (checked: gguf's Q8_0
quantizer is llama.cpp's reference one, on the same f32 values) and f32 norms, so only
the linears differ. llama.cpp's `llama-perplexity` scores each text (n_ctx 512, the
second half of each chunk: its own protocol) and, with `--kl-divergence` against the f32
file's logits, gives KL and top-1 agreement. The Python binding (llama-cpp-python) loads
each file and generates greedily, as a load check.

    bash bench/peers/setup_llamacpp.sh                  # once: builds llama.cpp (15-25 min on 2 cores)
    .venv/bin/python bench/gguf_llamacpp.py --json bench/out/gguf_llamacpp.json

Run it with lmkiln's .venv; llama.cpp runs as subprocesses from the bench build.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import machine  # noqa: E402

TEXTS = {
    "tinystories": ROOT / "tests" / "fixtures" / "tinystories_eval.txt",  # in-domain, never in calibration
    "wikitext2-test": ROOT / "src" / "assets" / "eval" / "wikitext2_test_excerpt.txt",  # calibration is WikiText-2 *validation*
}
PROMPT = "Once upon a time"


def run(cmd: list[str], log: Path) -> str:
    t = time.time()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    out = p.stdout + p.stderr
    log.write_text(" ".join(map(str, cmd)) + "\n\n" + out)
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}, {time.time() - t:.0f} s): {' '.join(map(str, cmd))}\n{out[-3000:]}")
    return out


def grab(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "gguf")
    ap.add_argument("--build", type=Path, default=ROOT / "bench" / "out" / "llamacpp-build")
    ap.add_argument("--venv", type=Path, default=ROOT / "bench" / "out" / "venv-llamacpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import torch

    from lmkiln.assets import bundled_model_path
    from lmkiln.export.gguf import export_gguf
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import CalibOptions, quantize_model

    torch.set_num_threads(a.threads)
    stories = bundled_model_path()
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    perplexity, quantize = a.build / "bin" / "llama-perplexity", a.build / "bin" / "llama-quantize"
    for tool in (perplexity, quantize):
        if not tool.is_file():
            raise SystemExit(f"{tool} is missing: run bash bench/peers/setup_llamacpp.sh first")

    calib = CalibOptions(n_samples=a.calib_samples, seqlen=a.calib_seqlen)
    files, reports = {}, {}
    for method in ("awq", "rtn"):
        q = w / f"stories-{method}-g32"
        if not q.exists():
            quantize_model(stories, q, QuantOptions(bits=4, group_size=32, method=method), calib, to="hf")
        files[f"lmkiln {method.upper()} q4_1"] = w / f"stories-{method}-q4_1.gguf"
        reports[f"lmkiln {method.upper()} q4_1"] = export_gguf(q, files[f"lmkiln {method.upper()} q4_1"], "q4_1", force=True).report
    f32, f16 = w / "stories-f32.gguf", w / "stories-f16.gguf"
    reports["f32"] = export_gguf(stories, f32, "f32", force=True).report
    reports["f16"] = export_gguf(stories, f16, "f16", force=True).report
    files = {"f32": f32, "f16": f16, "llama.cpp q4_1": w / "stories-llamacpp-q4_1.gguf", **files}
    run([quantize, "--token-embedding-type", "q8_0", f32, files["llama.cpp q4_1"], "Q4_1", a.threads], w / "llama-quantize.log")
    import gguf

    emb = {k: bytes(next(t for t in gguf.GGUFReader(str(p)).tensors if t.name == "token_embd.weight").data.tobytes())
           for k, p in files.items() if "q4_1" in k}
    same_embedding = len(set(emb.values())) == 1

    results: dict = {}
    for tname, text in TEXTS.items():
        base = w / f"{tname}.kld"
        out = run([perplexity, "-m", f32, "-f", text, "-c", a.ctx, "-b", a.ctx, "-t", a.threads,
                   "--kl-divergence-base", base], w / f"ppl-{tname}-f32.log")
        results.setdefault("f32", {})[tname] = {"ppl": grab(r"Final estimate: PPL = ([\d.]+)", out),
                                                "ppl_err": grab(r"Final estimate: PPL = [\d.]+ \+/- ([\d.]+)", out)}
        for name, path in files.items():
            if name == "f32":
                continue
            out = run([perplexity, "-m", path, "-c", a.ctx, "-b", a.ctx, "-t", a.threads, "--kl-divergence-base", base,
                       "--kl-divergence"], w / f"ppl-{tname}-{path.stem}.log")
            results.setdefault(name, {})[tname] = {
                "ppl": grab(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", out), "ppl_err": grab(r"Mean PPL\(Q\)\s*:\s*[\d.]+ ± +([\d.]+)", out),
                "kld": grab(r"Mean +KLD:\s*([\d.]+)", out), "same_top_p_pct": grab(r"Same top p:\s*([\d.]+)", out)}

    # Load check through the Python binding: greedy text from each file.
    gen = {}
    py = a.venv / "bin" / "python"
    for name, path in files.items():
        code = ("import json, sys\nfrom llama_cpp import Llama\n"
                f"m = Llama(model_path={str(path)!r}, n_ctx={a.ctx}, n_threads={a.threads}, verbose=False)\n"
                f"r = m({PROMPT!r}, max_tokens=32, temperature=0.0)\nprint(json.dumps(r['choices'][0]['text']))\n")
        gen[name] = json.loads(run([py, "-c", code], w / f"gen-{path.stem}.log").strip().splitlines()[-1])

    from importlib import metadata

    llama_ver = subprocess.run([str(py), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True).stdout.strip()
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "machine": {**machine("torch", "gguf"), "llama-cpp-python": llama_ver, "lmkiln": metadata.version("lmkiln")},
        "protocol": {"n_ctx": a.ctx, "threads": a.threads, "calibration": f"{a.calib_samples} x {a.calib_seqlen} (bundled WikiText-2 validation)",
                     "texts": {k: str(v.relative_to(ROOT)) for k, v in TEXTS.items()}},
        "results": results,
        "greedy": gen,
        "m_rounding": {k: r["m_rounding"] for k, r in reports.items() if r.get("m_rounding")},
        "sizes": {k: p.stat().st_size for k, p in files.items()},
        "q4_1_files_share_the_embedding_bytes": same_embedding,
    }
    print(f"| GGUF | bytes | " + " | ".join(f"{t} PPL | {t} KLD | {t} same top-1 %" for t in TEXTS) + " |")
    print("|---|---|" + "---|---|---|" * len(TEXTS))
    for name in files:
        row = [name, str(record["sizes"][name])]
        for t in TEXTS:
            r = results[name][t]
            row += [f"{r['ppl']:.4f} ± {r['ppl_err']:.4f}", f"{r.get('kld', 0) or 0:.5f}", f"{r.get('same_top_p_pct') or 100:.2f}"]
        print("| " + " | ".join(row) + " |")
    print(f"the Q4_1 files' token_embd bytes are identical: {same_embedding}")
    for k, v in record["m_rounding"].items():
        print(f"{k}: m rounding max |err| {v['max_abs_err']:.3g} ({v['max_err_steps']:.3g} step), rms {v['rms_err']:.3g}, {v['blocks']} blocks")
    for k, v in gen.items():
        print(f"{k}: {PROMPT}{v!r}")
    if a.json:
        a.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
