"""`lmkiln inspect`: describe an HF checkpoint or an engine as rows of (field, value)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmkiln.convert.architectures import get_architecture
from lmkiln.convert.hf_to_engine import make_plan, required_roles, role_shapes
from lmkiln.errors import InputError, check_flag, check_path
from lmkiln.formats.engine import Engine, file_checksum, is_engine
from lmkiln.formats.gguf import GgufFile, is_gguf
from lmkiln.formats.hf import HFCheckpoint, ffn_padding, has_tokenizer


def _quant_origin(q: dict) -> str:
    """Where an engine's codes came from: an interchange layout, or (null) quantized straight to it."""
    if "source_layout" not in q:
        return "from unknown layout"  # (written before lmkiln recorded it)
    return f"from {q['source_layout']}" if q["source_layout"] else "quantized straight to the engine"


def _params(shapes) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def _unpadded(m: dict, d: Path) -> tuple[dict, int | None]:
    """(the model block at the FFN width lmkiln's report says the model had before it padded it to
    whole groups, the stored width or None): an AWQ-GEMM output and the engine converted from it
    store the padded width, and its zero rows are not parameters."""
    pad = ffn_padding(d)
    w = None if pad is None else pad[0]
    return (m, None) if w is None or w >= m["inter_size"] else (dict(m, inter_size=w), m["inter_size"])


def _model_rows(m: dict, stored_ffn: int | None = None) -> list[tuple[str, str]]:
    rope = m["rope"]
    stored = f" (stored zero-padded to {stored_ffn})" if stored_ffn else ""
    return [
        ("architecture", m["architecture"]),
        ("layers", str(m["num_layer"])),
        ("hidden", str(m["hidden_units"])),
        ("heads / kv heads / head dim", f"{m['head_num']} / {m['kv_head_num']} / {m['size_per_head']}"),
        ("ffn width", str(m["inter_size"]) + stored + (f" per expert; {m['num_experts']} experts, top {m['experts_per_token']}"
                                                       if m.get("num_experts") else "")),
        ("vocab", str(m["vocab_size"])),
        ("rope", f"{rope['type']}, base {rope['base']:g}" + (f", {rope['scaling']}" if rope.get("scaling") else "")),
        ("tied embeddings", str(m["tie_word_embeddings"])),
    ]


def _logical_shapes(model: dict):
    """The model's weight shapes as its source held them, from the manifest's model block: the
    stored tensors would count int4 bytes instead of weights, kv heads copied to every rank (--tp)
    and zero padding (to whole groups, per rank) as parameters."""
    shapes = role_shapes(model)
    glob, layer = required_roles(model, get_architecture(model["architecture"]))
    yield from (shapes[r] for r in glob)
    for _ in range(model["num_layer"]):
        yield from (shapes[r] for r in layer)


def _weight_type(man: dict) -> str:
    q = man.get("quantization")
    if q is None:
        return man["weight_type"]
    group = "per-channel" if q["group_size"] is None else f"g{q['group_size']}"
    return f"{man['weight_type']} {group} {'sym' if q['symmetric'] else 'asym'}"


def describe(path: str | Path, check: bool = True, allow_pickle: bool = False) -> tuple[str, list[tuple[str, str]]]:
    """(kind, rows). With `check`, an engine's weight files are hashed against the manifest."""
    check_path("path", path)
    check_flag("check", check)
    check_flag("allow_pickle", allow_pickle)
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if is_engine(path):
        eng = Engine(path)
        man = eng.manifest
        model, stored_ffn = _unpadded(eng.model, path)
        rows = _model_rows(model, stored_ffn)
        rows += [
            ("parameters", f"{_params(_logical_shapes(model)):,}"),
            ("weight type", _weight_type(man)),
        ]
        q = eng.quant
        if q is not None:
            rows += [
                ("fp tensors", f"{man['fp_dtype']} (embeddings, norms, output, biases" + (", unquantized linears)" if q["unquantized"] else ")")),
                ("quantization", f"{q.get('method') or 'unknown method'}, {_quant_origin(q)}; "
                                 f"hidden padded to {q['hidden_padded']}, ffn to {eng.model['inter_size_padded']}"
                                 + (f"; {len(q['unquantized'])} linears kept fp" if q["unquantized"] else "")),
            ]
        rows += [
            ("tensor-parallel ranks", str(eng.tp)),
            ("weight files", ", ".join(f"{f} ({meta['size']:,} B)" for f, meta in man["files"].items())),
            ("format", f"{man['format']} v{man['format_version']}"),
            ("lmkiln version", str(man.get("source", {}).get("lmkiln_version"))),
        ]
        listed = man.get("tokenizer_files", [])
        gone = [f for f in listed if not (path / f).is_file()]
        rows.append(("tokenizer files", "none" if not listed else f"MISSING: {', '.join(gone)} (copy them from the source)"
                     if gone else f"{', '.join(listed)} ({man.get('tokenizer_class') or 'class not recorded'})"))
        if check:
            sums = eng.verify_checksums()
            bad = [f for f, ok in sums.items() if not ok]
            algos = sorted({file_checksum(meta)[0] for meta in man["files"].values()})
            rows.append(("checksums", f"all hold ({', '.join(algos)})" if not bad else f"MISMATCH: {', '.join(bad)}"))
        else:
            rows.append(("checksums", "not checked (--no-check)"))
        return "engine", rows
    if is_gguf(path):
        return "gguf", _gguf_rows(path)
    if path.is_dir() and (path / "model.onnx").is_file():
        return "onnx", _onnx_rows(path)
    ckpt = HFCheckpoint(path, allow_pickle=allow_pickle)
    # the checks convert runs before its first byte: every tensor accounted for, every shape as config.json implies
    plan = make_plan(ckpt)
    model, pad = plan.model, ffn_padding(path)  # (the plan has the source's FFN width of a padded lmkiln output)
    stored_ffn = pad[1] if pad is not None and model["inter_size"] == pad[0] < pad[1] else None
    rows = _model_rows(model, stored_ffn)
    q = ckpt.config.get("quantization_config")
    # parameters as the model has them: an AWQ linear counts its role's (out, in), not its packed, padded
    # int32 words; its qzeros/scales are not weights
    shapes = role_shapes(model)
    weights = [shapes[role] if n in plan.acc.quantized else ckpt.shape(n) for n, role in plan.acc.consumed.items()
               if n not in plan.acc.quantized or n.endswith(f".{plan.spec.code_suffix}")]
    if plan.spec is not None and plan.spec.layout == "compressed-tensors":  # its settings sit in a config group
        sp = plan.spec
        q = {"quant_method": q.get("quant_method"), "format": q.get("format"), "bits": sp.bits, "group_size": sp.group_size,
             "symmetric": not sp.zero_point}
    rows += [
        ("parameters", f"{_params(weights):,}"),
        ("dtype", str(ckpt.source_dtype).replace("torch.", "")),
        ("quantization", "none" if not q else ", ".join(f"{k}={v}" for k, v in q.items() if k in ("quant_method", "format", "bits", "group_size", "zero_point", "symmetric", "version"))),
        ("weight files", ", ".join(p.name for p in ckpt.weight_files())),
        ("tokenizer files", ", ".join(p.name for p in ckpt.tokenizer_files()) or "none"),
        ("checksums", "n/a (HF checkpoints carry none); headers, tensor names and shapes validated"),
    ]
    return "hf", rows


# What `describe` says of lmkiln's other outputs (they were refused with "no config.json here", advice
# that fits neither): what they hold and how they were made, from their own metadata (no weights read).
KINDS = {"engine": "lmkiln engine", "hf": "Hugging Face checkpoint", "onnx": "ONNX export", "gguf": "GGUF file"}


def _size(paths) -> str:
    return ", ".join(f"{p.name} ({p.stat().st_size:,} B)" for p in paths)


def _onnx_rows(path: Path) -> list[tuple[str, str]]:
    meta, genai = (_json(path / n) for n in ("lmkiln_export.json", "genai_config.json"))
    rows = [("exported by", f"lmkiln {meta.get('lmkiln_version')}" if meta else "another exporter (no lmkiln_export.json)")]
    src = meta.get("source") or {}
    if src:
        rows.append(("source", f"{src.get('architecture')} engine, {src.get('weight_type')}, tp {src.get('tensor_parallel')}"))
    if meta:
        rows += [("weight type", str(meta.get("weight_type"))),
                 ("execution provider", f"{meta.get('ep')}, accuracy level {meta.get('accuracy_level')}"
                                        + (", portable (standard ops)" if meta.get("portable") else "")),
                 ("output head", "fp" if not meta.get("head_bits") else f"int{meta['head_bits']} (quantized at export)")]
    dec = (genai.get("model") or {}).get("decoder") or {}
    if dec:
        rows.append(("onnxruntime-genai", f"type {genai['model'].get('type')}, {dec.get('num_hidden_layers')} layers, "
                                          f"{dec.get('num_attention_heads')} / {dec.get('num_key_value_heads')} heads, "
                                          f"head size {dec.get('head_size')}"))
    rows.append(("files", _size(sorted(p for p in path.iterdir() if p.name.startswith("model.onnx")))))
    rows.append(("tokenizer", f"{meta.get('tokenizer_class') or 'class not recorded'}" if has_tokenizer(path) else "none"))
    return rows


def _gguf_rows(path: Path) -> list[tuple[str, str]]:
    g = GgufFile(path)
    types: dict[str, int] = {}
    for t in g.reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    rows = [("architecture (llama.cpp)", str(g.arch)), ("name", str(g.get("general.name"))),
            ("layers", str(g.get(f"{g.arch}.block_count"))), ("context", str(g.get(f"{g.arch}.context_length"))),
            ("tensors", ", ".join(f"{n} {k}" for k, n in sorted(types.items()))),
            ("weights stored", f"{sum(int(math.prod(t.shape.tolist())) for t in g.reader.tensors):,} (FFN padded to whole blocks)"),
            ("size", f"{path.stat().st_size:,} B")]
    made = g.get("lmkiln.export")
    if made:
        rec = json.loads(made)
        rows.append(("exported by", f"lmkiln {rec.get('lmkiln_version')}, --type {rec.get('type')}, from "
                                    f"{(rec.get('source') or {}).get('weight_type')} {(rec.get('source') or {}).get('architecture')}; "
                                    f"{len(rec.get('requantized') or {})} tensors re-quantized"))
    else:
        rows.append(("exported by", "another tool (no lmkiln.export record)"))
    return rows


def _json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}
