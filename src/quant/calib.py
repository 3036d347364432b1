"""Calibration text: load documents, cut reproducible token windows.

Activation-aware quantization needs a few tens of thousands of tokens of ordinary text.
The default is a bundled WikiText-2 validation excerpt (see assets/calib/README.md), so
calibration never touches the network. Everything here is deterministic given the seed,
and :attr:`CalibrationSet.sha256` fingerprints the exact token ids so a resumed run can
detect that its calibration changed. :func:`shingles` hashes token windows so `verify`
can warn when its evaluation text overlaps the calibration text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from lmkiln.errors import InputError

BUNDLED_NAME = "wikitext2_valid_excerpt.txt"
SHINGLE = 32  # tokens per shingle: long enough that a shared one means shared text
SHINGLE_STRIDE = 16  # calibration records one shingle every SHINGLE_STRIDE tokens

# A WikiText top-level heading: " = Title = " (section headings are " = = Sub = = ").
_WIKI_HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_JSONL_FIX = 'each line must be a JSON object with a "text" field'


def bundled_calibration_path() -> Path:
    """Path of the bundled WikiText-2 validation excerpt (inside the installed package)."""
    return Path(__file__).resolve().parent.parent / "assets" / "calib" / BUNDLED_NAME


def _split_txt(text: str) -> list[str]:
    """Documents of a .txt file.

    WikiText files (they have top-level ``" = Title = "`` lines) are split into whole
    articles, heading included, so a window mostly sees coherent prose. Any other text is
    split into blank-line-separated paragraphs.
    """
    starts = [m.start() for m in _WIKI_HEADING.finditer(text)]
    if starts:
        # Text before the first heading (usually just blank lines) is its own piece.
        bounds = [0, *starts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    else:
        pieces = _BLANK_LINES.split(text)
    return [p.strip() for p in pieces if p.strip()]


# Text inputs (--calib here, verify's --data and --prompts) are read whole: refuse above this rather
# than exhaust memory (a sample of a corpus is what calibration and evaluation need).
MAX_TEXT_BYTES = 2 << 30


def check_text_file(path: Path, what: str, option: str) -> None:
    """A regular file of a size that can be read whole: a device (/dev/zero) was read until the
    kernel killed the process, a named pipe blocked forever."""
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "a device, pipe or socket"
        raise InputError(f"{option} {path}: not a regular file ({kind}); pass a file of {what}")
    if path.is_file() and path.stat().st_size > MAX_TEXT_BYTES:
        raise InputError(f"{option} {path}: {path.stat().st_size / 2**30:.1f} GiB; files of {what} are read whole, so pass a sample "
                         f"under {MAX_TEXT_BYTES / 2**30:.0f} GiB")


def _read_text(path: Path) -> str:
    check_text_file(path, "calibration text", "--calib")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"cannot read calibration file {path}: {e.__class__.__name__}: {e}; "
            "pass a readable UTF-8 .txt or .jsonl file with --calib"
        ) from None


def _load_jsonl(path: Path) -> list[str]:
    return jsonl_texts(_read_text(path), path)


def jsonl_texts(text: str, path: Path) -> list[str]:
    """The non-blank "text" field of each JSON line of `text` (read from `path`), one document each."""
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); {_JSONL_FIX}"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{lineno}: no string \"text\" field; {_JSONL_FIX}")
        if record["text"].strip():
            docs.append(record["text"].strip())
    return docs


def _load_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    return _split_txt(_read_text(path))


def load_calibration_texts(path: Path | str | None = None) -> list[str]:
    """Documents for calibration, in file order.

    - ``None``: the bundled WikiText-2 validation excerpt.
    - a ``.jsonl`` file: one JSON object per line, its ``"text"`` field is a document.
    - any other file (``.txt``): split as described in :func:`_split_txt`.
    - a directory: every ``.txt`` and ``.jsonl`` file below it, recursively, sorted by path.

    Raises InputError for a missing/unreadable path, a bad jsonl line, or no text at all.
    """
    path = bundled_calibration_path() if path is None else Path(path)
    if not path.exists():
        raise InputError(
            f"calibration path {path} does not exist; "
            "pass an existing .txt/.jsonl file or directory with --calib"
        )
    if not path.is_dir():
        check_text_file(path, "calibration text", "--calib")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise InputError(
                f"calibration directory {path} has no .txt or .jsonl files; "
                "add some or pass a file with --calib"
            )
        docs = [d for f in files for d in _load_file(f)]
    else:
        docs = _load_file(path)
    if not docs:
        raise InputError(
            f"calibration path {path} contains no text; pass a non-empty .txt/.jsonl with --calib"
        )
    return docs


@dataclass(frozen=True)
class CalibrationSet:
    """``input_ids`` (n, seqlen) int64: non-overlapping windows of the shuffled corpus."""

    input_ids: torch.Tensor
    n_documents_used: int
    n_tokens: int
    seed: int
    sha256: str
    n_requested: int = 0

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    def describe(self) -> str:
        text = (
            f"{self.n_samples} sample{'' if self.n_samples == 1 else 's'} × {self.seqlen} tokens = {self.n_tokens:,} tokens "
            f"from {self.n_documents_used} document{'' if self.n_documents_used == 1 else 's'}"
        )
        if self.n_requested > self.n_samples:
            text += f" (corpus too small for the {self.n_requested} requested)"
        return text


def _fingerprint(ids: torch.Tensor) -> str:
    h = hashlib.sha256(f"{tuple(ids.shape)}".encode())
    h.update(np.ascontiguousarray(ids.numpy(), dtype="<i8").tobytes())
    return h.hexdigest()


def build_calibration_samples(
    texts: Iterable[str],
    tokenizer_encode: Callable[[str], list[int]],
    n_samples: int,
    seqlen: int,
    seed: int = 0,
) -> CalibrationSet:
    """Cut ``n_samples`` windows of ``seqlen`` tokens from the documents.

    Documents are shuffled with ``random.Random(seed)``, each is tokenized with
    ``tokenizer_encode`` (no special tokens; the caller decides about BOS), and the token
    streams are concatenated; window i is tokens ``[i*seqlen, (i+1)*seqlen)``. Documents are
    tokenized only until enough tokens exist. A corpus with fewer than
    ``n_samples * seqlen`` tokens yields as many full windows as fit (``n_requested`` keeps
    the request); one with fewer than ``seqlen`` tokens raises InputError.
    """
    if n_samples < 1 or seqlen < 1:
        raise InputError(f"calibration needs n_samples >= 1 and seqlen >= 1, got {n_samples} and {seqlen}")
    docs = list(texts)
    random.Random(seed).shuffle(docs)
    need = n_samples * seqlen
    stream: list[int] = []
    used = 0
    for doc in docs:
        if len(stream) >= need:
            break
        stream.extend(int(t) for t in tokenizer_encode(doc))
        used += 1
    n = min(n_samples, len(stream) // seqlen)
    if n < 1:
        raise InputError(
            f"calibration corpus too small: {len(stream)} tokens, need at least seqlen={seqlen}; "
            "pass a larger --calib or lower --calib-seqlen"
        )
    ids = torch.tensor(stream[: n * seqlen], dtype=torch.long).reshape(n, seqlen)
    return CalibrationSet(
        input_ids=ids,
        n_documents_used=used,
        n_tokens=n * seqlen,
        seed=seed,
        sha256=_fingerprint(ids),
        n_requested=n_samples,
    )


# -- shingles: a fingerprint of the calibration text, for verify's overlap warning ----------


def _hash(window) -> str:
    return hashlib.blake2b(np.asarray(window, dtype=np.int64).tobytes(), digest_size=8).hexdigest()


def shingles(ids, stride: int = SHINGLE_STRIDE) -> list[str]:
    """Hashes of SHINGLE-token windows every `stride` tokens (stride 1: all of them).

    Quantization records them for its calibration windows in its report; verify compares
    them with the evaluation text's (lmkiln.verify.data.overlap_tokens).
    """
    ids = list(ids)
    return [_hash(ids[i:i + SHINGLE]) for i in range(0, len(ids) - SHINGLE + 1, stride)]


def pack_shingles(hashes: list[str]) -> str:
    """The report's form of many shingle hashes: their 8-byte digests, concatenated, in
    base64 (one line, about 11 characters each, instead of a JSON line apiece)."""
    return base64.b64encode(b"".join(bytes.fromhex(h) for h in hashes)).decode("ascii")


def unpack_shingles(packed: str) -> list[str]:
    raw = base64.b64decode(packed)
    return [raw[i:i + 8].hex() for i in range(0, len(raw), 8)]

