"""Every lmkiln output tokenizes as its source does. An engine keeps the source's
config.json as source_config.json, so AutoTokenizer there no longer sees the model_type;
a Qwen2 config with a Llama tokenizer_config then resolved another class (different ids).
Outputs record the class the source resolves to and load exactly that one."""

from __future__ import annotations

import pytest

from lmkiln.assets import ASSETS
from lmkiln.convert.hf_to_engine import convert_hf_to_engine
from lmkiln.export import export_onnx
from lmkiln.formats.tokenizer import load_tokenizer
from lmkiln.quant.awq import QuantOptions
from lmkiln.quant.pipeline import CalibOptions, quantize_model
from quant_fixtures import MODELS, build_hf

PROMPTS = (ASSETS / "eval" / "prompts.txt").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_outputs_tokenize_as_the_source(family, tmp_path):
    src = build_hf(family, tmp_path / "src")
    want = load_tokenizer(src)
    outputs = [convert_hf_to_engine(src, tmp_path / "engine"),
               quantize_model(src, tmp_path / "w4.engine", QuantOptions(bits=4, group_size=16, method="rtn"),
                              CalibOptions(), to="engine").output]
    outputs.append(export_onnx(outputs[0], tmp_path / "onnx"))
    for out in outputs:
        got = load_tokenizer(out)
        assert type(got) is type(want), (out, type(got).__name__, type(want).__name__)
        for p in PROMPTS:
            assert got(p).input_ids == want(p).input_ids, (out, p)


def test_two_threads_load_tokenizers_at_once():
    """transformers' lazy import from two threads at once failed ("cannot import name 'AutoTokenizer'"):
    seen when a conversion's tokenizer-class thread overlapped the next conversion's in one process."""
    import subprocess
    import sys

    code = (
        "import sys, threading\n"
        "from lmkiln.assets import bundled_model_path\n"
        "from lmkiln.formats.tokenizer import load_tokenizer\n"
        "assert 'transformers' not in sys.modules\n"
        "got, errors = [], []\n"
        "def load():\n"
        "    try: got.append(type(load_tokenizer(bundled_model_path())).__name__)\n"
        "    except Exception as e: errors.append(repr(e))\n"
        "ts = [threading.Thread(target=load) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(errors or sorted(set(got)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['LlamaTokenizer']", r.stdout
