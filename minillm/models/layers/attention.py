"""Causal softmax attention over (B, H, L, D) tensors, shared by every softmax-attention layer of the zoo.

One mask describes everything a query may see, built once per forward by `build_attention_mask` and reused by every
layer:
- causality, aligned to the *end* of the keys, so it is right with a KV cache (query length < key length);
- padding: a 2-D `attention_mask` (1 = real token) over all keys, past and present (left padding for generation);
- packed documents: `position_ids` that restart at 0 start a new document; a query sees only keys of its own
  document (block-diagonal causal mask), so packing never lets one document attend to another.

When nothing but causality applies the mask is `None` and SDPA runs with `is_causal=True` (its fastest kernels).
Otherwise the mask is boolean (True = may attend). Every query may always attend to itself, so rows that are pure
padding produce finite garbage instead of NaN; real tokens never see a padding key.

Grouped-query attention is SDPA's `enable_gqa`: K/V keep their `n_kv_heads`, no `repeat_kv` copy.

CUDA hook: on GPU the boolean mask makes SDPA fall back to its memory-efficient kernel, which is correct but does not
skip the masked blocks of packed rows. `sdpa_attention` is the single place to add a varlen (flash-attn
`cu_seqlens`) or flex-attention path; flex_attention has no CPU backward, which is why CPU uses the dense mask.

Shape legend: B batch, H query heads, Hk key/value heads, Lq queries, Lk keys, D head dim, Dv value head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Number the documents of packed rows: (B, L) positions -> (B, L) ids, a new id wherever a position is 0.

    A row `[0 1 2 0 1 0 1 2 3]` becomes `[1 1 1 2 2 3 3 3 3]`. A row that does not start at 0 (a continuation
    chunk) keeps id 0 until its first restart.
    """
    return (position_ids == 0).cumsum(dim=-1)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions (1, T) of a packed row from cumulative document lengths (flash-attn's `cu_seqlens`).

    `[0, 3, 5, 9]` (documents of 3, 2 and 4 tokens) becomes `[[0 1 2 0 1 0 1 2 3]]`: the form every minillm model
    takes, so collators that produce `cu_seqlens` can feed the models directly.
    """
    cu_seqlens = cu_seqlens.long()
    total = int(cu_seqlens[-1])
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # (n_docs,)
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths)  # (T,) start of each token's document
    return (torch.arange(total, device=cu_seqlens.device) - starts)[None]


def has_document_restarts(position_ids: torch.Tensor) -> bool:
    """True when some row has a position 0 after its first token, i.e. holds more than one document."""
    return bool((position_ids[:, 1:] == 0).any())


def build_attention_mask(
    query_len: int,
    key_len: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The boolean mask (B or 1, 1, Lq, Lk) for `sdpa_attention`, or None when plain causal attention is exact.

    Args:
        query_len: Lq, the tokens of this forward.
        key_len: Lk, the cached tokens plus this forward's (the queries are the last Lq keys).
        attention_mask: (B, Lk) 1 for real tokens, 0 for padding; or an already-built 4-D boolean mask (returned
            as is). All-ones masks are treated as absent.
        position_ids: (B, Lq) positions; restarts at 0 mark packed documents. Only used without a cache
            (Lq == Lk): a cache holds one document per row.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    past_len = key_len - query_len
    if past_len < 0:
        raise ValueError(f"more queries ({query_len}) than keys ({key_len})")
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    if padded and attention_mask.shape[-1] != key_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} tokens, expected {key_len} (past + new)"
        )
    packed = (
        position_ids is not None and past_len == 0 and query_len > 1 and has_document_restarts(position_ids)
    )
    if not padded and not packed and (query_len == key_len or query_len == 1):
        return None

    q_idx = torch.arange(query_len, device=device)[:, None] + past_len  # (Lq, 1) absolute query index
    k_idx = torch.arange(key_len, device=device)[None, :]  # (1, Lk)
    mask = (k_idx <= q_idx)[None]  # (1, Lq, Lk) causal, end-aligned
    if packed:
        doc = document_ids_from_position_ids(position_ids.to(device))  # (B, L)
        mask = mask & (doc[:, :, None] == doc[:, None, :])  # (B, Lq, Lk) block-diagonal
    if padded:
        mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]  # (B, Lq, Lk)
    mask = mask | (k_idx == q_idx)[None]  # a query always sees itself: no all-masked (NaN) rows
    return mask[:, None]  # (B or 1, 1, Lq, Lk)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention: q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv) -> (B, Lq, H, Dv).

    `mask` comes from `build_attention_mask`; None means causal (Lq == Lk) or, for a single query, everything.
    The output is transposed to (B, Lq, H, Dv) so callers can `reshape(B, Lq, H * Dv)` for the output projection.
    """
    is_causal = mask is None and q.shape[2] > 1
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and q.is_cuda:
        # On CUDA only the flash and math kernels take `enable_gqa`, and flash takes no mask: expanding K/V keeps
        # masked attention on the memory-efficient kernel instead of the slow math fallback.
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, Lk, D)
        gqa = False
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )  # (B, H, Lq, Dv)
    return out.transpose(1, 2)
