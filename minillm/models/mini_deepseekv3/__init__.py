"""mini_deepseekv3: DeepSeek-V3 (Multi-head Latent Attention, DeepSeekMoE with aux-loss-free balancing, MTP)."""

from minillm.models.mini_deepseekv3.configuration_mini_deepseekv3 import MiniDeepSeekV3Config
from minillm.models.mini_deepseekv3.convert import from_reference, to_reference
from minillm.models.mini_deepseekv3.modeling_mini_deepseekv3 import (
    MiniDeepSeekV3ForCausalLM,
    MiniDeepSeekV3Model,
    MLACache,
)

CONFIG_CLASS = MiniDeepSeekV3Config
MODEL_CLASS = MiniDeepSeekV3ForCausalLM

PRESETS: dict[str, dict] = {
    # 2.6M parameters (2.0M of them the tied 32k embedding): for CPU, tests and the quick start.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_dense_layers=1,
        num_attention_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # The CPU size for real text, as mini_llama3's `small`: hidden 256, 6 layers (the first dense), 8 routed experts.
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=256,
        num_hidden_layers=6,
        num_dense_layers=1,
        num_attention_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # About the seed's size: 174.9M parameters (164.7M without the MTP module), 101.0M activated per token.
    "base": dict(
        hidden_size=768,
        intermediate_size=3072,
        moe_intermediate_size=512,
        num_hidden_layers=12,
        num_dense_layers=3,
        num_attention_heads=12,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
}

__all__ = [
    "CONFIG_CLASS",
    "MODEL_CLASS",
    "PRESETS",
    "MLACache",
    "MiniDeepSeekV3Config",
    "MiniDeepSeekV3ForCausalLM",
    "MiniDeepSeekV3Model",
    "from_reference",
    "to_reference",
]
