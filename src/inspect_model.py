"""`lmkiln inspect`: describe an HF checkpoint or an engine as rows of (field, value)."""

from __future__ import annotations

from pathlib import Path

from lmkiln.convert.architectures import get_architecture
from lmkiln.convert.hf_to_engine import make_plan, required_roles, role_shapes
from lmkiln.errors import InputError
from lmkiln.formats.engine import Engine, file_checksum, is_engine
from lmkiln.formats.hf import HFCheckpoint


def _params(shapes) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def _model_rows(m: dict) -> list[tuple[str, str]]:
    rope = m["rope"]
    return [
        ("architecture", m["architecture"]),
        ("layers", str(m["num_layer"])),
        ("hidden", str(m["hidden_units"])),
        ("heads / kv heads / head dim", f"{m['head_num']} / {m['kv_head_num']} / {m['size_per_head']}"),
        ("ffn width", str(m["inter_size"]) + (f" per expert; {m['num_experts']} experts, top {m['experts_per_token']}"
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
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if is_engine(path):
        eng = Engine(path)
        man = eng.manifest
        rows = _model_rows(eng.model)
        rows += [
            ("parameters", f"{_params(_logical_shapes(eng.model)):,}"),
            ("weight type", _weight_type(man)),
        ]
        q = eng.quant
        if q is not None:
            rows += [
                ("fp tensors", f"{man['fp_dtype']} (embeddings, norms, output, biases" + (", unquantized linears)" if q["unquantized"] else ")")),
                ("quantization", f"{q.get('method') or 'unknown method'}, from {q.get('source_layout') or 'unknown layout'}; "
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
    ckpt = HFCheckpoint(path, allow_pickle=allow_pickle)
    # the checks convert runs before its first byte: every tensor accounted for, every shape as config.json implies
    plan = make_plan(ckpt)
    rows = _model_rows(plan.model)
    q = ckpt.config.get("quantization_config")
    # parameters as the model has them: an AWQ linear counts its role's (out, in), not its packed, padded
    # int32 words; its qzeros/scales are not weights
    shapes = role_shapes(plan.model)
    weights = [shapes[role] if n in plan.acc.quantized else ckpt.shape(n) for n, role in plan.acc.consumed.items()
               if n not in plan.acc.quantized or n.endswith(".qweight")]
    rows += [
        ("parameters", f"{_params(weights):,}"),
        ("dtype", str(ckpt.source_dtype).replace("torch.", "")),
        ("quantization", "none" if not q else ", ".join(f"{k}={v}" for k, v in q.items() if k in ("quant_method", "bits", "group_size", "zero_point", "version"))),
        ("weight files", ", ".join(p.name for p in ckpt.weight_files())),
        ("tokenizer files", ", ".join(p.name for p in ckpt.tokenizer_files()) or "none"),
        ("checksums", "n/a (HF checkpoints carry none); headers, tensor names and shapes validated"),
    ]
    return "hf", rows
