"""Mixture-of-experts layers for calibration: the router and every expert as plain linears.

transformers keeps a layer's experts as stacked 3-D parameters (`experts.gate_up_proj`),
which neither matches the checkpoint's per-expert tensors nor gives AWQ's hooks an
`nn.Linear` per expert. Calibration therefore swaps the family's MoE block for
`RoutedExperts`, whose submodules carry the checkpoint's own names (from the
architecture table) and whose forward is the reference routing: softmax over the
router's logits in float32, top-k, renormalised when the family does, each expert's
output times its routing weight, summed in expert order (the engine runner's `MoE`).

One deliberate difference: an expert multiplies its down projection's *input* by the
routing weight instead of its output. Down is linear and bias-free, so the result is the
same up to rounding, and the input AWQ's hooks capture for `down` is then weighted: the
scale search and GPTQ's Hessian weigh each token's error by how much the token uses the
expert, as the issue asks of the objective.
"""

from __future__ import annotations

import torch
from torch import nn

from lmkiln.convert.architectures import Architecture
from lmkiln.convert.blocks import ACTIVATIONS, mix_experts


class Expert(nn.Module):
    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int, act: str):
        super().__init__()
        self.names = names
        for n, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            setattr(self, n, nn.Linear(i, o, bias=False))
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x) * w[:, None].to(x.dtype))


class RoutedExperts(nn.Module):
    def __init__(self, router: str, experts: str, names: tuple[str, str, str], n: int, hidden: int, inter: int,
                 top_k: int, norm_topk: bool, act: str):
        super().__init__()
        self.router_name, self.experts_name, self.top_k, self.norm_topk = router, experts, top_k, norm_topk
        setattr(self, router, nn.Linear(hidden, n, bias=False))
        setattr(self, experts, nn.ModuleList([Expert(names, hidden, inter, act) for _ in range(n)]))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        experts = getattr(self, self.experts_name)
        out = mix_experts(flat, getattr(self, self.router_name)(flat), self.top_k, self.norm_topk,
                          lambda e, rows, w: experts[e](rows, w))
        return out.view_as(x)


def _relative(arch: Architecture, role: str) -> list[str]:
    """The HF module path of `role` below the decoder layer, split at dots ({e} kept)."""
    prefix = arch.layer_prefix + "."
    return arch.tensors[role][len(prefix):].rsplit(".", 1)[0].split(".")


def moe_module_path(arch: Architecture) -> str:
    """The decoder layer's MoE block, e.g. 'block_sparse_moe' (the router's parent)."""
    return ".".join(_relative(arch, "router")[:-1])


def routed_experts(arch: Architecture, mcfg: dict) -> RoutedExperts:
    """A RoutedExperts named as the checkpoint names the family's MoE block's tensors."""
    block = moe_module_path(arch).split(".")
    router = _relative(arch, "router")[len(block)]
    parts = [_relative(arch, r) for r in ("expert_gate", "expert_up", "expert_down")]
    experts = parts[0][len(block)]  # e.g. 'experts' in block_sparse_moe.experts.{e}.w1
    names = tuple(p[-1] for p in parts)
    return RoutedExperts(router, experts, names, mcfg["num_experts"], mcfg["hidden_units"], mcfg["inter_size"],
                         mcfg["experts_per_token"], mcfg["norm_topk"], mcfg["hidden_act"])


def layer_experts(arch: Architecture, layer: nn.Module) -> int:
    """Experts in this decoder layer module (0 for a dense one)."""
    if not arch.moe:
        return 0
    block = layer.get_submodule(moe_module_path(arch))
    return len(getattr(block, block.experts_name)) if isinstance(block, RoutedExperts) else 0


class _Calls:
    """A plain (unregistered) attribute that calls a module: lets the decoder layer's own
    forward reach RoutedExperts under transformers' attribute name (Mixtral's `mlp`) while
    the module's parameters keep the checkpoint's names (`block_sparse_moe.*`)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def install(layer: nn.Module, arch: Architecture, mcfg: dict) -> None:
    """Replace transformers' MoE block of `layer` (on the meta device) by RoutedExperts."""
    hf_attr = next((n for n, c in layer.named_children() if hasattr(c, "experts")), None)
    if hf_attr is None:
        raise AssertionError(f"{arch.hf_name}: no MoE block found in transformers' decoder layer")
    ours = moe_module_path(arch)
    with torch.device("meta"):
        block = routed_experts(arch, mcfg)
    del layer._modules[hf_attr]
    parent = layer.get_submodule(ours.rsplit(".", 1)[0]) if "." in ours else layer
    setattr(parent, ours.rsplit(".", 1)[-1], block)
    if ours != hf_attr:
        object.__setattr__(layer, hf_attr, _Calls(block))
