"""Conversion between mini_llama3 and transformers' `LlamaForCausalLM`.

The parameter names are identical by construction, so converting is: translate the config field by field, build
the other class, and copy the state dict. `to_reference(from_reference(m))` reproduces every tensor bit for bit.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from minillm.models.export import convert_model, own_fields, restored_own_fields
from minillm.models.mini_llama3.configuration_mini_llama3 import MiniLlama3Config
from minillm.models.mini_llama3.modeling_mini_llama3 import MiniLlama3ForCausalLM

# Fields with the same name and meaning in both configs.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "attention_dropout",
    "initializer_range",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "use_cache",
)
# Our fields the reference config lacks: kept in the export's config.json (`export.OWN_FIELDS_KEY`).
_OWN_FIELDS = ("loss_chunk_size",)


def to_reference_config(config: MiniLlama3Config) -> LlamaConfig:
    """The `LlamaConfig` describing the same network (no biases, SiLU, same RoPE)."""
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    # No pad_token_id in the model config: LlamaModel would make it the embedding's `padding_idx`, and since our
    # pad is eos (id 0), fine-tuning the export with transformers would silently freeze the eos embedding.
    # Generation keeps the pad id through generation_config.json and the tokenizer.
    return LlamaConfig(
        **fields,
        pad_token_id=None,
        rope_parameters=dict(config.rope_parameters),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
        **own_fields(config, _OWN_FIELDS),
    )


def from_reference_config(config: LlamaConfig) -> MiniLlama3Config:
    """The `MiniLlama3Config` of a `LlamaConfig`; rejects features mini_llama3 does not have."""
    if config.hidden_act != "silu" or config.attention_bias or config.mlp_bias:
        raise ValueError("mini_llama3 supports only SiLU MLPs without biases and attention without biases")
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    pad = config.pad_token_id if config.pad_token_id is not None else MiniLlama3Config().pad_token_id
    fields.update(restored_own_fields(config, _OWN_FIELDS))
    return MiniLlama3Config(**fields, pad_token_id=pad, rope_parameters=dict(config.rope_parameters))


def to_reference(model: MiniLlama3ForCausalLM) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` with the same config and weights (same dtype and device)."""
    return convert_model(model, LlamaForCausalLM, to_reference_config(model.config))


def from_reference(ref: LlamaForCausalLM) -> MiniLlama3ForCausalLM:
    """A `MiniLlama3ForCausalLM` with the same config and weights as a `LlamaForCausalLM`."""
    return convert_model(ref, MiniLlama3ForCausalLM, from_reference_config(ref.config))
