"""Reference-vs-candidate statistics from the same forward passes.

Protocol (docs/verify.md): the evaluation tokens are cut into non-overlapping windows;
each window is [BOS] + up to seqlen-1 text tokens (BOS when the tokenizer uses one);
every text token of a window is scored (or only the second half of the window's
positions, llama.cpp's protocol). Perplexity is exp(mean NLL) with the delta-method
standard error exp(mean) * std(NLL) / sqrt(N). KL(reference || candidate) and top-1
agreement are over the next-token distributions at the same scored positions, as are the
statistics perplexity misses (a candidate can keep the perplexity and still reorder the
tokens a sampler picks from):

- top-5 agreement: the reference's top-1 token is among the candidate's 5 most likely;
- top-5 overlap: |top5(reference) ∩ top5(candidate)| / 5, averaged over positions;
- p(reference's top token): the mean probability each model gives the token the
  reference ranks first (the reference's own is its confidence; the candidate's falls
  short of it by how much mass the quantization moved away from that token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmkiln.runtime.generate import check_finite

TOPK = 5  # top-5 agreement / overlap (fewer when the vocabulary is smaller)


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
    top5: list[torch.Tensor] = field(default_factory=list)
    overlap5: list[torch.Tensor] = field(default_factory=list)
    p_top_ref: list[torch.Tensor] = field(default_factory=list)
    p_top_cand: list[torch.Tensor] = field(default_factory=list)
    max_dlogit: float = 0.0
    window_stats: list[dict] = field(default_factory=list)

    def add(self, ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits (T, V) predicting targets (T,), already restricted to scored positions."""
        ref = ref_logits.double().log_softmax(-1)
        cand = cand_logits.double().log_softmax(-1)
        nr = F.nll_loss(ref, targets, reduction="none")
        nc = F.nll_loss(cand, targets, reduction="none")
        self.nll_ref.append(nr)
        self.nll_cand.append(nc)
        self.kl.append((ref.exp() * (ref - cand)).sum(-1).clamp(min=0))
        top = ref_logits.argmax(-1)
        self.top1.append(top == cand_logits.argmax(-1))
        k = min(TOPK, ref_logits.shape[-1])
        ref_k, cand_k = ref_logits.topk(k, -1).indices, cand_logits.topk(k, -1).indices
        self.top5.append((cand_k == top[:, None]).any(-1))
        self.overlap5.append((ref_k[:, :, None] == cand_k[:, None, :]).any(-1).sum(-1).double() / k)
        self.p_top_ref.append(ref.gather(-1, top[:, None])[:, 0].exp())
        self.p_top_cand.append(cand.gather(-1, top[:, None])[:, 0].exp())
        self.max_dlogit = max(self.max_dlogit, float((ref_logits.float() - cand_logits.float()).abs().max()))
        self.window_stats.append({"reference_nll": float(nr.mean()), "candidate_nll": float(nc.mean()),
                                  **{key: float(v[-1].double().mean()) for key, v in self._agreement().items()}})

    def _agreement(self) -> dict[str, list[torch.Tensor]]:
        """The per-position agreement statistics by report key (docs/verify.md)."""
        return {"top1_agreement": self.top1, "top5_agreement": self.top5, "top5_overlap": self.overlap5,
                "reference_p_top": self.p_top_ref, "candidate_p_top": self.p_top_cand}

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
            "top5_agreement": float(torch.cat(self.top5).double().mean()),
            "top5_overlap": float(torch.cat(self.overlap5).mean()),
            "p_top": {"reference": float(torch.cat(self.p_top_ref).mean()), "candidate": float(torch.cat(self.p_top_cand).mean())},
            "max_abs_dlogit": self.max_dlogit,
            "scored_tokens": len(nr),
            "windows": list(self.window_stats),
            "kl_values": kl,
        }


@torch.inference_mode()
def window_logits(runner, wins: list[list[int]], progress=None) -> list[torch.Tensor]:
    """Each window's logits (T, V) float32 on the host: one side of `compare`, run alone so
    the reference and the candidate never have to fit in (GPU) memory together."""
    out = []
    for k, w in enumerate(wins):
        out.append(runner.forward(torch.tensor([w], dtype=torch.long))[0].float().cpu())
        if progress:
            progress(k + 1, len(wins))
    return out


@torch.inference_mode()
def compare(reference_logits: list[torch.Tensor], candidate, wins: list[list[int]], second_half: bool = False,
            progress=None) -> dict:
    """Statistics of `candidate` against the reference's `window_logits` over the same windows."""
    acc = Accumulator()
    for k, (w, lr) in enumerate(zip(wins, reference_logits)):
        x = torch.tensor([w], dtype=torch.long)
        lc = candidate.forward(x)[0].float().cpu()
        check_finite(lc, getattr(candidate, "compute_dtype", None))  # NaN would only show as failed thresholds
        start = (len(w) - 1) // 2 if second_half else 0
        acc.add(lr[start:-1], lc[start:-1], x[0, start + 1:])
        if progress:
            progress(k + 1, len(wins))
    out = acc.summary()
    out["n_windows"] = len(wins)
    return out
