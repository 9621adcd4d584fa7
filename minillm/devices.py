"""The torch device a command runs on, from its `--device` option (chat, serve, eval, the benchmarks).

One resolver, so that every command means the same by `auto` and refuses a device this machine lacks with the same
one line, before any work: torch's own failure would come later, mid-run, as a traceback.
"""

from __future__ import annotations

import torch

from minillm.errors import UserError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str | torch.device = "auto", option: str = "--device") -> torch.device:
    """`auto`: the first CUDA GPU, else Apple's MPS, else the CPU. Otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{option} {name}: not a device name (use {DEVICE_NAMES})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} {name}: no CUDA GPU is visible to this process (use {option} cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not mps_available():
        raise UserError(f"{option} {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{option} {name}: not a device minillm runs on (use {DEVICE_NAMES})")
    return device


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16, as on AMD Zen 4/5 and Intel Cooper Lake; or Intel's
    AMX), where oneDNN runs bf16 matmuls at 2x (AVX512-BF16) to 7x (AMX) the fp32 rate and a bf16-autocast training
    step runs 1.2-2.4x faster than an fp32 one (README, "bf16 by default on CPUs that multiply in bf16"). Elsewhere
    bf16 is emulated in fp32 arithmetic and only adds conversions. Asks torch's own CPU probes, which are private:
    a torch without them answers False."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def flush_denormals() -> bool:
    """Make this process's CPU math treat subnormal floats (below 1.2e-38 in fp32 and bf16) as zero, as GPU kernels
    commonly do; returns whether the CPU supports it.

    Values that small come up in training: Gated DeltaNet's decays (the exponential of a cumulative log-gate) and
    AdamW's second moments of tiny gradients. Intel cores compute on subnormals through microcode assists, many
    times slower: mini_qwen3_next's bf16 step took 422 ms with them and 350 ms without (Xeon with AMX, 2 threads).
    Nothing a model computes depends on them. It applies to the calling thread and the threads it starts later,
    so the trainer calls it before any tensor work, while torch's OpenMP threads do not exist yet.
    """
    return torch.set_flush_denormal(True)


def peak_memory_gib(device: torch.device) -> float:
    """The run's peak memory so far, in GiB: on CUDA the most the caching allocator has handed out on `device`;
    elsewhere the process's peak resident set (host memory, the CPU's weights and activations included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # POSIX; Linux reports KiB

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
