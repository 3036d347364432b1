"""Greedy generation over any runner with `new_cache(batch, capacity)` and
`forward(input_ids, attention_mask, cache) -> logits`."""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (ids, mask), both (B, T_max), padded on the left
    so every row's last prompt token sits in the last column."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int] | tuple[int, ...] = ()) -> list[list[int]]:
    """New tokens per prompt (argmax each step), stopping a row at its first EOS (kept)."""
    ids, mask = left_pad(prompts)
    B = ids.shape[0]
    cache = model.new_cache(B, ids.shape[1] + max_new_tokens)
    logits = model.forward(ids, mask, cache)[:, -1]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    eos = torch.tensor(list(eos_ids), dtype=torch.long)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1).cpu()
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
        done |= torch.isin(nxt, eos) if len(eos) else torch.zeros_like(done)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model.forward(nxt[:, None], torch.ones(B, 1, dtype=torch.long), cache)[:, -1]
    return out
