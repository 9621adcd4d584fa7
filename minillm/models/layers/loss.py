"""Chunked cross-entropy through the output head: the LM loss without the full logits.

The logits of a batch are large (B x L x V fp32: 8 x 2048 x 32k = 2 GiB), and a plain `lm_head` + `cross_entropy`
keeps them, their softmax and their gradient alive at once. Here the head and the loss run over chunks of tokens in
one autograd Function that, for each chunk, computes the logits, the loss and right away the gradients with respect
to the hidden states and the head weight (`softmax - one_hot`), then drops the chunk. Forward + backward cost the
same three matmuls as the plain version, and peak memory holds one chunk of logits instead of all of them.

Notable choices:
- Only target tokens go through the head (rows whose target is -100 are dropped first): in SFT most are prompts.
  Which rows those are is found on the host for the trainer's batches (`target_rows`), not read from the device.
- The gradients are computed during forward only when autograd needs them (evaluation pays just the loss).
- Logits are upcast to fp32 for the softmax, as transformers does; the matmuls run in the input dtype (bf16
  under autocast), and in fp32 on a CPU through oneDNN (`layers/linear.py`: `mm`, `addmm_`). The head weight's
  gradient is summed over the chunks in fp32.
- In bf16/fp16 the softmax, the loss and `d_logits` of a chunk run as one `torch.compile`d kernel
  (`_fused_softmax_loss`) on a CUDA GPU, and on a CPU for chunks larger than its caches; `MINILLM_LOSS_KERNEL=eager`
  keeps the eager ops.
- Chunk size: `loss_chunk_size` of the model config, by default (None) 1,024 tokens and, on a CUDA GPU, as many as
  make 256M logits (8,192 at the presets' 32k vocabulary): a GPU's matmuls over 1,024 rows of a 64k vocabulary
  ran at 60% of their rate over 4,096.
- Reduction: `sum(CE) / num_items_in_batch` when the trainer gives the global normaliser (correct gradient
  accumulation), else the mean over this batch's targets.
- Packed rows (design.md): a target whose position id is 0 starts a new document and is never predicted from the
  previous one; `shift_targets` drops it.
- `LMHead` is the output projection with the loss as a second mode of its `forward`: DeepSpeed ZeRO-3 and FSDP
  gather a module's sharded weight only around that module's own forward/backward, so the loss must run inside
  `lm_head(...)`, never on `lm_head.weight` from outside.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings

import torch
import torch.nn.functional as F

from minillm.models.layers.kernel_choice import KernelChoice
from minillm.models.layers.linear import Linear, addmm_, mm, row_bucket
from minillm.models.layers.tensor_memo import per_tensor, with_host_copy

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk on a CPU: 1024 x 32k fp32 logits = 128 MiB
GPU_CHUNK_LOGITS = 1 << 28  # logits per chunk on a GPU (512 MiB in bf16): 8,192 tokens at a 32k vocabulary
# cuBLAS sums bf16/fp16 products straight into an fp32 tensor (`torch.addmm(..., out_dtype=torch.float32)`, CUDA only):
# seen correct in place with torch 2.11 on an H200; older versions take a bf16 product and an fp32 add per chunk.
_CUDA_FP32_ACCUMULATE = (torch.version.cuda is not None  # not ROCm, whose tensors also say `is_cuda`
                         and tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 11))


def default_chunk_size(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk when the model config leaves `loss_chunk_size` unset: on a CUDA GPU a multiple of 1,024
    with about `GPU_CHUNK_LOGITS` logits, at least 1,024; elsewhere `DEFAULT_CHUNK_SIZE` (on a CPU the chunk's
    logits should not crowd out its caches more than they must; other devices are not measured). On an H200 (bf16,
    16k tokens, 64k vocabulary) the loss's three matmuls ran at 410 TFLOP/s in chunks of 1,024 tokens and 610 in
    chunks of 4,096."""
    if device.type != "cuda":
        return DEFAULT_CHUNK_SIZE
    return max(1, GPU_CHUNK_LOGITS // vocab_size // 1024) * 1024


def shift_targets(
    labels: torch.Tensor, position_ids: torch.Tensor | None = None, shift: int = 1
) -> torch.Tensor:
    """Targets aligned with the hidden states: `targets[:, t] = labels[:, t + shift]` (B, L) -> (B, L).

    The last `shift` positions get -100. With `position_ids`, a target is also ignored when a document starts
    (position 0) anywhere in `t+1 .. t+shift`: the prediction would cross a packed-document boundary. `shift=2` is
    what a depth-1 multi-token-prediction head needs. When the inputs have host copies (the trainer's batches), so
    do the targets: the loss then finds its target rows without waiting for the device (`target_rows`).
    """
    return with_host_copy(lambda lab, pos: _shifted(lab, pos, shift), labels, position_ids)


def _shifted(labels: torch.Tensor, position_ids: torch.Tensor | None, shift: int) -> torch.Tensor:
    targets = labels.new_full(labels.shape, IGNORE_INDEX)
    targets[:, :-shift] = labels[:, shift:]
    if position_ids is not None:
        crosses = torch.zeros_like(labels, dtype=torch.bool)
        for j in range(1, shift + 1):
            crosses[:, :-j] |= position_ids[:, j:] == 0
        targets = targets.masked_fill(crosses, IGNORE_INDEX)
    return targets


_reused = threading.local()  # per thread: the CPU buffers of `_logit_buffers`


def _logit_buffers(numel: int, compute: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat buffers for one chunk's logits when the matmuls run in bf16/fp16 (`compute`) on a CPU: `(low, high)`,
    `low` in `compute` for the matmul and `high` the fp32 copy the softmax runs in. (In fp32 the matmul's own output
    is the softmax buffer; a GPU takes the fused kernel or `_log_softmax_loss`, which need no buffers.)

    They are kept between calls (per thread, grown when needed), since on a CPU a step that allocates them afresh
    pays page faults for tens of MiB every time (glibc returns such blocks to the system): mini_deepseekv3's bf16
    step at 2 threads runs 7% faster with them (158 -> 147 ms). What they hold: chunk x vocabulary x 6 bytes
    (192 MiB at 1,024 x 32k).
    """
    assert device.type == "cpu", "the logit buffers are for the CPU's in-place softmax"
    buffers = getattr(_reused, "buffers", None)
    if buffers is None:
        buffers = _reused.buffers = {}
    for dtype in (compute, torch.float32):
        if dtype not in buffers or buffers[dtype].numel() < numel:
            buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffers[compute], buffers[torch.float32]


def log_softmax_path(device: torch.device) -> bool:
    """Whether bf16/fp16 chunks take a GPU's paths (the fused kernel, else `_log_softmax_loss`) rather than a
    CPU's (`_in_place_softmax_loss` on reused buffers, the fused kernel for large chunks)."""
    return device.type != "cpu"


def _in_place_softmax_loss(
    h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, need_grad: bool,
    buffers: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of CE over one chunk (fp32, 0-d) and `d_logits` = softmax - one_hot (m, V) in the matmul dtype (None
    without `need_grad`). The logits are upcast to fp32 and the softmax is formed in place in them (max, subtract,
    exp, sum, divide): log_softmax + exp would write a second (n, V) tensor, about a quarter of the loss's
    non-matmul time on a CPU. `buffers` are `_logit_buffers` when the matmul runs in bf16/fp16, else None (fp32).

    In bf16/fp16 `h` may carry zero rows after the chunk's n = len(t) targets (`_pad_rows`): they are left out of
    the loss, and their rows of `d_logits` are zero, so the gradient products that use the padded shapes gain exact
    zeros."""
    n, m, vocab = t.shape[0], h.shape[0], weight.shape[0]
    if buffers is not None:
        low, high = buffers
        logits_c = torch.mm(h, weight.t(), out=low[: m * vocab].view(m, vocab))  # (m, V) in bf16/fp16
        logits = high[: n * vocab].view(n, vocab).copy_(logits_c[:n])  # fp32, the target rows only
    else:
        logits = mm(h, weight.t())  # (n, V) fp32 (oneDNN on a CPU, see layers/linear.py); never padded
    target_logit = logits.gather(1, t[:, None])  # (n, 1)
    row_max = logits.amax(dim=1, keepdim=True)  # (n, 1)
    probs = logits.sub_(row_max).exp_()  # unnormalised, in place
    row_sum = probs.sum(dim=1, keepdim=True)  # (n, 1)
    loss = (row_max + row_sum.log() - target_logit).sum()  # sum of logsumexp - target logit
    if not need_grad:
        return loss, None
    d_logits = probs.div_(row_sum)  # softmax
    d_logits[torch.arange(n, device=t.device), t] -= 1.0  # in fp32, before any rounding to bf16/fp16
    if buffers is not None:
        logits_c[:n].copy_(d_logits)  # back to bf16/fp16, in the low-precision buffer
        logits_c[n:].zero_()  # the padding rows
        d_logits = logits_c
    return loss, d_logits


def _pad_rows(h: torch.Tensor) -> torch.Tensor:
    """`h` (n, D) with zero rows appended up to `row_bucket(n)`. For the CPU's bf16/fp16 chunks: oneDNN compiles
    a kernel per matrix shape, and in SFT the number of target rows, hence the last chunk's size, changes every
    step (three new shapes a step: 1 GB of kernel cache after 60 steps, and the three matmuls 1.6x slower)."""
    pad = row_bucket(h.shape[0]) - h.shape[0]
    return torch.cat([h, h.new_zeros(pad, h.shape[1])]) if pad else h


# bf16/fp16 chunks: "compiled" runs the softmax, the loss and the gradient as one torch.compile'd kernel (Triton on a
# GPU, inductor C++ on a CPU), "eager" the torch ops (`MINILLM_LOSS_KERNEL=eager`). Unpinned: compiled on CUDA, and
# on a CPU for chunks of at least FUSED_MIN_LOGITS.
LOSS_KERNELS = ("compiled", "eager")
_LOSS_KERNEL = KernelChoice("loss kernel", "MINILLM_LOSS_KERNEL", LOSS_KERNELS)
FUSED_MIN_LOGITS = 1 << 24  # logits per CPU chunk (16M: 64 MiB in fp32, 512 rows x 32k) from which it is used
# per device type ("cpu", "cuda"): "fn", the compiled function, or "failed", why it could not be built there
_fused_kernel: dict[str, dict[str, object]] = {}


def force_loss_kernel(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Pin the low-precision loss kernel ("compiled" / "eager") inside a `with` block (tests, benchmarks)."""
    return _LOSS_KERNEL.force(name)


def _softmax_loss_rows(logits: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of CE over the first n = len(t) rows of `logits` (m, V) in bf16/fp16, and `d_logits` = softmax - one_hot
    (m, V) in their dtype with zero padding rows. The function `torch.compile` fuses for `_fused_softmax_loss`."""
    m, n = logits.shape[0], t.shape[0]
    x = logits.float()  # (m, V), never stored: the kernel upcasts as it reads
    row_max = x.amax(dim=1, keepdim=True)  # (m, 1)
    e = torch.exp(x - row_max)
    row_sum = e.sum(dim=1, keepdim=True)  # (m, 1)
    targets = F.pad(t, (0, m - n))[:, None]  # (m, 1), padding rows point at token 0
    real = (torch.arange(m, device=logits.device) < n)[:, None]  # (m, 1)
    loss = torch.where(real, row_max + row_sum.log() - x.gather(1, targets), 0.0).sum()
    one_hot = torch.arange(x.shape[1], device=logits.device)[None, :] == targets  # (m, V)
    d_logits = torch.where(real, e / row_sum - one_hot.float(), 0.0)  # formed in fp32, rounded once
    return loss, d_logits.to(logits.dtype)


def _fused_softmax_loss(logits: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`_softmax_loss_rows` as one compiled kernel (built on the first call on each device type, a few seconds;
    shapes are dynamic), or None where it cannot be built (no C++ compiler for inductor on a CPU, no Triton on a
    GPU, ...): the caller then takes the eager path, on that device type for the rest of the process.

    Why: a chunk's logits (1,024 x 32k on a CPU) are far larger than a CPU's caches, and the eager path's seven
    passes over them (upcast, max, subtract, exp, sum, divide, downcast) cost about three times the chunk's bf16
    matmul. The fused kernel reads the bf16 logits and writes the bf16 gradient once per row block: 75 -> 45 ms per
    chunk with its matmul (Intel Xeon with AMX, 2 threads). On a GPU the eager path's two passes (fp32 log-softmax,
    exp back to bf16) move 12 bytes per logit against the kernel's 4 to 6: on an H200 the loss of 16k tokens at a 64k
    vocabulary took 9.7 ms with it against 16.2 without (chunks of 4,096 tokens, fp32 accumulation of the weight's
    gradient in both). With an 8k vocabulary a CPU chunk stays in cache and the two paths take the same time, so
    small CPU chunks keep the eager path (`FUSED_MIN_LOGITS`).
    """
    kernel = _fused_kernel.setdefault(logits.device.type, {})
    if "failed" in kernel:
        return None
    if "fn" not in kernel:
        kernel["fn"] = torch.compile(_softmax_loss_rows, dynamic=True)
    try:
        with warnings.catch_warnings():  # inductor's note that it split the row reduction (its choice, not a fault)
            warnings.filterwarnings("ignore", message="Online softmax is disabled")
            return kernel["fn"](logits, t)
    except torch.OutOfMemoryError:
        raise  # the device is full, not the kernel unbuildable (and the eager path needs more memory)
    except Exception as err:  # noqa: BLE001 - any failure to build the kernel means: use the eager path
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kernel["failed"] = reason
        print(f"note: the fused loss kernel could not be compiled for {logits.device.type} ({reason[:200]}); "
              "using the eager loss (MINILLM_LOSS_KERNEL=eager skips the attempt)", file=sys.stderr)
        return None


def _use_fused_loss(rows: int, vocab: int, device: torch.device) -> bool:
    """Whether a bf16/fp16 chunk of `rows` x `vocab` logits on `device` takes `_fused_softmax_loss`."""
    choice = _LOSS_KERNEL.pinned()
    failed = "failed" in _fused_kernel.get(device.type, {})
    if choice == "eager" or failed or torch.compiler.is_compiling():
        return False
    if choice == "compiled" or device.type == "cuda":
        return True
    return device.type == "cpu" and rows * vocab >= FUSED_MIN_LOGITS  # other devices: only when pinned


def _log_softmax_loss(
    logits: torch.Tensor, t: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_in_place_softmax_loss` for bf16/fp16 `logits` (n, V) on a GPU, where the chunk's memory traffic is the
    cost: an fp32 log-softmax of the low-precision logits (the reference's upcast + log_softmax, fused), then its
    exp written straight back over the logits in their own dtype. Two passes over the chunk instead of seven,
    about a third of the bytes moved. (On a CPU the in-place path wins: it reuses its buffers.)"""
    log_probs = torch.log_softmax(logits, dim=1, dtype=torch.float32)  # (n, V) fp32
    target = log_probs.gather(1, t[:, None]).squeeze(1)  # (n,) log p of each target
    loss = -target.sum()
    if not need_grad:
        return loss, None
    d_logits = torch.exp(log_probs, out=logits)  # softmax, rounded once to bf16/fp16
    rows = torch.arange(logits.shape[0], device=t.device)
    d_logits[rows, t] = (target.exp() - 1.0).to(logits.dtype)  # p - 1 formed in fp32, as the in-place path does
    return loss, d_logits


def _add_weight_grad(grad_w: torch.Tensor | None, d_logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`grad_w + d_logits.T @ h` (V, D) in fp32, in place where it can be; `grad_w` None for the first chunk.

    bf16/fp16 operands on CUDA: cuBLAS sums the product straight into the fp32 gradient (no (V, D) product in bf16,
    its fp32 copy and the add: three passes over 25M values per chunk of mini_llama3 base). Elsewhere in low
    precision the product is rounded to bf16/fp16 and added in fp32; in fp32 `addmm_` accumulates in place."""
    low_precision = d_logits.dtype != torch.float32
    if low_precision and d_logits.is_cuda and _CUDA_FP32_ACCUMULATE:
        if grad_w is None:
            return torch.mm(d_logits.t(), h, out_dtype=torch.float32)
        return torch.addmm(grad_w, d_logits.t(), h, out_dtype=torch.float32, out=grad_w)
    if grad_w is None:
        return mm(d_logits.t(), h).float()
    if low_precision:
        return grad_w.add_(mm(d_logits.t(), h).float())
    addmm_(grad_w, d_logits.t(), h)
    return grad_w


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i) over chunks of rows; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, grad_enabled: bool
    ):
        # hidden (N, D), weight (V, D), targets (N,) all valid (no ignore_index).
        # `needs_input_grad` only looks at requires_grad, which stays True under torch.no_grad (validation), so
        # the caller's grad mode comes in as `grad_enabled`: without it, evaluation would pay for the gradients.
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # (V, D) fp32, created by the first chunk's product (no zero-filled V x D buffer)
        # Every matmul runs in one dtype, the operands cast once for all chunks: the autocast dtype under autocast
        # (which would not cast the in-place accumulation of the weight gradient below), else the input's own.
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        compute = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
        hidden_c, weight_c = hidden.to(compute), weight.to(compute)
        low_precision = compute != torch.float32
        two_pass = low_precision and log_softmax_path(hidden.device)
        buffers = None
        if low_precision and not two_pass:
            rows = row_bucket(min(chunk_size, hidden.shape[0]))  # the most rows a padded chunk has
            buffers = _logit_buffers(rows * weight.shape[0], compute, hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden_c[start : start + chunk_size]  # (n, D)
            t = targets[start : start + chunk_size]  # (n,)
            n = t.shape[0]
            fused = None
            if two_pass:
                logits = torch.mm(h, weight_c.t())  # (n, V)
                if (need_h or need_w) and _use_fused_loss(n, weight.shape[0], hidden.device):
                    fused = _fused_softmax_loss(logits, t)
                chunk_loss, d_logits = fused if fused is not None else _log_softmax_loss(logits, t, need_h or need_w)
            else:
                if buffers is not None:
                    h = _pad_rows(h)  # (m, D), m = row_bucket(n)
                if buffers is not None and (need_h or need_w) and _use_fused_loss(
                    h.shape[0], weight.shape[0], hidden.device
                ):
                    m, vocab = h.shape[0], weight.shape[0]
                    logits_c = torch.mm(h, weight_c.t(), out=buffers[0][: m * vocab].view(m, vocab))  # (m, V)
                    fused = _fused_softmax_loss(logits_c, t)
                if fused is not None:
                    chunk_loss, d_logits = fused
                else:
                    chunk_loss, d_logits = _in_place_softmax_loss(h, weight_c, t, need_h or need_w, buffers)
            total += chunk_loss
            if need_h:
                grad_h[start : start + chunk_size] = mm(d_logits, weight_c)[:n]  # (n, D)
            if need_w:
                grad_w = _add_weight_grad(grad_w, d_logits, h)
            # released before the next chunk's are allocated: two chunk-sized tensors alive at a time, not three
            logits = d_logits = fused = None
        if need_w and grad_w is None:  # no target rows: a zero gradient, not None (DDP expects every gradient)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = None
        if grad_w is not None:
            # `grad_w` may be a transposed view (see `linear.onednn_mm`): scale it straight into a contiguous
            # tensor. Scaling first would keep the transposed layout, and the weight's gradient (contiguous, as the
            # weight) would then cost a second, transposing copy: 4 ms more per mini_llama3 cpu256 step.
            contiguous = torch.empty(grad_w.shape, dtype=torch.float32, device=grad_w.device)
            gw = torch.mul(grad_w, grad_out, out=contiguous).to(ctx.weight_dtype)
        return gh, gw, None, None, None


def target_rows(targets: torch.Tensor) -> torch.Tensor:
    """The flat indices of the targets that are not ignored, (T,) int64. A `nonzero`, which on a GPU waits for all
    queued work; found on the host instead when `targets` has a host copy (`shift_targets` of a trainer batch)."""
    return per_tensor(targets, "target rows", lambda t: (t.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1))


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, never materialising all the logits.

    Args:
        hidden: (..., D) final hidden states (after the final norm).
        weight: (V, D) output head weight.
        targets: (...) token ids, -100 = ignored; already aligned with `hidden` (see `shift_targets`).
        num_items_in_batch: if given, return `sum(CE) / num_items_in_batch`; else the mean over valid targets
            (0 when there are none).
        chunk_size: tokens per chunk; None: `default_chunk_size` for the vocabulary and device.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], hidden.device)
    rows = target_rows(targets)  # (T,)
    targets = targets.reshape(-1)  # (N,)
    total = _LinearCrossEntropySum.apply(
        hidden.index_select(0, rows), weight, targets[rows], chunk_size, torch.is_grad_enabled()
    )
    if num_items_in_batch is None:
        return total / rows.numel() if rows.numel() > 0 else total
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class LMHead(Linear):
    """Output head (D -> V, no bias) whose forward returns logits, or the chunked loss when given targets.

    Parameter name and layout are those of `nn.Linear` (`lm_head.weight`), so checkpoints and weight tying are
    unchanged. Running the loss in this module's forward lets ZeRO-3 / FSDP gather the sharded weight for it.
    """

    def __init__(self, hidden_size: int, vocab_size: int, chunk_size: int | None = None) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (..., V) for hidden (..., D); or, with aligned `targets` (see `shift_targets`), the loss."""
        if targets is None:
            return super().forward(hidden)
        return chunked_cross_entropy(hidden, self.weight, targets, num_items_in_batch, self.chunk_size)


def reference_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Plain (unchunked) cross-entropy with the same reduction rules; for tests and benchmarks."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch
