"""Stop and special token ids travel from the source into every output.

A chat model's end-of-turn id is often only in generation_config.json (Llama 3 Instruct's
<|eot_id|>), and transformers' generate stops on it there; a pad id only config.json may name
(Qwen tokenizers have no pad_token in their files). The engine, the ONNX export's
genai_config.json and the GGUF file must carry what transformers would use.
"""

import json

import gguf
import pytest
import torch

from helpers import edit_json, load_hf_model, make_tiny_model
from lmkiln.convert.hf_to_engine import convert_hf_to_engine
from lmkiln.errors import LmkilnError
from lmkiln.export import export_onnx
from lmkiln.export.gguf import export_gguf
from lmkiln.formats.engine import Engine
from lmkiln.formats.tokenizer import load_tokenizer
from lmkiln.runtime.engine_model import EngineModel
from lmkiln.runtime.generate import greedy_generate
from lmkiln.runtime.hf_runner import TransformersRunner

PROMPT = "Once upon a time"
N = 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama whose generation_config.json adds, as a second eos, the third token it would
    generate greedily (so generation must stop there), and whose config.json names a pad id no
    tokenizer file names."""
    d = make_tiny_model(tmp_path_factory.mktemp("stop") / "m", "LlamaForCausalLM", seed=3)
    ids = load_tokenizer(d)(PROMPT).input_ids
    with torch.no_grad():
        free = load_hf_model(d).generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, eos_token_id=None,
                                          pad_token_id=0)[0, len(ids):].tolist()
    stop = free[2]
    assert stop not in free[:2] and stop != 2, free  # the seed is chosen so the third token is new
    edit_json(d / "generation_config.json", lambda g: g.update(eos_token_id=[2, stop]))
    edit_json(d / "config.json", lambda c: c.update(eos_token_id=2, pad_token_id=3))
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (d / f).exists():
            edit_json(d / f, lambda c: [c.pop(k, None) for k in ("pad_token", "bos_token")])
    return d, ids, stop, free


def test_engine_stops_where_transformers_does(chat_model, tmp_path):
    d, ids, stop, free = chat_model
    with torch.no_grad():
        ref = load_hf_model(d).generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False)[0, len(ids):].tolist()
    assert ref == free[:3]  # transformers stops on generation_config.json's list
    eng = convert_hf_to_engine(d, tmp_path / "e")
    model = Engine(eng).manifest["model"]
    assert model["eos_token_id"] == [2, stop] and model["pad_token_id"] == 3
    em = EngineModel.from_path(eng)
    assert greedy_generate(em, [ids], N, em.config["eos_token_id"])[0] == ref
    # the HF runner (verify's reference) stops on the same ids
    assert TransformersRunner(d).eos_token_ids == [2, stop]


def test_onnx_genai_config_lists_every_stop_id_and_the_pad(chat_model, tmp_path):
    d, _, stop, _ = chat_model
    out = export_onnx(convert_hf_to_engine(d, tmp_path / "e"), tmp_path / "x")
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert genai["eos_token_id"] == [2, stop] and genai["pad_token_id"] == 3


def test_gguf_takes_bos_pad_and_the_end_of_turn_the_tokenizer_files_do_not_name(chat_model, tmp_path):
    """The second stop id becomes llama.cpp's end-of-turn token (it stops on it as on eos), and verify's
    GGUF runner stops there too, as transformers does."""
    from lmkiln.runtime.gguf_runner import gguf_model

    d, ids_, stop, free = chat_model
    out = tmp_path / "m.gguf"
    export_gguf(convert_hf_to_engine(d, tmp_path / "e"), out, gtype="f32")
    r = gguf.GGUFReader(str(out))
    ids = {k.removeprefix("tokenizer.ggml."): r.fields[k].contents() for k in r.fields if k.endswith("_token_id")}
    assert ids["bos_token_id"] == 1 and ids["eos_token_id"] == 2 and ids["padding_token_id"] == 3
    assert ids["eot_token_id"] == stop
    runner = gguf_model(out)
    assert greedy_generate(runner, [ids_], N, runner.eos_token_ids)[0] == free[:3]


@pytest.mark.parametrize("pad", [-1, 10**6, None])
def test_a_pad_id_outside_the_vocabulary_is_not_recorded(chat_model, tmp_path, pad):
    d, _, _, _ = chat_model
    src = tmp_path / "m"
    src.mkdir()
    for f in d.iterdir():
        (src / f.name).symlink_to(f)
    (src / "config.json").unlink()
    (src / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "pad_token_id": pad}))
    assert Engine(convert_hf_to_engine(src, tmp_path / "e")).manifest["model"]["pad_token_id"] is None


def test_a_bad_generation_config_eos_is_refused_naming_the_file(chat_model, tmp_path):
    d, _, _, _ = chat_model
    src = tmp_path / "m"
    src.mkdir()
    for f in d.iterdir():
        if f.name != "generation_config.json":
            (src / f.name).symlink_to(f)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 10**6]}))
    with pytest.raises(LmkilnError, match=r"generation_config\.json: eos_token_id must be token ids below vocab_size"):
        convert_hf_to_engine(src, tmp_path / "e")
    assert not (tmp_path / "e").exists()
