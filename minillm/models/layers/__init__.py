"""Shared building blocks of the model zoo.

- `norm`: RMSNorm (and its zero-centered Qwen3-Next variant)
- `rope`: rotary embeddings (partial rotary, rotate-half and interleaved layouts)
- `attention`: causal attention with GQA, padding, KV cache and packed documents (SDPA; flash-attn varlen or
  flex_attention on CUDA; `math_attention` for short rows on the CPU)
- `math_attention`: attention as two batched matmuls around a softmax, with its own backward (the CPU kernel)
- `linear`: `nn.Linear` with its fp32 CPU matmuls in oneDNN (twice MKL's rate on AMD Zen 5)
- `mlp`: SwiGLU feed-forward
- `loss`: chunked cross-entropy through the output head
- `moe`: routed experts with grouped matmuls (used by the two MoE models)
- `kernel_choice`: the pin behind `force_attention_backend` / `force_cpu_matmul` and their environment variables
"""

from minillm.models.layers.attention import (
    PackedDocs,
    build_attention_mask,
    document_ids_from_position_ids,
    force_attention_backend,
    has_document_restarts,
    position_ids_from_cu_seqlens,
    prepare_attention,
    sdpa_attention,
    varlen_index,
)
from minillm.models.layers.linear import Linear, force_cpu_matmul
from minillm.models.layers.loss import (
    IGNORE_INDEX,
    LMHead,
    chunked_cross_entropy,
    shift_targets,
)
from minillm.models.layers.mlp import SwiGLUMLP
from minillm.models.layers.norm import RMSNorm
from minillm.models.layers.rope import RotaryEmbedding, apply_rotary, rotate_half

__all__ = [
    "IGNORE_INDEX",
    "LMHead",
    "Linear",
    "PackedDocs",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLUMLP",
    "apply_rotary",
    "build_attention_mask",
    "chunked_cross_entropy",
    "document_ids_from_position_ids",
    "force_attention_backend",
    "force_cpu_matmul",
    "has_document_restarts",
    "position_ids_from_cu_seqlens",
    "prepare_attention",
    "rotate_half",
    "sdpa_attention",
    "shift_targets",
    "varlen_index",
]
