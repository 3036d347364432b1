"""Engine format v1: conversion output, the validating reader, atomic writes and accounting."""

import json
import math
import re
import struct

import pytest
import torch

import lmkiln.convert.hf_to_engine as h2e
from helpers import ARCHS, LLAMA3_ROPE, add_tensor, as_earlier_engine, copy_tree, edit_json, load_hf_model, make_tiny_model, read_raw_header, remove_tensor, replace_tensor, rewrite_header
from lmkiln.convert.architectures import ARCHITECTURES
from lmkiln.convert.hf_to_engine import convert_hf_to_engine
from lmkiln.errors import (
    CheckpointError, ChecksumError, EngineFormatError, InputError, LmkilnError, OutputExistsError, UnsupportedArchitectureError,
)
from lmkiln.formats.engine import FAMILY_FIELDS, MANIFEST, SHARED_FILE, VERSION, Engine, expected_tensors, rank_file
from lmkiln.errors import SafetensorsFormatError
from lmkiln.formats.safetensors_io import read_header
from lmkiln.runtime.engine_model import EngineModel

WEIGHT = rank_file(0)


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    return copy_tree(tiny_engine, tmp_path / "copy.engine")


def _manifest(path):
    return json.loads((path / MANIFEST).read_text())


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if "lmkiln-tmp" in p.name or "lmkiln-old" in p.name)


# -- what a conversion writes -------------------------------------------------------------


def test_converted_engine_layout(tiny_engine, tiny_llama):
    m = _manifest(tiny_engine)
    assert m["format"] == "lmkiln-engine" and m["format_version"] == VERSION == 4  # fp linears stored (out, in)
    assert m["weight_type"] == "fp32" and m["tensor_parallel"] == 1
    model = m["model"]
    assert model["architecture"] == "LlamaForCausalLM"
    assert (model["head_num"], model["kv_head_num"], model["size_per_head"], model["hidden_units"]) == (4, 2, 16, 64)
    assert model["inter_size"] == model["inter_size_padded"] == 96
    assert model["num_layer"] == 2 and model["vocab_size"] == 512 and model["tie_word_embeddings"] is False
    assert model["eos_token_id"] == [2]
    # The index is exactly the format's expected list, and the files hold exactly it.
    want = expected_tensors(model, 1, 96, torch.float32)
    assert {n: (f, list(s)) for n, f, _, s in want} == {n: (e["file"], e["shape"]) for n, e in m["tensors"].items()}
    assert set(m["files"]) == {SHARED_FILE, WEIGHT}
    for fname in m["files"]:
        infos, _ = read_header(tiny_engine / fname)
        assert set(infos) == {n for n, e in m["tensors"].items() if e["file"] == fname}
    # Side files travel with the engine.
    assert (tiny_engine / "source_config.json").read_text() == (tiny_llama / "config.json").read_text()
    for name in m["tokenizer_files"]:
        assert (tiny_engine / name).read_bytes() == (tiny_llama / name).read_bytes()
    assert "tokenizer.json" in m["tokenizer_files"]
    assert m["source"]["architecture"] == "LlamaForCausalLM"
    assert m["source"]["skipped_tensors"] == {}


def test_manifest_blake3_and_sizes(tiny_engine):
    import blake3

    m = _manifest(tiny_engine)
    for fname, meta in m["files"].items():
        data = (tiny_engine / fname).read_bytes()
        assert meta == {"blake3": blake3.blake3(data).hexdigest(), "size": len(data)}  # no sha256 any more
    eng = Engine(tiny_engine, check=True)
    assert eng.verify_checksums() == {f: True for f in m["files"]}


def test_engine_tensors_are_the_transformed_hf_tensors(tiny_engine, tiny_llama):
    from lmkiln.convert.transforms import permute_rotary
    from lmkiln.formats.hf import HFCheckpoint

    eng, ck = Engine(tiny_engine), HFCheckpoint(tiny_llama)
    assert torch.equal(eng.get("tok_embeddings.weight"), ck.get("model.embed_tokens.weight"))
    assert torch.equal(eng.get("output.weight"), ck.get("lm_head.weight").t())  # read as (in, out)...
    assert torch.equal(eng.get("layers.1.ffn_norm.weight"), ck.get("model.layers.1.post_attention_layernorm.weight"))
    qkv = eng.get("layers.0.attention.w_qkv.0.weight")  # (in, out) = (64, (4 + 2 + 2) * 16)
    q = permute_rotary(ck.get("model.layers.0.self_attn.q_proj.weight"), 4, 16)
    k = permute_rotary(ck.get("model.layers.0.self_attn.k_proj.weight"), 2, 16)
    v = ck.get("model.layers.0.self_attn.v_proj.weight")
    assert torch.equal(qkv, torch.cat([q, k, v]).t())
    w13 = eng.get("layers.0.feed_forward.w13.0.weight")
    assert torch.equal(w13, torch.cat([ck.get("model.layers.0.mlp.gate_proj.weight"), ck.get("model.layers.0.mlp.up_proj.weight")]).t())
    with pytest.raises(EngineFormatError, match="no tensor"):
        eng.get("layers.9.nothing")
    # ... stored as the source's bytes, (out, in): the conversion copied them, it did not transpose
    header, data = read_raw_header(tiny_engine / WEIGHT)
    a, b = header["layers.0.attention.w_qkv.0.weight"]["data_offsets"]
    assert header["layers.0.attention.w_qkv.0.weight"]["shape"] == [128, 64]
    assert data[a:b] == torch.cat([q, k, v]).numpy().tobytes()
    header, data = read_raw_header(tiny_engine / SHARED_FILE)
    a, b = header["output.weight"]["data_offsets"]
    assert data[a:b] == ck.get("lm_head.weight").numpy().tobytes()


@pytest.mark.parametrize("version, tp", [(1, 1), (3, 1), (3, 2)])
def test_engines_of_earlier_layout_load_the_same(tmp_path, tiny_engine, tiny_llama, version, tp):
    """An engine as lmkiln wrote it before v4 (fp linears stored (in, out)) reads back the same
    tensors and gives the same logits as the v4 engine."""
    src = tiny_engine if tp == 1 else convert_hf_to_engine(tiny_llama, tmp_path / "tp2.engine", tp=2)
    old = copy_tree(src, tmp_path / "old.engine")
    as_earlier_engine(old, version)
    assert _manifest(old)["tensors"]["output.weight"]["shape"] == [64, 512]
    new_e, old_e = Engine(src), Engine(old, check=True)
    for name in new_e.manifest["tensors"]:
        assert torch.equal(new_e.get(name), old_e.get(name)), name
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(EngineModel.from_path(old)(ids), EngineModel.from_path(src)(ids), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_reproduces_hf_logits(tmp_path, arch):
    """A converted engine (tp 1 and tp 4 with kv replication and FFN padding) gives HF's logits."""
    hf_dir = make_tiny_model(tmp_path / "hf", arch, seed=3, intermediate_size=90, tie_word_embeddings=arch == "Qwen2ForCausalLM",
                             rope_scaling="llama3" if arch == "LlamaForCausalLM" else None)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_hf_model(hf_dir)(ids).logits
    for tp in (1, 4):
        eng = convert_hf_to_engine(hf_dir, tmp_path / f"tp{tp}.engine", tp=tp)
        m = _manifest(eng)
        assert m["tensor_parallel"] == tp and m["model"]["inter_size_padded"] == (90 if tp == 1 else 92)
        got = EngineModel.from_path(eng, check=True)(ids)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def _parity(hf_dir, engine_dir, T=12):
    ids = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_hf_model(hf_dir)(ids).logits
    return EngineModel.from_path(engine_dir)(ids), ref


@pytest.mark.parametrize("arch, kw", [
    ("MistralForCausalLM", {"sliding_window": 4}),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}),
])
def test_sliding_window_parity(tmp_path, arch, kw):
    hf_dir = make_tiny_model(tmp_path / "hf", arch, tokenizer=False, **kw)
    eng = convert_hf_to_engine(hf_dir, tmp_path / "e")
    assert _manifest(eng)["model"]["sliding_window"] == 4
    got, ref = _parity(hf_dir, eng)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_unused_sliding_window_is_dropped(tmp_path):
    hf_dir = make_tiny_model(tmp_path / "hf", "Qwen2ForCausalLM", tokenizer=False, use_sliding_window=False, sliding_window=4)
    assert _manifest(convert_hf_to_engine(hf_dir, tmp_path / "e"))["model"]["sliding_window"] is None


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_sliding_window_only_on_some_layers(tmp_path, arch):
    hf_dir = make_tiny_model(tmp_path / "hf", arch, tokenizer=False, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    try:
        eng = convert_hf_to_engine(hf_dir, tmp_path / "e")
    except UnsupportedArchitectureError:
        return  # refusing what the engine cannot run would be correct too
    got, ref = _parity(hf_dir, eng)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("old_key", ["rope_type", "type"])
def test_pre_v5_rope_config(tmp_path, old_key):
    """A transformers-4 style config (rope_theta + rope_scaling) converts like the v5 rope_parameters one."""
    hf_dir = make_tiny_model(tmp_path / "hf", rope_scaling={**LLAMA3_ROPE, "rope_theta": 50000.0}, tokenizer=False)
    new = _manifest(convert_hf_to_engine(hf_dir, tmp_path / "new"))["model"]["rope"]
    assert new["type"] == "llama3" and new["base"] == 50000.0 and new["dim"] == 16
    assert new["scaling"]["factor"] == 8.0 and new["scaling"]["original_max_position_embeddings"] == 32

    def to_old_style(c):
        rp = dict(c.pop("rope_parameters"))
        c["rope_theta"] = rp.pop("rope_theta")
        rp[old_key] = rp.pop("rope_type")
        c["rope_scaling"] = rp

    edit_json(hf_dir / "config.json", to_old_style)
    old = _manifest(convert_hf_to_engine(hf_dir, tmp_path / "old"))["model"]["rope"]
    assert old == new
    got, ref = _parity(hf_dir, tmp_path / "old")  # transformers reads the old style too
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, code, name", [("fp16", "F16", "fp16"), ("bf16", "BF16", "bf16"), ("fp32", "F32", "fp32")])
def test_dtype_option(tiny_llama, tmp_path, dtype, code, name):
    eng = convert_hf_to_engine(tiny_llama, tmp_path / "e", dtype=dtype)
    m = _manifest(eng)
    assert m["weight_type"] == name
    assert {e["dtype"] for e in m["tensors"].values()} == {name}
    for fname in m["files"]:
        infos, _ = read_header(eng / fname)
        assert {i.dtype for i in infos.values()} == {code}
    e = Engine(eng, check=True)
    assert e.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    assert e.get("norm.weight").dtype == e.dtype


def test_dtype_auto_keeps_source(tmp_path):
    hf = make_tiny_model(tmp_path / "hf", dtype=torch.float16, tokenizer=False)
    m = _manifest(convert_hf_to_engine(hf, tmp_path / "e"))
    assert m["weight_type"] == "fp16" and m["source"]["source_dtype"] == "float16"


def test_dtype_invalid(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="--dtype"):
        convert_hf_to_engine(tiny_llama, tmp_path / "e", dtype="int3")
    assert not (tmp_path / "e").exists()


def test_tp_invalid(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="--tp 3"):
        convert_hf_to_engine(tiny_llama, tmp_path / "e", tp=3)
    assert not (tmp_path / "e").exists()


def test_tied_embeddings_have_no_output(tmp_path):
    hf = make_tiny_model(tmp_path / "hf", tie_word_embeddings=True, tokenizer=False)
    m = _manifest(convert_hf_to_engine(hf, tmp_path / "e"))
    assert m["model"]["tie_word_embeddings"] is True
    assert "output.weight" not in m["tensors"]


# -- the reader rejects damaged engines ---------------------------------------------------


def _flip_data_byte(path):
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    pos = 8 + n + (len(raw) - 8 - n) // 2
    raw[pos] ^= 0x40
    path.write_bytes(bytes(raw))


def test_flipped_data_byte_needs_check(engine_copy):
    _flip_data_byte(engine_copy / WEIGHT)
    Engine(engine_copy)  # header and sizes still agree: loads without hashing
    with pytest.raises(ChecksumError, match="blake3") as ei:
        Engine(engine_copy, check=True)
    assert WEIGHT in str(ei.value) and "\n" not in str(ei.value)
    assert isinstance(ei.value, EngineFormatError)
    assert Engine(engine_copy).verify_checksums() == {SHARED_FILE: True, WEIGHT: False}


def test_background_check_while_loading(engine_copy):
    """EngineModel.from_path hashes in threads while it reads the weights, and still refuses a
    flipped byte before returning a model; an intact engine loads the same with or without it."""
    ref = EngineModel.from_path(engine_copy, check=False)
    ok = EngineModel.from_path(engine_copy, check=True)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ok.state_dict().values()))
    e = Engine(engine_copy, check=True, background=True)
    e.wait_checked()
    e.wait_checked()  # done once: a no-op after
    _flip_data_byte(engine_copy / WEIGHT)
    with pytest.raises(ChecksumError, match=WEIGHT.replace(".", r"\.")):
        EngineModel.from_path(engine_copy, check=True)
    e = Engine(engine_copy, check=True, background=True)  # construction returns before the hash is known
    with pytest.raises(ChecksumError):
        e.wait_checked()
    e = Engine(engine_copy, check=True, background=True)
    e.stop_check()
    e.wait_checked()  # abandoned: nothing to raise


def test_truncated_weight_file(engine_copy):
    f = engine_copy / WEIGHT
    f.write_bytes(f.read_bytes()[:-16])
    with pytest.raises(EngineFormatError, match="truncated") as ei:
        Engine(engine_copy)
    assert WEIGHT in str(ei.value)


def test_size_mismatch_in_manifest(engine_copy):
    edit_json(engine_copy / MANIFEST, lambda m: m["files"][SHARED_FILE].update(size=m["files"][SHARED_FILE]["size"] + 1))
    with pytest.raises(EngineFormatError, match=f"{SHARED_FILE} is .* bytes, manifest says"):
        Engine(engine_copy)


def test_missing_weight_file(engine_copy):
    (engine_copy / SHARED_FILE).unlink()
    with pytest.raises(EngineFormatError, match=f"weight file {SHARED_FILE} is missing"):
        Engine(engine_copy)


def test_tensor_removed_from_index(engine_copy):
    edit_json(engine_copy / MANIFEST, lambda m: m["tensors"].pop("layers.1.ffn_norm.weight"))
    with pytest.raises(EngineFormatError, match="'layers.1.ffn_norm.weight' is missing from the manifest index"):
        Engine(engine_copy)


def test_unknown_tensor_in_index(engine_copy):
    edit_json(engine_copy / MANIFEST, lambda m: m["tensors"].update({"layers.0.extra.weight": {"file": SHARED_FILE, "dtype": "fp32", "shape": [64]}}))
    with pytest.raises(EngineFormatError, match="'layers.0.extra.weight' in the manifest is not part of format v4"):
        Engine(engine_copy)


@pytest.mark.parametrize("eos", [[512], [-1], ["2"]])
def test_eos_token_outside_the_vocabulary_in_manifest(engine_copy, eos):
    """An end-of-sequence id generation can never produce (or not an id at all) was accepted."""
    edit_json(engine_copy / "manifest.json", lambda m: m["model"].update(eos_token_id=eos))
    with pytest.raises(EngineFormatError, match=r"model.eos_token_id must list token ids below vocab_size 512"):
        Engine(engine_copy)


def test_wrong_shape_in_manifest(engine_copy):
    edit_json(engine_copy / MANIFEST, lambda m: m["tensors"]["norm.weight"].update(shape=[65]))
    with pytest.raises(EngineFormatError, match="'norm.weight'"):
        Engine(engine_copy)


def test_wrong_dtype_in_manifest_entry(engine_copy):
    edit_json(engine_copy / MANIFEST, lambda m: m["tensors"]["norm.weight"].update(dtype="fp16"))
    with pytest.raises(EngineFormatError, match="'norm.weight'"):
        Engine(engine_copy)


@pytest.mark.parametrize("entry", ["../../etc/hostname", "/etc/hostname", "sub/tokenizer.json", "..", ""])
def test_tokenizer_files_outside_the_engine_refused(engine_copy, entry):
    """Exports copy the manifest's tokenizer_files: an entry that is not a plain name beside the
    manifest would copy any file on the machine into the output (found by a fault sweep)."""
    edit_json(engine_copy / MANIFEST, lambda m: m.update(tokenizer_files=[*m.get("tokenizer_files", []), entry]))
    with pytest.raises(EngineFormatError, match="tokenizer_files must list file names inside the engine directory"):
        Engine(engine_copy)


def test_model_config_disagrees_with_index(engine_copy):
    edit_json(engine_copy / MANIFEST, lambda m: m["model"].update(num_layer=3))
    with pytest.raises(EngineFormatError, match="layers.2"):
        Engine(engine_copy)


def test_file_header_disagrees_with_manifest(engine_copy):
    """Same byte count, transposed shape in the weight file itself."""
    f = engine_copy / WEIGHT
    before = f.stat().st_size
    rewrite_header(f, lambda h: h["layers.0.feed_forward.w2.0.weight"].update(shape=[96, 64]))  # (in, out): pre-v4
    assert f.stat().st_size == before
    with pytest.raises(EngineFormatError, match="w2.0.weight' in rank0.safetensors is F32 \\[96, 64\\]"):
        Engine(engine_copy)


def test_file_holds_other_tensors(engine_copy):
    f = engine_copy / SHARED_FILE

    def rename(h):
        h["norm.weightX"] = h.pop("norm.weight")

    rewrite_header(f, rename)
    edit_json(engine_copy / MANIFEST, lambda m: m["files"][SHARED_FILE].update(size=f.stat().st_size))
    with pytest.raises(EngineFormatError, match="holds different tensors"):
        Engine(engine_copy)


def test_format_version_newer(engine_copy):
    edit_json(engine_copy / MANIFEST, lambda m: m.update(format_version=VERSION + 1))
    with pytest.raises(EngineFormatError, match=f"version {VERSION + 1} is newer.*upgrade lmkiln"):
        Engine(engine_copy)


def test_llama_engine_leaves_v2_fields_out(tiny_engine):
    """Models without v2 fields leave them out of the model block (v3 and v4 change checksums and layout)."""
    m = json.loads((tiny_engine / MANIFEST).read_text())
    assert m["format_version"] == VERSION and not set(FAMILY_FIELDS) & set(m["model"])
    assert Engine(tiny_engine).model["norm_offset"] == 0.0  # read back with v1's meaning


def _as_sha256_engine(path, version=1):
    """Rewrite an engine as earlier lmkiln wrote it: (in, out) layout, sha256 checksums, format v1."""
    as_earlier_engine(path, version)


def test_sha256_engine_of_earlier_lmkiln_still_loads_and_is_checked(engine_copy):
    _as_sha256_engine(engine_copy)
    e = Engine(engine_copy, check=True)
    assert e.verify_checksums() == {SHARED_FILE: True, WEIGHT: True}
    e = Engine(engine_copy, check=True, background=True)
    e.wait_checked()
    _flip_data_byte(engine_copy / WEIGHT)
    with pytest.raises(ChecksumError, match=f"{WEIGHT}: sha256 .* does not match"):
        Engine(engine_copy, check=True)
    e = Engine(engine_copy, check=True, background=True)
    with pytest.raises(ChecksumError, match=f"{WEIGHT}: sha256"):
        e.wait_checked()
    assert Engine(engine_copy).verify_checksums() == {SHARED_FILE: True, WEIGHT: False}


def test_blake3_engine_flipped_byte_names_the_file(engine_copy):
    assert _manifest(engine_copy)["format_version"] == VERSION
    _flip_data_byte(engine_copy / SHARED_FILE)
    with pytest.raises(ChecksumError, match=f"{SHARED_FILE}: blake3 .* does not match the manifest's") as ei:
        Engine(engine_copy, check=True)
    assert str(engine_copy / SHARED_FILE) in str(ei.value) and "\n" not in str(ei.value)
    e = Engine(engine_copy, check=True, background=True)  # the background check says the same
    with pytest.raises(ChecksumError, match=f"{SHARED_FILE}: blake3"):
        e.wait_checked()


def test_unknown_checksum_algorithm_refused(engine_copy):
    def md5(m):
        for meta in m["files"].values():
            meta["md5"] = meta.pop("blake3")
    edit_json(engine_copy / MANIFEST, md5)
    with pytest.raises(EngineFormatError) as ei:
        Engine(engine_copy)
    msg = str(ei.value)
    assert "no checksum this lmkiln knows" in msg and "'md5'" in msg and "upgrade lmkiln" in msg and "\n" not in msg


@pytest.mark.parametrize("version", [1, 2])
def test_blake3_in_an_older_manifest_refused(engine_copy, version):
    """An older lmkiln cannot verify blake3, so a manifest claiming v1/v2 must not carry it."""
    as_earlier_engine(engine_copy, 3)
    edit_json(engine_copy / MANIFEST, lambda m: m.update(format_version=version))
    with pytest.raises(EngineFormatError, match=f"blake3 checksum, which needs format version 3; the manifest says {version}"):
        Engine(engine_copy)


def test_v2_fields_in_a_v1_manifest_refused(engine_copy):
    _as_sha256_engine(engine_copy, version=1)  # as earlier lmkiln wrote it
    edit_json(engine_copy / MANIFEST, lambda m: m["model"].update(norm_offset=1.0))
    with pytest.raises(EngineFormatError, match=r"\['norm_offset'\] need format version 2, the manifest says 1"):
        Engine(engine_copy)


@pytest.mark.parametrize("version, match", [(0, "invalid"), ("1", "integer format_version"), (None, "integer format_version")])
def test_format_version_bad(engine_copy, version, match):
    edit_json(engine_copy / MANIFEST, lambda m: m.update(format_version=version))
    with pytest.raises(EngineFormatError, match=match):
        Engine(engine_copy)


def test_wrong_format_name(engine_copy):
    edit_json(engine_copy / MANIFEST, lambda m: m.update(format="turbomind"))
    with pytest.raises(EngineFormatError, match="'turbomind', expected 'lmkiln-engine'"):
        Engine(engine_copy)


def test_manifest_not_an_object(engine_copy):
    (engine_copy / MANIFEST).write_text("[]")
    with pytest.raises(EngineFormatError, match="manifest format"):
        Engine(engine_copy)


def test_invalid_json_manifest(engine_copy):
    (engine_copy / MANIFEST).write_text('{"format": "lmkiln-engine", ')
    with pytest.raises(EngineFormatError, match="not valid JSON"):
        Engine(engine_copy)


def test_missing_manifest(engine_copy, tmp_path):
    (engine_copy / MANIFEST).unlink()
    with pytest.raises(EngineFormatError, match="weight files without its manifest.json"):
        Engine(engine_copy)  # weights there, manifest (written last) not: an interrupted or damaged engine
    with pytest.raises(EngineFormatError, match="no manifest.json; not an lmkiln engine"):
        Engine(tmp_path)  # nothing of an engine at all


def test_not_a_directory(tmp_path):
    with pytest.raises(InputError):
        Engine(tmp_path / "absent")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: m.update(weight_type="int3"), "weight_type"),
        (lambda m: m.update(tensor_parallel=0), "tensor_parallel"),
        (lambda m: m.pop("model"), "'model'"),
        (lambda m: m.pop("tensors"), "'tensors'"),
        (lambda m: m["model"].update(head_num="4"), "model.head_num"),
        (lambda m: m["model"].update(head_num=True), "model.head_num"),
        (lambda m: m["model"].pop("rope"), "model.rope"),
        (lambda m: m["model"].update(inter_size_padded=95), "inter_size_padded"),
        (lambda m: m["files"].update({"rank1.safetensors": {"sha256": "0", "size": 1}}), "'files' must list exactly"),
        (lambda m: m["files"].pop(SHARED_FILE), "'files' must list exactly"),
    ],
)
def test_manifest_field_validation(engine_copy, mutate, match):
    edit_json(engine_copy / MANIFEST, mutate)
    with pytest.raises(EngineFormatError, match=match):
        Engine(engine_copy)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m["tensors"].update({"norm.weight": SHARED_FILE}),
        lambda m: m["files"].update({SHARED_FILE: "deadbeef"}),
        lambda m: m["files"][SHARED_FILE].pop("size"),
        lambda m: m.update(tensor_parallel=True),
    ],
)
def test_malformed_manifest_entries(engine_copy, mutate):
    edit_json(engine_copy / MANIFEST, mutate)
    with pytest.raises(EngineFormatError):
        Engine(engine_copy)


def test_format_version_bool(engine_copy):
    edit_json(engine_copy / MANIFEST, lambda m: m.update(format_version=True))
    with pytest.raises(EngineFormatError, match="format_version"):
        Engine(engine_copy)


def test_corrupt_weight_file_header(engine_copy):
    """Bit rot inside a weight file's JSON header (size unchanged) is a clear, typed error naming the file."""
    f = engine_copy / WEIGHT
    raw = bytearray(f.read_bytes())
    raw[8] ^= 0xFF  # the header's opening brace
    f.write_bytes(bytes(raw))
    for check in (False, True):
        with pytest.raises((EngineFormatError, SafetensorsFormatError)) as ei:
            Engine(engine_copy, check=check)
        assert WEIGHT in str(ei.value)


# -- atomic output ------------------------------------------------------------------------


def test_existing_output_refused(tiny_llama, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        convert_hf_to_engine(tiny_llama, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert not (out / MANIFEST).exists()
    assert _leftovers(tmp_path) == []


def test_force_replaces_output(tiny_llama, tmp_path):
    out = tmp_path / "e"
    convert_hf_to_engine(tiny_llama, out)
    (out / "stale.txt").write_text("old")  # an old engine with something extra: replaced whole
    convert_hf_to_engine(tiny_llama, out, force=True)
    assert not (out / "stale.txt").exists()
    Engine(out, check=True)
    assert _leftovers(tmp_path) == []


def test_force_refuses_to_replace_a_file(tiny_llama, tmp_path):
    out = tmp_path / "e"
    out.write_text("a file")
    with pytest.raises(OutputExistsError, match="not a directory"):
        convert_hf_to_engine(tiny_llama, out, force=True)
    assert out.read_text() == "a file"


def _failing_produce(after, exc):
    real = h2e.produce

    def produce(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == after:
                raise exc
            yield item

    return produce


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing(tiny_llama, tmp_path, monkeypatch, exc):
    monkeypatch.setattr(h2e, "produce", _failing_produce(4, exc))
    out = tmp_path / "e"
    with pytest.raises(type(exc)):
        convert_hf_to_engine(tiny_llama, out)
    assert not out.exists()
    assert _leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == []


def test_failure_midway_keeps_old_output(tiny_llama, tiny_engine, tmp_path, monkeypatch):
    out = copy_tree(tiny_engine, tmp_path / "e")
    before = (out / MANIFEST).read_text()
    monkeypatch.setattr(h2e, "produce", _failing_produce(6, RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        convert_hf_to_engine(tiny_llama, out, force=True)
    assert (out / MANIFEST).read_text() == before
    Engine(out, check=True)
    assert _leftovers(tmp_path) == []


def test_disk_full_in_a_writer_thread_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    """ENOSPC in the background writer thread surfaces as the one DiskFullError, no output left."""
    import errno

    import lmkiln.formats.safetensors_io as sio
    from lmkiln.errors import DiskFullError

    real, calls = sio.StreamWriter._write_out, []

    def full(self, fd, buf):
        calls.append(len(buf))
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fd, buf)

    monkeypatch.setattr(sio.StreamWriter, "_write_out", full)
    monkeypatch.setattr(sio, "STAGE_BYTES", 4096)
    with pytest.raises(DiskFullError, match="the disk is full"):
        convert_hf_to_engine(tiny_llama, tmp_path / "e")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_output_inside_input_refused(tmp_path, tiny_llama):
    hf = copy_tree(tiny_llama, tmp_path / "hf")
    with pytest.raises(InputError, match="must not be, contain or sit inside"):
        convert_hf_to_engine(hf, hf / "engine")
    with pytest.raises(InputError, match="must not be, contain or sit inside"):
        convert_hf_to_engine(hf, hf, force=True)
    with pytest.raises(InputError, match="must not be, contain or sit inside"):
        convert_hf_to_engine(hf, tmp_path, force=True)
    assert not (hf / "engine").exists()
    assert sorted(p.name for p in hf.iterdir()) == sorted(p.name for p in tiny_llama.iterdir())


def test_output_parent_missing(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="parent directory"):
        convert_hf_to_engine(tiny_llama, tmp_path / "no" / "e")


# -- accounting ---------------------------------------------------------------------------


@pytest.fixture
def hf_copy(tiny_llama, tmp_path):
    return copy_tree(tiny_llama, tmp_path / "hf")


def test_unknown_tensor_refused(hf_copy, tmp_path):
    add_tensor(hf_copy / "model.safetensors", "model.layers.0.mlp.extra_proj.weight", torch.zeros(4, 4))
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.extra_proj.weight") as ei:
        convert_hf_to_engine(hf_copy, tmp_path / "e")
    assert "does not account for" in str(ei.value)
    assert not (tmp_path / "e").exists()


def test_missing_tensor_refused(hf_copy, tmp_path):
    remove_tensor(hf_copy / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' \\(up\\) is missing"):
        convert_hf_to_engine(hf_copy, tmp_path / "e")


def test_missing_lm_head_when_untied(hf_copy, tmp_path):
    remove_tensor(hf_copy / "model.safetensors", "lm_head.weight")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        convert_hf_to_engine(hf_copy, tmp_path / "e")


def test_wrong_shape_refused(hf_copy, tmp_path):
    replace_tensor(hf_copy / "model.safetensors", "model.layers.0.self_attn.k_proj.weight", torch.zeros(64, 64))
    with pytest.raises(CheckpointError, match="k_proj.weight' has shape \\[64, 64\\], config.json implies \\[32, 64\\]"):
        convert_hf_to_engine(hf_copy, tmp_path / "e")


def test_config_disagrees_with_weights(hf_copy, tmp_path):
    edit_json(hf_copy / "config.json", lambda c: c.update(intermediate_size=128))
    with pytest.raises(CheckpointError, match="gate_proj.weight' has shape"):
        convert_hf_to_engine(hf_copy, tmp_path / "e")


def test_unsupported_architecture(hf_copy, tmp_path):
    edit_json(hf_copy / "config.json", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(UnsupportedArchitectureError, match="'GPT2LMHeadModel' is not supported") as ei:
        convert_hf_to_engine(hf_copy, tmp_path / "e")
    for name in ARCHITECTURES:
        assert name in str(ei.value)
    assert set(ARCHS) <= set(ARCHITECTURES)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hidden_act": "gelu"}, "^config.json: activation 'gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "^config.json: rope type 'yarn'"),
        ({"partial_rotary_factor": 0.75}, r"^config.json: partial rotary embeddings \(partial_rotary_factor < 1"),
        ({"num_key_value_heads": 3}, "not a multiple of 3 kv heads"),
    ],
)
def test_unsupported_config(hf_copy, tmp_path, change, match):
    edit_json(hf_copy / "config.json", lambda c: c.update(change))
    if match.startswith("^config.json"):  # the refusal names the user's file (as the path it was given)
        match = "^" + re.escape(str(hf_copy / "config.json")) + match.removeprefix("^config.json")
    with pytest.raises(UnsupportedArchitectureError, match=match):
        convert_hf_to_engine(hf_copy, tmp_path / "e")


def test_rotary_buffers_skipped_and_recorded(hf_copy, tmp_path):
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    for i in range(2):
        add_tensor(hf_copy / "model.safetensors", f"model.layers.{i}.self_attn.rotary_emb.inv_freq", inv)
    eng = convert_hf_to_engine(hf_copy, tmp_path / "e")
    skipped = _manifest(eng)["source"]["skipped_tensors"]
    assert set(skipped) == {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)}
    assert all("recomputed" in why for why in skipped.values())
    Engine(eng, check=True)


def test_tied_checkpoint_with_lm_head_copy_skips_it(tmp_path):
    hf = make_tiny_model(tmp_path / "hf", tie_word_embeddings=True, tokenizer=False)
    emb = read_raw_header(hf / "model.safetensors")[0]["model.embed_tokens.weight"]["shape"]
    add_tensor(hf / "model.safetensors", "lm_head.weight", torch.zeros(emb))
    m = _manifest(convert_hf_to_engine(hf, tmp_path / "e"))
    assert "lm_head.weight" in m["source"]["skipped_tensors"]
    assert "output.weight" not in m["tensors"]


def test_sharded_and_single_convert_identically(tiny_llama, tiny_llama_sharded, tmp_path):
    a = convert_hf_to_engine(tiny_llama, tmp_path / "a")
    b = convert_hf_to_engine(tiny_llama_sharded, tmp_path / "b")
    ma, mb = _manifest(a), _manifest(b)
    assert ma["files"] == mb["files"]  # same bytes, same hashes
    assert ma["tensors"] == mb["tensors"]


def test_all_errors_are_lmkiln_errors():
    for cls in (CheckpointError, ChecksumError, EngineFormatError, InputError, OutputExistsError, UnsupportedArchitectureError):
        assert issubclass(cls, LmkilnError) and cls.exit_code == 2


def test_an_engine_without_its_manifest_is_named_as_such(tmp_path):
    """The manifest is written last: an interrupted or damaged engine has weights but no
    manifest, and every command that opens it says so instead of asking for config.json."""
    from typer.testing import CliRunner

    from lmkiln.cli import app
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine
    from lmkiln.assets import bundled_model_path

    eng = convert_hf_to_engine(bundled_model_path(), tmp_path / "e")
    (eng / "manifest.json").unlink()
    for args in (["inspect", str(eng)], ["generate", str(eng), "-p", "Once", "-n", "2"]):
        r = CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert r.exit_code == 2, r.output
        assert "engine's weight files without its manifest.json" in r.output and "config.json here" not in r.output


def test_a_flipped_byte_in_an_engine_stops_generate_verify_and_export(tmp_path):
    """Weights are checked against the manifest's checksum on load (not only by inspect), by
    generate, verify and both exports; --no-check skips it."""
    from typer.testing import CliRunner

    from lmkiln.assets import bundled_model_path
    from lmkiln.cli import app
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    eng = convert_hf_to_engine(bundled_model_path(), tmp_path / "e")
    f = next(eng.glob("rank*.safetensors"))
    raw = bytearray(f.read_bytes())
    raw[-100] ^= 0x01  # inside the last tensor's data: the header still parses
    f.write_bytes(bytes(raw))
    env = {"COLUMNS": "200", "NO_COLOR": "1"}
    for args in (["generate", str(eng), "-p", "Once", "-n", "2"],
                 ["verify", str(bundled_model_path()), str(eng), "--max-tokens", "64", "--max-new-tokens", "2"],
                 # the exports too: they wrote the corrupt weights under the manifest's checksum, exit 0
                 ["export", "onnx", str(eng), "-o", str(tmp_path / "x")],
                 ["export", "gguf", str(eng), "-o", str(tmp_path / "x.gguf")]):
        r = CliRunner().invoke(app, args, env=env)
        assert r.exit_code == 2, r.output
        assert f"{f.name}: blake3" in r.output and "the file is corrupt" in r.output
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.gguf").exists()
    for args in (["generate", str(eng), "-p", "Once", "-n", "2"], ["export", "onnx", str(eng), "-o", str(tmp_path / "x")],
                 ["export", "gguf", str(eng), "-o", str(tmp_path / "x.gguf")]):
        r = CliRunner().invoke(app, [*args, "--no-check"], env=env)
        assert r.exit_code == 0, r.output


def test_integer_or_fp16_overflowing_weights_refused_by_convert(tmp_path):
    """A weight stored as an integer type converted into huge 'weights' with exit 0, and an fp32
    weight beyond float16's range became Inf under --dtype fp16 (found by a fault sweep): both
    are refused naming the tensor; bf16 holds the large one."""
    src = make_tiny_model(tmp_path / "hf")
    name = "model.layers.0.self_attn.q_proj.weight"
    w = load_hf_model(src).state_dict()[name]
    replace_tensor(src / "model.safetensors", name, torch.ones_like(w, dtype=torch.int32))
    with pytest.raises(InputError, match=rf"tensor '{name}' is stored as int32, not a floating-point type"):
        convert_hf_to_engine(src, tmp_path / "e1")
    big = w.clone()
    big[0, 0] = 1e6
    replace_tensor(src / "model.safetensors", name, big)
    with pytest.raises(InputError, match=rf"tensor '{name}' holds values beyond float16's range .*--dtype bf16 or fp32"):
        convert_hf_to_engine(src, tmp_path / "e2", dtype="fp16")
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()
    convert_hf_to_engine(src, tmp_path / "e3", dtype="bf16")


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_attention_bias_refused_in_the_config_s_words(arch, tmp_path):
    """These families' attention_bias also puts a bias on o, which no engine role holds: it was refused
    as a table bug ("the Qwen3ForCausalLM table has no tensor for role 'q_bias'")."""
    src = make_tiny_model(tmp_path / "hf", arch, attention_bias=True)
    with pytest.raises(UnsupportedArchitectureError, match=r"config.json: attention_bias is true \(biases on q/k/v/o\); "
                       rf"{arch} with biases on q/k/v/o is not supported yet"):
        convert_hf_to_engine(src, tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("key,value,says", [("max_position_embeddings", 0, "max_position_embeddings must be a positive integer"),
                                            ("rms_norm_eps", -1, "the norm epsilon ('rms_norm_eps') must be a positive number"),
                                            ("rope_theta", 0, "rope_theta must be positive"),
                                            ("eos_token_id", 512, "eos_token_id must be token ids below vocab_size 512"),
                                            ("eos_token_id", [2, "x"], "eos_token_id must be token ids below vocab_size"),
                                            ("attention_bias", True, "attention_bias is true (biases on q/k/v/o)"),
                                            ("mlp_bias", True, "mlp_bias is true (biases on gate/up/down)")])
def test_config_values_the_runners_cannot_use(key, value, says, tmp_path):
    """These converted with exit 0 into engines that lmkiln's own reader then refused (or, for a
    negative epsilon, that generated NaN and blamed the weights): refused at convert."""
    src = make_tiny_model(tmp_path / "hf")
    def edit(c):
        c[key] = value
        if isinstance(c.get("rope_parameters"), dict) and key in c["rope_parameters"]:  # transformers 5 keeps it here
            c["rope_parameters"][key] = value

    edit_json(src / "config.json", edit)
    with pytest.raises(UnsupportedArchitectureError, match=f"config.json: {re.escape(says)}"):
        convert_hf_to_engine(src, tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3MoeForCausalLM"])
def test_inspect_counts_the_sources_parameters_for_every_engine(arch, tmp_path):
    """inspect counted stored tensors: kv heads copied to every rank and per-rank group padding
    became "parameters" (a --tp 2 int4 Llama: 139,584 for 127,296)."""
    from lmkiln.inspect_model import describe
    from lmkiln.quant.awq import QuantOptions
    from lmkiln.quant.pipeline import quantize_model
    from safetensors import safe_open

    src = make_tiny_model(tmp_path / "hf", arch, tokenizer=False)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        truth = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # every source tensor is a weight here
    engines = [convert_hf_to_engine(src, tmp_path / f"fp{tp}", tp=tp) for tp in (1, 2)]
    if arch == "LlamaForCausalLM":
        awq = quantize_model(src, tmp_path / "awq", QuantOptions(bits=4, group_size=32, method="rtn"), to="hf").output
        engines.append(convert_hf_to_engine(awq, tmp_path / "q2", tp=2))
    for p in [src, *engines]:
        assert dict(describe(p, check=False)[1])["parameters"] == f"{truth:,}", p
