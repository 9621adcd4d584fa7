"""Hardware peaks and model FLOPs utilisation (MFU), shared by the trainer's logs and the benchmarks.

MFU = achieved model FLOP/s / peak FLOP/s of the device, where the model FLOPs per token come from
`minillm.models.stats` (forward + backward, active experts only, attention scores included).

Notable choices:
- GPU peaks are the vendors' *dense* tensor-core numbers (no 2:4 sparsity), per dtype, looked up by a substring of
  the device name; the more specific names (`H100 PCIe`, `H100 NVL`) are tried before the generic `H100`.
- A CPU has no datasheet peak we can trust (turbo, AVX-512/AMX availability, shared cores), so its peak is
  *measured* in the same process: the best rate of a large square matmul in the run's dtype, through the faster
  of torch's own kernel (`torch.mm`: MKL for fp32) and oneDNN's (the one the models' fp32 linears use, see
  `models/layers/linear.py`). Taking the faster keeps MFU honest where the two differ: on a Zen 5 CPU MKL's fp32
  path reaches half of what oneDNN does, and measuring the peak with it would put our MFU above 100%. On a
  machine shared with other jobs the measured peak drops with the load, so MFU stays a fair ratio only when both
  are measured at the same time (the benchmarks re-measure it next to the timed steps).
- fp32 on a GPU means plain IEEE fp32 (torch's default `allow_tf32=False` for matmuls).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from minillm.errors import UserError

# Dense peak TFLOP/s per dtype. Keys are matched as substrings of `torch.cuda.get_device_name()`, in this order.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM (HBM3)
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H800": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H20": {"bf16": 148.0, "fp16": 148.0, "fp32": 44.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A800": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "L40": {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "A6000": {"bf16": 155.0, "fp16": 155.0, "fp32": 38.7},  # RTX A6000 (fp32 accumulate)
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "5090": {"bf16": 209.5, "fp16": 209.5, "fp32": 104.8},
    "4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},  # fp32 accumulate
    "3090": {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype | str) -> str:
    """'fp32' / 'bf16' / 'fp16' for a torch dtype or one of those names."""
    if isinstance(dtype, str):
        if dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown dtype {dtype!r}; expected fp32, bf16 or fp16")
        return dtype
    return DTYPE_NAMES[dtype]


def gpu_peak_flops(device_name: str, dtype: torch.dtype | str = "bf16") -> float | None:
    """Dense peak FLOP/s of a GPU named `device_name` in `dtype`, or None when the card or dtype is not listed."""
    name = dtype_name(dtype)
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in device_name:
            tflops = peaks.get(name)
            return tflops * 1e12 if tflops else None
    return None


def measure_cpu_peak_flops(
    dtype: torch.dtype | str = "fp32", size: int = 2048, seconds: float = 1.0, clock=time.perf_counter
) -> float:
    """The best FLOP/s of a `size` x `size` matmul in `dtype` on this CPU, over about `seconds` of repeats of each
    kernel (`torch.mm`, and oneDNN's where torch has it; the faster counts).

    The best repeat, not the mean: the peak is what the hardware can do, and other processes only ever slow a
    repeat down. Uses torch's current thread count (set it before calling, as for the run being measured).
    `clock` times the repeats (`time.process_time` to count CPU seconds, as a benchmark on a busy machine may).
    """
    from minillm.models.layers import linear as dense

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name(dtype)]
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(torch_dtype)
    b = torch.randn(size, size, generator=generator).to(torch_dtype)
    out = torch.empty(size, size, dtype=torch_dtype)
    kernels = [lambda: torch.matmul(a, b, out=out)]
    if dense.onednn_available():
        kernels.append(lambda: dense.onednn_mm(a, b))
    best = float("inf")
    for kernel in kernels:
        kernel()  # warm-up: thread pool, kernel selection
        deadline = time.perf_counter() + seconds / len(kernels)
        repeats = 0
        while repeats < 3 or time.perf_counter() < deadline:
            start = clock()
            kernel()
            best = min(best, max(clock() - start, 1e-9))
            repeats += 1
    return 2.0 * size**3 / best


def device_peak_flops(device: torch.device | str, dtype: torch.dtype | str = "fp32") -> float | None:
    """Peak FLOP/s of one `device` in `dtype`: the GPU table for CUDA, a measured matmul for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    if device.type == "cpu":
        return measure_cpu_peak_flops(dtype)
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1]: `tokens_per_s * flops_per_token / (peak_flops * devices)`."""
    if not peak_flops or peak_flops <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak_flops * devices)


# ---------------------------------------------------------------------------------------------------------------
# The side-by-side CPU benchmark (scripts/bench_models.py, scripts/bench_train.py)

# `--preset cpu256` of the benchmarks: each model's `tiny` preset widened to hidden 256 with 4 layers and an 8k
# vocabulary (batch 4 x 256), the size at which the issue's CPU goals are set. DeepSeek-V3's MTP module is off
# because the transformers reference has none (the comparison must run the same network).
CPU_BENCH_PRESET = "cpu256"
CPU_BENCH_OVERRIDES: dict[str, dict] = {
    "mini_llama3": dict(
        vocab_size=8000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "mini_deepseekv3": dict(
        vocab_size=8000, hidden_size=256, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
        num_dense_layers=1, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2, num_mtp_layers=0,
    ),
    "mini_qwen3_next": dict(
        vocab_size=8000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=64, linear_value_head_dim=64, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=256, shared_expert_intermediate_size=512,
    ),
}


def preset_and_overrides(model: str, preset: str) -> tuple[str, dict]:
    """The registry preset and config overrides behind a benchmark `preset` (`cpu256` = `tiny` + overrides)."""
    if preset == CPU_BENCH_PRESET:
        return "tiny", dict(CPU_BENCH_OVERRIDES[model])
    return preset, {}


def autocast_context(device: torch.device | str, dtype: torch.dtype | str):
    """bf16/fp16 autocast on `device` for mixed precision, a no-op context for fp32."""
    import contextlib

    name = dtype_name(dtype)
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if name == "bf16" else torch.float16)


def bare_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The AdamW of the bare loop: fused (one kernel over all tensors, on the CPU and on CUDA) as the trainer's
    own optimizer is, so a side-by-side comparison times the models, not two AdamW implementations."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)


def bare_train_step(model, optimizer, input_ids: torch.Tensor, dtype: torch.dtype | str = "fp32") -> torch.Tensor:
    """One forward + backward + AdamW step with `labels = input_ids`, nothing else: the loop any causal LM of
    transformers trains with (no clipping, no logging, no host sync). Returns the detached loss."""
    with autocast_context(input_ids.device, dtype):
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# The benchmark scripts' command lines (scripts/bench_*.py, scripts/make_sample_data.py): a bad option value is
# one line and exit code 2, as in the `minillm` CLI, and it is caught before the run, not after it.


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type=` for integers >= `minimum`: `--steps 0` is argparse's one-line error (exit 2) instead of
    a run that divides by zero, takes the median of nothing or prints negative rates."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"  # what argparse would name in its own messages
    return parse


positive_int = int_at_least(1)  # steps, rounds, repeats, batch sizes, sequence lengths, threads
non_negative_int = int_at_least(0)  # warm-up steps: none is a valid choice


def run_main(main: Callable[[], object]) -> None:
    """Run a script's `main()` as a command: a `UserError` (a bad option, an unknown model or preset, a missing
    file) ends it with one `error: ...` line on stderr and exit code 2, as the `minillm` CLI does, instead of a
    traceback. Other exceptions are bugs and keep their traceback."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
