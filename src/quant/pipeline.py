"""`lmkiln quantize`: stream a checkpoint layer by layer through AWQ (or RTN) into the
AWQ-GEMM layout, resumably, and optionally on into an engine.

Memory: one decoder layer's weights (fp32) plus the calibration activations for one
layer; the embedding and the head are copied tensor by tensor at the end. Each finished
layer is saved under the output's partial directory with the hidden states it produced,
so `--resume` continues after the last finished layer with bit-identical results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lmkiln
from lmkiln.convert.architectures import LINEAR_ROLES, get_architecture
from lmkiln.convert.hf_config import engine_config_from_hf
from lmkiln.convert.hf_to_engine import account, required_roles
from lmkiln.errors import InputError
from lmkiln.formats.atomic import atomic_dir, check_output
from lmkiln.formats.awq_gemm import AwqSpec, awq_spec, write_qlinear
from lmkiln.formats.engine import config_sha256
from lmkiln.formats.hf import HFCheckpoint
from lmkiln.formats.safetensors_io import DTYPES, StreamWriter, read_header
from lmkiln.quant.awq import QuantOptions, awq_layer, rtn_layer
from lmkiln.convert.rope import inv_freq

REPORT = "lmkiln_quant_report.json"
STOP_ENV = "LMKILN_STOP_AFTER_LAYER"  # test hook: simulate a crash after layer N is saved


@dataclass
class CalibOptions:
    path: Path | None = None  # None = bundled WikiText-2 validation excerpt
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0


@dataclass
class QuantResult:
    output: Path
    report: dict = field(default_factory=dict)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def model_fingerprint(ckpt: HFCheckpoint) -> str:
    """Cheap identity of a checkpoint: config plus each weight file's name, size and header."""
    h = hashlib.sha256(config_sha256(ckpt.config).encode())
    for p in ckpt.weight_files():
        h.update(f"{p.name}:{p.stat().st_size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()


def _hf_layer(ckpt: HFCheckpoint, arch, layer_prefix: str):
    """An empty decoder layer of transformers' own implementation for this config, on CPU.

    Built on the meta device from config.json alone (no weights, no remote code), so
    the calibration forward is exactly the reference model's math."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(ckpt.path), local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    layer = model.get_submodule(layer_prefix.format(i=0))
    return layer.to_empty(device="cpu").float().eval()


def _load_layer(layer, ckpt: HFCheckpoint, prefix: str) -> None:
    sd = {}
    for name in layer.state_dict():
        full = f"{prefix}.{name}"
        if full not in ckpt:
            raise InputError(f"{ckpt.path}: tensor {full!r} missing for decoder layer {prefix}")
        sd[name] = ckpt.get(full).float()
    layer.load_state_dict(sd, strict=True)


def _position_embeddings(model_cfg: dict, seqlen: int):
    freqs = torch.arange(seqlen, dtype=torch.float32)[:, None] * inv_freq(model_cfg["rope"])[None]
    emb = torch.cat([freqs, freqs], -1)[None]  # HF half-split layout, batch 1 broadcasts
    return emb.cos(), emb.sin()


def _layer_tensors(layer, arch, model_cfg, i: int, qts: dict, out_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The finished layer in AWQ-GEMM naming: packed linears, everything else as fp."""
    _, roles = required_roles(model_cfg)
    prefix = arch.layer_prefix.format(i=i)
    out = {}
    for role in roles:
        name = arch.hf_name_of(role, i)
        if role in LINEAR_ROLES:
            module = name.rsplit(".", 1)[0]
            for k, v in write_qlinear(qts[role]).items():
                out[f"{module}.{k}"] = v.contiguous()
        else:
            out[name] = layer.get_parameter(name[len(prefix) + 1:]).detach().to(out_dtype).contiguous()
    return out


@contextlib.contextmanager
def _threads_for(mcfg: dict):
    """Intra-op threads only pay off on large matmuls; on tiny models (the bundled one)
    they cost several times the work itself, badly so on a busy machine."""
    before = torch.get_num_threads()
    if mcfg["hidden_units"] <= 256:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _atomic_save(tensors: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def quantize_model(
    model_dir: str | Path,
    out_dir: str | Path,
    options: QuantOptions,
    calib: CalibOptions | None = None,
    to: str = "hf",
    force: bool = False,
    resume: bool = False,
    report_path: Path | None = None,
    on_layer: Callable[[int, int, dict], None] | None = None,
    on_info: Callable[[str], None] | None = None,
) -> QuantResult:
    """Quantize `model_dir` into `out_dir` (`to` = "hf" for AWQ-GEMM, "engine")."""
    t_start = time.time()
    info = on_info or (lambda s: None)
    calib = calib or CalibOptions()
    if to not in ("hf", "engine"):
        raise InputError(f"--to {to!r}: choose hf or engine")
    if options.bits not in (4, 8):
        raise InputError(f"{options.bits}-bit output is not supported; use --w4a16 or --w8a16")
    if options.group_size != -1 and options.group_size < 8:
        raise InputError(f"--group-size {options.group_size}: use -1 (per channel) or a size of at least 8, e.g. 32, 64, 128")
    ckpt = HFCheckpoint(model_dir)
    if awq_spec(ckpt.config) is not None:
        raise InputError(f"{ckpt.path}: already quantized (quantization_config present); quantize the original fp checkpoint")
    arch = get_architecture(ckpt.architecture)
    mcfg = engine_config_from_hf(arch, ckpt.config)
    acc = account(ckpt, arch, mcfg)
    out_dir = check_output(Path(out_dir), force, inputs=(ckpt.path,))
    n_layer = mcfg["num_layer"]
    attn_width = mcfg["head_num"] * mcfg["size_per_head"]
    if to == "engine" and options.group_size != -1 and attn_width % options.group_size:
        # Found now rather than after calibration: the engine splits wo's input on group boundaries.
        raise InputError(f"--to engine: the attention width {attn_width} is not a multiple of --group-size "
                         f"{options.group_size}; choose a group size that divides it, or --to hf")
    src_dtype = ckpt.source_dtype if ckpt.source_dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32

    ids = None
    calib_info = None
    if options.method == "awq":
        from lmkiln.quant.calib import build_calibration_samples, load_calibration_texts
        from lmkiln.formats.tokenizer import load_tokenizer

        if calib.seqlen > mcfg["max_position_embeddings"]:
            raise InputError(f"--calib-seqlen {calib.seqlen} exceeds the model's context ({mcfg['max_position_embeddings']})")
        tok = load_tokenizer(ckpt.path)
        cs = build_calibration_samples(load_calibration_texts(calib.path),
                                       lambda s: tok(s, add_special_tokens=False).input_ids,
                                       calib.n_samples, calib.seqlen, calib.seed)
        ids = cs.input_ids
        from lmkiln.quant.calib import shingles

        calib_info = {"source": str(calib.path) if calib.path else "bundled:wikitext2_valid_excerpt",
                      "samples": cs.n_samples, "seqlen": cs.seqlen, "tokens": cs.n_tokens,
                      "documents": cs.n_documents_used, "seed": calib.seed, "sha256": cs.sha256, "summary": cs.describe(),
                      # lets `verify` warn when its evaluation text overlaps the calibration text
                      "shingles": [h for row in ids.tolist() for h in shingles(row)]}
        info(f"calibration: {cs.describe()}")
    elif options.method != "rtn":
        raise InputError(f"--method {options.method!r}: choose awq or rtn")

    fingerprint = {
        "model": model_fingerprint(ckpt),
        "calibration": calib_info["sha256"] if calib_info else None,
        "options": dataclasses.asdict(options),
        "lmkiln_version": lmkiln.__version__,
    }
    partial = out_dir.parent / f".{out_dir.name}.lmkiln-partial"
    state = partial / "state"
    start_layer = 0
    if partial.exists():
        if resume:
            try:
                old = json.loads((state / "fingerprint.json").read_text())
            except (OSError, json.JSONDecodeError):
                raise InputError(f"{partial}: the partial run has no readable fingerprint; remove it and start again") from None
            diff = [k for k in fingerprint if old.get(k) != fingerprint[k]]
            if diff:
                raise InputError(f"cannot resume from {partial}: the {' and '.join(diff)} changed since it started; "
                                 "run without --resume to start over")
            while (state / f"layer{start_layer}.safetensors").exists() and start_layer < n_layer:
                start_layer += 1
            info(f"resuming after {start_layer} finished layer(s)")
        else:
            shutil.rmtree(partial)
    elif resume:
        info("nothing to resume; starting from the first layer")
    state.mkdir(parents=True, exist_ok=True)
    (state / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1))

    layer_reports = []
    for i in range(start_layer):
        layer_reports.append(json.loads((state / f"layer{i}.json").read_text()))
    stop_after = int(os.environ.get(STOP_ENV, "-1"))

    layer = _hf_layer(ckpt, arch, arch.layer_prefix)
    hidden = None
    layer_kwargs = {}
    if options.method == "awq":
        if start_layer == 0:
            hidden = torch.nn.functional.embedding(ids, ckpt.get(arch.hf_name_of("embed")).float())
        else:
            hidden = torch.load(state / f"hidden{start_layer - 1}.pt", weights_only=True)
        layer_kwargs = {"position_embeddings": _position_embeddings(mcfg, ids.shape[1]), "attention_mask": None}

    for i in range(start_layer, n_layer):
        t0 = time.time()
        prefix = arch.layer_prefix.format(i=i)
        _load_layer(layer, ckpt, prefix)
        if options.method == "awq":
            with _threads_for(mcfg):
                qts, hidden, rep = awq_layer(layer, arch, hidden, layer_kwargs, options, i)
        else:
            qts, rep = rtn_layer(layer, arch, options), {"groups": [], "linears": {}}
        tensors = _layer_tensors(layer, arch, mcfg, i, qts, src_dtype)
        rep.update({"layer": i, "seconds": round(time.time() - t0, 3)})
        # Per-layer hidden files: the input of layer i+1 must survive until layer i+1 is
        # marked done, or a resume would re-run a layer on the wrong input.
        if hidden is not None:
            torch.save(hidden, state / "hidden.tmp")
            os.replace(state / "hidden.tmp", state / f"hidden{i}.pt")
        (state / f"layer{i}.json").write_text(json.dumps(rep))
        _atomic_save(tensors, state / f"layer{i}.safetensors")  # last: its presence marks the layer done
        (state / f"hidden{i - 1}.pt").unlink(missing_ok=True)
        layer_reports.append(rep)
        if on_layer:
            on_layer(i, n_layer, rep)
        if i == stop_after:
            raise KeyboardInterrupt(f"{STOP_ENV}={stop_after}")

    spec = AwqSpec(bits=options.bits, group_size=options.group_size, zero_point=not options.symmetric)
    report = {
        "lmkiln_version": lmkiln.__version__,
        "source": str(ckpt.path),
        "method": options.method,
        "options": dataclasses.asdict(options),
        "calibration": calib_info,
        "layers": layer_reports,
        "totals": {
            "seconds": round(time.time() - t_start, 3),
            "seconds_per_layer": [r["seconds"] for r in layer_reports],
            "calibration_tokens": calib_info["tokens"] if calib_info else 0,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        },
    }
    hf_target = out_dir if to == "hf" else partial / "hf"
    if to == "engine" and hf_target.exists():
        shutil.rmtree(hf_target)
    with atomic_dir(hf_target, force=force or to == "engine", tmp=partial / "out" if to == "hf" else None) as tmp:
        _write_hf(tmp, ckpt, arch, mcfg, spec, options, acc, state, src_dtype)
        (tmp / REPORT).write_text(json.dumps(report, indent=1))
    if to == "engine":
        from lmkiln.convert.hf_to_engine import convert_hf_to_engine

        convert_hf_to_engine(hf_target, out_dir, force=force, extra_files=(hf_target / REPORT,))
    shutil.rmtree(partial, ignore_errors=True)
    report["totals"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=1))
    return QuantResult(out_dir, report)


def _write_hf(tmp: Path, ckpt, arch, mcfg, spec: AwqSpec, o: QuantOptions, acc, state: Path, src_dtype) -> None:
    """Stream the AWQ-GEMM checkpoint: embedding, the saved layers, final norm, head."""
    glob, _ = required_roles(mcfg)
    layer_files = [state / f"layer{i}.safetensors" for i in range(mcfg["num_layer"])]
    specs = [(arch.hf_name_of("embed"), src_dtype, tuple(ckpt.shape(arch.hf_name_of("embed"))))]
    padded = False
    for f in layer_files:
        header, _ = read_header(f)
        for n, t in header.items():
            specs.append((n, DTYPES[t.dtype], t.shape))
            if n.endswith(".qweight"):
                padded |= t.shape[0] != ckpt.shape(n[: -len("qweight")] + "weight")[1]
            if n.endswith(".scales"):
                padded |= t.shape[1] != ckpt.shape(n[: -len("scales")] + "weight")[0]
    for role in glob[1:]:
        n = arch.hf_name_of(role)
        specs.append((n, src_dtype, tuple(ckpt.shape(n))))
    w = StreamWriter(tmp / "model.safetensors", specs, {"format": "pt"})
    try:
        w.write(specs[0][0], ckpt.get(specs[0][0]).to(src_dtype))
        for f in layer_files:
            with safe_open(str(f), framework="pt") as h:
                for n in read_header(f)[0]:
                    w.write(n, h.get_tensor(n))
        for role in glob[1:]:
            n = arch.hf_name_of(role)
            w.write(n, ckpt.get(n).to(src_dtype))
        w.close()
    except BaseException:
        w.abort()
        raise
    cfg = dict(ckpt.config)
    cfg["quantization_config"] = spec.to_config(padded, {"lmkiln_method": o.method})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for p in ckpt.tokenizer_files():
        shutil.copyfile(p, tmp / p.name)
