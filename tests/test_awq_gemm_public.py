"""lmkiln's AWQ-GEMM output is a standard AWQ checkpoint: a reader written here from the
public AutoAWQ layout alone (none of lmkiln's unpacking) dequantizes it, transformers'
own model class loads the result with strict=True from the output's config.json, and
its logits match lmkiln's engine runner on the same checkpoint.

The public layout (AutoAWQ's WQLinear_GEMM, read by transformers, vLLM, SGLang, lmdeploy):
- qweight int32 (in, out / 8): 8 output channels per word, channel 8c + ORDER[j] in
  bits 4j..4j+3;
- qzeros int32 (in / g, out / 8), packed the same way; scales fp16 (in / g, out);
- w[in, out] = (q - z) * s over groups of g input rows; the HF weight is its transpose.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import torch_threads
from lmkiln.assets import bundled_model_path
from lmkiln.convert.hf_to_engine import convert_hf_to_engine
from lmkiln.errors import InputError
from lmkiln.quant.awq import QuantOptions
from lmkiln.quant.pipeline import REPORT, CalibOptions, plan_quantize, quantize_model
from lmkiln.runtime.engine_model import EngineModel
from quant_fixtures import build_hf

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's nibble order within a word
CALIB = CalibOptions(n_samples=4, seqlen=64)


def unpack_public(packed: torch.Tensor) -> torch.Tensor:
    """(rows, out / 8) int32 -> (rows, out) codes, per the public layout."""
    rows, words = packed.shape
    out = torch.empty(rows, words * 8, dtype=torch.int64)
    p = packed.to(torch.int64) & 0xFFFFFFFF
    for j in range(8):
        out[:, ORDER[j]::8] = (p >> (4 * j)) & 0xF
    return out


def public_state_dict(d: Path) -> dict[str, torch.Tensor]:
    """An AWQ-GEMM directory's tensors with every quantized linear dequantized to an fp
    `.weight`, from the public layout and config.json alone."""
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "awq" and cfg["version"] == "gemm" and cfg["bits"] == 4
    t = load_file(str(d / "model.safetensors"))
    sd = {}
    for name, v in t.items():
        module, _, kind = name.rpartition(".")
        if kind in ("qzeros", "scales"):
            continue
        if kind != "qweight":
            sd[name] = v.float()
            continue
        q = unpack_public(v)
        z = unpack_public(t[f"{module}.qzeros"])
        s = t[f"{module}.scales"].float()
        g = q.shape[0] if cfg["group_size"] == -1 else cfg["group_size"]
        w = (q - z.repeat_interleave(g, 0)).float() * s.repeat_interleave(g, 0)
        sd[f"{module}.weight"] = w.t().contiguous()
    return sd


def load_public(d: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("quantization_config")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32).eval()
    sd = public_state_dict(d)
    if cfg.get("tie_word_embeddings"):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)  # a shape that does not match config.json fails here
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    return {"stories": bundled_model_path(), **{n: build_hf(n, root / n) for n in ("llama", "qwen2", "qwen3")}}


@pytest.mark.parametrize("model,group,method,sym", [
    ("stories", 32, "awq", False),   # FFN 172 -> 192
    ("stories", 64, "rtn", True),    # FFN 172 -> 192, symmetric
    ("llama", 32, "awq", False),     # GQA, FFN 172 -> 192
    ("qwen2", 32, "rtn", False),     # q/k/v biases, one kv head (16 wide)
    ("qwen3", 16, "awq", False),     # hidden 48, q/k norms, tied embeddings, FFN 100 -> 112
    ("llama", -1, "rtn", False),     # per channel: FFN 172 is not whole int32 words -> refused (below)
])
def test_public_reader_loads_every_output(models, model, group, method, sym, tmp_path):
    src = models[model]
    opts = QuantOptions(bits=4, group_size=group, method=method, symmetric=sym)
    if group == -1:
        with pytest.raises(InputError, match=r"per-channel scales need intermediate_size \(172\) to be a multiple of 8.*"
                                             r"group sizes that fit --to hf: 8, 16, 32, 64 \(--to engine or compressed-tensors "
                                             r"takes --group-size -1\)"):
            quantize_model(src, tmp_path / "out", opts, CALIB)
        return
    with torch_threads(1):
        out = quantize_model(src, tmp_path / "out", opts, CALIB).output
        ref = load_public(out)
        convert_hf_to_engine(out, tmp_path / "engine")
        runner = EngineModel.from_path(tmp_path / "engine", check=True)
        ids = torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = ref(ids).logits
        got = runner(ids)
    assert (got - want).abs().max() <= 1e-4, float((got - want).abs().max())
    src_inter = json.loads((src / "config.json").read_text())["intermediate_size"]
    written = json.loads((out / "config.json").read_text())["intermediate_size"]
    assert written % group == 0 and src_inter <= written < src_inter + group
    pad = json.loads((out / REPORT).read_text()).get("padding")
    assert (pad is None) == (written == src_inter)
    if pad:
        assert pad["intermediate_size"]["source"] == src_inter and pad["intermediate_size"]["written"] == written


@pytest.mark.parametrize("model,group,needle", [
    ("stories", 128, "model.layers.*.self_attn.q_proj.weight has input width 64, not a multiple of --group-size 128 "
                     "(its readers need whole groups); group sizes that fit --to hf: 8, 16, 32, 64"),
    # hidden 48, FFN 100: per channel would need a FFN width of whole int32 words; the engine pads the hidden size
    ("qwen3", 32, "model.layers.*.self_attn.q_proj.weight has input width 48, not a multiple of --group-size 32 "
                  "(its readers need whole groups); group sizes that fit --to hf: 8, 16 (--to engine takes --group-size 32)"),
])
def test_widths_that_cannot_be_padded_are_refused_before_any_work(models, model, group, needle, tmp_path):
    opts = QuantOptions(bits=4, group_size=group)
    for call in (lambda: quantize_model(models[model], tmp_path / "out", opts, CALIB),
                 lambda: plan_quantize(models[model], tmp_path / "out", opts, CALIB)):
        with pytest.raises(InputError) as e:
            call()
        assert needle in str(e.value)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.lmkiln-partial").exists()
