"""Training metrics: TensorBoard through Accelerate's tracker, `metrics.jsonl`, and the MFU estimate.

Every logged step becomes one JSON line in `<run>/metrics.jsonl` (the source of the loss-curve PNG and what tests
read) and the same scalars in TensorBoard under `<run>/logs/`. Only the main process writes.

MFU (model FLOPs utilisation) = achieved training FLOP/s / peak FLOP/s of the devices. Training FLOPs per token
come from `minillm.models.stats` when it knows the model (it counts only the active experts of an MoE and the
attention term), else from the classic 6 x parameters. The peak is given with `peak_tflops`, else looked up by
GPU name and precision (`minillm.training.perf.GPU_PEAK_TFLOPS`, dense numbers from the vendors' sheets), else, on
a CPU, measured once per process with a large matmul in the run's precision, through the faster of torch's and
oneDNN's kernels (`perf.measure_cpu_peak_flops`; on a CPU shared with other jobs the measured peak drops with the
load).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from minillm.training import perf

_CPU_PEAKS: dict[tuple[str, int], float] = {}  # (dtype, threads) -> the best peak seen by this process


def _cpu_peak(dtype: str, threads: int) -> float:
    if (dtype, threads) not in _CPU_PEAKS:
        _CPU_PEAKS[dtype, threads] = perf.measure_cpu_peak_flops(dtype, size=1024, seconds=0.25)
    return _CPU_PEAKS[dtype, threads]


def cpu_peak_at_least(dtype: str, achieved_flops: float) -> float:
    """The CPU peak, corrected when the run itself did better: the quick measurement at the start may have shared
    the cores with another job and come out low, which would show an MFU above 100%. Then the peak is measured
    again, longer, and is never less than the rate the run achieved (the hardware did at least that)."""
    key = (dtype, torch.get_num_threads())
    peak = _cpu_peak(*key)
    if achieved_flops > peak:
        again = perf.measure_cpu_peak_flops(dtype, size=2048, seconds=0.5)
        _CPU_PEAKS[key] = peak = max(peak, again, achieved_flops)
    return peak


def peak_flops(configured_tflops: float | None, device: torch.device | str | None = None,
               dtype: str = "bf16") -> float | None:
    """Peak FLOP/s of one device in `dtype` ("fp32", "bf16", "fp16"), or None when unknown (unlisted GPU)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return perf.gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    if device.type == "cpu":
        return _cpu_peak(dtype, torch.get_num_threads())
    return None


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of `model` at `seq_len`."""
    try:
        from minillm.models import stats

        return float(stats.model_stats(model, seq_len=seq_len).flops_per_token)
    except (ImportError, AttributeError, TypeError, ValueError, KeyError):
        pass
    n_params = sum(p.numel() for p in model.parameters())
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    # 6N for the matmuls plus 6 * L * D * seq for attention scores and values (causal halves 12 -> 6)
    return 6.0 * n_params + 6.0 * layers * hidden * seq_len


def expert_load_stats(counts: torch.Tensor) -> dict[str, float]:
    """Per-MoE-layer balance from `counts` (n_moe_layers, n_experts): the busiest expert's load over the mean
    (DeepSeek's MaxVio + 1: 1 is balanced, E/k all tokens on k experts), the number of idle experts, the max/min
    ratio (the seed plots it; with one idle expert it is the busiest one's count, so it says more about the batch
    size than about the router) and the coefficient of variation. A ratio near 1 and a CV near 0 mean the router
    spreads tokens evenly. `layer_i` counts MoE layers (DeepSeek-V3's first `num_dense_layers` have none).
    """
    out: dict[str, float] = {}
    counts = counts.float()
    for layer, row in enumerate(counts):
        mean = row.mean().item()
        out[f"moe/layer_{layer}/max_over_mean"] = row.max().item() / mean if mean > 0 else 1.0
        out[f"moe/layer_{layer}/idle_experts"] = float((row == 0).sum().item())
        out[f"moe/layer_{layer}/max_min_ratio"] = row.max().item() / max(row.min().item(), 1.0)
        out[f"moe/layer_{layer}/cv"] = (row.std(unbiased=False).item() / mean) if mean > 0 else 0.0
    return out


# TensorBoard groups scalars by the part of the tag before the first "/": these put a step's numbers in a few
# groups (`metrics.jsonl` keeps the plain keys, which scripts and plots read)
_TAG_GROUPS = {"loss": "train/loss", "ppl": "train/ppl", "grad_norm": "optim/grad_norm", "lr": "optim/lr",
               "skipped_steps": "optim/skipped_steps", "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu",
               "mem_gib": "perf/mem_gib", "elapsed_s": "perf/elapsed_s", "tokens_seen": "data/tokens_seen",
               "targets": "data/target_tokens"}


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a `metrics.jsonl` key: `loss` -> `train/loss`, `loss/mtp` -> `train/loss_mtp`,
    `lr` -> `optim/lr`, `tokens_per_s` -> `perf/tokens_per_s`; `val/...` and `moe/...` as they are."""
    if key.startswith("loss/"):
        return "train/loss_" + key.split("/", 1)[1]
    return _TAG_GROUPS.get(key, key)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` in order ([] when the file is missing), without the lines that are not a
    record: the last line of a killed run may be cut short."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class MetricsLogger:
    """Writes step metrics to TensorBoard (Accelerate tracker) and `metrics.jsonl`; keeps them for the plot."""

    def __init__(self, accelerator, run_dir: Path, config: dict[str, Any], start_step: int = 0):
        self.accelerator = accelerator
        self.path = Path(run_dir) / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if accelerator.is_main_process:
            if self.path.exists():
                # a resumed run: keep what was logged up to the checkpoint, drop what a killed run logged after it
                self.records = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
                self._rewrite()
            # Accelerate's TensorBoard tracker, attached here because the run directory is only known now;
            # purge_step drops events a killed run wrote after the checkpoint we resume from
            from accelerate.tracking import TensorBoardTracker

            tracker = TensorBoardTracker("logs", str(run_dir), purge_step=start_step + 1)
            tb_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
            tracker.start()
            tracker.store_init_configuration(tb_config)
            accelerator.trackers.append(tracker)

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")
        tmp.replace(self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record `values` for `step` (main process writes; other ranks ignore the call)."""
        if not self.accelerator.is_main_process:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        record = {"step": step, **clean}
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log({tensorboard_tag(k): v for k, v in clean.items()}, step=step)

    def close(self) -> None:
        """Flush and close the trackers (not `accelerator.end_training`, which also tears down the process group
        a library caller may still use)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []
