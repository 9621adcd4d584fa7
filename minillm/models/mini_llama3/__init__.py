"""mini_llama3: dense Llama 3 (RMSNorm, RoPE, grouped-query attention, SwiGLU, optional tied embeddings)."""

from minillm.models.mini_llama3.configuration_mini_llama3 import MiniLlama3Config
from minillm.models.mini_llama3.convert import from_reference, to_reference
from minillm.models.mini_llama3.modeling_mini_llama3 import MiniLlama3ForCausalLM, MiniLlama3Model

CONFIG_CLASS = MiniLlama3Config
MODEL_CLASS = MiniLlama3ForCausalLM

PRESETS: dict[str, dict] = {
    # 3.5M parameters (3.1M of them the tied 32k embedding): for CPU, tests and the quick start.
    "tiny": dict(
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # 12.9M parameters (8.2M of them the tied 32k embedding): the size that learns from real text on a CPU (3.3M
    # tokens in 10 minutes on two cores: README "The three architectures on real text").
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # 124.7M parameters: the seed's size (hidden 768, 12 layers, 12 heads) with Llama 3's GQA (4 kv heads) and
    # untied embeddings.
    "base": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}

__all__ = [
    "CONFIG_CLASS",
    "MODEL_CLASS",
    "PRESETS",
    "MiniLlama3Config",
    "MiniLlama3ForCausalLM",
    "MiniLlama3Model",
    "from_reference",
    "to_reference",
]
