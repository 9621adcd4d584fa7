"""Attention as two batched matmuls around a softmax, with a hand-written backward: the CPU kernel for short rows.

Why: on a CPU, SDPA's fused kernel ("flash attention for CPU") computes in fp32 whatever the input dtype, and
its backward recomputes the scores block by block. For the short rows of CPU training that costs more than it
saves: in bf16 the (L, L) score matrix of a few hundred tokens is cheap to keep, and bf16 batched matmuls run at
twice the fp32 rate. Forward + backward of one layer at 2 threads (Zen 5; `scripts/bench_attention.py --dtype bf16
--plain-causal`, 1-8 rows, 4 query / 2 KV heads of 64, or 12 / 4): this kernel runs 1.5-2.2x SDPA's speed at
L = 256, 1.2-1.4x at 512 and 0.7-0.8x at 1,024, where the (L, L) matrices outgrow the caches (`MATH_MAX_LEN`).
With query/key head dims that differ from the value head dim (MLA: 96 and 64) SDPA has no fused CPU kernel and
runs its composite math path: this kernel is 2.7-3.5x faster in bf16 up to 2,048 tokens (`MATH_MAX_LEN_UNFUSED`)
and 1.07x in fp32 up to 512 (0.93x at 1,024). In fp32 with equal head dims it is slower than SDPA (0.9x at 256:
MKL runs fp32 batched matmuls at half oneDNN's rate), so `math_attention_applies` leaves that case to SDPA.

What it computes is SDPA's result with `enable_gqa`: scores = (q * scale) k^T per KV group (the G query heads of
a group are stacked into one (G * L, D) matrix, so no K/V copy), masked with -inf where a query may not look
(causal or a boolean mask, True = may attend), softmax, then P v. The backward is the textbook one:
dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)) (torch's softmax backward), dQ = dS K scale,
dK = dS^T Q scale. It keeps P (B, H, L, L) in the compute dtype for the backward: 2 MB per layer for 4 rows x 256
tokens x 4 heads in bf16; beyond `MATH_MAX_SCORES` scores per layer the dispatch keeps SDPA, whose fused kernel
keeps none.

In bf16 the scores are rounded to bf16 before the softmax (which computes in fp32 internally): the precision of
transformers' "eager" attention. Every row must have one key it may see (the attention module guarantees it: a
query always sees itself), else its softmax is NaN.
"""

from __future__ import annotations

import torch

MATH_MAX_LEN = 512  # longer rows: SDPA's fused kernel (0.7-0.8x at 1,024 tokens in bf16)
MATH_MAX_LEN_UNFUSED = 2048  # bf16/fp16 with unequal head dims, where SDPA has no fused CPU kernel
MATH_MAX_SCORES = 1 << 25  # B * H * L * L per layer: the probabilities kept for backward, 64 MB in bf16 (128 in fp32)


def math_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compute_dtype: torch.dtype,
                           dropout_p: float = 0.0) -> bool:
    """Whether the automatic dispatch takes this kernel: a CPU forward without past (training, prefill) in bf16/fp16,
    or with MLA's unequal head dims in any dtype, without dropout, within the length and score-count limits (see the
    module docstring for the measurements behind them)."""
    bsz, heads, q_len, qk_dim = q.shape
    if q.device.type != "cpu" or dropout_p or q_len != k.shape[2] or q_len < 2:
        return False
    fused_sdpa = qk_dim == v.shape[-1]  # SDPA has a fused CPU kernel for these
    low_precision = compute_dtype in (torch.bfloat16, torch.float16)
    if fused_sdpa and not low_precision:
        return False
    max_len = MATH_MAX_LEN if fused_sdpa or not low_precision else MATH_MAX_LEN_UNFUSED
    return q_len <= max_len and bsz * heads * q_len * q_len <= MATH_MAX_SCORES


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """q (B, H, L, D), k (B, Hk, L, D), v (B, Hk, L, Dv) -> (B, H, L, Dv) in q's dtype; causal when `mask` is None,
    else `mask` (B or 1, 1, L, L), True = may attend. Hk must divide H (grouped-query attention)."""
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"math attention needs as many queries as keys (no past), got {q.shape[2]} and {k.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{k.shape[1]} key/value heads do not divide {q.shape[1]} query heads")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"math attention takes a boolean mask, got {mask.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _MathAttention.apply(q, k, v, mask, scale)


class _MathAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        bsz, heads, seq_len, qk_dim = q.shape
        kv_heads, groups = k.shape[1], heads // k.shape[1]
        if torch.compiler.is_compiling():  # the compiler drops `out=` and keeps q's layout, which `view` needs
            q_scaled = (q * scale).contiguous()
        else:
            q_scaled = torch.mul(q, scale, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))  # contiguous
        q_groups = q_scaled.view(bsz, kv_heads, groups * seq_len, qk_dim)  # a group's heads stacked
        scores = torch.matmul(q_groups, k.transpose(-1, -2))  # (B, Hk, G * L, L)
        if mask is None:
            blocked = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu_(1)  # (L, L)
        else:
            blocked = mask.logical_not().unsqueeze(2)  # (B or 1, 1, 1, L, L)
        scores.view(bsz, kv_heads, groups, seq_len, seq_len).masked_fill_(blocked, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        del scores
        out = torch.matmul(probs, v)  # (B, Hk, G * L, Dv)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return out.view(bsz, heads, seq_len, v.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        bsz, heads, seq_len, qk_dim = q.shape
        kv_heads, groups = k.shape[1], heads // k.shape[1]
        grad_groups = grad_out.reshape(bsz, kv_heads, groups * seq_len, v.shape[-1])  # (B, Hk, G * L, Dv)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_groups) if ctx.needs_input_grad[2] else None
        grad_probs = torch.matmul(grad_groups, v.transpose(-1, -2))  # (B, Hk, G * L, L)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        del grad_probs
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale).view(bsz, heads, seq_len, qk_dim)
        if ctx.needs_input_grad[1]:
            q_groups = q.reshape(bsz, kv_heads, groups * seq_len, qk_dim)
            grad_k = torch.matmul(grad_scores.transpose(-1, -2), q_groups).mul_(ctx.scale)  # (B, Hk, L, D)
        return grad_q, grad_k, grad_v, None, None
