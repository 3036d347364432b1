"""GPTQ rounding of one linear (Frantar et al., 2022): quantize the weight column by
column, and after each column push its rounding error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's reconstruction loss
||X Wᵀ - X Qᵀ||², H = 2 XᵀX / n over the calibration tokens. Codes, scales and zeros come
out in the usual group layout (a QTensor), so AWQ-GEMM, the engine and every sink take
them unchanged.

- dampening: H += damp · mean(diag H) · I (GPTQ's percdamp) keeps the Cholesky stable;
  input channels that never see a nonzero activation ("dead") get weight 0 and H_ii = 1;
- blocks of 128 columns with lazy updates of the rest (the paper's trick: the same result,
  far fewer memory passes);
- groups: without act-order each group's scale and zero are computed when the sweep
  reaches the group, from the weights as updated so far (as reference GPTQ does); with
  act-order (columns visited by decreasing H_ii) every group's parameters are fixed up
  front from the original weights ("static groups"), so the codes stay in the standard
  input order and layout;
- each group's grid is not min/max but the range shrink (0-19 %) with the least rounding
  error weighted by diag H (`primitives.grid_qparams`): on stories260K W4 g32, calibrated and judged on
  TinyStories text held out from both calibration and evaluation, it cut GPTQ's perplexity
  gap by 29 % (docs/BENCHMARKS.md, "quantize methods");
- the Hessian is accumulated in fp32 (`hessian_update`), chunk by chunk, on the device.
"""

from __future__ import annotations

import torch

from lmkiln.errors import QuantizationError
from lmkiln.formats.qtensor import QTensor
from lmkiln.quant.primitives import GRID_STEPS, grid_qparams, pad_to_multiple

BLOCK = 128


HESSIAN_ROWS = 2048  # tokens per fp32 block added into H


def hessian_update(h: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add 2·xᵀx of inputs x (..., in) to h (in, in) in fp32; returns (h, tokens added).

    In place, a block of tokens at a time: no (in, in) temporary beside h and no fp32 copy of
    the whole chunk (for an 8B layer's down_proj input, 14336 wide, those were 784 MiB and
    470 MiB at 8192 tokens: most of what quantize's device-memory plan missed on an H100)."""
    x = x.reshape(-1, x.shape[-1])
    if h is None:
        h = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    for r in range(0, x.shape[0], HESSIAN_ROWS):
        xb = x[r:r + HESSIAN_ROWS].float()
        h.addmm_(xb.t(), xb, alpha=2)
    return h, x.shape[0]


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  damp: float = 0.01, act_order: bool = False, clip_max: torch.Tensor | None = None,
                  grid_steps: int = GRID_STEPS) -> QTensor:
    """GPTQ codes for weight w (out, in) given Hessian h (in, in) (any positive scale:
    only its shape matters). `clip_max` (out, in_padded/g): each group's range bound from
    a clip search, used where the group's parameters are set. `grid_steps`: see grid_qparams
    (1 = plain min/max grids). Works on w's device."""
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise QuantizationError(f"Hessian of shape {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    g = in_f if group_size == -1 else group_size
    W, n = pad_to_multiple(w.detach().float().clone(), 1, g)  # padded columns: zero weights, dead inputs
    cols = W.shape[1]
    H = torch.zeros(cols, cols, device=W.device, dtype=torch.float32)
    H[:in_f, :in_f] = h.float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))

    ng = cols // g
    scales = torch.empty(out_f, ng, device=W.device)
    zeros = torch.empty(out_f, ng, device=W.device, dtype=torch.int32)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    if act_order:  # static groups: every group's grid from the original weights, before any update
        hd = torch.diag(H)
        for grp in range(ng):
            s, z = grid_qparams(W[:, grp * g:(grp + 1) * g], bits, g, symmetric, hd[grp * g:(grp + 1) * g],
                                None if clip_max is None else clip_max[:, grp:grp + 1], grid_steps)
            scales[:, grp], zeros[:, grp] = s[:, 0], z[:, 0]
    W, H = W[:, perm], H[perm][:, perm]
    try:
        L = torch.linalg.cholesky(H)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        raise QuantizationError(f"GPTQ: the Hessian of a {out_f}x{in_f} linear is not positive definite even after "
                                f"dampening {damp}; raise --damp") from None

    qmax = 2 ** bits - 1
    codes = torch.empty(out_f, cols, device=W.device, dtype=torch.uint8)
    for b0 in range(0, cols, BLOCK):
        b1 = min(b0 + BLOCK, cols)
        W1, E1, Hi = W[:, b0:b1].clone(), torch.zeros(out_f, b1 - b0, device=W.device), hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = int(perm[b0 + j])  # this column's place in the original order
            grp = col // g
            if not act_order and col % g == 0:  # reached a new group: its grid from the weights as updated so far
                blk = W1[:, j:j + g] if j + g <= b1 - b0 else torch.cat([W1[:, j:], W[:, b1:b0 + j + g]], 1)
                s, z = grid_qparams(blk, bits, g, symmetric, torch.diag(H)[b0 + j:b0 + j + g],
                                    None if clip_max is None else clip_max[:, grp:grp + 1], grid_steps)
                scales[:, grp], zeros[:, grp] = s[:, 0], z[:, 0]
            s, z = scales[:, grp], zeros[:, grp]
            # fp16-rounded scales, as every format stores them: the codes are optimal for the scale used
            s16 = s.half().float()
            wcol = W1[:, j]
            q = torch.clamp(torch.round(wcol / s16) + z, 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            err = (wcol - (q - z) * s16) / Hi[j, j]
            W1[:, j:] -= err[:, None] * Hi[j, j:][None, :]
            E1[:, j] = err
        W[:, b1:] -= E1 @ hinv[b0:b1, b1:]
    return QTensor(codes=codes, scales=scales.half().float(), zeros=zeros, bits=bits, group_size=g, in_features=n)


def output_mse(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor, tokens: int,
               out_scale: torch.Tensor | None = None, in_scale: torch.Tensor | None = None) -> float:
    """Mean squared output error of a linear with weight w_hat instead of w (out, in) on the
    calibration inputs whose Hessian h = 2·XᵀX is given: tr(D H Dᵀ) / (2 · tokens · out).
    `out_scale` (out,): multiplies D's rows, for a linear whose outputs an AWQ fold divided by
    it, so the error is in the original model's units and comparable with the unscaled RTN's.
    `in_scale` (in,): for a linear whose inputs an AWQ fold divided by it (it reads X / s), h
    being the unscaled inputs' Hessian: D's columns are divided by it, the same as using
    h / (s sᵀ) without that in x in copy (784 MiB for an 8B down_proj)."""
    d = (w.float() - w_hat.float())[:, :h.shape[0]]
    if out_scale is not None:
        d = d * out_scale.to(d.device).float()[:, None]
    if in_scale is not None:
        d = d / in_scale.to(d.device).float()[None, :]
    return float(((d @ h.float()) * d).sum(dtype=torch.float64)) / (2 * max(1, tokens) * w.shape[0])


@torch.no_grad()
def gptq_layer(layer, arch, x: torch.Tensor, layer_kwargs: dict, o, layer_idx: int, out: torch.Tensor | None = None,
               master: dict[str, torch.Tensor] | None = None):
    """`--method gptq` for one decoder layer: one pass over the calibration inputs gives the
    fp output and every linear's Hessian (from the original layer's inputs), then each
    linear is rounded with GPTQ. Returns (qtensors by role, fp output, report)."""
    from lmkiln.quant.awq import (Hooks, Master, Swap, chunks, fp_forward, input_owners, layer_chunk, linear_roles, micro_batches,
                                 output_of, quantize_weight, sq_err)

    from lmkiln.convert.architectures import expert_of
    from lmkiln.quant.moe import layer_experts

    roles = linear_roles(arch, layer_experts(arch, layer))
    mod = {r: arch.module_of(r) for r in roles}
    owner = input_owners(arch, roles)  # linears reading the same input share one Hessian
    hess: dict[str, torch.Tensor | None] = dict.fromkeys(owner.values())
    tokens = dict.fromkeys(hess, 0)

    def accumulate(name, t):
        hess[name], k = hessian_update(hess[name], t)
        tokens[name] += k

    y = torch.empty_like(x) if out is None else out
    with Hooks(layer, set(hess), accumulate):
        fp_forward(layer, x, layer_kwargs, layer_chunk(layer, x, o), y, layer_idx)
    m = Master(layer, master)
    qts, report = {}, {"groups": [], "linears": {}}
    for r in roles:
        w, h, n_tok = m.param(mod[r]), hess[owner[r]], tokens[owner[r]]
        rtn = quantize_weight(w, o)
        if expert_of(r) is not None and n_tok < o.min_expert_tokens:  # too few routed tokens for a Hessian: RTN
            qts[r] = rtn
            report.setdefault("rtn_fallback", {})[r] = {
                "tokens": n_tok, "why": f"fewer than {o.min_expert_tokens} calibration tokens routed to expert {expert_of(r)}"}
            mse = None if h is None else output_mse(w, rtn.dequantize(), h, n_tok)
            report["linears"][r] = {"mse_rtn": mse, "mse_final": mse}
            continue
        qts[r] = gptq_quantize(w, h, o.bits, o.group_size, o.symmetric, o.damp, o.act_order)
        report["linears"][r] = {"mse_rtn": output_mse(w, rtn.dequantize(), h, n_tok), "mse_final": output_mse(w, qts[r].dequantize(), h, n_tok)}
    # the whole quantized layer against the fp layer, as AWQ's report has it
    err, dev, cdt = 0.0, next(layer.parameters()).device, next(layer.parameters()).dtype
    deq = {mod[r]: qts[r].dequantize().to(cdt) for r in roles}  # in the compute dtype at once, as Swap would cast it
    with Swap(layer, deq):
        for sl, xc in chunks(x, layer_chunk(layer, x, o), dev, cdt):
            for j, xm in micro_batches(xc):
                err += sq_err(output_of(layer(xm, **layer_kwargs)), y[sl.start + j:sl.start + j + xm.shape[0]].to(dev))
    report["mse_output"] = err / y.numel()
    return qts, y, report
