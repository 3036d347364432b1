"""Activation-aware weight quantization (AWQ) of one decoder layer.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkiln.convert.architectures import LINEAR_ROLES, Architecture, ScaleGroup
from lmkiln.formats.packing import round_up
from lmkiln.errors import QuantizationError
from lmkiln.quant.primitives import compute_qparams, fake_quantize, pad_to_multiple, quantize
from lmkiln.formats.qtensor import QTensor

NO_CLIP_ROLES = ("q", "k")


@dataclass(frozen=True)
class QuantOptions:
    bits: int = 4
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = False
    method: str = "awq"  # "awq" | "rtn"
    clip: bool = True
    duo_scaling: bool = True
    n_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512  # tokens sampled for the clip search, as AutoAWQ
    chunk: int = 16  # calibration samples per forward, bounds activation memory

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def qdq(w: torch.Tensor, o: QuantOptions, clip_max: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize an (out, in) weight, zero-padding `in` to the group size."""
    g = o.group_for(w.shape[1])
    wp, n = pad_to_multiple(w, 1, g)
    return fake_quantize(wp, o.bits, g, o.symmetric, clip_max=clip_max)[:, :n]


def quantize_weight(w: torch.Tensor, o: QuantOptions) -> QTensor:
    g = o.group_for(w.shape[1])
    wp, n = pad_to_multiple(w.float(), 1, g)
    scales, zeros = compute_qparams(wp, o.bits, g, o.symmetric)
    # Scales travel as fp16 in every format we write; quantize against the fp16 value so
    # the stored codes are optimal for the scale that will actually be used.
    scales = scales.half().float()
    return QTensor(codes=quantize(wp, scales, zeros, o.bits, g), scales=scales, zeros=zeros,
                   bits=o.bits, group_size=g, in_features=n)


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def run_module(mod: nn.Module, x: torch.Tensor, kwargs: dict, chunk: int) -> torch.Tensor:
    return torch.cat([_out(mod(x[i:i + chunk], **kwargs)) for i in range(0, x.shape[0], chunk)])


@torch.no_grad()
def module_mse(mod, x, kwargs, ref, chunk) -> float:
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        total += (_out(mod(x[i:i + chunk], **kwargs)).double() - ref[i:i + chunk].double()).pow(2).sum().item()
    return total / ref.numel()


@dataclass
class Captured:
    """Inputs (and call kwargs) of the layer's submodules during one fp forward."""

    inputs: dict[str, torch.Tensor]
    kwargs: dict[str, dict]
    output: torch.Tensor


@torch.no_grad()
def capture(layer: nn.Module, names: list[str], x: torch.Tensor, layer_kwargs: dict, chunk: int) -> Captured:
    store: dict[str, list] = {n: [] for n in names}
    kw: dict[str, dict] = {}
    hooks = []
    for n in set(names):
        def hook(mod, args, kwargs, n=n):
            store[n].append((args[0] if args else kwargs["hidden_states"]).detach())
            kw.setdefault(n, {k: v for k, v in kwargs.items() if k != "hidden_states"})
        hooks.append(layer.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        out = run_module(layer, x, layer_kwargs, chunk)
    finally:
        for h in hooks:
            h.remove()
    # q/k/v (and gate/up, and a block with its first linear) see the very same tensors:
    # concatenate each distinct input once and share it.
    joined: dict[tuple, torch.Tensor] = {}
    inputs = {}
    for n, v in store.items():
        key = tuple(id(t) for t in v)
        inputs[n] = joined[key] if key in joined else joined.setdefault(key, torch.cat(v))
    return Captured(inputs, kw, out)


def _finite(t: torch.Tensor, what: str, layer: int) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise QuantizationError(f"layer {layer}: non-finite {what}; the model or calibration activations overflow")
    return t


def linear_roles(arch: Architecture) -> list[str]:
    return [r for r in LINEAR_ROLES if r in arch.tensors]


def group_applies(group: ScaleGroup, arch: Architecture, layer: nn.Module) -> bool:
    """A group folding into a previous linear needs that linear's output width to equal
    the group's input width (v -> o fails under GQA)."""
    if group.prev not in LINEAR_ROLES:
        return True
    prev = layer.get_submodule(arch.module_of(group.prev))
    return all(prev.weight.shape[0] == layer.get_submodule(arch.module_of(r)).weight.shape[1] for r in group.linears)


@torch.no_grad()
def search_scale(layer, arch, group: ScaleGroup, cap: Captured, ref: torch.Tensor, o: QuantOptions, layer_idx: int) -> dict:
    """Grid-search the group's scale; returns {s, alpha, mse_rtn, mse_best}.

    `ref` is the fp output of the group's inspect module on the captured inputs."""
    lins = [layer.get_submodule(arch.module_of(r)) for r in group.linears]
    x = cap.inputs[arch.module_of(group.linears[0])]
    insp = layer.get_submodule(group.inspect)
    xin, kw = cap.inputs[group.inspect], cap.kwargs[group.inspect]
    x_mean = _finite(x.abs().reshape(-1, x.shape[-1]).float().mean(0), "activation statistics", layer_idx)
    orig = [m.weight.detach().clone() for m in lins]
    w = torch.cat(orig, 0)
    g = o.group_for(w.shape[1])
    wp, n = pad_to_multiple(w.abs(), 1, g)
    wp = wp.view(-1, g)
    w_mean = (wp / (wp.amax(1, keepdim=True) + 1e-6)).view(w.shape[0], -1)[:, :n].mean(0)

    def loss_with(s):
        for m, w0 in zip(lins, orig):
            m.weight.copy_(qdq(w0 * s, o) / s)
        return module_mse(insp, xin, kw, ref, o.chunk)

    mse_rtn = loss_with(torch.ones_like(x_mean))
    best = (float("inf"), None, None)
    for i in range(o.n_grid):
        a = i / o.n_grid
        s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4) if o.duo_scaling else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        _finite(s, f"AWQ scales for {group.linears}", layer_idx)
        loss = loss_with(s)
        if loss < best[0]:
            best = (loss, a, s)
    for m, w0 in zip(lins, orig):
        m.weight.copy_(w0)
    if best[2] is None:
        raise QuantizationError(f"layer {layer_idx}: AWQ scale search for {group.linears} found no finite loss")
    return {"s": best[2], "alpha": best[1], "mse_rtn": mse_rtn, "mse_best": best[0]}


@torch.no_grad()
def fold_scale(layer, arch, group: ScaleGroup, s: torch.Tensor, cap: Captured) -> None:
    """Divide the producer of X by s and multiply the consumers' columns by s (fp-exact)."""
    prev = layer.get_submodule(arch.module_of(group.prev))
    if group.prev in LINEAR_ROLES:
        prev.weight.div_(s[:, None])
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s)
    else:
        prev.weight.div_(s)
    for r in group.linears:
        layer.get_submodule(arch.module_of(r)).weight.mul_(s)
    # Later searches (clip) must see the inputs as the scaled model produces them;
    # shared input tensors are divided once and stay shared.
    done: dict[int, torch.Tensor] = {}
    for name in {arch.module_of(r) for r in group.linears} | {group.inspect}:
        t = cap.inputs[name]
        cap.inputs[name] = done[id(t)] if id(t) in done else done.setdefault(id(t), t / s)


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, o: QuantOptions) -> torch.Tensor:
    """Best per-group clip bound (out, in_padded/g) for weight (out, in) given inputs x (tokens, in)."""
    g = o.group_for(w.shape[1])
    wp, _ = pad_to_multiple(w.float(), 1, g)
    xp, _ = pad_to_multiple(x.reshape(-1, x.shape[-1]).float(), 1, g)
    step = max(1, xp.shape[0] // o.clip_tokens)
    xp = xp[::step][: o.clip_tokens]
    out_f, in_p = wp.shape
    ng = in_p // g
    xk = xp.view(-1, ng, g).transpose(0, 1)  # (ng, tokens, g)

    def contribution(w):  # (ob, in_p) -> (ob, tokens, ng): each group's part of each output, one bmm
        return torch.bmm(xk, w.view(-1, ng, g).permute(1, 2, 0)).permute(2, 1, 0)

    best_max = torch.empty(out_f, ng)
    ob = max(1, min(out_f, (1 << 24) // max(1, xk.shape[1] * ng)))
    for o0 in range(0, out_f, ob):
        wb = wp[o0:o0 + ob]
        wg = wb.view(-1, 1, ng, g)
        org_max = wg.abs().amax(-1, keepdim=True)  # (ob, 1, ng, 1)
        ref = contribution(wb)
        min_err = torch.full((wb.shape[0], ng), float("inf"))
        best = org_max.clone()
        for i in range(int(o.max_shrink * o.n_grid)):
            mv = org_max * (1 - i / o.n_grid)
            cur = wg.clamp(-mv, mv).reshape(wb.shape[0], in_p)
            q = fake_quantize(cur, o.bits, g, o.symmetric)
            err = (contribution(q) - ref).pow(2).mean(1)  # (ob, ng)
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


@torch.no_grad()
def awq_layer(layer: nn.Module, arch: Architecture, x: torch.Tensor, layer_kwargs: dict, o: QuantOptions, layer_idx: int):
    """Quantize one decoder layer in place on calibration inputs x (n, T, hidden).

    Returns (qtensors by role, fp output of the ORIGINAL layer for the next layer, report).
    """
    groups = [gr for gr in arch.awq_groups if group_applies(gr, arch, layer)]
    roles = linear_roles(arch)
    names = sorted({arch.module_of(r) for r in roles} | {gr.inspect for gr in groups})
    cap = capture(layer, names, x, layer_kwargs, o.chunk)
    _finite(cap.output, "layer output", layer_idx)
    report = {"groups": [], "linears": {}}
    refs = {gr.inspect: run_module(layer.get_submodule(gr.inspect), cap.inputs[gr.inspect], cap.kwargs[gr.inspect], o.chunk)
            for gr in groups}
    searched = [(gr, search_scale(layer, arch, gr, cap, refs[gr.inspect], o, layer_idx)) for gr in groups]
    for gr, res in searched:  # fold after all searches: each search saw the original layer, as AutoAWQ
        fold_scale(layer, arch, gr, res["s"], cap)
    for gr, res in searched:
        report["groups"].append({"prev": gr.prev, "linears": list(gr.linears), "alpha": res["alpha"],
                                 "mse_rtn": res["mse_rtn"], "mse_scaled": res["mse_best"]})
    skipped = [gr for gr in arch.awq_groups if gr not in groups]
    for gr in skipped:
        report["groups"].append({"prev": gr.prev, "linears": list(gr.linears), "skipped": gr.reason or "shapes differ"})
    qts = {}
    for r in roles:
        mod = layer.get_submodule(arch.module_of(r))
        entry = {"clip": None}
        if o.clip and r not in NO_CLIP_ROLES:
            mv = search_clip(mod.weight, cap.inputs[arch.module_of(r)], o)
            g = o.group_for(mod.weight.shape[1])
            full = pad_to_multiple(mod.weight.abs(), 1, g)[0].view(mod.weight.shape[0], -1, g).amax(-1)
            entry["clip"] = float((mv / full.clamp(min=1e-12)).mean())
            mod.weight.copy_(apply_clip(mod.weight, mv, o))
        qts[r] = quantize_weight(mod.weight, o)
        report["linears"][r] = entry
    # Score each group as stored (scaled, clipped, quantized), with only its own linears
    # quantized so the number compares with mse_rtn.
    for entry, gr in zip(report["groups"], groups):
        mods = [layer.get_submodule(arch.module_of(r)) for r in gr.linears]
        saved = [m.weight.clone() for m in mods]
        for m, r in zip(mods, gr.linears):
            m.weight.copy_(qts[r].dequantize())
        entry["mse_final"] = module_mse(layer.get_submodule(gr.inspect), cap.inputs[gr.inspect], cap.kwargs[gr.inspect], refs[gr.inspect], o.chunk)
        for m, w in zip(mods, saved):
            m.weight.copy_(w)
    return qts, cap.output, report


def rtn_layer(layer: nn.Module, arch: Architecture, o: QuantOptions) -> dict[str, QTensor]:
    return {r: quantize_weight(layer.get_submodule(arch.module_of(r)).weight, o) for r in linear_roles(arch)}


def padded_in(in_features: int, o: QuantOptions) -> int:
    return round_up(in_features, o.group_for(in_features))
