"""One decoder layer as a job: (layer weights, input hidden states, options, device) in,
(quantized tensors, the layer's other fp tensors, output hidden states, report) out.

This is the unit every driver schedules (the single-process loop in pipeline.py now,
other drivers later): it reads only its own layer's tensors from the checkpoint,
straight onto the compute device, and touches nothing else.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from lmkiln.convert.architectures import Architecture
from lmkiln.convert.hf_config import engine_config_from_hf
from lmkiln.convert.rope import inv_freq
from lmkiln.errors import InputError
from lmkiln.formats.awq_gemm import write_qlinear
from lmkiln.formats.hf import HFCheckpoint
from lmkiln.formats.qtensor import QTensor
from lmkiln.quant.awq import QuantOptions, Swap, awq_layer, fp_forward, layer_chunk, rtn_layer
from lmkiln.quant import moe
from lmkiln.quant.gptq import gptq_layer

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Compute:
    """Where and in which precision a job computes: chosen once per run."""

    device: torch.device
    dtype: torch.dtype

    @property
    def bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def describe(self) -> str:
        name = str(self.device)
        if self.device.type == "cuda":
            name += f" ({torch.cuda.get_device_name(self.device)})"
        return f"{name}, {str(self.dtype).replace('torch.', '')}"


def dtype_name(dtype: str | torch.dtype | None, option: str = "--dtype") -> str:
    """A compute dtype as --dtype names it, so the Python API takes torch.float32/bfloat16/
    float16 wherever it takes "fp32"/"bf16"/"fp16" (None: "auto"); a name is returned as it
    is, for the caller's own check of it. Anything else is refused in one line."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        name = next((k for k, t in COMPUTE_DTYPES.items() if t == dtype), None)
        if name is None:
            raise InputError(f"{option} {dtype}: computing needs a floating type: auto, fp32, bf16 or fp16 "
                             "(torch.float32, torch.bfloat16, torch.float16)")
        return name
    if not isinstance(dtype, str):
        raise InputError(f"{option} {dtype!r}: give auto, fp32, bf16 or fp16 (or one of torch.float32, torch.bfloat16, torch.float16)")
    return dtype


def resolve_compute(device: str = "auto", dtype: str | torch.dtype = "auto") -> Compute:
    """--device auto|cpu|cuda|cuda:N and --dtype auto|fp32|bf16|fp16 (or a torch dtype) -> Compute.

    auto: CUDA when available, else the CPU; fp32 on the CPU, bf16 on CUDA."""
    dev = resolve_device(device)
    t = dtype_name(dtype).strip().lower()
    if t == "auto":
        t = "bf16" if dev.type == "cuda" else "fp32"
    if t not in COMPUTE_DTYPES:
        raise InputError(f"--dtype {dtype!r}: use auto, fp32, bf16 or fp16")
    return Compute(dev, COMPUTE_DTYPES[t])


def resolve_device(device: str = "auto", option: str = "--device") -> torch.device:
    """--device auto|cpu|cuda|cuda:N -> a torch.device this machine has (auto: CUDA when
    available, else the CPU); anything else (an empty string too) is refused in one line
    naming `option`."""
    if isinstance(device, torch.device):  # the Python API may pass one; its str is what --device takes
        device = str(device)
    if device is not None and not isinstance(device, str):
        raise InputError(f"{option} {device!r}: use auto, cpu, cuda or cuda:N")
    d = (device if device is not None else "auto").strip().lower()
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(d)
    except RuntimeError:
        raise InputError(f"{option} {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{option} {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{option} {device}: this machine has no CUDA device usable by torch "
                             f"(torch {torch.__version__}); use {option} cpu or auto")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise InputError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0..)")
        dev = torch.device("cuda", index)
    return dev


@dataclass
class LayerResult:
    """A finished layer: what every sink takes."""

    index: int
    qtensors: dict[str, QTensor]  # linear role -> quantized weight (CPU)
    fp: dict[str, torch.Tensor]  # HF name -> every other tensor of the layer (norms with folded scales, biases)
    report: dict = field(default_factory=dict)
    _packed: dict = field(default_factory=dict, repr=False)

    def awq_gemm(self, role: str) -> dict[str, torch.Tensor]:
        """{qweight, qzeros, scales} of a linear in the AWQ-GEMM packing, computed once
        (the resume state and the AWQ-GEMM sink both write it)."""
        if role not in self._packed:
            self._packed[role] = {k: v.contiguous() for k, v in write_qlinear(self.qtensors[role]).items()}
        return self._packed[role]


class LayerModule:
    """transformers' own decoder layer for this config, materialised once on the compute
    device and refilled for each layer, so calibration runs the reference model's math.
    Layers of different kinds (Gemma's local and global layers hold their window in the
    module) get one module per kind.

    Built on the meta device from config.json alone (no weights, no remote code), with
    the attention implementation the architecture table names for calibration."""

    def __init__(self, ckpt: HFCheckpoint, arch: Architecture, compute: Compute):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt, self.arch, self.compute = ckpt, arch, compute
        config = AutoConfig.from_pretrained(str(ckpt.path), local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            self._meta = AutoModelForCausalLM.from_config(config, attn_implementation=arch.hf_attention, dtype=compute.dtype)
        cfg = getattr(config, "text_config", None) or config
        self._kinds = list(getattr(cfg, "layer_types", None) or [])
        self._modules: dict[str, torch.nn.Module] = {}

    def module(self, i: int) -> torch.nn.Module:
        """The materialised module that runs layer i (one per layer kind)."""
        kind = self._kinds[i] if i < len(self._kinds) else ""
        if kind not in self._modules:
            m = self._meta.get_submodule(self.arch.layer_prefix.format(i=i))
            if self.arch.moe:  # experts as one linear each, named as the checkpoint names them (quant/moe.py)
                moe.install(m, self.arch, engine_config_from_hf(self.arch, self.ckpt.config))
            m = m.to_empty(device=self.compute.device).to(self.compute.dtype).eval()
            self._modules[kind] = m.requires_grad_(False)
        return self._modules[kind]

    def load(self, i: int, with_master: bool = True) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
        """Layer i's weights, tensor by tensor from disk into the module on the device.

        Returns (module, master): when the module computes in a dtype narrower than fp32,
        master holds fp32 copies (exact source values) for AWQ to fold and quantize;
        in fp32 it is None and the module's own parameters serve. `with_master=False`
        skips the copies (a forward alone needs none)."""
        prefix = self.arch.layer_prefix.format(i=i)
        exact = with_master and self.compute.dtype != torch.float32
        master = {} if exact else None
        layer = self.module(i)
        for name, p in layer.state_dict(keep_vars=True).items():
            full = f"{prefix}.{name}"
            if full not in self.ckpt:
                raise InputError(f"{self.ckpt.path}: tensor {full!r} missing for decoder layer {prefix}")
            t = self.ckpt.get(full).to(self.compute.device, non_blocking=False)
            self.ckpt.check_finite(full, t, f"decoder layer {i}")
            p.data.copy_(t)
            if exact:
                master[name] = t.float()
            del t
        return layer, master


def position_embeddings(rope: dict, seqlen: int, compute: Compute):
    """cos/sin (1, T, head_dim) in HF's half-split layout, as the decoder layer takes them."""
    freqs = torch.arange(seqlen, dtype=torch.float32)[:, None] * inv_freq(rope)[None]
    emb = torch.cat([freqs, freqs], -1)[None].to(compute.device)
    return emb.cos().to(compute.dtype), emb.sin().to(compute.dtype)


def causal_mask(seqlen: int, window: int | None, compute: Compute) -> torch.Tensor:
    """(1, 1, T, T) additive mask: 0 where query q may see key k (k <= q, within the window), the
    dtype's minimum elsewhere, as transformers builds it (eager attention adds it to the scores)."""
    q = torch.arange(seqlen, device=compute.device)
    allowed = q[None, :] <= q[:, None]
    if window:
        allowed &= (q[:, None] - q[None, :]) < window
    m = torch.zeros(seqlen, seqlen, dtype=compute.dtype, device=compute.device)
    return m.masked_fill_(~allowed, torch.finfo(compute.dtype).min)[None, None]


def run_layer(mod: LayerModule, i: int, options: QuantOptions, out_dtype: torch.dtype,
              hidden: torch.Tensor | None = None, layer_kwargs: dict | None = None,
              hidden_out: torch.Tensor | None = None) -> tuple[LayerResult, torch.Tensor | None]:
    """Quantize decoder layer i. AWQ needs `hidden` (n, T, hidden), the layer's input, on
    the device or the host; it returns the ORIGINAL layer's output (into `hidden_out`
    when given). RTN needs neither."""
    t0 = time.time()
    arch = mod.arch
    layer, master = mod.load(i)
    x = hidden
    if options.method in ("awq", "awq+gptq"):
        qts, hidden, rep = awq_layer(layer, arch, x, layer_kwargs, options, i, out=hidden_out, master=master)
    elif options.method == "gptq":
        qts, hidden, rep = gptq_layer(layer, arch, x, layer_kwargs, options, i, out=hidden_out, master=master)
    else:
        qts, rep = rtn_layer(layer, arch, options, master), {"groups": [], "linears": {}}
    if options.calib_inputs == "quantized" and x is not None:
        # The next layer calibrates on this layer as stored: its (folded) module with the dequantized weights.
        with Swap(layer, {arch.module_of(r): q.dequantize() for r, q in qts.items()}):
            hidden = fp_forward(layer, x, layer_kwargs, layer_chunk(layer, x, options), hidden, i)
    qts = {r: q.map_rows(lambda t: t.cpu()) for r, q in qts.items()}
    prefix = arch.layer_prefix.format(i=i)
    linear_names = {arch.hf_name_of(r, i) for r in qts}
    params = master if master is not None else dict(layer.named_parameters())  # norms now carry the folded scales
    fp = {f"{prefix}.{n}": p.detach().to(device="cpu", dtype=out_dtype).contiguous()
          for n, p in params.items() if f"{prefix}.{n}" not in linear_names}
    if mod.compute.device.type == "cuda":
        torch.cuda.synchronize(mod.compute.device)
    rep.update({"layer": i, "seconds": round(time.time() - t0, 3), "device": str(mod.compute.device)})
    return LayerResult(i, qts, fp, rep), hidden
