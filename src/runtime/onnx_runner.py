"""The onnxruntime runner: an `lmkiln export onnx` folder behind the Runner interface.

The KV cache is the graph's own past/present tensors (numpy, grown by concatenation)
plus the attention mask seen so far. Batches of one, and batches without padding, work
with every export. Left-padded batches need a `--portable` export: the default graph's
GroupQueryAttention derives positions from the mask's row sums, which is only right
for rows without left padding, so the runner refuses them rather than return wrong logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmkiln.errors import InputError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class OnnxCache:
    past: dict[str, np.ndarray]
    mask: np.ndarray  # (B, length) int64: every token fed so far
    capacity: int
    present_names: dict[str, str] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.mask.shape[1]


def _metadata(model_file: Path) -> dict[str, str]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:  # truncated or overwritten: fail before any work, in one line
        raise InputError(f"{model_file}: not a readable ONNX model ({type(e).__name__}); re-export it with "
                         "`lmkiln export onnx`") from None
    return {p.key: p.value for p in model.metadata_props}


def _genai_model(folder: Path) -> dict:
    """genai_config.json's "model" section beside model.onnx ({} when there is none or it is unreadable)."""
    try:
        return json.loads((folder / "genai_config.json").read_text(encoding="utf-8")).get("model", {}) or {}
    except (OSError, ValueError, AttributeError):
        return {}


class OnnxRunner:
    name = "onnxruntime"

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None, spin: bool = False):
        """`spin=False` stops onnxruntime's idle threads busy-waiting between runs, which
        otherwise starves torch (or anything else) sharing the CPU; benchmarks may enable it."""
        import onnxruntime as ort

        path = Path(path)
        model_file = path / "model.onnx" if path.is_dir() else path
        if not model_file.is_file():
            raise InputError(f"{path}: no model.onnx; export one with `lmkiln export onnx`")
        if provider not in PROVIDERS:
            raise InputError(f"provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise InputError(f"onnxruntime here has no {PROVIDERS[provider]} (available: {ort.get_available_providers()})")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        meta = _metadata(model_file)
        level = meta.get("lmkiln.accuracy_level", "0")
        weight_type = json.loads(meta.get("lmkiln.source_manifest", "{}")).get("weight_type")
        if level == "0" and meta.get("lmkiln.graph") == "portable" and weight_type == "int8" and provider == "cpu":
            # The fusion below would make 8-bit MatMulNBits at level 0, which onnxruntime (1.32) runs by dequantizing
            # the whole weight on every call; without QDQ fusions it folds each int8 DequantizeLinear into a float32
            # weight once at load: the same exact product, 7x faster (hidden-2048 int8 synthetic, 8 tokens: 89 vs 606 ms).
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        else:
            # onnxruntime fuses a portable graph's DequantizeLinear + MatMul into MatMulNBits with
            # int8 activations (accuracy level 4) by default; keep the export's recorded level.
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        load_errors = tuple(getattr(ort_errors, n) for n in ("Fail", "InvalidGraph", "InvalidArgument", "NoSuchFile",
                                                             "InvalidProtobuf", "NotImplemented") if hasattr(ort_errors, n))
        # at run time too (a graph another exporter wrote may load and then refuse to run, e.g. the
        # builder's GroupQueryAttention with head_size 8): one line, not an internal error
        self._run_errors = load_errors + tuple(getattr(ort_errors, n) for n in ("RuntimeException", "EPFail")
                                               if hasattr(ort_errors, n))
        self._file = model_file
        # its errors reach the user as our one-line message, not also as a red log line (the
        # executor logs through the process-wide logger, which session options do not reach)
        ort.set_default_logger_severity(4)  # 4: fatal only (3 still prints errors)
        try:
            self.session = ort.InferenceSession(str(model_file), opts, providers=[PROVIDERS[provider]])
        except load_errors as e:  # onnxruntime's own types (not RuntimeError), each a multi-line message
            raise InputError(f"{model_file}: onnxruntime cannot load it ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:240]}); re-export it with `lmkiln export onnx`") from None
        self.device = provider
        self.graph_kind = meta.get("lmkiln.graph", "contrib")
        self.config = json.loads(meta["lmkiln.model"]) if "lmkiln.model" in meta else {}
        self._past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self._np_dtype = np.float16 if self._past and self._past[0].type == "tensor(float16)" else np.float32
        shape = self._past[0].shape if self._past else [None, 1, None, 1]
        # Another exporter's graph (onnxruntime-genai's builder) may leave the cache's head
        # count or width symbolic; its genai_config.json then says them.
        genai = _genai_model(model_file.parent)
        dec = genai.get("decoder", {})
        self._kv = shape[1] if isinstance(shape[1], int) else dec.get("num_key_value_heads")
        self._hd = shape[3] if isinstance(shape[3], int) else dec.get("head_size")
        if not (isinstance(self._kv, int) and isinstance(self._hd, int)):
            raise InputError(f"{model_file}: its KV cache inputs have a symbolic shape {shape} and no genai_config.json beside "
                             "it gives num_key_value_heads and head_size; export it with `lmkiln export onnx`")
        self._vocab = self.session.get_outputs()[0].shape[-1]
        if not self.config and genai:
            eos = genai.get("eos_token_id", [])
            self.config = {"vocab_size": genai.get("vocab_size", self._vocab), "eos_token_id": eos if isinstance(eos, list) else [eos]}

    @property
    def vocab_size(self) -> int:
        return int(self.config.get("vocab_size", self._vocab))

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.config.get("eos_token_id", []))

    def new_cache(self, batch: int, capacity: int) -> OnnxCache:
        empty = np.zeros((batch, self._kv, 0, self._hd), dtype=self._np_dtype)
        return OnnxCache({i.name: empty for i in self._past}, np.zeros((batch, 0), dtype=np.int64), capacity)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: OnnxCache | None = None) -> torch.Tensor:
        ids = np.ascontiguousarray(torch.as_tensor(input_ids).cpu().numpy().astype(np.int64))
        B, T = ids.shape
        new_mask = np.ones((B, T), np.int64) if attention_mask is None else torch.as_tensor(attention_mask).cpu().numpy().astype(np.int64)
        if cache is None:
            cache = self.new_cache(B, T)
        if cache.length + T > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} tokens; {cache.length + T} needed")
        mask = np.concatenate([cache.mask, new_mask], axis=1)
        if self.graph_kind != "portable" and not mask.all():
            raise InputError("this ONNX export (GroupQueryAttention) does not support padded batches; "
                             "run prompts one at a time or export with --portable")
        feeds = {"input_ids": ids, "attention_mask": mask, **cache.past}
        try:
            outs = self.session.run(None, feeds)
        except self._run_errors as e:
            raise InputError(f"{self._file}: onnxruntime cannot run it ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:300]})") from None
        names = [o.name for o in self.session.get_outputs()]
        res = dict(zip(names, outs))
        for name in cache.past:
            cache.past[name] = res["present." + name[len("past_key_values."):]]
        cache.mask = mask
        return torch.from_numpy(np.asarray(res["logits"], dtype=np.float32))
