"""Side files of an ONNX export: onnxruntime-genai's genai_config.json and a Triton
model repository (`model_repository/NAME/1/model.onnx` + `config.pbtxt`)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import onnx

from lmkiln.convert.architectures import get_architecture

PROVIDERS = {"cpu": [], "cuda": [{"cuda": {}}]}


def genai_config(model: dict, ep: str, filename: str = "model.onnx", share_buffer: bool = False) -> dict:
    """onnxruntime-genai's decoder-only config for our graph's input/output names.

    share_buffer: genai preallocates each layer's cache at max_length and binds past and
    present to the same buffer (GroupQueryAttention writes the new rows in place); False
    for graphs that build present by concatenation (the portable one)."""
    eos = list(model.get("eos_token_id") or [])
    ctx = int(model["max_position_embeddings"])
    return {
        "model": {
            "bos_token_id": model.get("bos_token_id") if model.get("bos_token_id") is not None else (eos[0] if eos else 0),
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": PROVIDERS[ep]},
                "filename": filename,
                "head_size": model["size_per_head"],
                "hidden_size": model["hidden_units"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": model["head_num"],
                "num_hidden_layers": model["num_layer"],
                "num_key_value_heads": model["kv_head_num"],
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": model["pad_token_id"] if model.get("pad_token_id") is not None else (eos[0] if eos else 0),
            "type": get_architecture(model["architecture"]).genai_type,
            "vocab_size": model["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


TRITON_TYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                onnx.TensorProto.INT32: "TYPE_INT32"}


def triton_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"


def _io(v) -> str:
    t = v.type.tensor_type
    dims = ", ".join(str(d.dim_value) if d.HasField("dim_value") else "-1" for d in t.shape.dim)
    return f'  {{\n    name: "{v.name}"\n    data_type: {TRITON_TYPES[t.elem_type]}\n    dims: [ {dims} ]\n  }}'


def triton_config(model: onnx.ModelProto, name: str, ep: str) -> str:
    """config.pbtxt: explicit batch dim (max_batch_size 0), -1 for every dynamic dim."""
    g = model.graph
    kind = "KIND_GPU" if ep == "cuda" else "KIND_CPU"
    sep = ",\n"
    ins, outs = sep.join(_io(v) for v in g.input), sep.join(_io(v) for v in g.output)
    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
            f"input [\n{ins}\n]\noutput [\n{outs}\n]\n"
            f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n")


def write_triton(out: Path, model: onnx.ModelProto, name: str, ep: str, files: list[str]) -> Path:
    """model_repository/NAME/{config.pbtxt, 1/model.onnx (+ data)}. The files are copied:
    onnx and onnxruntime refuse external data with several hard links (a hardlink-attack guard)."""
    name = triton_name(name)
    ver = out / "model_repository" / name / "1"
    ver.mkdir(parents=True)
    for f in files:
        shutil.copyfile(out / f, ver / f)
    (ver.parent / "config.pbtxt").write_text(triton_config(model, name, ep), encoding="utf-8")
    return ver.parent
