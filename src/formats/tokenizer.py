"""Loading the tokenizer that travels beside every lmkiln output (local files only)."""

from __future__ import annotations

import os
from pathlib import Path

from lmkiln.errors import InputError


def load_tokenizer(path: str | Path):
    path = Path(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the hub
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Calibration and evaluation tokenize whole documents and window them afterwards;
    # the "longer than the maximum sequence length" warning does not apply.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with ours

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError/ValueError/... for missing files
        raise InputError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
