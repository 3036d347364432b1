"""`lmkiln verify`: reference vs candidate, with thresholds a CI can gate on."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import lmkiln
from lmkiln.errors import InputError, LmkilnError, check_callable, check_path
from lmkiln.formats.atomic import atomic_file, check_output_file
from lmkiln.formats.tokenizer import load_tokenizer
from lmkiln.quant.calib import unpack_shingles
from lmkiln.runtime.generate import check_lengths, greedy_generate
from lmkiln.verify.data import load_eval_text, load_prompt_lines, overlap_tokens
from lmkiln.verify.metrics import compare, window_logits, windows
from lmkiln.runtime.engine_model import runtime_dtype
from lmkiln.quant.job import dtype_name
from lmkiln.runtime.session import check_device
from lmkiln.verify.runners import kind_of, open_runner, read_json, resolve_runner, vocab_of, weight_type

# Defaults per candidate weight type: what a healthy conversion/quantization of a real
# model stays within (int4 is loosest; fp32 must be numerically the same model).
DEFAULT_THRESHOLDS = {
    "fp32": {"max_ppl_increase": 0.1, "max_kl": 1e-4, "min_top1": 0.995},
    "fp16": {"max_ppl_increase": 0.5, "max_kl": 1e-3, "min_top1": 0.98},
    "bf16": {"max_ppl_increase": 1.0, "max_kl": 5e-3, "min_top1": 0.97},
    "int8": {"max_ppl_increase": 1.0, "max_kl": 5e-3, "min_top1": 0.95},
    "int4": {"max_ppl_increase": 10.0, "max_kl": 0.1, "min_top1": 0.80},
}
# Checked only when given: no per-weight-type defaults have been measured for them yet.
OPTIONAL_THRESHOLDS = ("min_top5", "min_p_top")
# What a threshold can mean: the agreements and p_top are fractions; KL and a perplexity increase
# (percent) are ≥ 0 for a faithful candidate, so a negative one fails every candidate, and a
# fraction outside 0..1 passes or fails regardless of the models.
THRESHOLD_RANGES = {"max_ppl_increase": (0.0, math.inf), "max_kl": (0.0, math.inf),
                    "min_top1": (0.0, 1.0), "min_top5": (0.0, 1.0), "min_p_top": (0.0, 1.0)}
# Fewer scored tokens than this and the verdict can hinge on a token or two: below 200 one flipped
# argmax moves top-1 agreement by more than the fp32 default's whole 0.5 % slack (0.995), and the
# tokens of a window are correlated, so the effective sample is smaller still. A warning, not a
# refusal: a quick smoke test on a few tokens is legitimate, a CI gate on them is not.
MIN_SCORED_TOKENS = 256


@dataclass
class VerifyOptions:
    data: Path | None = None
    seqlen: int | None = None  # default: min(2048, context length)
    max_tokens: int = 8192
    prompts: Path | None = None
    max_new_tokens: int = 32
    runner: str = "auto"
    device: str = "cpu"
    dtype: str = "auto"  # the candidate engine runner's compute dtype (runtime.engine_model.runtime_dtype)
    reference_device: str | None = None  # where the reference runs; default: `device`
    score_second_half: bool = False
    max_ppl_increase: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None
    min_top5: float | None = None  # top-5 agreement (reference's top-1 in the candidate's top 5)
    min_p_top: float | None = None  # candidate's mean probability of the reference's top token
    check: bool = True  # engines' weight files against their checksums before use


@dataclass
class VerifyResult:
    report: dict
    passed: bool
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kl_values: object = None


# What the CLI's options enforce (cli.py: --seqlen min=8, --max-tokens min=2, --max-new-tokens min=1),
# enforced again here for callers of the Python API: field -> (option, smallest value).
INT_OPTIONS = {"seqlen": ("--seqlen", 8), "max_tokens": ("--max-tokens", 2), "max_new_tokens": ("--max-new-tokens", 1)}


def check_options(o: VerifyOptions | None) -> VerifyOptions:
    """`o` with its types and ranges checked (a copy; None: the defaults), before anything is read:
    a wrong type would otherwise fail as a TypeError deep inside, after the reference has run."""
    if o is None:
        return VerifyOptions()
    if not isinstance(o, VerifyOptions):
        raise InputError(f"verify options: a VerifyOptions, not {type(o).__name__}; e.g. VerifyOptions(max_tokens=2048)")
    for name, (option, least) in INT_OPTIONS.items():
        v = getattr(o, name)
        if v is None and name == "seqlen":  # the default: min(2048, context length)
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < least:  # bool: True is an int to Python
            raise InputError(f"{option} {v!r}: give a whole number of at least {least}")
    for name in ("data", "prompts"):
        v = getattr(o, name)
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise InputError(f"--{name} {v!r}: give the path of a text file (or None for the bundled one)")
    for name in ("device", "reference_device"):  # a torch.device as --device spells it, as generate_text takes one
        if type(getattr(o, name)).__name__ == "device" and type(getattr(o, name)).__module__ == "torch":
            o = dataclasses.replace(o, **{name: str(getattr(o, name))})
    for name in ("runner", "device"):
        if not isinstance(getattr(o, name), str):
            raise InputError(f"--{name} {getattr(o, name)!r}: give it as a str, e.g. {'auto' if name == 'runner' else 'cpu'}")
    if o.reference_device is not None and not isinstance(o.reference_device, str):
        raise InputError(f"--reference-device {o.reference_device!r}: give it as a str, e.g. cpu or cuda:1 (None: --device)")
    for name in ("score_second_half", "check"):
        if not isinstance(getattr(o, name), bool):
            raise InputError(f"{name} {getattr(o, name)!r}: give True or False")
    return dataclasses.replace(o, data=None if o.data is None else Path(o.data),
                               prompts=None if o.prompts is None else Path(o.prompts),
                               dtype=dtype_name(o.dtype))  # a torch dtype as its name, as --dtype takes it


def check_runner(path: Path, role: str, runner: str, device: str) -> str:
    """The runner to open `path` with, after what opening it would refuse only once loading
    (for a candidate: after the reference's whole pass) is refused from its headers: an HF
    directory without weights or in a format lmkiln does not read (compressed-tensors), one
    the torch engine cannot be converted from. An MoE AWQ-GEMM directory runs on the torch
    engine: transformers fuses expert weights while it loads a checkpoint, which the
    transformers runner's dequantized load bypasses (the experts would not fit its model)."""
    kind, resolved = resolve_runner(path, role, runner, device)
    if kind != "hf":
        return runner
    from lmkiln.convert.architectures import ARCHITECTURES
    from lmkiln.convert.hf_to_engine import make_plan
    from lmkiln.formats.awq_gemm import awq_spec
    from lmkiln.formats.hf import HFCheckpoint

    try:
        ckpt = HFCheckpoint(path)  # weights present, their headers readable
        spec = awq_spec(ckpt.config)  # a quantization format it does not read
        moe_awq = spec is not None and getattr(ARCHITECTURES.get(ckpt.architecture), "moe", False)
        if resolved == "torch" or moe_awq:
            make_plan(ckpt)  # what converting it to a temporary engine refuses (headers only)
    except LmkilnError as e:  # every refusal starts with the directory it is about
        if str(e).startswith(str(path)):
            raise
        raise type(e)(f"{path}: {e}") from None
    if resolved == "transformers" and moe_awq:
        if runner == "auto":
            return "torch"
        raise InputError(f"{path}: the transformers runner cannot load an MoE AWQ-GEMM directory (transformers fuses "
                         f"expert weights only in its own loader); verify it with --runner auto (the torch engine)")
    return runner


def _is_original(path: Path) -> bool:
    """An fp Hugging Face checkpoint (what converted and quantized artifacts are made from)."""
    return kind_of(path) == "hf" and "quantization_config" not in read_json(Path(path) / "config.json")


def _context_length(path: Path) -> int:
    kind = kind_of(path)
    if kind in ("engine", "hf"):
        file = Path(path) / ("manifest.json" if kind == "engine" else "config.json")
        d = read_json(file)
        n = (d.get("model") or {}).get("max_position_embeddings") if kind == "engine" else d.get("max_position_embeddings", 2048)
        if not isinstance(n, int) or n < 2:
            raise InputError(f"{file}: max_position_embeddings {n!r} is not a context length; the file is damaged: re-create it")
        return n
    if kind == "gguf":
        from lmkiln.formats.gguf import GgufFile

        return GgufFile(path).model().context
    return 2048


def check_gguf_vocabulary(path: Path, tok) -> None:
    """A GGUF carries its own vocabulary, which llama.cpp tokenizes with; verify scores it on the
    reference tokenizer's ids. The two must name the same token at every id the tokenizer has
    (the GGUF's `[PAD{i}]` rows beyond it are unused), else a PASS says nothing about llama.cpp."""
    from lmkiln.formats.gguf import GgufFile

    tokens = GgufFile(path).get("tokenizer.ggml.tokens") or []
    n = min(len(tokens), len(tok))
    want = tok.convert_ids_to_tokens(list(range(n)))
    for i, (g, h) in enumerate(zip(tokens, want)):
        if h is not None and g != h:
            raise InputError(f"{path}: its vocabulary names token {i} {g!r} where the reference's tokenizer has {h!r}; "
                             "llama.cpp would tokenize text differently: export the GGUF again from this model")


def _versus(value: float, threshold: float) -> str:
    """"value vs threshold" in 6 digits, or all of them where 6 would print a failing value as its threshold."""
    a, b = f"{value:.6g}", f"{threshold:.6g}"
    return f"{a} vs threshold {b}" if a != b else f"{value!r} vs threshold {threshold!r}"


def _calibration_shingles(candidate: Path) -> list[str]:
    rep = Path(candidate) / "lmkiln_quant_report.json"
    if not rep.is_file():
        return []
    try:
        cal = json.loads(rep.read_text()).get("calibration") or {}
        # shingles_b64: packed since 2026-11; shingles: the list older reports hold
        return unpack_shingles(cal["shingles_b64"]) if "shingles_b64" in cal else cal.get("shingles") or []
    except (json.JSONDecodeError, OSError):
        return []


def _runtime(runner) -> dict:
    """Where and how a runner computes: the engine runner says which path each linear took."""
    rep = getattr(runner, "runtime_report", None)
    return rep() if rep else {"device": str(getattr(runner, "device", ""))}


def _release_device(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def run_verify(reference: Path, candidate: Path, o: VerifyOptions | None = None, progress=None) -> VerifyResult:
    """Compare `candidate` with `reference` (`o` None: the default options). Every refusal —
    bad options, paths, runners, prompts — comes before either model is loaded."""
    check_path("reference", reference)
    check_path("candidate", candidate)
    check_callable("progress", progress)
    o = check_options(o)
    reference, candidate = Path(reference), Path(candidate)
    kind_of(candidate)  # clear errors before any heavy loading
    if kind_of(reference) == "gguf":
        raise InputError(f"{reference}: a GGUF file can be verify's candidate only; the reference is the original model "
                         "(or an engine), whose tokenizer both sides use")
    if reference.resolve() == candidate.resolve():  # a typo'd or templated gate would pass by construction
        raise InputError(f"reference and candidate are the same ({reference.resolve()}); give the original model and "
                         "the converted or quantized one")
    wt = weight_type(candidate)
    defaults = DEFAULT_THRESHOLDS.get(wt, DEFAULT_THRESHOLDS["int4"])
    thresholds = {k: (getattr(o, k) if getattr(o, k) is not None else v) for k, v in defaults.items()}
    thresholds.update({k: getattr(o, k) for k in OPTIONAL_THRESHOLDS if getattr(o, k) is not None})
    for k, v in thresholds.items():
        flag = f"--{k.replace('_', '-')}"
        if isinstance(v, bool) or not isinstance(v, numbers.Real):  # (True is 1 to Python; a numpy float is a number)
            raise InputError(f"{flag} {v!r}: give a number")
        if not isinstance(v, (int, float)):
            v = thresholds[k] = float(v)
        if not math.isfinite(v):
            none = "0" if k.startswith("min_") else "a large one, e.g. 1e9,"
            raise InputError(f"{flag} {v!r}: give a finite number ({none} for no limit)")
        lo, hi = THRESHOLD_RANGES[k]
        if not lo <= v <= hi:
            raise InputError(f"--{k.replace('_', '-')} {v!r}: choose " + ("a fraction from 0 to 1" if hi == 1 else "a value ≥ 0"))
    ctx = min(_context_length(reference), _context_length(candidate))
    seqlen = o.seqlen or min(2048, ctx)
    if seqlen > ctx:
        raise InputError(f"--seqlen {seqlen} exceeds the context length {ctx}")
    if o.max_tokens < 2:
        raise InputError("--max-tokens must be at least 2")
    tok = load_tokenizer(reference)
    text = load_eval_text(o.data)
    ids = tok(text, add_special_tokens=False).input_ids[: o.max_tokens]
    if len(ids) < 2:
        raise InputError(f"{o.data or 'the evaluation text'}: fewer than 2 tokens to score; pass --data with more text")
    # BOS per window exactly when the tokenizer itself starts a text with it.
    probe = tok("a").input_ids
    bos = tok.bos_token_id if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id else None
    lines = load_prompt_lines(o.prompts)
    prompts = [p for _, p in lines]
    prompt_ids = [tok(p).input_ids for p in prompts]
    source = o.prompts or "the bundled prompts"  # checked now, not after the reference's whole pass
    check_lengths(prompt_ids, o.max_new_tokens, ctx, None, lambda k: f"the prompt on line {lines[k][0]} of {source}")
    warnings = []
    if _is_original(candidate) and not _is_original(reference):
        warnings.append(f"the reference {reference} is a converted artifact and the candidate {candidate} an original "
                        "fp checkpoint: the order is REFERENCE (the original) CANDIDATE (what was made from it)")
    overlap = overlap_tokens(ids, _calibration_shingles(candidate))
    if overlap:
        warnings.append(f"the evaluation text shares {overlap} 32-token spans with the candidate's calibration text; "
                        "perplexity is optimistic (evaluate on other text)")
    device = str(check_device(o.device))  # "auto" resolved once, each option named in its own error
    ref_device = str(check_device(o.reference_device, "--reference-device")) if o.reference_device is not None else device
    # Both sides' refusals now: the candidate's would otherwise come after the reference's whole pass.
    ref_runner = check_runner(reference, "reference", "auto", ref_device)
    cand_runner = check_runner(candidate, "candidate", o.runner, device)
    if o.dtype != "auto":
        runtime_dtype(o.dtype, device, True)  # a bad --dtype is refused now, not after the reference has run
        fixed = {"onnx": "the dtype it was exported in (an ONNX export)", "gguf": "float32 (a GGUF, dequantized)"}.get(
            kind_of(candidate), "the dtype it was saved in (--runner transformers)" if o.runner == "transformers" else None)
        if fixed:  # --dtype would be ignored, silently
            raise InputError(f"--dtype {o.dtype}: this candidate runs in {fixed}; leave --dtype auto")
    vocabs = vocab_of(reference), vocab_of(candidate)
    if None not in vocabs and vocabs[0] != vocabs[1]:
        raise InputError(f"vocabularies differ: reference {vocabs[0]}, candidate {vocabs[1]}; compare a model with one "
                         "made from it")
    if kind_of(candidate) == "gguf":
        check_gguf_vocabulary(candidate, tok)
    t0 = time.time()
    wins = windows(ids, seqlen, bos)
    # One model at a time: the reference's logits wait on the host while the candidate runs,
    # so a device only ever holds one of them (a 70B int4 candidate fits one 80 GB GPU; the
    # fp reference beside it would not).
    half = (lambda k, n: progress(k, 2 * n)) if progress else None
    with open_runner(reference, "reference", ref_runner, ref_device, o.check) as ref:
        ref_logits = window_logits(ref, wins, half)
        ref_greedy = [greedy_generate(ref, [pid], o.max_new_tokens, ref.eos_token_ids)[0] for pid in prompt_ids]
        ref_vocab, runners, runtime = ref.vocab_size, {"reference": f"{ref.name}@{ref_device}"}, {"reference": _runtime(ref)}
        del ref
    _release_device(ref_device)
    with open_runner(candidate, "candidate", cand_runner, device, o.check, o.dtype) as cand:
        if ref_vocab != cand.vocab_size:
            raise InputError(f"vocabularies differ: reference {ref_vocab}, candidate {cand.vocab_size}")
        stats = compare(ref_logits, cand, wins, o.score_second_half,
                        (lambda k, n: progress(n + k, 2 * n)) if progress else None)
        greedy = []
        for p, pid, a in zip(prompts, prompt_ids, ref_greedy):
            b = greedy_generate(cand, [pid], o.max_new_tokens, cand.eos_token_ids)[0]
            div = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
            greedy.append({"prompt": p, "match": a == b, "first_divergence": div,
                           "reference": tok.decode(a, skip_special_tokens=True), "candidate": tok.decode(b, skip_special_tokens=True)})
        runners["candidate"] = f"{cand.name}@{device}"
        runtime["candidate"] = _runtime(cand)
    del ref_logits
    kl_values = stats.pop("kl_values")
    checks = {
        "max_ppl_increase": (stats["ppl_increase_pct"], stats["ppl_increase_pct"] <= thresholds["max_ppl_increase"]),
        "max_kl": (stats["kl"]["mean"], stats["kl"]["mean"] <= thresholds["max_kl"]),
        "min_top1": (stats["top1_agreement"], stats["top1_agreement"] >= thresholds["min_top1"]),
    }
    optional = {"min_top5": stats["top5_agreement"], "min_p_top": stats["p_top"]["candidate"]}
    checks.update({k: (v, v >= thresholds[k]) for k, v in optional.items() if k in thresholds})
    failures = [f"{k}: {_versus(v, thresholds[k])}" for k, (v, ok) in checks.items() if not ok]
    if stats["scored_tokens"] < MIN_SCORED_TOKENS:
        warnings.append(f"only {stats['scored_tokens']} tokens were scored (fewer than {MIN_SCORED_TOKENS}): the metrics are "
                        "too noisy to gate on; give more text (--data) or a larger --max-tokens")
    report = {
        "lmkiln_version": lmkiln.__version__,
        "reference": {"path": str(reference), **stats["reference"]},
        "candidate": {"path": str(candidate), "weight_type": wt, **stats["candidate"]},
        "ppl_increase_pct": stats["ppl_increase_pct"],
        "kl": stats["kl"],
        "top1_agreement": stats["top1_agreement"],
        "top5_agreement": stats["top5_agreement"],
        "top5_overlap": stats["top5_overlap"],
        "p_top": stats["p_top"],
        "max_abs_dlogit": stats["max_abs_dlogit"],
        "greedy_match": all(g["match"] for g in greedy),
        "greedy": greedy,
        "thresholds": thresholds,
        "checks": {k: {"value": v, "passed": ok} for k, (v, ok) in checks.items()},
        "passed": not failures,
        "protocol": {
            "data": str(o.data) if o.data else "bundled:wikitext2_test_excerpt",
            "tokens": len(ids), "scored_tokens": stats["scored_tokens"], "seqlen": seqlen, "windows": stats["n_windows"],
            "window_length": len(wins[0]),  # = seqlen, or the one short window's when the text is shorter
            "bos_per_window": bos is not None, "score_second_half": o.score_second_half,
            "ppl": "exp(mean NLL) over scored tokens of non-overlapping windows; stderr by the delta method",
            "kl": "KL(reference || candidate) of next-token distributions at scored positions",
            "top5_agreement": "fraction of scored positions where the reference's top-1 token is in the candidate's top 5",
            "top5_overlap": "mean |top5(reference) ∩ top5(candidate)| / 5",
            "p_top": "mean probability each model gives the reference's top-1 token",
            "max_new_tokens": o.max_new_tokens,
        },
        "runners": runners,
        "runtime": runtime,
        "windows": stats["windows"],
        "warnings": warnings,
        "seconds": round(time.time() - t0, 2),
    }
    return VerifyResult(report, not failures, failures, warnings, kl_values)


def plot_format(path: Path) -> str:
    """The image type `--plot` writes, from its file name; refused before the run when matplotlib
    writes no such type (a name without one would get '.png' added: another file than the one named)."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt, types = Path(path).suffix[1:].lower(), FigureCanvasBase.get_supported_filetypes()
    if fmt not in types:
        raise InputError(f"--plot {path}: " + (f"cannot write a .{fmt} image" if fmt else "no image type in the name")
                         + f"; name it e.g. verify.png (types: {', '.join(sorted(types))})")
    return fmt


def check_plot(path: Path, force: bool = False, inputs: tuple[Path, ...] = (), outputs: tuple[Path, ...] = ()) -> Path:
    """Everything write_plot would refuse, before the run: formats/atomic.check_output_file's checks, then the type."""
    path = check_output_file(path, force, inputs, "--plot", outputs)
    plot_format(path)
    return path


def write_plot(result: VerifyResult, path: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> Path:
    """Draw the per-window NLL of both models and the KL histogram into `path` (atomic; an existing
    file only with force; never one of `inputs` or inside one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = plot_format(path)
    w = result.report["windows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([x["reference_nll"] for x in w], marker="o", label="reference")
    a.plot([x["candidate_nll"] for x in w], marker="x", label="candidate")
    a.set_xlabel("window")
    a.set_ylabel("mean NLL (nats)")
    a.set_title("per-window NLL")
    a.legend()
    kl = result.kl_values.clamp(min=1e-12).log10().numpy()
    b.hist(kl, bins=50)
    b.set_xlabel("log10 KL(reference || candidate) per token")
    b.set_ylabel("tokens")
    b.set_title(f"KL: mean {result.report['kl']['mean']:.3g}, p99 {result.report['kl']['p99']:.3g}")
    fig.tight_layout()
    try:
        with atomic_file(path, force, inputs, "--plot") as tmp:
            fig.savefig(tmp, dpi=100, format=fmt)  # the format named: the temporary has no suffix to go by
    finally:
        plt.close(fig)
    return Path(path)
