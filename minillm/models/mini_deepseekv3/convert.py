"""Conversion between mini_deepseekv3 and transformers' `DeepseekV3ForCausalLM`.

The parameter names are identical by construction (MLA projections, `mlp.gate.weight`, the balancing bias as
`mlp.gate.e_score_correction_bias`, fused `mlp.experts.gate_up_proj` / `down_proj`, `mlp.shared_experts.*`), so
converting is: translate the config, build the other class, copy the state dict. Differences:
- the MTP module (`mtp.*`) is training-only and has no counterpart in the reference: it is left out of
  `to_reference`, and `from_reference` builds a model without one (`num_mtp_layers=0`) unless asked otherwise;
- the training-only knobs (`bias_update_speed`, `seq_aux_alpha`, `mtp_loss_lambda`) do not exist in the reference
  config: the export keeps them under the config's `minillm` key, `from_reference` restores them from there (our
  defaults for a checkpoint that never was a minillm model; keyword arguments override both).
"""

from __future__ import annotations

from typing import Any

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from minillm.models.export import convert_model, own_fields, restored_own_fields
from minillm.models.mini_deepseekv3.configuration_mini_deepseekv3 import MiniDeepSeekV3Config
from minillm.models.mini_deepseekv3.modeling_mini_deepseekv3 import MiniDeepSeekV3ForCausalLM

# Fields with the same name and meaning in both configs.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_shared_experts",
    "n_routed_experts",
    "routed_scaling_factor",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "v_head_dim",
    "qk_nope_head_dim",
    "n_group",
    "topk_group",
    "num_experts_per_tok",
    "norm_topk_prob",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_interleave",
    "attention_bias",
    "attention_dropout",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "use_cache",
)
# Our fields the reference config lacks: kept in the export's config.json (`export.OWN_FIELDS_KEY`).
# `num_mtp_layers` is not among them: the export drops the MTP weights, so the way back has no MTP module.
_OWN_FIELDS = ("bias_update_speed", "seq_aux_alpha", "mtp_loss_lambda", "loss_chunk_size")
MTP_PREFIX = "mtp."


def to_reference_config(config: MiniDeepSeekV3Config) -> DeepseekV3Config:
    """The `DeepseekV3Config` of the same network without the MTP module."""
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    # No pad_token_id in the model config: DeepseekV3Model would make it the embedding's `padding_idx`, and since
    # our pad is eos (id 0), fine-tuning the export with transformers would silently freeze the eos embedding.
    # Generation keeps the pad id through generation_config.json and the tokenizer.
    return DeepseekV3Config(
        **fields,
        pad_token_id=None,
        num_key_value_heads=config.num_attention_heads,
        first_k_dense_replace=config.num_dense_layers,
        rope_parameters=dict(config.rope_parameters),
        hidden_act="silu",
        num_mtp_layers=0,
        architectures=["DeepseekV3ForCausalLM"],
        **own_fields(config, _OWN_FIELDS),
    )


def from_reference_config(config: DeepseekV3Config, **overrides: Any) -> MiniDeepSeekV3Config:
    """The `MiniDeepSeekV3Config` of a `DeepseekV3Config` (no MTP unless `num_mtp_layers=1` is passed)."""
    if config.hidden_act != "silu":
        raise ValueError(f"mini_deepseekv3 supports only SiLU experts, got hidden_act={config.hidden_act!r}")
    if config.num_key_value_heads != config.num_attention_heads:
        raise ValueError("mini_deepseekv3: MLA needs num_key_value_heads == num_attention_heads")
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    pad = config.pad_token_id if config.pad_token_id is not None else MiniDeepSeekV3Config().pad_token_id
    fields.update(
        pad_token_id=pad,
        num_dense_layers=config.first_k_dense_replace,
        rope_parameters=dict(config.rope_parameters),
        num_mtp_layers=0,
    )
    fields.update(restored_own_fields(config, _OWN_FIELDS))
    fields.update(overrides)
    return MiniDeepSeekV3Config(**fields)


def to_reference(model: MiniDeepSeekV3ForCausalLM) -> DeepseekV3ForCausalLM:
    """A `DeepseekV3ForCausalLM` with the same config and weights (MTP dropped; same dtype and device)."""
    return convert_model(model, DeepseekV3ForCausalLM, to_reference_config(model.config), skip=(MTP_PREFIX,))


def from_reference(ref: DeepseekV3ForCausalLM, **overrides: Any) -> MiniDeepSeekV3ForCausalLM:
    """A `MiniDeepSeekV3ForCausalLM` with the config and weights of a `DeepseekV3ForCausalLM`.

    `overrides` set config fields the reference lacks (e.g. `num_mtp_layers=1` to continue pretraining with MTP).
    """
    return convert_model(ref, MiniDeepSeekV3ForCausalLM, from_reference_config(ref.config, **overrides),
                         skip=(MTP_PREFIX,))
