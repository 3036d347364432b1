"""The runner interface every backend implements (torch engine, transformers, onnxruntime).

A runner turns token ids into next-token logits and keeps a KV cache for generation.
`verify` and `generate` only talk to this interface, so a new backend plugs in by
implementing it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Runner(Protocol):
    name: str  # e.g. "torch-engine", "transformers", "onnxruntime"
    device: Any  # "cpu" / "cuda" or a torch.device

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> list[int]: ...

    def new_cache(self, batch: int, capacity: int) -> Any:
        """An empty KV cache for `batch` rows and up to `capacity` tokens."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """input_ids (B, T) long -> logits (B, T, vocab) float32.

        `attention_mask` (B, T) marks real tokens (1) and left padding (0) of these new
        tokens; the cache remembers earlier ones and is advanced in place. Without a
        cache the call is a single prefill.
        """
