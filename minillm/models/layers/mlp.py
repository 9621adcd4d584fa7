"""SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

Used as the dense MLP of every layer in mini_llama3, the dense layers and shared experts of mini_deepseekv3, and the
shared expert of mini_qwen3_next. Parameter names `gate_proj` / `up_proj` / `down_proj` are the ones of the
transformers reference models, so checkpoints convert by a plain copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillm.models.layers.linear import Linear


class SwiGLUMLP(nn.Module):
    """Gated MLP with SiLU activation (Shazeer 2020), no biases.

    Args:
        hidden_size: model width D.
        intermediate_size: inner width F.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (..., F) inside
