"""Where `lmkiln quantize`'s peak GPU memory goes: runs the quantize API on a model with
PyTorch's allocator history recorded, finds the moment of the peak and lists what was alive
then, grouped by the innermost lmkiln source line that allocated it (and its caller).

    python bench/gpu_memory_trace.py MODEL OUT_DIR [--calib-samples 128 --calib-seqlen 512]

Prints the peak (from the trace and torch.cuda.max_memory_allocated), the plan's estimate,
and the top allocation sites at the peak; writes the same as JSON with --json. Needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict

import torch

from lmkiln.quant.awq import QuantOptions
from lmkiln.quant.pipeline import CalibOptions, quantize_model


def site(frames: list[dict]) -> str:
    """The innermost two lmkiln frames of an allocation's stack (file:line function)."""
    own = [f for f in frames if "/lmkiln/" in f["filename"]]
    if not own:
        own = [f for f in frames if "torch" not in f["filename"]][:1] or frames[:1]
    return " <- ".join(f"{f['filename'].rsplit('/lmkiln/', 1)[-1]}:{f['line']} {f['name']}" for f in own[:2])


def peak_sites(snapshot: dict, device: int = 0) -> tuple[int, dict[str, int]]:
    """Replay the allocator trace: the largest sum of live blocks, and the live bytes per site then."""
    trace = snapshot["device_traces"][device]
    live: dict[int, tuple[int, str]] = {}
    total = best = 0
    best_live: dict[int, tuple[int, str]] = {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], site(ev.get("frames", [])))
            total += ev["size"]
            if total > best:
                best, best_live = total, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    by_site: dict[str, int] = defaultdict(int)
    for size, where in best_live.values():
        by_site[where] += size
    return best, dict(sorted(by_site.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--json")
    a = ap.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    res = quantize_model(a.model, a.out, QuantOptions(bits=4, group_size=128), CalibOptions(n_samples=a.calib_samples, seqlen=a.calib_seqlen),
                         device="cuda", probe_only=True)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, sites = peak_sites(snap)
    mib = 1 << 20
    out = {"peak_trace_mib": peak / mib, "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / mib,
           "plan_peak_mib": res.plan.peak_device / mib, "plan": {k: v / mib for k, v in res.plan.__dict__.items()
                                                                  if isinstance(v, int) and v > mib},
           "sites_mib": {k: round(v / mib, 1) for k, v in list(sites.items())[:30]}}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
