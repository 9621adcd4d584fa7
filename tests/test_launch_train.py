"""Multi-process training on this CPU, launched through the shipped accelerate configs exactly as a user would:

    accelerate launch --config_file accelerate_configs/cpu_multiprocess.yaml cli/main.py pretrain ...
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml cli/main.py pretrain ...
    minillm pretrain --launcher accelerate_configs/deepspeed_zero3.yaml ...

Each launch costs tens of seconds, so every launch checks as much as it can.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_helpers import ROOT, accelerate_launch, build_shards, relative_error, step_gradients

pytestmark = pytest.mark.slow


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def single_process_run(shards, tmp_path_factory) -> tuple[list[str], Path]:
    """The reference: one process, global batch 8 = micro 2 x accumulation 4."""
    from cli.main import main

    args = ["pretrain", "--model", "mini_deepseekv3", "--data", str(shards), "--seq-len", "32",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--max-steps", "3", "--precision", "fp32",
            "--log-every", "1", "--model-arg", "num_hidden_layers=2"]
    out = tmp_path_factory.mktemp("single") / "run"
    try:
        main(args + ["--output-dir", str(out)])
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    return args, out


def test_two_processes_with_accumulation_give_the_gradient_of_one_big_batch(tmp_path):
    """2 processes x accumulation 2 (DDP over gloo) == 1 process x 1 batch of 16, rows with uneven targets."""
    out = tmp_path / "grads.pt"
    result = accelerate_launch("cpu_multiprocess.yaml", "tests/grad_probe.py", [str(out), "16", "4"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert relative_error(torch.load(out), step_gradients(global_batch=16, micro_batch=16)) <= 1e-5


@pytest.mark.parametrize("config_file", ["cpu_multiprocess.yaml", "deepspeed_zero2.yaml"])
def test_ddp_and_zero2_match_the_single_process_losses(config_file, single_process_run, tmp_path):
    """Same global batch (2 processes x micro 2 x accumulation 2): the per-step losses agree within 1e-4 relative;
    MoE bias updates from all-reduced expert counts keep the ranks in step."""
    args, reference = single_process_run
    out = tmp_path / "run"
    result = accelerate_launch(config_file, "cli/main.py", args + ["--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-4000:]
    ours, ref = losses(out), losses(reference)
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref, strict=True):
        assert abs(a - b) <= 1e-4 * abs(b), (ours, ref)
    # the norm clipping scales by: DeepSpeed's (ZeRO-2) sums partitions; the trainer's must be as accurate (it read
    # 5e-5 low with torch's CPU norm of the large embedding gradient, and ZeRO-2 drifted once clipping acted)
    ours, ref = losses(out, "grad_norm"), losses(reference, "grad_norm")
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref, strict=True):
        assert abs(a - b) <= 2e-6 * b, (ours, ref)
    # the same tensors as one process writes: the tied head once (DeepSpeed's gathered copy stored it twice)
    with safe_open(out / "final" / "model.safetensors", "pt") as f, safe_open(
        reference / "final" / "model.safetensors", "pt"
    ) as g:
        assert set(f.keys()) == set(g.keys()) and "lm_head.weight" not in f.keys()


def test_zero3_through_the_launcher_shortcut_exports_a_loadable_model(shards, tmp_path):
    """`minillm pretrain --launcher accelerate_configs/deepspeed_zero3.yaml` re-runs under accelerate launch; the
    final model is gathered from the ZeRO-3 partitions (and loads with every weight present), and a checkpoint's
    model is reassembled from them: the weights of step 1 that one process reaches as well."""
    from transformers import AutoModelForCausalLM

    import minillm  # noqa: F401
    from cli.main import main
    from minillm.models.export import load_causal_lm

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    args = ["pretrain", "--model", "mini_llama3", "--data", str(shards), "--seq-len", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--max-steps", "2", "--precision", "fp32", "--save-every", "1",
            "--model-arg", "num_hidden_layers=2"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "cli" / "main.py"), *args, "--launcher", "accelerate_configs/deepspeed_zero3.yaml",
           "--output-dir", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "checkpoints" / "step_00000001" / "trainer_state.json").is_file()
    model, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    norms = [p.norm().item() for p in model.parameters()]
    assert all(n > 0 for n in norms)  # gathered weights, not empty ZeRO-3 placeholders
    batch = torch.randint(1, 1000, (1, 16))
    assert torch.isfinite(model(input_ids=batch, labels=batch).loss)

    one = tmp_path / "one_process"
    try:
        main(args + ["--output-dir", str(one)])
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    step_1 = load_causal_lm(out / "checkpoints" / "step_00000001", torch.float32).state_dict()
    one_step_1 = load_causal_lm(one / "checkpoints" / "step_00000001", torch.float32).state_dict()
    # two processes sum the gradients in another order; Adam's first step (about lr x sign) amplifies it to ~1e-6
    assert relative_error(step_1, one_step_1) <= 1e-4
    assert relative_error(step_1, model.state_dict()) >= 1e-3  # not the final weights: step 2 moved on


def test_ctrl_c_of_a_launcher_run_is_one_line_and_exit_130(shards, tmp_path):
    """Ctrl-C reaches the whole process group: `minillm --launcher`, accelerate's launcher (torchrun's agent) and the
    ranks. The agent's report of it (a 30-line traceback of its SignalException) came out with exit code 1."""
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "cli" / "main.py"), "pretrain", "--model", "mini_llama3", "--data", str(shards),
           "--seq-len", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--max-steps", "100000",
           "--save-every", "1", "--model-arg", "num_hidden_layers=1", "--launcher", "cpu_multiprocess.yaml",
           "--output-dir", str(out)]  # fmt: skip
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "step_00000002").is_dir() and child.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
            time.sleep(0.5)
        os.killpg(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("stopped by SIGINT: the run goes on from its newest checkpoint")
    assert (out / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()
