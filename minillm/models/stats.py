"""Parameter counts and training FLOPs per token, for `minillm info` and for MFU in the trainer.

Computed from the model itself (any architecture of the zoo; build it on the meta device to count without
allocating), with these conventions:
- `total`: every trained parameter, counted once when tied (includes the MTP module);
- `embedding`: the input embedding plus the output head when it is not tied to it;
- `mtp`: parameters under a module named `mtp` (DeepSeek-V3's multi-token prediction; dropped on export);
- `non_embedding`: `total - embedding - mtp`, the inference trunk;
- `activated`: parameters one token uses at inference (MTP excluded): routed experts (`layers.moe.RoutedExperts`)
  count only `num_experts_per_tok / num_experts` of their weights; shared experts and routers count fully; the
  embedding counts (DeepSeek's "37B activated" convention);
- `flops_per_token` (training, forward + backward) = 6 x activated non-embedding parameters (trunk and MTP)
  + 6 x head parameters per output head applied (1 + MTP depth) + attention score FLOPs of the softmax-attention
  layers at `seq_len`: 6 x heads x (qk_dim + v_dim) x seq_len per layer (QK^T and AV, forward 2 + backward 4,
  without halving for causality, as PaLM and nanochat count). Linear-attention (DeltaNet) state updates are
  counted only through their projection parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minillm.models.layers.moe import RoutedExperts


@dataclass(frozen=True)
class ModelStats:
    total: int
    embedding: int
    mtp: int
    non_embedding: int
    activated: int
    activated_non_embedding: int
    flops_per_token: int
    seq_len: int


def _is_mtp(name: str) -> bool:
    return "mtp" in name.split(".")


def softmax_attention_layers(config: Any) -> int:
    """Layers with softmax attention: all decoder layers, or the `full_attention` ones of `layer_types`; plus
    the MTP layers (each is a full decoder layer)."""
    layer_types = getattr(config, "layer_types", None)
    trunk = sum(t == "full_attention" for t in layer_types) if layer_types else config.num_hidden_layers
    return trunk + int(getattr(config, "num_mtp_layers", 0) or 0)


def attention_dims(config: Any) -> tuple[int, int, int]:
    """(heads, qk head dim, v head dim) of the softmax-attention layers (MLA: nope + rope for q.k)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "qk_nope_head_dim", None) is not None:
        qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    else:
        qk_dim = head_dim
    v_dim = getattr(config, "v_head_dim", None) or head_dim
    return heads, qk_dim, v_dim


def model_stats(model: nn.Module, seq_len: int | None = None) -> ModelStats:
    """Counts and training FLOPs per token of `model` at sequence length `seq_len` (default: the config's
    `max_position_embeddings`). Works on meta-device models."""
    config = model.config
    seq_len = int(seq_len or config.max_position_embeddings)
    params = dict(model.named_parameters())  # tied parameters appear once
    total = sum(p.numel() for p in params.values())
    mtp = sum(p.numel() for name, p in params.items() if _is_mtp(name))

    input_emb = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    head = output.weight if output is not None else input_emb
    tied = head is input_emb
    embedding = input_emb.numel() + (0 if tied else head.numel())
    non_embedding = total - embedding - mtp

    # Routed experts: only top-k of E experts run per token.
    top_k = getattr(config, "num_experts_per_tok", None)
    inactive_trunk = inactive_mtp = 0
    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            weights = sum(p.numel() for p in module.parameters())
            inactive = weights - weights * top_k // module.num_experts
            if _is_mtp(name):
                inactive_mtp += inactive
            else:
                inactive_trunk += inactive
    activated_non_embedding = non_embedding - inactive_trunk
    activated = activated_non_embedding + embedding

    heads, qk_dim, v_dim = attention_dims(config)
    n_heads_applied = 1 + int(getattr(config, "num_mtp_layers", 0) or 0) * (mtp > 0)
    flops = (
        6 * (activated_non_embedding + mtp - inactive_mtp)
        + 6 * head.numel() * n_heads_applied
        + 6 * softmax_attention_layers(config) * heads * (qk_dim + v_dim) * seq_len
    )
    return ModelStats(
        total=total,
        embedding=embedding,
        mtp=mtp,
        non_embedding=non_embedding,
        activated=activated,
        activated_non_embedding=activated_non_embedding,
        flops_per_token=int(flops),
        seq_len=seq_len,
    )


def config_stats(name: str, preset: str = "tiny", seq_len: int | None = None, **overrides: Any) -> ModelStats:
    """`model_stats` of a registry model built on the meta device (no memory, no init cost)."""
    from minillm.models.registry import build_config

    return stats_of_config(build_config(name, preset, **overrides), seq_len)


def stats_of_config(config: Any, seq_len: int | None = None) -> ModelStats:
    """`model_stats` of the minillm model `config` describes (a preset's, or a trained model's `config.json`),
    built on the meta device."""
    from minillm.models.registry import model_package

    with torch.device("meta"):
        model = model_package(config.model_type).MODEL_CLASS(config)
    return model_stats(model, seq_len)
