"""Reference-vs-candidate statistics from the same forward passes.

Protocol (docs/verify.md): the evaluation tokens are cut into non-overlapping windows;
each window is [BOS] + up to seqlen-1 text tokens (BOS when the tokenizer uses one);
every text token of a window is scored (or only the second half of the window's
positions, llama.cpp's protocol). Perplexity is exp(mean NLL) with the delta-method
standard error exp(mean) * std(NLL) / sqrt(N). KL(reference || candidate) and top-1
agreement are over the next-token distributions at the same scored positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def windows(ids: list[int], seqlen: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping windows of text tokens, each prefixed with BOS if given."""
    body = seqlen - (1 if bos is not None else 0)
    if body < 2:
        raise ValueError(f"seqlen {seqlen} leaves no tokens to score")
    out = [ids[i:i + body] for i in range(0, len(ids), body)]
    out = [w for w in out if len(w) == body] or out[:1]  # whole windows; one short one if that is all
    return [([bos] if bos is not None else []) + w for w in out]


@dataclass
class Accumulator:
    nll_ref: list[torch.Tensor] = field(default_factory=list)
    nll_cand: list[torch.Tensor] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)
    top1: list[torch.Tensor] = field(default_factory=list)
    max_dlogit: float = 0.0
    window_nll: list[tuple[float, float]] = field(default_factory=list)

    def add(self, ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits (T, V) predicting targets (T,), already restricted to scored positions."""
        ref = ref_logits.double().log_softmax(-1)
        cand = cand_logits.double().log_softmax(-1)
        nr = F.nll_loss(ref, targets, reduction="none")
        nc = F.nll_loss(cand, targets, reduction="none")
        self.nll_ref.append(nr)
        self.nll_cand.append(nc)
        self.kl.append((ref.exp() * (ref - cand)).sum(-1).clamp(min=0))
        self.top1.append(ref_logits.argmax(-1) == cand_logits.argmax(-1))
        self.max_dlogit = max(self.max_dlogit, float((ref_logits.float() - cand_logits.float()).abs().max()))
        self.window_nll.append((float(nr.mean()), float(nc.mean())))

    def summary(self) -> dict:
        nr, nc, kl = torch.cat(self.nll_ref), torch.cat(self.nll_cand), torch.cat(self.kl)
        top1 = torch.cat(self.top1).double()

        def ppl(nll):
            p = math.exp(float(nll.mean()))
            se = p * float(nll.std()) / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
            return {"ppl": p, "ppl_stderr": se, "mean_nll": float(nll.mean())}

        r, c = ppl(nr), ppl(nc)
        return {
            "reference": r,
            "candidate": c,
            "ppl_increase_pct": (c["ppl"] / r["ppl"] - 1) * 100,
            "kl": {"mean": float(kl.mean()), "p99": float(torch.quantile(kl, 0.99)), "max": float(kl.max())},
            "top1_agreement": float(top1.mean()),
            "max_abs_dlogit": self.max_dlogit,
            "scored_tokens": len(nr),
            "windows": [{"reference_nll": a, "candidate_nll": b} for a, b in self.window_nll],
            "kl_values": kl,
        }


@torch.inference_mode()
def compare(reference, candidate, ids: list[int], seqlen: int, bos: int | None, second_half: bool = False,
            progress=None) -> dict:
    acc = Accumulator()
    wins = windows(ids, seqlen, bos)
    for k, w in enumerate(wins):
        x = torch.tensor([w], dtype=torch.long)
        lr = reference.forward(x)[0].float().cpu()
        lc = candidate.forward(x)[0].float().cpu()
        first = 0 if bos is not None else 0
        start = max(first, (len(w) - 1) // 2) if second_half else first
        acc.add(lr[start:-1], lc[start:-1], x[0, start + 1:])
        if progress:
            progress(k + 1, len(wins))
    out = acc.summary()
    out["n_windows"] = len(wins)
    return out
