"""The plan of a quantize run, from config.json and safetensors headers alone: layers,
bytes, the peak memory formula, disk needs. `lmkiln quantize --dry-run` prints it; a
real run prints the estimate and refuses to start when the output's disk is too small.

Memory model (docs/quantize.md explains each term; b = bytes per element of the
calibration dtype, N x T calibration tokens, h hidden, I intermediate):

    weights   W = P * b  (+ P * 4 when b < 4: the fp32 master copy AWQ folds into)
    search    S = G * b + 2 * L * 4  G = the largest scale group's weights (gate+up),
                                     L = the largest linear's
    packing   K = 3 * L * 8          the AWQ-GEMM packing's int64 temporaries (host, after the job)
    hidden    H = 2 * N * T * h * b  the layer's input and output hidden states
    chunk     A = c*T * (4*I*b + h*4) + M * (10*I*b + h*4)   c samples per chunk,
                                     M = tokens per forward (2048)
    clip      C = 2^22 * 4 * 4       the clip search's batched contributions
    device peak = W + S + A + C (+ H when the hidden states fit on the device)
    host peak   = runtime baseline + 2 * largest tensor + K + (H when kept on the host)

On the CPU device and host are one: baseline + largest tensor + max(W+S+A+C, W+K) + H.
RTN needs W + K. The constants were fitted on
measured runs (docs/BENCHMARKS.md compares estimate and measurement).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmkiln.convert.architectures import LINEAR_ROLES, Architecture, expand_experts, is_linear
from lmkiln.convert.hf_to_engine import required_roles, role_shapes
from lmkiln.convert.quantized import module_name
from lmkiln.formats.awq_gemm import PACK
from lmkiln.formats.packing import round_up
from lmkiln.formats.hf import HFCheckpoint
from lmkiln.formats.space import free_bytes
from lmkiln.quant.awq import QuantOptions, input_owners, linear_roles, micro, resolve_chunk
from lmkiln.quant.job import Compute
from lmkiln.quant.gptq import HESSIAN_ROWS

GIB = 1 << 30
HOST_BASELINE = 512 << 20  # python, torch, transformers, lmkiln CLI, an empty layer, allocator slack (fitted; imports alone: 240 MiB)
CLIP_BYTES = (1 << 22) * 4 * 4
# Fitted on a 1B-shaped layer at chunks of 4 and 16 samples (1.68 and 2.29 GiB measured):
CHUNK_PER_TOKEN = (4, 1)  # per resident token: intermediate-wide (calibration dtype), hidden-wide (fp32) rows
FORWARD_PER_TOKEN = (10, 1)  # per token of one forward (micro-batch): the MLP's intermediates and scoring temporaries


def chunk_bytes(tokens: int, hidden: int, inter: int, b: int) -> int:
    """The part of the A term that grows with the resident chunk (captured inputs, references)."""
    return tokens * (CHUNK_PER_TOKEN[0] * inter * b + CHUNK_PER_TOKEN[1] * hidden * 4)


@dataclass
class QuantPlan:
    n_layers: int
    layer_params: int
    layer_bytes: int  # one layer's tensors as stored in the source
    largest_tensor_bytes: int
    weights: int
    search: int
    hidden: int
    chunk: int
    clip: int
    hidden_on_device: bool
    peak_device: int  # == peak_host on the CPU
    peak_host: int
    output_bytes: int
    state_bytes: int
    free_disk: int
    compute: Compute
    calib_tokens: int
    hessians: int = 0  # H = 2XᵀX per distinct linear input, fp32 (GPTQ rounding; every method's per-linear MSE)

    @property
    def disk_needed(self) -> int:
        return self.output_bytes + self.state_bytes

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) lines for a table; sizes in GiB."""
        g = human
        on_cuda = self.compute.device.type == "cuda"
        rows = [
            ("device", self.compute.describe()),
            ("decoder layers", str(self.n_layers)),
            ("params per layer", f"{self.layer_params / 1e6:.1f} M"),
            ("bytes per layer (source)", g(self.layer_bytes)),
            ("calibration tokens", f"{self.calib_tokens:,}"),
            ("W layer weights (+fp32 master)", g(self.weights)),
            ("S search working copies", g(self.search)),
            ("H hidden states (in + out)", g(self.hidden) + (" on device" if on_cuda and self.hidden_on_device else " on host" if on_cuda else "")),
            ("A one chunk of activations", g(self.chunk)),
            ("C clip search", g(self.clip)),
            ("X Hessians (one per linear input, fp32)", g(self.hessians)),
        ]
        if on_cuda:
            rows.append(("peak device memory (est.)", g(self.peak_device)))
        rows += [
            ("peak host RAM (est.)", g(self.peak_host)),
            ("output on disk", g(self.output_bytes)),
            ("resume state on disk", g(self.state_bytes)),
            ("free disk at the output", g(self.free_disk)),
        ]
        return rows


def human(n: float) -> str:
    """Bytes as GiB, MiB or KiB, whichever reads best."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size or unit == "KiB":
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layer_linears(arch: Architecture, model: dict, i: int) -> dict[str, tuple[str, tuple[int, int]]]:
    """role -> (HF module, (out, in)) of layer i's quantized linears."""
    shapes = role_shapes(model)
    roles = expand_experts([r for r in LINEAR_ROLES if r in arch.tensors], model.get("num_experts") or 0)
    return {r: (module_name(arch, r, i), shapes[r]) for r in roles}


def qlinear_bytes(out_f: int, in_f: int, o: QuantOptions) -> int:
    """Stored bytes of one quantized linear in AWQ-GEMM (and, within a few %, the engine)."""
    g = o.group_for(in_f)
    i_p, o_p = round_up(in_f, g), round_up(out_f, PACK[o.bits])
    return i_p * o_p * o.bits // 8 + (i_p // g) * o_p * (2 + o.bits / 8)


def make_plan(ckpt: HFCheckpoint, arch: Architecture, model: dict, o: QuantOptions, compute: Compute,
              n_samples: int, seqlen: int, out_dir: Path, device_free: int | None = None) -> QuantPlan:
    """`n_samples` x `seqlen` calibration tokens (ignored for RTN); `device_free`: bytes free
    on the CUDA device, to decide where the hidden states live (None: assume they fit)."""
    n_tokens = n_samples * seqlen if o.calibrated else 0
    glob, layer_roles = required_roles(model, arch)
    shapes = role_shapes(model)
    src_b = torch.empty((), dtype=ckpt.source_dtype).element_size()
    per_layer = sum(_numel(shapes[r]) for r in layer_roles)
    lin = {r: shapes[r] for r in layer_roles if is_linear(r)}
    b = compute.bytes
    groups = ([sum(_numel(shapes[r]) for r in gr.linears) for gr in arch.scale_groups(model.get("num_experts") or 0)]
              or [max(_numel(s) for s in lin.values())])
    h, inter = model["hidden_units"], model["inter_size"]
    awq = o.calibrated
    weights = per_layer * b + (per_layer * 4 if b < 4 else 0)
    largest_linear = max(_numel(s) for s in lin.values())
    search = max(groups) * b + 2 * largest_linear * 4
    pack = 3 * largest_linear * 8  # AWQ-GEMM packing's int64 temporaries, on the host after the job
    hidden = 2 * n_tokens * h * b if awq else 0
    widest = max(max(s[0] for s in lin.values()), h)
    m = micro(seqlen)
    chunk_tokens = min(n_samples, -(-resolve_chunk(o, compute.device, seqlen, h, widest, b) // m) * m) * seqlen if awq else 0
    micro_tokens = min(n_samples, m) * seqlen if awq else 0
    chunk = chunk_bytes(chunk_tokens, h, inter, b) + micro_tokens * (FORWARD_PER_TOKEN[0] * inter * b + FORWARD_PER_TOKEN[1] * h * 4)
    clip = CLIP_BYTES if awq and o.clip else 0
    # every calibrated method keeps one in x in fp32 Hessian per distinct linear input for the
    # whole layer job (q/k/v share one, gate/up share one; each expert has its own)
    owners = input_owners(arch, linear_roles(arch, model.get("num_experts") or 0)) if awq else {}
    ins = [shapes[next(r for r in owners if owners[r] == m)][1] for m in set(owners.values())]
    # + the fp32 block of tokens hessian_update adds at a time (its only temporary)
    hessians = sum(i * i * 4 for i in ins) + (min(HESSIAN_ROWS, chunk_tokens) * max(ins) * 4 if ins else 0)
    work = weights + search + chunk + clip + hessians
    largest = max(_numel(ckpt.shape(n)) * torch.empty((), dtype=ckpt.dtype(n)).element_size() for n in ckpt.keys())
    on_cuda = compute.device.type == "cuda"
    hidden_on_device = on_cuda and (device_free is None or work + hidden < 0.9 * device_free)
    if on_cuda:
        peak_device = work + (hidden if hidden_on_device else 0)
        peak_host = HOST_BASELINE + 2 * largest + pack + (0 if hidden_on_device else hidden)
    else:
        peak_device = peak_host = HOST_BASELINE + largest + max(work, weights + pack) + hidden
    fp_global = sum(_numel(ckpt.shape(arch.hf_name_of(r))) for r in glob) * src_b
    fp_layer = sum(_numel(shapes[r]) for r in layer_roles if not is_linear(r)) * src_b
    q_layer = sum(qlinear_bytes(*s, o) for s in lin.values()) + fp_layer
    n = model["num_layer"]
    output = int(fp_global + n * q_layer)
    state = int(n * q_layer + (n_tokens * h * b * 2 if awq else 0))
    free = free_bytes(Path(out_dir).absolute().parent)  # the nearest existing folder: --dry-run may name a new one
    return QuantPlan(n, per_layer, per_layer * src_b, largest, weights, search, hidden, chunk, clip, hidden_on_device,
                     int(peak_device), int(peak_host), output, state, free, compute, n_tokens, hessians)

