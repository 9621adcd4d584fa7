"""Configuration of mini_llama3: the dense Llama 3 architecture.

Field names and meanings are those of transformers' `LlamaConfig`, so a config converts to the reference by copying
fields (`convert.py`). It is a transformers 5.x dataclass config: the fields below are the `__init__` keywords,
unknown keywords are kept as attributes (as for every `PreTrainedConfig`), and `__post_init__` validates.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class MiniLlama3Config(PreTrainedConfig):
    """Llama 3: RMSNorm, RoPE (theta 500k), grouped-query attention, SwiGLU MLP, optionally tied embeddings.

    Args (besides those of `PreTrainedConfig`):
        vocab_size: number of token ids (32,004 for the default tokenizer).
        hidden_size: model width D.
        intermediate_size: SwiGLU inner width.
        num_hidden_layers: decoder layers.
        num_attention_heads: query heads; must divide `hidden_size` unless `head_dim` is given.
        num_key_value_heads: key/value heads (grouped-query attention); must divide `num_attention_heads`.
            Default: `num_attention_heads` (plain multi-head attention).
        head_dim: per-head width; default `hidden_size // num_attention_heads`.
        max_position_embeddings: the longest sequence the model is meant for (used by generation defaults).
        rms_norm_eps: RMSNorm epsilon.
        rope_parameters: transformers' RoPE dict (`rope_type`, `rope_theta`, ...); `rope_theta=...` is accepted
            too. Default: plain RoPE with theta 500,000 (Llama 3).
        attention_dropout: dropout on attention probabilities during training.
        initializer_range: std of the normal initialisation of linear and embedding weights.
        tie_word_embeddings: share the input embedding with the output head.
        loss_chunk_size: tokens per chunk of the chunked cross-entropy (see `layers/loss.py`); None:
            1,024, on a CUDA GPU enough for 256M logits (8,192 at the presets' 32k vocabulary).
    """

    model_type = "mini_llama3"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    default_theta = 500_000.0

    vocab_size: int = 32004
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    loss_chunk_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"mini_llama3: {name} must be a positive integer, got {value!r}")
        chunk = self.loss_chunk_size
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0):
            raise ValueError(f"mini_llama3: loss_chunk_size must be a positive integer or None, got {chunk!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"mini_llama3: num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                    f"({self.hidden_size}) (or set head_dim explicitly)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(
                f"mini_llama3: head_dim must be a positive even number (RoPE pairs), got {self.head_dim}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"mini_llama3: num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(
                f"mini_llama3: attention_dropout must be in [0, 1), got {self.attention_dropout}"
            )
        super().__post_init__(**kwargs)
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type != "default" and "factor" not in self.rope_parameters:
            raise ValueError(f"mini_llama3: rope_parameters of type {rope_type!r} need a 'factor'")
