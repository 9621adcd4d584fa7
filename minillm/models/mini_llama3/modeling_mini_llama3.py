"""mini_llama3: the dense Llama 3 decoder, in the reading order of transformers' `modeling_llama.py`.

    attention -> decoder layer -> pretrained base -> model (embeddings + layers + final norm) -> causal LM head

Notable choices:
- Building blocks come from `minillm.models.layers` (RMSNorm, RoPE, SDPA attention with packed/padded masks,
  SwiGLU, chunked loss); this file only wires them, with the parameter names of `LlamaForCausalLM`, so conversion to
  the reference is a state-dict copy (`convert.py`).
- Grouped-query attention: `num_key_value_heads` K/V heads shared by groups of query heads (SDPA `enable_gqa`).
- KV cache: transformers' `DynamicCache`, the cache `generate()` creates for us and passes back as `cache`. Every
  layer appends its rotated K and V; positions come from `position_ids` (left padding and packing included).
- Packed rows: the attention mask is prepared once per forward from `position_ids` (documents restart at 0) and
  `attention_mask` (padding), and shared by all layers; on CUDA packed rows run flash-attn varlen or flex_attention
  (see `layers/attention.py`).
- Loss: labels are unshifted; the chunked cross-entropy never materialises the logits (`logits` is None then).

Shape legend: B batch, L tokens in this forward, P cached tokens, D hidden, H query heads, Hk kv heads, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from minillm.models import decode as fast
from minillm.models.base import MiniLLMPreTrainedModel, mask_padding_labels
from minillm.models.layers.attention import AttentionLayout, AttentionMask, prepare_attention, sdpa_attention
from minillm.models.layers.linear import Linear
from minillm.models.layers.loss import LMHead, shift_targets
from minillm.models.layers.mlp import SwiGLUMLP
from minillm.models.layers.norm import RMSNorm
from minillm.models.layers.rope import RotaryEmbedding, apply_rotary
from minillm.models.mini_llama3.configuration_mini_llama3 import MiniLlama3Config
from minillm.models.outputs import MiniLLMOutput


class MiniLlama3Attention(nn.Module):
    """Grouped-query self-attention with RoPE on q and k."""

    def __init__(self, config: MiniLlama3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def layout(self) -> AttentionLayout:
        """What chooses this layer's kernel for a packed batch (`prepare_attention`)."""
        dropout = self.attention_dropout if self.training else 0.0
        return AttentionLayout(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim, dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, D)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (B, L, Dh)
        attention_mask: AttentionMask,  # from `prepare_attention` (None = causal)
        cache: Cache | None = None,
    ) -> torch.Tensor:
        bsz, seq_len, _ = hidden_states.shape
        q_shape = (bsz, seq_len, self.num_heads, self.head_dim)
        kv_shape = (bsz, seq_len, self.num_kv_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(q_shape).transpose(1, 2)  # (B, H, L, Dh)
        k = self.k_proj(hidden_states).view(kv_shape).transpose(1, 2)  # (B, Hk, L, Dh)
        v = self.v_proj(hidden_states).view(kv_shape).transpose(1, 2)  # (B, Hk, L, Dh)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hk, P + L, Dh): past keys + these
        dropout = self.attention_dropout if self.training else 0.0
        out = sdpa_attention(q, k, v, attention_mask, dropout_p=dropout)  # (B, L, H, Dh)
        return self.o_proj(out.reshape(bsz, seq_len, self.num_heads * self.head_dim))  # (B, L, D)


class MiniLlama3DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: MiniLlama3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MiniLlama3Attention(config, layer_idx)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, D)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: AttentionMask = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MiniLlama3PreTrainedModel(MiniLLMPreTrainedModel):
    config_class = MiniLlama3Config
    config: MiniLlama3Config
    _no_split_modules = ["MiniLlama3DecoderLayer"]


class MiniLlama3Model(MiniLlama3PreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns the final hidden states (B, L, D)."""

    def __init__(self, config: MiniLlama3Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [MiniLlama3DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding.from_config(config, config.head_dim)
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
    ) -> tuple[torch.Tensor, Cache | None, torch.Tensor]:
        """Return (final hidden states (B, L, D), the cache, the position ids actually used (B, L))."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, L, D)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        seq_len = inputs_embeds.shape[1]
        # Once per forward, shared by all layers: None (causal), a dense mask (cache), or PackedDocs (packed/padded).
        mask = prepare_attention(
            seq_len, past_len + seq_len, attention_mask, position_ids, inputs_embeds.device, inputs_embeds.shape[0],
            self.layers[0].self_attn.layout(), inputs_embeds.dtype,
        )
        if position_ids is None:
            # (1, L): the positions after the cached ones
            position_ids = torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device)[None]
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)  # cos, sin: (B, L, Dh)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, attention_mask=mask, cache=cache)
        return self.norm(hidden_states), cache, position_ids


class MiniLlama3ForCausalLM(MiniLlama3PreTrainedModel, GenerationMixin):
    """Llama 3 language model: `MiniLlama3Model` + output head (tied to the embeddings when configured)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniLlama3Config) -> None:
        super().__init__(config)
        self.model = MiniLlama3Model(config)
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
        hidden_states, cache, position_ids = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        if labels is not None:
            # Chunked cross-entropy inside the head's forward (see layers/loss.py); no logits are kept.
            labels = mask_padding_labels(labels, attention_mask)
            targets = shift_targets(labels, given_position_ids)  # (B, L): next token, -100 across documents
            loss = self.lm_head(hidden_states, targets, num_items_in_batch)
            return MiniLLMOutput(loss=loss, cache=cache, aux_losses={"lm": loss.detach()})
        return MiniLLMOutput(logits=self._logits(hidden_states, logits_to_keep), cache=cache, aux_losses={})

    # -- decode fast path of our decode loop (see minillm/models/decode.py) ----------------------------------------
    @torch.no_grad()
    def begin_decode(
        self, cache: Cache, max_len: int, attention_mask: torch.Tensor | None = None
    ) -> fast.DecodeState:
        """Move the prefill's `DynamicCache` into preallocated buffers for `max_len` tokens; `attention_mask`
        (B, T) is the prefill's padding mask (None: no padding)."""
        state = fast.DecodeState(cache.get_seq_length(), max_len, attention_mask)
        state.layers = [fast.StaticKV(layer.keys, layer.values, max_len) for layer in cache.layers]
        state.rope = fast.RopeTable(self.model.rotary_emb, max_len, self.model.embed_tokens.weight)
        state.weights = [
            (fast.norm_weight(layer.input_layernorm), fast.norm_weight(layer.post_attention_layernorm))
            for layer in self.model.layers
        ]
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
        bsz = x.shape[0]
        for layer, kv, (w_in, w_post) in zip(self.model.layers, state.layers, state.weights, strict=True):
            attn = layer.self_attn
            h = fast.rms_norm(x, layer.input_layernorm, w_in)
            q = fast.linear(h, attn.q_proj).view(bsz, attn.num_heads, 1, attn.head_dim)  # (B, H, 1, Dh)
            k = fast.linear(h, attn.k_proj).view(bsz, attn.num_kv_heads, 1, attn.head_dim)  # (B, Hk, 1, Dh)
            v = fast.linear(h, attn.v_proj).view(bsz, attn.num_kv_heads, 1, attn.head_dim)
            qk = fast.rotate(torch.cat([q, k], dim=1), cos, sin)  # q and k rotated together
            k, v = kv.append(qk[:, attn.num_heads :], v, n)  # (B, Hk, n + 1, Dh)
            out = sdpa_attention(qk[:, : attn.num_heads], k, v, mask)  # (B, 1, H, Dh)
            x = x + fast.linear(out.reshape(bsz, -1), attn.o_proj)
            x = x + fast.swiglu(fast.rms_norm(x, layer.post_attention_layernorm, w_post), layer.mlp)
        return fast.end_step(self, x, state)  # (B, V)
