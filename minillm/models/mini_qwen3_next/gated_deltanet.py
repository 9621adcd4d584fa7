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

On CUDA with flash-linear-attention (and causal-conv1d) installed, `fla_kernels.py` runs the rule (and the short
convolution) in those packages' kernels instead; the torch code here is the fallback everywhere else.

Parameter names and the packed layout of `in_proj_qkvz` / `in_proj_ba` follow transformers' `Qwen3NextGatedDeltaNet`,
so checkpoints convert by a plain copy. All recurrence math runs in fp32 (as the reference and the FLA kernels do).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minillm.models.layers.contiguous_grad import contiguous_grad
from minillm.models.layers.linear import Linear, linear
from minillm.models.mini_qwen3_next import fla_kernels


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(sum(x^2) + eps)` over the last dim (the FLA / transformers convention, eps inside the root)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------------------------------
# Short causal depthwise convolution
# ----------------------------------------------------------------------------------------------------------------


def _depthwise_conv(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`out[t] = sum_j weight[:, j] * window[t + j]`: window (B, K-1+L, Cc), weight (Cc, K) -> (B, L, Cc).

    A (1, K) depthwise conv2d over the channels-last view (B, Cc, 1, K-1+L) of the window: oneDNN's depthwise kernel
    reads and writes our (B, L, Cc) layout directly (no transposes, no tap loop), accumulating in fp32.
    """
    out = F.conv2d(window.transpose(1, 2).unsqueeze(2), weight[:, None, None, :], groups=weight.shape[0])
    return out.squeeze(2).transpose(1, 2)  # (B, L, Cc), a view: oneDNN keeps channels-last


class _CausalConv(torch.autograd.Function):
    """`_depthwise_conv` with a hand-written backward: oneDNN's depthwise backward is tens of times slower than its
    forward on CPU (its weight gradient), while the gradients here are one more conv and K multiply-reduce passes."""

    @staticmethod
    def forward(ctx, window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(window, weight)
        return _depthwise_conv(window, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        window, weight = ctx.saved_tensors
        K, L = weight.shape[-1], grad.shape[1]
        grad = grad.contiguous()  # (B, L, Cc)
        grad_window = grad_weight = None
        if ctx.needs_input_grad[0]:
            # window[s] reaches out[s - j] through weight[:, j]: correlate the zero-padded grad with the flipped kernel
            grad_window = _depthwise_conv(F.pad(grad, (0, 0, K - 1, K - 1)), weight.flip(-1))  # (B, K-1+L, Cc)
        if ctx.needs_input_grad[1]:
            taps = [(grad * window[:, j : j + L]).sum(dim=(0, 1), dtype=torch.float32) for j in range(K)]
            grad_weight = torch.stack(taps, dim=-1).to(weight.dtype)  # (Cc, K)
        return grad_window, grad_weight


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
    kernel = fla_kernels.conv_applies(x, prev)  # causal-conv1d's CUDA kernel (see fla_kernels.py)
    if prev is None:
        prev = x.new_zeros(B, K - 1, Cc)
    P = prev.shape[1]
    xx = torch.cat([prev.to(x.dtype), x], dim=1)  # (B, P+L, Cc)
    if doc_starts is None:
        state = xx[:, -K:] if xx.shape[1] >= K else F.pad(xx, (0, 0, K - xx.shape[1], 0))
        if kernel:
            return fla_kernels.causal_conv1d_kernel(x, weight), state
        # One depthwise conv (`_CausalConv`): ~2x faster than K multiply-adds on CPU, forward + backward.
        window = xx[:, P - (K - 1) :] if P >= K - 1 else F.pad(xx, (0, 0, K - 1 - P, 0))  # (B, K-1+L, Cc)
        out = _CausalConv.apply(window, weight.to(x.dtype))  # (B, L, Cc)
        return F.silu(out).to(x.dtype), state
    # Segment ids: the carried-in tokens belong to segment 0, each document start opens the next segment.
    seg = doc_starts.long().cumsum(dim=1)  # (B, L)
    seg_xx = torch.cat([seg.new_zeros(B, P), seg], dim=1)  # (B, P+L)
    if kernel:
        out = fla_kernels.causal_conv1d_kernel(x, weight, doc_starts)
    else:
        # Tap loop with a same-document mask per tap; taps accumulate in fp32 (one rounding at the end for bf16).
        w = weight.float()
        out = xx[:, P : P + L] * w[:, K - 1]
        for i in range(1, K):
            same_doc = (seg_xx[:, P - i : P - i + L] == seg).unsqueeze(-1)  # (B, L, 1)
            out = out + (xx[:, P - i : P - i + L] * same_doc) * w[:, K - 1 - i]
        out = F.silu(out).to(x.dtype)
    if xx.shape[1] < K:
        xx = F.pad(xx, (0, 0, K - xx.shape[1], 0))
        seg_xx = F.pad(seg_xx, (K - seg_xx.shape[1], 0))
    state = xx[:, -K:] * (seg_xx[:, -K:] == seg_xx[:, -1:]).unsqueeze(-1)  # (B, K, Cc)
    return out, state


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
    (T^-1 is formed explicitly, see `_UnitLowerInverse`). With S_n the state entering chunk n, only
        V'_n = U_n - W_n S_n                                       (new values minus what S_n already predicts)
        S_n+1 = exp(c_C) S_n + (k * exp(c_C - c))^T V'_n
    is sequential: two fused multiply-adds (`baddbmm`) per chunk. Everything else runs batched over all chunks:
    the UT transform before the loop, and after it the output
        O_n = (q * exp(c)) S_n + ((q k^T) * D) V'_n                (read of the old state + intra-chunk attention).
    Tensors are laid out chunk-major, (N, B, H, C, D), so per-chunk slices and the stacks after the loop are
    contiguous. q k^T and k k^T are computed once per key head and broadcast to its H/Hk value heads.
    """
    out_dtype = q.dtype
    B, L, Hk, Dk = k.shape
    H, Dv = v.shape[2], v.shape[3]
    r = H // Hk  # value heads per key head
    C = chunk_size
    # fp32 throughout; q and k L2-normalised at their own heads (q also scaled by 1/sqrt(Dk)).
    q, k, v, g, beta = q.float(), k.float(), v.float(), g.float(), beta.float()
    q = q * (torch.rsqrt((q * q).sum(dim=-1, keepdim=True) + 1e-6) * Dk**-0.5)  # = l2norm(q) / sqrt(Dk)
    k = l2norm(k)
    pad = (C - L % C) % C
    if pad:  # zero padding at the end: g = 0, beta = 0, k = v = 0 leave the state untouched
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
        if doc_starts is not None:
            doc_starts = F.pad(doc_starts, (0, pad))
    N = (L + pad) // C
    q = q.reshape(B, N, C, Hk, Dk).permute(1, 0, 3, 2, 4).contiguous()  # (N, B, Hk, C, Dk)
    k = k.reshape(B, N, C, Hk, Dk).permute(1, 0, 3, 2, 4).contiguous()  # (N, B, Hk, C, Dk)
    v = v.reshape(B, N, C, Hk, r, Dv).permute(1, 0, 3, 4, 2, 5)  # (N, B, Hk, r, C, Dv) view
    g = g.reshape(B, N, C, Hk, r).permute(1, 0, 3, 4, 2)  # (N, B, Hk, r, C) view
    beta = beta.reshape(B, N, C, Hk, r).permute(1, 0, 3, 4, 2)  # (N, B, Hk, r, C) view

    c = g.cumsum(dim=-1)  # (N, B, Hk, r, C) cumulative log decay inside each chunk
    c_last = c[..., -1:]  # (N, B, Hk, r, 1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay_in = c.exp()  # chunk start -> token i
    decay_out = (c_last - c).exp()  # token j -> chunk end
    decay_chunk = c_last.exp()  # whole chunk
    if doc_starts is None:
        allowed = causal  # (C, C)
    else:
        starts = doc_starts.reshape(B, N, C).transpose(0, 1)[:, :, None, None]  # (N, B, 1, 1, C)
        seg = starts.long().cumsum(dim=-1)  # document index inside each chunk
        allowed = causal & (seg.unsqueeze(-1) == seg.unsqueeze(-2))  # (N, B, 1, 1, C, C)
        carry = seg == 0  # no document start at or before token i in this chunk: the old state survives
        decay_in = decay_in * carry
        decay_out = decay_out * (seg == seg[..., -1:])  # only the last document's tokens reach the next chunk
        decay_chunk = decay_chunk * carry[..., -1:]
    D = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~allowed, float("-inf")).exp()  # (N, B, Hk, r, C, C)

    k_r = k.unsqueeze(3)  # (N, B, Hk, 1, C, Dk) broadcast over the r value heads
    kk = (k @ k.transpose(-1, -2)).unsqueeze(3)  # (N, B, Hk, 1, C, C)
    T = kk * (D * beta.unsqueeze(-1))  # (N, B, Hk, r, C, C); its diagonal is ignored (unit triangular)
    T_inv = _UnitLowerInverse.apply(T)
    U = T_inv @ (v * beta.unsqueeze(-1))  # (N, B, Hk, r, C, Dv)
    W = T_inv @ (k_r * (beta * decay_in).unsqueeze(-1))  # (N, B, Hk, r, C, Dk)
    A = (q @ k.transpose(-1, -2)).unsqueeze(3) * D  # (N, B, Hk, r, C, C) intra-chunk attention
    q_in = q.unsqueeze(3) * decay_in.unsqueeze(-1)  # (N, B, Hk, r, C, Dk) reads the state entering the chunk
    k_out = (k_r * decay_out.unsqueeze(-1)).transpose(-1, -2)  # (N, B, Hk, r, Dk, C) writes the state leaving it

    BH = B * H  # one batch dimension for the per-chunk matmuls of the loop
    if initial_state is None:
        S = q.new_zeros(BH, Dk, Dv)
    else:
        S = initial_state.float().reshape(BH, Dk, Dv)
    states, values = [], []
    # unbind (not indexing in the loop): its backward is one stack instead of a zero-filled copy per chunk.
    per_chunk = (
        U.reshape(N, BH, C, Dv).unbind(0),
        W.reshape(N, BH, C, Dk).unbind(0),
        k_out.reshape(N, BH, Dk, C).unbind(0),
        decay_chunk.reshape(N, BH, 1, 1).unbind(0),
    )
    for n, (U_n, W_n, k_n, decay_n) in enumerate(zip(*per_chunk, strict=True)):
        # (BH, C, Dv); a zero initial state predicts nothing
        v_new = U_n if n == 0 and initial_state is None else torch.baddbmm(U_n, W_n, S, alpha=-1)
        states.append(S)
        values.append(v_new)
        S = torch.baddbmm(S * decay_n, k_n, v_new)  # (BH, Dk, Dv)
    S_in = torch.stack(states).view(N, B, Hk, r, Dk, Dv)  # state entering each chunk
    V_new = torch.stack(values).view(N, B, Hk, r, C, Dv)
    # the permute below hands this product a permuted gradient: made contiguous for the batched matmuls
    o = contiguous_grad(A @ V_new + q_in @ S_in)  # (N, B, Hk, r, C, Dv)
    o = o.reshape(N, B, H, C, Dv).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, Dv)[:, :L]  # (B, L, H, Dv)
    return o.to(out_dtype), S.view(B, H, Dk, Dv)


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
        self.in_proj_qkvz = Linear(self.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(self.hidden_size, 2 * self.num_v_heads, bias=False)
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
        self.out_proj = Linear(self.value_dim, self.hidden_size, bias=False)

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
        projected = linear(x, self._input_weight())  # (B, L, Cc + H*Dv + 2H)
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
        # (fla's kernels take the bf16 activations and accumulate in fp32 themselves.)
        recurrent = cache is not None and recurrent_state is not None and L == 1
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            if fla_kernels.fla_applies(q, v):
                o, final_state = fla_kernels.gated_delta_rule(
                    q, k, v, g, beta, recurrent_state, doc_starts, recurrent=recurrent,
                    output_final_state=cache is not None,
                )
            elif recurrent:
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

    # -- decode fast path of our decode loop (minillm/models/decode.py) -----------------------------------------------
    @torch.no_grad()
    def begin_decode(self, cache: Any) -> DeltaNetDecodeState:
        """Copy this layer's conv window and recurrent state out of a prefilled cache, and make the per-session
        weights (the regrouped input projection `forward` rebuilds every call)."""
        conv = cache.get_conv_state(self.layer_idx)  # (B, Cc, K): the last K inputs
        return DeltaNetDecodeState(
            window=conv.transpose(1, 2).contiguous(),  # (B, K, Cc)
            state=cache.get_recurrent_state(self.layer_idx).float().clone(),  # (B, H, Dk, Dv)
            in_weight=self._input_weight(),
            kernel=self.conv1d.weight.squeeze(1),  # (Cc, K)
            neg_a=-self.A_log.float().exp(),  # (H,)
        )

    def decode_step(self, x: torch.Tensor, s: DeltaNetDecodeState) -> torch.Tensor:
        """One token per row, x (B, D) -> (B, D): the recurrent form of `forward` for L = 1 with a cache (the
        token is real: padding only ever precedes the prompt), updating `s` in place."""
        B = x.shape[0]
        H, Hk, Dk, Dv = self.num_v_heads, self.num_k_heads, self.head_k_dim, self.head_v_dim
        mixed, z, b, a = linear(x, s.in_weight).split([self.conv_dim, self.value_dim, H, H], dim=-1)
        # Short conv over the carried window: `causal_conv1d` itself, so decode rounds exactly as `forward` does.
        mixed, s.window = causal_conv1d(mixed.unsqueeze(1), s.kernel, s.window)  # (B, 1, Cc), (B, K, Cc)
        mixed = mixed[:, 0]  # (B, Cc)
        qk = l2norm(mixed[:, : 2 * self.key_dim].float().view(B, 2 * Hk, Dk))  # (B, 2Hk, Dk)
        q, k = qk[:, :Hk] * Dk**-0.5, qk[:, Hk:]  # (B, Hk, Dk) each
        if H != Hk:  # each key head serves H/Hk consecutive value heads
            q, k = q.repeat_interleave(H // Hk, dim=1), k.repeat_interleave(H // Hk, dim=1)  # (B, H, Dk)
        v = mixed[:, 2 * self.key_dim :].float().view(B, H, 1, Dv)
        beta = b.sigmoid().float().unsqueeze(-1).unsqueeze(-1)  # (B, H, 1, 1)
        decay = (s.neg_a * F.softplus(a.float() + self.dt_bias)).exp()  # (B, H)
        # The gated delta rule for one token, on the fp32 state (B, H, Dk, Dv).
        S = s.state.mul_(decay[:, :, None, None])
        k = k.unsqueeze(-2)  # (B, H, 1, Dk)
        delta = (v - k @ S) * beta  # (B, H, 1, Dv): what the memory mispredicts, scaled
        S.add_(k.transpose(-1, -2) * delta)  # rank-one write
        o = (q.unsqueeze(-2) @ S).to(x.dtype)  # (B, H, 1, Dv)
        o, z = o.view(B, H, Dv), z.view(B, H, Dv)
        if o.dtype == torch.float32:  # `self.norm(o, z)` in three ops
            o = F.rms_norm(o, (Dv,), self.norm.weight, self.norm.eps) * F.silu(z)  # (B, H, Dv)
        else:
            o = self.norm.forward(o, z)
        return linear(o.reshape(B, self.value_dim), self.out_proj.weight)


class DeltaNetDecodeState:
    """What `GatedDeltaNet.decode_step` keeps between tokens: the conv window (B, K, Cc) of the last K raw inputs,
    the fp32 recurrent state (B, H, Dk, Dv), and weights made once per decode (the regrouped input projection,
    the (Cc, K) conv kernel, -exp(A_log))."""

    def __init__(self, window, state, in_weight, kernel, neg_a) -> None:
        self.window = window
        self.state = state
        self.in_weight = in_weight
        self.kernel = kernel
        self.neg_a = neg_a
