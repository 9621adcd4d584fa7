"""`MiniLLMPreTrainedModel`: the `PreTrainedModel` base shared by the three architectures.

It only adds what transformers' generic base cannot guess about our shared layers:
- weight init: normal(0, `initializer_range`) for linear and embedding weights (transformers' default) and for
  the fused expert weights of `RoutedExperts`, RMSNorm
  weights at identity scale (ones, or zeros for the zero-centered variant, which transformers' name-based default
  would get wrong), and RoPE frequencies recomputed (they are non-persistent buffers, rebuilt after meta-device
  loading);
- the flags that let `generate()`, gradient checkpointing and SDPA dispatch treat our models like native ones;
- the small steps every `ForCausalLM.forward` shares (cache alias and default, padding kept out of the labels,
  `logits_to_keep`), so the three architectures cannot drift apart on them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from minillm.models.layers.loss import IGNORE_INDEX
from minillm.models.layers.moe import RoutedExperts
from minillm.models.layers.norm import RMSNorm
from minillm.models.layers.rope import RotaryEmbedding
from minillm.models.layers.tensor_memo import with_host_copy


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
        elif isinstance(module, RoutedExperts):  # fused 3-D expert weights: not an nn.Linear transformers knows
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)

    def _resolve_cache(self, cache, past_key_values, use_cache: bool | None, labels: torch.Tensor | None):
        """(cache, use_cache) for a forward: transformers 5.x `generate()` passes the cache as `cache`, older
        callers as `past_key_values`; by default a cache is built only for inference (no labels, eval mode)."""
        if cache is None:
            cache = past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and labels is None and not self.training
        return cache, use_cache

    def _logits(self, hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """Logits of the kept positions: all (0), the last `n` (int n), or the given indices (tensor)."""
        if isinstance(logits_to_keep, int):
            kept = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states  # (B, n, D)
        else:
            kept = hidden_states[:, logits_to_keep]  # explicit indices
        return self.lm_head(kept)  # (B, n, V)


def mask_padding_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`labels` (B, L) with -100 where `attention_mask` (B, P + L) marks padding: padding is never a target.

    The collators already do this, but a hand-made batch with `labels=input_ids` would otherwise train on
    predicting the pad token (and, with right padding, on the transition from the last real token into it).
    A 4-D (prepared) mask carries no per-token padding and is left alone.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return labels
    return with_host_copy(lambda lab, mask: lab.masked_fill(mask[:, -lab.shape[1] :] == 0, IGNORE_INDEX),
                          labels, attention_mask)
