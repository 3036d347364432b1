"""Calibration text loading and reproducible sampling."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lmkiln.errors import InputError
from lmkiln.quant.calib import (
    CalibrationSet,
    build_calibration_samples,
    bundled_calibration_path,
    load_calibration_texts,
)


class WordTokenizer:
    """Deterministic whitespace tokenizer: ids assigned in order of first appearance."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _docs(n=20, words=50):
    return [" ".join(f"doc{i}word{j}" for j in range(words)) for i in range(n)]


# --- loading ---------------------------------------------------------------------------


def test_txt_paragraphs(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first paragraph\nstill first\n\nsecond one\n  \n\n\nthird\n", encoding="utf-8")
    assert load_calibration_texts(p) == ["first paragraph\nstill first", "second one", "third"]


def test_txt_wikitext_articles(tmp_path):
    p = tmp_path / "wiki.txt"
    p.write_text(
        " \n = Alpha = \n \n Alpha text . \n \n = = Section = = \n \n More alpha . \n"
        " \n = Beta = \n \n Beta text . \n",
        encoding="utf-8",
    )
    docs = load_calibration_texts(str(p))
    assert len(docs) == 2  # section headings do not split articles
    assert docs[0].startswith("= Alpha =") and "More alpha" in docs[0]
    assert docs[1].startswith("= Beta =")


def test_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(
        json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n"
        + json.dumps({"text": "   "}) + "\n",
        encoding="utf-8",
    )
    assert load_calibration_texts(p) == ["one", "two"]


@pytest.mark.parametrize(
    "line, what",
    [('{"content": "x"}', "text"), ("not json", "JSON"), ('{"text": 3}', "text"), ("[1]", "text")],
)
def test_bad_jsonl_names_line(tmp_path, line, what):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"bad.jsonl:2: .*{what}"):
        load_calibration_texts(p)


def test_directory_sorted_recursive(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from z", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "from a"}) + "\n", encoding="utf-8")
    (tmp_path / "b" / "c.txt").write_text("from c\n\nc two", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not me", encoding="utf-8")
    assert load_calibration_texts(tmp_path) == ["from a", "from c", "c two", "from z"]


def test_missing_empty_and_unreadable(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_calibration_texts(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n  \n", encoding="utf-8")
    with pytest.raises(InputError, match="no text"):
        load_calibration_texts(empty)
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="no .txt or .jsonl"):
        load_calibration_texts(tmp_path / "d")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="cannot read"):
        load_calibration_texts(binary)


# --- sampling --------------------------------------------------------------------------


def test_samples_shape_and_fields():
    cs = build_calibration_samples(_docs(), byte_encode, n_samples=8, seqlen=64, seed=0)
    assert isinstance(cs, CalibrationSet)
    assert cs.input_ids.dtype == torch.long and cs.input_ids.shape == (8, 64)
    assert cs.n_tokens == 512 and cs.seed == 0 and cs.n_requested == 8
    assert 1 <= cs.n_documents_used <= 20
    assert len(cs.sha256) == 64
    assert cs.describe() == "8 samples × 64 tokens = 512 tokens from 1 document"  # not "1 documents" (make demo said so)
    many = build_calibration_samples(_docs(words=4), byte_encode, n_samples=2, seqlen=64, seed=0)
    assert many.n_documents_used > 1 and many.describe().endswith(f"from {many.n_documents_used} documents")



def test_windows_are_consecutive_non_overlapping():
    docs = ["a b c d e", "f g h i j", "k l m n o"]
    tok = WordTokenizer()
    cs = build_calibration_samples(docs, tok, n_samples=3, seqlen=4, seed=1)
    stream = cs.input_ids.reshape(-1).tolist()
    assert len(set(stream)) == 12  # no token repeated: windows don't overlap
    assert cs.n_documents_used == 3


def test_deterministic_by_seed():
    docs = _docs()
    a = build_calibration_samples(docs, byte_encode, 8, 64, seed=0)
    b = build_calibration_samples(list(docs), byte_encode, 8, 64, seed=0)
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    c = build_calibration_samples(docs, byte_encode, 8, 64, seed=1)
    assert not torch.equal(a.input_ids, c.input_ids) and a.sha256 != c.sha256
    assert docs == _docs()  # the caller's list is not shuffled in place


def test_sha_covers_shape():
    docs = _docs()
    a = build_calibration_samples(docs, byte_encode, 4, 32, seed=0)
    b = build_calibration_samples(docs, byte_encode, 2, 64, seed=0)
    assert torch.equal(a.input_ids.reshape(-1), b.input_ids.reshape(-1))
    assert a.sha256 != b.sha256


def test_short_corpus_uses_full_windows():
    cs = build_calibration_samples(["x" * 250], byte_encode, n_samples=10, seqlen=100)
    assert cs.input_ids.shape == (2, 100) and cs.n_requested == 10 and cs.n_tokens == 200
    assert "10 requested" in cs.describe()


def test_too_small_corpus():
    with pytest.raises(InputError, match=r"too small: 99 tokens, need at least seqlen=100"):
        build_calibration_samples(["x" * 99], byte_encode, n_samples=4, seqlen=100)
    with pytest.raises(InputError):
        build_calibration_samples(["abc"], byte_encode, n_samples=0, seqlen=2)


def test_bundled_excerpt():
    path = bundled_calibration_path()
    assert path.is_file() and path.parent.name == "calib" and path.parents[1].name == "assets"
    readme = (path.parent / "README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(path.read_bytes()).hexdigest() in readme
    assert "CC BY-SA 3.0" in readme

    docs = load_calibration_texts(None)
    assert docs == load_calibration_texts(path)
    assert len(docs) >= 5 and all(d.startswith("= ") for d in docs)
    cs = build_calibration_samples(docs, WordTokenizer(), n_samples=128, seqlen=128, seed=0)
    assert cs.input_ids.shape == (128, 128) and cs.n_requested == 128
    again = build_calibration_samples(docs, WordTokenizer(), n_samples=128, seqlen=128, seed=0)
    assert cs.sha256 == again.sha256


def test_shingles_pack_into_one_line_and_back():
    from lmkiln.quant.calib import pack_shingles, shingles, unpack_shingles

    hashes = shingles(list(range(1000)))
    packed = pack_shingles(hashes)
    assert "\n" not in packed and len(packed) <= 11 * len(hashes) + 4
    assert unpack_shingles(packed) == hashes


def test_calibration_path_must_be_a_regular_file(tmp_path):
    """A device was read until the kernel killed the process (24 GB), a named pipe blocked forever:
    both are one line now; a file too big to read whole is refused by its size."""
    import os

    import lmkiln.quant.calib as calib

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for p in (Path("/dev/zero"), fifo):
        with pytest.raises(InputError, match=r"--calib .*: not a regular file \(a device, pipe or socket\)"):
            load_calibration_texts(p)
    big = tmp_path / "big.txt"
    big.write_text("some text\n", encoding="utf-8")
    calib.MAX_TEXT_BYTES, saved = 4, calib.MAX_TEXT_BYTES
    try:
        with pytest.raises(InputError, match=r"--calib .*big.txt: .* GiB; files of calibration text are read whole"):
            load_calibration_texts(big)
    finally:
        calib.MAX_TEXT_BYTES = saved
