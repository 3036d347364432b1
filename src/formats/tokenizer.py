"""Loading the tokenizer that travels beside every lmkiln output (local files only)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from lmkiln.errors import InputError


# transformers' lazy module is not safe to import from two threads at once ("cannot import name
# 'AutoTokenizer'"): convert resolves the tokenizer class in a thread, which a second conversion in the
# same process (the Python API, or a run after an aborted one) can overlap
_IMPORT = threading.Lock()


def load_tokenizer(path: str | Path):
    path = Path(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the hub
    from lmkiln.formats.hf import VOCAB_FILES, has_tokenizer

    if not has_tokenizer(path):
        # else a recorded class (LlamaTokenizer, ...) loads as an empty tokenizer that makes no token at all
        raise InputError(f"{path}: no tokenizer files ({', '.join(VOCAB_FILES)}); copy the tokenizer files of the model it "
                         "came from into it")
    with _IMPORT:  # (loading imports the tokenizer class's module lazily too)
        import transformers
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        # Calibration and evaluation tokenize whole documents and window them afterwards;
        # the "longer than the maximum sequence length" warning does not apply.
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with ours
        recorded = _recorded_class(path)  # an engine: the class its source resolved to (see resolved_tokenizer_class)
        cls = (getattr(transformers, recorded, None) if recorded else None) or AutoTokenizer
        try:
            return cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises OSError/ValueError/... for missing files
            raise InputError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def resolved_tokenizer_class(path: str | Path) -> str | None:
    """The class AutoTokenizer resolves for a source directory (its config.json's model_type
    takes part), recorded in outputs that do not carry that config.json under its name;
    None when the source has no loadable tokenizer (weights-only checkpoints convert too)."""
    try:
        return type(load_tokenizer(path)).__name__
    except InputError:
        return None


# The files where lmkiln outputs without the source's config.json record the tokenizer
# class: an engine's manifest, an ONNX export's lmkiln_export.json.
RECORDS = ("manifest.json", "lmkiln_export.json")


def _recorded_class(path: Path) -> str | None:
    for name in RECORDS:
        if (path / name).is_file():
            try:
                return json.loads((path / name).read_text(encoding="utf-8")).get("tokenizer_class")
            except (OSError, ValueError):
                return None
    return None
