"""HFCheckpoint: discovery, index/shard agreement, pickle policy and lazy tensor access."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TOKENIZER_FILES, copy_tree, edit_json, make_tiny_model
from lmkiln.errors import CheckpointError, InputError, SafetensorsFormatError
from lmkiln.formats.hf import SAFETENSORS_INDEX, HFCheckpoint


def _all_tensors(ckpt):
    return {n: ckpt.get(n).clone() for n in ckpt.keys()}


def _state_dict(model_dir):
    """Every tensor of a safetensors checkpoint via the reference library."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# -- reading ------------------------------------------------------------------------------


def test_single_file_reads_what_was_saved(tiny_llama):
    ck = HFCheckpoint(tiny_llama)
    ref = _state_dict(tiny_llama)
    assert not ck.is_pickle
    assert set(ck.keys()) == set(ref)
    assert [p.name for p in ck.weight_files()] == ["model.safetensors"]
    for n, t in ref.items():
        assert n in ck
        assert ck.shape(n) == tuple(t.shape)
        assert ck.dtype(n) == t.dtype
        assert torch.equal(ck.get(n), t)
    assert ck.architecture == "LlamaForCausalLM"
    assert ck.config["hidden_size"] == 64
    assert ck.source_dtype == torch.float32


def test_sharded_reads_identically(tiny_llama, tiny_llama_sharded):
    single, sharded = HFCheckpoint(tiny_llama), HFCheckpoint(tiny_llama_sharded)
    assert (tiny_llama_sharded / SAFETENSORS_INDEX).exists()
    assert len(sharded.weight_files()) > 2
    assert len(set(sharded.weight_map.values())) == len(sharded.weight_files())
    assert set(single.keys()) == set(sharded.keys())
    for n in single.keys():
        assert single.shape(n) == sharded.shape(n)
        assert single.dtype(n) == sharded.dtype(n)
        assert torch.equal(single.get(n), sharded.get(n)), n
    # The weight map agrees with the index on disk.
    index = json.loads((tiny_llama_sharded / SAFETENSORS_INDEX).read_text())
    assert sharded.weight_map == index["weight_map"]


def test_get_unknown_tensor(tiny_llama):
    with pytest.raises(CheckpointError, match="no.such"):
        HFCheckpoint(tiny_llama).get("no.such.tensor")


def test_tokenizer_files(tiny_llama):
    names = {p.name for p in HFCheckpoint(tiny_llama).tokenizer_files()}
    assert set(TOKENIZER_FILES) <= names
    assert "generation_config.json" in names  # written by save_pretrained
    assert "config.json" not in names and "model.safetensors" not in names
    assert all((tiny_llama / n).is_file() for n in names)


def test_tokenizer_files_absent(tmp_path):
    d = make_tiny_model(tmp_path / "m", tokenizer=False)
    (d / "generation_config.json").unlink()
    assert HFCheckpoint(d).tokenizer_files() == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_source_dtype(tmp_path, dtype):
    d = make_tiny_model(tmp_path / "m", dtype=dtype)
    ck = HFCheckpoint(d)
    assert ck.source_dtype == dtype
    assert all(ck.dtype(n) == dtype for n in ck.keys())
    assert ck.get("model.embed_tokens.weight").dtype == dtype


def test_source_dtype_is_majority_float(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file({"big": torch.zeros(100, dtype=torch.bfloat16), "small": torch.zeros(10), "ints": torch.zeros(1000, dtype=torch.int64)},
              str(d / "model.safetensors"))
    assert HFCheckpoint(d).source_dtype == torch.bfloat16


def test_missing_architectures(tmp_path, tiny_llama):
    d = copy_tree(tiny_llama, tmp_path / "m")
    edit_json(d / "config.json", lambda c: c.pop("architectures"))
    ck = HFCheckpoint(d)
    with pytest.raises(InputError, match="architectures"):
        ck.architecture


def test_architectures_not_a_list(tmp_path, tiny_llama):
    """A string where the list of class names belongs is named as such, not read as its first letter."""
    d = copy_tree(tiny_llama, tmp_path / "m")
    edit_json(d / "config.json", lambda c: c.update(architectures="LlamaForCausalLM"))
    with pytest.raises(InputError, match=r"'architectures' must be a list of class names.*not 'LlamaForCausalLM'"):
        HFCheckpoint(d).architecture


def test_single_file_beside_an_index_wins_as_in_transformers(tmp_path, tiny_llama, tiny_llama_sharded):
    """model.safetensors beside a shard index: read model.safetensors, as transformers does, so the
    reference runner and lmkiln never read different weights (here the shards hold other values)."""
    d = copy_tree(tiny_llama_sharded, tmp_path / "m")
    other = {n: t * 0.5 for n, t in _state_dict(tiny_llama).items()}
    save_file(other, str(d / "model.safetensors"), metadata={"format": "pt"})
    ck = HFCheckpoint(d)
    assert [p.name for p in ck.weight_files()] == ["model.safetensors"]
    for n, t in other.items():
        assert torch.equal(ck.get(n), t), n
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(d).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(ref[name], ck.get(name))


# -- discovery errors ---------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        HFCheckpoint(tmp_path / "absent")


def test_not_a_directory(tmp_path, tiny_llama):
    with pytest.raises(InputError, match="not a directory"):
        HFCheckpoint(tiny_llama / "config.json")


def test_no_config(tmp_path, tiny_llama):
    d = copy_tree(tiny_llama, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(InputError, match="no config.json"):
        HFCheckpoint(d)


def test_config_not_json(tmp_path, tiny_llama):
    d = copy_tree(tiny_llama, tmp_path / "m")
    (d / "config.json").write_text("{ not json")
    with pytest.raises(InputError, match="not valid JSON"):
        HFCheckpoint(d)


def test_config_not_an_object(tmp_path, tiny_llama):
    d = copy_tree(tiny_llama, tmp_path / "m")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="JSON object"):
        HFCheckpoint(d)


def test_no_weights(tmp_path, tiny_llama):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copyfile(tiny_llama / "config.json", d / "config.json")
    with pytest.raises(InputError, match="no model weights"):
        HFCheckpoint(d)


def test_loose_shards_without_index(tmp_path, tiny_llama_sharded):
    d = copy_tree(tiny_llama_sharded, tmp_path / "m")
    (d / SAFETENSORS_INDEX).unlink()
    with pytest.raises(CheckpointError, match=SAFETENSORS_INDEX):
        HFCheckpoint(d)


def test_truncated_single_file(tmp_path, tiny_llama):
    d = copy_tree(tiny_llama, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(SafetensorsFormatError, match="truncated") as ei:
        HFCheckpoint(d)
    assert "model.safetensors" in str(ei.value)


# -- index vs shards ----------------------------------------------------------------------


def test_index_lists_a_tensor_no_shard_has(tmp_path, tiny_llama_sharded):
    d = copy_tree(tiny_llama_sharded, tmp_path / "m")
    index = json.loads((d / SAFETENSORS_INDEX).read_text())
    some_shard = sorted(set(index["weight_map"].values()))[0]
    edit_json(d / SAFETENSORS_INDEX, lambda ix: ix["weight_map"].update({"model.fake.weight": some_shard}))
    with pytest.raises(CheckpointError, match="disagrees") as ei:
        HFCheckpoint(d)
    assert "model.fake.weight" in str(ei.value) and some_shard in str(ei.value)


def test_index_misses_a_tensor_a_shard_has(tmp_path, tiny_llama_sharded):
    d = copy_tree(tiny_llama_sharded, tmp_path / "m")
    removed = edit_json(d / SAFETENSORS_INDEX, lambda ix: ix["weight_map"].pop("model.norm.weight"))
    assert "model.norm.weight" not in removed["weight_map"]
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        HFCheckpoint(d)


def test_index_points_at_the_wrong_shard(tmp_path, tiny_llama_sharded):
    d = copy_tree(tiny_llama_sharded, tmp_path / "m")

    def move(ix):
        wm = ix["weight_map"]
        files = sorted(set(wm.values()))
        name = next(n for n, f in wm.items() if f == files[0])
        wm[name] = files[1]

    edit_json(d / SAFETENSORS_INDEX, move)
    with pytest.raises(CheckpointError, match="disagrees"):
        HFCheckpoint(d)


def test_missing_shard(tmp_path, tiny_llama_sharded):
    d = copy_tree(tiny_llama_sharded, tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match="missing") as ei:
        HFCheckpoint(d)
    assert victim.name in str(ei.value)


def test_index_without_weight_map(tmp_path, tiny_llama_sharded):
    d = copy_tree(tiny_llama_sharded, tmp_path / "m")
    (d / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        HFCheckpoint(d)


def test_index_not_json(tmp_path, tiny_llama_sharded):
    d = copy_tree(tiny_llama_sharded, tmp_path / "m")
    (d / SAFETENSORS_INDEX).write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        HFCheckpoint(d)


def test_truncated_shard(tmp_path, tiny_llama_sharded):
    d = copy_tree(tiny_llama_sharded, tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(SafetensorsFormatError, match=victim.name):
        HFCheckpoint(d)


# -- pickle checkpoints -------------------------------------------------------------------


@pytest.fixture
def pickle_dir(tmp_path, tiny_llama):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copyfile(tiny_llama / "config.json", d / "config.json")
    sd = _state_dict(tiny_llama)
    torch.save(sd, d / "pytorch_model.bin")
    return d, sd


def test_pickle_refused_without_opt_in(pickle_dir):
    d, _ = pickle_dir
    with pytest.raises(InputError, match="--allow-pickle"):
        HFCheckpoint(d)


def test_pickle_shards_refused_without_opt_in(tmp_path, tiny_llama):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copyfile(tiny_llama / "config.json", d / "config.json")
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(InputError, match="--allow-pickle"):
        HFCheckpoint(d)


def test_pickle_accepted_with_opt_in(pickle_dir, tiny_llama):
    d, sd = pickle_dir
    ck = HFCheckpoint(d, allow_pickle=True)
    assert ck.is_pickle
    assert set(ck.keys()) == set(sd)
    ref = HFCheckpoint(tiny_llama)
    for n, t in sd.items():
        assert ck.shape(n) == ref.shape(n) and ck.dtype(n) == ref.dtype(n)
        assert torch.equal(ck.get(n), t)
    assert ck.source_dtype == torch.float32
    assert [p.name for p in ck.weight_files()] == ["pytorch_model.bin"]


def test_pickle_sharded_with_index(tmp_path, tiny_llama):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copyfile(tiny_llama / "config.json", d / "config.json")
    sd = _state_dict(tiny_llama)
    names = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2], "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for fname, ns in halves.items():
        torch.save({n: sd[n] for n in ns}, d / fname)
    wm = {n: f for f, ns in halves.items() for n in ns}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    ck = HFCheckpoint(d, allow_pickle=True)
    assert ck.weight_map == wm
    assert all(torch.equal(ck.get(n), sd[n]) for n in names)


class _Evil:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_code_is_never_run(tmp_path, tiny_llama):
    """weights_only=True refuses arbitrary objects: a clear error, and the payload never runs."""
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copyfile(tiny_llama / "config.json", d / "config.json")
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    _Evil.marker = marker
    torch.save({"w": torch.zeros(2), "payload": evil}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only.*get safetensors weights") as e:
        HFCheckpoint(d, allow_pickle=True)
    assert "\n" not in str(e.value)  # torch's explanation is a paragraph: its first line only
    assert not marker.exists()


def test_a_model_replaced_while_it_is_read_is_read_whole_as_it_was(tmp_path):
    """Another run writing the model with --force (a new directory renamed into place) while convert
    or quantize read it: the rest of the tensors came from the new files, some at the old offsets
    (found by a fault sweep: an engine half old, half garbage, checksums holding, exit 0)."""
    src = make_tiny_model(tmp_path / "m", seed=0, max_shard_size="40KB")
    reference = HFCheckpoint(make_tiny_model(tmp_path / "same", seed=0, max_shard_size="40KB"))  # the old model's twin
    ckpt = HFCheckpoint(src)
    first = ckpt.keys()[0]
    assert torch.equal(ckpt.get(first), reference.get(first))  # reading has begun
    make_tiny_model(tmp_path / "new", seed=1, max_shard_size="40KB", intermediate_size=96)  # other values, other offsets
    shutil.rmtree(src)
    (tmp_path / "new").rename(src)
    new = HFCheckpoint(src)
    assert not torch.equal(new.get(first), reference.get(first))
    for n in ckpt.keys():
        assert torch.equal(ckpt.get(n), reference.get(n)), n


def test_a_fifo_in_place_of_a_weight_file_is_refused_not_waited_on(tmp_path, tiny_llama):
    """Opening it blocked until a writer came: inspect, convert and quantize hung for good."""
    import os

    src = copy_tree(tiny_llama, tmp_path / "m")
    (src / "model.safetensors").unlink()
    os.mkfifo(src / "model.safetensors")
    with pytest.raises(SafetensorsFormatError, match="model.safetensors: not a regular file"):
        HFCheckpoint(src)


def test_check_finite_scans_each_tensor_once_and_refuses_every_time(tiny_llama, monkeypatch):
    """quantize --to engine read the embedding and head twice (its driver's check, then the engine sink's
    reader) and scanned them twice; a tensor that passed is not scanned again, one that failed always fails."""
    import lmkiln.formats.hf as hf

    ckpt = HFCheckpoint(tiny_llama)
    scans = []
    real = hf.all_finite
    monkeypatch.setattr(hf, "all_finite", lambda t: scans.append(t.numel()) or real(t))
    name = "model.embed_tokens.weight"
    for _ in range(3):
        ckpt.check_finite(name, ckpt.get(name))
    assert len(scans) == 1
    bad = ckpt.get("model.norm.weight")
    bad[0] = float("inf")
    for _ in range(2):
        with pytest.raises(InputError, match=r"tensor 'model.norm.weight' \(shape \(\d+,\)\) contains NaN or Inf"):
            ckpt.check_finite("model.norm.weight", bad)
    assert len(scans) == 3
