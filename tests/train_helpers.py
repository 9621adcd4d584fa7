"""Helpers for the trainer tests (tests/test_train_*.py, tests/test_launch_*.py).

- `UnevenRows`: a synthetic SFT-like dataset whose rows have different numbers of target tokens (labels -100 on a
  random prefix), so normalising the loss per micro-batch instead of per global batch gives different gradients.
- `tiny_llama`: a small mini_llama3 (2 layers, small vocab) built from a fixed seed.
- `trainer_step`: a tiny model prepared as the trainer prepares it, and one step of the real loop on given batches.
- `step_gradients`: one step of the real trainer code (make_accelerator -> prepare_model_and_optimizer ->
  GlobalBatches -> forward_backward), returning the synchronised gradients; run in-process or, through
  `grad_probe.py`, under `accelerate launch`.
- `write_text_corpus` / `build_shards`: a small pretraining corpus written by the test (never third-party text).
- `launch_command` / `accelerate_launch`: `accelerate launch --config_file accelerate_configs/X.yaml ...` as a user
  runs it; `start` / `kill_after_step`: start a run in the background and SIGKILL it with all its processes (the
  launcher and every rank) as soon as metrics.jsonl shows a given step.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 256


class UnevenRows:
    """`n` rows of `seq_len` tokens; row i trains on its last `seq_len // 4 + (i * 7) % (seq_len // 2)` labels."""

    def __init__(self, n: int = 64, seq_len: int = 24, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, seq_len), generator=gen)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        labels = ids.clone()
        keep = self.seq_len // 4 + (i * 7) % (self.seq_len // 2)
        labels[: self.seq_len - keep] = -100
        return {"input_ids": ids, "labels": labels}


def tiny_llama(seed: int = 0):
    from minillm.models.registry import build_model

    torch.manual_seed(seed)
    return build_model("mini_llama3", "tiny", vocab_size=VOCAB, num_hidden_layers=2)


def trainer_step(name: str, precision: str, seq_len: int, accumulation: int = 1, vocab_size: int = VOCAB,
                 **model_args):
    """A fresh tiny `name` prepared as the trainer prepares it (micro-batches of 2 rows), and `step(micro_batches,
    skip_on_device=False)`: one step of the real loop (`forward_backward`, then `optimizer_step`), returning its
    `StepResult` (with `skip_on_device`, unsettled: `result.check` holds the finite flag, see `trainer.settle`)."""
    from minillm.models.registry import build_model
    from minillm.training.config import TrainConfig
    from minillm.training.trainer import (
        forward_backward,
        make_accelerator,
        optimizer_step,
        prepare_model_and_optimizer,
    )

    config = TrainConfig(stage="pretrain", model=name, seq_len=seq_len, micro_batch_size=2,
                         global_batch_size=2 * accumulation, precision=precision).resolve()
    accelerator = make_accelerator(config)
    torch.manual_seed(0)
    model, optimizer, scheduler = prepare_model_and_optimizer(
        accelerator, build_model(name, "tiny", vocab_size=vocab_size, **model_args), config, total_steps=10)

    def step(micro_batches: list[dict[str, torch.Tensor]], skip_on_device: bool = False):
        result = forward_backward(accelerator, model, micro_batches, skip_on_device=skip_on_device)
        optimizer_step(accelerator, model, optimizer, scheduler, config, result)
        return result

    return model, step


def step_gradients(global_batch: int, micro_batch: int) -> dict[str, torch.Tensor] | None:
    """Gradients of the first step of the trainer on `UnevenRows` (all ranks run it; rank 0 gets the dict)."""
    from minillm.training.batches import GlobalBatches, Permutation
    from minillm.training.config import TrainConfig
    from minillm.training.setup import stack_collate
    from minillm.training.trainer import forward_backward, make_accelerator, prepare_model_and_optimizer

    config = TrainConfig(stage="pretrain", model="mini_llama3", seq_len=24, micro_batch_size=micro_batch,
                         global_batch_size=global_batch, precision="fp32", max_grad_norm=0.0).resolve()
    accelerator = make_accelerator(config)
    model, _, _ = prepare_model_and_optimizer(accelerator, tiny_llama(), config, total_steps=10)
    data = UnevenRows()
    batches = GlobalBatches(data, Permutation(len(data), seed=3), stack_collate, global_batch, micro_batch,
                            accelerator.process_index, accelerator.num_processes)
    result = forward_backward(accelerator, model, batches.next_step())
    assert not result.skipped
    grads = {n: p.grad.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()
             if p.grad is not None}
    return grads if accelerator.is_main_process else None


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over parameters of |a - b| / |b| (norms)."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(config_file: str, script: str, args: list[str],
                   num_processes: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `accelerate launch --config_file accelerate_configs/<config_file>
    <script> <args>`, as a user runs it (one thread per rank, DeepSpeed on its CPU accelerator)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / config_file), "--main_process_port", str(free_port())]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return cmd + [script, *args], env


def accelerate_launch(config_file: str, script: str, args: list[str], timeout: int = 300,
                      num_processes: int | None = None, env: dict[str, str] | None = None,
                      ) -> subprocess.CompletedProcess:
    """Run `accelerate launch` to completion; `env` adds variables to the launch environment."""
    cmd, launch_env = launch_command(config_file, script, args, num_processes)
    return subprocess.run(cmd, cwd=ROOT, env={**launch_env, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` in the background, stderr to the file `log` (a pipe nobody reads could fill up and stall it)."""
    with log.open("w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=err)


def logged_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} of a run's metrics.jsonl; tolerates a missing file or a last line cut short by a kill."""
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process below it, as a crash of the machine would. torchrun starts each rank in
    a session of its own, so killing the launcher's process group would leave the ranks training on as orphans."""
    import psutil  # a dependency of accelerate

    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for process in tree:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def kill_after_step(proc: subprocess.Popen, run_dir: Path, step: int, log: Path, timeout: float = 240) -> None:
    """SIGKILL `proc` and all its processes (launcher and every rank) as soon as metrics.jsonl shows `step`; the
    run must still be going then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if step in logged_losses(run_dir):
            kill_tree(proc)
            return
        assert proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.02)
    kill_tree(proc)
    raise AssertionError(f"step {step} never logged:\n{log.read_text()[-4000:]}")


def write_text_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    """A jsonl corpus of simple generated English sentences (our own text)."""
    import json
    import random

    rng = random.Random(seed)
    subjects = ["the cat", "a small robot", "my teacher", "the river", "an old map", "the students", "a red bird"]
    verbs = ["finds", "follows", "draws", "remembers", "carries", "builds", "counts"]
    objects = ["seven stones", "the blue door", "a quiet song", "three apples", "the long road", "a paper boat"]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n_docs):
            text = " ".join(
                f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}."
                for _ in range(rng.randint(3, 8))
            )
            f.write(json.dumps({"text": text}) + "\n")
    return path


def build_shards(tmp: Path, val_fraction: float = 0.05) -> Path:
    from minillm.data.pretrain import build_pretrain_shards

    corpus = write_text_corpus(tmp / "corpus.jsonl")
    out = tmp / "shards"
    build_pretrain_shards([str(corpus)], out, val_fraction=val_fraction, progress=False)
    return out
