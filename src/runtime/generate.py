"""Greedy generation over any runner with `new_cache(batch, capacity)` and
`forward(input_ids, attention_mask, cache) -> logits`.

A runner that also has a fixed-shape `step(token, cache, slot)` (the engine runner)
decodes on CUDA through `static_greedy`: no host synchronisation per token, the step
captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import torch

from lmkiln.errors import InputError


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


def context_length(model) -> int | None:
    """The positions the model was made for: lmkiln runners keep the engine's model block
    (a dict), the transformers runner its model's config."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict):
        return cfg.get("max_position_embeddings")
    return getattr(getattr(getattr(model, "model", None), "config", None), "max_position_embeddings", None)


def check_prompts(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    """`check_lengths` against a runner's own context and vocabulary."""
    if not prompts:  # left_pad would have no row to pad
        raise InputError("no prompts to generate from; give at least one")
    check_lengths(prompts, max_new_tokens, context_length(model), model.vocab_size)


def check_finite(logits: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Refuse NaN/Inf logits (an argmax of NaN is token 0: generation would go on silently,
    verify would only fail its thresholds): damaged weights, or, in float16 — the default for
    a quantized engine on CUDA — activations past float16's range."""
    if bool(torch.isfinite(logits).all()):
        return
    if dtype == torch.float16:
        raise InputError("the model's logits are NaN or Inf in float16: its activations overflow float16 (rerun with "
                         "--dtype bf16) or its weights hold NaN/Inf values")
    raise InputError("the model's logits are NaN or Inf: its weights hold NaN/Inf values (a damaged checkpoint or "
                     "export; make it again from a good source)")


def check_lengths(prompts: list[list[int]], max_new_tokens: int, ctx: int | None, vocab: int | None,
                  name=lambda k: "the prompt") -> None:
    """Refuse what would silently go wrong: prompt + new tokens past the model's context
    (rotary positions it never saw: the text degrades without a word, and a huge count
    allocates a cache for all of it) and token ids past its vocabulary (a tokenizer that
    does not belong to the model) and empty prompts: a tokenizer that adds no BOS (every
    Qwen one) turns "" or text it drops (a lone soft hyphen) into no tokens, and a model
    needs one to predict from. `name(k)` names prompt k in the message."""
    for k, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"{name(k)} is empty after tokenization (this tokenizer adds no BOS token, so an empty "
                             "prompt has nothing to continue); give it some text")
        if ctx and len(p) + max_new_tokens > ctx:
            room = ctx - len(p)
            fix = (f"ask for at most {room} new tokens or shorten it" if room >= 1 else
                   f"shorten it to at most {ctx - max_new_tokens} tokens" if ctx > max_new_tokens else
                   f"ask for fewer than {ctx} new tokens and shorten it")
            raise InputError(f"{name(k)} ({len(p)} tokens) plus {max_new_tokens} new tokens exceed the model's context of "
                             f"{ctx} positions; {fix}")
    top = max((max(p) for p in prompts if p), default=-1)
    if vocab is not None and top >= vocab:
        raise InputError(f"token id {top} is outside the model's vocabulary ({vocab} ids): the tokenizer "
                         "does not belong to this model")


@torch.inference_mode()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int] | tuple[int, ...] = (),
                    static: bool | None = None) -> list[list[int]]:
    """New tokens per prompt (argmax each step), stopping a row at its first EOS (kept).
    `static`: decode through `static_greedy` (default: for a runner with `step` on CUDA)."""
    check_prompts(model, prompts, max_new_tokens)
    device = getattr(model, "device", None)
    if static is None:
        static = hasattr(model, "step") and device is not None and torch.device(device).type == "cuda"
    if static:
        return static_greedy(model, prompts, max_new_tokens, eos_ids)
    ids, mask = left_pad(prompts)
    B = ids.shape[0]
    cache = model.new_cache(B, ids.shape[1] + max_new_tokens)
    logits = model.forward(ids, mask, cache)[:, -1]
    check_finite(logits, getattr(model, "compute_dtype", None))
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


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    return next((row[:i + 1] for i, t in enumerate(row) if t in eos), row)


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


@torch.inference_mode()
def static_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos_ids=(), graphs: bool | None = None,
                  check_every: int = 16) -> list[list[int]]:
    """`greedy_generate` for a runner with `step`: the same tokens, with the host out of the loop.

    The prompt is prefilled as usual; then every new token is one `model.step` plus an
    argmax on the device whose result is both the next step's input and stored in a device
    buffer, so steps follow each other without the host reading anything. With `graphs`
    (default: on CUDA when `model.graphable`) that step is captured once as a CUDA graph —
    one launch per token instead of hundreds of kernels. The host looks for EOS every
    `check_every` tokens (one sync each); rows that ended early decode on and are cut.
    """
    ids, mask = left_pad(prompts)
    B, T = ids.shape
    dev = torch.device(model.device)
    graphs = (dev.type == "cuda" and model.graphable) if graphs is None else graphs
    cache = model.new_cache(B, T + max_new_tokens)
    token = torch.zeros(B, 1, dtype=torch.long, device=dev)
    slot = torch.zeros(1, dtype=torch.long, device=dev)
    out = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=dev)  # out[:, s]: the token for cache slot s

    def one_step():
        nxt = model.step(token, cache, slot).argmax(-1)
        token.copy_(nxt[:, None])
        out.index_copy_(1, slot, nxt[:, None])

    graph = None
    if graphs:
        # Warm up on a side stream (allocator, cuBLAS workspaces), capture, then clear what
        # the warm-up wrote: validity and positions (stale keys/values stay masked out). One
        # side stream per device for the process: cuBLAS keeps a workspace per stream for
        # good, and a new stream per call measured +32 MiB of GPU memory per call.
        if dev not in _SIDE_STREAMS:
            _SIDE_STREAMS[dev] = torch.cuda.Stream(dev)
        side = _SIDE_STREAMS[dev]
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                one_step()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            one_step()
        cache.valid.zero_(), cache.kpos.zero_(), cache.next_pos.zero_()
    logits = model.forward(ids, mask, cache)[:, -1]
    check_finite(logits, getattr(model, "compute_dtype", None))  # one host sync, after the prefill
    first = logits.argmax(-1)
    token.copy_(first[:, None])
    out[:, T] = first
    slot.fill_(T)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=dev)
    steps = 0
    while steps < max_new_tokens - 1:
        graph.replay() if graph is not None else one_step()
        steps += 1
        if len(eos) and steps % check_every == 0 and bool(torch.isin(out[:, T:T + steps + 1], eos).any(1).all()):
            break
    cache.length = T + steps
    rows = out[:, T:T + steps + 1].cpu().tolist()
    stop = set(int(e) for e in eos_ids)
    return [_until_eos(r, stop) for r in rows]
