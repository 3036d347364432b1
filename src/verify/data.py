"""Evaluation text and prompts: bundled defaults, user files, and calibration overlap."""

from __future__ import annotations

from pathlib import Path

from lmkiln.assets import ASSETS
from lmkiln.errors import InputError
from lmkiln.quant.calib import check_text_file, jsonl_texts, shingles


def bundled_eval_path() -> Path:
    """WikiText-2 *test* excerpt (CC BY-SA 3.0), see assets/eval/README.md."""
    return ASSETS / "eval" / "wikitext2_test_excerpt.txt"


def bundled_prompts_path() -> Path:
    return ASSETS / "eval" / "prompts.txt"


def _read(path: Path, what: str) -> str:
    path = Path(path)
    check_text_file(path, what.removesuffix(" file"), "--data" if what == "evaluation text" else "--prompts")  # ("a file of prompts")
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: {what} is not UTF-8 text") from None
    if not text.strip():
        raise InputError(f"{path}: {what} is empty")
    return text


def load_eval_text(path: Path | None) -> str:
    """The evaluation text: a .txt file as it is; a .jsonl file (as `quantize --calib` takes) its
    documents' "text" fields, a blank line between (the JSON itself was scored before)."""
    path = path or bundled_eval_path()
    text = _read(path, "evaluation text")
    return "\n\n".join(jsonl_texts(text, Path(path))) if Path(path).suffix == ".jsonl" else text


def load_prompts(path: Path | None) -> list[str]:
    return [line for _, line in load_prompt_lines(path)]


def load_prompt_lines(path: Path | None) -> list[tuple[int, str]]:
    """(line number from 1, prompt) of each non-blank line: blank lines are skipped, so a
    refusal of a prompt names its line, not its position among the prompts."""
    text = _read(path or bundled_prompts_path(), "prompts file")
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def overlap_tokens(eval_ids, calib_shingles: list[str]) -> int:
    """How many evaluation shingle positions also occur in the calibration text.

    Calibration shingles (lmkiln.quant.calib.shingles) are sampled every SHINGLE_STRIDE
    tokens, so any shared run of at least SHINGLE + SHINGLE_STRIDE tokens is found."""
    if not calib_shingles:
        return 0
    known = set(calib_shingles)
    return sum(1 for h in shingles(eval_ids, 1) if h in known)
