"""Python API behind `lmkiln generate`: open any source as an engine and generate text."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from lmkiln.errors import InputError
from lmkiln.formats.engine import is_engine


@contextlib.contextmanager
def engine_dir(source: str | Path, allow_pickle: bool = False) -> Iterator[Path]:
    """An engine path for `source`: the engine itself, or an HF directory converted to a
    temporary engine that is removed afterwards."""
    source = Path(source)
    if is_engine(source):
        yield source
        return
    if not source.is_dir():
        raise InputError(f"{source}: no such engine or model directory")
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    with tempfile.TemporaryDirectory(prefix="lmkiln-engine-") as tmp:
        yield convert_hf_to_engine(source, Path(tmp) / "engine", allow_pickle=allow_pickle)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(device: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`, as `quantize --device` takes it (one parser)."""
    from lmkiln.quant.job import resolve_device

    return resolve_device(device)


def runtime_dtype(name: str, device: str | torch.device, quantized: bool) -> torch.dtype:
    """The engine runner's compute dtype: `name` (fp32, bf16, fp16) or "auto": float32 on
    CPU and for fp engines (exact, as verify's fp thresholds expect); bfloat16 for a
    quantized engine on CUDA, the dtype PyTorch's packed int4 kernel computes in."""
    if name == "auto":
        return torch.bfloat16 if quantized and torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"--dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def generate_text(source, prompts: list[str], max_new_tokens: int, allow_pickle: bool = False, device: str = "cpu",
                  check: bool = True, dtype: str = "auto") -> list[str]:
    from lmkiln.formats.tokenizer import load_tokenizer
    from lmkiln.runtime.engine_model import EngineModel
    from lmkiln.runtime.generate import greedy_generate

    from lmkiln.formats.engine import Engine

    dev = check_device(device)
    with engine_dir(source, allow_pickle) as path:
        quantized = Engine(path).quant is not None
        model = EngineModel.from_path(path, dtype=runtime_dtype(dtype, dev, quantized), device=dev, check=check)
        tok = load_tokenizer(path)
        ids = [tok(p).input_ids for p in prompts]
        new = greedy_generate(model, ids, max_new_tokens, model.config["eos_token_id"])
        # Decode prompt + continuation together so a word split across the boundary keeps its spacing.
        return [tok.decode(i + n, skip_special_tokens=True)[len(tok.decode(i, skip_special_tokens=True)):] for i, n in zip(ids, new)]
