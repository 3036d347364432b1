"""The reference runner: transformers' own model code on a local HF directory.

For an AWQ-GEMM directory the weights are dequantized first (the "fake-quantized"
model), so transformers runs exactly the values an int4/int8 kernel computes with,
without needing any AWQ kernel package.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkiln.convert.architectures import ARCHITECTURES
from lmkiln.convert.hf_config import stop_token_ids
from lmkiln.formats.awq_gemm import awq_spec
from lmkiln.formats.hf import HFCheckpoint


@dataclass
class HFCache:
    past: object  # transformers Cache
    mask: torch.Tensor  # (B, tokens so far) long


class TransformersRunner:
    name = "transformers"

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModelForCausalLM

        ckpt = HFCheckpoint(path)
        self.path = Path(path)
        arch = ARCHITECTURES.get(ckpt.architecture)
        attn = arch.hf_attention if arch else "sdpa"  # the implementation that computes the family's exact math
        if awq_spec(ckpt.config) is None:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                              trust_remote_code=False, attn_implementation=attn)
        else:
            from lmkiln.quant.dequant import fake_quant_state_dict

            cfg_dict, sd = fake_quant_state_dict(path, dtype)
            config = AutoConfig.for_model(**cfg_dict)
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
            tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
            if set(missing) - tied or unexpected:
                from lmkiln.errors import CheckpointError

                raise CheckpointError(f"{path}: dequantized weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
            self.model.tie_weights()
        self.model.eval().to(device)
        self.device = torch.device(device)
        # transformers renamed past_key_values to cache (deprecated from 5.2x, with a
        # FutureWarning on every call); older releases know only the old name
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._eos = stop_token_ids(ckpt.config.get("eos_token_id"), ckpt.generation_config, self.model.config.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        return self._eos

    def new_cache(self, batch: int, capacity: int) -> HFCache:
        from transformers import DynamicCache

        return HFCache(DynamicCache(), torch.zeros(batch, 0, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, cache: HFCache | None = None) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        new = torch.ones(B, T, dtype=torch.long, device=self.device) if attention_mask is None else attention_mask.to(self.device).long()
        if cache is None:
            cache = self.new_cache(B, T)
        full = torch.cat([cache.mask, new], 1)
        # Positions count real tokens only, as generate() does for left padding.
        pos = (full.cumsum(1) - 1).clamp(min=0)[:, -T:]
        out = self.model(input_ids=input_ids, attention_mask=full, position_ids=pos, use_cache=True, **{self._cache_arg: cache.past})
        cache.past, cache.mask = out[self._cache_arg], full
        return out.logits.float()
