"""Activation-aware weight quantization (AWQ) of one decoder layer, streamed over chunks.

Objective (Lin et al., 2023): for each group of linears that read the same input X,
find a per-input-channel scale s minimising

    || f(X; W) - f(X / s; Q(W * s)) ||^2

where f is the module the group feeds (the whole attention block for q/k/v, so the
search sees softmax effects), Q is group-wise round-to-nearest, and s = mean|X|^a
(AutoAWQ's "duo" variant: mean|X|^a / mean|W_normalised|^(1-a)), a on a 20-point grid.
s is folded into the op that produces X (a norm weight, or the previous linear's
rows), so the fp model is unchanged and only the quantization error moves. Then a
clip search shrinks each weight group's range to (1 - i/20) * max, i < 10, keeping the
ratio with the least error of that group's contribution to the output. q/k are not
clipped: their error passes through softmax, which the per-output proxy ignores.

Memory: nothing here holds (all tokens x intermediate width). The calibration hidden
states X (n, T, hidden) and the layer's fp output stay where the caller keeps them
(device or host); every pass moves `chunk` samples at a time to the layer's device:

- pass 1 (statistics): the fp output, mean |input| per group, the clip-search tokens;
- pass 2 (search): each chunk's inputs are captured once and every grid point of every
  group is scored on them, the squared error summed per grid point in float64;
- pass 3 (report): each group's error as stored, and the whole quantized layer's.

Each search sees the ORIGINAL layer (scales are folded after all searches, as AutoAWQ),
so one forward per micro-batch serves all groups. Weights the search changes are kept in an
fp32 master copy (the module itself when it computes in fp32); the module only ever
receives casts of it, so bf16/fp16 calibration never folds or quantizes in low precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lmkiln.convert.architectures import LINEAR_ROLES, Architecture, ScaleGroup, expand_experts, expert_of, is_linear
from lmkiln.errors import QuantizationError
from lmkiln.formats.packing import round_up
from lmkiln.formats.qtensor import QTensor
from lmkiln.quant.gptq import gptq_quantize, hessian_update, output_mse
from lmkiln.quant.moe import layer_experts
from lmkiln.quant.primitives import compute_qparams, fake_quantize, fake_quantize_, pad_to_multiple, quantize

NO_CLIP_ROLES = ("q", "k")
# Samples per forward. Matmul results depend on the number of rows (kernels block them
# differently), so every forward runs on micro(T) samples (MICRO_TOKENS tokens) at global
# sample offsets that are multiples of it: results are then the same for any --chunk. 4 x 512 tokens is as fast
# per token on a CPU as 16 x 512 (measured); one sample at a time was 23 % slower.
MICRO_TOKENS = 2048


def micro(seqlen: int) -> int:
    """Samples per forward for windows of `seqlen` tokens (4 for 512)."""
    return max(1, MICRO_TOKENS // max(1, seqlen))


@dataclass(frozen=True)
class QuantOptions:
    bits: int = 4
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = False
    method: str = "awq"  # "awq" | "rtn" | "gptq" | "awq+gptq" (AWQ's scales, then GPTQ rounding)
    clip: bool = True
    duo_scaling: bool = True
    n_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512  # tokens sampled for the clip search, as AutoAWQ
    chunk: int = 0  # calibration samples resident on the device at once (rounded up to a multiple of micro()); 0 = auto
    damp: float = 0.01  # GPTQ: Hessian dampening, a fraction of its mean diagonal
    act_order: bool = False  # GPTQ: visit columns by decreasing Hessian diagonal (static groups)
    # An expert routed fewer calibration tokens than this gets no scale search, clip or GPTQ
    # rounding of its own (too little data: NaN or overfit scales): round-to-nearest, reported.
    min_expert_tokens: int = 16
    # What feeds layer i+1's calibration: "fp", the original model's layer-i output (every layer
    # job independent of the others' results, so --ray runs them side by side), or "quantized",
    # the quantized layer i's output: each layer is calibrated on the inputs the quantized model
    # will really give it (GPTQ's and llm-compressor's sequential order), one layer after another.
    calib_inputs: str = "fp"

    @property
    def calibrated(self) -> bool:
        """Whether the method needs calibration activations (all but RTN)."""
        return self.method != "rtn"

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def qdq(w: torch.Tensor, o: QuantOptions, clip_max: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize an (out, in) weight, zero-padding `in` to the group size."""
    g = o.group_for(w.shape[1])
    wp, n = pad_to_multiple(w, 1, g)
    return fake_quantize(wp, o.bits, g, o.symmetric, clip_max=clip_max)[:, :n]


def trial_weight(w: torch.Tensor, s: torch.Tensor | None, o: QuantOptions) -> torch.Tensor:
    """Q(w * s) / s for the scale search (s None: plain Q(w)), in fp32, with one large
    allocation: the same values as qdq(w * s, o) / s."""
    g = o.group_for(w.shape[1])
    t = w * s if s is not None else w.clone()
    tp, n = pad_to_multiple(t, 1, g)
    fake_quantize_(tp, o.bits, g, o.symmetric, check=False)
    t = tp[:, :n] if tp is not t else tp
    return t.div_(s) if s is not None else t


def quantize_weight(w: torch.Tensor, o: QuantOptions) -> QTensor:
    g = o.group_for(w.shape[1])
    wp, n = pad_to_multiple(w.float(), 1, g)
    scales, zeros = compute_qparams(wp, o.bits, g, o.symmetric)
    # Scales travel as fp16 in every format we write; quantize against the fp16 value so
    # the stored codes are optimal for the scale that will actually be used.
    scales = scales.half().float()
    return QTensor(codes=quantize(wp, scales, zeros, o.bits, g), scales=scales, zeros=zeros,
                   bits=o.bits, group_size=g, in_features=n)


def output_of(y):
    return y[0] if isinstance(y, tuple) else y


def _finite(t: torch.Tensor, what: str, layer: int) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise QuantizationError(f"layer {layer}: non-finite {what}; the model or calibration activations overflow")
    return t


def sq_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Sum of squared differences: differences in fp32, the sum in fp64 (grid choices hang on it).

    Summed sample by sample (dim 0), each sample's sum on a tensor of the same shape and
    the samples added in order, so the total does not depend on how samples were chunked."""
    d = (out.float() - ref.float()).pow_(2)
    total = 0.0
    for sample in d:
        total += float(sample.sum(dtype=torch.float64))
    return total


def layer_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


def layer_dtype(layer: nn.Module) -> torch.dtype:
    return next(layer.parameters()).dtype


def chunks(x: torch.Tensor, chunk: int, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[slice, torch.Tensor]]:
    """(sample slice, those samples on the compute device in the compute dtype); chunks
    start at multiples of micro() (see MICRO_TOKENS)."""
    m = micro(x.shape[1])
    chunk = -(-max(1, chunk) // m) * m
    for i in range(0, x.shape[0], chunk):
        sl = slice(i, min(i + chunk, x.shape[0]))
        yield sl, x[sl].to(device=device, dtype=dtype, non_blocking=True)


def resolve_chunk(o: QuantOptions, device: torch.device, seqlen: int, hidden: int, inter: int, dtype_bytes: int) -> int:
    """--chunk, or by default as many samples (a multiple of micro()) as keep one chunk's
    resident activations (part of the plan's A term) near 256 MiB on the CPU, 1 GiB on CUDA. Measured on a
    1B-shaped layer: 4 and 16 samples run at the same speed on the CPU, 4 with 0.5 GiB less;
    tiny models (the bundled one) take all samples at once, saving trial-weight rebuilds."""
    if o.chunk:
        return o.chunk
    per_sample = seqlen * (4 * inter * dtype_bytes + hidden * 4)  # the plan's resident-chunk bytes per sample
    budget = (1 << 30) if device.type == "cuda" else (256 << 20)
    m = micro(seqlen)
    return max(m, budget // max(1, per_sample) // m * m)


def layer_chunk(layer: nn.Module, x: torch.Tensor, o: QuantOptions) -> int:
    """resolve_chunk for this layer and inputs x (n, T, hidden)."""
    widest = max(m.weight.shape[0] for m in layer.modules() if isinstance(m, nn.Linear))  # the FFN width
    return resolve_chunk(o, layer_device(layer), x.shape[1], x.shape[-1], widest, layer_dtype(layer).itemsize)


def micro_batches(xc: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset in the chunk, micro() samples) of a chunk that starts at a multiple of micro()."""
    m = micro(xc.shape[1])
    for j in range(0, xc.shape[0], m):
        yield j, xc[j:j + m]


class Hooks:
    """Forward pre-hooks that hand each named submodule's input to a callback."""

    def __init__(self, layer: nn.Module, names, fn):
        self.kwargs: dict[str, dict] = {}
        self._handles = []
        for n in sorted(set(names)):
            def hook(mod, args, kwargs, n=n):
                fn(n, args[0] if args else kwargs["hidden_states"])
                self.kwargs.setdefault(n, {k: v for k, v in kwargs.items() if k != "hidden_states"})
            self._handles.append(layer.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


@torch.no_grad()
def inspected_chunks(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict, groups, chunk: int):
    """Per chunk of samples: (slice, the chunk on the device, [(group, inspected module, its
    inputs, its call kwargs, its fp outputs)]), inputs and outputs one tensor per micro-batch.

    The hooks are off again before anything else runs: scoring a group calls modules that
    are other groups' inspected modules (the MLP contains down_proj), and their inputs
    must stay the ones the unmodified layer produced."""
    dev, cdt = layer_device(layer), layer_dtype(layer)
    inputs: dict[str, torch.Tensor] = {}
    for sl, xc in chunks(x, chunk, dev, cdt):
        per = []  # per micro-batch: {inspected module: (input, kwargs)}; an expert no token reached has none
        for _, xm in micro_batches(xc):
            with Hooks(layer, {gr.inspect for gr in groups}, inputs.__setitem__) as hooks:
                layer(xm, **layer_kwargs)
            per.append({n: (t, hooks.kwargs[n]) for n, t in inputs.items()})
            inputs.clear()
        items = []
        for gr in groups:
            got = [p[gr.inspect] for p in per if gr.inspect in p]
            if not got:
                continue
            insp, kw = layer.get_submodule(gr.inspect), got[0][1]
            xins = [t for t, _ in got]
            items.append((gr, insp, xins, kw, [output_of(insp(xi, **kw)) for xi in xins]))
        yield sl, xc, items


@torch.no_grad()
def fp_forward(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict, chunk: int, y: torch.Tensor, layer_idx: int,
               before=None) -> torch.Tensor:
    """y = layer(x), micro-batch by micro-batch (`before(first sample)` is called ahead of
    each). AWQ's first pass and the drivers that run the fp chain ahead of the jobs
    (quant/ray_driver.py) both call this, so their outputs are the same bits."""
    dev, cdt = layer_device(layer), layer_dtype(layer)
    for sl, xc in chunks(x, chunk, dev, cdt):
        for j, xm in micro_batches(xc):
            if before is not None:
                before(sl.start + j)
            y[sl.start + j:sl.start + j + xm.shape[0]].copy_(_finite(output_of(layer(xm, **layer_kwargs)), "layer output", layer_idx))
    return y


def linear_roles(arch: Architecture, n_experts: int = 0) -> list[str]:
    """The layer's quantized linears, each expert's apart ('expert_up.3')."""
    return expand_experts([r for r in LINEAR_ROLES if r in arch.tensors], n_experts)


def input_owners(arch: Architecture, roles: list[str]) -> dict[str, str]:
    """role -> the module whose input the role's linear reads: the first linear of its scale
    group (a group's linears share one input by definition, applied or skipped), else its
    own. One Hessian per owner serves all the linears reading that input."""
    owner: dict[str, str] = {}
    n_experts = len({expert_of(r) for r in roles} - {None})
    for gr in arch.scale_groups(n_experts):
        for r in gr.linears:
            if r in roles:  # experts in one group read different tokens: one input per expert
                owner.setdefault(r, arch.module_of(next(x for x in gr.linears if expert_of(x) == expert_of(r))))
    return {r: owner.get(r, arch.module_of(r)) for r in roles}


def group_applies(group: ScaleGroup, arch: Architecture, layer: nn.Module) -> bool:
    """A group folding into a previous linear needs that linear's output width to equal
    the group's input width (v -> o fails under GQA)."""
    if not is_linear(group.prev):
        return True
    rows = layer.get_submodule(arch.module_of(group.prev)).weight.shape[0]
    if group.prev_part and rows % group.prev_part[1]:
        return False
    width = rows // group.prev_part[1] if group.prev_part else rows
    return all(width == layer.get_submodule(arch.module_of(r)).weight.shape[1] for r in group.linears)


def prev_rows(group: ScaleGroup, n_rows: int) -> slice:
    """The rows of the producing linear whose outputs the group reads (a fused linear's part)."""
    if not group.prev_part:
        return slice(0, n_rows)
    k, n = group.prev_part
    return slice(k * n_rows // n, (k + 1) * n_rows // n)


def prev_out_scale(group: ScaleGroup, s: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The folded producer's per-output-row scale: s on the group's rows, 1 elsewhere."""
    full = torch.ones(n_rows, dtype=s.dtype, device=s.device)
    full[prev_rows(group, n_rows)] = s
    return full


class Master:
    """fp32 copies of the layer's parameters that AWQ changes; the module gets casts.

    In fp32 the copies ARE the module's parameters (no extra memory), so trial weights
    are swapped in by rebinding `.data`, never written over a parameter."""

    def __init__(self, layer: nn.Module, exact: dict[str, torch.Tensor] | None = None):
        self.layer = layer
        # `exact`: fp32 tensors read from the checkpoint, for a module that computes in a
        # dtype that cannot hold the source weights (bf16 calibration of an fp32 model).
        self.w = exact if exact is not None else {n: p.detach().float() for n, p in layer.named_parameters()}

    def param(self, module: str, kind: str = "weight") -> torch.Tensor:
        return self.w[f"{module}.{kind}"]

    def sync(self, modules) -> None:
        """Refresh the module parameters of `modules` from the master (a no-op where aliased)."""
        for m in modules:
            for kind, p in self.layer.get_submodule(m).named_parameters(recurse=False):
                src = self.param(m, kind)
                if p.data_ptr() != src.data_ptr():
                    p.data.copy_(src)


class Swap:
    """Temporarily give some modules other weights (cast to the module's dtype)."""

    def __init__(self, layer: nn.Module, weights: dict[str, torch.Tensor]):
        self.params = {m: layer.get_submodule(m).weight for m in weights}
        self.weights, self.saved = weights, {}

    def __enter__(self):
        for m, p in self.params.items():
            self.saved[m] = p.data
            p.data = self.weights[m].to(p.dtype)
        return self

    def __exit__(self, *exc):
        for m, p in self.params.items():
            p.data = self.saved[m]


@torch.no_grad()
def fold_scale(master: Master, arch: Architecture, group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the producer of X by s and multiply the consumers' columns by s (fp-exact)."""
    pm = arch.module_of(group.prev)
    if is_linear(group.prev):
        rows = prev_rows(group, master.param(pm).shape[0])
        master.param(pm)[rows].div_(s[:, None])
        if f"{pm}.bias" in master.w:
            master.param(pm, "bias")[rows].div_(s)
    elif arch.quirks.get("norm_offset"):  # the norm scales by (offset + w): fold into that sum
        off = float(arch.quirks["norm_offset"])
        master.param(pm).add_(off).div_(s).sub_(off)
    else:
        master.param(pm).div_(s)
    for r in (*group.linears, *group.also):  # `also`: the router takes the fold, unquantized
        master.param(arch.module_of(r)).mul_(s)
    master.sync([pm, *(arch.module_of(r) for r in (*group.linears, *group.also))])


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, o: QuantOptions, group, layer_idx: int):
    """The grid of (alpha, s) the search scores."""
    out = []
    for i in range(o.n_grid):
        a = i / o.n_grid
        s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4) if o.duo_scaling else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out.append((a, _finite(s, f"AWQ scales for {group.linears}", layer_idx)))
    return out


def weight_mean(w: torch.Tensor, o: QuantOptions) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's max (AutoAWQ's w_mean)."""
    g = o.group_for(w.shape[1])
    wp, n = pad_to_multiple(w.abs(), 1, g)
    wp = wp.view(-1, g)
    return (wp / (wp.amax(1, keepdim=True) + 1e-6)).view(w.shape[0], -1)[:, :n].mean(0)


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, o: QuantOptions) -> torch.Tensor:
    """Best per-group clip bound (out, in_padded/g) for weight (out, in) given inputs x (tokens, in)."""
    g = o.group_for(w.shape[1])
    wp, _ = pad_to_multiple(w.float(), 1, g)
    xp, _ = pad_to_multiple(x.reshape(-1, x.shape[-1]).float().to(w.device), 1, g)
    xp = xp[clip_positions(xp.shape[0], o, w.device)]  # a no-op on tokens already sampled
    out_f, in_p = wp.shape
    ng = in_p // g
    xk = xp.view(-1, ng, g).transpose(0, 1)  # (ng, tokens, g)

    def contribution(w):  # (ob, in_p) -> (ng, tokens, ob): each group's part of each output, one bmm
        return torch.bmm(xk, w.view(-1, ng, g).permute(1, 2, 0))

    best_max = torch.empty(out_f, ng, device=w.device)
    # Blocks of output rows sized so the (ng, tokens, rows) products stay below glibc's
    # mmap threshold (32 MiB): larger temporaries are mapped and faulted in on every step.
    ob = max(1, min(out_f, (1 << 22) // max(1, xk.shape[1] * ng)))
    for o0 in range(0, out_f, ob):
        wb = wp[o0:o0 + ob]
        wg = wb.view(-1, 1, ng, g)
        org_max = wg.abs().amax(-1, keepdim=True)  # (ob, 1, ng, 1)
        ref = contribution(wb)
        min_err = torch.full((wb.shape[0], ng), float("inf"), device=w.device)
        best = org_max.clone()
        for i in range(int(o.max_shrink * o.n_grid)):
            mv = org_max * (1 - i / o.n_grid)
            cur = wg.clamp(-mv, mv).reshape(wb.shape[0], in_p)
            q = fake_quantize_(cur, o.bits, g, o.symmetric, check=False)
            err = contribution(q).sub_(ref).pow_(2).mean(1).t()  # (ob, ng): mean over tokens
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better[:, None, :, None], mv, best)
        best_max[o0:o0 + ob] = best.view(wb.shape[0], ng)
    return best_max


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, o: QuantOptions) -> torch.Tensor:
    g = o.group_for(w.shape[1])
    n = w.shape[1]
    wp, _ = pad_to_multiple(w, 1, g)
    mv = max_val.repeat_interleave(g, dim=1)
    return torch.max(torch.min(wp, mv), -mv)[:, :n]


def clip_positions(n_tokens: int, o: QuantOptions, device: torch.device) -> torch.Tensor:
    """Global token indices the clip search uses: an even stride over all tokens."""
    step = max(1, n_tokens // o.clip_tokens)
    return torch.arange(0, n_tokens, step, device=device)[: o.clip_tokens]


@torch.no_grad()
def awq_layer(layer: nn.Module, arch: Architecture, x: torch.Tensor, layer_kwargs: dict, o: QuantOptions,
              layer_idx: int, out: torch.Tensor | None = None, master: dict[str, torch.Tensor] | None = None):
    """Quantize one decoder layer in place on calibration inputs x (n, T, hidden).

    x may live on the host while the layer sits on a GPU: chunks move as needed.
    `master`: fp32 copies of the layer's parameters by name (see Master); they receive
    the folded scales. Returns (qtensors by role, fp output of the ORIGINAL layer for the
    next layer (in `out` when given, else a new tensor like x), report)."""
    dev, cdt = layer_device(layer), layer_dtype(layer)
    n, T = x.shape[:2]
    chunk = layer_chunk(layer, x, o)
    y = torch.empty_like(x) if out is None else out
    n_experts = layer_experts(arch, layer)
    all_groups = arch.scale_groups(n_experts)
    groups = [gr for gr in all_groups if group_applies(gr, arch, layer)]
    roles = linear_roles(arch, n_experts)
    mod = {r: arch.module_of(r) for r in roles}
    clip_roles = [r for r in roles if o.clip and r not in NO_CLIP_ROLES]
    # the module whose input is the group's X: its first linear's, or (experts reading different
    # tokens of X, the MoE block's group) the inspected block's
    first = {gr: mod[gr.linears[0]] if len({expert_of(r) for r in gr.linears}) == 1 else gr.inspect for gr in groups}

    # -- pass 1: fp output, activation statistics, clip-search tokens ----------------------
    keep = clip_positions(n * T, o, dev)
    abs_sum = {m: None for m in first.values()}
    abs_rows = dict.fromkeys(abs_sum, 0)
    clip_x: dict[str, list] = {mod[r]: [] for r in clip_roles}
    pos = [0]
    gptq = o.method == "awq+gptq"
    # H = 2·XᵀX of each distinct linear input (original layer): GPTQ's rounding needs it, and
    # both methods' report gives every linear's exact output MSE from it (gptq.output_mse).
    # One in x in fp32 matrix per distinct input, whatever the calibration size.
    owner = input_owners(arch, roles)
    hess: dict[str, torch.Tensor | None] = dict.fromkeys(owner.values())
    hess_tokens = dict.fromkeys(hess, 0)

    def stats(name, t):
        flat = t.reshape(-1, t.shape[-1])
        if name in hess:
            hess[name], k = hessian_update(hess[name], flat)
            hess_tokens[name] += k
        if name in abs_sum:  # per sample, added in order: the same sums for any chunking
            # (an expert's linears see only the rows routed to it: summed as one piece per forward)
            for sample in (t.reshape(-1, T, t.shape[-1]) if t.dim() == 3 else flat[None]):
                s = sample.abs().sum(0, dtype=torch.float64)
                abs_sum[name] = s if abs_sum[name] is None else abs_sum[name] + s
                abs_rows[name] += sample.shape[0]
        if name in clip_x:
            lo = pos[0]
            sel = keep[(keep >= lo) & (keep < lo + flat.shape[0])] - lo
            clip_x[name].append(flat[sel].float())

    with Hooks(layer, set(abs_sum) | set(clip_x) | set(hess), stats):
        fp_forward(layer, x, layer_kwargs, chunk, y, layer_idx, before=lambda k: pos.__setitem__(0, k * T))
    # An expert routed too few tokens gets plain RTN: no per-expert scale, clip or GPTQ rounding.
    starved = {r: hess_tokens[owner[r]] for r in roles if expert_of(r) is not None and hess_tokens[owner[r]] < o.min_expert_tokens}
    groups = [gr for gr in groups if gr.prev not in starved]
    clip_roles = [r for r in clip_roles if r not in starved]
    x_mean = {m: _finite((s / abs_rows[m]).float(), "activation statistics", layer_idx) for m, s in abs_sum.items() if s is not None}
    clip_in = {m: torch.cat(v) for m, v in clip_x.items() if v}
    clip_x.clear()  # the pieces, now copied into clip_in

    # -- pass 2: score every grid point of every group, chunk by chunk ---------------------
    master = Master(layer, master)
    cands, orig = {}, {}
    for gr in groups:
        orig[gr] = [master.param(mod[r]) for r in gr.linears]
        w_mean = weight_mean(torch.cat(orig[gr], 0), o)
        cands[gr] = scale_candidates(x_mean[first[gr]], w_mean, o, gr, layer_idx)
    loss = {gr: [0.0] * (o.n_grid + 1) for gr in groups}  # last slot: plain RTN (s = 1)
    count = {gr: 0 for gr in groups}  # output elements scored, to turn sums into means

    def score():
        # a function so that the last chunk's captured inputs, references and trial weights die
        # with it: left in awq_layer's scope they lived through pass 3 (0.6 GiB of an 8B layer's
        # measured peak)
        for _, _, items in inspected_chunks(layer, x, layer_kwargs, groups, chunk):
            for gr, insp, xins, kw, refs in items:
                count[gr] += sum(r.numel() for r in refs)
                trials = [(k, s) for k, (_, s) in enumerate(cands[gr])] + [(o.n_grid, None)]
                for k, s in trials:
                    # cast each trial weight as soon as it exists: one linear's fp32 temporaries at a time
                    qw = {mod[r]: trial_weight(w0, s, o).to(cdt) for r, w0 in zip(gr.linears, orig[gr])}
                    with Swap(layer, qw):
                        for xi, ref in zip(xins, refs):
                            loss[gr][k] += sq_err(output_of(insp(xi, **kw)), ref)
    score()
    report = {"groups": [], "linears": {}}
    scales = {}
    for gr in groups:
        best = min(range(o.n_grid), key=lambda k: (loss[gr][k], k))
        if loss[gr][best] != loss[gr][best]:  # NaN
            raise QuantizationError(f"layer {layer_idx}: AWQ scale search for {gr.linears} found no finite loss")
        scales[gr] = cands[gr][best][1]
        report["groups"].append({"prev": gr.prev, "linears": list(gr.linears), "alpha": cands[gr][best][0],
                                 "_loss_rtn": loss[gr][o.n_grid], "_loss_best": loss[gr][best]})
    for gr in all_groups:
        if gr not in groups:
            why = (f"expert {expert_of(gr.prev)} was routed {starved[gr.prev]} calibration tokens (< --min-expert-tokens "
                   f"{o.min_expert_tokens}): round-to-nearest" if gr.prev in starved else gr.reason or "shapes differ")
            report["groups"].append({"prev": gr.prev, "linears": list(gr.linears), "skipped": why})
    if starved:
        report["rtn_fallback"] = {r: {"tokens": k, "why": f"fewer than {o.min_expert_tokens} calibration tokens routed to "
                                                         f"expert {expert_of(r)}"} for r, k in starved.items()}

    # -- the report's RTN baseline, from the weights before any fold -----------------------
    for r in roles:
        w0 = master.param(mod[r])
        report["linears"][r] = {"mse_rtn": None if hess[owner[r]] is None else  # an expert no token reached
                                output_mse(w0, quantize_weight(w0, o).dequantize(), hess[owner[r]], hess_tokens[owner[r]])}

    # -- fold, then let the clip search see the inputs as the scaled model feeds them ------
    in_scale = {r: s for gr, s in scales.items() for r in gr.linears}  # a folded linear's inputs are X / s
    out_scale = {gr.prev: prev_out_scale(gr, s, master.param(mod[gr.prev]).shape[0])  # ... and a folded producer's outputs Y / s
                 for gr, s in scales.items() if is_linear(gr.prev)}
    for gr, s in scales.items():
        fold_scale(master, arch, gr, s)
        for r in gr.linears:
            if mod[r] in clip_in:
                clip_in[mod[r]] = clip_in[mod[r]] / s.to(clip_in[mod[r]].device)

    # -- clip search and quantization ------------------------------------------------------
    qts = {}
    for r in roles:
        w = master.param(mod[r])
        entry = {"clip": None, **report["linears"][r]}
        if r in clip_roles:
            mv = search_clip(w, clip_in[mod[r]], o)
            g = o.group_for(w.shape[1])
            full = pad_to_multiple(w.abs(), 1, g)[0].view(w.shape[0], -1, g).amax(-1)
            entry["clip"] = float((mv / full.clamp(min=1e-12)).mean())
        # The folded linear reads X / s: its Hessian is H / (s sᵀ) (output_mse's in_scale), so the
        # MSE below is on the same outputs.
        h, n_tok = hess[owner[r]], hess_tokens[owner[r]]
        if r in starved:  # too few tokens to fit anything to: RTN of the (shared-scaled) weight
            qts[r] = quantize_weight(w, o)
            entry["mse_awq"] = entry["mse_final"] = None if h is None else output_mse(w, qts[r].dequantize(), h, n_tok)
            report["linears"][r] = entry
            continue
        s_in = in_scale.get(r)
        awq_q = quantize_weight(apply_clip(w, mv, o) if r in clip_roles else w, o)
        entry["mse_awq"] = output_mse(w, awq_q.dequantize(), h, n_tok, out_scale.get(r), s_in)
        if gptq:  # GPTQ rounding of the scaled weights, each group's range from the clip search
            # min/max grids inside AWQ's clip bounds: GPTQ's own grid search on top of the clip
            # search clipped twice and lost (held-out TinyStories, docs/BENCHMARKS.md)
            hs = h if s_in is None else h / torch.outer(*(2 * [s_in.to(h.device).float()]))
            qts[r] = gptq_quantize(w, hs, o.bits, o.group_size, o.symmetric, o.damp, o.act_order,
                                   clip_max=mv if r in clip_roles else None, grid_steps=1)
            del hs
            entry["mse_final"] = output_mse(w, qts[r].dequantize(), h, n_tok, out_scale.get(r), s_in)
        else:  # AWQ's scaled, clipped round-to-nearest is what is stored
            qts[r] = awq_q
            entry["mse_final"] = entry["mse_awq"]
        report["linears"][r] = entry

    # -- pass 3: error as stored: each group alone, and the whole quantized layer ----------
    deq = {mod[r]: qts[r].dequantize().to(cdt) for r in roles}  # in the compute dtype at once, as Swap would cast it
    final = {gr: 0.0 for gr in groups}
    out_err = 0.0
    for sl, xc, items in inspected_chunks(layer, x, layer_kwargs, groups, chunk):
        for gr, insp, xins, kw, refs in items:
            with Swap(layer, {mod[r]: deq[mod[r]] for r in gr.linears}):
                for xi, ref in zip(xins, refs):
                    final[gr] += sq_err(output_of(insp(xi, **kw)), ref)
        with Swap(layer, deq):
            for j, xm in micro_batches(xc):
                out_err += sq_err(output_of(layer(xm, **layer_kwargs)), y[sl.start + j:sl.start + j + xm.shape[0]].to(dev))
    for entry, gr in zip(report["groups"], groups):
        entry["mse_rtn"] = entry.pop("_loss_rtn") / count[gr]
        entry["mse_scaled"] = entry.pop("_loss_best") / count[gr]
        entry["mse_final"] = final[gr] / count[gr]
    report["mse_output"] = out_err / y.numel()
    return qts, y, report


def rtn_layer(layer: nn.Module, arch: Architecture, o: QuantOptions,
              master: dict[str, torch.Tensor] | None = None) -> dict[str, QTensor]:
    m = Master(layer, master)
    return {r: quantize_weight(m.param(arch.module_of(r)), o) for r in linear_roles(arch, layer_experts(arch, layer))}


def padded_in(in_features: int, o: QuantOptions) -> int:
    return round_up(in_features, o.group_for(in_features))
