"""A non-finite loss skips its step for real, the same way in one process, with DDP and with DeepSpeed ZeRO-2.

Each run injects non-finite (+inf) losses at chosen steps through the trainer's test-only `MINILLM_TEST_NONFINITE_STEPS`
(`minillm.training.trainer.injected_nonfinite_steps`) and saves a checkpoint after every step, so the full training
state before and after a skipped step can be compared: weights, MoE routing biases, optimizer moments and step
counts, and the scheduler must be bit-identical. The schedule of every run:

    step 1, 2 trained | step 3 non-finite (one rank only when launched) | step 4 trained | step 5, 6 non-finite
    -> with --max-bad-steps 2 the run stops at step 6 with one "error: stopping at step 6 ..." line.

The losses of the trained steps agree across backends (same global batch, 1e-4 relative).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import run_cli
from train_helpers import ROOT, accelerate_launch, build_shards, launch_command, logged_losses

from minillm.training.trainer import NONFINITE_ENV

STOP = "stopping at step 6: 2 steps in a row had a non-finite loss"
ARGS = ["pretrain", "--model", "mini_deepseekv3", "--seq-len", "32", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--max-steps", "8", "--precision", "fp32", "--log-every", "1",
        "--save-every", "1", "--keep-last", "8", "--max-bad-steps", "2", "--model-arg", "num_hidden_layers=2"]


def _tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Every tensor and number inside `obj` (nested dicts / lists), by path."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            _tensors(value, f"{prefix}/{key}", out)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _tensors(value, f"{prefix}/{i}", out)
    elif torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, (int, float)):
        out[prefix] = torch.tensor(obj)


def training_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Weights (with MoE biases), optimizer state and scheduler state of a checkpoint, plain/DDP or DeepSpeed."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    if (checkpoint / "model.safetensors").is_file():  # Accelerate's own format
        _tensors(load_file(checkpoint / "model.safetensors"), "model", out)
        _tensors(torch.load(checkpoint / "optimizer.bin", weights_only=False), "optimizer", out)
    else:  # DeepSpeed: the module, then each rank's ZeRO partition of the fp32 weights and Adam moments
        engine = torch.load(checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)
        _tensors(engine["module"], "model", out)
        for part in sorted((checkpoint / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt")):
            zero = torch.load(part, weights_only=False)["optimizer_state_dict"]
            _tensors(zero["base_optimizer_state"], f"{part.name}/optimizer", out)
            _tensors(zero["single_partition_of_fp32_groups"], f"{part.name}/fp32", out)
    _tensors(torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False), "scheduler", out)
    assert any("e_score_correction_bias" in k for k in out) and any("exp_avg_sq" in k for k in out)
    return out


def check_run(run_dir: Path, expected_skips: list[int]) -> dict[int, float]:
    """The run skipped steps 3, 5 and 6 without touching the training state and stopped at 6; returns its losses."""
    state = {s: training_state(run_dir / "checkpoints" / f"step_{s:08d}") for s in range(1, 6)}
    for before, after in ((2, 3), (4, 5)):  # across a skipped step: bit-identical
        assert state[before].keys() == state[after].keys()
        changed = [k for k in state[before] if not torch.equal(state[before][k], state[after][k])]
        assert not changed, f"skipped step {after} changed {changed[:5]}"
    trained = [k for k in state[1] if not torch.equal(state[1][k], state[2][k])]  # while a real step changes them
    assert any("e_score_correction_bias" in k for k in trained) and any("exp_avg" in k for k in trained)
    assert not (run_dir / "checkpoints" / "step_00000006").exists() and not (run_dir / "final").exists()

    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == expected_skips
    assert all("loss" not in rows[s] for s in (3, 5, 6))  # counted and logged, without a loss
    assert rows[4]["lr"] == rows[3]["lr"]  # the scheduler did not advance on the skipped step
    return logged_losses(run_dir)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def single_process_losses(shards, tmp_path_factory) -> dict[int, float]:
    """One process (accumulation 4), +inf losses injected at steps 3, 5, 6; `minillm pretrain` exits 2 with one line."""
    out = tmp_path_factory.mktemp("single") / "run"
    mp, err = pytest.MonkeyPatch(), io.StringIO()
    mp.setenv(NONFINITE_ENV, "3,5,6")
    try:
        with contextlib.redirect_stderr(err):
            code = run_cli(*ARGS, "--data", str(shards), "--output-dir", str(out))
    finally:
        mp.undo()
    assert code == 2 and err.getvalue().strip().splitlines()[-1].startswith(f"error: {STOP}"), err.getvalue()
    return check_run(out, [0, 0, 1, 1, 2, 3])


def test_single_process_skips_non_finite_steps_and_stops(single_process_losses):
    assert sorted(single_process_losses) == [1, 2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["cpu_multiprocess.yaml", "deepspeed_zero2.yaml"])
def test_two_processes_skip_a_step_that_one_rank_found_non_finite(config_file, shards, single_process_losses,
                                                                   tmp_path):
    """DDP and ZeRO-2 (2 processes x accumulation 2): +inf on rank 1 only at step 3, then everywhere at 5 and 6.
    DeepSpeed's engine must discard the step itself (its overflow check), not apply the accumulated gradients."""
    out = tmp_path / "run"
    args = [*ARGS, "--data", str(shards), "--output-dir", str(out)]
    if config_file == "cpu_multiprocess.yaml":  # through the `--launcher` shortcut: exit code 2, the error alone
        cmd, env = launch_command(config_file, "cli/main.py", args)
        result = subprocess.run([sys.executable, "-m", "cli.main", *args, "--launcher",
                                 str(ROOT / "accelerate_configs" / config_file)], cwd=ROOT,
                                env={**env, NONFINITE_ENV: "3@1,5,6"}, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-4000:]
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: {STOP}"), result.stderr[-4000:]
        # without torchrun's report of the failed rank that came before it (a traceback and a 20-line table)
        assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-4000:]
    else:
        result = accelerate_launch(config_file, "cli/main.py", args, env={NONFINITE_ENV: "3@1,5,6"})
        assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # every rank stops; the line is said once: by rank 0, or under `--launcher` by the parent
    assert len(errors) == 1, result.stderr[-4000:]
    assert all(STOP in line for line in errors), result.stderr[-4000:]
    assert "step 3: non-finite loss, step skipped (1 in a row, 1 in all)" in result.stdout
    losses = check_run(out, [0, 0, 1, 1, 2, 3])
    assert sorted(losses) == [1, 2, 4]
    for step, ref in single_process_losses.items():
        assert abs(losses[step] - ref) <= 1e-4 * abs(ref), (losses, single_process_losses)


@pytest.mark.parametrize("ds_file", ["zero2.json", "zero2_offload.json", "zero2_ep.json", "zero3.json"])
@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_shipped_deepspeed_configs_can_skip_a_step(ds_file, precision):
    from minillm.training.launch import check_skips_nonfinite

    check_skips_nonfinite(json.loads((ROOT / "ds_configs" / ds_file).read_text()), precision, ds_file)


@pytest.mark.parametrize(("ds", "precision", "message"), [
    ({"zero_optimization": {"stage": 0}}, "no", "without ZeRO in fp32"),
    ({}, "no", "without ZeRO in fp32"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto", "check_grad_overflow": False}}, "bf16",
     "check_grad_overflow=false"),
    ({"zero_optimization": {"stage": 1, "compute_grad_norm": False}}, "no", "compute_grad_norm=false"),
])
def test_deepspeed_setups_that_would_apply_non_finite_gradients_are_refused(ds, precision, message):
    from minillm.errors import UserError
    from minillm.training.launch import check_skips_nonfinite

    with pytest.raises(UserError, match=message):
        check_skips_nonfinite(ds, precision, "ds.json")
    check_skips_nonfinite({**ds, "zero_optimization": {"stage": 3}}, precision, "ds.json")  # ZeRO-3 always checks


def test_the_finite_check_is_read_after_the_last_backward_is_queued(monkeypatch):
    """Without DeepSpeed the host reads the step's finite flag only once the last backward is queued: on a GPU the
    device runs that backward while the host waits for the forward's flag. A non-finite step is still skipped, its
    gradients computed and then dropped."""
    from accelerate import Accelerator

    from minillm.models.registry import build_model
    from minillm.training import trainer

    accelerator = Accelerator(cpu=True)
    model = build_model("mini_llama3", "tiny", vocab_size=64, num_hidden_layers=1)
    events = []
    backward, is_bad = accelerator.backward, trainer.step_is_bad
    monkeypatch.setattr(accelerator, "backward", lambda loss, **kw: events.append("backward") or backward(loss, **kw))
    monkeypatch.setattr(trainer, "step_is_bad", lambda check: events.append("check") or is_bad(check))
    ids = torch.randint(0, 64, (2, 8))
    for poison in (False, True):
        events.clear()
        result = trainer.forward_backward(accelerator, model, [{"input_ids": ids, "labels": ids}] * 2,
                                          poison_last=poison)
        assert events == ["backward", "backward", "check"] and result.skipped is poison


def test_a_step_dropped_on_the_device_is_settled_a_step_later_with_the_same_run(shards, tmp_path, monkeypatch,
                                                                                 capsys):
    """With fused AdamW (the default) a non-finite step is dropped on the device (`found_inf`) and the host reads the
    step's finite flag one step later, once the next step's forward and backward are queued; at log, checkpoint and
    evaluation steps at once. The run is the same as one that waits for the flag in every step: bit-identical final
    weights, the same logged losses, learning rates and skip counts, the same messages."""
    from safetensors.torch import load_file

    from minillm.training import trainer

    args = [*ARGS, "--data", str(shards), "--log-every", "4", "--save-every", "0", "--eval-every", "0"]
    monkeypatch.setenv(NONFINITE_ENV, "3,6")
    events: list[str] = []
    forward_backward, is_bad = trainer.forward_backward, trainer.step_is_bad
    monkeypatch.setattr(trainer, "forward_backward", lambda *a, **kw: events.append("step") or forward_backward(*a, **kw))
    monkeypatch.setattr(trainer, "step_is_bad", lambda check: events.append("check") or is_bad(check))
    runs = {}
    for mode in ("device", "host"):
        if mode == "host":
            monkeypatch.setattr(trainer, "skips_on_device", lambda accelerator, optimizer: False)
        events.clear()
        capsys.readouterr()
        assert run_cli(*args, "--output-dir", str(tmp_path / mode)) == 0
        said = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
        rows = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        timing = {"tokens_per_s", "elapsed_s", "mfu", "mem_gib"}
        runs[mode] = (load_file(tmp_path / mode / "final" / "model.safetensors"), said,
                      [{k: v for k, v in r.items() if k not in timing} for r in rows], list(events))
    (weights, said, rows, events), (host_weights, host_said, host_rows, host_events) = runs["device"], runs["host"]
    assert events[:5] == ["step", "step", "check", "step", "check"]  # step 1's flag read after step 2 was queued
    assert host_events[:4] == ["step", "check", "step", "check"]  # each step's flag inside the step
    assert said == host_said == ["step 3: non-finite loss, step skipped (1 in a row, 1 in all)",
                                 "step 6: non-finite loss, step skipped (1 in a row, 2 in all)"]
    assert rows == host_rows and [r["step"] for r in rows if "loss" in r] == [4, 8]
    assert [r["skipped_steps"] for r in rows] == [1, 1, 2, 2]  # steps 3, 4, 6, 8
    assert weights.keys() == host_weights.keys()
    assert all(torch.equal(weights[k], host_weights[k]) for k in weights)


@pytest.mark.slow
def test_two_processes_settle_a_step_dropped_on_the_device_alike(shards, tmp_path):
    """DDP (2 processes x accumulation 2) with the skip decided on the device and settled a step later (no log or
    checkpoint at the bad step): +inf on rank 1 only at step 3. Both ranks drop it and count it, and the run's
    logged losses are those of one process running the same steps (which test above matches bit for bit with the
    steps decided on the host)."""
    args = [*ARGS, "--data", str(shards), "--log-every", "4", "--save-every", "0", "--eval-every", "0"]
    env = {NONFINITE_ENV: "3@1"}
    result = accelerate_launch("cpu_multiprocess.yaml", "cli/main.py", [*args, "--output-dir", str(tmp_path / "ddp")],
                               env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("step 3: non-finite loss, step skipped (1 in a row, 1 in all)") == 1, result.stdout
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in rows if "skipped_steps" in r] == [(3, 1), (4, 1), (8, 1)]
    mp = pytest.MonkeyPatch()
    mp.setenv(NONFINITE_ENV, "3")  # one process: the whole batch, so the step is bad everywhere
    try:
        assert run_cli(*args, "--output-dir", str(tmp_path / "one")) == 0
    finally:
        mp.undo()
    losses, single = logged_losses(tmp_path / "ddp"), logged_losses(tmp_path / "one")
    assert sorted(losses) == sorted(single) == [4, 8]
    for step, ref in single.items():
        assert abs(losses[step] - ref) <= 1e-4 * abs(ref), (losses, single)

