"""mini_qwen3_next: the hybrid Qwen3-Next decoder, in the reading order of transformers' `modeling_qwen3_next.py`.

    gated attention -> (Gated DeltaNet: gated_deltanet.py) -> sparse MoE block -> decoder layer
    -> pretrained base -> model (embeddings + layers + final norm) -> causal LM head

Notable choices:
- Token mixers alternate by `config.layer_types`: Gated DeltaNet linear attention (a fixed-size recurrent state per
  head, see `gated_deltanet.py`) and gated full attention (softmax attention whose output is multiplied by a
  per-channel sigmoid gate computed from the input, with RMSNorm on q and k per head and RoPE on only the first
  quarter of each head's channels). The default is three DeltaNet layers per attention layer.
- Every RMSNorm of the residual stream (and the q/k norms) is zero-centred: `(1 + w) * x / rms(x)`, w init 0.
- MoE: a softmax router picks the top-k experts (probabilities renormalised with `norm_topk_prob`); routed experts
  run as grouped matmuls (`layers/moe.py`); a shared expert is always on, scaled by a per-token sigmoid gate. The
  Switch-Transformer balance loss (`router_aux`) is pooled over all MoE layers exactly as the reference computes it;
  it joins the loss in training mode only (evaluation losses stay comparable perplexities).
- Cache: transformers' `DynamicCache(config=...)`, which `generate()` creates for us from `layer_types`: conv and
  recurrent state for DeltaNet layers, K/V for attention layers.
- Packed rows and padding: `position_ids` restarting at 0 start a document; attention gets a block-diagonal mask,
  the DeltaNet layers reset their conv window and recurrent state there. Padding tokens are zeroed before the
  DeltaNet projections so they write nothing to the state (left padding for generation is exact).
- Parameter names are those of `Qwen3NextForCausalLM`: conversion is a state-dict copy (`convert.py`).

Shape legend: B batch, L tokens in this forward, P cached tokens, D hidden, H heads, Hk kv heads, Dh head dim,
T = B*L tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionCacheLayerMixin
from transformers.modeling_layers import GradientCheckpointingLayer

from minillm.models import decode as fast
from minillm.models.base import MiniLLMPreTrainedModel, mask_padding_labels
from minillm.models.layers.attention import (
    AttentionLayout,
    AttentionMask,
    has_document_restarts,
    has_padding,
    prepare_attention,
    sdpa_attention,
)
from minillm.models.layers.linear import Linear
from minillm.models.layers.loss import LMHead, shift_targets
from minillm.models.layers.mlp import SwiGLUMLP
from minillm.models.layers.moe import RoutedExperts, micro_batch_share
from minillm.models.layers.moe import expert_counts as count_experts
from minillm.models.layers.norm import RMSNorm
from minillm.models.layers.rope import RotaryEmbedding, apply_rotary
from minillm.models.layers.tensor_memo import with_host_copy
from minillm.models.mini_qwen3_next.configuration_mini_qwen3_next import MiniQwen3NextConfig
from minillm.models.mini_qwen3_next.gated_deltanet import GatedDeltaNet
from minillm.models.outputs import MiniLLMOutput


class MiniQwen3NextAttention(nn.Module):
    """Gated softmax attention: GQA + QK-norm + partial RoPE, output scaled by `sigmoid(gate)`.

    `q_proj` produces the query and the gate together, interleaved per head ([q_h, gate_h] for each head h), the
    layout of the reference checkpoints.
    """

    def __init__(self, config: MiniQwen3NextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim * 2, bias=False)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, zero_centered=True)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, zero_centered=True)

    def layout(self) -> AttentionLayout:
        """What chooses this layer's kernel for a packed batch (`prepare_attention`)."""
        dropout = self.attention_dropout if self.training else 0.0
        return AttentionLayout(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim, dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, D)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (B, L, rotary_dim)
        attention_mask: AttentionMask,  # from `prepare_attention` (None = causal)
        cache: Cache | None = None,
    ) -> torch.Tensor:
        B, L, _ = hidden_states.shape
        q, gate = self.q_proj(hidden_states).view(B, L, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)  # (B, H, L, Dh)
        k = self.k_norm(self.k_proj(hidden_states).view(B, L, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hk, L, Dh)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, k, cos, sin)  # rotates the first rotary_dim channels only
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hk, P + L, Dh)
        out = sdpa_attention(q, k, v, attention_mask, dropout_p=self.attention_dropout if self.training else 0.0)
        out = out.reshape(B, L, self.num_heads * self.head_dim) * torch.sigmoid(gate.reshape(B, L, -1))
        return self.o_proj(out)  # (B, L, D)


class MiniQwen3NextSparseMoeBlock(nn.Module):
    """Softmax top-k router + routed experts + sigmoid-gated shared expert.

    `forward` returns the block output and the router's `(probs (T, E) fp32, topk_idx (T, K))`, from which the
    model computes the balance loss and the expert counts.
    """

    def __init__(self, config: MiniQwen3NextConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)  # router, weight (E, D)
        self.experts = RoutedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = SwiGLUMLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, L, D = hidden_states.shape
        x = hidden_states.reshape(-1, D)  # (T, D)
        router_logits = self.gate(x)  # (T, E)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # (T, E)
        topk_weight, topk_idx = torch.topk(probs, self.top_k, dim=-1)  # (T, K)
        if self.norm_topk_prob:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        topk_weight = topk_weight.to(router_logits.dtype)
        routed = self.experts(x, topk_idx, topk_weight)  # (T, D)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # (T, D)
        return (routed + shared).reshape(B, L, D), (probs, topk_idx)


class MiniQwen3NextDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)); the mixer is DeltaNet or attention."""

    def __init__(self, config: MiniQwen3NextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = MiniQwen3NextAttention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = MiniQwen3NextSparseMoeBlock(config)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, zero_centered=True)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, zero_centered=True)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, D)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: AttentionMask = None,  # for attention layers, from `prepare_attention`
        linear_mask: torch.Tensor | None = None,  # (B, L) padding mask for DeltaNet layers
        doc_starts: torch.Tensor | None = None,  # (B, L) bool document starts for DeltaNet layers
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(hidden states, router probabilities (T, E), chosen experts (T, k)); the routing is None in a dense
        layer. Flat, not a nested tuple: reentrant activation checkpointing tracks top-level tensors only, and the
        router probabilities lost their gradient (the balance loss trained nothing) inside a tuple."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.layer_type == "linear_attention":
            hidden_states = self.linear_attn(hidden_states, linear_mask, doc_starts, cache)
        else:
            hidden_states = self.self_attn(hidden_states, position_embeddings, attention_mask, cache)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        probs = topk_idx = None
        if self.is_moe:
            hidden_states, (probs, topk_idx) = self.mlp(hidden_states)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, probs, topk_idx


class MiniQwen3NextPreTrainedModel(MiniLLMPreTrainedModel):
    config_class = MiniQwen3NextConfig
    config: MiniQwen3NextConfig
    _no_split_modules = ["MiniQwen3NextDecoderLayer"]
    _is_stateful = True  # the DeltaNet state cannot be rolled back: no assisted/speculative decoding

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, GatedDeltaNet):
            init.ones_(module.dt_bias)
            # A in [0.01, 16]: per-head decay rates from slow to fast (the reference's range).
            init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(0.01, 16).log_())
        else:  # RoutedExperts included (base class)
            super()._init_weights(module)


def router_aux_loss(
    routings: list[tuple[torch.Tensor, torch.Tensor]], num_experts: int, token_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss `E * sum_e f_e * P_e`, pooled over all MoE layers.

    f_e: fraction of the (token, k) assignments that went to expert e; P_e: mean router probability of expert e;
    both averaged over every real token of every MoE layer (as transformers' `load_balancing_loss_func`). It is K
    (the top-k) for perfectly uniform routing and grows when the load concentrates on the experts the router
    favours; its gradient (through P_e only) lowers the probabilities of overloaded experts. `token_mask` (T,)
    excludes padding tokens.
    """
    device = routings[0][0].device
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=device)  # (E,)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)  # (E,)
    rows = 0.0
    for probs, topk_idx in routings:
        if token_mask is None:
            weights = torch.ones_like(topk_idx, dtype=torch.float32)  # (T, K)
            prob_sum = prob_sum + probs.sum(dim=0)
            rows = rows + probs.shape[0]
        else:
            weights = token_mask[:, None].float().expand_as(topk_idx)
            prob_sum = prob_sum + (probs * token_mask[:, None]).sum(dim=0)
            rows = rows + token_mask.float().sum()
        assigned = assigned.scatter_add(0, topk_idx.reshape(-1), weights.reshape(-1))
    return num_experts * torch.sum((assigned / rows) * (prob_sum / rows))


def document_starts(position_ids: torch.Tensor, batch_size: int, has_past: bool) -> torch.Tensor | None:
    """(B, L) bool marking document starts (position 0), or None when every row is one uninterrupted document.

    A start on a row's first token only matters when a previous state exists (it then resets it).
    """
    starts = with_host_copy(lambda p: (p == 0).expand(batch_size, -1), position_ids)  # (B, L)
    if not has_document_restarts(position_ids) and not (has_past and bool(starts[:, 0].any())):
        return None
    return starts


class MiniQwen3NextModel(MiniQwen3NextPreTrainedModel):
    """Embeddings, hybrid decoder layers and the final norm."""

    def __init__(self, config: MiniQwen3NextConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [MiniQwen3NextDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, zero_centered=True)
        self.rotary_emb = RotaryEmbedding.from_config(config, config.rotary_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def _past_length(self, cache: Cache | None) -> int:
        """Tokens already in the cache (read from the first attention layer; 0 without one)."""
        if cache is None or "full_attention" not in self.config.layer_types:
            return 0
        return cache.get_seq_length(self.config.layer_types.index("full_attention"))

    def _check_cache(self, cache: Cache) -> None:
        """A cache must have a conv/recurrent-state layer at every DeltaNet layer (what `DynamicCache(config=...)`
        builds from `layer_types`); a plain `DynamicCache()` only knows K/V."""
        layers = getattr(cache, "layers", [])
        ok = len(layers) == len(self.config.layer_types) and all(
            isinstance(layer, LinearAttentionCacheLayerMixin) == (kind == "linear_attention")
            for layer, kind in zip(layers, self.config.layer_types, strict=True)
        )
        if not ok:
            raise ValueError(
                "mini_qwen3_next needs a cache built for its hybrid layers: pass DynamicCache(config=model.config) "
                "(or no cache, and use_cache=True)"
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, P + L), 1 = real token
        position_ids: torch.LongTensor | None = None,  # (B, L)
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,  # (B, L, D)
        use_cache: bool | None = None,
    ) -> tuple[torch.Tensor, Cache | None, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Return (final hidden states (B, L, D), the cache, per-MoE-layer routing (probs, topk_idx))."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, L, D)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            self._check_cache(cache)
        B, L, _ = inputs_embeds.shape
        device = inputs_embeds.device
        past_len = self._past_length(cache)
        has_past = cache is not None and any(
            cache.has_previous_state(i) for i, t in enumerate(self.config.layer_types) if t == "linear_attention"
        )

        doc_starts = None if position_ids is None else document_starts(position_ids, B, has_past)
        mask = None
        if "full_attention" in self.config.layer_types:
            # Once per forward, shared by the attention layers: None, a dense mask (cache), or PackedDocs.
            layout = next(layer.self_attn for layer in self.layers if layer.layer_type == "full_attention").layout()
            mask = prepare_attention(L, past_len + L, attention_mask, position_ids, device, B, layout,
                                     inputs_embeds.dtype)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + L, device=device)[None]  # (1, L)
        linear_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and has_padding(attention_mask):
            linear_mask = attention_mask[:, -L:]  # (B, L)

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)  # cos, sin: (B, L, rotary_dim)
        hidden_states = inputs_embeds
        routings = []
        for layer in self.layers:
            hidden_states, probs, topk_idx = layer(
                hidden_states,
                position_embeddings,
                attention_mask=mask,
                linear_mask=linear_mask,
                doc_starts=doc_starts,
                cache=cache,
            )
            if probs is not None:
                routings.append((probs, topk_idx))
        return self.norm(hidden_states), cache, routings


class MiniQwen3NextForCausalLM(MiniQwen3NextPreTrainedModel, GenerationMixin):
    """Qwen3-Next language model: `MiniQwen3NextModel` + output head (optionally tied to the embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniQwen3NextConfig) -> None:
        super().__init__(config)
        self.model = MiniQwen3NextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, chunk_size=config.loss_chunk_size)
        self.post_init()

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
        given_position_ids = position_ids
        hidden_states, cache, routings = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )

        expert_counts = None
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -hidden_states.shape[1] :].reshape(-1)  # (T,)
        if routings:
            with torch.no_grad():
                counts = [count_experts(idx, self.config.num_experts, token_mask) for _, idx in routings]
                expert_counts = torch.stack(counts).float()  # (n_moe_layers, E); padding is not load

        if labels is not None:
            labels = mask_padding_labels(labels, attention_mask)
            # The loss runs inside lm_head's forward so ZeRO-3 gathers the head weight for it (see layers/loss.py).
            lm_loss = self.lm_head(hidden_states, shift_targets(labels, given_position_ids), num_items_in_batch)
            loss = lm_loss
            aux_losses = {"lm": lm_loss.detach()}
            if routings and self.training and self.config.router_aux_loss_coef > 0:
                aux = router_aux_loss(routings, self.config.num_experts, token_mask)
                weight = micro_batch_share(shift_targets(labels, given_position_ids), num_items_in_batch)
                loss = loss + self.config.router_aux_loss_coef * aux * weight
                aux_losses["router_aux"] = aux.detach()
            return MiniLLMOutput(loss=loss, cache=cache, aux_losses=aux_losses, expert_counts=expert_counts)
        logits = self._logits(hidden_states, logits_to_keep)
        return MiniLLMOutput(logits=logits, cache=cache, aux_losses={}, expert_counts=expert_counts)

    # -- decode fast path of our decode loop (see minillm/models/decode.py) ----------------------------------------
    @torch.no_grad()
    def begin_decode(
        self, cache: Cache, max_len: int, attention_mask: torch.Tensor | None = None
    ) -> fast.DecodeState:
        """Move the prefill's hybrid cache into decode buffers: preallocated K/V for the attention layers, the conv
        window and recurrent state for the DeltaNet layers. `attention_mask` (B, T): the prefill's padding."""
        self.model._check_cache(cache)
        state = fast.DecodeState(self.model._past_length(cache), max_len, attention_mask)
        for layer, cache_layer in zip(self.model.layers, cache.layers, strict=True):
            if layer.layer_type == "linear_attention":
                state.layers.append(layer.linear_attn.begin_decode(cache))
            else:
                state.layers.append(fast.StaticKV(cache_layer.keys, cache_layer.values, max_len))
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            if layer.layer_type != "linear_attention":
                norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
            state.weights.append([fast.norm_weight(norm) for norm in norms])
        state.rope = fast.RopeTable(self.model.rotary_emb, max_len, self.model.embed_tokens.weight)
        state.final_norm = fast.norm_weight(self.model.norm)
        return state

    @torch.no_grad()
    def decode_step(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, state: fast.DecodeState
    ) -> torch.Tensor:
        """One token per row: input_ids and position_ids (B, 1) -> next-token logits (B, V); updates `state`.

        The same math as `forward` with a cache, minus its per-step overhead (see minillm/models/decode.py).
        """
        x, n, mask, cos, sin = fast.begin_step(self, input_ids, position_ids, state)  # x (B, D)
        B = x.shape[0]
        for layer, layer_state, weights in zip(self.model.layers, state.layers, state.weights, strict=True):
            h = fast.rms_norm(x, layer.input_layernorm, weights[0])
            if layer.layer_type == "linear_attention":
                x = x + layer.linear_attn.decode_step(h, layer_state)
            else:
                attn = layer.self_attn
                q, gate = fast.linear(h, attn.q_proj).view(B, attn.num_heads, 2 * attn.head_dim).chunk(2, dim=-1)
                q = fast.rms_norm(q, attn.q_norm, weights[2]).unsqueeze(2)  # (B, H, 1, Dh)
                k = fast.linear(h, attn.k_proj).view(B, attn.num_kv_heads, 1, attn.head_dim)
                k = fast.rms_norm(k, attn.k_norm, weights[3])  # (B, Hk, 1, Dh)
                v = fast.linear(h, attn.v_proj).view(B, attn.num_kv_heads, 1, attn.head_dim)
                qk = fast.rotate(torch.cat([q, k], dim=1), cos, sin)  # q and k rotated together
                k, v = layer_state.append(qk[:, attn.num_heads :], v, n)  # (B, Hk, n + 1, Dh)
                out = sdpa_attention(qk[:, : attn.num_heads], k, v, mask)  # (B, 1, H, Dh)
                out = out.reshape(B, -1) * torch.sigmoid(gate.reshape(B, -1))
                x = x + fast.linear(out, attn.o_proj)
            h = fast.rms_norm(x, layer.post_attention_layernorm, weights[1])
            x = x + (self._decode_moe(layer.mlp, h) if layer.is_moe else fast.swiglu(h, layer.mlp))
        return fast.end_step(self, x, state)  # (B, V)

    @staticmethod
    def _decode_moe(block: MiniQwen3NextSparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
        """`MiniQwen3NextSparseMoeBlock` on x (T, D) for decoding: same routing, no routing statistics kept."""
        router_logits = fast.linear(x, block.gate)  # (T, E)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = torch.topk(probs, block.top_k, dim=-1)  # (T, K)
        if block.norm_topk_prob:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        topk_weight = topk_weight.to(router_logits.dtype)
        if fast.use_small_experts(block.experts, x.shape[0], block.top_k):
            routed = fast.routed_experts_small(block.experts, x, topk_idx, topk_weight)
        else:
            routed = block.experts.forward(x, topk_idx, topk_weight)
        shared = torch.sigmoid(fast.linear(x, block.shared_expert_gate)) * fast.swiglu(x, block.shared_expert)
        return routed + shared  # (T, D)
