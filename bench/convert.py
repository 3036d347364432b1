#!/usr/bin/env python3
"""Benchmark: `lmkiln convert hf-to-engine` throughput and peak RSS against plain `cp -r`.

At bench time this writes a synthetic, random-weight Hugging Face LlamaForCausalLM
checkpoint (fp16, ~2 GB by default, sharded `model-0000x-of-0000y.safetensors` plus
`model.safetensors.index.json` and `config.json`; no tokenizer), one shard at a time so
the bench itself never holds the model. Then it times, alternating and repeated:

  cp          `cp -r SRC DST` (the baseline the target is stated against)
  cp+sync     `cp -r SRC DST` then `sync DST/*` (same durability as the converter, which
              fsyncs every weight file it writes; a reference row, not the target)
  convert     `python -m lmkiln convert hf-to-engine SRC -o DST --force`
  convert tp2 the same with `--tp 2`
  import torch `python -c "import torch"` (with --floor): the fixed cost before a converter's first byte
  durable write  (with --floor) the source's byte count written with O_DIRECT from one buffer, then
              fsynced: the disk's floor for any converter whose output survives a crash
  tokenizer class  (with --floor) resolving the bundled tokenizer's class with transformers, as
              `convert` does for a checkpoint that carries a tokenizer (transformers imports torch)

  convert (with tokenizer)  (with --with-tokenizer) `convert` of the same weights (hard links) beside
              the bundled tokenizer's files, as a real checkpoint carries them: it then also resolves
              the tokenizer class (in a thread, during the copy)

Each command is a child process reaped with os.wait4, whose rusage gives the child's
own peak RSS (ru_maxrss, KiB on Linux) and CPU time. A sampler thread also polls the
child's /proc/PID/status to split the peak into anonymous memory (RssAnon: what the
process really allocates) and file-backed pages (RssFile: memory-mapped input that the
kernel can drop at will), since ru_maxrss counts both.

The page cache cannot be dropped without root, so every variant runs once as a
warm-up first and all measured runs are warm-cache (source files resident in RAM);
`sync` is called before each run (outside the timing) so no run pays for the previous
run's dirty pages. Target (product issue): convert >= 0.5x cp throughput, peak RSS
well under the model size.

On a VM with free page reporting (virtio-balloon), memory that sat free for a few seconds
is handed back to the host, and touching it again costs a host fault per page: a `cp`
(2 GB of new page cache) then takes several times as long as right after another run
freed memory. `--memory cold` waits before every run until the host has taken back all it will, so
every variant starts as on a machine that sat idle; `--memory hot` has a child touch and
free more than the model's size right before every run, so every variant starts on
memory the guest still holds. (The default runs each variant however the previous left
memory, which is not the same for all: the variant after `cp` reuses the pages `cp`
freed.)

    .venv/bin/python bench/convert.py                 # ~2 GB, 3 repeats
    .venv/bin/python bench/convert.py --size-gb 0.3 --repeats 1 --json out.json
    .venv/bin/python bench/convert.py --memory cold    # every run starts on memory the host took back
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


from common import TOKENIZER_FILES, llama_tensors, machine as _machine

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "src" / "assets" / "stories260K"
GB = 1e9
MB = 1e6

# A scaled Llama: head_dim 128, GQA 16/4, SwiGLU 5632 (TinyLlama-1.1B's shape); the layer
# count is chosen to reach --size-gb.
SHAPE = dict(hidden=2048, heads=16, kv_heads=4, inter=5632, vocab=32000)


# -- synthetic checkpoint ----------------------------------------------------------------

def nbytes(shape: tuple[int, ...], itemsize: int = 2) -> int:
    return math.prod(shape) * itemsize


def layers_for(size_bytes: float) -> int:
    one = sum(nbytes(s) for _, s in llama_tensors(**SHAPE, layers=1))
    zero = sum(nbytes(s) for _, s in llama_tensors(**SHAPE, layers=0))
    return max(1, round((size_bytes - zero) / (one - zero)))


def hf_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": SHAPE["hidden"],
        "num_attention_heads": SHAPE["heads"],
        "num_key_value_heads": SHAPE["kv_heads"],
        "head_dim": SHAPE["hidden"] // SHAPE["heads"],
        "intermediate_size": SHAPE["inter"],
        "num_hidden_layers": layers,
        "vocab_size": SHAPE["vocab"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
    }


def write_synthetic_llama(out: Path, size_gb: float, shard_gb: float, seed: int) -> dict:
    """Write the checkpoint shard by shard; returns a description (reused if it matches).

    Run in a child process (see `generate`): torch and the shard buffers must not inflate
    the bench process, whose RSS at fork time would otherwise leak into every child's
    ru_maxrss (Linux carries the pre-exec high-water mark over an exec).
    """
    import torch
    from safetensors.torch import save_file

    layers = layers_for(size_gb * GB)
    desc = {"shape": SHAPE, "layers": layers, "shard_gb": shard_gb, "seed": seed, "dtype": "float16"}
    stamp = out / ".bench-synthetic.json"
    if stamp.is_file() and json.loads(stamp.read_text())["desc"] == desc:
        return json.loads(stamp.read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tensors = llama_tensors(**SHAPE, layers=layers)
    # Plan the shards first (names only) so file names can carry the shard count.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        if shards[-1] and used + nbytes(shape) > shard_gb * GB:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes(shape)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        sd = {}
        for name, shape in shard:
            if len(shape) == 1:  # RMSNorm weights: around 1, like a trained model's
                t = 1.0 + 0.02 * torch.randn(shape, generator=g)
            else:
                t = torch.randn(shape, generator=g).mul_(0.02)
            sd[name] = t.to(torch.float16)
            weight_map[name] = fname
            total += nbytes(shape)
        save_file(sd, str(out / fname), metadata={"format": "pt"})
        del sd
        print(f"  wrote {fname} ({len(shard)} tensors)", file=sys.stderr, flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config(layers), indent=2))
    info = {"desc": desc, "params": total // 2, "weight_bytes": total, "shards": len(shards)}
    stamp.write_text(json.dumps(info))
    return info


def generate(src: Path, size_gb: float, shard_gb: float, seed: int) -> dict:
    """write_synthetic_llama in a child process, so the bench process stays small."""
    subprocess.run([sys.executable, __file__, "--_generate", str(src), str(size_gb), str(shard_gb), str(seed)], check=True)
    return json.loads((src / ".bench-synthetic.json").read_text())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith(".bench"))


# -- measuring a child -------------------------------------------------------------------

def _status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
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


def cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) clock ticks of the whole machine so far, from /proc/stat."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def run_child(argv: list[str], log) -> dict:
    """Run argv; wall seconds, peak RSS (ru_maxrss), CPU seconds, sampled peak RssAnon/RssFile."""
    busy0, steal0 = cpu_jiffies()
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in _status_kib(p.pid, ("RssAnon", "RssFile")).items():
                peaks[k] = max(peaks[k], v)
            done.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    busy1, steal1 = cpu_jiffies()
    done.set()
    th.join()
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    if p.returncode != 0:
        raise SystemExit(f"command failed (exit {p.returncode}): {' '.join(argv)}; see {log.name}")
    cpu = ru.ru_utime + ru.ru_stime
    return {
        "wall_s": wall,
        "maxrss_kib": ru.ru_maxrss,
        "cpu_s": cpu,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        # CPU that other processes used meanwhile (the sampler thread's share is negligible);
        # on a shared machine this is what makes one run slower than the next.
        "others_cpu_s": max(0.0, (busy1 - busy0) / HZ - cpu),
        "steal_s": (steal1 - steal0) / HZ,
        "peak_rss_anon_kib": peaks["RssAnon"],
        "peak_rss_file_kib": peaks["RssFile"],
    }


def evict(path: Path) -> None:
    """Drop a (synced) tree's pages from the page cache; needs no root, unlike drop_caches."""
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def settle(seconds: float = 1.0) -> None:
    """Before a timed run: no dirty pages pending, and a moment for background writeback to stop."""
    os.sync()
    time.sleep(seconds)
    os.sync()


# Free page reporting (virtio-balloon): the guest hands free memory back to the host in 2 MiB blocks a few
# seconds after it is freed, and touching such a page again costs a host fault and zeroing. On this bench's
# VM that alone moved `cp` of 2 GB between 0.6 s (pages freed moments before) and 3.6-4.1 s (after 10-30 s
# idle; 1.6 s an hour later): the yardstick depends on how long memory sat free (--memory) and on the host.
REPORTED = Path("/sys/module/page_reporting/parameters/reported_kib")


def host_reclaimed_kib() -> int | None:
    """KiB of free memory handed back to the host so far, or None where the kernel does not report."""
    try:
        return int(REPORTED.read_text())
    except (OSError, ValueError):
        return None


def wait_cold(still_s: float = 3.0, limit_s: float = 60.0) -> None:
    """Wait until the host has taken back what it will (the counter still for `still_s`): every run then
    starts as on a machine that sat idle, whose free memory the host holds."""
    deadline, last, since = time.monotonic() + limit_s, host_reclaimed_kib(), time.monotonic()
    while last is not None and time.monotonic() < deadline and time.monotonic() - since < still_s:
        time.sleep(0.5)
        now = host_reclaimed_kib()
        if now != last:
            last, since = now, time.monotonic()


def touch_and_free(n: int) -> None:
    """Have a child touch n bytes and exit: the next run's allocations reuse those just-freed pages,
    before the host takes them back (it waits a few seconds)."""
    subprocess.run([sys.executable, "-c", f"b = bytearray({n})"], check=True)


def run_variant(steps: list[list[str]], log) -> dict:
    """Run commands one after another as one measurement: wall and CPU add, peaks take the max."""
    parts = [run_child(a, log) for a in steps]
    return {
        **{k: sum(r[k] for r in parts) for k in ("wall_s", "cpu_s", "user_s", "sys_s", "others_cpu_s", "steal_s")},
        **{k: max(r[k] for r in parts) for k in ("maxrss_kib", "peak_rss_anon_kib", "peak_rss_file_kib")},
    }



def machine() -> dict:
    return _machine("torch")


# -- the bench -----------------------------------------------------------------------------

DURABLE_WRITE = """
import errno, mmap, os
os.mkdir({path!r})
buf = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
buf.write(bytes(range(256)) * (1 << 16))
fd = os.open(os.path.join({path!r}, "blob"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_DIRECT", 0))
done = 0
while done < {nbytes}:
    try:
        done += os.write(fd, buf)  # whole buffers (O_DIRECT writes whole blocks), cut to size below
    except OSError as e:  # a file system that refuses O_DIRECT: through the page cache, as the converter falls back
        if e.errno != errno.EINVAL:
            raise
        import fcntl
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~getattr(os, "O_DIRECT", 0))
os.ftruncate(fd, {nbytes})
os.fsync(fd)
os.close(fd)
"""


def variants(src: Path, work: Path, tps: list[int], baseline: Path | None = None,
             floor: bool = False, tok_src: Path | None = None) -> dict[str, tuple[Path | None, list[list[str]]]]:
    v = {}
    if floor:  # what any converter that imports torch pays before its first byte (no output)
        v["import torch"] = (None, [[sys.executable, "-c", "import torch"]])
        # and what resolving a tokenizer's class costs (the engine must record it: issue #14)
        v["tokenizer class"] = (None, [[sys.executable, "-c", "from lmkiln.formats.tokenizer import resolved_tokenizer_class; "
                                        f"assert resolved_tokenizer_class({str(BUNDLED)!r})"]])
        # and what the disk takes to make that many bytes durable, bypassing the page cache as the converter
        # does (O_DIRECT writes of 16 MiB from one reused buffer, then fsync): no converter whose output
        # survives a crash beats it
        dst = work / "direct"
        v["durable write"] = (dst, [[sys.executable, "-c", DURABLE_WRITE.format(path=str(dst), nbytes=dir_bytes(src))]])
    dst = work / "cp"
    v["cp"] = (dst, [["cp", "-r", str(src), str(dst)]])
    dst = work / "cp_sync"
    weight_files = [str(dst / p.name) for p in sorted(src.iterdir()) if not p.name.startswith(".")] if src.is_dir() else []
    v["cp+sync"] = (dst, [["cp", "-r", str(src), str(dst)], ["sync", *weight_files]])
    for tp in tps:
        dst = work / f"engine_tp{tp}"
        name = "convert" if tp == 1 else f"convert tp{tp}"
        cmd = lambda d: [sys.executable, "-m", "lmkiln", "convert", "hf-to-engine", str(src), "-o", str(d),  # noqa: E731
                         "--force", *(["--tp", str(tp)] if tp != 1 else [])]
        v[name] = (dst, [cmd(dst)])
        if baseline is not None:  # the same command with another lmkiln first on the path (e.g. an older src/)
            dst = work / f"engine_tp{tp}_baseline"
            v[f"{name} (baseline)"] = (dst, [["env", f"PYTHONPATH={baseline}", *cmd(dst)]])
    if tok_src is not None:
        dst = work / "engine_tokenizer"
        v["convert (with tokenizer)"] = (dst, [[sys.executable, "-m", "lmkiln", "convert", "hf-to-engine", str(tok_src),
                                                "-o", str(dst), "--force"]])
    return v


def summarize(runs: dict[str, list[dict]], src_bytes: int) -> dict[str, dict]:
    out = {}
    for name, rs in runs.items():
        med = statistics.median(r["wall_s"] for r in rs)
        out[name] = {
            "median_s": med,
            "min_s": min(r["wall_s"] for r in rs),
            "max_s": max(r["wall_s"] for r in rs),
            "gb_per_s": src_bytes / med / GB,
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "user_s": statistics.median(r["user_s"] for r in rs),
            "sys_s": statistics.median(r["sys_s"] for r in rs),
            "others_cores": statistics.median(r["others_cpu_s"] / r["wall_s"] for r in rs),
            "peak_rss_mb": max(r["maxrss_kib"] for r in rs) * 1024 / MB,
            "peak_anon_mb": max(r["peak_rss_anon_kib"] for r in rs) * 1024 / MB,
            "peak_file_mb": max(r["peak_rss_file_kib"] for r in rs) * 1024 / MB,
        }
    base = out["cp"]["gb_per_s"]
    for s in out.values():
        s["x_cp"] = s["gb_per_s"] / base
        s["rss_frac"] = s["peak_rss_mb"] * MB / src_bytes
    return out



def table(summary: dict[str, dict], repeats: int) -> str:
    rows = [
        f"| variant | median s (min–max, n={repeats}) | GB/s | × cp | CPU s (user+sys) | peak RSS MB | RSS / model "
        "| peak anon MB | peak file-mapped MB | others' load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        rows.append(
            f"| {name} | {s['median_s']:.2f} ({s['min_s']:.2f}–{s['max_s']:.2f}) | {s['gb_per_s']:.2f} | {s['x_cp']:.2f} | "
            f"{s['cpu_s']:.1f} ({s['user_s']:.1f}+{s['sys_s']:.1f}) | {s['peak_rss_mb']:.0f} | {s['rss_frac']:.2f} | "
            f"{s['peak_anon_mb']:.0f} | {s['peak_file_mb']:.0f} | {s['others_cores']:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where the synthetic model and outputs go (default: a temp dir under bench/out/)")
    ap.add_argument("--size-gb", type=float, default=2.0, help="synthetic model size in GB (1e9 bytes), fp16 (default 2)")
    ap.add_argument("--shard-gb", type=float, default=0.5, help="max shard size in GB (default 0.5)")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per variant, after one warm-up each (default 3)")
    ap.add_argument("--tp", default="1,2", help="comma-separated --tp values to convert with (default 1,2)")
    ap.add_argument("--no-cp-sync", action="store_true", help="skip the cp+sync reference row")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="also time the lmkiln package found in DIR (DIR/lmkiln, e.g. `git archive` of an older src/ "
                         "renamed lmkiln), as 'convert (baseline)' rows run with PYTHONPATH=DIR, alternating with the others")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="before measuring, wait up to S seconds for the 1-minute load average to fall below 0.3")
    ap.add_argument("--memory", choices=("as-found", "cold", "hot"), default="as-found",
                    help="the memory each run starts on (VMs with free page reporting): cold waits until the host has "
                         "taken back the free memory, as on a machine that sat idle; hot first has a child touch and free "
                         "more than the model, as right after another job; as-found (default) neither")
    ap.add_argument("--floor", action="store_true",
                    help="also time `python -c 'import torch'` (the fixed cost of any converter that imports torch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-tokenizer", action="store_true",
                    help="copy the bundled tokenizer's files into the synthetic checkpoint (as a real one carries them)")
    ap.add_argument("--json", type=Path, help="also write the summary and every run to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (a later run with the same --workdir reuses the model)")
    ap.add_argument("--_generate", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._generate:
        src, size_gb, shard_gb, seed = args._generate
        write_synthetic_llama(Path(src), float(size_gb), float(shard_gb), int(seed))
        return 0
    tps = [int(x) for x in args.tp.split(",") if x.strip()]

    if args.workdir:
        work = args.workdir.absolute()
        ours = not work.exists()  # an existing --workdir keeps whatever else it holds
        work.mkdir(parents=True, exist_ok=True)
    else:
        (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="convert-", dir=ROOT / "bench" / "out"))
        ours = True
    src = work / "hf-llama"
    log_path = work / "children.log"
    tok_src = None
    try:
        t0 = time.perf_counter()
        print(f"writing a synthetic ~{args.size_gb:g} GB fp16 Llama into {src} ...", file=sys.stderr, flush=True)
        info = generate(src, args.size_gb, args.shard_gb, args.seed)
        if args.with_tokenizer:  # the same weights (hard links, no second copy) with a tokenizer beside them
            tok_src = work / "hf-llama-tokenizer"
            shutil.rmtree(tok_src, ignore_errors=True)
            tok_src.mkdir()
            for p in src.iterdir():
                os.link(p, tok_src / p.name)
            for f in TOKENIZER_FILES:
                shutil.copyfile(BUNDLED / f, tok_src / f)
        src_bytes = dir_bytes(src)
        print(f"  {info['params'] / 1e6:.0f}M params, {info['desc']['layers']} layers, {info['shards']} shards, "
              f"{src_bytes / GB:.3f} GB on disk ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

        deadline = time.monotonic() + args.wait_idle
        while os.getloadavg()[0] >= 0.3 and time.monotonic() < deadline:
            time.sleep(5)
        load = os.getloadavg()[0]
        if load >= 0.3:
            print(f"  warning: load average {load:.2f} before measuring: other processes compete for the "
                  f"{os.cpu_count()} cores and the disk; see the others' load column", file=sys.stderr)

        plan = variants(src, work, tps, args.baseline.absolute() if args.baseline else None, args.floor, tok_src)
        if args.no_cp_sync:
            plan.pop("cp+sync")
        runs: dict[str, list[dict]] = {name: [] for name in plan}
        # Deleting a just-written 2 GB tree makes the file system free (and, on a disk mounted
        # with `discard`, trim) its blocks in the background, which slowed the *next* timed run
        # several-fold in early trials. So outputs are only moved aside during the measurements
        # and deleted at the end, when the disk has room for them all; and after each run they
        # are synced and evicted from the page cache, so memory stays as it was.
        trash = work / "done"
        shutil.rmtree(trash, ignore_errors=True)  # left by an earlier --keep run
        trash.mkdir()
        for dst, _ in plan.values():  # left by an interrupted run: cp -r would copy *into* it
            if dst is not None:
                shutil.rmtree(dst, ignore_errors=True)
        need = (args.repeats + 1) * len(plan) * src_bytes * 1.1
        keep_outputs = shutil.disk_usage(work).free > need + 2 * GB
        if not keep_outputs:
            print(f"  note: under {need / GB:.0f} GB free; deleting outputs between runs (timings get noisier)",
                  file=sys.stderr)
        with open(log_path, "a") as log:
            for rep in range(-1, args.repeats):  # -1: the warm-up round, not recorded
                for name, (dst, steps) in plan.items():
                    before = host_reclaimed_kib()
                    settle()
                    if args.memory == "cold":
                        wait_cold()
                    elif args.memory == "hot":
                        touch_and_free(int(src_bytes + GB / 2))
                    start = host_reclaimed_kib()
                    log.write(f"\n=== {name} (round {rep}) ===\n")
                    log.flush()
                    r = run_variant(steps, log)
                    # what the host took back while this run was being set up (None: not a reporting VM)
                    r["host_reclaimed_setup_kib"] = None if before is None else start - before
                    label = "warm-up" if rep < 0 else f"run {rep + 1}/{args.repeats}"
                    print(f"  {label:9} {name:12} {r['wall_s']:7.2f} s  CPU {r['cpu_s']:5.1f} s  peak RSS "
                          f"{r['maxrss_kib'] / 1024:6.0f} MiB  others' CPU {r['others_cpu_s'] / r['wall_s']:4.2f} cores",
                          file=sys.stderr, flush=True)
                    if rep >= 0:
                        runs[name].append(r)
                    os.sync()
                    if dst is None:
                        continue
                    evict(dst)
                    if keep_outputs:
                        os.rename(dst, trash / f"{dst.name}.{rep + 1}")
                    else:
                        shutil.rmtree(dst)

        summary = summarize(runs, src_bytes)
        conv = summary.get("convert") or next(v for k, v in summary.items() if k.startswith("convert"))
        mach = machine()
        print()
        print(f"Synthetic LlamaForCausalLM fp16: {info['params'] / 1e6:.0f}M params, {info['desc']['layers']} layers, "
              f"{info['shards']} shards, {src_bytes / GB:.3f} GB. Warm page cache; {args.repeats} measured runs per "
              f"variant after one warm-up each; GB/s = source bytes / median wall time.")
        print(f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['mem']} RAM; Python {mach['python']}, torch {mach['torch']}; "
              f"load average before measuring {load:.2f}; memory: {args.memory}"
              + ("" if host_reclaimed_kib() is not None else " (this kernel does not report free pages to a host)") + ".")
        print()
        print(table(summary, args.repeats))
        print()
        ok_tp = conv["x_cp"] >= 0.5
        ok_rss = conv["rss_frac"] < 0.5
        print(f"target >= 0.5x cp throughput: {'met' if ok_tp else 'NOT met'} ({conv['x_cp']:.2f}x); "
              f"peak RSS well under the model size (taken as < 0.5x): {'met' if ok_rss else 'NOT met'} "
              f"({conv['peak_rss_mb']:.0f} MB = {conv['rss_frac']:.2f}x, of which anonymous {conv['peak_anon_mb']:.0f} MB)")
        if args.json:
            args.json.write_text(json.dumps({
                "machine": mach, "load_before": load, "model": info, "source_bytes": src_bytes, "repeats": args.repeats,
                "memory": args.memory,
                "commands": {k: steps for k, (_, steps) in plan.items()},
                "summary": summary, "runs": runs,
            }, indent=2))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        elif ours:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for p in [src, work / "done", log_path,
                      *(dst for dst, _ in variants(src, work, tps, args.baseline, args.floor, tok_src).values() if dst)]:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.exists():
                    p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
