"""Train-step speed of our models against their transformers references, with identical weights.

For each model: ours is built from `--preset` (default `cpu256`: hidden 256, 4 layers, 8k vocabulary; see
`minillm.training.perf.CPU_BENCH_OVERRIDES`) and the reference is `to_reference(ours)` (LlamaForCausalLM,
DeepseekV3ForCausalLM, Qwen3NextForCausalLM holding the same tensors). Both train with the same bare loop
(`perf.bare_train_step`: forward with `labels = input_ids`, backward, AdamW) on the same random batch, in fp32 or
under bf16 autocast. The two run interleaved in one process: `--rounds` rounds of `--steps` steps each, ours
first in even rounds and the reference first in odd ones, so load from other processes hits both alike. Reported
per model: median tokens/s over rounds and the median of the per-round ratios ours / reference.

Our models run their fp32 CPU matmuls through oneDNN on non-Intel x86 CPUs (`minillm/models/layers/linear.py`); the
reference runs torch's default (MKL). `--cpu-matmul both` runs ours on oneDNN and adds a third runner, ours with
torch's kernels, to show how much of the ratio is the kernel and how much the model code.

    python scripts/bench_models.py                          # the three models, fp32, batch 4 x 256
    python scripts/bench_models.py --dtype bf16             # bf16 autocast (CPUs with bf16 matmuls, GPUs)
    python scripts/bench_models.py --cpu-matmul both        # also ours with torch's fp32 kernels
    python scripts/bench_models.py --models mini_llama3 --rounds 5 --json bench_models.json
    python scripts/bench_models.py --threads 1 --clock process  # on a busy shared CPU: CPU seconds, not wall time
    python scripts/bench_models.py --preset base --device cuda --dtype bf16 --seq 512 --batch 16
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minillm.devices import flush_denormals, resolve_device  # noqa: E402
from minillm.models.layers.linear import force_cpu_matmul  # noqa: E402
from minillm.models.registry import MODEL_NAMES, build_model, model_package  # noqa: E402
from minillm.paths import check_output_file, write_output_file  # noqa: E402
from minillm.training import perf  # noqa: E402
from minillm.training.host_memory import keep_freed_memory  # noqa: E402

CLOCK = time.perf_counter  # `--clock process` swaps in time.process_time


def build_pair(name: str, preset: str, device: torch.device, seed: int = 0):
    """(ours, reference) in train mode on `device`, with identical fp32 weights."""
    base_preset, overrides = perf.preset_and_overrides(name, preset)
    torch.manual_seed(seed)
    ours = build_model(name, base_preset, **overrides).to(device).train()
    reference = model_package(name).to_reference(ours).to(device).train()
    return ours, reference


def timed_steps(
    model, optimizer, input_ids: torch.Tensor, steps: int, dtype: str, cpu_matmul: str | None = None
) -> float:
    """Seconds of `steps` bare training steps (fp32 CPU matmuls through `cpu_matmul`; None: the default)."""
    perf.synchronize(input_ids.device)
    with force_cpu_matmul(cpu_matmul):
        start = CLOCK()
        for _ in range(steps):
            perf.bare_train_step(model, optimizer, input_ids, dtype)
        perf.synchronize(input_ids.device)
        return CLOCK() - start


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    ours, reference = build_pair(name, args.preset, device)
    generator = torch.Generator().manual_seed(1)
    vocab = ours.config.vocab_size
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
    # key -> (model, optimizer, fp32 CPU matmul backend); every model starts from the same weights
    backend = {"auto": None, "both": "onednn"}.get(args.cpu_matmul, args.cpu_matmul)
    runners = {"ours": (ours, perf.bare_optimizer(ours), backend)}
    if args.cpu_matmul == "both":
        torch_kernels = copy.deepcopy(ours)
        runners["ours_torch_kernels"] = (torch_kernels, perf.bare_optimizer(torch_kernels), "torch")
    runners["reference"] = (reference, perf.bare_optimizer(reference), None)
    first_loss = {}
    for key, (model, optimizer, backend) in runners.items():
        # the first step from identical weights: the losses should agree (ours adds its small aux terms)
        with force_cpu_matmul(backend):
            first_loss[key] = float(perf.bare_train_step(model, optimizer, input_ids, args.dtype))
        timed_steps(model, optimizer, input_ids, args.warmup, args.dtype, backend)
    tokens = args.batch * args.seq * args.steps
    rates: dict[str, list[float]] = {key: [] for key in runners}
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for key in order:
            model, optimizer, backend = runners[key]
            seconds = timed_steps(model, optimizer, input_ids, args.steps, args.dtype, backend)
            rates[key].append(tokens / seconds)
    ratios = [o / ref for o, ref in zip(rates["ours"], rates["reference"], strict=True)]
    result = {
        "model": name,
        "reference": type(reference).__name__,
        "ours_tokens_per_s": statistics.median(rates["ours"]),
        "reference_tokens_per_s": statistics.median(rates["reference"]),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "first_loss": first_loss,
    }
    if "ours_torch_kernels" in rates:
        result["ours_torch_kernels_tokens_per_s"] = statistics.median(rates["ours_torch_kernels"])
        result["ratio_torch_kernels"] = statistics.median(
            [o / ref for o, ref in zip(rates["ours_torch_kernels"], rates["reference"], strict=True)])
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--preset", default=perf.CPU_BENCH_PRESET, help="cpu256 (default), tiny, small or base")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=perf.positive_int, default=4)
    parser.add_argument("--seq", type=perf.positive_int, default=256)
    parser.add_argument("--steps", type=perf.positive_int, default=1, help="steps per timed round")
    parser.add_argument("--rounds", type=perf.positive_int, default=20,
                        help="interleaved rounds per model (median of the ratios)")
    parser.add_argument("--warmup", type=perf.non_negative_int, default=2,
                        help="untimed steps per model before the rounds")
    parser.add_argument("--threads", type=perf.positive_int, default=None,
                        help="torch threads on the CPU (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=("wall", "process"),
                        help="process: CPU seconds of this process (steadier on a shared CPU with --threads 1)")
    parser.add_argument("--cpu-matmul", default="auto", choices=("auto", "onednn", "torch", "both"),
                        help="fp32 CPU matmuls of our models: auto (the trainer's choice: oneDNN on non-Intel x86 "
                             "CPUs, else torch's), oneDNN, torch's (MKL), or both side by side (ours on oneDNN and a "
                             "third runner, ours on torch's kernels)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    check_output_file(args.json, "--json")  # before the run, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does on a CPU (host_memory.py), for both sides
        flush_denormals()  # as the trainer does (devices.py), before any tensor work: both sides get it

    results = []
    print(f"device {device} ({torch.get_num_threads()} threads, {args.clock} clock), {args.dtype}, preset {args.preset}, "
          f"batch {args.batch} x {args.seq}, {args.rounds} rounds x {args.steps} steps")
    both = args.cpu_matmul == "both"
    extra = f" {'torch kernels':>14}" if both else ""
    print(f"{'model':<17} {'reference':<22} {'ours tok/s':>11} {'ref tok/s':>11} {'ratio':>7}{extra}  per round")
    for name in args.models:
        res = bench_model(name, args, device)
        results.append(res)
        rounds = " ".join(f"{r:.2f}" for r in res["ratios"])
        extra = f" {res['ratio_torch_kernels']:>13.2f}x" if both else ""
        print(f"{name:<17} {res['reference']:<22} {res['ours_tokens_per_s']:>11,.0f} "
              f"{res['reference_tokens_per_s']:>11,.0f} {res['ratio']:>6.2f}x{extra}  {rounds}", flush=True)
    if args.json:
        # the options first, then what they resolved to: `--threads` is None unless given, the real count is torch's
        meta = {**{k: v for k, v in vars(args).items() if k != "json"}, "device": str(device),
                "threads": torch.get_num_threads()}
        write_output_file(args.json, json.dumps({"config": meta, "results": results}, indent=2), "--json")
    return results


if __name__ == "__main__":
    perf.run_main(main)
