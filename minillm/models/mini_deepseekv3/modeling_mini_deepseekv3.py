"""mini_deepseekv3: DeepSeek-V3 at small scale, in the reading order of transformers' `modeling_deepseek_v3.py`.

    latent cache -> MLA attention -> router -> DeepSeekMoE -> decoder layer -> MTP module -> model -> causal LM

Notable choices:
- Multi-head Latent Attention (MLA). Keys and values are not projected per head from the hidden state: one
  low-rank latent `c_kv` (kv_lora_rank C) is computed per token, plus one RoPE key `k_rope` (R channels) shared by
  all heads. Per-head keys (no-RoPE part) and values are expanded from the latent by `kv_b_proj` when attention
  runs. The cache (`MLACache`) stores only the latent, already normalised by `kv_a_layernorm`, and the rotated
  `k_rope`: C + R numbers per token per layer instead of 2 x H x head_dim (the normalisation is per token, so
  caching its output is exact and saves redoing it every step; this is also what the reference caches).
  Training and prefill expand the latent into per-head keys/values; cached decoding instead "absorbs" the
  expansion into the query and output (`_attend_absorbed`), attending directly over the cached latents.
- DeepSeekMoE. Every MoE layer has always-on shared experts plus E routed experts (`layers/moe.py`: sorted
  dispatch and grouped matmuls). The router scores experts with a sigmoid (in fp32), restricts each token to its
  `topk_group` best expert groups (group score = sum of its 2 best experts), picks the top K experts there, and
  weights them by their sigmoid scores, normalised to sum to 1 (`norm_topk_prob`) and scaled by
  `routed_scaling_factor`. The first `num_dense_layers` layers use a dense SwiGLU instead.
- Aux-loss-free balancing. A per-expert bias (`e_score_correction_bias`, a buffer, the reference's name) is added
  to the scores for *selection only*; the weights use the raw scores. The trainer calls
  `model.update_expert_bias(counts)` after each optimizer step with the global expert counts, and every layer does
  `bias += bias_update_speed * sign(mean_load - load)`: overloaded experts become less attractive.
- Sequence-level balance loss (DeepSeek-V3 eq. 17-20), training only: per sequence (per document in packed rows),
  `sum_e f_e * P_e` with f_e = E / (K * T) * (tokens choosing e) and P_e the mean over the sequence's tokens of the
  sum-normalised scores. Summed over MoE layers, weighted by `seq_aux_alpha`.
- Multi-token prediction (depth 1), training only. The MTP module combines the main model's final (normed) hidden
  state at position i with the embedding of token i+1 (`eh_proj([enorm(emb); hnorm(h)])`), runs one decoder
  block (MLA + dense SwiGLU, so `expert_counts` keeps one row per main MoE layer) and its own final norm, and
  predicts token i+2 through the shared output head. Loss weight `mtp_loss_lambda`. Packed documents: the next
  token's embedding is zeroed where it belongs to another document (or is padding), the block uses the same
  block-diagonal mask, and targets that cross a boundary are ignored. The module (`mtp.*`) is dropped on export.
- `loss` = LM + mtp_loss_lambda * MTP + seq_aux_alpha * seq_aux in training mode; in eval mode only the LM loss
  (so perplexities are comparable). `aux_losses` holds the unweighted, detached terms.

Shape legend: B batch, L tokens in this forward, P cached tokens, D hidden, H heads, C kv_lora_rank,
R qk_rope_head_dim, N qk_nope_head_dim, Dv v_head_dim, T = B*L tokens, E routed experts, K experts per token,
G expert groups, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from minillm.models import decode as fast
from minillm.models.base import MiniLLMPreTrainedModel, mask_padding_labels
from minillm.models.layers.attention import (
    AttentionLayout,
    AttentionMask,
    document_ids_from_position_ids,
    has_padding,
    prepare_attention,
    sdpa_attention,
)
from minillm.models.layers.linear import Linear
from minillm.models.layers.loss import LMHead, shift_targets
from minillm.models.layers.mlp import SwiGLUMLP
from minillm.models.layers.moe import RoutedExperts, expert_counts, micro_batch_share
from minillm.models.layers.norm import RMSNorm
from minillm.models.layers.rope import RotaryEmbedding, apply_rotary
from minillm.models.mini_deepseekv3.configuration_mini_deepseekv3 import MiniDeepSeekV3Config
from minillm.models.outputs import MiniLLMOutput

LATENT_NORM_EPS = 1e-6  # the reference builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps


class MLACache(DynamicCache):
    """The KV cache of MLA: per layer, the normalised latent `c_kv` (B, 1, S, C) and the rotated shared RoPE key
    `k_rope` (B, 1, S, R) — nothing per head.

    It is a `DynamicCache` whose per-layer "keys" slot holds the latent and "values" slot the RoPE key, so every
    `generate()` feature that works on a `DynamicCache` (greedy, sampling, beam reordering, cropping) works here.
    `generate()` creates one automatically (see `_prepare_cache_for_generation`).
    """

    def bytes_per_token(self) -> int:
        """Cache bytes per token over all layers: (C + R) x layers x dtype size for MLA."""
        total = 0
        for layer in self.layers:
            if layer.keys is not None and layer.keys.numel():
                for t in (layer.keys, layer.values):  # (B, 1, S, C) and (B, 1, S, R)
                    total += t.shape[1] * t.shape[-1] * t.element_size()
        return total


def softmax_scale(config: MiniDeepSeekV3Config) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale^2 when the RoPE is YaRN-scaled with `mscale_all_dim` (as DeepSeek)."""
    scale = config.qk_head_dim**-0.5
    params = config.rope_parameters
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        factor = params["factor"]
        mscale = 0.1 * params["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale = scale * mscale * mscale
    return scale


class MiniDeepSeekV3Attention(nn.Module):
    """Multi-head Latent Attention with a decoupled, shared RoPE key."""

    def __init__(self, config: MiniDeepSeekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.rope_interleave = config.rope_interleave
        self.attention_dropout = config.attention_dropout
        self.scaling = softmax_scale(config)
        hidden, heads = config.hidden_size, config.num_attention_heads
        if config.q_lora_rank is None:
            self.q_proj = Linear(hidden, heads * self.qk_head_dim, bias=False)
        else:  # low-rank query: D -> q_lora_rank -> H * (N + R), with a norm in between
            self.q_a_proj = Linear(hidden, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = Linear(config.q_lora_rank, heads * self.qk_head_dim, bias=False)
        # One projection gives the latent (C) and the shared RoPE key (R): "MQA" for the RoPE part.
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = Linear(heads * self.v_head_dim, hidden, bias=config.attention_bias)

    def layout(self) -> AttentionLayout:
        """What chooses this layer's kernel for a packed batch (`prepare_attention`): without a past, keys and
        values are expanded to every head (`_attend_expanded`)."""
        dropout = self.attention_dropout if self.training else 0.0
        return AttentionLayout(self.num_heads, self.num_heads, self.qk_head_dim, self.v_head_dim, dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, D)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (B, L, R)
        attention_mask: AttentionMask,  # from `prepare_attention` (None = causal)
        cache: Cache | None = None,
    ) -> torch.Tensor:
        bsz, seq_len, _ = hidden_states.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))  # (B, L, H * (N + R))
        q = q.view(bsz, seq_len, self.num_heads, self.qk_head_dim).transpose(1, 2)  # (B, H, L, N + R)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent).view(bsz, 1, seq_len, self.kv_lora_rank)  # (B, 1, L, C)
        k_rope = k_rope.view(bsz, 1, seq_len, self.qk_rope_head_dim)  # (B, 1, L, R): one head shared by all
        cos, sin = position_embeddings
        q_rope, k_rope = apply_rotary(q_rope, k_rope, cos, sin, interleaved=self.rope_interleave)
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)  # (B, 1, P + L, C), (B, 1, P + L, R)
        dropout = self.attention_dropout if self.training else 0.0
        if latent.shape[2] > seq_len and not self.training:
            out = self._attend_absorbed(q_nope, q_rope, latent, k_rope, attention_mask)  # decoding with a cache
        else:
            out = self._attend_expanded(q_nope, q_rope, latent, k_rope, attention_mask, dropout)
        return self.o_proj(out.reshape(bsz, seq_len, self.num_heads * self.v_head_dim))  # (B, L, D)

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, attention_mask, dropout: float) -> torch.Tensor:
        """Training / prefill: expand the latent into per-head keys and values, then ordinary attention.

        q_nope (B, H, L, N), q_rope (B, H, L, R), latent (B, 1, S, C), k_rope (B, 1, S, R) -> (B, L, H, Dv).
        """
        bsz, _, total_len, _ = latent.shape
        kv = self.kv_b_proj(latent[:, 0])  # (B, S, H * (N + Dv))
        kv = kv.view(bsz, total_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # (B, H, S, N), (B, H, S, Dv)
        k = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)  # (B, H, S, N + R)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, L, N + R)
        return sdpa_attention(q, k, v, attention_mask, scale=self.scaling, dropout_p=dropout)

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, attention_mask) -> torch.Tensor:
        """Decoding: attend in latent space ("weight absorption"), never expanding the cache.

        With W_UK (H, N, C) and W_UV (H, Dv, C) the two halves of `kv_b_proj`, a head's content score is
        q_nope . (W_UK c) = (W_UK^T q_nope) . c, and its output sum_s p_s W_UV c_s = W_UV (sum_s p_s c_s). So
        queries are mapped into the latent once, every head attends to the same (B, 1, S, C + R) keys and
        (B, 1, S, C) values (multi-query attention over the cache), and W_UV is applied to the H outputs: per step
        this costs O(S * H * C) instead of re-expanding all S cached latents, O(S * C * H * (N + Dv)).
        """
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # (H, N, C), (H, Dv, C)
        q_latent = torch.einsum("bhln,hnc->bhlc", q_nope, w_uk)  # (B, H, L, C)
        q = torch.cat([q_latent, q_rope], dim=-1)  # (B, H, L, C + R)
        k = torch.cat([latent, k_rope], dim=-1)  # (B, 1, S, C + R)
        out = sdpa_attention(q, k, latent, attention_mask, scale=self.scaling)  # (B, L, H, C)
        return torch.einsum("blhc,hdc->blhd", out, w_uv)  # (B, L, H, Dv)


class MiniDeepSeekV3Router(nn.Module):
    """Sigmoid scores, group-limited top-k selection with the balancing bias, normalised and scaled weights."""

    def __init__(self, config: MiniDeepSeekV3Config) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))  # (E, D)
        # Balancing bias: selection only, never a gradient; updated by `update_expert_bias`. Kept in fp32 (see _apply).
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse: bool = True):
        # `.to(bfloat16)` / `.half()` would round the bias; its updates (~1e-3) must not vanish in bf16, so it stays
        # fp32, with the values it had before the cast (not the cast's rounded ones).
        before = self.e_score_correction_bias
        super()._apply(fn, recurse)
        after = self.e_score_correction_bias
        if after.dtype != torch.float32:
            exact = before.dtype == torch.float32 and "meta" not in (before.device.type, after.device.type)
            after.data = before.detach().to(after.device) if exact else after.data.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> scores (T, E) fp32 sigmoid affinities, topk_idx (T, K), topk_weight (T, K) fp32."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32, also under autocast
            scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (T, E)
        choice = scores.detach() + self.e_score_correction_bias  # (T, E) biased, for selection only
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            grouped = choice.view(-1, self.n_group, per_group)  # (T, G, E/G)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (T, G): the sum of each group's top 2
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)  # (T, G)
            expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, per_group).reshape(-1, self.num_experts)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        topk_idx = choice.topk(self.top_k, dim=-1, sorted=False).indices  # (T, K)
        topk_weight = scores.gather(1, topk_idx)  # (T, K) raw (unbiased) scores
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, topk_idx, topk_weight * self.routed_scaling_factor


def sequence_balance_loss(
    scores: torch.Tensor, topk_idx: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (eq. 17-20), averaged over sequences; unweighted (no alpha).

    scores (T, E) sigmoid affinities, topk_idx (T, K), segment_ids (T,) in [0, num_segments] (num_segments = a
    token that belongs to no sequence, e.g. padding). For each sequence s with T_s tokens:
    f_e = E / (K * T_s) * #(tokens choosing e), P_e = mean over its tokens of scores_e / sum_j scores_j;
    loss_s = sum_e f_e * P_e (1 when perfectly balanced). Gradients flow through P only.

    Segment ids need not all be used: the mean is over the sequences that have tokens, counted on the device, so
    callers can number sequences without compacting the ids (`torch.unique` would wait for the GPU).
    """
    num_experts, top_k = scores.shape[-1], topk_idx.shape[-1]
    chosen = torch.zeros_like(scores).scatter_(1, topk_idx, 1.0)  # (T, E)
    probs = scores / scores.sum(dim=-1, keepdim=True)  # (T, E)
    shape = (num_segments + 1, num_experts)
    chosen_per_seq = scores.new_zeros(shape).index_add_(0, segment_ids, chosen)[:num_segments]  # (S, E)
    probs_per_seq = scores.new_zeros(shape).index_add_(0, segment_ids, probs)[:num_segments]  # (S, E)
    ones = torch.ones_like(segment_ids, dtype=scores.dtype)
    tokens = scores.new_zeros(num_segments + 1).index_add_(0, segment_ids, ones)[:num_segments]  # (S,)
    sequences = (tokens > 0).sum().clamp(min=1)  # empty segments add 0 below and are not counted
    tokens = tokens.clamp(min=1)[:, None]
    f = chosen_per_seq * (num_experts / (top_k * tokens))  # (S, E)
    p = probs_per_seq / tokens  # (S, E)
    return (f * p).sum() / sequences


class RoutingContext:
    """Per-forward facts every MoE layer needs: which tokens are real, and their sequence (for the balance loss)."""

    def __init__(
        self,
        token_mask: torch.Tensor | None = None,  # (T,) bool, False = padding
        segment_ids: torch.Tensor | None = None,  # (T,) long, None = no balance loss
        num_segments: int = 0,
    ) -> None:
        self.token_mask = token_mask
        self.segment_ids = segment_ids
        self.num_segments = num_segments


class MiniDeepSeekV3MoE(nn.Module):
    """DeepSeekMoE: shared experts (always on) + routed experts chosen by the router."""

    def __init__(self, config: MiniDeepSeekV3Config) -> None:
        super().__init__()
        self.gate = MiniDeepSeekV3Router(config)
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            SwiGLUMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, routing: RoutingContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, L, D) -> (output (B, L, D), expert counts (E,) float, balance loss or None)."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, D)
        scores, topk_idx, topk_weight = self.gate(x)
        out = self.experts(x, topk_idx, topk_weight)  # (T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        counts = expert_counts(topk_idx, self.gate.num_experts, routing.token_mask)  # padding is not load
        balance = None
        if routing.segment_ids is not None:
            balance = sequence_balance_loss(scores, topk_idx, routing.segment_ids, routing.num_segments)
        return out.view(shape), counts.float(), balance


class MiniDeepSeekV3DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + MLA(norm(x)), then x + FFN(norm(x)), FFN dense or DeepSeekMoE."""

    def __init__(self, config: MiniDeepSeekV3Config, layer_idx: int, dense: bool) -> None:
        super().__init__()
        self.self_attn = MiniDeepSeekV3Attention(config, layer_idx)
        self.is_moe = not dense
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size) if dense else MiniDeepSeekV3MoE(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, D)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: AttentionMask = None,
        cache: Cache | None = None,
        routing: RoutingContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return (hidden states, expert counts (E,) or None, balance loss or None)."""
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache
        )
        normed = self.post_attention_layernorm(hidden_states)
        if not self.is_moe:
            return hidden_states + self.mlp(normed), None, None
        out, counts, balance = self.mlp(normed, routing or RoutingContext())
        return hidden_states + out, counts, balance


class MiniDeepSeekV3MTP(nn.Module):
    """Depth-1 multi-token prediction module (training only): predicts token i+2 from h_i and token i+1.

    It owns no embedding or head: the model passes its own (shared, as in DeepSeek-V3).
    """

    def __init__(self, config: MiniDeepSeekV3Config) -> None:
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        # layer_idx past the main layers: it never touches the generation cache.
        self.block = MiniDeepSeekV3DecoderLayer(config, layer_idx=config.num_hidden_layers, dense=True)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, D) the main model's final normed hidden states
        next_embeds: torch.Tensor,  # (B, L, D) embedding of token i+1 at position i (zero where none)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: AttentionMask,  # the trunk's: same documents
    ) -> torch.Tensor:
        """Return the MTP hidden states (B, L, D), final-normed, ready for the shared output head."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden_states)], dim=-1))  # (B, L, D)
        x, _, _ = self.block(x, position_embeddings, attention_mask)
        return self.norm(x)


class MiniDeepSeekV3PreTrainedModel(MiniLLMPreTrainedModel):
    config_class = MiniDeepSeekV3Config
    config: MiniDeepSeekV3Config
    _no_split_modules = ["MiniDeepSeekV3DecoderLayer"]
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, MiniDeepSeekV3Router):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
        else:  # RoutedExperts included (base class)
            super()._init_weights(module)


class MiniDeepSeekV3Model(MiniDeepSeekV3PreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns the final hidden states (B, L, D)."""

    def __init__(self, config: MiniDeepSeekV3Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [
                MiniDeepSeekV3DecoderLayer(config, layer_idx, dense=layer_idx < config.num_dense_layers)
                for layer_idx in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding.from_config(config, config.qk_rope_head_dim, head_dim=config.qk_rope_head_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, P + L), 1 = real token
        position_ids: torch.LongTensor | None = None,  # (B, L)
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,  # (B, L, D)
        use_cache: bool | None = None,
        routing: RoutingContext | None = None,
    ) -> dict:
        """Return a dict: `hidden_states` (B, L, D) final-normed, `cache`, `position_ids` (B, L) used, `mask` (the
        attention mask every layer used), `position_embeddings`, `expert_counts` (n_moe_layers, E) float,
        `balance` (sum over MoE layers of the balance loss, or None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, L, D)
        if use_cache and cache is None:
            cache = MLACache()
        past_len = cache.get_seq_length() if cache is not None else 0
        seq_len = inputs_embeds.shape[1]
        # Once per forward, shared by all layers and the MTP block: None, a dense mask (cache), or PackedDocs.
        mask = prepare_attention(
            seq_len, past_len + seq_len, attention_mask, position_ids, inputs_embeds.device, inputs_embeds.shape[0],
            self.layers[0].self_attn.layout(), inputs_embeds.dtype,
        )
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device)[None]  # (1, L)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)  # cos, sin: (B, L, R)
        hidden_states = inputs_embeds
        counts, balances = [], []
        for layer in self.layers:
            hidden_states, layer_counts, balance = layer(
                hidden_states, position_embeddings, attention_mask=mask, cache=cache, routing=routing
            )
            if layer_counts is not None:
                counts.append(layer_counts)
            if balance is not None:
                balances.append(balance)
        expert_counts_all = (
            torch.stack(counts)
            if counts
            else inputs_embeds.new_zeros(0, self.config.n_routed_experts, dtype=torch.float32)
        )
        return {
            "hidden_states": self.norm(hidden_states),
            "cache": cache,
            "position_ids": position_ids,
            "mask": mask,
            "position_embeddings": position_embeddings,
            "expert_counts": expert_counts_all,
            "balance": torch.stack(balances).sum() if balances else None,
        }


class MiniDeepSeekV3ForCausalLM(MiniDeepSeekV3PreTrainedModel, GenerationMixin):
    """DeepSeek-V3 language model: `MiniDeepSeekV3Model` + output head (+ the MTP module while training)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniDeepSeekV3Config) -> None:
        super().__init__(config)
        self.model = MiniDeepSeekV3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, chunk_size=config.loss_chunk_size)
        self.mtp = MiniDeepSeekV3MTP(config) if config.num_mtp_layers > 0 else None
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Let `generate()` decide whether to cache, then give it an `MLACache` instead of a plain DynamicCache."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if type(model_kwargs.get("cache")) is DynamicCache and not getattr(model_kwargs["cache"], "_is_user_defined", False):
            model_kwargs["cache"] = MLACache()

    def _routing_context(
        self, input_ids_or_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
        with_balance: bool,
    ) -> RoutingContext:
        """Which tokens are padding, and (for the balance loss) which sequence each token belongs to."""
        bsz, seq_len = input_ids_or_embeds.shape[:2]
        device = input_ids_or_embeds.device
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and has_padding(attention_mask):
            token_mask = attention_mask[:, -seq_len:].bool().reshape(-1)  # (T,)
        if not with_balance:
            return RoutingContext(token_mask)
        rows = torch.arange(bsz, device=device)[:, None]  # (B, 1)
        if position_ids is not None:  # packed rows: one segment per (row, document); ids in [0, B * (L + 1))
            docs = document_ids_from_position_ids(position_ids.expand(bsz, -1))  # (B, L) in [0, L]
            segment_ids, num_segments = (rows * (seq_len + 1) + docs).reshape(-1), bsz * (seq_len + 1)
        else:  # one sequence per row
            segment_ids, num_segments = rows.expand(bsz, seq_len).reshape(-1), bsz
        if token_mask is not None:
            segment_ids = segment_ids.masked_fill(~token_mask, num_segments)  # padding: the discarded bucket
        return RoutingContext(token_mask, segment_ids, num_segments)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> MiniLLMOutput:
        """See docs/design.md (Models). `cache` is the name transformers 5.x `generate()` uses for
        `past_key_values`; either may be given."""
        cache, use_cache = self._resolve_cache(cache, past_key_values, use_cache, labels)
        train_aux = self.training and labels is not None
        with_balance = train_aux and self.config.seq_aux_alpha > 0
        tokens = input_ids if input_ids is not None else inputs_embeds
        routing = self._routing_context(tokens, attention_mask, position_ids, with_balance)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            routing=routing,
        )
        hidden_states = out["hidden_states"]
        counts = out["expert_counts"].detach()
        if labels is None:
            logits = self._logits(hidden_states, logits_to_keep)
            return MiniLLMOutput(logits=logits, cache=out["cache"], aux_losses={}, expert_counts=counts)

        labels = mask_padding_labels(labels, attention_mask)
        # The loss runs inside lm_head's forward so ZeRO-3 gathers the head weight for it (see layers/loss.py).
        lm_loss = self.lm_head(hidden_states, shift_targets(labels, position_ids), num_items_in_batch)
        loss = lm_loss
        aux = {"lm": lm_loss.detach()}
        if train_aux and self.mtp is not None and self.config.mtp_loss_lambda > 0:
            mtp_hidden = self._mtp_hidden_states(input_ids, attention_mask, position_ids, out)
            mtp_targets = shift_targets(labels, position_ids, shift=2)
            # over the LM targets' count in training (num_items_in_batch), as the paper's L_MTP divides by T,
            # not by its own one-fewer targets per row
            mtp_loss = self.lm_head(mtp_hidden, mtp_targets, num_items_in_batch)
            loss = loss + self.config.mtp_loss_lambda * mtp_loss
            aux["mtp"] = mtp_loss.detach()
        if out["balance"] is not None:
            balance = out["balance"]
            balance_weight = micro_batch_share(shift_targets(labels, position_ids), num_items_in_batch)
            loss = loss + self.config.seq_aux_alpha * balance * balance_weight
            aux["seq_aux"] = balance.detach()
        return MiniLLMOutput(loss=loss, cache=out["cache"], aux_losses=aux, expert_counts=counts)

    def _mtp_hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        trunk: dict,
    ) -> torch.Tensor:
        """Run the MTP module on the trunk's outputs: (B, L, D) hidden states whose head predicts token i+2."""
        if input_ids is None:
            raise ValueError("multi-token prediction needs input_ids (it embeds the next tokens)")
        if trunk["cache"] is not None and trunk["cache"].get_seq_length() != input_ids.shape[1]:
            raise ValueError("multi-token prediction runs on whole sequences, not on cached continuations")
        bsz, seq_len = input_ids.shape
        next_ids = torch.cat([input_ids[:, 1:], input_ids.new_zeros(bsz, 1)], dim=1)  # (B, L): token i+1
        has_next = torch.ones(bsz, seq_len, dtype=torch.bool, device=input_ids.device)
        has_next[:, -1] = False
        if position_ids is not None:
            # The next token starts another document: nothing to combine with.
            has_next[:, :-1] &= position_ids.expand(bsz, -1)[:, 1:] != 0
        if attention_mask is not None and attention_mask.dim() == 2:
            has_next[:, :-1] &= attention_mask[:, -seq_len:][:, 1:].bool()
        next_embeds = self.model.embed_tokens(next_ids) * has_next[..., None].to(trunk["hidden_states"].dtype)
        return self.mtp(trunk["hidden_states"], next_embeds, trunk["position_embeddings"], trunk["mask"])

    @torch.no_grad()
    def mtp_logits(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, L, V) of the MTP head: position i predicts token i+2 (for inspection and tests)."""
        if self.mtp is None:
            raise ValueError("this model has no MTP module (num_mtp_layers=0)")
        trunk = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.lm_head(self._mtp_hidden_states(input_ids, attention_mask, position_ids, trunk))

    @torch.no_grad()
    def update_expert_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free balancing step: for every MoE layer, bias += speed * sign(mean_load - load).

        `counts` (n_moe_layers, E) are the tokens routed to each expert summed over the whole global batch (the
        trainer sums `expert_counts` over micro-batches and all-reduces over ranks), so every rank applies the same
        update. Call it after the optimizer step; forward never changes the bias.
        """
        routers = [layer.mlp.gate for layer in self.model.layers if layer.is_moe]
        expected = (len(routers), self.config.n_routed_experts)
        if tuple(counts.shape) != expected:
            raise ValueError(f"update_expert_bias: counts must have shape {expected}, got {tuple(counts.shape)}")
        speed = self.config.bias_update_speed
        if speed == 0 or not routers:
            return
        counts = counts.float()
        error = counts.mean(dim=-1, keepdim=True) - counts  # (n_moe_layers, E): > 0 for underloaded experts
        for router, layer_error in zip(routers, error, strict=True):
            bias = router.e_score_correction_bias
            bias.add_(speed * torch.sign(layer_error.to(bias.device, bias.dtype)))

    # -- decode fast path of our decode loop (see minillm/models/decode.py) ----------------------------------------
    @torch.no_grad()
    def begin_decode(
        self, cache: Cache, max_len: int, attention_mask: torch.Tensor | None = None
    ) -> fast.DecodeState:
        """Move the prefill's `MLACache` (latent + RoPE key per layer) into one preallocated buffer per layer;
        `attention_mask` (B, T) is the prefill's padding mask (None: no padding)."""
        state = fast.DecodeState(cache.get_seq_length(), max_len, attention_mask)
        for layer, cache_layer in zip(self.model.layers, cache.layers, strict=True):
            attn = layer.self_attn
            state.layers.append(fast.StaticLatent(cache_layer.keys, cache_layer.values, max_len))
            w_kv = attn.kv_b_proj.weight.view(attn.num_heads, attn.qk_nope_head_dim + attn.v_head_dim, -1)
            w_uk, w_uv = w_kv.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=1)  # (H, N, C), (H, Dv, C)
            norms = [layer.input_layernorm, layer.post_attention_layernorm, attn.kv_a_layernorm]
            if not hasattr(attn, "q_proj"):
                norms.append(attn.q_a_layernorm)
            state.weights.append(([fast.norm_weight(norm) for norm in norms], w_uk, w_uv))
        state.rope = fast.RopeTable(
            self.model.rotary_emb, max_len, self.model.embed_tokens.weight, self.config.rope_interleave
        )
        state.final_norm = fast.norm_weight(self.model.norm)
        return state

    @torch.no_grad()
    def decode_step(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, state: fast.DecodeState
    ) -> torch.Tensor:
        """One token per row: input_ids and position_ids (B, 1) -> next-token logits (B, V); updates `state`.

        The same math as `forward` with a cache (MLA attending in latent space, as `_attend_absorbed`), minus its
        per-step overhead (see minillm/models/decode.py).
        """
        x, n, mask, cos, sin = fast.begin_step(self, input_ids, position_ids, state)  # x (B, D)
        B = x.shape[0]
        for layer, latent_cache, (norms, w_uk, w_uv) in zip(
            self.model.layers, state.layers, state.weights, strict=True
        ):
            attn = layer.self_attn
            H, N, R = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
            h = fast.rms_norm(x, layer.input_layernorm, norms[0])
            if hasattr(attn, "q_proj"):
                q = fast.linear(h, attn.q_proj)
            else:
                q_a = fast.rms_norm(fast.linear(h, attn.q_a_proj), attn.q_a_layernorm, norms[3])
                q = fast.linear(q_a, attn.q_b_proj)
            q_nope, q_rope = q.view(B, H, 1, N + R).split([N, R], dim=-1)  # (B, H, 1, N), (B, H, 1, R)
            latent, k_rope = fast.linear(h, attn.kv_a_proj_with_mqa).split([attn.kv_lora_rank, R], dim=-1)
            latent = fast.rms_norm(latent, attn.kv_a_layernorm, norms[2]).view(B, 1, 1, -1)  # (B, 1, 1, C)
            q_rope = fast.rotate(q_rope, cos, sin, attn.rope_interleave)
            k_rope = fast.rotate(k_rope.view(B, 1, 1, R), cos, sin, attn.rope_interleave)
            keys, values = latent_cache.append(latent, k_rope, n)  # (B, 1, n + 1, C + R), (B, 1, n + 1, C)
            q = torch.cat([torch.einsum("bhln,hnc->bhlc", q_nope, w_uk), q_rope], dim=-1)  # (B, H, 1, C + R)
            out = sdpa_attention(q, keys, values, mask, scale=attn.scaling)  # (B, 1, H, C)
            out = torch.einsum("blhc,hdc->blhd", out, w_uv)  # (B, 1, H, Dv)
            x = x + fast.linear(out.reshape(B, -1), attn.o_proj)
            h = fast.rms_norm(x, layer.post_attention_layernorm, norms[1])
            x = x + (self._decode_moe(layer.mlp, h) if layer.is_moe else fast.swiglu(h, layer.mlp))
        return fast.end_step(self, x, state)  # (B, V)

    @staticmethod
    def _decode_moe(block: MiniDeepSeekV3MoE, x: torch.Tensor) -> torch.Tensor:
        """`MiniDeepSeekV3MoE` on x (T, D) for decoding: same routing, no expert counts kept."""
        _, topk_idx, topk_weight = block.gate.forward(x)  # (T, K) each
        if fast.use_small_experts(block.experts, x.shape[0], block.gate.top_k):
            out = fast.routed_experts_small(block.experts, x, topk_idx, topk_weight)
        else:
            out = block.experts.forward(x, topk_idx, topk_weight)
        if block.shared_experts is not None:
            out = out + fast.swiglu(x, block.shared_experts)
        return out  # (T, D)
