"""Per-step training time and the all-to-all share of it, expert parallel (EP = 2, ...) vs data parallel (EP = 1).

    python scripts/bench_expert_parallel.py                               # 2 CPU processes, tiny mini_deepseekv3
    python scripts/bench_expert_parallel.py --device cuda --nproc 8 --ep 1 2 4 8 --preset base --seq-len 512

Each EP size is one `accelerate launch` of this script (`--worker`) with `accelerate_configs/deepspeed_zero2_ep.yaml`,
running the real training step (`minillm.training.trainer`: DeepSpeed ZeRO-2, AdamW, the MoE bias update) on random
tokens. The all-to-all time is measured around every expert-parallel exchange (the per-expert counts and the
token rows, forward and backward), with a device sync on CUDA so asynchronous kernels are not missed; it includes
time spent waiting for slower ranks, which is part of what expert parallelism costs. Step time and
all-to-all time are the slowest rank's, averaged over the measured steps (after `--warmup` steps).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minillm.devices import resolve_device  # noqa: E402
from minillm.paths import check_output_file, write_output_file  # noqa: E402
from minillm.training import perf  # noqa: E402
from minillm.training.config import parse_model_args  # noqa: E402

LAUNCHER = ROOT / "accelerate_configs" / "deepspeed_zero2_ep.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--nproc", type=perf.positive_int, default=2, help="processes (one per GPU with --device cuda)")
    p.add_argument("--ep", type=perf.positive_int, nargs="+", default=[1, 2],
                   help="expert-parallel sizes to compare")
    p.add_argument("--model", default="mini_deepseekv3", choices=("mini_deepseekv3", "mini_qwen3_next"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model-arg", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--seq-len", type=perf.positive_int, default=128)
    p.add_argument("--micro-batch-size", type=perf.positive_int, default=4, help="rows per process per step")
    p.add_argument("--steps", type=perf.positive_int, default=10, help="measured steps")
    p.add_argument("--warmup", type=perf.non_negative_int, default=3, help="unmeasured steps first")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ep-size", type=perf.positive_int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_config(args: argparse.Namespace, world: int, ep: int):
    """The training config of one EP size's launch over `world` processes."""
    from minillm.training.config import TrainConfig

    return TrainConfig(stage="pretrain", model=args.model, preset=args.preset, model_args=parse_model_args(args.model_arg),
                       seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                       global_batch_size=args.micro_batch_size * world, max_steps=args.warmup + args.steps,
                       expert_parallel_size=ep, precision="auto" if args.device == "cuda" else "fp32").resolve()


def worker(args: argparse.Namespace) -> None:
    """One process of one EP size: time `--warmup + --steps` training steps, rank 0 writes the JSON result."""
    import torch

    from minillm.models.registry import build_model
    from minillm.parallel.expert_parallel import ALL_TO_ALL_TIMER
    from minillm.training.trainer import (
        forward_backward,
        make_accelerator,
        optimizer_step,
        prepare_model_and_optimizer,
    )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = args.warmup + args.steps
    config = bench_config(args, world, args.ep_size)
    accelerator = make_accelerator(config)
    torch.manual_seed(0)
    model = build_model(args.model, args.preset, **parse_model_args(args.model_arg))
    vocab = model.config.vocab_size
    model, optimizer, scheduler = prepare_model_and_optimizer(accelerator, model, config, total)
    model.train()
    g = torch.Generator().manual_seed(1000 + accelerator.process_index)

    def batch() -> dict:
        ids = torch.randint(0, vocab, (args.micro_batch_size, args.seq_len), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}

    def sync() -> None:
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    step_times, a2a_times = [], []
    for step in range(total):
        ALL_TO_ALL_TIMER.enabled = step >= args.warmup
        ALL_TO_ALL_TIMER.reset()
        sync()
        start = time.perf_counter()
        result = forward_backward(accelerator, model, [batch()])
        optimizer_step(accelerator, model, optimizer, scheduler, config, result)
        sync()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
            a2a_times.append(ALL_TO_ALL_TIMER.seconds)
    local = torch.tensor([sum(step_times) / len(step_times), sum(a2a_times) / len(a2a_times)],
                         dtype=torch.float64, device=accelerator.device)  # fmt: skip
    slowest = _max_over_ranks(local) if world > 1 else local
    if accelerator.is_main_process:
        step_s, a2a_s = slowest.tolist()
        tokens = args.micro_batch_size * args.seq_len * world
        n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
        args.out.write_text(json.dumps({
            "ep": args.ep_size, "processes": world, "device": accelerator.device.type, "step_ms": step_s * 1e3,
            "all_to_all_ms": a2a_s * 1e3, "all_to_all_share": a2a_s / step_s, "tokens_per_s": tokens / step_s,
            "params_per_rank": n_params, "loss": result.read()["loss"],
        }))  # fmt: skip
    accelerator.wait_for_everyone()


def _max_over_ranks(t):
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def run_one(args: argparse.Namespace, ep: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCHER),
           "--num_processes", str(args.nproc), "--main_process_port", str(_free_port()), str(Path(__file__).resolve()),
           "--worker", "--ep-size", str(ep), "--out", str(out), "--device", args.device, "--model", args.model,
           "--preset", args.preset, "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    for pair in args.model_arg:
        cmd += ["--model-arg", pair]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-6000:])
        raise SystemExit(f"EP={ep} failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    # Checked here, before the launches: each of them starts `--nproc` processes and trains
    from minillm.models.registry import build_config
    from minillm.training.trainer import check_expert_parallel

    build_config(args.model, args.preset, **parse_model_args(args.model_arg))  # the preset and the overrides
    for ep in args.ep:  # each size divides the experts and the processes (ZeRO-2, as LAUNCHER)
        check_expert_parallel(bench_config(args, args.nproc, ep), launch=(args.nproc, True, 2))
    if args.device == "cuda":
        resolve_device("cuda")
    check_output_file(args.json, "--json")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ep in args.ep:
            print(f"EP={ep}: launching {args.nproc} {args.device} processes ...", flush=True)
            results.append(run_one(args, ep, Path(tmp) / f"ep{ep}.json"))
    print(f"\n{args.model} ({args.preset}), {args.nproc} x {args.device}, {args.micro_batch_size} x {args.seq_len} "
          f"tokens per process, mean of {args.steps} steps after {args.warmup} warm-up")  # fmt: skip
    print(f"{'EP':>3} {'params/rank':>12} {'step ms':>9} {'all-to-all ms':>14} {'share':>6} {'tokens/s':>10}")
    for r in results:
        print(f"{r['ep']:>3} {r['params_per_rank']:>12,} {r['step_ms']:>9.1f} {r['all_to_all_ms']:>14.1f} "
              f"{r['all_to_all_share']:>6.1%} {r['tokens_per_s']:>10,.0f}")  # fmt: skip
    if args.json:
        write_output_file(args.json, json.dumps(results, indent=2) + "\n", "--json")


if __name__ == "__main__":
    perf.run_main(main)
