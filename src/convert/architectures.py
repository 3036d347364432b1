"""The architecture table: everything lmkiln knows about a model family, as data.

One `Architecture` entry per Hugging Face `architectures[0]`. An entry says
- `tensors`: which HF tensor plays each engine *role* (`{i}` is the layer index).
  The engine layout of every role is fixed by docs/engine-format.md, so the converter
  is generic: it never tests a model name, it reads roles from here.
- `optional`: roles that may be missing from a checkpoint (with the reason).
- `skips`: HF tensors that are deliberately not converted, each with the reason.
- `quirks`: engine config flags that differ from the Llama defaults, each with the reason.
- `awq_groups`: which linears are scaled together and from which preceding op (the
  AWQ "mappings"), consumed by `lmkiln quantize`.
- `genai_type`: the model type onnxruntime-genai expects in an export's genai_config.
- `gguf_arch`, `gguf_rope_interleaved`: llama.cpp's name for the family in a GGUF, and
  which rotary row order it expects (`lmkiln export gguf`).
- `config`: engine config field <- HF config key (a tuple is a fallback chain).
- `defaults`: engine config values for HF keys a family's config may omit (transformers' defaults).
- `fused`: an HF linear that holds several engine roles stacked along its output (Phi-3's
  qkv_proj), split by the converter; quantize treats it as one linear.
- `hf_attention`: the transformers attention implementation lmkiln runs the family's own model code with
  (calibration, the transformers runner): one that computes all of its math.

Adding a family is adding an entry; see docs/architectures.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lmkiln.errors import UnsupportedArchitectureError

# Engine roles. Global roles appear once; layer roles once per decoder layer.
GLOBAL_ROLES = ("embed", "final_norm", "lm_head")
LAYER_ROLES = (
    "attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm",
    "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm",
    "gate", "up", "down", "router", "expert_gate", "expert_up", "expert_down",
)
# Mixture-of-experts roles: `router` (never quantized) and each expert's linears, whose HF names
# hold `{e}`; a concrete role names its expert after a dot, e.g. "expert_down.3" (see expand_experts).
EXPERT_ROLES = ("expert_gate", "expert_up", "expert_down")
# Roles whose HF tensor is a linear weight (out, in), the ones quantize acts on; `qkv` and
# `gate_up` are fused HF linears (Architecture.fused) that the converter splits into roles.
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up", *EXPERT_ROLES)
# The linears whose input is the FFN width, which engines pad (to groups x tensor-parallel ranks)
FFN_IN_ROLES = ("down", "expert_down")


def base_role(role: str) -> str:
    """'expert_down.3' -> 'expert_down'; any other role is its own base."""
    return role.split(".", 1)[0]


def is_linear(role: str) -> bool:
    return base_role(role) in LINEAR_ROLES


def expert_of(role: str) -> int | None:
    return int(role.split(".", 1)[1]) if "." in role else None


def expand_experts(roles, n_experts: int) -> list[str]:
    """Roles with every expert role repeated per expert ('expert_up' -> 'expert_up.0', ...)."""
    out = []
    for r in roles:
        out += [f"{r}.{e}" for e in range(n_experts)] if r in EXPERT_ROLES else [r]
    return out
NORM_ROLES = ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "q_norm", "k_norm", "final_norm")


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that share one input and one AWQ scale, folded into `prev`.

    `prev` is the role whose output feeds `linears` (a norm weight or a linear);
    `inspect` is the HF submodule of the decoder layer whose output the scale search
    scores (the whole attention block for q/k/v, so the search sees softmax effects).
    `reason` says why the linears share the scale; a group folding into a linear whose
    output width differs from the group's input width is skipped (quant.awq.group_applies:
    v -> o under GQA), and the report quotes `reason` for the skip.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    reason: str = ""
    # (k, n): the group folds into the k-th of n equal row blocks of `prev` (a fused linear's
    # part: Phi-3's up rows inside gate_up_proj); None: all of prev's rows.
    prev_part: tuple[int, int] | None = None
    # Mixture of experts: `also` are linears that read the same input and take the fold
    # (columns x s) but are neither searched nor quantized (the router); `per_expert` makes
    # one group per expert e from roles and `inspect` written with {e}; otherwise an expert
    # role in `linears` stands for that role of every expert.
    also: tuple[str, ...] = ()
    per_expert: bool = False

    def expand(self, n_experts: int) -> list["ScaleGroup"]:
        """This group with expert roles made concrete for a layer of `n_experts` experts."""
        if self.per_expert:
            return [ScaleGroup(f"{self.prev}.{e}", tuple(f"{r}.{e}" for r in self.linears), self.inspect.format(e=e),
                               self.reason) for e in range(n_experts)]
        if any(r in EXPERT_ROLES for r in self.linears):
            return [replace(self, linears=tuple(expand_experts(self.linears, n_experts)))]
        return [self]


@dataclass(frozen=True)
class Architecture:
    hf_name: str
    tensors: dict[str, str]
    config: dict[str, str | tuple[str, ...]]
    optional: dict[str, str] = field(default_factory=dict)
    skips: dict[str, str] = field(default_factory=dict)
    quirks: dict[str, object] = field(default_factory=dict)
    quirk_reasons: dict[str, str] = field(default_factory=dict)
    awq_groups: tuple[ScaleGroup, ...] = ()
    genai_type: str = "llama"  # onnxruntime-genai's model "type" for an export of this family
    gguf_arch: str = "llama"  # llama.cpp's general.architecture for `export gguf` (Mistral runs as "llama" there)
    # llama.cpp rotates adjacent q/k pairs for "llama" (rows stay in the engine's interleaved order) but
    # half-split pairs ("NEOX", Hugging Face's order) for the Qwen families, whose rows are un-permuted.
    gguf_rope_interleaved: bool = True
    defaults: dict[str, object] = field(default_factory=dict)
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hf_attention: str = "sdpa"
    # config.json flags this family's engine layout cannot honour when true: key -> what they add
    unsupported: dict[str, str] = field(default_factory=dict)

    def fused_parent(self, role: str) -> str | None:
        """The fused HF linear that holds engine role `role`, or None when it is its own tensor."""
        return next((f for f, parts in self.fused.items() if role in parts), None)

    def hf_roles(self, roles) -> list[str]:
        """`roles` as the checkpoint holds them: members of a fused linear replaced by it, once."""
        out: list[str] = []
        for r in roles:
            r = self.fused_parent(r) or r
            if r not in out:
                out.append(r)
        return out

    def hf_name_of(self, role: str, layer: int | None = None) -> str | None:
        """The HF tensor of `role` (of the fused linear holding it, for a fused member; of
        expert e for 'expert_up.e')."""
        t = self.tensors.get(self.fused_parent(role) or base_role(role))
        return None if t is None else t.format(i=layer, e=expert_of(role))

    def module_of(self, role: str) -> str:
        """The HF module path of a linear role relative to its decoder layer, e.g. 'self_attn.q_proj'."""
        name = self.hf_name_of(role, -1)
        prefix = self.tensors["attn_norm"].split("{i}")[0].format() + "-1."
        return name[len(prefix):].rsplit(".", 1)[0]

    @property
    def moe(self) -> bool:
        return "router" in self.tensors

    def scale_groups(self, n_experts: int = 0) -> list[ScaleGroup]:
        """The AWQ groups of a layer with `n_experts` experts (0: a dense layer)."""
        return [g for gr in self.awq_groups for g in gr.expand(n_experts)]

    @property
    def layer_prefix(self) -> str:
        """HF module path of decoder layer {i}, e.g. 'model.layers.{i}'."""
        return self.tensors["attn_norm"].split("{i}")[0] + "{i}"


# HF config keys shared by the Llama-like families (engine field <- HF key).
LLAMA_LIKE_CONFIG: dict[str, str | tuple[str, ...]] = {
    "hidden_units": "hidden_size",
    "head_num": "num_attention_heads",
    "kv_head_num": ("num_key_value_heads", "num_attention_heads"),
    "size_per_head": "head_dim",  # absent in older configs: hidden_units // head_num
    "inter_size": "intermediate_size",
    "num_layer": "num_hidden_layers",
    "vocab_size": "vocab_size",
    "norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "hidden_act": "hidden_act",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}

LLAMA_TENSORS = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}

# Llama's optional biases (transformers adds them when these are true); the engine's Llama
# layout has none, and ignoring the flag dropped them (or, absent, converted a config whose
# transformers model would have random biases).
# attention_bias puts a bias on o too (Llama, Mistral, Qwen3, Gemma; Qwen2's q/k/v biases are a quirk), which no
# engine role holds
ATTENTION_BIAS = {"attention_bias": "biases on q/k/v/o"}
LLAMA_UNSUPPORTED = {**ATTENTION_BIAS, "mlp_bias": "biases on gate/up/down"}

# The AWQ scaling groups of a pre-norm Llama block (the published AWQ mappings).
LLAMA_AWQ = (
    ScaleGroup("attn_norm", ("q", "k", "v"), inspect="self_attn", reason="q/k/v read the attention norm's output"),
    ScaleGroup("v", ("o",), inspect="self_attn.o_proj",
               reason="o reads v's output per head; with GQA v is narrower than o's input, so no shared scale"),
    ScaleGroup("ffn_norm", ("gate", "up"), inspect="mlp", reason="gate/up read the FFN norm's output"),
    ScaleGroup("up", ("down",), inspect="mlp.down_proj", reason="down reads silu(gate)*up, linear in up's output"),
)

TIED_LM_HEAD = {"lm_head": "absent when tie_word_embeddings: the output projection is the embedding"}
ROTARY_BUFFERS = {"model.layers.{i}.self_attn.rotary_emb.inv_freq": "a buffer, recomputed from the rope config"}

ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.hf_name] = arch
    return arch


register(Architecture(
    hf_name="LlamaForCausalLM",
    tensors=LLAMA_TENSORS,
    config=LLAMA_LIKE_CONFIG,
    unsupported=LLAMA_UNSUPPORTED,
    optional=TIED_LM_HEAD,
    skips=ROTARY_BUFFERS,
    awq_groups=LLAMA_AWQ,
))

register(Architecture(
    hf_name="MistralForCausalLM",
    genai_type="mistral",
    tensors=LLAMA_TENSORS,
    config={**LLAMA_LIKE_CONFIG, "sliding_window": "sliding_window"},
    optional=TIED_LM_HEAD,
    skips=ROTARY_BUFFERS,
    unsupported=LLAMA_UNSUPPORTED,
    quirk_reasons={"sliding_window": "Mistral v0.1 attends to the last `sliding_window` keys only (null = full)"},
    awq_groups=LLAMA_AWQ,
))

register(Architecture(
    hf_name="Qwen2ForCausalLM",
    genai_type="qwen2",
    gguf_arch="qwen2",
    gguf_rope_interleaved=False,
    tensors={
        **LLAMA_TENSORS,
        "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
        "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
        "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    },
    config={**LLAMA_LIKE_CONFIG, "sliding_window": "sliding_window", "use_sliding_window": "use_sliding_window"},
    optional=TIED_LM_HEAD,
    skips=ROTARY_BUFFERS,
    quirks={"attn_bias": True},
    quirk_reasons={
        "attn_bias": "Qwen2 has biases on q/k/v (not on o); the q/k biases are rotary-permuted like their rows",
        "sliding_window": "only applies when use_sliding_window is true, which released Qwen2 checkpoints leave off",
    },
    awq_groups=LLAMA_AWQ,
))

register(Architecture(
    hf_name="Qwen3ForCausalLM",
    genai_type="qwen3",
    gguf_arch="qwen3",
    gguf_rope_interleaved=False,
    tensors={
        **LLAMA_TENSORS,
        "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
        "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    },
    config={**LLAMA_LIKE_CONFIG, "sliding_window": "sliding_window", "use_sliding_window": "use_sliding_window"},
    unsupported=ATTENTION_BIAS,
    optional=TIED_LM_HEAD,
    skips=ROTARY_BUFFERS,
    quirks={"qk_norm": True},
    quirk_reasons={
        "qk_norm": "Qwen3 RMS-normalises each q/k head before rotary; the norm weights are permuted like the rows",
        "size_per_head": "Qwen3 sets head_dim explicitly, not hidden_size / heads",
    },
    awq_groups=LLAMA_AWQ,
))


# Gemma 2 / 3: pre- and post-norms around attention and MLP ("sandwich"); the HF names
# differ from Llama's: post_attention_layernorm is the norm AFTER attention, the FFN's
# input norm is pre_feedforward_layernorm.
GEMMA_TENSORS = {
    **LLAMA_TENSORS,
    "ffn_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "post_ffn_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
}
GEMMA_CONFIG: dict[str, str | tuple[str, ...]] = {
    **LLAMA_LIKE_CONFIG,
    "hidden_act": ("hidden_activation", "hidden_act"),
    "sliding_window": "sliding_window",
    "sliding_window_pattern": "sliding_window_pattern",
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "attn_softcap": "attn_logit_softcapping",
    "final_softcap": "final_logit_softcapping",
}
GEMMA_QUIRKS = {"norm_offset": 1.0, "sandwich_norm": True, "embed_scale": "sqrt_hidden"}
GEMMA_REASONS = {
    "norm_offset": "Gemma's RMSNorm multiplies by (1 + weight), computed in fp32 (kept, not folded: 1 + w in bf16 loses bits)",
    "sandwich_norm": "Gemma normalises the attention and MLP outputs too, before each residual add",
    "embed_scale": "Gemma scales the embeddings by sqrt(hidden_size), rounded to the weights' dtype",
    "query_pre_attn_scalar": "the attention scale is query_pre_attn_scalar ** -0.5, not head_dim ** -0.5",
    "hidden_act": "GeGLU: gelu with the tanh approximation gates the MLP",
    "sliding_window_pattern": "local (sliding) and global layers alternate; every n-th layer is global",
    "hf_attention": "transformers runs it with eager attention: its sdpa path refuses soft-capping",
}
TIED = {"lm_head": "Gemma ties the output projection to the embedding"}
GEMMA_DEFAULTS = {"query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}
# What the Gemma entries share; GGUF export is not mapped yet (post-norms, soft-capping, local rope)
GEMMA = dict(gguf_arch="", config=GEMMA_CONFIG, unsupported=ATTENTION_BIAS, optional=TIED, skips=ROTARY_BUFFERS, awq_groups=LLAMA_AWQ, hf_attention="eager")

register(Architecture(
    hf_name="Gemma2ForCausalLM",
    genai_type="gemma2",
    tensors=GEMMA_TENSORS,
    defaults={**GEMMA_DEFAULTS, "sliding_window_pattern": 2},
    quirks=GEMMA_QUIRKS,
    quirk_reasons={**GEMMA_REASONS,
                   "attn_softcap": "Gemma 2 soft-caps attention scores: cap * tanh(score / cap) before the mask",
                   "final_softcap": "Gemma 2 soft-caps the logits the same way"},
    **GEMMA,
))

register(Architecture(
    hf_name="Gemma3ForCausalLM",
    genai_type="gemma3_text",
    tensors={
        **GEMMA_TENSORS,
        "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
        "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    },
    defaults={**GEMMA_DEFAULTS, "sliding_window_pattern": 6},
    quirks={**GEMMA_QUIRKS, "qk_norm": True},
    quirk_reasons={**GEMMA_REASONS,
                   "qk_norm": "Gemma 3 RMS-normalises q/k heads (with the (1 + w) offset) instead of soft-capping",
                   "rope_local": "sliding layers use their own rope base (rope_local_base_freq), global ones the main rope"},
    **GEMMA,
))

register(Architecture(
    hf_name="Phi3ForCausalLM",
    genai_type="phi3",
    gguf_arch="llama",  # the engine holds q/k/v and gate/up apart: llama.cpp runs that as a llama
    tensors={
        **{r: n for r, n in LLAMA_TENSORS.items() if r not in ("q", "k", "v", "gate", "up")},
        "qkv": "model.layers.{i}.self_attn.qkv_proj.weight",
        "gate_up": "model.layers.{i}.mlp.gate_up_proj.weight",
    },
    fused={"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")},
    config={**LLAMA_LIKE_CONFIG, "sliding_window": "sliding_window"},
    optional=TIED_LM_HEAD,
    skips=ROTARY_BUFFERS,
    quirk_reasons={
        "fused": "Phi-3 stores q/k/v as one qkv_proj ([q; k; v] rows) and gate/up as one gate_up_proj ([gate; up])",
        "sliding_window": "Phi-3 mini attends to the last `sliding_window` keys (2047 in the 4k model)",
        "rope": "the 128k variants use longrope scaling, which is refused (not implemented exactly)",
    },
    awq_groups=(
        ScaleGroup("attn_norm", ("qkv",), inspect="self_attn", reason="qkv reads the attention norm's output"),
        ScaleGroup("qkv", ("o",), inspect="self_attn.o_proj", prev_part=(2, 3),
                   reason="o reads v's output, the last third of qkv's rows when q, k and v are equally wide (no GQA)"),
        ScaleGroup("ffn_norm", ("gate_up",), inspect="mlp", reason="gate_up reads the FFN norm's output"),
        ScaleGroup("gate_up", ("down",), inspect="mlp.down_proj", prev_part=(1, 2),
                   reason="down reads act(gate) * up, linear in up: the second half of gate_up's rows"),
    ),
))


# Mixture of experts: every FFN is a router and experts, each expert a gated MLP as Llama's.
# Engine: the router kept fp, the experts' linears stacked per layer (docs/engine-format.md).
MOE_REASONS = {
    "router": "the router is never quantized: a changed expert choice costs more than its bytes save",
    "num_experts": "experts per layer; every layer is a mixture (dense layers among them are refused)",
    "norm_topk": "the top-k routing weights are renormalised to sum to 1 before mixing the experts' outputs",
}
MOE_AWQ = (
    *LLAMA_AWQ[:2],
    ScaleGroup("ffn_norm", ("expert_gate", "expert_up"), inspect="{moe}", also=("router",),
               reason="every expert's gate/up and the router read the FFN norm's output; scored on the mixed output, "
                      "so routing weights weigh each expert's error"),
    ScaleGroup("expert_up", ("expert_down",), inspect="{experts}.{{e}}.{down}", per_expert=True,
               reason="an expert's down reads act(gate)*up of the tokens routed to it, times their routing weight"),
)


def _moe_awq(moe: str, experts: str, down: str) -> tuple[ScaleGroup, ...]:
    """MOE_AWQ with the family's module names in `inspect`."""
    return tuple(replace(g, inspect=g.inspect.format(moe=moe, experts=experts, down=down)) for g in MOE_AWQ)


register(Architecture(
    hf_name="MixtralForCausalLM",
    genai_type="mistral",  # onnxruntime-genai 0.18 knows no "mixtral"; the MoE is inside the graph, its decoder loop is Mistral's
    gguf_arch="",  # not exported to GGUF yet
    tensors={
        **{r: n for r, n in LLAMA_TENSORS.items() if r not in ("gate", "up", "down")},
        "router": "model.layers.{i}.block_sparse_moe.gate.weight",
        "expert_gate": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
        "expert_up": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
        "expert_down": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    },
    config={**LLAMA_LIKE_CONFIG, "sliding_window": "sliding_window", "num_experts": "num_local_experts",
            "experts_per_token": "num_experts_per_tok"},
    optional=TIED_LM_HEAD,
    skips=ROTARY_BUFFERS,
    quirks={"norm_topk": True},
    quirk_reasons={**MOE_REASONS, "norm_topk": "Mixtral always renormalises its top-2 weights"},
    awq_groups=_moe_awq("block_sparse_moe", "block_sparse_moe.experts", "w2"),
))

register(Architecture(
    hf_name="Qwen3MoeForCausalLM",
    genai_type="qwen3",  # onnxruntime-genai 0.18 knows no "qwen3_moe"; the MoE is inside the graph, its decoder loop is Qwen3's
    gguf_arch="",  # not exported to GGUF yet
    gguf_rope_interleaved=False,
    tensors={
        **{r: n for r, n in LLAMA_TENSORS.items() if r not in ("gate", "up", "down")},
        "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
        "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
        "router": "model.layers.{i}.mlp.gate.weight",
        "expert_gate": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
        "expert_up": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
        "expert_down": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    },
    config={**LLAMA_LIKE_CONFIG, "inter_size": "moe_intermediate_size", "sliding_window": "sliding_window",
            "use_sliding_window": "use_sliding_window",
            "num_experts": ("num_experts", "num_local_experts"),  # transformers 5 saves the latter
            "experts_per_token": "num_experts_per_tok", "norm_topk": "norm_topk_prob"},
    defaults={"norm_topk_prob": False},
    unsupported=ATTENTION_BIAS,
    optional=TIED_LM_HEAD,
    skips=ROTARY_BUFFERS,
    quirks={"qk_norm": True},
    quirk_reasons={**MOE_REASONS, "qk_norm": "Qwen3 RMS-normalises each q/k head before rotary",
                   "inter_size": "an expert's FFN width is moe_intermediate_size (intermediate_size is for dense layers)"},
    awq_groups=_moe_awq("mlp", "mlp.experts", "down_proj"),
))


def get_architecture(hf_name: str) -> Architecture:
    try:
        return ARCHITECTURES[hf_name]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"architecture {hf_name!r} is not supported (supported: {supported}); see docs/architectures.md to add one"
        ) from None
