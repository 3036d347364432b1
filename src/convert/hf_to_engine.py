"""`lmkiln convert hf-to-engine`: a Hugging Face checkpoint -> an engine directory.

Every source tensor is accounted for (consumed by a role, or skipped with the table's
reason), every target is planned with its shape before the first byte is written, and
tensors stream through one decoder layer at a time, so peak memory is about one layer.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

import lmkiln
from lmkiln.convert.architectures import GLOBAL_ROLES, LAYER_ROLES, Architecture, get_architecture
from lmkiln.convert.hf_config import engine_config_from_hf
from lmkiln.convert.transforms import (
    check_tp, fuse_qkv_rank, fuse_w13_rank, pad_cols, pad_rows, permute_rotary, rank_cols, round_up,
)
from lmkiln.errors import CheckpointError, InputError
from lmkiln.formats.atomic import atomic_dir
from lmkiln.formats.engine import (
    DTYPE_NAMES, FORMAT, VERSION, WEIGHT_TYPES, EngineWriter, config_sha256, copy_side_files, expected_tensors, write_manifest,
)
from lmkiln.formats.hf import HFCheckpoint

ProgressFn = Callable[[str, int], None]


def role_shapes(model: dict) -> dict[str, tuple[int, ...]]:
    """The HF (out, in) shape each role must have, from the engine config."""
    h, hd, hq, kv, inter, v = (model[k] for k in ("hidden_units", "size_per_head", "head_num", "kv_head_num", "inter_size", "vocab_size"))
    return {
        "embed": (v, h), "final_norm": (h,), "lm_head": (v, h),
        "attn_norm": (h,), "ffn_norm": (h,),
        "q": (hq * hd, h), "k": (kv * hd, h), "v": (kv * hd, h), "o": (h, hq * hd),
        "q_bias": (hq * hd,), "k_bias": (kv * hd,), "v_bias": (kv * hd,),
        "q_norm": (hd,), "k_norm": (hd,),
        "gate": (inter, h), "up": (inter, h), "down": (h, inter),
    }


def required_roles(model: dict) -> tuple[list[str], list[str]]:
    glob = [r for r in GLOBAL_ROLES if not (r == "lm_head" and model["tie_word_embeddings"])]
    layer = [r for r in LAYER_ROLES
             if not (r.endswith("_bias") and not model["attn_bias"]) and not (r in ("q_norm", "k_norm") and not model["qk_norm"])]
    return glob, layer


@dataclass
class Accounting:
    """Which HF tensor feeds which role, and which were skipped and why."""

    consumed: dict[str, str] = field(default_factory=dict)  # HF name -> role
    skipped: dict[str, str] = field(default_factory=dict)  # HF name -> reason


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"\d+") + "$")


def account(ckpt, arch: Architecture, model: dict) -> Accounting:
    """Map every checkpoint tensor to a role or a reasoned skip; assert every shape.

    `ckpt` needs `keys()` and `shape(name)`. Raises CheckpointError on a missing, unknown
    or misshapen tensor, naming it.
    """
    acc = Accounting()
    shapes = role_shapes(model)
    glob, layer = required_roles(model)
    wanted = [(r, None) for r in glob] + [(r, i) for i in range(model["num_layer"]) for r in layer]
    for role, i in wanted:
        name = arch.hf_name_of(role, i)
        if name is None:
            raise CheckpointError(f"the {arch.hf_name} table has no tensor for role {role!r}, which this config needs")
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} ({role}) is missing from the checkpoint")
        if tuple(ckpt.shape(name)) != shapes[role]:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(ckpt.shape(name))}, config.json implies {list(shapes[role])}")
        acc.consumed[name] = role
    skip_rules = [(_template_regex(t), why) for t, why in arch.skips.items()]
    skip_rules += [(_template_regex(arch.tensors[r]), why) for r, why in arch.optional.items() if r in arch.tensors]
    unknown = []
    for name in ckpt.keys():
        if name in acc.consumed:
            continue
        why = next((w for rx, w in skip_rules if rx.match(name)), None)
        if why is None:
            unknown.append(name)
        else:
            acc.skipped[name] = why
    if unknown:
        raise CheckpointError(
            f"{ckpt.path}: {len(unknown)} tensor(s) the {arch.hf_name} table does not account for, e.g. {unknown[:3]}; "
            "refusing to drop weights silently (is config.json right for these weights?)"
        )
    return acc


def produce(ckpt, arch: Architecture, model: dict, tp: int, out_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (engine name, tensor) in the order of `expected_tensors`, one layer in memory at a time."""
    hd, hq, kv = model["size_per_head"], model["head_num"], model["kv_head_num"]
    inter_p = model["inter_size_padded"]

    def get(role, i=None):
        return ckpt.get(arch.hf_name_of(role, i)).to(out_dtype)

    def lin(w):  # HF (out, in) -> engine (in, out)
        return w.t().contiguous()

    yield "tok_embeddings.weight", get("embed")
    for i in range(model["num_layer"]):
        p = f"layers.{i}"
        yield f"{p}.attention_norm.weight", get("attn_norm", i)
        yield f"{p}.ffn_norm.weight", get("ffn_norm", i)
        if model["qk_norm"]:
            yield f"{p}.attention.q_norm.weight", permute_rotary(get("q_norm", i), 1, hd)
            yield f"{p}.attention.k_norm.weight", permute_rotary(get("k_norm", i), 1, hd)
        q, k, v = permute_rotary(get("q", i), hq, hd), permute_rotary(get("k", i), kv, hd), get("v", i)
        if model["attn_bias"]:
            qb, kb, vb = permute_rotary(get("q_bias", i), hq, hd), permute_rotary(get("k_bias", i), kv, hd), get("v_bias", i)
        o = get("o", i)
        gate, up = pad_rows(get("gate", i), inter_p), pad_rows(get("up", i), inter_p)
        down = pad_cols(get("down", i), inter_p)
        for r in range(tp):
            yield f"{p}.attention.w_qkv.{r}.weight", lin(fuse_qkv_rank(q, k, v, hd, kv, tp, r))
            if model["attn_bias"]:
                yield f"{p}.attention.w_qkv.{r}.bias", fuse_qkv_rank(qb, kb, vb, hd, kv, tp, r).contiguous()
            yield f"{p}.attention.wo.{r}.weight", lin(rank_cols(o, tp, r))
            yield f"{p}.feed_forward.w13.{r}.weight", lin(fuse_w13_rank(gate, up, tp, r))
            yield f"{p}.feed_forward.w2.{r}.weight", lin(rank_cols(down, tp, r))
    yield "norm.weight", get("final_norm")
    if not model["tie_word_embeddings"]:
        yield "output.weight", lin(get("lm_head"))


def resolve_dtype(dtype: str, source: torch.dtype) -> torch.dtype:
    if dtype == "auto":
        return source if source in DTYPE_NAMES else torch.float32
    if dtype not in WEIGHT_TYPES:
        raise InputError(f"--dtype {dtype!r} is not one of auto, {', '.join(WEIGHT_TYPES)}")
    return WEIGHT_TYPES[dtype]


def plan_engine(ckpt: HFCheckpoint, tp: int = 1, dtype: str = "auto"):
    """Everything decided before writing: (arch, model config, accounting, plan, dtype)."""
    arch = get_architecture(ckpt.architecture)
    model = engine_config_from_hf(arch, ckpt.config)
    why = check_tp(model["head_num"], model["kv_head_num"], tp)
    if why:
        raise InputError(f"--tp {tp}: {why}")
    model["inter_size_padded"] = round_up(model["inter_size"], tp)
    acc = account(ckpt, arch, model)
    out_dtype = resolve_dtype(dtype, ckpt.source_dtype)
    plan = expected_tensors(model, tp, model["inter_size_padded"], out_dtype)
    return arch, model, acc, plan, out_dtype


def convert_hf_to_engine(
    model_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    tp: int = 1,
    force: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """Convert; returns the engine path. `progress(name, nbytes)` is called per tensor written."""
    ckpt = HFCheckpoint(model_dir, allow_pickle=allow_pickle)
    arch, model, acc, plan, out_dtype = plan_engine(ckpt, tp, dtype)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force, inputs=(ckpt.path,)) as tmp:
        writer = EngineWriter(tmp, plan)
        try:
            for name, t in produce(ckpt, arch, model, tp, out_dtype):
                writer.write(name, t)
                if progress:
                    progress(name, t.numel() * t.element_size())
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        side = copy_side_files(ckpt.tokenizer_files(), tmp)
        shutil.copyfile(ckpt.path / "config.json", tmp / "source_config.json")
        write_manifest(tmp, {
            "format": FORMAT,
            "format_version": VERSION,
            "model": model,
            "weight_type": DTYPE_NAMES[out_dtype],
            "tensor_parallel": tp,
            "tensors": {n: {"file": f, "dtype": DTYPE_NAMES[dt], "shape": list(s)} for n, f, dt, s in plan},
            "files": files,
            "tokenizer_files": side,
            "source": {
                "architecture": arch.hf_name,
                "config_sha256": config_sha256(ckpt.config),
                "source_dtype": str(ckpt.source_dtype).replace("torch.", ""),
                "skipped_tensors": acc.skipped,
                "lmkiln_version": lmkiln.__version__,
            },
        })
    return out_dir
