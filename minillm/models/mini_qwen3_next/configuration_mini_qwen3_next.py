"""Configuration of mini_qwen3_next: the hybrid Gated DeltaNet / gated-attention MoE architecture of Qwen3-Next.

Field names and meanings are those of transformers' `Qwen3NextConfig`, so a config converts to the reference by
copying fields (`convert.py`). Two fields are ours: `linear_chunk_size` (chunk length of the chunked delta rule, a
speed knob with no effect on the numbers) and `loss_chunk_size` (tokens per chunk of the chunked cross-entropy).
It is a transformers 5.x dataclass config: the fields below are the `__init__` keywords and `__post_init__`
validates, raising `ValueError` that names the offending field.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

LAYER_TYPES = ("linear_attention", "full_attention")


class MiniQwen3NextConfig(PreTrainedConfig):
    """Qwen3-Next at small scale.

    Args (besides those of `PreTrainedConfig`):
        vocab_size: number of token ids (32,004 for the default tokenizer).
        hidden_size: model width D.
        intermediate_size: SwiGLU inner width of the dense MLP (layers listed in `mlp_only_layers`, or all layers
            when `num_experts` is 0).
        num_hidden_layers: decoder layers.
        layer_types: per layer `"linear_attention"` (Gated DeltaNet) or `"full_attention"` (gated softmax
            attention). Default: every `full_attention_interval`-th layer is full attention (3:1 with 4).
        full_attention_interval: period of the default layer pattern (ignored when `layer_types` is given).
        num_attention_heads: query heads of the full-attention layers.
        num_key_value_heads: key/value heads of the full-attention layers (GQA); must divide the query heads.
        head_dim: per-head width of the full-attention layers; default `hidden_size // num_attention_heads`.
        partial_rotary_factor: fraction of each head's channels rotated by RoPE (Qwen3-Next: 0.25).
        rope_parameters: transformers' RoPE dict (`rope_type`, `rope_theta`, `partial_rotary_factor`, ...).
        linear_num_key_heads: query/key heads Hk of the Gated DeltaNet layers.
        linear_num_value_heads: value heads H of the Gated DeltaNet layers (a multiple of Hk); each has its own
            recurrent state of Dk x Dv.
        linear_key_head_dim: Dk.
        linear_value_head_dim: Dv.
        linear_conv_kernel_dim: width K of the short causal convolution over q, k and v.
        linear_chunk_size: chunk length of the chunkwise-parallel delta rule (speed only).
        num_experts: routed experts E per MoE layer (0: dense MLP everywhere).
        num_experts_per_tok: experts K chosen per token (softmax router, top-k).
        norm_topk_prob: renormalise the K chosen probabilities to sum to 1.
        moe_intermediate_size: inner width of each routed expert.
        shared_expert_intermediate_size: inner width of the always-on shared expert (its output is scaled by a
            learned per-token sigmoid gate).
        decoder_sparse_step: layer i is MoE when `(i + 1) % decoder_sparse_step == 0` (and not in
            `mlp_only_layers`).
        mlp_only_layers: layer indices that use the dense MLP instead of MoE.
        router_aux_loss_coef: weight of the Switch-Transformer load-balancing loss added to the LM loss.
        max_position_embeddings: the longest sequence the model is meant for.
        rms_norm_eps: epsilon of every RMSNorm.
        attention_dropout: dropout on attention probabilities during training.
        initializer_range: std of the normal initialisation of linear, embedding and expert weights.
        tie_word_embeddings: share the input embedding with the output head.
        loss_chunk_size: tokens per chunk of the chunked cross-entropy (see `layers/loss.py`); None:
            1,024, on a CUDA GPU enough for 256M logits (8,192 at the presets' 32k vocabulary).
    """

    model_type = "mini_qwen3_next"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    default_theta = 10_000.0

    vocab_size: int = 32004
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    layer_types: list[str] | None = None
    full_attention_interval: int = 4
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    rope_parameters: dict | None = None
    linear_num_key_heads: int = 6
    linear_num_value_heads: int = 12
    linear_key_head_dim: int = 64
    linear_value_head_dim: int = 64
    linear_conv_kernel_dim: int = 4
    linear_chunk_size: int = 64
    num_experts: int = 16
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 192
    shared_expert_intermediate_size: int = 384
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    router_aux_loss_coef: float = 0.001
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    loss_chunk_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        kwargs.setdefault("partial_rotary_factor", 0.25)  # Qwen3-Next rotates a quarter of each head
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.mlp_only_layers = [] if self.mlp_only_layers is None else [int(i) for i in self.mlp_only_layers]
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "full_attention_interval",
            "num_attention_heads", "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads",
            "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "linear_chunk_size",
            "moe_intermediate_size", "decoder_sparse_step", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"mini_qwen3_next: {name} must be a positive integer, got {value!r}")
        chunk = self.loss_chunk_size
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0):
            raise ValueError(f"mini_qwen3_next: loss_chunk_size must be a positive integer or None, got {chunk!r}")
        for name in ("num_experts", "num_experts_per_tok", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"mini_qwen3_next: {name} must be a non-negative integer, got {value!r}")

        if self.layer_types is None:
            interval = self.full_attention_interval
            self.layer_types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"mini_qwen3_next: layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers (num_hidden_layers)"
            )
        unknown = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if unknown:
            raise ValueError(
                f"mini_qwen3_next: unknown layer type(s) {', '.join(map(repr, unknown))} in layer_types; "
                f"known: {', '.join(LAYER_TYPES)}"
            )
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad_layers:
            raise ValueError(
                f"mini_qwen3_next: mlp_only_layers {bad_layers} out of range for {self.num_hidden_layers} layers"
            )

        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"mini_qwen3_next: num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                    f"({self.hidden_size}) (or set head_dim explicitly)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"mini_qwen3_next: head_dim must be a positive even number, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"mini_qwen3_next: num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"mini_qwen3_next: linear_num_key_heads ({self.linear_num_key_heads}) must divide "
                f"linear_num_value_heads ({self.linear_num_value_heads})"
            )
        if self.num_experts > 0:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"mini_qwen3_next: num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                    f"num_experts ({self.num_experts})"
                )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"mini_qwen3_next: attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"mini_qwen3_next: router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")

        super().__post_init__(**kwargs)
        factor = self.rope_parameters.get("partial_rotary_factor", 1.0)
        rotary_dim = int(self.head_dim * factor)
        if not 0.0 < factor <= 1.0 or rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(
                f"mini_qwen3_next: partial_rotary_factor {factor} x head_dim {self.head_dim} must give a positive "
                f"even number of rotary channels, got {rotary_dim}"
            )

    @property
    def rotary_dim(self) -> int:
        """Channels per head rotated by RoPE (`head_dim * partial_rotary_factor`)."""
        return int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` uses the sparse MoE block (else the dense SwiGLU MLP)."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )
