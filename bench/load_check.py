"""What the checksum check on load costs: load an engine with and without it, side by side.

Writes a synthetic fp16 Llama (~2 GB by default, bench/convert.py's generator), converts it
to an engine once, then alternates, each in a fresh child process (page cache warm after
a first untimed round; it cannot be dropped without root):
  - hash only:     `Engine(path, check=True)` (the checksum of every weight file: blake3 for
                   format v3 engines, sha256 for older ones, e.g. with PYTHONPATH set to an
                   older lmkiln, which then also writes the engine)
  - load, --no-check: `EngineModel.from_path(path, check=False)`
  - load, checked (the default): `EngineModel.from_path(path, check=True)`, which hashes in
    a background thread while the weights are read
and prints wall and CPU seconds per variant (median of --repeats) plus the checksum's GB/s.

    .venv/bin/python bench/load_check.py                        # ~2 GB, 3 repeats
    .venv/bin/python bench/load_check.py --size-gb 0.3 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = {
    "hash only": "from lmkiln.formats.engine import Engine; Engine(P, check=True)",
    "load, --no-check": "import torch; from lmkiln.runtime.engine_model import EngineModel; EngineModel.from_path(P, torch.float32, check=False)",
    "load, checked (default)": "import torch; from lmkiln.runtime.engine_model import EngineModel; EngineModel.from_path(P, torch.float32, check=True)",
}
# What importing costs alone, subtracted so the rows compare the work itself.
IMPORT = "import torch; from lmkiln.runtime.engine_model import EngineModel"


def child(code: str, engine: Path) -> dict:
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", f"P = {str(engine)!r}\n{code}"], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.perf_counter() - t0,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="lmkiln-load-check-", dir=HERE / "out"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from convert import generate

        hf, engine = work / "hf", work / "engine"
        if not (hf / "config.json").is_file():
            generate(hf, a.size_gb, 0.5, 0)  # in a child process, as bench/convert.py does
        if not (engine / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "lmkiln", "convert", "hf-to-engine", str(hf), "-o", str(engine), "--force"],
                           check=True, stdout=subprocess.DEVNULL)
        size = sum(p.stat().st_size for p in engine.glob("*.safetensors"))
        for code in (IMPORT, *CHILD.values()):  # warm the page cache and the imports
            child(code, engine)
        runs: dict[str, list[dict]] = {k: [] for k in ("import only", *CHILD)}
        for _ in range(a.repeats):
            runs["import only"].append(child(IMPORT, engine))
            for name, code in CHILD.items():
                runs[name].append(child(code, engine))
        imp = statistics.median(r["wall_s"] for r in runs["import only"])
        rows = {}
        for name, rs in runs.items():
            wall = statistics.median(r["wall_s"] for r in rs)
            rows[name] = {"wall_s": round(wall, 2), "cpu_s": round(statistics.median(r["cpu_s"] for r in rs), 2),
                          "minus_import_s": round(wall - imp, 2)}
        algo = "/".join(sorted({k for meta in json.loads((engine / "manifest.json").read_text())["files"].values()
                                for k in meta if k != "size"}))
        rows["hash only"]["checksum_gb_s"] = round(size / 1e9 / max(rows["hash only"]["minus_import_s"], 1e-9), 3)
        out = {"engine_bytes": size, "checksum": algo, "repeats": a.repeats, "loadavg": os.getloadavg(), "rows": rows,
               "date": time.strftime("%Y-%m-%d")}
        print(f"engine {size / 1e9:.2f} GB, median of {a.repeats}, load average {os.getloadavg()[0]:.2f}")
        print("| variant | wall s | minus imports s | CPU s |\n|---|---:|---:|---:|")
        for name, r in rows.items():
            print(f"| {name} | {r['wall_s']} | {r['minus_import_s']} | {r['cpu_s']} |")
        print(f"{algo}: {rows['hash only']['checksum_gb_s']} GB/s")
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
