"""`lmkiln convert hf-to-engine`: a Hugging Face checkpoint -> an engine directory.

Every source tensor is accounted for (consumed by a role, or skipped with the table's
reason), every target is planned with its shape before the first byte is written, and
tensors stream through one decoder layer at a time, so peak memory is about one layer.
AWQ-GEMM checkpoints become int4/int8 engines through the same code path: their linears
are QTensors that the same transforms move (src/convert/quantized.py).
"""

from __future__ import annotations

import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

import lmkiln
from lmkiln.convert.architectures import (
    EXPERT_ROLES, GLOBAL_ROLES, LAYER_ROLES, Architecture, expand_experts, get_architecture, is_linear,
)
from lmkiln.convert.hf_config import engine_config_from_hf
from lmkiln.convert.quantized import (
    check_symmetric, engine_tensors, is_quantized, module_name, pad_in, rank_in, resolve_quant, rows, unquantized_linears,
)
from lmkiln.convert.transforms import cat_rows, fuse_qkv_rank, fuse_w13_rank, pad_rows, permute_rotary
from lmkiln.errors import CheckpointError, InputError, LmkilnError, check_callable, check_flag, check_path
from lmkiln.formats.atomic import atomic_dir, check_output
from lmkiln.formats import compressed_tensors
from lmkiln.formats.awq_gemm import AwqSpec, awq_spec, qlinear_shapes, read_dtypes, read_qlinear
from lmkiln.formats.engine import (
    DTYPE_NAMES, FORMAT, QUANT_TYPES, WEIGHT_TYPES, EngineWriter, check_tp, config_sha256, copy_side_files,
    VERSION, expected_tensors, manifest_index, manifest_model, write_manifest,
)
from lmkiln.formats.hf import QUANT_REPORT, HFCheckpoint, all_finite, ffn_padding
from lmkiln.formats.qtensor import QTensor
from lmkiln.formats.safetensors_io import Rows
from lmkiln.formats.space import check_free
from lmkiln.formats.tokenizer import resolved_tokenizer_class
from lmkiln.formats.packing import round_up

ProgressFn = Callable[[str, int], None]


def role_shapes(model: dict) -> dict[str, tuple[int, ...]]:
    """The HF (out, in) shape each role must have, from the engine config."""
    h, hd, hq, kv, inter, v = (model[k] for k in ("hidden_units", "size_per_head", "head_num", "kv_head_num", "inter_size", "vocab_size"))
    return {
        "embed": (v, h), "final_norm": (h,), "lm_head": (v, h),
        "attn_norm": (h,), "ffn_norm": (h,), "post_attn_norm": (h,), "post_ffn_norm": (h,),
        "q": (hq * hd, h), "k": (kv * hd, h), "v": (kv * hd, h), "o": (h, hq * hd),
        "q_bias": (hq * hd,), "k_bias": (kv * hd,), "v_bias": (kv * hd,),
        "q_norm": (hd,), "k_norm": (hd,),
        "gate": (inter, h), "up": (inter, h), "down": (h, inter),
        "qkv": ((hq + 2 * kv) * hd, h), "gate_up": (2 * inter, h),
        "router": (model.get("num_experts") or 0, h),
        "expert_gate": (inter, h), "expert_up": (inter, h), "expert_down": (h, inter),
    } | {f"{r}.{e}": s for r, s in (("expert_gate", (inter, h)), ("expert_up", (inter, h)), ("expert_down", (h, inter)))
         for e in range(model.get("num_experts") or 0)}


def required_roles(model: dict, arch: Architecture) -> tuple[list[str], list[str]]:
    """(global, per-layer) roles this model needs, as the checkpoint holds them (a fused
    linear in place of its members)."""
    glob = [r for r in GLOBAL_ROLES if not (r == "lm_head" and model["tie_word_embeddings"])]
    moe = bool(model.get("num_experts"))
    layer = [r for r in LAYER_ROLES
             if not (r.endswith("_bias") and not model["attn_bias"]) and not (r in ("q_norm", "k_norm") and not model["qk_norm"])
             and not (r.startswith("post_") and not model["sandwich_norm"])
             and not (r in ("gate", "up", "down") and moe) and not ((r == "router" or r in EXPERT_ROLES) and not moe)]
    return glob, expand_experts(arch.hf_roles(layer), model.get("num_experts") or 0)


def fused_rows(arch: Architecture, model: dict, role: str) -> tuple[str, int, int] | None:
    """(fused HF role, first row, end row) of a member role, or None for an unfused one."""
    parent = arch.fused_parent(role)
    if parent is None:
        return None
    shapes, start = role_shapes(model), 0
    for r in arch.fused[parent]:
        if r == role:
            return parent, start, start + shapes[r][0]
        start += shapes[r][0]
    raise AssertionError(role)


def member_linear(arch: Architecture, model: dict, role: str, get: Callable):
    """Linear `role` from `get(hf_role)`: its own tensor, or its rows of the fused linear
    (fp or QTensor: rows slice codes, scales and zeros alike)."""
    where = fused_rows(arch, model, role)
    if where is None:
        return get(role)
    parent, a, b = where
    return rows(lambda t: t[a:b].contiguous(), get(parent))


@dataclass
class Accounting:
    """Which HF tensor feeds which role, and which were skipped and why."""

    consumed: dict[str, str] = field(default_factory=dict)  # HF name -> role
    skipped: dict[str, str] = field(default_factory=dict)  # HF name -> reason
    quantized: set[str] = field(default_factory=set)  # the consumed names that are AWQ qweight/qzeros/scales


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"\d+") + "$")


def _account_qlinear(ckpt, module: str, role: str, spec: AwqSpec, shape: tuple[int, int], acc: Accounting) -> None:
    for suffix, (dtype, want) in qlinear_shapes(spec, *shape).items():
        name = f"{module}.{suffix}"
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} ({role}, {spec.layout} {suffix}) is missing from the checkpoint")
        if tuple(ckpt.shape(name)) != want:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(ckpt.shape(name))}, config.json implies {list(want)}")
        ok = read_dtypes(spec, suffix, dtype)
        if ckpt.dtype(name) not in ok:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} is {ckpt.dtype(name)}, {spec.layout} stores "
                                  f"{' or '.join(str(d) for d in ok)}")
        acc.consumed[name] = role
        acc.quantized.add(name)


def account(ckpt, arch: Architecture, model: dict, spec: AwqSpec | None = None) -> Accounting:
    """Map every checkpoint tensor to a role or a reasoned skip; assert every shape.

    `ckpt` needs `keys()` and `shape(name)` (and `dtype(name)` with `spec`). Raises
    CheckpointError on a missing, unknown or misshapen tensor, naming it. With an AWQ
    `spec`, a quantized linear role is its module's qweight/qzeros/scales.
    """
    acc = Accounting()
    shapes = role_shapes(model)
    glob, layer = required_roles(model, arch)
    wanted = [(r, None) for r in glob] + [(r, i) for i in range(model["num_layer"]) for r in layer]
    for role, i in wanted:
        name = arch.hf_name_of(role, i)
        if name is None:
            raise CheckpointError(f"the {arch.hf_name} table has no tensor for role {role!r}, which this config needs")
        if spec is not None and is_linear(role) and is_quantized(ckpt, arch, role, i, spec):
            _account_qlinear(ckpt, module_name(arch, role, i), role, spec, shapes[role], acc)
            continue
        if name not in ckpt:
            base = name.removesuffix(".weight")
            if spec is not None and f"{base}.{spec.code_suffix}" in ckpt:  # e.g. a quantized head (ignore=[])
                raise CheckpointError(f"{ckpt.path}: {base} is quantized; lmkiln keeps the {role} in floating point: "
                                      "quantize with it left out (llm-compressor: ignore=['lm_head'])")
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


class CheckpointSource:
    """The tensors `produce_*` asks for, by role, from an HF checkpoint (fp or AWQ-GEMM).

    Other producers (quantize's engine sink) supply the same two methods: `fp(role, i)`
    for a non-linear tensor in the engine's fp dtype, `linear(role, i, kind)` for a
    linear weight in HF orientation (out, in), fp or a QTensor."""

    def __init__(self, ckpt, arch: Architecture, model: dict, out_dtype: torch.dtype,
                 quant: dict | None = None, spec: AwqSpec | None = None):
        self.ckpt, self.arch, self.model, self.out_dtype, self.quant, self.spec = ckpt, arch, model, out_dtype, quant, spec

    def fp(self, role: str, i: int | None = None) -> torch.Tensor:
        name = self.arch.hf_name_of(role, i)
        t = self.ckpt.get(name)
        if not t.is_floating_point():  # .to() would turn integer bit patterns into huge "weights", silently
            raise InputError(f"{self.ckpt.path}: tensor {name!r} is stored as {str(t.dtype).removeprefix('torch.')}, not a "
                             "floating-point type; the checkpoint is damaged")
        # a NaN or Inf would be copied into the engine without a word, and every output would carry it
        self.ckpt.check_finite(name, t, f"decoder layer {i}" if i is not None else "")
        out = t.to(self.out_dtype)
        if self.out_dtype == torch.float16 and t.dtype != torch.float16 and not all_finite(out):
            raise InputError(f"{self.ckpt.path}: tensor {name!r} holds values beyond float16's range (max |x| "
                             f"{float(t.abs().max()):.3g} > 65504) that would become Inf; convert with --dtype bf16 or fp32")
        return out

    def linear(self, role: str, i: int, kind: str):
        return member_linear(self.arch, self.model, role, lambda r: self._linear(r, i, kind))

    def _linear(self, role: str, i: int, kind: str):
        if self.quant is None or f"layers.{i}.{kind}" in self.quant["unquantized"]:
            return self.fp(role, i)
        module = module_name(self.arch, role, i)
        qt = read_qlinear(self.ckpt.get, module, self.spec, *role_shapes(self.model)[role])
        check_symmetric(qt, self.spec, module)
        return qt


def _pad_ffn_rows(w, n: int):
    """gate/up rows zero-padded to the FFN width n; quantized ones with QTensor.pad_out's inert
    rows, as AWQ-GEMM and compressed-tensors outputs hold them, so an engine converted from
    those has the same bytes as one quantized straight to an engine."""
    return w.pad_out(n) if isinstance(w, QTensor) else pad_rows(w, n)


def stacked(per_expert: list) -> Iterator[tuple[str, torch.Tensor]]:
    """The experts' engine tensors stacked along a new leading dim, name by name."""
    lists = [list(t) for t in per_expert]
    for k, (name, _) in enumerate(lists[0]):
        yield name, torch.stack([items[k][1] for items in lists])


def produce_head(src, model: dict) -> Iterator[tuple[str, torch.Tensor]]:
    yield "tok_embeddings.weight", src.fp("embed")


def produce_layer(src, model: dict, i: int, tp: int, quant: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Decoder layer i's engine tensors in the order of `expected_tensors`.

    A linear is an fp tensor or (with `quant`) a QTensor, HF orientation (out, in); the
    transforms below are the same for both (`rows`, `pad_in`, `rank_in` dispatch).
    """
    hd, hq, kv = model["size_per_head"], model["head_num"], model["kv_head_num"]
    inter_p = model["inter_size_padded"]
    channel = quant is not None and quant["granularity"] == "channel"
    p = f"layers.{i}"
    yield f"{p}.attention_norm.weight", src.fp("attn_norm", i)
    yield f"{p}.ffn_norm.weight", src.fp("ffn_norm", i)
    if model["sandwich_norm"]:
        yield f"{p}.post_attention_norm.weight", src.fp("post_attn_norm", i)
        yield f"{p}.post_ffn_norm.weight", src.fp("post_ffn_norm", i)
    if model["qk_norm"]:
        yield f"{p}.attention.q_norm.weight", permute_rotary(src.fp("q_norm", i), 1, hd)
        yield f"{p}.attention.k_norm.weight", permute_rotary(src.fp("k_norm", i), 1, hd)
    q = rows(lambda t: permute_rotary(t, hq, hd), src.linear("q", i, "attention.w_qkv"))
    k = rows(lambda t: permute_rotary(t, kv, hd), src.linear("k", i, "attention.w_qkv"))
    v = src.linear("v", i, "attention.w_qkv")
    if model["attn_bias"]:
        qb, kb, vb = permute_rotary(src.fp("q_bias", i), hq, hd), permute_rotary(src.fp("k_bias", i), kv, hd), src.fp("v_bias", i)
    o = src.linear("o", i, "attention.wo")
    n_exp = model.get("num_experts") or 0
    # (gate, up, down) of the dense FFN, or of each expert (rows padded alike, stacked per rank below)
    ffns = [(f"expert_gate.{e}", f"expert_up.{e}", f"expert_down.{e}") for e in range(n_exp)] or [("gate", "up", "down")]
    kind = "moe" if n_exp else "feed_forward"
    # fp members of a fused linear go to the writer as Rows (written part by part, never concatenated);
    # quantized ones (codes, scales, zeros) and stacked experts are concatenated
    join = lambda w: cat_rows if n_exp or isinstance(w, QTensor) else Rows  # noqa: E731
    ffns = [(_pad_ffn_rows(src.linear(g, i, f"{kind}.w13"), inter_p), _pad_ffn_rows(src.linear(u, i, f"{kind}.w13"), inter_p),
             pad_in(src.linear(d, i, f"{kind}.w2"), inter_p, channel)) for g, u, d in ffns]
    for r in range(tp):
        yield from engine_tensors(f"{p}.attention.w_qkv.{r}", rows(lambda *w: fuse_qkv_rank(*w, hd, kv, tp, r, join(q)), q, k, v))
        if model["attn_bias"]:
            yield f"{p}.attention.w_qkv.{r}.bias", fuse_qkv_rank(qb, kb, vb, hd, kv, tp, r).contiguous()
        yield from engine_tensors(f"{p}.attention.wo.{r}", rank_in(o, tp, r, channel))
        if n_exp and r == 0:
            yield f"{p}.moe.router.weight", src.fp("router", i)  # (experts, hidden): stored (out, in)
        w13 = [engine_tensors(f"{p}.{kind}.w13.{r}", rows(lambda *w: fuse_w13_rank(*w, tp, r, join(g)), g, u)) for g, u, _ in ffns]
        w2 = [engine_tensors(f"{p}.{kind}.w2.{r}", rank_in(d, tp, r, channel)) for _, _, d in ffns]
        yield from (stacked(w13) if n_exp else w13[0])
        yield from (stacked(w2) if n_exp else w2[0])


def produce_tail(src, model: dict) -> Iterator[tuple[str, torch.Tensor]]:
    yield "norm.weight", src.fp("final_norm")
    if not model["tie_word_embeddings"]:
        yield "output.weight", src.fp("lm_head")  # (vocab, hidden): stored (out, in)


def produce(ckpt, arch: Architecture, model: dict, tp: int, out_dtype: torch.dtype,
            quant: dict | None = None, spec: AwqSpec | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (engine name, tensor) in the order of `expected_tensors`, one layer in memory at a time."""
    src = CheckpointSource(ckpt, arch, model, out_dtype, quant, spec)
    yield from produce_head(src, model)
    for i in range(model["num_layer"]):
        yield from produce_layer(src, model, i, tp, quant)
    yield from produce_tail(src, model)


def resolve_dtype(dtype: str, source: torch.dtype) -> torch.dtype:
    if dtype == "auto":
        return source if source in DTYPE_NAMES else torch.float32
    if dtype not in WEIGHT_TYPES:
        raise InputError(f"--dtype {dtype!r} is not one of auto, {', '.join(WEIGHT_TYPES)}")
    return WEIGHT_TYPES[dtype]


@dataclass
class EnginePlan:
    """Everything decided before the first byte is written."""

    arch: Architecture
    model: dict  # the manifest's model block
    acc: Accounting
    tensors: list  # expected_tensors(...): (name, file, dtype, shape)
    fp_dtype: torch.dtype  # of the fp tensors (all of them unless quantized)
    source_dtype: torch.dtype  # of the source's fp tensors
    spec: AwqSpec | None = None  # the source's AWQ settings, None for an fp source
    quant: dict | None = None  # the manifest's quantization block


def _fp_source_dtype(ckpt, acc: Accounting) -> torch.dtype:
    """The most common dtype of the consumed fp tensors (AWQ scales are fp16 by format, not by choice)."""
    counts: dict[torch.dtype, int] = {}
    for name in acc.consumed:
        if name not in acc.quantized and ckpt.dtype(name).is_floating_point:
            counts[ckpt.dtype(name)] = counts.get(ckpt.dtype(name), 0) + torch.Size(ckpt.shape(name)).numel()
    return max(counts, key=counts.get) if counts else torch.float32


def read_model(ckpt: HFCheckpoint) -> tuple[Architecture, dict, AwqSpec | None]:
    """The checkpoint's architecture entry, engine model block and AWQ settings (None: fp), from its
    config.json. Those readers see a dict, not a directory: a refusal is said here with the file's path."""
    try:
        arch = get_architecture(ckpt.architecture)
        return arch, engine_config_from_hf(arch, ckpt.config, ckpt.generation_config), awq_spec(ckpt.config)
    except LmkilnError as e:
        msg = str(e)
        name = next((n for n in ("config.json", "generation_config.json") if msg.startswith(f"{n}:")), None)
        if name:
            msg = f"{ckpt.path / name}{msg.removeprefix(name)}"
        elif not msg.startswith(str(ckpt.path)):
            msg = f"{ckpt.path}: {msg}"
        raise type(e)(msg) from None


def make_plan(ckpt: HFCheckpoint, tp: int = 1, dtype: str = "auto") -> EnginePlan:
    arch, model, spec = read_model(ckpt)
    why = check_tp(model["head_num"], model["kv_head_num"], tp)
    if why:
        raise InputError(f"--tp {tp}: {why}")
    quant = None
    if spec is None:
        model["inter_size_padded"] = round_up(model["inter_size"], tp)
    else:
        if spec.layout == "compressed-tensors":
            # its library imports transformers: loaded here, before the converter's tokenizer thread imports
            # transformers too (two threads importing it at once see a half-initialised module)
            compressed_tensors.require()
        unquantized = unquantized_linears(ckpt, arch, model, spec)
        quant = resolve_quant(spec, ckpt.config["quantization_config"], model, tp, unquantized)
    acc = account(ckpt, arch, model, spec)
    if spec is not None:
        # lmkiln's own quantized output zero-padded the FFN to whole groups (config.json, which other loaders
        # read, says the padded width); the engine records the source's, as quantizing straight to one does
        padding = ffn_padding(ckpt.path)
        if padding is not None and padding[1] == model["inter_size"] and padding[0] < padding[1]:
            model["inter_size"] = padding[0]
    source = ckpt.source_dtype if spec is None else _fp_source_dtype(ckpt, acc)
    fp_dtype = resolve_dtype(dtype, source)
    tensors = expected_tensors(model, tp, model["inter_size_padded"], fp_dtype, quant)
    return EnginePlan(arch, model, acc, tensors, fp_dtype, source, spec, quant)


def plan_engine(ckpt: HFCheckpoint, tp: int = 1, dtype: str = "auto"):
    """(arch, model config, accounting, plan, fp dtype); see `make_plan` for the whole plan."""
    p = make_plan(ckpt, tp, dtype)
    return p.arch, p.model, p.acc, p.tensors, p.fp_dtype


def convert_hf_to_engine(
    model_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    tp: int = 1,
    force: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    extra_files: tuple[Path, ...] = (),
) -> Path:
    """Convert; returns the engine path. `progress(name, nbytes)` is called per tensor written.
    `extra_files` (e.g. a quantization report) are copied in before the engine appears."""
    # the Python API's arguments, as the CLI's parser gives them (a "2" or 2.0 failed as a TypeError deep inside)
    check_path("model_dir", model_dir)
    check_path("out_dir", out_dir)
    check_flag("force", force)
    check_flag("allow_pickle", allow_pickle)
    check_callable("progress", progress)
    if not isinstance(tp, int) or isinstance(tp, bool):
        raise InputError(f"tp {tp!r}: give a whole number of tensor-parallel ranks (--tp), e.g. 1 or 2")
    if not isinstance(dtype, str):
        raise InputError(f"dtype {dtype!r}: give one of auto, {', '.join(WEIGHT_TYPES)} (--dtype)")
    if isinstance(extra_files, (str, Path)):  # (a str would be iterated character by character)
        raise InputError(f"extra_files {str(extra_files)!r}: give a list of paths, e.g. [Path('report.json')]")
    ckpt = HFCheckpoint(model_dir, allow_pickle=allow_pickle)
    plan = make_plan(ckpt, tp, dtype)
    out_dir = check_output(Path(out_dir), force, (ckpt.path,))
    report = ckpt.path / QUANT_REPORT  # an lmkiln AWQ-GEMM output's: verify's calibration-overlap check reads it
    if report.is_file() and QUANT_REPORT not in {Path(f).name for f in extra_files}:
        extra_files = (*extra_files, report)
    needed = sum(dt.itemsize * math.prod(shape) for _, _, dt, shape in plan.tensors) \
        + sum(f.stat().st_size for f in [*ckpt.tokenizer_files(), *map(Path, extra_files)])
    check_free(out_dir.parent, needed)
    # Which tokenizer class the source resolves to costs an import of transformers and a
    # tokenizer load (seconds): found in a thread while the weights are copied.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer-class")
    tok_class = pool.submit(resolved_tokenizer_class, ckpt.path) if ckpt.tokenizer_files() else None
    pool.shutdown(wait=False)
    try:
        with atomic_dir(out_dir, force=force, inputs=(ckpt.path,), needed=needed) as tmp:
            writer = EngineWriter(tmp, plan.tensors, threads=True)
            try:
                for name, t in produce(ckpt, plan.arch, plan.model, tp, plan.fp_dtype, plan.quant, plan.spec):
                    writer.write(name, t)
                    if progress:
                        progress(name, t.numel() * t.element_size())
                files = writer.close()
            except BaseException:
                writer.abort()
                raise
            side = copy_side_files(ckpt.tokenizer_files(), tmp)
            copy_side_files([Path(p) for p in extra_files], tmp)
            shutil.copyfile(ckpt.path / "config.json", tmp / "source_config.json")
            write_manifest(tmp, engine_manifest(plan, ckpt, tp, files, side, tok_class.result() if tok_class else None))
    except Exception:
        # a refusal mid-copy (a NaN weight, a full disk) must not return while the thread is still importing
        # transformers: the caller's next import of it would find a half-initialised module (the Python API,
        # a test run). (Not after Ctrl-C: that ends the process, and waiting would delay it by seconds.)
        if tok_class is not None:
            wait([tok_class])
        raise
    return out_dir


def engine_manifest(plan: EnginePlan, ckpt, tp: int, files: dict, tokenizer_files: list[str],
                    tokenizer_class: str | None = None) -> dict:
    """The manifest of an engine written from `plan` (docs/engine-format.md); `tokenizer_class`
    the one the source resolves to when the caller found it already."""
    manifest = {"format": FORMAT, "format_version": VERSION, "model": manifest_model(plan.model)}
    if plan.quant is None:
        manifest["weight_type"] = DTYPE_NAMES[plan.fp_dtype]
        manifest["tensor_parallel"] = tp
    else:
        manifest["weight_type"] = next(k for k, bits in QUANT_TYPES.items() if bits == plan.quant["bits"])
        manifest["fp_dtype"] = DTYPE_NAMES[plan.fp_dtype]
        manifest["tensor_parallel"] = tp
        manifest["quantization"] = plan.quant
    manifest.update({
        "tensors": manifest_index(plan.tensors),
        "files": files,
        "tokenizer_files": tokenizer_files,
        # source_config.json hides the source's model_type from AutoTokenizer, which may then pick another class
        # (a Qwen2 config with a Llama tokenizer_config): the engine loads the class the source resolves to
        "tokenizer_class": (tokenizer_class or resolved_tokenizer_class(ckpt.path)) if tokenizer_files else None,
        "source": {
            "architecture": plan.arch.hf_name,
            "config_sha256": config_sha256(ckpt.config),
            "source_dtype": str(plan.source_dtype).replace("torch.", ""),
            "skipped_tensors": plan.acc.skipped,
            "lmkiln_version": lmkiln.__version__,
        },
    })
    return manifest
