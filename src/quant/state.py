"""The resume state of a quantize run: what a crashed or interrupted run leaves behind
so that `--resume` continues after the last finished layer with bit-identical output.

Layout, inside the output's partial directory (`.NAME.lmkiln-partial/state/`):
- `fingerprint.json`: model, calibration, options, compute dtype/device kind, version;
  a resume with any of them changed is refused.
- `layer{i}.safetensors`: layer i's result in AWQ-GEMM naming (packed codes, fp16
  scales, zeros; the layer's fp tensors), written last and atomically: its presence
  marks the layer done. The packing round-trips bit-exactly (formats/awq_gemm.py).
- `layer{i}.json`: layer i's report.
- `NAME.blake3` beside `layer{i}.safetensors` and `hidden{i}.pt`: the file's blake3, written
  before the file is renamed into place and checked when a resume reads it.
- `hidden{i}.pt`: the input of layer i+1 (AWQ only), kept until layer i+1 is done. The
  single-process driver writes it with layer i, the Ray driver before it submits layer
  i+1; either way an interrupt at any point leaves a consistent state, and every layer
  not yet done has its input here (or is layer 0, whose input is the embedding).

It knows nothing of drivers or sinks: a driver saves results in any order it likes,
and `done()` counts the finished prefix.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmkiln.errors import InputError
from lmkiln.formats.awq_gemm import AwqSpec, read_qlinear
from lmkiln.formats.safetensors_io import file_digest
from lmkiln.quant.job import LayerResult


def _replace_durably(tmp: Path, path: Path) -> None:
    """Rename tmp over path once its bytes are on disk: after a power loss a state file is
    either absent or whole, never a name over bytes that were still in the page cache."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _atomic_save(tensors: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    _seal(tmp, path)


def _seal(tmp: Path, path: Path) -> None:
    """Rename tmp over path with its blake3 beside it (`path.blake3`, written first): a resume
    then refuses a state file whose bytes changed (a flipped bit loaded fine and gave other
    output, where --resume promises bit-identical)."""
    _atomic_write_text(_sum_file(path), file_digest(tmp, "blake3"))
    _replace_durably(tmp, path)


def _sum_file(path: Path) -> Path:
    return path.with_name(path.name + ".blake3")


def _check_sum(path: Path) -> None:
    """Raise ValueError (one of DAMAGED) if path's bytes are not those its checksum was taken of."""
    try:
        want = _sum_file(path).read_text().strip()
    except FileNotFoundError:  # a state written before checksums (same lmkiln version otherwise): nothing to check
        return
    if file_digest(path, "blake3") != want:
        raise ValueError("its blake3 checksum does not match: the file changed after it was written")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    _replace_durably(tmp, path)


# What reading a damaged state file raises (truncated safetensors / JSON / torch.save, a missing tensor).
DAMAGED = (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError, EOFError)


def finished_layers(partial: Path) -> int:
    """How many layers, from the first, a partial run at `partial` has finished (0: none, or no such run)."""
    i = 0
    while (Path(partial) / "state" / f"layer{i}.safetensors").exists():
        i += 1
    return i


class ResumeState:
    def __init__(self, partial: Path, fingerprint: dict, resume: bool, info=lambda s: None, force: bool = False):
        """The state at `partial`. A partial run with finished layers is continued (`resume`, if its
        fingerprint matches), discarded (`force`), or refused: finished layers are hours of work on
        a big model, and a plain re-run after a crash (no "--resume" hint there) threw them away."""
        self.dir = Path(partial) / "state"
        self.fingerprint = fingerprint
        # every finished layer, not just the prefix: a --ray run finishes them out of order, and resumes all
        done = len(list(self.dir.glob("layer*.safetensors")))
        if Path(partial).exists() and not done:  # killed before any layer finished: nothing to keep or check
            shutil.rmtree(partial)
            if resume:
                info("the partial run had finished no layer; starting from the first layer")
        elif Path(partial).exists():
            if resume:
                try:
                    old = json.loads((self.dir / "fingerprint.json").read_text())
                except (OSError, json.JSONDecodeError):
                    raise InputError(f"{partial}: the partial run has no readable fingerprint; run with --force instead of --resume "
                                     "to start over") from None
                diff = []
                for k in fingerprint:
                    if old.get(k) != fingerprint[k]:
                        a, b = old.get(k), fingerprint[k]
                        sub = [f"{k}.{s}" for s in b if a.get(s) != b[s]] if isinstance(a, dict) and isinstance(b, dict) else []
                        diff += sub or [k]  # name the option, not just "options"
                if diff:
                    raise InputError(f"cannot resume from {partial}: the {' and '.join(diff)} changed since it started; "
                                     "run with --force instead of --resume to start over")
            elif force:
                shutil.rmtree(partial)
                info(f"discarded the {done} finished layer(s) of an earlier, interrupted run (--force)")
            else:
                raise InputError(f"{partial}: an earlier run of this output was interrupted after {done} finished layer(s); "
                                 "pass --resume to continue after them, or --force to discard them and start over")
        elif resume:
            info("nothing to resume; starting from the first layer")
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.dir / "fingerprint.json", json.dumps(fingerprint, indent=1))

    def _layer(self, i: int) -> Path:
        return self.dir / f"layer{i}.safetensors"

    def done(self, n_layers: int) -> int:
        """How many layers, from the first, are finished."""
        return min(n_layers, finished_layers(self.dir.parent))

    def is_done(self, i: int) -> bool:
        return self._layer(i).exists()

    def save_hidden(self, i: int, hidden: torch.Tensor) -> None:
        """The input of layer i + 1; kept until layer i + 1 is saved."""
        tmp = self.dir / "hidden.tmp"
        torch.save(hidden.cpu() if hidden.device.type != "cpu" else hidden, tmp)
        _seal(tmp, self.dir / f"hidden{i}.pt")

    def save(self, res: LayerResult, module_of, hidden: torch.Tensor | None = None) -> None:
        """Persist a finished layer; `module_of(role, i)` names its HF linear module.
        `hidden`: its output, when the driver has not saved it already."""
        if hidden is not None:
            self.save_hidden(res.index, hidden)
        tensors = dict(res.fp)
        for role in res.qtensors:
            module = module_of(role, res.index)
            tensors.update({f"{module}.{k}": v for k, v in res.awq_gemm(role).items()})
        _atomic_write_text(self.dir / f"layer{res.index}.json", json.dumps(res.report))
        _atomic_save(tensors, self._layer(res.index))  # last: its presence marks the layer done
        for old in (self.dir / f"hidden{res.index - 1}.pt", _sum_file(self.dir / f"hidden{res.index - 1}.pt")):
            old.unlink(missing_ok=True)

    def load(self, i: int, spec: AwqSpec, linears: dict[str, tuple[str, tuple[int, int]]]) -> LayerResult:
        """Layer i as saved; `linears`: role -> (HF module, (out, in)) of its quantized linears."""
        try:
            _check_sum(self._layer(i))
            with safe_open(str(self._layer(i)), framework="pt") as f:
                names = set(f.keys())
                qts = {role: read_qlinear(f.get_tensor, module, spec, *shape) for role, (module, shape) in linears.items()}
                quantized = {f"{m}.{s}" for m, _ in linears.values() for s in ("qweight", "qzeros", "scales")}
                fp = {n: f.get_tensor(n) for n in sorted(names - quantized)}
            report = json.loads((self.dir / f"layer{i}.json").read_text())
        except DAMAGED as e:
            raise self._damaged(f"layer {i}", e) from None
        return LayerResult(i, qts, fp, report)

    def hidden(self, i: int) -> torch.Tensor:
        """The saved input of layer i + 1."""
        try:
            _check_sum(self.dir / f"hidden{i}.pt")
            return torch.load(self.dir / f"hidden{i}.pt", weights_only=True)
        except DAMAGED as e:
            raise self._damaged(f"the input of layer {i + 1}", e) from None

    def _damaged(self, what: str, e: Exception) -> InputError:
        return InputError(f"{self.dir.parent}: the resume state of {what} is damaged ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else 'unreadable'}); run with --force instead of --resume to start over")
