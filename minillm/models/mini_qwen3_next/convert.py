"""Conversion between mini_qwen3_next and transformers' `Qwen3NextForCausalLM`.

The parameter names and layouts are identical by construction (fused `in_proj_qkvz` / `in_proj_ba`, interleaved
query/gate `q_proj`, fused 3-D experts), so converting is: translate the config field by field, build the other
class, and copy the state dict. `from_reference(to_reference(m))` reproduces every tensor bit for bit.

The reference adds the router balance loss to its `loss` only with `output_router_logits=True`, ours only in
training mode; `to_reference` leaves it off, so an exported model's loss is the LM loss, as ours is in evaluation.
"""

from __future__ import annotations

from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

from minillm.models.export import convert_model, own_fields, restored_own_fields
from minillm.models.mini_qwen3_next.configuration_mini_qwen3_next import MiniQwen3NextConfig
from minillm.models.mini_qwen3_next.modeling_mini_qwen3_next import MiniQwen3NextForCausalLM

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
    "linear_conv_kernel_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "decoder_sparse_step",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_experts_per_tok",
    "num_experts",
    "norm_topk_prob",
    "router_aux_loss_coef",
    "bos_token_id",
    "eos_token_id",
    "use_cache",
)
# Our fields the reference config lacks: kept in the export's config.json (`export.OWN_FIELDS_KEY`).
_OWN_FIELDS = ("full_attention_interval", "linear_chunk_size", "loss_chunk_size")


def to_reference_config(config: MiniQwen3NextConfig) -> Qwen3NextConfig:
    """The `Qwen3NextConfig` describing the same network."""
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    # No pad_token_id in the model config: Qwen3NextModel would make it the embedding's `padding_idx`, and since
    # our pad is eos (id 0), fine-tuning the export with transformers would silently freeze the eos embedding.
    # Generation keeps the pad id through generation_config.json and the tokenizer.
    return Qwen3NextConfig(
        **fields,
        pad_token_id=None,
        layer_types=list(config.layer_types),
        mlp_only_layers=list(config.mlp_only_layers),
        rope_parameters=dict(config.rope_parameters),
        hidden_act="silu",
        attention_bias=False,
        output_router_logits=False,
        architectures=["Qwen3NextForCausalLM"],
        **own_fields(config, _OWN_FIELDS),
    )


def from_reference_config(config: Qwen3NextConfig) -> MiniQwen3NextConfig:
    """The `MiniQwen3NextConfig` of a `Qwen3NextConfig`; rejects features mini_qwen3_next does not have."""
    if config.hidden_act != "silu" or config.attention_bias:
        raise ValueError("mini_qwen3_next supports only SiLU activations and attention without biases")
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    pad = config.pad_token_id if config.pad_token_id is not None else MiniQwen3NextConfig().pad_token_id
    fields.update(restored_own_fields(config, _OWN_FIELDS))
    return MiniQwen3NextConfig(
        **fields,
        pad_token_id=pad,
        layer_types=list(config.layer_types),
        mlp_only_layers=list(config.mlp_only_layers or []),
        rope_parameters=dict(config.rope_parameters),
    )


def export_notes(config: MiniQwen3NextConfig) -> list[str]:
    """What a user of the exported checkpoint should know that the export cannot fix (`minillm export` prints it)."""
    if "full_attention" not in config.layer_types:
        return [
            "no layer has full attention: transformers' Qwen3NextForCausalLM computes this model's logits, but its "
            "cache (and so generate()) needs at least one full-attention layer"
        ]
    return []


def to_reference(model: MiniQwen3NextForCausalLM) -> Qwen3NextForCausalLM:
    """A `Qwen3NextForCausalLM` with the same config and weights (same dtype, device and train/eval mode)."""
    return convert_model(model, Qwen3NextForCausalLM, to_reference_config(model.config))


def from_reference(ref: Qwen3NextForCausalLM) -> MiniQwen3NextForCausalLM:
    """A `MiniQwen3NextForCausalLM` with the same config and weights as a `Qwen3NextForCausalLM`."""
    return convert_model(ref, MiniQwen3NextForCausalLM, from_reference_config(ref.config))
