"""`MiniLLMPreTrainedModel`: the `PreTrainedModel` base shared by the three architectures.

It only adds what transformers' generic base cannot guess about our shared layers:
- weight init: normal(0, `initializer_range`) for linear and embedding weights (transformers' default), RMSNorm
  weights at identity scale (ones, or zeros for the zero-centered variant, which transformers' name-based default
  would get wrong), and RoPE frequencies recomputed (they are non-persistent buffers, rebuilt after meta-device
  loading);
- the flags that let `generate()`, gradient checkpointing and SDPA dispatch treat our models like native ones.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from minillm.models.layers.norm import RMSNorm
from minillm.models.layers.rope import RotaryEmbedding


class MiniLLMPreTrainedModel(PreTrainedModel):
    """Common base: init rules for the shared layers; subclasses set `config_class` and `_no_split_modules`."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, RMSNorm):
            init.constant_(module.weight, 0.0 if module.zero_centered else 1.0)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.initial_inv_freq)
        else:
            super()._init_weights(module)
