"""Routed experts for mixture-of-experts layers: token dispatch plus grouped expert matmuls.

Shared by `mini_deepseekv3` and `mini_qwen3_next`. The router (which experts, with which weights) belongs to each
model; this module only runs the chosen experts efficiently.

Notable choices:
- Expert weights are fused 3-D tensors in the transformers 5 layout (`gate_up_proj` [E, 2I, D] with the gate rows
  first, `down_proj` [E, D, I]), so converting to and from the reference models is a plain copy.
- The work is split in three steps so expert parallelism slots its all-to-all in between (`expert_parallel`):
  `dispatch` (sort the token-slots by expert: a permutation and per-expert counts), `RoutedExperts.compute`
  (run every expert on its contiguous block of rows), `combine` (weight, unsort, sum the top-k slots per token).
- `grouped_mm` runs one matmul per expert over jagged row blocks without a Python loop: `torch.nn.functional
  .grouped_mm` (or `torch._grouped_mm`) where the kernel applies (CPU fp32/bf16/fp16 with torch >= 2.9; CUDA bf16
  on SM80+; 16-byte aligned strides everywhere), else a padded batched matmul (`torch.bmm` over
  [E, max_count, D]). Both give exact zeros (and zero gradients) for experts that receive no tokens.
- The combine step sums the K weighted expert outputs of a token with a reshape + sum (deterministic, unlike
  `index_add_` on CUDA) in the promoted dtype of the routing weights (fp32 routers keep the sum in fp32).

Shape legend: T tokens, K experts per token (top-k), S = T*K token-slots, E experts, D hidden size, I expert
intermediate size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minillm.models.layers.contiguous_grad import contiguous_grad
from minillm.models.layers.kernel_choice import KernelChoice
from minillm.models.layers.linear import row_bucket
from minillm.models.layers.loss import IGNORE_INDEX

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# The CPU kernel of grouped_mm first shipped in torch 2.9; torch <= 2.10 also needs 16-byte aligned pointers.
_TORCH_VERSION = torch.torch_version.TorchVersion(torch.__version__)
_CPU_KERNEL = _GROUPED_MM is not None and _TORCH_VERSION >= "2.9"
_CPU_NEEDS_ALIGNMENT = _TORCH_VERSION < "2.11"


def expert_counts(
    topk_idx: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Number of token-slots routed to each expert: LongTensor [E].

    `token_mask` (T,) (1 = real token) leaves padding out: padding is not load (design.md, `expert_counts`).
    Uses `scatter_add_` on integers rather than `bincount`, which would need a device-to-host sync on CUDA.
    """
    flat = topk_idx.reshape(-1)  # (S,)
    ones = torch.ones_like(flat)
    if token_mask is not None:
        ones = token_mask.to(flat.dtype).repeat_interleave(topk_idx.shape[-1])  # (S,): slots of token t
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, ones)  # (E,)


def micro_batch_share(targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor | float:
    """The weight of a per-micro-batch balance loss: this micro-batch's share of the global targets.

    With `num_items_in_batch` the trainer sums micro-batch losses (gradient accumulation) and averages ranks, so a
    per-micro-batch mean (router / sequence balance loss) weighted by `local targets / num_items_in_batch` is
    averaged over the global batch instead of multiplied by the number of micro-batches. Without it: 1.
    `targets` are the shifted LM targets (-100 = ignored).
    """
    if num_items_in_batch is None:
        return 1.0
    local = (targets != IGNORE_INDEX).sum()
    return local / torch.as_tensor(num_items_in_batch, device=local.device)


@dataclass
class RoutingPlan:
    """How the token-slots of one MoE layer are laid out in expert order.

    `order[j]` is the flat slot index (token * K + k) of sorted row j; `token_idx[j]` its token; `counts[e]` how
    many sorted rows belong to expert e (rows of expert e are contiguous, experts in increasing order).
    """

    order: torch.Tensor  # (S,) long
    token_idx: torch.Tensor  # (S,) long
    counts: torch.Tensor  # (E,) long
    num_tokens: int
    top_k: int


def dispatch(topk_idx: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Sort the (token, k) slots by expert. topk_idx (T, K) -> RoutingPlan.

    The sort is stable, so within an expert the rows keep token order (deterministic results).
    """
    num_tokens, top_k = topk_idx.shape
    flat = topk_idx.reshape(-1)  # (S,)
    order = torch.sort(flat, stable=True).indices  # (S,)
    return RoutingPlan(
        order=order,
        token_idx=order // top_k,
        counts=expert_counts(flat, num_experts),
        num_tokens=num_tokens,
        top_k=top_k,
    )


def combine(expert_out: torch.Tensor, plan: RoutingPlan, topk_weight: torch.Tensor) -> torch.Tensor:
    """Weight the expert outputs, restore token order and sum each token's K slots.

    expert_out (S, D) in expert order, topk_weight (T, K) -> (T, D) in the promoted dtype of the two inputs.
    """
    weights = topk_weight.reshape(-1).index_select(0, plan.order)  # (S,)
    weighted = expert_out * weights.unsqueeze(-1)  # (S, D)
    arange = torch.arange(plan.order.numel(), device=plan.order.device)
    inverse = torch.empty_like(plan.order).scatter_(0, plan.order, arange)  # slot -> sorted row
    # index_select: its backward is an index_add, much faster on CPU than the index_put of `tensor[idx]`
    per_slot = weighted.index_select(0, inverse)  # (S, D) in slot order: token-major, then k
    return per_slot.view(plan.num_tokens, plan.top_k, expert_out.shape[-1]).sum(dim=1)  # (T, D)


def _aligned(t: torch.Tensor) -> bool:
    """Whether `t` starts on a 16-byte boundary.

    Under torch.compile it is taken as aligned: `data_ptr()` (and `storage_offset()`) would break the compiled
    layer's graph at every expert product, and there the operands are buffers the graph allocates itself or the
    expert weights (transposed views of parameters at offset 0), whose storages PyTorch's allocators align (CUDA's
    caching allocator to 512 bytes, the CPU's to 64; the CPU kernel asks only with torch < 2.11). A misaligned
    operand would make the kernel raise, not compute wrong numbers."""
    if torch.compiler.is_compiling():
        return True
    return t.data_ptr() % 16 == 0


@torch.compiler.assume_constant_result  # a compiled graph takes the answer as a constant (no graph break)
def _sm80_or_newer(device: torch.device) -> bool:
    """Whether this CUDA device is Ampere (compute capability 8.0) or newer, where grouped_mm has bf16 kernels."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _strides_aligned(t: torch.Tensor) -> bool:
    """The kernels need every non-unit stride to be a multiple of 16 bytes (e.g. rows of 4 fp32 or 8 bf16)."""
    return all((stride * t.element_size()) % 16 == 0 for stride in t.stride() if stride != 1)


def grouped_mm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused grouped_mm kernel can run `x (S, IN) @ weight (G, IN, OUT)` on this device and dtype."""
    if _GROUPED_MM is None or x.dtype != weight.dtype or x.device != weight.device:
        return False
    if not (_strides_aligned(x) and _strides_aligned(weight)):
        return False
    if x.device.type == "cpu":
        if not _CPU_KERNEL or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        return not _CPU_NEEDS_ALIGNMENT or (_aligned(x) and _aligned(weight))
    if x.device.type == "cuda":
        # The CUDA kernels take bf16 on SM80+ and need 16-byte aligned base pointers.
        if x.dtype != torch.bfloat16 or not _sm80_or_newer(x.device):
            return False
        return _aligned(x) and _aligned(weight)
    return False


def _padded_bmm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Fallback grouped matmul: scatter the rows into a zero-padded [G, max_count, IN] block and use `torch.bmm`.

    Costs one host sync (the largest count) and the padding FLOPs, but no Python loop over experts.
    """
    num_groups = weight.shape[0]
    num_rows = x.shape[0]
    capacity = int(counts.max()) if num_rows > 0 else 0
    group_of_row = torch.repeat_interleave(
        torch.arange(num_groups, device=x.device), counts, output_size=num_rows
    )  # (S,)
    starts = torch.cumsum(counts, 0) - counts  # (G,)
    slot = torch.arange(num_rows, device=x.device) - starts[group_of_row]  # (S,)
    padded = x.new_zeros(num_groups, capacity, x.shape[-1]).index_put((group_of_row, slot), x)  # (G, C, IN)
    out = torch.bmm(padded, weight)  # (G, C, OUT)
    return out[group_of_row, slot]  # (S, OUT)


@torch.compiler.disable
def _grouped_mm_outside_graph(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The grouped_mm kernel run eagerly from inside a compiled region: the compiler's shape rule for it accepts
    only bf16 (the CUDA kernel's dtype) while the CPU kernel also takes fp32 and fp16, so `--compile` of a MoE
    model in those dtypes would fail to trace. One graph break per MoE layer; the kernel is the same."""
    return contiguous_grad(_GROUPED_MM(x, weight, offs=offsets))


# CPU bf16/fp16 expert products: "bucketed" pads each expert's rows to its `row_bucket` size (the default),
# "exact" runs the unpadded groups (to measure what the padding saves: `MINILLM_MOE_GROUP_SIZES=exact`).
CPU_GROUP_SIZES = ("bucketed", "exact")
_GROUP_SIZE_CHOICE = KernelChoice("CPU expert group sizes", "MINILLM_MOE_GROUP_SIZES", CPU_GROUP_SIZES)


def force_moe_group_sizes(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Pin the CPU expert group sizes ("bucketed" / "exact") inside a `with` block (tests, benchmarks)."""
    return _GROUP_SIZE_CHOICE.force(name)


@torch.compiler.disable
def _grouped_mm_in_row_buckets(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """grouped_mm on the CPU in bf16/fp16 with every group padded by zero rows to its `row_bucket` size.

    oneDNN builds (JIT-compiles) a kernel for each new matrix shape and caches it. The experts' row counts change
    every step, so unpadded, each expert product of a step met a new shape: 1.2 ms per product against 0.08 ms for
    a cached one (Intel AMX, 2 threads, bf16). Padded, the sizes recur after the first steps; the zero rows add
    exact zeros to the weight gradients. On the CPU `counts` is host memory: reading it waits for nothing.
    Under `--compile` it runs eagerly from inside the compiled layer (one graph break per expert product): the
    padding reads the counts on the host, and a compiled graph without it met new shapes as often as eager code
    (mini_deepseekv3 compiled in bf16 ran at 0.83x its fp32 speed on an Intel Xeon).
    """
    counts = counts.to(torch.int32)
    padded_counts = torch.tensor([row_bucket(c) for c in counts.tolist()], dtype=torch.int32)
    padding = padded_counts - counts
    shift = torch.cumsum(padding, 0) - padding  # (G,) zero rows placed before each group
    group_of_row = torch.repeat_interleave(torch.arange(counts.numel()), counts, output_size=x.shape[0])  # (S,)
    rows = torch.arange(x.shape[0]) + shift[group_of_row]  # (S,) each row's place among the padded rows
    x_padded = x.new_zeros(int(padded_counts.sum()), x.shape[-1]).index_copy(0, rows, x)
    out = _GROUPED_MM(x_padded, weight, offs=torch.cumsum(padded_counts, 0, dtype=torch.int32))
    return contiguous_grad(out).index_select(0, rows)


def grouped_mm(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """Jagged per-group matmul: rows [offset_g, offset_g + counts[g]) of x are multiplied by weight[g].

    x (S, IN) sorted by group, weight (G, IN, OUT) (a transposed view is fine), counts (G,) summing to S
    -> (S, OUT). `backend` forces "grouped_mm" or "padded" (tests); None picks the kernel where it applies.
    Under autocast both operands are cast to the autocast dtype (grouped_mm is not autocast-aware).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    elif x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    if backend is None:
        backend = "grouped_mm" if grouped_mm_applies(x, weight) else "padded"
    if backend == "grouped_mm":
        if (device_type == "cpu" and x.dtype != torch.float32
                and (_GROUP_SIZE_CHOICE.pinned() or "bucketed") == "bucketed"):
            return _grouped_mm_in_row_buckets(x, weight, counts)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # (G,) end of each group
        if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
            return _grouped_mm_outside_graph(x, weight, offsets)
        return contiguous_grad(_GROUPED_MM(x, weight, offs=offsets))
    if backend == "padded":
        return _padded_bmm(x, weight, counts)
    raise ValueError(f"unknown grouped_mm backend {backend!r} (expected 'grouped_mm' or 'padded')")


class RoutedExperts(nn.Module):
    """E SwiGLU experts with fused weights, run on the token-slots the router chose.

    forward(x (T, D), topk_idx (T, K), topk_weight (T, K)) -> (T, D): the sum over k of
    topk_weight[t, k] * expert_{topk_idx[t, k]}(x[t]).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.backend = backend  # None: grouped_mm where it applies; "padded" / "grouped_mm" to force one
        # Set by `minillm.parallel.expert_parallel` when this module holds only this rank's slice of the experts:
        # an object whose `compute(experts, x_sorted, counts)` sends the rows to their experts' ranks (all-to-all)
        # and runs `experts.compute` on the rows received. None: all experts are local.
        self.expert_parallel = None
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))  # (E, 2I, D)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # (E, D, I)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def compute(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run each expert on its block of rows. x_sorted (S, D) in expert order, counts (E,) -> (S, D).

        This is the step expert parallelism wraps: it only needs the rows and how many belong to each expert.
        """
        gate_up = grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), counts, self.backend)  # (S, 2I)
        gate, up = gate_up.chunk(2, dim=-1)  # (S, I) each
        hidden = F.silu(gate) * up  # (S, I)
        return grouped_mm(hidden, self.down_proj.transpose(1, 2), counts, self.backend)  # (S, D)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        plan = dispatch(topk_idx, self.num_experts)
        x_sorted = x.index_select(0, plan.token_idx)  # (S, D)
        if self.expert_parallel is not None:
            out_sorted = self.expert_parallel.compute(self, x_sorted, plan.counts)  # (S, D)
        else:
            out_sorted = self.compute(x_sorted, plan.counts)  # (S, D)
        return combine(out_sorted, plan, topk_weight).to(x.dtype)  # (T, D)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"
