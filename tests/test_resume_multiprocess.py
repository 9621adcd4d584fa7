"""Resume of a 2-process run after SIGKILL, launched through the shipped config exactly as a user would:

    accelerate launch --config_file accelerate_configs/cpu_multiprocess.yaml cli/main.py pretrain ... --save-every 2
    (SIGKILL of the launcher and both ranks after step 3, between the checkpoints of steps 2 and 4)
    accelerate launch ... cli/main.py pretrain ... --resume latest

The per-step losses after the resume must equal those of an uninterrupted 2-process run (fp32, <= 1e-6 relative):
each rank's data position, RNG states, optimizer/scheduler state and the MoE routing biases (mini_deepseekv3's
aux-loss-free bias, updated after every step) all come back from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import (
    accelerate_launch,
    build_shards,
    kill_after_step,
    launch_command,
    logged_losses,
    start,
)

pytestmark = pytest.mark.slow

STEPS = 6
ARGS = ["pretrain", "--model", "mini_deepseekv3", "--seq-len", "32", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--max-steps", str(STEPS), "--precision", "fp32", "--log-every", "1",
        "--save-every", "2", "--keep-last", "2", "--model-arg", "num_hidden_layers=2"]


def test_two_process_resume_after_sigkill_repeats_the_losses(tmp_path: Path):
    shards = build_shards(tmp_path)
    args = ARGS + ["--data", str(shards)]
    reference, resumed, log = tmp_path / "reference", tmp_path / "resumed", tmp_path / "stderr.log"

    # 2 processes x micro-batch 2 x accumulation 2, uninterrupted
    done = accelerate_launch("cpu_multiprocess.yaml", "cli/main.py", args + ["--output-dir", str(reference)])
    assert done.returncode == 0, done.stderr[-4000:]

    cmd, env = launch_command("cpu_multiprocess.yaml", "cli/main.py", args + ["--output-dir", str(resumed)])
    kill_after_step(start(cmd, log, env), resumed, 3, log)
    checkpoints = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert checkpoints[-1] in ("step_00000002", "step_00000004"), checkpoints  # maybe killed mid-save of 4
    assert not (resumed / "final").exists()

    again = accelerate_launch("cpu_multiprocess.yaml", "cli/main.py",
                              args + ["--output-dir", str(resumed), "--resume", "latest"])
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming" in again.stdout

    ref, res = logged_losses(reference), logged_losses(resumed)
    assert sorted(ref) == sorted(res) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(res[step] - ref[step]) <= 1e-6 * abs(ref[step]), (step, res, ref)
    assert ref[STEPS] < ref[1]  # it trains
    assert (resumed / "final" / "model.safetensors").is_file()
