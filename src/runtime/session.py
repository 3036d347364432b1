"""Python API behind `lmkiln generate`: open any source as an engine and generate text."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from lmkiln.errors import InputError, LmkilnError, check_flag, check_path
from lmkiln.formats.engine import is_engine


TEMP_PREFIX = "lmkiln-engine-"
IN_USE = ".in-use"  # flocked by the process converting into / reading from the temporary engine
STALE_AFTER_S = 60  # younger ones may be a process between creating the directory and locking it


@contextlib.contextmanager
def _in_use(tmp: Path) -> Iterator[None]:
    fd = os.open(tmp / IN_USE, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel when the process dies, however it dies
        yield
    finally:
        os.close(fd)


def sweep_temporary_engines(root: Path | None = None) -> list[Path]:
    """Remove temporary engines (model-sized) that a killed process left in the system temp
    directory: a SIGKILL or the OOM killer runs no cleanup, and nothing else would ever delete
    them. One is stale when nobody holds its lock; returns what was removed."""
    removed = []
    for d in Path(root or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        lock = d / IN_USE
        try:
            if not lock.is_file() or time.time() - lock.stat().st_mtime < STALE_AFTER_S:
                continue
            fd = os.open(lock, os.O_RDWR)
        except OSError:  # gone meanwhile, or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # alive
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


@contextlib.contextmanager
def engine_dir(source: str | Path, allow_pickle: bool = False) -> Iterator[Path]:
    """An engine path for `source`: the engine itself, or an HF directory converted to a
    temporary engine that is removed afterwards."""
    source = Path(source)
    if is_engine(source):
        yield source
        return
    if source.is_file():
        gguf = " (GGUF files are read by `lmkiln verify` as its candidate only)" if source.suffix == ".gguf" else ""
        raise InputError(f"{source}: a file, not an engine or model directory{gguf}")
    if not source.is_dir():
        raise InputError(f"{source}: no such engine or model directory")
    if (source / "model.onnx").is_file():
        raise InputError(f"{source}: an ONNX export; this takes an engine or a Hugging Face directory "
                         "(run an export with onnxruntime, or check it with `lmkiln verify ENGINE EXPORT`)")
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    sweep_temporary_engines()
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp, _in_use(Path(tmp)):
        engine = Path(tmp) / "engine"
        try:
            yield convert_hf_to_engine(source, engine, allow_pickle=allow_pickle)
        except LmkilnError as e:  # name the user's directory, not the temporary engine made from it
            if str(engine) not in str(e):
                raise
            raise type(e)(str(e).replace(str(engine), f"{source} (as a temporary engine)")) from None


def check_device(device: str, option: str = "--device") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`, as `quantize --device` takes it (one parser)."""
    from lmkiln.quant.job import resolve_device

    return resolve_device(device, option)


def generate_text(source, prompts: list[str] | str, max_new_tokens: int, allow_pickle: bool = False, device: str = "cpu",
                  check: bool = True, dtype: str = "auto") -> list[str] | str:
    """Greedy continuations of `prompts` (a list of texts, one batch) by the engine or HF
    directory `source`: a list of texts, one per prompt. A single str is taken as ONE prompt
    and its continuation is returned as a str (iterating a str would make a prompt of each
    character). Arguments of a wrong type or value are refused as InputError before anything is
    read, a prompt that tokenizes to nothing before the weights are loaded."""
    from lmkiln.formats.tokenizer import load_tokenizer
    from lmkiln.runtime.engine_model import EngineModel
    from lmkiln.runtime.generate import check_lengths, greedy_generate

    check_path("source", source)
    check_flag("allow_pickle", allow_pickle)
    check_flag("check", check)
    single = isinstance(prompts, str)
    prompts = [prompts] if single else prompts
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts: a list of texts (or one str), not {type(prompts).__name__}")
    if not prompts:
        raise InputError("no prompts to generate from; give at least one (-p TEXT)")
    bad = next((k for k, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise InputError(f"prompt {bad + 1} is a {type(prompts[bad]).__name__}, not text; pass each prompt as a str")
    # bool is an int to Python, but True new tokens is a mistake, not a count
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens {max_new_tokens!r}: give a whole number of new tokens, at least 1 (-n)")
    dev = check_device(device)
    for k, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates; the tokenizer raises TypeError
            raise InputError(f"prompt {k + 1} is not valid UTF-8 text; pass it in UTF-8") from None
    src = Path(source)
    if src.is_dir() and not is_engine(src) and (src / "config.json").is_file():
        from lmkiln.formats.hf import VOCAB_FILES, has_tokenizer

        if not has_tokenizer(src):  # said before a model-sized conversion, not after
            raise InputError(f"{src}: no tokenizer ({', '.join(VOCAB_FILES)}); generate needs one: copy the "
                             "tokenizer files of the model this checkpoint came from into it")
    with engine_dir(source, allow_pickle) as path:
        tok = load_tokenizer(path)
        ids = [tok(p).input_ids for p in prompts]
        shown = lambda k: repr(prompts[k]) if len(prompts[k]) <= 40 else repr(prompts[k][:40]) + "..."  # noqa: E731
        # before the weights load: a prompt with no tokens (a tokenizer without BOS), named by its -p
        check_lengths(ids, max_new_tokens, None, None, lambda k: f"prompt {k + 1} (-p {shown(k)})")
        model = EngineModel.from_path(path, dtype=dtype, device=dev, check=check)  # "auto" resolved for this engine
        new = greedy_generate(model, ids, max_new_tokens, model.config["eos_token_id"])
        # Decode prompt + continuation together so a word split across the boundary keeps its spacing.
        texts = [tok.decode(i + n, skip_special_tokens=True)[len(tok.decode(i, skip_special_tokens=True)):] for i, n in zip(ids, new)]
        return texts[0] if single else texts
