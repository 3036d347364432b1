"""HF `config.json` -> the engine's model config (the `model` block of the manifest).

Field names come from the architecture table; this module only applies the table,
fills the documented defaults and refuses what the engine cannot run.
"""

from __future__ import annotations

from lmkiln.convert.architectures import Architecture
from lmkiln.errors import UnsupportedArchitectureError

SUPPORTED_ROPE = ("default", "linear", "llama3")
SUPPORTED_ACT = ("silu",)
# Defaults transformers applies when a key is absent (LlamaConfig and friends).
DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "max_position_embeddings": 2048}


def _lookup(cfg: dict, key: str | tuple[str, ...]):
    for k in (key,) if isinstance(key, str) else key:
        if cfg.get(k) is not None:
            return cfg[k]
    k = key if isinstance(key, str) else key[0]
    return DEFAULTS.get(k)


def rope_from_hf(cfg: dict, head_dim: int) -> dict:
    """Rope settings in engine terms from either config style.

    transformers >= 5 writes `rope_parameters = {rope_theta, rope_type, ...}`; older
    configs have `rope_theta` plus an optional `rope_scaling = {type|rope_type, ...}`.
    """
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        rp = dict(cfg.get("rope_scaling") or {})
        rp["rope_theta"] = cfg.get("rope_theta", 10000.0)
    rp = dict(rp)
    rtype = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    rp.pop("type", None)
    base = float(rp.pop("rope_theta"))
    if float(rp.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedArchitectureError("partial rotary embeddings (partial_rotary_factor < 1) are not supported yet")
    if rtype not in SUPPORTED_ROPE:
        raise UnsupportedArchitectureError(f"rope type {rtype!r} is not supported (supported: {', '.join(SUPPORTED_ROPE)})")
    scaling = {k: v for k, v in rp.items() if v is not None} if rtype != "default" else None
    if rtype == "llama3":
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            if k not in scaling:
                raise UnsupportedArchitectureError(f"llama3 rope scaling needs {k!r} in config.json")
    if rtype == "linear" and "factor" not in scaling:
        raise UnsupportedArchitectureError("linear rope scaling needs 'factor' in config.json")
    return {"type": rtype, "base": base, "dim": head_dim, "scaling": scaling}


def engine_config_from_hf(arch: Architecture, cfg: dict) -> dict:
    m = {field: _lookup(cfg, key) for field, key in arch.config.items()}
    if m.get("size_per_head") is None:
        m["size_per_head"] = m["hidden_units"] // m["head_num"]
    for req in ("hidden_units", "head_num", "kv_head_num", "inter_size", "num_layer", "vocab_size"):
        if not isinstance(m.get(req), int) or m[req] <= 0:
            raise UnsupportedArchitectureError(f"config.json: {arch.config[req]!r} must be a positive integer, got {m.get(req)!r}")
    if m["head_num"] % m["kv_head_num"]:
        raise UnsupportedArchitectureError(f"config.json: {m['head_num']} attention heads are not a multiple of {m['kv_head_num']} kv heads")
    if m["size_per_head"] % 2:
        raise UnsupportedArchitectureError(f"config.json: head_dim {m['size_per_head']} is odd; rotary needs pairs")
    if m["hidden_act"] not in SUPPORTED_ACT:
        raise UnsupportedArchitectureError(f"activation {m['hidden_act']!r} is not supported (supported: {', '.join(SUPPORTED_ACT)})")
    if "use_sliding_window" in m:
        # Only effective when switched on (Qwen2/3 configs carry a window they do not use).
        if not m.pop("use_sliding_window"):
            m["sliding_window"] = None
        elif m.get("sliding_window") and (cfg.get("max_window_layers") or 0) > 0:
            # transformers then windows only layers >= max_window_layers; the engine has one window for all.
            raise UnsupportedArchitectureError(
                "use_sliding_window with max_window_layers > 0 (sliding attention on some layers only) is not supported yet"
            )
    m.setdefault("sliding_window", None)
    m.setdefault("attn_bias", False)
    m["attn_bias"] = bool(m["attn_bias"])
    m.setdefault("qk_norm", False)
    m.update(arch.quirks)
    eos = m.get("eos_token_id")
    m["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    m["rope"] = rope_from_hf(cfg, m["size_per_head"])
    m["tie_word_embeddings"] = bool(m["tie_word_embeddings"])
    m["architecture"] = arch.hf_name
    return dict(sorted(m.items()))
