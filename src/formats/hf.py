"""Reading Hugging Face checkpoint directories, lazily and defensively.

A checkpoint is `config.json` plus either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Every safetensors header is validated before any
tensor is read, the index and the files must agree exactly, and tensors are read one
at a time (pread of their byte spans), so a reader never holds the model. Each weight
file stays open from its header's reading on: a model replaced while it is read (another
run writing it with --force) is read whole as it was, never half old, half new. Pickle checkpoints
(`pytorch_model*.bin`) can execute code when loaded; they are refused unless the user
opts in, and then loaded with `weights_only=True`. Remote code is never run.
"""

from __future__ import annotations

import errno
import json
import os
import weakref
from pathlib import Path

import torch

from lmkiln.errors import CheckpointError, InputError
from lmkiln.formats.engine import headless_engine, missing_manifest
from lmkiln.formats.safetensors_io import DTYPES, read_header

# Files that describe how to tokenize and prompt the model; every output carries them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# At least one of these holds a tokenizer's vocabulary (the rest configure it).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(d: Path) -> bool:
    """Whether directory d holds a tokenizer's vocabulary (one of VOCAB_FILES)."""
    return any((Path(d) / n).is_file() for n in VOCAB_FILES)

# lmkiln's quantization report beside its AWQ-GEMM / compressed-tensors outputs and engines (and carried
# into the engines converted from them): calibration (verify's overlap check), layers, padding written
QUANT_REPORT = "lmkiln_quant_report.json"


def ffn_padding(d: Path) -> tuple[int, int] | None:
    """(source, written): the FFN width a model had before lmkiln zero-padded it to whole groups, and the
    padded one config.json says (which other tools load), from the report beside its output; or None."""
    try:
        pad = json.loads((Path(d) / QUANT_REPORT).read_text())["padding"]["intermediate_size"]
        return int(pad["source"]), int(pad["written"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} must be a JSON object")
    return data


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in floating-point `t`. Its smallest and largest values are finite only then (both
    propagate NaN): one pass, no temporary, ~5 GB/s a core, where `isfinite(t).all()` makes a mask
    and runs at ~0.4 GB/s; `convert` scans every weight with it."""
    if t.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())  # (one host sync on a GPU)


class HFCheckpoint:
    """A validated, lazily read Hugging Face model directory."""

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such directory")
        if not self.path.is_dir():
            raise InputError(f"{self.path}: not a directory (pass the model directory that holds config.json)")
        if not (self.path / "config.json").exists():
            if headless_engine(self.path):
                raise InputError(missing_manifest(self.path))
            raise InputError(f"{self.path}: no config.json here; is this a Hugging Face model directory?")
        self.config = read_json(self.path / "config.json", "config.json")
        self._spans: dict[str, object] = {}  # name -> validated TensorInfo (byte span in its file)
        self._fds: dict[str, int] = {}  # file name -> descriptor, open from its header's reading on
        weakref.finalize(self, _close_all, self._fds)
        self._pickle_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.weight_map: dict[str, str] = {}  # tensor name -> file name
        self._shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._finite: set[str] = set()  # tensors `check_finite` passed: a second reader need not scan them again
        self.is_pickle = False
        # transformers' order: a model.safetensors beside an index wins (a stale consolidated copy or a
        # stale shard set would otherwise make lmkiln and the reference runner read different weights)
        if (self.path / "model.safetensors").exists():
            self._add_file("model.safetensors", None)
        elif (self.path / SAFETENSORS_INDEX).exists():
            self._load_sharded()
        elif any((self.path / n).exists() for n in PICKLE_NAMES) or list(self.path.glob("pytorch_model-*.bin")):
            if not allow_pickle:
                raise InputError(
                    f"{self.path}: only pickle (.bin) weights found; pickle can run arbitrary code when loaded. "
                    "Save them as safetensors (transformers: save_pretrained(..., safe_serialization=True)), which every "
                    "command reads; convert, inspect and generate also take --allow-pickle (torch.load(weights_only=True))"
                )
            self._load_pickle()
        else:
            loose = sorted(p.name for p in self.path.glob("*.safetensors"))
            if loose:
                raise CheckpointError(f"{self.path}: safetensors shards {loose[:3]} but no {SAFETENSORS_INDEX} saying which tensor lives where")
            raise InputError(f"{self.path}: no model weights (model.safetensors or {SAFETENSORS_INDEX})")

    # -- discovery -----------------------------------------------------------------

    def _add_file(self, fname: str, expected: set[str] | None) -> None:
        fpath = self.path / fname
        if not fpath.exists():
            raise CheckpointError(f"{self.path}: the index lists {fname} but the file is missing")
        try:
            fd = self._fds[fname] = os.open(fpath, os.O_RDONLY | os.O_NONBLOCK)  # (a FIFO: refused below, not waited on)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise InputError(f"{fpath}: too many open files ({len(self._fds)} weight files open); raise the limit "
                                 "(`ulimit -n`)") from None
            raise
        tensors, _ = read_header(fpath, fd)  # through the kept descriptor: the header describes the bytes read later
        if expected is not None and set(tensors) != expected:
            extra = sorted(set(tensors) - expected)
            missing = sorted(expected - set(tensors))
            raise CheckpointError(
                f"{fpath}: disagrees with {SAFETENSORS_INDEX} (in file, not in index: {extra[:3]}; "
                f"in index, not in file: {missing[:3]}); the download is incomplete or mixed"
            )
        for name, info in tensors.items():
            if name in self.weight_map:
                raise CheckpointError(f"{self.path}: tensor {name!r} appears in both {self.weight_map[name]} and {fname}")
            self.weight_map[name] = fname
            self._shapes[name] = (info.shape, DTYPES[info.dtype])
            self._spans[name] = info

    def _load_sharded(self) -> None:
        index = read_json(self.path / SAFETENSORS_INDEX, SAFETENSORS_INDEX)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{self.path / SAFETENSORS_INDEX}: no weight_map")
        by_file: dict[str, set[str]] = {}
        for name, fname in wm.items():
            by_file.setdefault(fname, set()).add(name)
        for fname in sorted(by_file):
            self._add_file(fname, by_file[fname])

    def _load_pickle(self) -> None:
        self.is_pickle = True
        idx = self.path / "pytorch_model.bin.index.json"
        if idx.exists():
            files = sorted(set(read_json(idx, idx.name).get("weight_map", {}).values()))
        else:
            files = ["pytorch_model.bin"]
        for fname in files:
            try:
                sd = torch.load(self.path / fname, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad pickle
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""  # torch's are paragraphs
                raise CheckpointError(f"{self.path / fname}: cannot load with weights_only=True ({type(e).__name__}: {first}); "
                                      "it holds more than tensors (code a pickle may run): get safetensors weights") from None
            self._pickle_cache[fname] = sd
            for name, t in sd.items():
                self.weight_map[name] = fname
                self._shapes[name] = (tuple(t.shape), t.dtype)

    # -- access --------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._shapes[name][1]

    def check_finite(self, name: str, t: torch.Tensor, where: str = "") -> None:
        """Refuse tensor `name` (already read, on any device, unmodified) if it holds NaN or Inf, naming it.
        Each is scanned once: quantize's output sink reads the embedding and head its driver checked."""
        if name in self._finite:
            return
        if t.is_floating_point() and not all_finite(t):
            raise InputError(f"{self.path}: tensor {name!r} ({where + ', ' if where else ''}shape {tuple(t.shape)}) contains "
                             "NaN or Inf values; the checkpoint is damaged or was saved from a diverged run")
        self._finite.add(name)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read into its own buffer.

        Reading the validated byte span with pread (rather than keeping every shard
        memory-mapped) keeps resident memory to the tensors in use: mapped pages count
        as RSS and, over a whole conversion, added up to the model's size."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} not in the checkpoint")
        fname = self.weight_map[name]
        if self.is_pickle:
            return self._pickle_cache[fname][name]
        info = self._spans[name]
        shape, dtype = self._shapes[name]
        out = torch.empty(shape, dtype=dtype)
        if info.nbytes == 0:
            return out
        buf = out.view(-1).view(torch.uint8).numpy()
        got = 0
        while got < info.nbytes:
            n = os.preadv(self._fds[fname], [memoryview(buf)[got:]], info.begin + got)
            if n <= 0:
                raise CheckpointError(f"{self.path / fname}: file ended inside tensor {name!r}; it changed while reading")
            got += n
        return out

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise InputError(f"{self.path / 'config.json'}: no 'architectures' entry; cannot tell which model this is")
        if not isinstance(archs, list) or not isinstance(archs[0], str):
            raise InputError(f"{self.path / 'config.json'}: 'architectures' must be a list of class names, "
                             f'e.g. ["LlamaForCausalLM"], not {archs!r}')
        return archs[0]

    @property
    def generation_config(self) -> dict:
        """generation_config.json ({} when absent): transformers' generate stops on its eos_token_id list,
        which can name more ids than config.json (Llama 3 Instruct adds <|eot_id|> there)."""
        p = self.path / "generation_config.json"
        return read_json(p, "generation_config.json") if p.exists() else {}

    @property
    def source_dtype(self) -> torch.dtype:
        """The dtype of the floating-point weights (the most common one)."""
        counts: dict[torch.dtype, int] = {}
        for shape, dt in self._shapes.values():
            if dt.is_floating_point:
                n = 1
                for d in shape:
                    n *= d
                counts[dt] = counts.get(dt, 0) + n
        return max(counts, key=counts.get) if counts else torch.float32

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def weight_files(self) -> list[Path]:
        return [self.path / f for f in sorted(set(self.weight_map.values()))]
