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

Adding a family is adding an entry; see docs/architectures.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmkiln.errors import UnsupportedArchitectureError

# Engine roles. Global roles appear once; layer roles once per decoder layer.
GLOBAL_ROLES = ("embed", "final_norm", "lm_head")
LAYER_ROLES = (
    "attn_norm", "ffn_norm",
    "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm",
    "gate", "up", "down",
)
# Roles whose HF tensor is a linear weight (out, in), the ones quantize acts on.
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


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

    def hf_name_of(self, role: str, layer: int | None = None) -> str | None:
        t = self.tensors.get(role)
        return None if t is None else t.format(i=layer)

    def module_of(self, role: str) -> str:
        """The HF module path of a linear role relative to its decoder layer, e.g. 'self_attn.q_proj'."""
        name = self.tensors[role]
        prefix = self.tensors["attn_norm"].split("{i}")[0] + "{i}."
        return name[len(prefix):].rsplit(".", 1)[0]

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
    config={**LLAMA_LIKE_CONFIG, "sliding_window": "sliding_window", "use_sliding_window": "use_sliding_window",
            "attn_bias": "attention_bias"},
    optional=TIED_LM_HEAD,
    skips=ROTARY_BUFFERS,
    quirks={"qk_norm": True},
    quirk_reasons={
        "qk_norm": "Qwen3 RMS-normalises each q/k head before rotary; the norm weights are permuted like the rows",
        "size_per_head": "Qwen3 sets head_dim explicitly, not hidden_size / heads",
    },
    awq_groups=LLAMA_AWQ,
))


def get_architecture(hf_name: str) -> Architecture:
    try:
        return ARCHITECTURES[hf_name]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"architecture {hf_name!r} is not supported (supported: {supported}); see docs/architectures.md to add one"
        ) from None
