"""The one training loop, for pretraining and SFT, on one device or many (DDP, DeepSpeed ZeRO) via Accelerate.

    from minillm.training.config import TrainConfig
    from minillm.training.trainer import train
    run_dir = train(TrainConfig(stage="pretrain", model="mini_llama3"))

The stages differ only in data, defaults and starting weights (`setup.py`-style choices live in `build_run`).

Notable choices:
- Loss normalisation: each step counts the target tokens of the whole global batch (all micro-batches, all-reduced
  over ranks) and passes `num_items_in_batch = global_targets / world_size` to the model, whose loss is then
  `sum(CE) / num_items_in_batch`. Summing micro-batch gradients (accumulation) and averaging over ranks (DDP or
  ZeRO) gives exactly the gradient of the global mean, whatever the accumulation, world size or padding.
  Accelerate (and DeepSpeed) divide the loss by the accumulation steps, so we multiply it back. The MoE balance
  losses are not means over tokens but statistics of one forward's routing (as in DeepSeek-V3 and the references);
  each micro-batch's is weighted by its share of the global targets (`layers.moe.micro_batch_share`). So they too
  are independent of the split when rows hold equally many targets (pretraining), and move slightly with it when
  they do not (SFT: about 6e-5 of the gradient at the default weight 1e-4, measured for mini_deepseekv3).
- Data: `batches.GlobalBatches` makes the data of a step independent of world size and accumulation. Each batch
  goes to the device with `tensor_memo.to_device`, which keeps the host tensors as the device tensors' host copies:
  what the forward asks of its batch (the loss's target rows, padding, document starts, flash-attn's and fla's
  varlen indices) is answered on the host: with the non-finite check below, a step makes the host wait for the
  device nowhere (the step's target count is summed across ranks on the host, `_host_sum`; fla's kernels read
  their `cu_seqlens` back for packed batches).
- A non-finite loss on any rank skips the step on all ranks, the same way on every backend: no weight, optimizer
  state, scheduler or MoE-bias change; the step is counted (`skipped_steps`) and logged, and `max_bad_steps` in a
  row stop the run with a clear message. Plain / DDP with fused AdamW (the default): the optimizer drops the step on
  the device (`found_inf`; the MoE bias update gets zero counts) and the host reads the step's finite flag one step
  later, once the next step's work is queued (`settle`: then the scheduler steps, or the skip is counted and
  logged; at log, evaluation and checkpoint steps at once), so the device never waits for the host's decision.
  Other optimizers: the flag is read once the last backward is queued (a GPU has that backward to run while the
  host waits), then the gradients are dropped, no optimizer step. DeepSpeed steps the engine inside the last
  backward, so there the flag is read before it and the
  last micro-batch back-propagates a NaN-scaled loss: the engine's own overflow check (ZeRO-1/2 in fp32 and bf16,
  ZeRO-3 in any precision, fp16 loss scaling) then discards the step, clears its gradients and counts it in the
  engine's `skipped_steps`, which the loop verifies. DeepSpeed setups that would apply NaN gradients instead (ZeRO-0
  in fp32, and opt-outs of that check) are refused at start (`launch.check_skips_nonfinite`).
- Test-only fault injection: `MINILLM_TEST_NONFINITE_STEPS` (see `injected_nonfinite_steps`) makes the loss of
  chosen steps +inf, so tests can drive a real (even multi-process, launched) run through a non-finite step.
- MoE: after each optimizer step, expert counts summed over the global batch drive `update_expert_bias`.
- The model/optimizer preparation is one function, `prepare_model_and_optimizer`; expert parallelism
  (`expert_parallel_size` > 1, `minillm.parallel.expert_parallel`) shards the routed experts there, before the
  optimizer, and its expert shards ride along with checkpoints (`save_extra`) and are gathered for the export.
- DeepSpeed on a machine without CUDA runs on DeepSpeed's CPU accelerator with the gloo backend. Never
  `Accelerator(cpu=True)` in that case: it silently drops DeepSpeed.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import itertools
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch

from minillm import runs
from minillm.devices import cpu_multiplies_bf16, flush_denormals, mps_available, peak_memory_gib
from minillm.errors import TrainingStopped, UserError
from minillm.models.layers.tensor_memo import to_device
from minillm.parallel import expert_parallel
from minillm.paths import apply_umask, check_creatable
from minillm.tokenizer import stop_token_ids
from minillm.training import budget
from minillm.training import checkpoint as ckpt
from minillm.training.batches import GlobalBatches, Prefetcher, count_targets
from minillm.training.config import IDENTITY_FIELDS, TrainConfig, read_saved_config, save_config
from minillm.training.host_memory import keep_freed_memory
from minillm.training.interrupt import StopRequest, started_directly
from minillm.training.launch import fill_deepspeed_config
from minillm.training.metrics import (
    MetricsLogger,
    cpu_peak_at_least,
    expert_load_stats,
    flops_per_token,
    peak_flops,
)
from minillm.training.optim import build_optimizer, build_scheduler, grad_norm
from minillm.training.plots import plot_curves

SUMMED_TERMS = ("mtp",)  # aux_losses entries that, like "lm", are sum(CE) / num_items_in_batch
NONFINITE_ENV = "MINILLM_TEST_NONFINITE_STEPS"  # test-only fault injection, read by `injected_nonfinite_steps`
EvalFn = Callable[[Any, Any, int], dict[str, float]]


# ---------------------------------------------------------------------------------------------------------------
# Accelerator


def resolve_precision(precision: str, deepspeed: bool | None = None) -> str:
    """Accelerate's `mixed_precision` value for our `precision` option.

    `auto` is bf16 autocast where the hardware multiplies in bf16: a GPU that supports it, or a CPU with bf16 matrix
    instructions (`cpu_multiplies_bf16`), except under DeepSpeed, whose bf16 mode is not autocast (bf16 weights
    with fp32 master copies) and runs on a CPU only as a test bed; else fp32 (Apple's GPU included). `deepspeed`:
    whether the run uses DeepSpeed (None: as this process's launch says, `uses_deepspeed()`).
    """
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        if mps_available():  # the run trains on Apple's GPU (Accelerate's choice), in fp32 there
            return "no"
        deepspeed = uses_deepspeed() if deepspeed is None else deepspeed
        return "bf16" if not deepspeed and cpu_multiplies_bf16() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs a GPU (loss scaling); use fp32 or bf16 on a CPU")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def prefetch_batches(device: torch.device) -> bool:
    """Whether to collate the next steps in a background thread: on a GPU, so the step never waits for the host.
    On the CPU the thread would compete with the step for the same cores (and collation is ~0% of a CPU step)."""
    return device.type == "cuda"


def bucket_batch_lengths(collate: Callable, device: torch.device, mixed_precision: str, seq_len: int) -> bool:
    """On a CPU in bf16/fp16, have a padding collator round each batch's length up to a `row_bucket` size (at most
    `seq_len`) instead of its longest row: oneDNN compiles a kernel for every new matrix shape, and SFT's longest row
    changes every step (data/collate.py). Returns whether it did. fp32 keeps the exact length: MKL compiles nothing,
    and oneDNN's fp32 kernels cost less to build than the padding (README, "SFT batches in bf16 on a CPU")."""
    if device.type != "cpu" or mixed_precision == "no" or not hasattr(collate, "bucket_up_to"):
        return False
    collate.bucket_up_to = seq_len
    return True


def make_accelerator(config: TrainConfig):
    """The Accelerator for this process: gradient accumulation from the batch sizes, CPU fallbacks."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank, rest = divmod(config.global_batch_size, world * config.micro_batch_size)
    if rest or per_rank < 1:
        raise UserError(
            f"global batch size {config.global_batch_size} is not divisible by processes x micro batch size "
            f"= {world} x {config.micro_batch_size}"
        )
    kwargs: dict[str, Any] = dict(
        mixed_precision=resolve_precision(config.precision),
        gradient_accumulation_steps=per_rank,
    )
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator; set even without DeepSpeed (something may import it, and its auto-detection
        # would print a warning about a missing GPU on every CPU run)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if uses_deepspeed():
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True  # DDP over gloo when launched with several processes
    if world == 1:
        # Accelerate keeps process-wide state; a library caller may run several trainings in one process
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(**kwargs)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        name = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
        fill_deepspeed_config(plugin.deepspeed_config, config, accelerator.num_processes, name)
    return accelerator


# ---------------------------------------------------------------------------------------------------------------
# Model and optimizer


def compile_layers(model, mode: str = "default") -> int:
    """`torch.compile` every decoder layer (regional compilation) in torch.compile's `mode`; returns how many.

    Layers of one class share their compiled code, so compiling costs one or two graphs, not one per layer; the
    embedding, the chunked loss (an autograd Function that never materialises the logits) and the optimizer stay
    eager. Activation checkpointing wraps the compiled layer, so both options combine.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise UserError(f"--compile: found no decoder layers ({', '.join(sorted(names)) or 'none declared'}) to compile")
    for layer in layers:
        layer.compile(mode=None if mode == "default" else mode)
    return len(layers)


def prepare_model_and_optimizer(accelerator, model, config: TrainConfig, total_steps: int):
    """Wrap the model and build optimizer + scheduler for the distributed backend in use.

    This is the single place where parallelism is applied (DDP / DeepSpeed via `accelerator.prepare`). The
    scheduler is stepped by the loop itself, once per optimizer step (Accelerate would step it once per process),
    and registered so checkpoints include it.
    """
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    plugin = accelerator.state.deepspeed_plugin
    if config.expert_parallel_size > 1:
        # each rank keeps its share of the routed experts; must precede the optimizer (DeepSpeed MoE groups)
        name = getattr(model.config, "model_type", type(model).__name__)
        expert_parallel.check_expert_parallel_launch(config.expert_parallel_size, model.config, name, accelerator)
        expert_parallel.enable_expert_parallel(model, config.expert_parallel_size)
    elif plugin is not None and plugin.zero_stage == 3:
        # one ZeRO-3 unit per MoE block: a rank whose tokens skip an expert still gathers its weights
        expert_parallel.set_zero3_leaf_moe_blocks(model)
    if config.compile:
        compile_layers(model, config.compile_mode)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, config))
    # built on the prepared optimizer: DeepSpeed may swap ours for its own (CPU Adam under offload)
    scheduler = build_scheduler(optimizer, total_steps, config)
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, scheduler


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepResult:
    """What one optimizer step produced, already reduced over ranks.

    The loss terms and the gradient norm stay on the device: reading one waits for the whole step to finish, so the
    loop reads them (`read`) only at log intervals, and on a GPU the host can queue the next step meanwhile.
    """

    terms: torch.Tensor | None = None  # (1 + len(aux_names),) float64: global mean LM loss, then the other terms
    aux_names: tuple[str, ...] = ()  # the other loss terms, averaged over micro-batches and ranks
    targets: int = 0  # target tokens of the global batch
    tokens: int = 0  # input tokens of the global batch
    skipped: bool = False
    grad_norm: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None  # (n_moe_layers, E) summed over the global batch
    # Set while the step's skip is decided on the device (`skips_on_device`) and not yet known to the host: its
    # finite flag, which `settle` reads (then `skipped` holds the answer and this is None).
    check: FiniteCheck | None = None

    def read(self) -> dict[str, float]:
        """{"loss", "loss/<term>"..., "grad_norm"} as Python floats (one device-to-host copy); loss nan when
        skipped."""
        values = [float("nan")] if self.terms is None else self.terms.tolist()
        out = {"loss": values[0], **{f"loss/{n}": v for n, v in zip(self.aux_names, values[1:], strict=True)}}
        if self.grad_norm is not None:
            out["grad_norm"] = float(self.grad_norm)
        return out


class LossWindow:
    """The loss terms of the steps since the last log, summed on the device (no host sync per step), so a log
    reports their mean, not the one step it falls on: with `log_every` 10 a single step's loss is a sample of a
    noisy curve. Skipped (non-finite) steps are left out."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.steps = 0

    def add(self, result: StepResult) -> None:
        if result.skipped or result.terms is None:
            return
        self.total = result.terms.detach().clone() if self.total is None else self.total + result.terms
        self.steps += 1

    def mean_of(self, result: StepResult) -> StepResult:
        """`result` with its loss terms replaced by the window's mean (its gradient norm stays the step's), and the
        window emptied; `result` itself when the window holds no step."""
        if self.total is None:
            return result
        mean = replace(result, terms=self.total / self.steps)
        self.total, self.steps = None, 0
        return mean


def _reduce_sum(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(tensor.to(accelerator.device), reduction="sum") if accelerator.num_processes > 1 \
        else tensor


_HOST_GROUP: list = []  # [(the default process group, the gloo group made for host values beside it)]


def _host_sum(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a host (CPU) tensor, computed on the host. Through the GPU backend (NCCL) it would go
    to the device and back, behind all the work queued there: a wait for the whole previous step at the start of
    every step. So host values travel through a gloo group of all ranks, made the first time (every rank gets here
    at the same step); when the default group is gloo already (CPUs), through that."""
    if accelerator.num_processes == 1:
        return tensor
    import torch.distributed as dist

    default = dist.group.WORLD
    if dist.get_backend(default) == "gloo":
        group = default
    else:
        if not _HOST_GROUP or _HOST_GROUP[0][0] is not default:  # made for this default group (tests make several)
            _HOST_GROUP[:] = [(default, dist.new_group(backend="gloo"))]
        group = _HOST_GROUP[0][1]
    total = tensor.clone()
    dist.all_reduce(total, group=group)
    return total


def injected_nonfinite_steps(rank: int) -> set[int]:
    """Test-only: the steps whose last micro-batch loss this rank makes non-finite (+inf).

    Read from `MINILLM_TEST_NONFINITE_STEPS` (unset in normal use): comma-separated steps, each optionally
    `@RANK` for one rank only, e.g. `3` (step 3, every rank) or `3@1,4` (step 3 on rank 1, step 4 everywhere).
    It lets tests drive a real run, even a launched multi-process one, through a non-finite step.
    """
    steps = set()
    for item in filter(None, os.environ.get(NONFINITE_ENV, "").replace(" ", "").split(",")):
        step, _, only = item.partition("@")
        try:
            if not only or int(only) == rank:
                steps.add(int(step))
        except ValueError:
            raise UserError(f"{NONFINITE_ENV}={os.environ[NONFINITE_ENV]!r}: expected steps like '3' or '3@1'") \
                from None
    return steps


class FiniteCheck:
    """Whether every rank's losses of this step were finite, on its way to the host.

    Started right after the step's last forward: the flag is reduced across ranks and, on a GPU, copied to pinned
    host memory without blocking, with an event behind it. `step_is_bad` reads it after the last backward has been
    queued, so the host waits only for the forward while the device already has the backward to run, instead of
    the device waiting for the host to queue the backward. (What the wait still costs on a GPU is not measured yet:
    `scripts/gpu_bench.sh` runs mini_llama3 compiled with and without the check.) Where the optimizer can drop the
    step on the device (`skips_on_device`), the host reads the flag only one step later (`settle`).
    """

    def __init__(self, accelerator, all_finite: torch.Tensor) -> None:
        finite = all_finite.to(torch.float32).reshape(1)
        if accelerator.num_processes > 1:
            finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
        self.on_device = finite  # (1,) the share of ranks whose losses were finite: 1.0 when the step is good
        self.event = None
        if finite.is_cuda:
            self.host = torch.empty(1, dtype=torch.float32, pin_memory=True)
            self.host.copy_(finite, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = finite


def step_is_bad(check: FiniteCheck) -> bool:
    """Whether some rank saw a non-finite loss in this step (then every rank drops it). Read inside the step, a
    wait for the device in every step, where the optimizer cannot drop the step itself (`skips_on_device`); else a
    step later, by `settle` (`scripts/bench_train.py --finite-check-in-step` measures what the wait costs)."""
    if check.event is not None:
        check.event.synchronize()
    return check.host.item() < 1.0


def skips_on_device(accelerator, optimizer) -> bool:
    """Whether a non-finite step can be dropped on the device, so the host need not wait for the finite flag
    before the optimizer step: fused AdamW takes it as `found_inf` and then changes no weight and no state (the
    step counts included). Not under DeepSpeed (its engine steps inside the last backward) nor fp16 (the gradient
    scaler sets `found_inf` itself); other optimizers wait for the flag (`step_is_bad`)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    return (not uses_deepspeed() and str(accelerator.mixed_precision) != "fp16"
            and bool(inner.defaults.get("fused")))


def settle(result: StepResult, scheduler) -> None:
    """What the host learns of a step decided on the device, one step later: whether the optimizer applied it
    (`result.skipped`), and then the scheduler's step, which `optimizer_step` leaves for this. By then the device
    has the next step's forward and backward queued, so reading the flag (long computed) empties no queue: this
    is the wait `step_is_bad` makes inside every step, moved out of the device's way. Nothing for other steps."""
    if result.check is None:
        return
    result.skipped = step_is_bad(result.check)
    result.check = None
    if result.skipped:  # as a step skipped at once reports it: no loss, no gradient norm, no expert load
        result.terms = result.grad_norm = result.expert_counts = None
        result.aux_names = ()
    else:
        scheduler.step()


def forward_backward(accelerator, model, micro_batches: list[dict[str, torch.Tensor]],
                     poison_last: bool = False, skip_on_device: bool = False) -> StepResult:
    """Forward and backward over this rank's micro-batches of one step; gradients end up accumulated (and, on the
    last micro-batch, synchronised across ranks). Does not step the optimizer (DeepSpeed's engine does, inside the
    last backward). `poison_last` (test-only fault injection) makes the last micro-batch's loss +inf.

    Without `skip_on_device` the host waits for the device once per step here: for the non-finite check, which a
    skipped step needs decided before anything is applied. It reads the flag of the last forward after the last
    backward has been queued (`FiniteCheck`); under DeepSpeed, whose engine steps inside the last backward, before
    it. With `skip_on_device` (see `skips_on_device`) it does not wait: the result carries the flag (`check`), the
    optimizer step drops the step on the device if need be, and the loop reads the flag a step later (`settle`). With several
    processes the target count of the step's batch is summed across ranks first, on the host (`_host_sum`). The
    results stay on the device (`StepResult`)."""
    device = accelerator.device
    local = torch.tensor([sum(count_targets(b) for b in micro_batches),
                          sum(b["input_ids"].numel() for b in micro_batches)], dtype=torch.float64)
    targets, tokens = (int(v) for v in _host_sum(accelerator, local).tolist())
    if targets == 0:
        return StepResult(targets=0, tokens=tokens, skipped=True)
    # A fill on the device: `torch.tensor(value, device=cuda)` copies from pageable memory and waits for the GPU.
    num_items = torch.full((), targets / accelerator.num_processes, dtype=torch.float32, device=device)
    accumulation = len(micro_batches)
    lm_sum = torch.zeros((), dtype=torch.float64, device=device)
    aux_sums: dict[str, torch.Tensor] = {}
    counts = None
    check = None
    all_finite = torch.ones((), dtype=torch.bool, device=device)
    for i, batch in enumerate(micro_batches):
        # Async from pinned memory; the host tensors stay the device tensors' host copies, so what the forward asks
        # of its batch (target rows, padding, document starts) is answered on the host, without waiting.
        batch = {k: to_device(v, device) for k, v in batch.items()}
        with accelerator.accumulate(model):
            with accelerator.autocast():  # the forward only: see below
                outputs = model(**batch, num_items_in_batch=num_items, use_cache=False)
            loss = outputs.loss
            if poison_last and i == accumulation - 1:
                loss = loss + float("inf")  # its gradient stays finite: skipping must not rely on NaN gradients
            all_finite &= torch.isfinite(loss.detach())
            if i == accumulation - 1:
                check = FiniteCheck(accelerator, all_finite)  # once per step, not per micro-batch
                if uses_deepspeed() and step_is_bad(check):
                    # The engine steps inside the last backward, on whatever this step accumulated: NaN gradients
                    # make its overflow check discard the whole step (and count it in its skipped_steps).
                    accelerator.backward(loss * float("nan"))
                    return StepResult(targets=targets, tokens=tokens, skipped=True)
            # Backward runs outside autocast. Inside it, autocast would also apply to the backward's own ops (the
            # autograd engine inherits the forward thread's autocast state), so the backward of regions a model
            # runs in fp32 on purpose (Gated DeltaNet's recurrence, routers) would run in bf16, at the cost of a
            # cast per operand: 1,100 extra copies and 378 bf16 batched matmuls per mini_qwen3_next base step.
            # Accelerate / DeepSpeed divide by the accumulation steps; the loss is already globally normalised.
            # A non-finite step's gradients are computed too, then dropped by `optimizer_step`.
            accelerator.backward(loss * accumulation)
        aux = getattr(outputs, "aux_losses", None) or {"lm": loss.detach()}
        lm_sum += aux.get("lm", loss.detach()).double()
        for name, value in aux.items():
            if name != "lm":
                aux_sums[name] = aux_sums.get(name, 0.0) + value.detach().double()
        step_counts = getattr(outputs, "expert_counts", None)
        if step_counts is not None:
            counts = step_counts.detach().float() if counts is None else counts + step_counts.detach().float()
    deferred = skip_on_device and not uses_deepspeed()
    if not deferred and not uses_deepspeed() and step_is_bad(check):  # the last backward is queued: the device
        return StepResult(targets=targets, tokens=tokens, skipped=True)  # keeps busy while the host waits
    names = sorted(aux_sums)
    # terms normalised by num_items_in_batch (LM, MTP) add up over micro-batches; the others are per-micro-batch means
    packed = torch.stack([lm_sum] + [aux_sums[n] / (1 if n in SUMMED_TERMS else accumulation) for n in names])
    packed = _reduce_sum(accelerator, packed.to(device))
    # each rank's micro-batch LM terms sum to its share of the global mean
    result = StepResult(terms=packed / accelerator.num_processes, aux_names=tuple(names), targets=targets,
                        tokens=tokens, check=check if deferred else None)
    if counts is not None:
        result.expert_counts = _reduce_sum(accelerator, counts.to(device))
    return result


def optimizer_step(accelerator, model, optimizer, scheduler, config: TrainConfig, result: StepResult,
                   engine_skips_before: int = 0) -> None:
    """Clip, step, schedule, zero; then the MoE bias update. A skipped step only drops the gradients: weights,
    optimizer, scheduler and MoE biases stay as they were.

    A step still undecided on the host (`result.check`, see `skips_on_device`) is dropped on the device instead:
    fused AdamW gets `found_inf`, the MoE bias update zero counts (no change), and the scheduler's step is left to
    `settle`, which knows whether the step counted.

    Under DeepSpeed the engine already stepped (or skipped) inside the last backward; `engine_skips_before` is its
    `skipped_steps` before this step, to check that it really skipped a step the loop skips."""
    if result.skipped:
        if not uses_deepspeed():
            optimizer.zero_grad(set_to_none=True)
        elif result.targets > 0 and model.skipped_steps != engine_skips_before + 1:
            raise RuntimeError("DeepSpeed applied an optimizer step with non-finite gradients instead of skipping it "
                               f"(engine skipped_steps {engine_skips_before} -> {model.skipped_steps})")
        return
    if uses_deepspeed():
        # the engine clipped and stepped inside the last backward (gradient_clipping from the recipe)
        norm = model.get_global_grad_norm()
    elif accelerator.device.type == "cpu":  # an accurate norm (optim.grad_norm); DDP's gradients are all-reduced
        params = [p for p in model.parameters() if p.grad is not None]
        norm = grad_norm(params)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, config.max_grad_norm, norm)
    else:
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    applied = None  # whether the step is applied, 0-dim 1.0 or 0.0 on the device, when only the device knows
    if result.check is None:
        optimizer.step()
        scheduler.step()
    else:
        applied = (result.check.on_device >= 1.0).to(torch.float32).reshape(())
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
        inner.found_inf = 1.0 - applied  # fused AdamW drops the whole step when it is 1
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    optimizer.zero_grad(set_to_none=True)
    if norm is not None:
        result.grad_norm = norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))
    if result.expert_counts is not None:
        unwrapped = accelerator.unwrap_model(model)
        if hasattr(unwrapped, "update_expert_bias"):
            # zero counts move no bias (their error from the mean is zero)
            counts = result.expert_counts if applied is None else result.expert_counts * applied
            unwrapped.update_expert_bias(counts)


# ---------------------------------------------------------------------------------------------------------------
# Run setup


@dataclass
class Run:
    """Everything `train` needs besides the accelerator: built by `build_run`."""

    model: Any
    tokenizer: Any
    train_data: Any  # map-style dataset
    sampler: Any  # seeded, resumable (state_dict / load_state_dict)
    collate: Callable
    val_data: Any = None
    model_name: str = ""
    start: str = ""  # the model directory SFT starts from (said in the run's first lines)


def build_run(config: TrainConfig) -> Run:
    """Tokenizer, model (fresh for pretraining, loaded for SFT) and data, after the compatibility checks."""
    from minillm.training import setup

    return setup.build_run(config)


def check_schedule(config: TrainConfig, total_steps: int) -> None:
    """Refuse a learning-rate schedule that cannot run as asked (`optim.lr_at`): a warmup longer than the run, or
    one that goes past the end of the decay, where the cosine would be skipped (lr from --lr to --min-lr in one
    step). A warmup as long as the run has no decay to skip."""
    if config.warmup_steps is not None and config.warmup_steps > total_steps:
        raise UserError(f"--warmup-steps {config.warmup_steps} is more than the run's {total_steps} optimizer steps: "
                        "the learning rate would never reach --lr")
    if config.warmup_steps is None and config.warmup_ratio > config.decay_ratio:
        raise UserError(f"--warmup-ratio {config.warmup_ratio:g} goes past --decay-ratio {config.decay_ratio:g}, where "
                        "the cosine has already reached --min-lr: the warmup must end before it")
    if config.warmup_steps and int(total_steps * config.decay_ratio) < config.warmup_steps < total_steps:
        raise UserError(f"--warmup-steps {config.warmup_steps} goes past the end of the decay ({config.decay_ratio:g} x "
                        f"{total_steps} steps), where the cosine has already reached --min-lr: the warmup must end "
                        "before it (fewer warmup steps or a larger --decay-ratio)")


def check_expert_parallel(config: TrainConfig, launch: tuple[int, bool, int | None] | None = None) -> None:
    """Refuse an impossible `expert_parallel_size` before anything starts (the model config is cheap to get; the
    launch is `launch` = (processes, DeepSpeed?, ZeRO stage) or read from the environment).
    `prepare_model_and_optimizer` checks again against the accelerator."""
    if config.expert_parallel_size == 1:
        return
    if config.stage == "pretrain":
        from minillm.training.setup import pretrain_model_config

        model_config = pretrain_model_config(config)
        name = config.model
    else:
        from transformers import AutoConfig

        import minillm  # noqa: F401  (registers our architectures with the Auto classes)
        from minillm.training.setup import sft_model_dir

        model_config = AutoConfig.from_pretrained(sft_model_dir(config.model_path))
        name = model_config.model_type
    expert_parallel.check_expert_parallel_launch(config.expert_parallel_size, model_config, name, launch=launch)


def _output_dir_problem(run_dir: Path, overwrite: bool, option: str = "--output-dir") -> str | None:
    """Why a new run may not be written into `run_dir` (None when it may); `option` names it in the message."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(p.name != runs.RUN_LOCK for p in run_dir.iterdir())):
        try:
            check_creatable(run_dir, option)
        except UserError as err:
            return str(err)
        return None
    if not run_dir.is_dir():
        return f"{option} {run_dir} exists and is not a directory"
    if not (run_dir / "config.yaml").is_file():
        return f"{option} {run_dir} is not empty and holds no run; choose an empty or new directory"
    if not overwrite:
        return f"{option} {run_dir} already holds a run; pass --overwrite, --resume latest, or another directory"
    return None


def _refuse_problem_judged_on_main(accelerator, judge: Callable[[], str | None]) -> None:
    """Raise `judge()`'s problem (if any) as a `UserError` on every rank, judged on the main process only: another
    rank looking later would see the files rank 0 has started to write and refuse a run that is its own."""
    from accelerate.utils import broadcast_object_list

    problem = [judge() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(problem)
    if problem[0]:
        raise UserError(problem[0])


def find_resume_checkpoint(config: TrainConfig) -> Path:
    """The checkpoint `--resume` names: in `--output-dir` when given, else among the runs of this stage and model."""
    run_dir = Path(config.output_dir) if config.output_dir else None
    candidates = []
    if run_dir is None:
        root = runs.DEFAULT_RUNS_ROOT
        candidates = sorted(root.glob(f"{config.stage}_{config.model or 'model'}_*")) if root.is_dir() else []
    return ckpt.find_resume_checkpoint(config.resume, run_dir, candidates)


def sft_start_model(config: TrainConfig) -> str | None:
    """The `--model-path` SFT loads. When a resumed run's starting model is gone (a checkpoint rotated away, a run
    deleted), the checkpoint being resumed serves instead: it holds the same architecture and tokenizer, and its
    weights replace the loaded ones anyway."""
    path = config.model_path
    if config.resume and path is not None and not Path(path).exists():
        try:
            checkpoint = find_resume_checkpoint(config)
        except UserError:
            return path  # nothing to resume: the missing --model-path is the error to report
        if (checkpoint / "config.json").is_file():
            if os.environ.get("RANK", "0") == "0":  # before the Accelerator exists: say it once, not per process
                print(f"note: {path}, the model this run started from, is gone; resuming with the model description "
                      f"of {checkpoint}", file=sys.stderr)
            return str(checkpoint)
    return path


def resolve_run_dir(config: TrainConfig, accelerator) -> tuple[Path, Path | None]:
    """The run directory and, when resuming, the checkpoint to load; refuses to clobber another run."""
    from accelerate.utils import broadcast_object_list

    model_tag = config.model or "model"
    if config.resume:
        checkpoint = find_resume_checkpoint(config)
        run_dir = checkpoint.parent.parent
        saved_path = run_dir / "config.yaml"
        if saved_path.is_file():
            saved = read_saved_config(saved_path)
            diffs = [f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in IDENTITY_FIELDS
                     if k in saved and saved.get(k) != getattr(config, k)]
            if diffs:
                raise UserError(f"--resume {checkpoint}: the run was made with other options ({'; '.join(diffs)}); "
                                f"resume it with its own: {runs.resume_command(config.stage, run_dir)}")
        _refuse_problem_judged_on_main(accelerator, lambda: runs.live_run_problem(run_dir))
        return run_dir, checkpoint
    if config.output_dir:
        run_dir = Path(config.output_dir)
        # a live run first: "pass --overwrite" is no advice for a directory another process is writing
        _refuse_problem_judged_on_main(
            accelerator, lambda: runs.live_run_problem(run_dir) or _output_dir_problem(run_dir, config.overwrite)
        )
        return run_dir, None
    name = [str(runs.new_run_dir(config.stage, model_tag)) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(name)  # ranks may straddle a clock second
    # a runs/ that is a file, a working directory nobody may write in: one line, as for --output-dir
    _refuse_problem_judged_on_main(accelerator, lambda: _output_dir_problem(Path(name[0]), False, "run directory"))
    return Path(name[0]), None


def _prepare_run_dir(run_dir: Path, config: TrainConfig, resuming: bool) -> Path | None:
    """Create the run directory and write its config (a resumed run's once its checkpoint has loaded: a refused
    resume must leave the options the run was made with). With --overwrite, the run it held is moved whole (its
    config, metrics, curves, checkpoints and final model) into a new sibling `<dir>.previous-<time>`, which is
    returned. It was once cleared in place before the first step: a new run that then failed (diverged, out of
    memory) had deleted the old metrics and left the old final model described by the new run's config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    aside = None
    old = [p for p in run_dir.iterdir() if p.name != runs.RUN_LOCK]
    if not resuming and config.overwrite and old:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = run_dir.with_name(f"{run_dir.name}.previous-{stamp}")
        for n in itertools.count(2):  # two replacements within one second
            try:
                aside.mkdir()
                break
            except FileExistsError:
                aside = run_dir.with_name(f"{run_dir.name}.previous-{stamp}-{n}")
        for path in old:
            path.rename(aside / path.name)
    if not resuming:
        save_config(config, run_dir / "config.yaml")
    return aside


@contextlib.contextmanager
def damaged_checkpoint_is_user_error(checkpoint: Path, run_dir: Path) -> Iterator[None]:
    """Turn a failure to read `checkpoint` (a truncated weights or optimizer file, a hand-edited state: whatever
    the loaders raise) into one line naming it and the checkpoint before it, which `--resume` can take instead."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001  (safetensors, torch, pickle and json each raise their own)
        earlier = [c for c in ckpt.list_checkpoints(run_dir) if c.name < checkpoint.name]
        hint = f"; resume from an earlier one: --resume {earlier[-1]}" if earlier else ""
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--resume {checkpoint}: cannot read the checkpoint, it may be damaged ({reason}){hint}") from None


def launch_layout(accelerator) -> dict:
    """How the training state is split over processes, saved with each checkpoint: a resume needs the same."""
    plugin = accelerator.state.deepspeed_plugin
    return {"processes": accelerator.num_processes, "zero_stage": plugin.zero_stage if plugin is not None else None}


def check_same_launch(state: dict, accelerator, checkpoint: Path) -> None:
    """`UserError` when `checkpoint` was saved under another process count or DeepSpeed ZeRO stage (the optimizer
    state is split by both: loading it fails deep inside DeepSpeed or accelerate, with a traceback on every rank).
    Checkpoints from before the layout was saved are not checked."""
    saved, now = state.get("launch"), launch_layout(accelerator)
    if saved is None or saved == now:
        return
    raise UserError(f"--resume {checkpoint}: saved by {ckpt.describe_launch(saved)}, but this launch has "
                    f"{ckpt.describe_launch(now)}; "
                    "resume with the launch the run was started with (--launcher or accelerate config, process count)")


# ---------------------------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validation_loss(accelerator, model, dataset, collate, micro_batch_size: int, max_rows: int) -> dict[str, float]:
    """Mean LM loss and perplexity over `max_rows` rows of `dataset` spread evenly over it (all of it when it holds
    no more), shared out over the ranks.

    Spread, not the first rows: the split is stored in an order that is not a sample (pretraining documents in the
    order of their input files, packed SFT rows longest first), and its first 128 rows once scored 83% English
    from a split of 13%. The rows depend only on `max_rows` (`--eval-batches` x `--global-batch-size`), not on how
    a step is split into processes and micro-batches: a DDP run, a one-process run with accumulation and a resume
    with another --micro-batch-size report validation on the same rows. Each rank scores every world-th of them, in
    forwards of `micro_batch_size` rows.

    Every rank runs the same number of forwards: under ZeRO-3 (parameter gathers) and expert parallelism
    (all-to-all) a forward is a collective, and a rank that stopped early would leave the others waiting forever.
    A rank whose share has run out runs its forward on a stand-in row and counts nothing from it.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum CE, targets)
    rank, world = accelerator.process_index, accelerator.num_processes
    num_rows = min(max_rows, len(dataset))
    chosen = [i * len(dataset) // num_rows for i in range(num_rows)]  # evenly spaced; all rows if num_rows = len
    indices = chosen[rank::world]
    largest_share = -(-num_rows // world)  # rank 0's
    for b in range(-(-largest_share // micro_batch_size)):
        chunk = indices[b * micro_batch_size:(b + 1) * micro_batch_size]
        host_batch = collate([dataset[i] for i in chunk or [0]])
        n = count_targets(host_batch) if chunk else 0  # counted on the host: no wait for the device
        batch = {k: to_device(v, accelerator.device) for k, v in host_batch.items()}
        with accelerator.autocast():
            out = model(**batch, num_items_in_batch=torch.ones((), device=accelerator.device), use_cache=False)
        if n == 0:
            continue
        lm = (getattr(out, "aux_losses", None) or {}).get("lm", out.loss)  # sum of CE (num_items_in_batch=1)
        total[0] += lm.detach().double()
        total[1] += n
    total = _reduce_sum(accelerator, total)
    if was_training:
        model.train()
    if total[1] == 0:
        return {}
    loss = (total[0] / total[1]).item()
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}


# ---------------------------------------------------------------------------------------------------------------
# Final model


def export_config(model):
    """The config of the model as saved: training-only modules off (DeepSeek-V3's MTP block, whose weights
    `checkpoint.TRAINING_ONLY_PREFIXES` names, is not part of the exported model), the KV cache on for generation."""
    config = copy.deepcopy(model.config)
    if getattr(config, "num_mtp_layers", 0):
        config.num_mtp_layers = 0
    config.use_cache = True
    return config


def save_model_files(model, tokenizer, directory: Path) -> None:
    """What makes `directory` loadable as `model` besides its weights: config.json, the tokenizer and the generation
    config (eos/pad of the tokenizer). Written into `final/` and into every checkpoint."""
    export_config(model).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        generation = copy.deepcopy(model.generation_config)
        stops = stop_token_ids(tokenizer)  # <|im_end|> too: generate() and vLLM stop at the end of a chat turn
        generation.eos_token_id = stops if len(stops) > 1 else tokenizer.eos_token_id
        generation.pad_token_id = tokenizer.pad_token_id
        generation.save_pretrained(directory)


def save_final_model(accelerator, model, tokenizer, run_dir: Path) -> Path:
    """Write `run_dir/final/` (safetensors, config, tokenizer, generation config), gathered under ZeRO-3.

    Training-only modules are dropped (`export_config`).
    """
    final = run_dir / runs.FINAL
    tmp = run_dir / ".tmp-final"
    unwrapped = accelerator.unwrap_model(model)
    ep = expert_parallel.model_expert_parallel(unwrapped)
    if ep is not None:  # all experts gathered from their ranks: an ordinary checkpoint that loads with EP = 1
        state_dict = expert_parallel.gather_full_state_dict(unwrapped, ep)
    else:
        state_dict = accelerator.get_state_dict(model)  # full weights on the main process (ZeRO-3 gathers)
    if accelerator.is_main_process:
        config = export_config(unwrapped)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ckpt.TRAINING_ONLY_PREFIXES)}
        if getattr(config, "tie_word_embeddings", False):
            # a gathered state dict (DeepSpeed, expert parallelism) holds the tied head as a copy that
            # save_pretrained cannot tell from a weight of its own: it would be stored twice
            for tied in getattr(unwrapped, "_tied_weights_keys", None) or {}:
                state_dict.pop(tied, None)
        if tmp.exists():
            shutil.rmtree(tmp)
        original = unwrapped.config
        unwrapped.config = config
        try:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        finally:
            unwrapped.config = original
        save_model_files(unwrapped, tokenizer, tmp)
        apply_umask(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------------------
# The loop


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console()
    if not console.is_terminal:
        # a log file or a pipe: no live bar (rich writes it only when it stops, so a log showed nothing of the
        # training until the end, and nothing at all after a kill); the per-interval lines say it all
        console = Console(width=160)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=10),  # room for the numbers and the ETA in 80 columns (lr: in the log lines)
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  MFU {task.fields[mfu]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or not console.is_terminal,
    )


def _log_line(step: int, total_steps: int, values: dict[str, float]) -> str:
    """The line printed at each log interval (kept in the terminal's scrollback and in logs) from the values logged
    for it: the loss, lr, gradient norm, the interval's speed, the peak memory and the time since the first step."""
    parts = [f"step {step}/{total_steps}", f"loss {values['loss']:.4f}", f"lr {values['lr']:.2e}"]
    if "grad_norm" in values:
        parts.append(f"grad_norm {values['grad_norm']:.3f}")
    parts.append(f"{values['tokens_per_s']:,.0f} tok/s")
    if "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    parts.append(f"peak mem {values['mem_gib']:.2f} GiB")
    parts.append(f"elapsed {datetime.timedelta(seconds=round(values['elapsed_s']))}")
    return " | ".join(parts)


def train(config: TrainConfig, eval_fn: EvalFn | None = None, run: Run | None = None) -> Path:
    """Train according to `config`; returns the run directory (with `final/` holding the model).

    `eval_fn(accelerator, model, step) -> metrics` replaces the default validation (the LM loss on the data's val
    split: pretraining shards' or SFT conversations') every `eval_every` steps; its metrics go to TensorBoard and metrics.jsonl. `run` lets
    library callers bring their own model and data (see `Run`); by default `build_run` makes them.
    """
    held: list[IO] = []  # the run directory's lock (main process), released however training ends
    try:
        return _train(config, eval_fn, run, held)
    finally:
        for handle in held:
            handle.close()


def _train(config: TrainConfig, eval_fn: EvalFn | None, run: Run | None, held: list[IO]) -> Path:
    """`train`'s body; appends the run directory's lock to `held` once it takes it."""
    from accelerate.utils import set_seed

    flush_denormals()  # first: the CPU threads torch starts later inherit it (devices.py)

    if config.stage == "sft" and run is None:
        from minillm.training.setup import sft_model_dir, sft_model_type

        # record what SFT starts from (the latest pretraining run when not given) and name the run after it
        model_dir = sft_model_dir(sft_start_model(config), config.model)
        model_type = sft_model_type(model_dir)
        if config.model is not None and config.model != model_type:  # a recipe's `model` beside a model_path
            raise UserError(f"model {config.model} does not match the model to fine-tune, {model_dir} ({model_type})")
        # absolute: the record must name the same model from any directory (eval ppl follows it: runs.py)
        config = config.replace(model_path=os.path.abspath(model_dir), model=model_type)
    config = config.resolve()
    if run is None:
        check_expert_parallel(config)
    accelerator = make_accelerator(config)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # no page faults for each step's activations (host_memory.py)
    run_dir, resume_from = resolve_run_dir(config, accelerator)  # checks only; nothing is written yet
    other_dir = None  # an --output-dir a resumed run does not go to
    if resume_from is not None and config.output_dir and Path(config.output_dir).resolve() != run_dir.resolve():
        # a run goes on in its own directory (another --output-dir, or the one the config of a moved or copied run
        # names); recorded as given, the next `--config RUN/config.yaml --resume RUN` looked for it there
        other_dir, config = config.output_dir, config.replace(output_dir=str(run_dir))
    resume_state = None
    if resume_from is not None:  # a checkpoint this launch cannot load is refused before its config is rewritten
        with damaged_checkpoint_is_user_error(resume_from, run_dir):
            resume_state = ckpt.read_trainer_state(resume_from)
        check_same_launch(resume_state, accelerator, resume_from)
    set_seed(config.seed)  # identical initial weights on every rank
    if run is None:
        run = build_run(config)  # every input check happens here, before the run directory exists
    steps_per_epoch = len(run.train_data) // config.global_batch_size
    if steps_per_epoch < 1 and config.max_steps is None:
        raise UserError(
            f"the data has {len(run.train_data)} rows, fewer than one global batch ({config.global_batch_size})"
        )
    if config.eval_every and eval_fn is None and run.val_data is None and accelerator.is_main_process:
        # a warning, not an error: the base preset's default eval_every meets shards built without a val split
        print(f"warning: eval_every {config.eval_every}, but this run has no validation data, so no validation runs "
              "(build the data with --val-fraction to get some: `minillm data pretrain|sft`)", file=sys.stderr)
    total_steps = budget.total_steps(config, len(run.train_data))  # the formula `minillm info --config` shows
    if resume_from is None:  # a resumed run keeps the schedule it was started with (these checks came later)
        check_schedule(config, total_steps)
    if accelerator.is_main_process:
        if (lock := runs.lock_run_dir(run_dir)) is not None:
            held.append(lock)
        if (aside := _prepare_run_dir(run_dir, config, resuming=resume_from is not None)) is not None:
            accelerator.print(f"--overwrite: the run that was in {run_dir} was moved to {aside}")
    accelerator.wait_for_everyone()
    model = run.model
    # before expert parallelism shards them; `ds_numel`: a parameter ZeRO-3 partitioned as it was built
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    flops_token = flops_per_token(model, config.seq_len)  # the whole model: before EP shards its experts
    model, optimizer, scheduler = prepare_model_and_optimizer(accelerator, model, config, total_steps)
    bucket_batch_lengths(run.collate, accelerator.device, str(accelerator.mixed_precision), config.seq_len)
    batches = GlobalBatches(run.train_data, run.sampler, run.collate, config.global_batch_size,
                            config.micro_batch_size, accelerator.process_index, accelerator.num_processes)
    start_step, skipped_total, bad_in_row = 0, 0, 0
    ep = expert_parallel.model_expert_parallel(accelerator.unwrap_model(model))
    if resume_from is not None:
        state = resume_state
        with damaged_checkpoint_is_user_error(resume_from, run_dir):
            accelerator.load_state(str(resume_from))
            # load_state restores Accelerate's micro-step counter, counted in the saved run's accumulation; a resume
            # with another --micro-batch-size would then meet its step boundaries mid-step (no optimizer step, or
            # one on part of the batch). Checkpoints lie on step boundaries, so the count starts again from 0.
            accelerator.step = 0
            if ep is not None:  # DeepSpeed restored the dense weights; the experts come from this rank's shard
                expert_parallel.load_expert_shards(accelerator.unwrap_model(model), resume_from, ep)
            start_step, skipped_total = state["step"], state.get("skipped_steps", 0)
            bad_in_row = state.get("bad_in_row", 0)
            batches.load_state_dict(state["data"])
        if accelerator.is_main_process:
            save_config(config, run_dir / "config.yaml")  # now that the checkpoint has loaded
            accelerator.print(f"resuming {run_dir} from {resume_from.name} (step {start_step})")
            if other_dir is not None:
                print(f"note: --output-dir {other_dir}: resuming continues the run where it is, in {run_dir}",
                      file=sys.stderr)
            aside = ckpt.set_aside_later_checkpoints(run_dir, start_step)
            if aside is not None:
                moved = ", ".join(sorted(p.name for p in aside.iterdir()))
                accelerator.print(f"what the run held after step {start_step} ({moved}) was moved to {aside}")
        accelerator.wait_for_everyone()

    # on a GPU the next steps are collated ahead in a background thread, in pinned memory
    source = batches
    if prefetch_batches(accelerator.device):
        source = Prefetcher(batches, pin_memory=accelerator.device.type == "cuda")
    logger = MetricsLogger(accelerator, run_dir, config.to_dict(), start_step=start_step)
    precision = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[str(accelerator.mixed_precision)]
    peak = peak_flops(config.peak_tflops, accelerator.device, precision)
    model.train()
    poisoned = injected_nonfinite_steps(accelerator.process_index)
    window_tokens, window_start = 0, time.perf_counter()
    # a resumed run's elapsed time goes on from its checkpoint's (the time of the steps it kept)
    train_start = window_start - next((r["elapsed_s"] for r in reversed(logger.records) if "elapsed_s" in r), 0.0)
    window = LossWindow()
    final_loss = float("nan")  # the last logged mean loss, for the closing line
    last_val = None  # the latest validation loss, for the closing line
    if accelerator.is_main_process:
        accelerator.print(f"run directory: {run_dir}  ({total_steps} steps, global batch "
                          f"{config.global_batch_size} x {config.seq_len} tokens, {accelerator.num_processes} "
                          f"process(es), accumulation {accelerator.gradient_accumulation_steps}, {precision})")
        epochs = total_steps * config.global_batch_size / max(len(run.train_data), 1)
        name = run.model_name or getattr(getattr(run.model, "config", None), "model_type", "the model")
        accelerator.print(f"model {name}: {num_params:,} parameters; device "
                          f"{accelerator.device}; {total_steps * config.global_batch_size * config.seq_len:,} "
                          f"tokens, {epochs:.2f} epochs of the data")
        if run.start:  # without --model-path, the newest pretraining run: say which one that was
            accelerator.print(f"starting from {run.start}")
    def save_checkpoint(step: int) -> Path:
        save_experts = None if ep is None else functools.partial(
            expert_parallel.save_expert_shards, accelerator.unwrap_model(model), ep=ep)
        path = ckpt.save_checkpoint(accelerator, run_dir, step, {
            "data": source.state_dict(), "skipped_steps": skipped_total, "bad_in_row": bad_in_row,
            "total_steps": total_steps,
            "launch": launch_layout(accelerator),
        }, config.keep_last, save_extra=save_experts, save_model_files=functools.partial(
            save_model_files, accelerator.unwrap_model(model), run.tokenizer))
        if accelerator.is_main_process:  # keep the curves of a long run readable while it trains
            plot_curves(logger.records, run_dir / "loss_curve.png", title=f"{config.stage} {run.model_name}")
            accelerator.print(f"step {step}: saved {path}")
        return path

    try:
        with _progress(accelerator.is_main_process) as progress, StopRequest(
            accelerator.num_processes == 1 and started_directly(), on_request=lambda name: progress.console.print(
                f"{name}: finishing this step and saving a checkpoint (press Ctrl-C again to stop at once)")
        ) as stop:
            task = progress.add_task(config.stage, total=total_steps, completed=start_step, loss="-", lr="-", tps="-", mfu="-")

            def record(step: int, result: StepResult, lr: float) -> None:
                """What the host does with a step once it knows whether the step counted: counts a skip (and
                stops after `max_bad_steps` in a row), updates the progress bar, logs at log intervals."""
                nonlocal skipped_total, bad_in_row, window_tokens, window_start, peak, final_loss
                window_tokens += result.tokens
                if result.skipped:
                    skipped_total += 1
                    bad_in_row += 1
                    if accelerator.is_main_process:
                        why = "non-finite loss" if result.targets else "no target tokens"
                        progress.console.print(f"step {step}: {why}, step skipped ({bad_in_row} in a row, "
                                               f"{skipped_total} in all)")
                else:
                    bad_in_row = 0
                    window.add(result)
                tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                if peak and accelerator.device.type == "cpu" and not config.peak_tflops:
                    peak = cpu_peak_at_least(precision, tokens_per_s * flops_token / accelerator.num_processes)
                mfu = tokens_per_s * flops_token / (peak * accelerator.num_processes) if peak else None
                progress.update(task, completed=step, lr=f"{lr:.2e}", tps=f"{tokens_per_s:,.0f}",
                                mfu=f"{100 * mfu:.0f}%" if mfu is not None else "-")

                if step % config.log_every == 0 or step == total_steps or result.skipped:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    # waits for the device: at log intervals only; a skipped step is logged alone, once known
                    values: dict[str, float] = (result if result.skipped else window.mean_of(result)).read()
                    values.update({"lr": lr, "tokens_per_s": window_tokens / elapsed, "skipped_steps": skipped_total,
                                   "targets": result.targets, "elapsed_s": time.perf_counter() - train_start,
                                   "tokens_seen": step * config.global_batch_size * config.seq_len,
                                   "mem_gib": peak_memory_gib(accelerator.device)})
                    if not result.skipped:
                        values["ppl"] = math.exp(min(values["loss"], 50.0))
                        final_loss = values["loss"]
                        progress.update(task, loss=f"{values['loss']:.4f}")
                    if peak:
                        values["mfu"] = window_tokens * flops_token / elapsed / (peak * accelerator.num_processes)
                    if result.expert_counts is not None:
                        values.update(expert_load_stats(result.expert_counts.cpu()))
                    logger.log(step, values)
                    if accelerator.is_main_process:
                        progress.console.print(_log_line(step, total_steps, values),
                                               soft_wrap=True)  # one line in a log, the terminal's own wrap
                    window_tokens, window_start = 0, time.perf_counter()
                if result.skipped and bad_in_row >= config.max_bad_steps:  # stop after logging the last one
                    logger.close()
                    raise UserError(
                        f"stopping at step {step}: {bad_in_row} steps in a row had a non-finite loss (diverged); "
                        f"lower --lr, check the data, or resume from an earlier checkpoint"
                    )

            device_skips = skips_on_device(accelerator, optimizer)
            pending: tuple[int, StepResult, float] | None = None  # a step the device decided, not yet settled
            for step in range(start_step + 1, total_steps + 1):
                engine_skips = getattr(model, "skipped_steps", 0)  # DeepSpeed's count of the steps it discarded
                result = forward_backward(accelerator, model, source.next_step(), poison_last=step in poisoned,
                                          skip_on_device=device_skips)
                if pending is not None:  # the previous step, now that the device has this one's work queued
                    settle(pending[1], scheduler)
                    record(*pending)
                    pending = None
                lr = scheduler.get_last_lr()[0]
                optimizer_step(accelerator, model, optimizer, scheduler, config, result, engine_skips)
                host_needs_it = (step % config.log_every == 0 or step == total_steps or stop.requested
                                 or (config.eval_every and step % config.eval_every == 0)
                                 or (config.save_every and step % config.save_every == 0))
                if result.check is not None and not host_needs_it:
                    pending = (step, result, lr)  # settled at the next step, without waiting for the device
                    continue
                settle(result, scheduler)
                record(step, result, lr)

                pause_start = time.perf_counter()  # evaluation and checkpoints do not count as training speed
                if config.eval_every and step % config.eval_every == 0:
                    metrics = (eval_fn(accelerator, model, step) if eval_fn is not None else
                               validation_loss(accelerator, model, run.val_data, run.collate, config.micro_batch_size,
                                               config.eval_batches * config.global_batch_size)
                               if run.val_data is not None else {})
                    if metrics:
                        logger.log(step, metrics)
                    if "val/loss" in metrics:  # said on the terminal too, not only in metrics.jsonl / TensorBoard
                        last_val = metrics["val/loss"]
                        if accelerator.is_main_process:
                            progress.console.print(f"step {step}: val loss {last_val:.4f}, "
                                                   f"val ppl {math.exp(min(last_val, 50.0)):,.1f}")
                saved = config.save_every and step % config.save_every == 0 and step < total_steps
                if saved:
                    save_checkpoint(step)
                if stop.requested and step < total_steps:  # Ctrl-C / SIGTERM: this step's checkpoint, then stop
                    path = run_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_name(step) if saved else save_checkpoint(step)
                    logger.close()
                    raise TrainingStopped(
                        f"stopped at step {step} of {total_steps} ({stop.requested}); saved {path}; continue with: "
                        + runs.resume_command(config.stage, run_dir),
                        exit_code=128 + signal.Signals[stop.requested].value)
                window_start += time.perf_counter() - pause_start
    finally:
        if isinstance(source, Prefetcher):
            source.close()

    final = save_final_model(accelerator, model, run.tokenizer, run_dir)
    if accelerator.is_main_process:
        plot_curves(logger.records, run_dir / "loss_curve.png", title=f"{config.stage} {run.model_name}")
        val = f" (val loss {last_val:.4f})" if last_val is not None else ""
        accelerator.print(f"final loss {final_loss:.4f}{val}; model saved to {final}")
    accelerator.wait_for_everyone()
    logger.close()
    return run_dir
