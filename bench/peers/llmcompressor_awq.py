#!/usr/bin/env python3
"""llm-compressor's AWQ (or GPTQ) on CPU, on calibration token ids given as a tensor file.

Peer run for a side-by-side comparison with lmkiln's AWQ: same model, same calibration
ids, W4A16 asymmetric, group 128, zero points. Run it with the bench venv's python
(bench/peers/setup_llmcompressor.sh makes it), never with lmkiln's .venv:

    bench/out/venv-llmcompressor/bin/python bench/peers/llmcompressor_awq.py \
        --model bench/out/synth-1b-L1 --ids IDS.pt --out OUT_DIR \
        --group-size 128 --json RESULT.json [--check] [--threads N] \
        [--method awq|gptq] [--down group|channel|ignore]

--method gptq: llm-compressor's GPTQModifier with its defaults (dampening 0.01, static
activation order, block 128) instead of AWQ + round-to-nearest.
--down: how mlp.down_proj is quantized. llm-compressor needs a layer's input width to be a
multiple of the group size (no padding); where it is not (stories260K: 172), `channel`
quantizes down_proj per output channel at the same bit width and `ignore` keeps it in fp.

--ids: a torch .pt file holding an int64 tensor (n_samples, seqlen). It is used as is
(nothing is tokenized here): num_calibration_samples = n_samples, max_seq_length = seqlen.

Writes
  --json  {"seconds": wall s of the oneshot() call only, "torch_threads", "versions",
           "dtype", ...}
  --out   a plain HF fp32 checkpoint (no quantization_config): every quantized linear
          holds the fake-quantized (dequantized) weight llm-compressor's scales/zero
          points imply, the norms hold AWQ's smoothing, everything else is copied from
          the model; tokenizer files copied from --model.
--check   prints the MSE of layer 0's output (fake-quant vs the original fp32 model) on
          the calibration ids, next to plain RTN (same scheme, no AWQ) and a consistency
          check of the saved checkpoint against llm-compressor's own in-memory
          fake-quant forward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

# Everything is local: never let transformers / datasets try a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No GPU here; make sure nothing picks one up if this runs on a machine that has one.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def patch_pin_memory() -> str:
    """Make IntermediatesCache.pin_memory a no-op.

    llm-compressor 0.14's AWQModifier._apply_smoothing calls
    `cache.pin_memory(batch_index)` on every cached batch before each mapping's grid
    search (llmcompressor/modifiers/transform/awq/base.py), which calls
    `Tensor.pin_memory()` on every CPU tensor (llmcompressor/pipelines/cache.py,
    IntermediatesCache._pin_intermediate). Pinning only speeds host->device copies and
    needs an accelerator: on a CPU-only torch it raises. With everything on CPU the
    cached tensors are used where they are, so skipping the pin changes no result.
    Patched here at run time; site-packages is not edited.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    def pin_memory(self, batch_index, input_names=None):  # noqa: ARG001 - same signature
        return None

    IntermediatesCache.pin_memory = pin_memory
    return "llmcompressor.pipelines.cache.IntermediatesCache.pin_memory"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in ("llmcompressor", "compressed-tensors", "torch", "transformers", "accelerate",
              "datasets", "numpy", "safetensors"):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def load_ids(path: str) -> torch.Tensor:
    ids = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        sys.exit(f"--ids {path}: expected a 2-D tensor (n_samples, seqlen), got "
                 f"{type(ids).__name__} {getattr(ids, 'shape', '')}")
    if ids.dtype != torch.int64:
        sys.exit(f"--ids {path}: expected int64 token ids, got {ids.dtype}")
    return ids.contiguous()


def load_model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None)
    m.eval()
    return m.to("cpu")


def recipe(group_size: int, method: str = "awq", down: str = "group"):
    """AWQ smoothing (default Llama mappings) + W4 asym group-g weight quantization.

    In llm-compressor 0.14 AWQModifier is a transform only; the quantization itself is a
    QuantizationModifier next to it (the documented "new API"). With group 128 this is
    exactly the W4A16_ASYM preset; it is spelled out so --group-size can change it.
    """
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme,
                                                 QuantizationStrategy, QuantizationType)
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = QuantizationArgs(num_bits=4, type=QuantizationType.INT, strategy=QuantizationStrategy.GROUP,
                               group_size=group_size, symmetric=False, dynamic=False)
    if down == "group":
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    else:  # every linear but down_proj group-wise; down_proj per channel, or not at all
        groups = {"group_0": QuantizationScheme(targets=[r"re:.*(q|k|v|o|gate|up)_proj$"], weights=weights)}
        if down == "channel":
            per_channel = QuantizationArgs(num_bits=4, type=QuantizationType.INT, strategy=QuantizationStrategy.CHANNEL,
                                           symmetric=False, dynamic=False)
            groups["group_1"] = QuantizationScheme(targets=[r"re:.*down_proj$"], weights=per_channel)
    if method == "gptq":  # GPTQModifier defaults: dampening_frac 0.01, actorder static, block_size 128
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])], weights
    # AWQModifier defaults: mappings inferred for LlamaForCausalLM (input_layernorm ->
    # q/k/v, v -> o, post_attention_layernorm -> gate/up, up -> down), duo_scaling=True,
    # n_grid=20, no offload.
    return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])], weights


def calibration_dataset(ids: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


@torch.no_grad()
def fake_quant_weights(model) -> dict[str, torch.Tensor]:
    """name -> fp32 dequantized weight of every linear llm-compressor quantized."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    out = {}
    for name, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(mod, "weight_scale"):
            continue
        w = forward_quantize(mod, mod.weight.data, "weight", scheme.weights)
        out[f"{name}.weight"] = w.detach().float().cpu().contiguous()
    return out


@torch.no_grad()
def rtn_weight(w: torch.Tensor, group: int, bits: int = 4) -> torch.Tensor:
    """Plain asymmetric min/max round-to-nearest fake quant, for the --check baseline."""
    o, i = w.shape
    g = w.float().reshape(o, i // group, group)
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    qmax = 2 ** bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
    return ((q - zero) * scale).reshape(o, i)


@torch.no_grad()
def layer0_output(model, ids: torch.Tensor) -> torch.Tensor:
    """Output hidden states of decoder layer 0 for the calibration ids (one sample at a time)."""
    got = []
    h = model.model.layers[0].register_forward_hook(
        lambda _m, _a, out: got.append((out[0] if isinstance(out, tuple) else out).detach().float()))
    try:
        for row in ids:
            model.model(input_ids=row[None], use_cache=False)
    finally:
        h.remove()
    return torch.cat(got)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local HF Llama directory")
    ap.add_argument("--ids", required=True, help=".pt file: int64 tensor (n_samples, seqlen)")
    ap.add_argument("--out", required=True, help="where the fp32 fake-quant HF checkpoint goes")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json", help="write timing / versions here")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype the model is loaded and calibrated in (default float32)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--check", action="store_true", help="print layer-0 output MSE vs the fp model")
    ap.add_argument("--method", choices=("awq", "gptq"), default="awq")
    ap.add_argument("--down", choices=("group", "channel", "ignore"), default="group",
                    help="mlp.down_proj: group-wise like the rest (default), per output channel, or kept in fp")
    a = ap.parse_args()

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    patched = patch_pin_memory()

    from llmcompressor import oneshot

    ids = load_ids(a.ids)
    n, seqlen = ids.shape
    model = load_model(a.model, dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        sys.exit(f"--ids: token ids out of range [0, {vocab})")
    mods, wargs = recipe(a.group_size, a.method, a.down)
    ds = calibration_dataset(ids)

    t0 = time.perf_counter()
    model = oneshot(model=model, dataset=ds, recipe=mods, num_calibration_samples=n, max_seq_length=seqlen,
                    shuffle_calibration_samples=False, batch_size=1)
    seconds = time.perf_counter() - t0
    # Peak RSS so far (KiB): the caller's /usr/bin/time -v also counts the export and
    # --check below, which hold a second fp32 copy of the model.
    maxrss_oneshot = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"oneshot: {seconds:.2f} s ({n} x {seqlen} tokens, torch threads {torch.get_num_threads()})", flush=True)

    # -- the plain fp32 checkpoint the result implies ---------------------------------------
    fq = fake_quant_weights(model)
    expected = {f"model.layers.{i}.{l}.weight" for i in range(model.config.num_hidden_layers) for l in LINEARS
                if not (a.down == "ignore" and l == "mlp.down_proj")}
    if set(fq) != expected:
        sys.exit(f"quantized linears {sorted(fq)} != the expected {sorted(expected)}")
    export = load_model(a.model, torch.float32)  # an un-patched module tree to save from
    src = {k: v.detach() for k, v in model.state_dict().items()}
    sd = {}
    for k in export.state_dict():
        sd[k] = fq[k] if k in fq else src[k].float()
    export.load_state_dict(sd, strict=True)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    export.config.dtype = torch.float32
    export.save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (Path(a.model) / f).exists():
            shutil.copyfile(Path(a.model) / f, out / f)
    print(f"fake-quant fp32 checkpoint: {out}", flush=True)

    result = {
        "tool": "llmcompressor", "method": a.method, "down_proj": a.down,
        "seconds": round(seconds, 3),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "dtype": str(dtype).replace("torch.", ""),
        "ru_maxrss_kib_after_oneshot": maxrss_oneshot,
        "device": "cpu",
        "scheme": {"bits": 4, "group_size": a.group_size, "symmetric": False,
                   "zero_point": True, "preset": "W4A16_ASYM" if a.group_size == 128 else None},
        "awq": {"duo_scaling": True, "n_grid": 20, "mappings": "llm-compressor default (LlamaForCausalLM)",
                "clip_search": False} if a.method == "awq" else None,
        "gptq": {"dampening_frac": 0.01, "actorder": "static", "block_size": 128} if a.method == "gptq" else None,
        "calibration": {"n_samples": n, "seqlen": seqlen, "ids": os.path.abspath(a.ids)},
        "model": os.path.abspath(a.model), "out": os.path.abspath(a.out),
        "patched": [patched],
    }

    if a.check:
        ref = load_model(a.model, torch.float32)
        y_ref = layer0_output(ref, ids)
        y_q = layer0_output(export, ids)
        y_ct = layer0_output(model, ids)  # llm-compressor's own fake-quant forward, in memory
        for name, mod in ref.model.layers[0].named_modules():
            if name in LINEARS:
                mod.weight.data = rtn_weight(mod.weight.data, a.group_size)
        y_rtn = layer0_output(ref, ids)
        p = y_ref.pow(2).mean().item()
        mse = (y_q - y_ref).pow(2).mean().item()
        mse_rtn = (y_rtn - y_ref).pow(2).mean().item()
        cons = (y_q - y_ct.float()).abs().max().item()
        print(f"check layer0 output MSE vs fp32: awq {mse:.6e} (rel {mse / p:.3e})  "
              f"rtn {mse_rtn:.6e} (rel {mse_rtn / p:.3e})  awq/rtn {mse / mse_rtn:.3f}", flush=True)
        print(f"check saved checkpoint vs llm-compressor in-memory forward: max |diff| {cons:.3e}", flush=True)
        result["check"] = {"layer0_mse_awq": mse, "layer0_mse_rtn": mse_rtn, "ref_mean_square": p,
                           "awq_over_rtn": mse / mse_rtn, "saved_vs_inmemory_max_abs": cons}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
