"""Gated DeltaNet: the linear-attention token mixer of Qwen3-Next (Yang, Kautz & Hatamizadeh 2024).

Each head keeps a fast-weight memory `S` (Dk x Dv) instead of a growing K/V cache. For every token t:

    S <- exp(g_t) * S                       # gated forgetting (g_t <= 0, per head)
    S <- S + k_t (beta_t * (v_t - S^T k_t))^T   # delta rule: write only what the memory mispredicts
    o_t = S^T q_t

with q and k L2-normalised (q also scaled by 1/sqrt(Dk)) and beta_t in (0, 1) the per-token write strength.

Two exact forms of the same recurrence live here:
- `recurrent_gated_delta_rule`: the loop above, one token at a time. Used for cached decoding (one new token).
- `chunk_gated_delta_rule`: the chunkwise-parallel form for training and prefill. Inside a chunk of C tokens the
  rank-one updates are collapsed with the WY/UT representation (one triangular solve per chunk, batched over all
  chunks at once); only the hand-over of the state from chunk to chunk is sequential (L/C small matmuls).

Packed rows: `doc_starts` (B, L) marks the first token of each document. The state is reset there (as if g were
-inf) and the short convolution never reads across the boundary, so documents packed in one row are computed
exactly as if each ran alone. In the chunked form this is done by masking the within-chunk decay matrices and the
chunk-boundary decays; the recurrence itself is unchanged.

Shape legend: B batch, L tokens, H value heads (= heads of the recurrence), Hk key heads, Dk key head dim,
Dv value head dim, N chunks, C chunk size, Cc conv channels (2*Hk*Dk + H*Dv), K conv kernel size.

Parameter names and the packed layout of `in_proj_qkvz` / `in_proj_ba` follow transformers' `Qwen3NextGatedDeltaNet`,
so checkpoints convert by a plain copy. All recurrence math runs in fp32 (as the reference and the FLA kernels do).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(sum(x^2) + eps)` over the last dim (the FLA / transformers convention, eps inside the root)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------------------------------
# Short causal depthwise convolution
# ----------------------------------------------------------------------------------------------------------------


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    prev: torch.Tensor | None = None,
    doc_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU over channels-last input, with an optional carried-in context.

    Args:
        x: (B, L, Cc) new inputs.
        weight: (Cc, K) depthwise kernel; `weight[:, K-1]` multiplies the current token.
        prev: (B, P, Cc) inputs of the tokens just before `x` (the conv state of a cache), or None for zeros.
        doc_starts: (B, L) bool, True on the first token of a document; taps never cross such a boundary.

    Returns:
        `(silu(conv(x)), state)` where `state` (B, K, Cc) holds the last K inputs, with those that belong to an
        earlier document than the last token zeroed (so a later continuation cannot read across the boundary).
    """
    B, L, Cc = x.shape
    K = weight.shape[-1]
    if prev is None:
        prev = x.new_zeros(B, K - 1, Cc)
    P = prev.shape[1]
    xx = torch.cat([prev.to(x.dtype), x], dim=1)  # (B, P+L, Cc)
    # Taps accumulate in fp32 (one rounding at the end for bf16 inputs, like a conv kernel's accumulator).
    w = weight.float()
    if doc_starts is None:
        # Tap loop: K fused multiply-adds over (B, L, Cc); on CPU faster than a depthwise conv1d + two transposes.
        out = xx[:, P : P + L] * w[:, K - 1]
        for i in range(1, K):
            out = out + xx[:, P - i : P - i + L] * w[:, K - 1 - i]
        state = xx[:, -K:] if xx.shape[1] >= K else F.pad(xx, (0, 0, K - xx.shape[1], 0))
        return F.silu(out).to(x.dtype), state
    # Segment ids: the carried-in tokens belong to segment 0, each document start opens the next segment.
    seg = doc_starts.long().cumsum(dim=1)  # (B, L)
    seg_xx = torch.cat([seg.new_zeros(B, P), seg], dim=1)  # (B, P+L)
    out = xx[:, P : P + L] * w[:, K - 1]
    for i in range(1, K):
        same_doc = (seg_xx[:, P - i : P - i + L] == seg).unsqueeze(-1)  # (B, L, 1)
        out = out + (xx[:, P - i : P - i + L] * same_doc) * w[:, K - 1 - i]
    if xx.shape[1] < K:
        xx = F.pad(xx, (0, 0, K - xx.shape[1], 0))
        seg_xx = F.pad(seg_xx, (K - seg_xx.shape[1], 0))
    state = xx[:, -K:] * (seg_xx[:, -K:] == seg_xx[:, -1:]).unsqueeze(-1)  # (B, K, Cc)
    return F.silu(out).to(x.dtype), state


# ----------------------------------------------------------------------------------------------------------------
# The gated delta rule
# ----------------------------------------------------------------------------------------------------------------


def _prepare(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Broadcast key heads to value heads, move heads first, go fp32, L2-normalise q/k and scale q."""
    H, Hk = v.shape[2], k.shape[2]
    q = l2norm(q.float()) * q.shape[-1] ** -0.5  # (B, L, Hk, Dk), normalised before the head broadcast
    k = l2norm(k.float())
    if H != Hk:  # each key head serves H/Hk consecutive value heads
        q = q.repeat_interleave(H // Hk, dim=2)
        k = k.repeat_interleave(H // Hk, dim=2)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, L, D)
    g, beta = (t.transpose(1, 2).float() for t in (g, beta))  # (B, H, L)
    return q, k, v, g, beta


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    doc_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule one token at a time (decoding; the reference for the chunked form).

    Args:
        q, k: (B, L, Hk, Dk) raw (un-normalised) queries and keys.
        v: (B, L, H, Dv) values.
        g: (B, L, H) log decay (<= 0).
        beta: (B, L, H) write strength in (0, 1).
        initial_state: (B, H, Dk, Dv) state before the first token, or None for zeros.
        doc_starts: (B, L) bool; the state is reset to zero before a token that starts a document.

    Returns:
        output (B, L, H, Dv) in q's dtype and the final state (B, H, Dk, Dv) in fp32.
    """
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    B, H, L, Dk = k.shape
    Dv = v.shape[-1]
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.float()
    decay = g.exp()  # (B, H, L)
    if doc_starts is not None:
        decay = decay * (~doc_starts).unsqueeze(1)  # exp(-inf) at a document start: forget everything
    outs = []
    for t in range(L):
        S = S * decay[:, :, t, None, None]
        k_t = k[:, :, t]  # (B, H, Dk)
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, S)  # what the memory returns for k_t
        delta = (v[:, :, t] - predicted) * beta[:, :, t, None]  # (B, H, Dv)
        S = S + k_t.unsqueeze(-1) * delta.unsqueeze(-2)  # rank-one write
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    o = torch.stack(outs, dim=1)  # (B, L, H, Dv)
    return o.to(out_dtype), S


class _UnitLowerInverse(torch.autograd.Function):
    """X = (I + strictly_lower(T))^-1 for a batch of square matrices (the diagonal of T is ignored).

    Forward is one batched triangular solve against the identity; backward is the closed form
    dT = -strictly_lower(X^T dX X^T), two batched matmuls. This is markedly cheaper on CPU than differentiating
    `solve_triangular` against the right-hand sides (a second batched solve in backward).
    """

    @staticmethod
    def forward(ctx, T: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(T.shape[-1], dtype=T.dtype, device=T.device).expand_as(T)
        X = torch.linalg.solve_triangular(T, eye, upper=False, unitriangular=True)
        ctx.save_for_backward(X)
        return X

    @staticmethod
    def backward(ctx, grad_X: torch.Tensor) -> torch.Tensor:
        (X,) = ctx.saved_tensors
        Xt = X.transpose(-1, -2)
        return -(Xt @ grad_X @ Xt).tril(-1)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    doc_starts: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule in chunkwise-parallel form; same arguments and results as `recurrent_gated_delta_rule`.

    Within a chunk, with cumulative log decay c_i = g_1 + ... + g_i and the decay matrix
    D_ij = exp(c_i - c_j) (i >= j, same document; else 0), the C sequential rank-one updates are equivalent to
        T = I + strictly_lower((beta k) k^T * D)                   (the UT transform)
        U = T^-1 (beta v),   W = T^-1 (beta k * exp(c))            (one batched triangular solve for all chunks)
    (T^-1 is formed explicitly, see `_UnitLowerInverse`) after which, for each chunk in order (S the state
    entering it):
        V' = U - W S                                               (new values minus what S already predicts)
        O  = (q * exp(c)) S + ((q k^T) * D) V'                     (read of the old state + intra-chunk attention)
        S  = exp(c_C) S + (k * exp(c_C - c))^T V'
    Everything but the last two lines is computed for all chunks at once.
    """
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    B, H, L, Dk = k.shape
    Dv = v.shape[-1]
    C = chunk_size
    pad = (C - L % C) % C
    if pad:  # zero padding at the end: g = 0, beta = 0, k = v = 0 leave the state untouched
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
        if doc_starts is not None:
            doc_starts = F.pad(doc_starts, (0, pad))
    N = (L + pad) // C
    q, k, v = (t.reshape(B, H, N, C, -1) for t in (q, k, v))  # (B, H, N, C, D)
    g, beta = g.reshape(B, H, N, C), beta.reshape(B, H, N, C)

    c = g.cumsum(dim=-1)  # (B, H, N, C) cumulative log decay inside each chunk
    c_last = c[..., -1:]  # (B, H, N, 1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay_in = c.exp()  # chunk start -> token i
    decay_out = (c_last - c).exp()  # token j -> chunk end
    decay_chunk = c_last.exp()  # whole chunk
    if doc_starts is None:
        allowed = causal  # (C, C)
    else:
        starts = doc_starts.reshape(B, 1, N, C)
        seg = starts.long().cumsum(dim=-1)  # (B, 1, N, C) document index inside each chunk
        allowed = causal & (seg.unsqueeze(-1) == seg.unsqueeze(-2))  # (B, 1, N, C, C)
        carry = seg == 0  # no document start at or before token i in this chunk: the old state survives
        decay_in = decay_in * carry
        decay_out = decay_out * (seg == seg[..., -1:])  # only the last document's tokens reach the next chunk
        decay_chunk = decay_chunk * carry[..., -1:]
    D = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~allowed, float("-inf")).exp()  # (B, H, N, C, C)

    k_beta = k * beta.unsqueeze(-1)  # (B, H, N, C, Dk)
    T = (k_beta @ k.transpose(-1, -2)) * D  # (B, H, N, C, C); its diagonal is ignored (unit triangular)
    T_inv = _UnitLowerInverse.apply(T)  # (B, H, N, C, C)
    U = T_inv @ (v * beta.unsqueeze(-1))  # (B, H, N, C, Dv)
    W = T_inv @ (k_beta * decay_in.unsqueeze(-1))  # (B, H, N, C, Dk)
    A = (q @ k.transpose(-1, -2)) * D  # (B, H, N, C, C) intra-chunk attention
    q_in = q * decay_in.unsqueeze(-1)  # (B, H, N, C, Dk) reads the state entering the chunk
    k_out = (k * decay_out.unsqueeze(-1)).transpose(-1, -2)  # (B, H, N, Dk, C) writes the state leaving it

    S = None if initial_state is None else initial_state.float()  # None: zero state, nothing to read
    outs = []
    # unbind (not indexing in the loop): its backward is one stack instead of a zero-filled copy per chunk.
    per_chunk = (t.unbind(dim=2) for t in (U, W, q_in, A, k_out, decay_chunk.unsqueeze(-1)))
    for U_n, W_n, q_n, A_n, k_n, decay_n in zip(*per_chunk, strict=True):
        if S is None:
            outs.append(A_n @ U_n)  # (B, H, C, Dv)
            S = k_n @ U_n  # (B, H, Dk, Dv)
            continue
        v_new = U_n - W_n @ S  # (B, H, C, Dv)
        outs.append(q_n @ S + A_n @ v_new)  # (B, H, C, Dv)
        S = S * decay_n + k_n @ v_new  # (B, H, Dk, Dv)
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, Dv)[:, :, :L]  # (B, H, L, Dv)
    return o.transpose(1, 2).to(out_dtype), S


# ----------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------


class RMSNormGated(nn.Module):
    """RMSNorm of the recurrence output followed by a SiLU gate: `w * norm(o) * silu(z)` (per head, over Dv).

    Weight initialised to ones (not zero-centred, unlike the model's other norms), as in the reference.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # (..., Dv), (..., Dv) -> (..., Dv)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(dtype)
        return (out * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer: projections -> short conv -> gated delta rule -> gated RMSNorm -> out_proj.

    Args:
        config: a `MiniQwen3NextConfig` (hidden_size, linear_* sizes, linear_conv_kernel_dim, rms_norm_eps).
        layer_idx: index of this layer (its slot in the cache).
    """

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim
        self.chunk_size = getattr(config, "linear_chunk_size", 64)
        self.conv_dim = 2 * self.key_dim + self.value_dim

        # Packed per key head: [q (Dk), k (Dk), v (r*Dv), z (r*Dv)] and [b (r), a (r)] with r = H / Hk.
        self.in_proj_qkvz = nn.Linear(self.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(self.hidden_size, 2 * self.num_v_heads, bias=False)
        # Depthwise kernel stored as nn.Conv1d (weight (Cc, 1, K)) for checkpoint compatibility; we never call its
        # forward (see `causal_conv1d`).
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim, bias=False,
            padding=self.conv_kernel_size - 1,
        )
        # Decay g = -exp(A_log) * softplus(a + dt_bias): a per-head rate times a data-dependent step (Mamba-2 style).
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads).uniform_(0.01, 16).log())
        self.norm = RMSNormGated(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)

    def _input_weight(self) -> torch.Tensor:
        """Both input projections as one (2*Hk*Dk + 2*H*Dv + 2*H, D) weight with rows regrouped by kind.

        The checkpoint layout interleaves per key head ([q, k, v, z] and [b, a] for each head); regrouping the
        weight rows (a copy of the small weight, not of the activations) makes one matmul produce
        [q | k | v | z | b | a] with every part contiguous, so the conv input needs no gather.
        """
        Hk, r = self.num_k_heads, self.num_v_heads // self.num_k_heads
        Dk, Dv, D = self.head_k_dim, self.head_v_dim, self.hidden_size
        qkvz = self.in_proj_qkvz.weight.view(Hk, 2 * Dk + 2 * r * Dv, D).split([Dk, Dk, r * Dv, r * Dv], dim=1)
        ba = self.in_proj_ba.weight.view(Hk, 2 * r, D).split([r, r], dim=1)
        return torch.cat([w.reshape(-1, D) for w in (*qkvz, *ba)])

    def _split_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Project; returns mixed qkv (B, L, Cc), z (B, L, H, Dv), b and a (B, L, H)."""
        B, L, _ = x.shape
        H = self.num_v_heads
        projected = F.linear(x, self._input_weight())  # (B, L, Cc + H*Dv + 2H)
        mixed_qkv, z, b, a = projected.split([self.conv_dim, self.value_dim, H, H], dim=-1)
        return mixed_qkv, z.reshape(B, L, H, self.head_v_dim), b, a

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        doc_starts: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """Mix tokens of `hidden_states` (B, L, D).

        Args:
            attention_mask: (B, L) 1 for real tokens; padding inputs are zeroed so they write nothing to the state.
            doc_starts: (B, L) bool, first token of each document (packed rows / left padding); None: one document.
            cache: a transformers `Cache` whose layer `layer_idx` is a linear-attention layer (conv + recurrent
                state), or None. Updated in place.
        """
        B, L, _ = hidden_states.shape
        if attention_mask is not None:
            hidden_states = hidden_states * attention_mask[:, -L:, None].to(hidden_states.dtype)

        conv_prev = recurrent_state = None
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx)  # (B, Cc, K) or None before the first call
            if conv_state is not None:
                conv_prev = conv_state.transpose(1, 2)  # (B, K, Cc)
            recurrent_state = cache.get_recurrent_state(self.layer_idx)  # (B, H, Dk, Dv) or None

        mixed_qkv, z, b, a = self._split_projections(hidden_states)
        kernel = self.conv1d.weight.squeeze(1)  # (Cc, K)
        mixed_qkv, new_conv_state = causal_conv1d(mixed_qkv, kernel, conv_prev, doc_starts)
        q, k, v = torch.split(mixed_qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, L, -1, self.head_k_dim)  # (B, L, Hk, Dk)
        k = k.reshape(B, L, -1, self.head_k_dim)  # (B, L, Hk, Dk)
        v = v.reshape(B, L, -1, self.head_v_dim)  # (B, L, H, Dv)

        beta = b.sigmoid()  # (B, L, H)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # (B, L, H), fp32 (A may overflow fp16)

        # The recurrence runs in fp32 even under autocast: bf16 matmuls in the state hand-over compound over chunks.
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            if cache is not None and recurrent_state is not None and L == 1:
                o, final_state = recurrent_gated_delta_rule(q, k, v, g, beta, recurrent_state, doc_starts)
            else:
                o, final_state = chunk_gated_delta_rule(
                    q, k, v, g, beta, recurrent_state, doc_starts, chunk_size=self.chunk_size
                )

        if cache is not None:
            # Passing exactly K inputs makes the cache keep exactly them (prefill or continuation alike).
            cache.update_conv_state(new_conv_state.transpose(1, 2).contiguous(), self.layer_idx,
                                    conv_kernel_size=self.conv_kernel_size)
            cache.update_recurrent_state(final_state, self.layer_idx)

        o = self.norm(o, z)  # (B, L, H, Dv)
        return self.out_proj(o.reshape(B, L, self.value_dim))
