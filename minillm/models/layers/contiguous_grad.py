"""`contiguous_grad(x)`: the identity, whose backward hands on a contiguous copy of the incoming gradient.

Some kernels are slow or refuse to run on the strided gradients autograd produces for views: the grouped_mm
backward rejects expanded gradients (the gradient of `.sum()` has zero strides), and CPU batched matmuls on a
permuted gradient take a slow per-matrix path. One copy where the gradient enters such a kernel is much cheaper.
"""

from __future__ import annotations

import torch


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """`x` unchanged; its gradient is made contiguous on the way back (see the module docstring)."""
    return _ContiguousGrad.apply(x)
