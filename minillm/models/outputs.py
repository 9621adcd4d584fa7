"""`MiniLLMOutput`: what the forward of every minillm model returns (the contract in docs/design.md).

transformers 5.x renamed the cache of model outputs from `past_key_values` to `cache` (and `generate()` reads
`outputs["cache"]` between steps), so the field is `cache`; `past_key_values` stays available as a read-only alias
and is accepted by the constructor (transformers renames it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class MiniLLMOutput(ModelOutput):
    """Forward output of all `*ForCausalLM` models of minillm.

    Attributes:
        loss: the total to backpropagate (LM loss + weighted auxiliary terms); None without `labels`.
        logits: (B, L', V) next-token logits for the kept positions; None when `labels` is given (the chunked loss
            never builds them all).
        cache: the cache after this forward (None without `use_cache`); also readable as `past_key_values`.
        aux_losses: detached, unweighted loss terms for logging, e.g. `lm`, `mtp`, `seq_aux`, `router_aux` (models
            always set a dict, empty without labels; the dataclass default is None only because ModelOutput
            requires None defaults).
        expert_counts: (n_moe_layers, n_experts) float, tokens routed to each expert in this forward (detached);
            None for dense models.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    expert_counts: torch.Tensor | None = None

    @property
    def past_key_values(self) -> object | None:
        """The cache, under the name of transformers 4.x and of docs/design.md."""
        return self.cache
