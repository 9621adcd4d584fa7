"""The models' fp32 matmuls on the CPU through oneDNN; torch's default kernels everywhere else.

Why: on the CPU torch runs fp32 `mm` / `linear` through MKL, and MKL chooses its code path by CPU vendor. On an AMD
Zen 5 (full-width AVX-512) it runs its AVX2 kernels, at half of what the cores can do. oneDNN, which torch also
ships (every bf16 CPU matmul already runs in it), dispatches on the instruction sets the CPU reports, and computes
in fp32 with fp32 accumulation. Measured at 2 threads on a Zen 5 EPYC: a 2048^3 fp32 matmul runs at 207 GFLOP/s
through `torch.mm` and at 435-460 GFLOP/s through oneDNN; the models' own shapes (1,024 x 256 x 512 ...) gain as
much, and their whole fp32 training step runs 1.3-1.6x faster (README, "Measured results").

torch reaches oneDNN's fp32 matmul only through `torch.ops.mkldnn._linear_pointwise` (the CPU linear op of
torch.compile's inductor: dense tensors in and out, any strides, no autograd). `mm` calls it for `a @ b`, and
`linear` wraps it in an autograd Function whose backward is two more of those matmuls.

On an Intel CPU MKL runs its own best code, and there it is the faster of the two (`default_cpu_matmul_backend`).

Where it applies (`onednn_applies`): on non-Intel x86-64 by default (see `cpu_matmul_backend`), for CPU tensors, both operands
fp32, products of at least a million multiply-adds (below that a oneDNN call's fixed cost outweighs its speed),
outside CPU autocast (under bf16 autocast torch already runs oneDNN), when torch has the op. Under torch.compile the
kernel is called through the custom op `minillm::onednn_linear` (inductor would otherwise put MKL back: it lowers
`_linear_pointwise` only for frozen inference weights).
`MINILLM_CPU_MATMUL=torch` (or `force_cpu_matmul("torch")`) keeps torch's default for a process or a block: the
benchmarks compare both, and a user can rule the kernel out.
"""

from __future__ import annotations

import contextlib
import platform

import torch
import torch.nn.functional as F
from torch import nn

from minillm.models.layers.kernel_choice import KernelChoice

CPU_MATMUL_BACKENDS = ("onednn", "torch")
_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
MIN_ONEDNN_MACS = 1 << 20  # smaller products stay in torch's kernel (see `onednn_applies`)


def row_bucket(rows: int) -> int:
    """`rows` rounded up to the next size of a short ladder: multiples of 32 up to 256, then 8 steps per doubling
    (256, 288, ..., 480, 512, 576, ...), so at most 1/8 of the rows are padding and a few dozen sizes recur.

    Why: oneDNN (every bf16 CPU matmul, and our fp32 one on non-Intel CPUs) JIT-compiles a kernel for each new
    matrix shape and caches it, about a millisecond each. Sizes that change every step (the experts' row counts,
    the target rows of an SFT batch, its padded length) are padded to this ladder, so the shapes recur.
    """
    step = max(32, 1 << max(rows.bit_length() - 4, 0))
    return -(-rows // step) * step


CPUINFO = "/proc/cpuinfo"  # Linux's description of the CPU, read for its vendor_id line


def cpu_vendor() -> str:
    """The x86 CPU's maker, "intel", "amd" or "other", as `CPUINFO` (Linux) or `platform.processor()` names it."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as handle:
            text = next((line for line in handle if line.startswith("vendor_id")), "")
    except OSError:
        text = platform.processor()
    if "GenuineIntel" in text or text.startswith("Intel"):
        return "intel"
    return "amd" if "AuthenticAMD" in text or "AMD" in text else "other"


def default_cpu_matmul_backend() -> str:
    """oneDNN on x86 CPUs not made by Intel, where MKL runs generic AVX2 code; torch's MKL on Intel's, where MKL
    runs its best code: the mini_llama3 fp32 trainer ran 15% faster on MKL than on oneDNN there (Xeon with AMX,
    2 threads: 5,119-5,197 against 4,433-4,461 tokens/s). torch's kernels on other architectures (not measured)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "torch"
    return "torch" if cpu_vendor() == "intel" else "onednn"


_DEFAULT_BACKEND = default_cpu_matmul_backend()
_BACKEND_CHOICE = KernelChoice("CPU matmul backend", "MINILLM_CPU_MATMUL", CPU_MATMUL_BACKENDS)


def force_cpu_matmul(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Run the fp32 CPU matmuls of this block through `name` ("onednn" or "torch"; None: as `cpu_matmul_backend`
    decides without it)."""
    return _BACKEND_CHOICE.force(name)


def cpu_matmul_backend() -> str:
    """The backend fp32 CPU matmuls use now: `force_cpu_matmul`'s, else `MINILLM_CPU_MATMUL`'s, else
    `default_cpu_matmul_backend()`'s ("onednn" on AMD and other non-Intel x86-64 CPUs, "torch" on Intel's and on
    other architectures). "onednn" falls back to "torch" when torch lacks the kernel."""
    name = _BACKEND_CHOICE.pinned() or _DEFAULT_BACKEND
    return name if name == "torch" or onednn_available() else "torch"


_ONEDNN_PROBE: dict[str, bool] = {}  # the probe's answer, once computed (a dict, not functools.cache: dynamo
# traces through a cache wrapper and would run the probe inside a compiled graph)


@torch.compiler.assume_constant_result  # compiled graphs take the probe's answer as a constant
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear kernel and it computes a probe product right, whatever the backend
    setting says. The kernel is an internal op of torch: a torch whose op changed its signature or results falls
    back to torch's kernels instead of failing or training wrong. Probed once per process (`cache_clear` forgets)."""
    if "ok" not in _ONEDNN_PROBE:
        _ONEDNN_PROBE["ok"] = _probe_onednn()
    return _ONEDNN_PROBE["ok"]


onednn_available.cache_clear = _ONEDNN_PROBE.clear


def _probe_onednn() -> bool:
    if _ONEDNN_LINEAR is None or not torch.backends.mkldnn.is_available():
        return False
    x, weight = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3)
    try:
        return bool(torch.equal(_onednn_linear(x, weight), x @ weight.t()))
    except (RuntimeError, TypeError):
        return False


def onednn_applies(a: torch.Tensor, b: torch.Tensor, macs: int) -> bool:
    """Whether a product of operands `a` and `b` (a linear's input and weight, or the two sides of `a @ b`) with
    `macs` multiply-adds runs through oneDNN (see the module docstring).

    Below `MIN_ONEDNN_MACS` torch's kernel stays: a oneDNN call costs about 10 us more than MKL's before any
    arithmetic, which decides products of under a million multiply-adds (the one-token decode steps of the tiny
    presets: 1 x 64 x 300 takes 2.7 us in MKL, 12 us in oneDNN; at 2 threads the two cross near 1-2 million).
    """
    return (
        macs >= MIN_ONEDNN_MACS
        and a.device.type == "cpu"
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and cpu_matmul_backend() == "onednn"
    )


@torch.library.custom_op("minillm::onednn_linear", mutates_args=())
def _compiled_onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear as an opaque op for torch.compile: inductor lowers `_linear_pointwise` only for frozen
    (inference) weights, so compiled graphs call the kernel through this op instead."""
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], None)


@_compiled_onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` for x (M, K) and weight (N, K), any strides, in oneDNN (a contiguous (M, N) result).
    Eager code calls the kernel directly (a custom op's dispatch costs microseconds per call).

    The kernel runs at full speed on a weight that is contiguous or a transposed contiguous matrix. Any other
    layout (a broadcast with zero strides, a slice of wider rows) sends it to a reference kernel about 2,000x
    slower: 1.4 s instead of 0.6 ms for 1,024 x 256 x 512. Weight gradients hit that whenever the output's gradient
    is a broadcast (a loss that is `out.sum()`), since it becomes the weight operand of `onednn_mm`. Such weights
    are copied first. `x` may have any layout: the kernel itself copies one that is not contiguous."""
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        weight = weight.contiguous()
    if torch.compiler.is_compiling():
        return _compiled_onednn_linear(x, weight, bias)
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], None)


def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` (2-D) in oneDNN, unconditionally.

    The kernel copies its first operand when that is not contiguous (a transposed view, as in every weight
    gradient `grad.T @ x`), and that transposing copy can cost half as much as the product itself. So when `a` is
    not contiguous, the product may instead be formed as `(b.T @ a.T).T`, whichever of `a` and `b.T` is cheaper to
    make contiguous (nothing, when `b` is itself a transposed view). The result is then a transposed view of a
    contiguous tensor. In the chunked loss's head gradient this turns a copy of the (tokens x vocabulary) softmax
    into one of the (tokens x hidden) input: 15 ms less per mini_llama3 step.
    """
    copy_a = 0 if a.is_contiguous() else a.numel()
    copy_bt = 0 if b.t().is_contiguous() else b.numel()
    if copy_a <= copy_bt:
        return _onednn_linear(a, b.t())
    return _onednn_linear(b.t(), a).t()


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for 2-D a (M, K) and b (K, N): oneDNN for fp32 on the CPU (possibly as a transposed view, see
    `onednn_mm`), `torch.mm` otherwise. No autograd through the oneDNN kernel: for use inside autograd Functions
    (the linear below, the chunked loss)."""
    if onednn_applies(a, b, a.shape[0] * a.shape[1] * b.shape[1]):
        return onednn_mm(a, b)
    return torch.mm(a, b)


def addmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`out += a @ b` in place (2-D): one `addmm_` with torch's kernels, a product and an add with oneDNN's."""
    if onednn_applies(a, b, a.shape[0] * a.shape[1] * b.shape[1]):
        return out.add_(onednn_mm(a, b))
    return out.addmm_(a, b)


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear` with oneDNN matmuls forward and backward (x (..., K), weight (N, K), bias (N,) or None).

    Saves the weight tensor itself, not a view of it, so DeepSpeed ZeRO-3 (which swaps a parameter's data in and
    out around each module) finds the gathered weight again in backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = _onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias)  # (M, N)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])  # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad2, weight.t()).view(x.shape)  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            grad_w = onednn_mm(grad2.t(), x.reshape(-1, x.shape[-1]))  # (N, M) @ (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(dim=0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN for fp32 on the CPU (with autograd)."""
    if onednn_applies(x, weight, x.numel() * weight.shape[0]) and (bias is None or bias.dtype == torch.float32):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, names and initialisation) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
