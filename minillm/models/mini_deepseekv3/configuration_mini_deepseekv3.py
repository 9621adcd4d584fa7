"""Configuration of mini_deepseekv3: Multi-head Latent Attention, DeepSeekMoE and multi-token prediction.

Field names follow transformers' `DeepseekV3Config` wherever the reference has the concept (`q_lora_rank`,
`kv_lora_rank`, `n_routed_experts`, `n_group`, `topk_group`, `routed_scaling_factor`, ...), so conversion copies
fields. The exceptions are named after what they mean in this project: `num_dense_layers` (the reference's
`first_k_dense_replace`, readable under that name too), and the training-only knobs the reference lacks:
`bias_update_speed` (aux-loss-free balancing), `seq_aux_alpha` (sequence-level balance loss), `num_mtp_layers` and
`mtp_loss_lambda` (multi-token prediction). It is a transformers 5.x dataclass config: the fields are the
`__init__` keywords and `__post_init__` validates, raising `ValueError` with the offending field.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class MiniDeepSeekV3Config(PreTrainedConfig):
    """DeepSeek-V3 at small scale.

    Args (besides those of `PreTrainedConfig`):
        vocab_size: number of token ids (32,004 for the default tokenizer).
        hidden_size: model width D.
        intermediate_size: SwiGLU inner width of the dense layers (the first `num_dense_layers`) and of the MTP block.
        moe_intermediate_size: inner width I of each routed (and shared) expert.
        num_hidden_layers: decoder layers.
        num_dense_layers: the first layers use a dense MLP instead of MoE (DeepSeek-V3 uses 3 of 61).
        num_attention_heads: query heads H (MLA has no separate key/value heads: every head reads the latent).
        q_lora_rank: width of the compressed query (None: a plain `q_proj`).
        kv_lora_rank: width of the compressed key/value latent, the part of the KV cache that carries content.
        qk_nope_head_dim: per-head query/key channels without RoPE (expanded from the latent).
        qk_rope_head_dim: per-head query channels with RoPE; the key's RoPE part is one head shared by all heads and
            is cached next to the latent.
        v_head_dim: per-head value channels.
        n_routed_experts: routed experts E per MoE layer.
        n_shared_experts: always-on experts; they are fused into one SwiGLU of width
            `n_shared_experts * moe_intermediate_size`.
        num_experts_per_tok: routed experts K chosen per token.
        n_group: the routed experts are split into this many groups ...
        topk_group: ... and a token may only choose experts from its best `topk_group` groups (DeepSeek-V3 uses this
            to bound the number of devices a token is sent to).
        routed_scaling_factor: the chosen experts' weights are multiplied by this.
        norm_topk_prob: normalise the K chosen sigmoid scores to sum to 1 before scaling.
        bias_update_speed: step of the aux-loss-free balancing bias (`update_expert_bias`); 0 disables it.
        seq_aux_alpha: weight of the sequence-level balance loss (0 disables it).
        num_mtp_layers: multi-token prediction depth, 0 or 1 (training only; removed on export).
        mtp_loss_lambda: weight of the MTP loss.
        max_position_embeddings: the longest sequence the model is meant for.
        rms_norm_eps: RMSNorm epsilon.
        rope_parameters: transformers' RoPE dict (`rope_type`, `rope_theta`, ...); default plain RoPE, theta 10,000.
        rope_interleave: DeepSeek's RoPE layout (adjacent channel pairs) instead of rotate-half.
        attention_bias: biases on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj` (as the reference).
        attention_dropout: dropout on attention probabilities during training.
        initializer_range: std of the normal initialisation of linear, embedding and expert weights.
        tie_word_embeddings: share the input embedding with the output head.
        loss_chunk_size: tokens per chunk of the chunked cross-entropy (see `layers/loss.py`); None:
            1,024, on a CUDA GPU enough for 256M logits (8,192 at the presets' 32k vocabulary).
    """

    model_type = "mini_deepseekv3"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Descriptive names (n_expert_groups, n_limited_groups, route_scale) are aliases of the reference's fields.
    attribute_map = {
        "first_k_dense_replace": "num_dense_layers",
        "num_local_experts": "n_routed_experts",
        "n_expert_groups": "n_group",
        "n_limited_groups": "topk_group",
        "route_scale": "routed_scaling_factor",
    }
    default_theta = 10_000.0

    vocab_size: int = 32004
    hidden_size: int = 768
    intermediate_size: int = 2048
    moe_intermediate_size: int = 512
    num_hidden_layers: int = 12
    num_dense_layers: int = 1
    num_attention_heads: int = 12
    q_lora_rank: int | None = 384
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    bias_update_speed: float = 0.001
    seq_aux_alpha: float = 0.0001
    num_mtp_layers: int = 1
    mtp_loss_lambda: float = 0.1
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    loss_chunk_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        # Apply aliases (e.g. `first_k_dense_replace`) and RoPE standardisation first, then validate the result.
        super().__post_init__(**kwargs)
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
            "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"mini_deepseekv3: {name} must be a positive integer, got {value!r}")
        chunk = self.loss_chunk_size
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0):
            raise ValueError(f"mini_deepseekv3: loss_chunk_size must be a positive integer or None, got {chunk!r}")
        for name in ("qk_nope_head_dim", "n_shared_experts", "num_dense_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"mini_deepseekv3: {name} must be a non-negative integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"mini_deepseekv3: q_lora_rank must be a positive integer or None, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"mini_deepseekv3: qk_rope_head_dim must be even (RoPE pairs), got {self.qk_rope_head_dim}")
        if self.num_dense_layers > self.num_hidden_layers:
            raise ValueError(
                f"mini_deepseekv3: num_dense_layers ({self.num_dense_layers}) exceeds num_hidden_layers "
                f"({self.num_hidden_layers})"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"mini_deepseekv3: n_routed_experts ({self.n_routed_experts}) must be divisible by n_group "
                f"({self.n_group})"
            )
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ValueError(
                f"mini_deepseekv3: with n_group={self.n_group} groups each needs at least 2 of the "
                f"{self.n_routed_experts} routed experts (a group's score is the sum of its top 2, as in DeepSeek-V3)"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"mini_deepseekv3: topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"mini_deepseekv3: num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                f"({self.n_routed_experts})"
            )
        selectable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > selectable:
            raise ValueError(
                f"mini_deepseekv3: num_experts_per_tok ({self.num_experts_per_tok}) exceeds the {selectable} experts "
                f"in the topk_group={self.topk_group} allowed groups of {self.n_routed_experts // self.n_group}"
            )
        if self.num_mtp_layers not in (0, 1):
            raise ValueError(f"mini_deepseekv3: num_mtp_layers must be 0 or 1 (depth-1 MTP), got {self.num_mtp_layers}")
        for name in ("routed_scaling_factor",):
            if getattr(self, name) <= 0:
                raise ValueError(f"mini_deepseekv3: {name} must be positive, got {getattr(self, name)}")
        for name in ("bias_update_speed", "seq_aux_alpha", "mtp_loss_lambda"):
            if getattr(self, name) < 0:
                raise ValueError(f"mini_deepseekv3: {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"mini_deepseekv3: attention_dropout must be in [0, 1), got {self.attention_dropout}")
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type != "default" and "factor" not in self.rope_parameters:
            raise ValueError(f"mini_deepseekv3: rope_parameters of type {rope_type!r} need a 'factor'")

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: the content part plus the RoPE part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        """Decoder layers with a DeepSeekMoE block (the rows of `expert_counts`)."""
        return self.num_hidden_layers - self.num_dense_layers
