"""RMSNorm, the normalisation of all three architectures.

Two variants share one module:
- the Llama/DeepSeek form `w * x / rms(x)` with `w` initialised to ones, and
- the zero-centered Qwen3-Next form `(1 + w) * x / rms(x)` with `w` stored as an offset initialised to zeros, so
  weight decay pulls the scale toward 1 instead of toward 0.

The statistics are always computed in fp32 and the result cast back to the input dtype. The order of the final
multiply follows each reference exactly (Llama multiplies after the cast back, Qwen3-Next before), so our outputs are
bit-identical to transformers' in every dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square before the reciprocal square root.
        zero_centered: store the weight as an offset from 1 (Qwen3-Next) instead of the scale itself.
    """

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def reset_parameters(self) -> None:
        """Identity initialisation: scale 1 in both variants."""
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        # `F.rms_norm` computes x * rsqrt(mean(x^2) + eps) (* weight) as the references do, in one fused kernel
        # forward and backward on a GPU, where the separate ops cost 6 + 10 memory-bound kernels per norm.
        input_dtype, shape = x.dtype, (x.shape[-1],)
        if self.zero_centered:
            # Scale in fp32, then cast (as Qwen3-Next does).
            return F.rms_norm(x.float(), shape, 1.0 + self.weight.float(), self.eps).to(input_dtype)
        if input_dtype == self.weight.dtype == torch.float32:  # e.g. the residual stream under autocast
            return F.rms_norm(x, shape, self.weight, self.eps)
        # Cast, then scale in the weight's dtype (as Llama does).
        return self.weight * F.rms_norm(x.float(), shape, eps=self.eps).to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, zero_centered={self.zero_centered}"
