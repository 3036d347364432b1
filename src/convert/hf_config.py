"""HF `config.json` -> the engine's model config (the `model` block of the manifest).

Field names come from the architecture table; this module only applies the table,
fills the documented defaults and refuses what the engine cannot run.
"""

from __future__ import annotations

from lmkiln.convert.architectures import Architecture
from lmkiln.errors import UnsupportedArchitectureError
from lmkiln.formats.engine import ACTIVATIONS as SUPPORTED_ACT, FAMILY_FIELDS, LAYER_TYPES

SUPPORTED_ROPE = ("default", "linear", "llama3")

# Defaults transformers applies when a key is absent (LlamaConfig and friends).
DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "max_position_embeddings": 2048}


def _lookup(cfg: dict, key: str | tuple[str, ...], defaults: dict):
    for k in (key,) if isinstance(key, str) else key:
        if cfg.get(k) is not None:
            return cfg[k]
    return next((defaults[k] for k in ((key,) if isinstance(key, str) else key) if k in defaults), None)


def rope_from_hf(cfg: dict, head_dim: int, layer_type: str = "full_attention") -> dict:
    """Rope settings in engine terms from either config style.

    transformers >= 5 writes `rope_parameters = {rope_theta, rope_type, ...}`, or one such
    block per layer type (Gemma 3: {full_attention: ..., sliding_attention: ...}); older
    configs have `rope_theta` plus an optional `rope_scaling = {type|rope_type, ...}`, and
    Gemma 3's local layers `rope_local_base_freq` (no scaling).
    """
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    elif layer_type == "sliding_attention" and cfg.get("rope_local_base_freq") is not None:
        rp = {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        rp = dict(cfg.get("rope_scaling") or {})
        rp["rope_theta"] = cfg.get("rope_theta", 10000.0)
    rp = dict(rp)
    rtype = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    rp.pop("type", None)
    base = float(rp.pop("rope_theta"))
    if float(rp.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedArchitectureError("config.json: partial rotary embeddings (partial_rotary_factor < 1, rotary on part of each head) "
                                           "are not supported yet")
    if rtype not in SUPPORTED_ROPE:
        raise UnsupportedArchitectureError(f"config.json: rope type {rtype!r} is not supported yet (supported: {', '.join(SUPPORTED_ROPE)})")
    scaling = {k: v for k, v in rp.items() if v is not None} if rtype != "default" else None
    if rtype == "llama3":
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            if k not in scaling:
                raise UnsupportedArchitectureError(f"llama3 rope scaling needs {k!r} in config.json")
    if rtype == "linear" and "factor" not in scaling:
        raise UnsupportedArchitectureError("linear rope scaling needs 'factor' in config.json")
    return {"type": rtype, "base": base, "dim": head_dim, "scaling": scaling}


def layer_types(m: dict, cfg: dict) -> list[str] | None:
    """Per layer "full_attention" or "sliding_attention", or None when every layer is alike.

    From config.json's `layer_types` (transformers >= 4.5x), else from the family's
    `sliding_window_pattern` (every n-th layer global, the others local, as Gemma 2/3's
    older configs say)."""
    n = m["num_layer"]
    types = cfg.get("layer_types")
    pattern = m.pop("sliding_window_pattern", None)
    if types is None and pattern:
        types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(n)]
    if types is None:
        return None
    types = list(types)[:n]
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad or len(types) != n:
        raise UnsupportedArchitectureError(f"config.json: layer_types {bad or types} not understood (supported: {', '.join(LAYER_TYPES)})")
    if "sliding_attention" in types and not m.get("sliding_window"):
        raise UnsupportedArchitectureError("config.json: sliding_attention layers but no sliding_window")
    return types


def _token_id(t, vocab: int) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab


def _ids(value, what: str, vocab: int) -> list[int]:
    ids = [] if value is None else [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, list) or not all(_token_id(t, vocab) for t in ids):
        raise UnsupportedArchitectureError(f"{what}: eos_token_id must be token ids below vocab_size {vocab}, got {value!r}")
    return ids


def stop_token_ids(eos, generation: dict, vocab: int) -> list[int]:
    """The ids that end generation: config.json's eos_token_id, then any more that generation_config.json
    names (transformers' generate stops on the latter's list; a chat model's end-of-turn token is often only
    there, e.g. Llama 3 Instruct's <|eot_id|>)."""
    ids = _ids(eos, "config.json", vocab)
    extra = _ids(generation.get("eos_token_id"), "generation_config.json", vocab)
    return ids + [t for t in dict.fromkeys(extra) if t not in ids]


def engine_config_from_hf(arch: Architecture, cfg: dict, generation: dict | None = None) -> dict:
    """The engine manifest's model block for an HF config.json (and its generation_config.json, which
    adds stop ids)."""
    for key, what in arch.unsupported.items():
        if cfg.get(key):
            raise UnsupportedArchitectureError(f"config.json: {key} is true ({what}); {arch.hf_name} with {what} is not "
                                               "supported yet")
    defaults = {**DEFAULTS, **arch.defaults}
    m = {field: _lookup(cfg, key, defaults) for field, key in arch.config.items()}
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
        raise UnsupportedArchitectureError(f"config.json: activation {m['hidden_act']!r} is not supported (supported: {', '.join(SUPPORTED_ACT)})")
    if "use_sliding_window" in m:
        # Only effective when switched on (Qwen2/3 configs carry a window they do not use).
        if not m.pop("use_sliding_window"):
            m["sliding_window"] = None
        elif m.get("sliding_window") and (cfg.get("max_window_layers") or 0) > 0:
            # transformers then windows only layers >= max_window_layers; the engine has one window for all.
            raise UnsupportedArchitectureError(
                "config.json: use_sliding_window with max_window_layers > 0 (sliding attention on some layers only) is not supported yet"
            )
    m.setdefault("sliding_window", None)
    m.setdefault("attn_bias", False)
    m["attn_bias"] = bool(m["attn_bias"])
    m.setdefault("qk_norm", False)
    types = layer_types(m, cfg)
    m.update(arch.quirks)
    for k, v in FAMILY_FIELDS.items():
        m.setdefault(k, v)
    if m["embed_scale"] == "sqrt_hidden":
        m["embed_scale"] = float(m["hidden_units"]) ** 0.5
    for k in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
        m[k] = None if m[k] is None else float(m[k])
    if types:
        local = rope_from_hf(cfg, m["size_per_head"], "sliding_attention") if "sliding_attention" in types else None
        m["rope_local"] = local if local is not None and local != rope_from_hf(cfg, m["size_per_head"]) else None
        if "sliding_attention" not in types:
            m["sliding_window"] = None  # every layer global: the window is unused
        # kept per layer unless every layer is alike (then `sliding_window` alone says it, as in v1)
        m["layer_types"] = types if "full_attention" in types and "sliding_attention" in types or m["rope_local"] else None
    if m["num_experts"] is not None:
        if cfg.get("mlp_only_layers") or (cfg.get("decoder_sparse_step") or 1) != 1:
            raise UnsupportedArchitectureError("config.json: dense FFN layers among the mixture-of-experts layers "
                                               "(mlp_only_layers / decoder_sparse_step) are not supported yet")
        if not isinstance(m["experts_per_token"], int) or not 1 <= m["experts_per_token"] <= m["num_experts"]:
            raise UnsupportedArchitectureError(f"config.json: {m['experts_per_token']!r} experts per token of "
                                               f"{m['num_experts']} is not a valid top-k")
        m["norm_topk"] = bool(m["norm_topk"])
    m["eos_token_id"] = stop_token_ids(m.get("eos_token_id"), generation or {}, m["vocab_size"])
    pad = m.get("pad_token_id")
    if pad is None:
        pad = (generation or {}).get("pad_token_id")
    # informational (exports name it); configs carry -1 or vocab_size for "none", which no consumer could use
    m["pad_token_id"] = pad if _token_id(pad, m["vocab_size"]) else None
    m["rope"] = rope_from_hf(cfg, m["size_per_head"])
    m["tie_word_embeddings"] = bool(m["tie_word_embeddings"])
    m["architecture"] = arch.hf_name
    # values every runner needs positive: refused here, not by the engine reader later (or as NaN logits)
    ctx, eps, base = m.get("max_position_embeddings"), m.get("norm_eps"), m["rope"]["base"]
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1:
        raise UnsupportedArchitectureError(f"config.json: max_position_embeddings must be a positive integer, got {ctx!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise UnsupportedArchitectureError(f"config.json: the norm epsilon ({arch.config.get('norm_eps')!r}) must be a positive "
                                           f"number, got {eps!r}")
    if not base > 0:
        raise UnsupportedArchitectureError(f"config.json: rope_theta must be positive, got {base!r}")
    return dict(sorted(m.items()))
