"""The budget of a run before it starts: optimizer steps, tokens, training FLOPs and expected wall time on a GPU.

`minillm info --config RECIPE` prints it, so a user sees what a recipe costs before renting the hardware:

    steps        = max_steps, or epochs x (training rows // global batch)   (the trainer's own formula)
    tokens       = steps x global batch x seq_len                          (the token budget)
    FLOPs        = tokens x training FLOPs per token                       (forward + backward, active experts)
    wall time    = FLOPs / (GPU dense peak x MFU x number of GPUs)

The MFU is an assumption the user can change (`--mfu`). By default, for a model of the `base` preset, it is what
the trainer measured for that architecture on one H200 (bf16, 32 x 512 tokens per step; README: Measured results),
compiled or eager as the recipe trains, so the estimate is what our code reached, not what we aim for. Other models
(other sizes, transformers' own classes) were not measured: they get the goal of `scripts/gpu_bench.sh` (40% dense,
25% MoE), and the table says so. Rows come from the built shards when they exist;
before they are built, `--tokens` states the dataset's size instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from minillm.errors import UserError
from minillm.training.config import TrainConfig

# MFU the trainer measured on one H200 (2026-11-30, bf16, base preset, 32 x 512 tokens per step), eager and
# compiled. mini_deepseekv3 compiled with the GPU loss of that day is not measured (before it, compiled ran 0.98-1.13x
# eager): its eager figure stands in. mini_qwen3_next: its Gated DeltaNet in PyTorch; compiled ran slower than eager.
MEASURED_MFU = {
    "mini_llama3": {"eager": 0.190, "compiled": 0.300},
    "mini_deepseekv3": {"eager": 0.130},
    "mini_qwen3_next": {"eager": 0.045},
}
# the MFU goals of scripts/gpu_bench.sh (issue: training speed), for architectures not measured
GOAL_MFU = {"dense": 0.40, "moe": 0.25}


def default_mfu(model_type: str | None, moe: bool, base_preset: bool, compiled: bool) -> tuple[float, str]:
    """(MFU, where it comes from) for a budget the user gave no `--mfu`: the one measured for a `base` preset model
    of this architecture, compiled or eager (eager where compiled was not measured), else the goal."""
    measured = MEASURED_MFU.get(model_type or "", {}) if base_preset else {}
    if compiled and "compiled" in measured:
        return measured["compiled"], "measured on an H200, base preset, compiled"
    if "eager" in measured:
        return measured["eager"], "measured on an H200, base preset, eager"
    return GOAL_MFU["moe" if moe else "dense"], "the benchmark's goal; not measured for this model"


def total_steps(config: TrainConfig, num_rows: int) -> int:
    """Optimizer steps of a run over `num_rows` training rows: `max_steps`, else `epochs` passes (at least 1)."""
    if config.max_steps:
        return config.max_steps
    return max(1, int(config.epochs * (num_rows // config.global_batch_size)))


@dataclass
class RunBudget:
    steps: int
    tokens_per_step: int  # global batch x seq_len (padding included: it costs compute too)
    flops_per_token: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return float(self.tokens) * self.flops_per_token

    def seconds(self, peak_flops: float, mfu: float, devices: int = 1) -> float:
        """Expected wall time on `devices` GPUs of `peak_flops` each, running at model FLOPs utilisation `mfu`."""
        return self.flops / (peak_flops * mfu * devices)


def count_rows(config: TrainConfig, data_dir: str) -> int:
    """Training rows of the built data at `data_dir`, counted exactly as the trainer's dataset counts them."""
    from pathlib import Path

    if not Path(data_dir).is_dir():
        raise UserError(
            f"data {data_dir} does not exist yet: build it (minillm data ...) or pass --tokens N (the dataset's size)"
        )
    if config.stage == "pretrain":
        from minillm.data.pretrain import PretrainDataset

        return len(PretrainDataset(data_dir, config.seq_len, split="train"))
    from minillm.data.sft import SFTDataset

    return len(SFTDataset(data_dir))


def plan(config: TrainConfig, flops_per_token: int, num_rows: int | None = None, tokens: int | None = None) -> RunBudget:
    """The budget of a resolved `config`; rows from the data (`num_rows`) or from a dataset size (`tokens`)."""
    if not config.max_steps and num_rows is None:
        if tokens is None:
            raise UserError("the recipe trains for epochs: give the data (--data DIR, built) or its size (--tokens N)")
        num_rows = tokens // config.seq_len  # pretraining windows; packed SFT rows are about as full
    if not config.max_steps and num_rows < config.global_batch_size:  # the trainer refuses such a run at start
        raise UserError(f"{num_rows:,} training rows are fewer than one global batch ({config.global_batch_size}): "
                        "the run would not start")
    steps = total_steps(config, num_rows or 0)
    return RunBudget(steps=steps, tokens_per_step=config.global_batch_size * config.seq_len,
                     flops_per_token=flops_per_token)


def format_duration(seconds: float) -> str:
    """'3 h 25 min', '12 min', '40 s'."""
    if seconds >= 3600:
        hours, rest = divmod(round(seconds / 60), 60)
        return f"{hours} h {rest:02d} min"
    if seconds >= 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds:.0f} s"
