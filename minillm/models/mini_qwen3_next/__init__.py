"""mini_qwen3_next: hybrid Qwen3-Next (Gated DeltaNet + gated attention, 3:1) with a shared-expert MoE."""

from minillm.models.mini_qwen3_next.configuration_mini_qwen3_next import MiniQwen3NextConfig
from minillm.models.mini_qwen3_next.convert import export_notes, from_reference, to_reference
from minillm.models.mini_qwen3_next.modeling_mini_qwen3_next import (
    MiniQwen3NextForCausalLM,
    MiniQwen3NextModel,
)

CONFIG_CLASS = MiniQwen3NextConfig
MODEL_CLASS = MiniQwen3NextForCausalLM

PRESETS: dict[str, dict] = {
    # For CPU, tests and the quick start: 4 layers (3 DeltaNet + 1 gated attention), 8 experts of which 2 per
    # token plus the shared one; most of the parameters are the tied 32k embedding. DeltaNet chunks of 32 are
    # about 5% faster than 64 on CPU (64, the reference's, suits GPUs better).
    "tiny": dict(
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        linear_chunk_size=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # The CPU size for real text, as mini_llama3's `small`: hidden 256, 6 layers (5 DeltaNet + 1 gated attention).
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=512,
        linear_chunk_size=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # The seed's size (hidden 768, 12 layers, 12 heads): 9 DeltaNet + 3 gated-attention layers, 16 experts of which
    # 4 per token plus a shared expert, untied embeddings.
    "base": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        linear_num_key_heads=6,
        linear_num_value_heads=12,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=192,
        shared_expert_intermediate_size=384,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}

__all__ = [
    "CONFIG_CLASS",
    "MODEL_CLASS",
    "PRESETS",
    "MiniQwen3NextConfig",
    "MiniQwen3NextForCausalLM",
    "MiniQwen3NextModel",
    "export_notes",
    "from_reference",
    "to_reference",
]
