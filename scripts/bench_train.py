"""Training throughput of the real trainer: tokens/s, peak memory, MFU and where the step time goes.

Runs `minillm.training.trainer.train` itself (the loop every `minillm pretrain` runs: accelerator, chunked loss,
gradient clipping, scheduler, MoE bias update, metrics logging) for `--warmup + --steps` steps per round, on random
tokens (or `--data` shards), and reports:
- tokens/s of the median timed step (the warm-up steps of each round are not timed; the median, not the mean,
  so a burst of load from other processes on a shared machine does not decide the result);
- peak memory of each dtype's rounds (CUDA: max allocated; CPU: the process's peak resident set, which on Linux
  is reset before each round; both include the reference model when it runs alongside);
- MFU = training FLOPs per token (`minillm.models.stats`, what `minillm info` prints) x tokens/s / peak, where the
  peak is a large matmul in the run's dtype measured in this process between rounds (CPU) or the vendor's dense
  number for the GPU (`minillm.training.perf.GPU_PEAK_TFLOPS`);
- the share of the step time spent in data loading (the next global batch), forward (the model's forward, loss
  included), backward, optimizer (clipping, AdamW, scheduler, MoE bias update) and logging/other (metrics, progress
  bar). The stages are timed by wrapping the trainer's own functions, never by a copy of its loop; on CUDA the
  timers synchronise, so there the shares come from a separate round and the tokens/s from rounds without them.

`--dtype fp32,bf16` measures both precisions in one run: the rounds alternate between them on the same model and
data, and the script prints the ratio of their tokens/s (the median of the per-round ratios).

`--against-reference` also trains the transformers reference model of the same architecture, built with the same
initial weights (`to_reference`), with the bare forward + backward + AdamW loop of `perf.bare_train_step`,
interleaved step by step with the trainer in this process (one reference step between two trainer steps, timed
apart), and prints the median over step pairs of the ratio trainer / reference tokens/s.

    python scripts/bench_train.py --model mini_llama3 --against-reference           # CPU, fp32, cpu256, 4 x 256
    python scripts/bench_train.py --model mini_qwen3_next --dtype bf16 --against-reference
    python scripts/bench_train.py --model mini_llama3 --dtype fp32,bf16 --rounds 4    # bf16 speed-up on this CPU
    python scripts/bench_train.py --model mini_deepseekv3 --preset base --device cuda --dtype bf16 --seq 512 \\
        --batch 16 --steps 30
    python scripts/bench_train.py --model mini_llama3 --preset base --grad-checkpointing --compile --device cuda
    python scripts/bench_train.py --model mini_llama3 --against-reference --threads 1 --clock process  # busy CPU
    python scripts/bench_train.py --model mini_llama3 --profile profile.txt   # kernels / operators of 5 steps
    python scripts/bench_train.py --model mini_llama3 --preset base --device cuda --dtype bf16 --seq 512 \\
        --batch 32 --finite-check-in-step    # what waiting for the non-finite check in every step costs
    python scripts/bench_train.py --model mini_llama3 --packed-docs 4 --compile   # SFT-style packed, padded rows

The `cpu256` preset (default) is each model's `tiny` preset widened to hidden 256, 4 layers and an 8k vocabulary
(`perf.CPU_BENCH_OVERRIDES`; DeepSeek-V3 without its MTP module, which the reference lacks).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

if "--device=cpu" in sys.argv or "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer (Accelerate) uses a GPU whenever one is visible
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minillm.devices import flush_denormals, resolve_device  # noqa: E402
from minillm.errors import UserError  # noqa: E402
from minillm.models.layers.linear import force_cpu_matmul  # noqa: E402
from minillm.models.registry import MODEL_NAMES, build_model, model_package  # noqa: E402
from minillm.models.stats import model_stats  # noqa: E402
from minillm.paths import check_output_file, write_output_file  # noqa: E402
from minillm.training import perf  # noqa: E402
from minillm.training import trainer as trainer_module  # noqa: E402
from minillm.training.batches import GlobalBatches, Permutation, Prefetcher  # noqa: E402
from minillm.training.config import COMPILE_MODES, TrainConfig, parse_model_args  # noqa: E402
from minillm.training.host_memory import keep_freed_memory  # noqa: E402
from minillm.training.metrics import MetricsLogger  # noqa: E402

STAGES = ("data", "forward", "backward", "optimizer", "logging")
CLOCK = time.perf_counter  # `--clock process` swaps in time.process_time


class RandomTokens(torch.utils.data.Dataset):
    """Pretraining-style rows (`input_ids` == `labels`, length `seq_len`) of uniformly random token ids."""

    def __init__(self, vocab_size: int, seq_len: int, rows: int = 4096, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab_size, (rows, seq_len), generator=generator)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.tokens[index]
        return {"input_ids": row, "labels": row}


class PackedChats(torch.utils.data.Dataset):
    """SFT-style rows (`--packed-docs N`): `seq_len` tokens of N random-length documents each (positions restart at
    0 at every document), the first quarter of every document a prompt without targets (-100), and every fourth row
    ending in padding (a quarter of the row, attention mask 0, no targets): what a packed SFT batch makes the model do
    (block-diagonal attention: flash-attn's varlen kernel or flex_attention on CUDA, the dense mask elsewhere)."""

    def __init__(self, vocab_size: int, seq_len: int, docs: int, rows: int = 512, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.rows = []
        for index in range(rows):
            ids = torch.randint(0, vocab_size, (seq_len,), generator=generator)
            real = seq_len - (seq_len // 4 if index % 4 == 3 else 0)
            cuts = torch.randperm(real - 1, generator=generator)[: docs - 1].add(1).sort().values.tolist()
            bounds = [0, *cuts, real]
            positions = torch.zeros(seq_len, dtype=torch.long)
            labels = ids.clone()
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                positions[start:end] = torch.arange(end - start)
                labels[start : start + (end - start) // 4] = -100  # the prompt
            labels[real:] = -100
            mask = torch.zeros(seq_len, dtype=torch.long)
            mask[:real] = 1
            self.rows.append({"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


class StageTimer:
    """Wraps the trainer's step functions to time each stage of the steps after the warm-up.

    Step k starts when the training loop asks for its batch (`GlobalBatches.next_step`, or `Prefetcher.next_step`
    where a thread builds the batches ahead, as on a GPU) and ends when step k+1 asks for its own (or the loop
    ends: `save_final_model`). Forward is the model's own forward (hooks on the model);
    backward is the rest of `forward_backward`; logging/other is what remains of the step. `between_steps` (the
    reference's step) runs in that gap, outside both steps' time: trainer and reference alternate step by step.
    """

    def __init__(self, device: torch.device, warmup: int, sync: bool, between_steps=None):
        self.device, self.warmup, self.sync = device, warmup, sync
        self.between_steps = between_steps  # called before each timed step, outside the step's time
        self.totals: dict[str, float] = defaultdict(float)
        self.step_times: list[float] = []  # seconds of each timed step
        self.between_times: list[float] = []  # seconds of each `between_steps` call (paired with step_times)
        self.step = 0
        self.step_start: float | None = None
        self._forward_start = 0.0
        self._originals: list[tuple[object, str, object]] = []

    def now(self, sync: bool = False) -> float:
        if self.sync or sync:
            perf.synchronize(self.device)
        return CLOCK()

    @property
    def timing(self) -> bool:
        return self.step > self.warmup

    def _close_step(self, t: float) -> None:
        if self.step_start is not None and self.timing:
            self.totals["step"] += t - self.step_start
            self.step_times.append(t - self.step_start)

    def _patch(self, owner: object, name: str, wrapper_factory) -> None:
        original = getattr(owner, name)
        self._originals.append((owner, name, original))
        setattr(owner, name, wrapper_factory(original))

    def __enter__(self) -> StageTimer:
        timer = self

        def next_step(original):
            def wrapped(batches):
                if threading.current_thread() is not threading.main_thread():
                    return original(batches)  # the Prefetcher's thread building steps ahead (GPU): not a step
                # With work between the steps (the reference's step), wait for the device first: the end of the
                # trainer's step still queued on a GPU would otherwise count in neither step's time (the
                # reference's step waits for it before starting its clock).
                t = timer.now(sync=timer.between_steps is not None)
                timer._close_step(t)
                timer.step += 1
                if timer.timing and timer.between_steps is not None:
                    timer.between_times.append(timer.between_steps())
                    t = timer.now()
                timer.step_start = t
                out = original(batches)
                if timer.timing:
                    timer.totals["data"] += timer.now() - t
                return out
            return wrapped

        def timed(stage):
            def factory(original):
                def wrapped(*args, **kwargs):
                    t = timer.now()
                    out = original(*args, **kwargs)
                    if timer.timing:
                        timer.totals[stage] += timer.now() - t
                    return out
                return wrapped
            return factory

        def final(original):
            def wrapped(*args, **kwargs):
                timer._close_step(timer.now())
                timer.step_start = None
                return original(*args, **kwargs)
            return wrapped

        self._patch(GlobalBatches, "next_step", next_step)
        self._patch(Prefetcher, "next_step", next_step)  # what the loop calls instead on a GPU
        self._patch(trainer_module, "forward_backward", timed("forward_backward"))
        self._patch(trainer_module, "optimizer_step", timed("optimizer"))
        self._patch(MetricsLogger, "log", timed("log"))
        self._patch(trainer_module, "save_final_model", final)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)

    def watch_model(self, model: torch.nn.Module):
        """Forward hooks on `model` (top level only; recomputation under checkpointing counts as backward)."""
        def pre(module, args, kwargs):
            self._forward_start = self.now()

        def post(module, args, kwargs, output):
            if self.timing:
                self.totals["forward"] += self.now() - self._forward_start

        return (model.register_forward_pre_hook(pre, with_kwargs=True),
                model.register_forward_hook(post, with_kwargs=True))

    def shares(self) -> dict[str, float]:
        step = self.totals["step"]
        parts = {
            "data": self.totals["data"],
            "forward": self.totals["forward"],
            "backward": self.totals["forward_backward"] - self.totals["forward"],
            "optimizer": self.totals["optimizer"],
        }
        parts["logging"] = max(step - sum(parts.values()), 0.0)  # metrics, progress bar, loop bookkeeping
        return {k: v / step for k, v in parts.items()} if step > 0 else {}


def shards_tokenizer(data: str | None, tokenizer: str | None) -> str | None:
    """The tokenizer directory the trainer loads for the `--data` shards (None: the shipped one).

    The trainer refuses shards whose tokenizer fingerprint differs from its tokenizer's, so shards built with
    another tokenizer need theirs: `--tokenizer` when given, else the directory their manifest names
    (`minillm data pretrain` records the one it used) when it exists here."""
    if data is None:
        if tokenizer is not None:
            raise UserError("--tokenizer: only with --data (random tokens use the preset's vocabulary)")
        return None
    if tokenizer is not None:
        return tokenizer
    from minillm.data.pretrain import load_pretrain_manifest
    from minillm.tokenizer import load_tokenizer, tokenizer_fingerprint

    manifest = load_pretrain_manifest(data)
    named = manifest.get("tokenizer")
    if named and (Path(named) / "tokenizer.json").is_file():
        return named
    if manifest.get("tokenizer_fingerprint") != tokenizer_fingerprint(load_tokenizer(None)):
        raise UserError(f"--data {data}: built with tokenizer {named}, which is not here; pass its directory "
                        "with --tokenizer")
    return None


def train_config(args: argparse.Namespace, output_dir: str, dtype: str) -> TrainConfig:
    base_preset, overrides = perf.preset_and_overrides(args.model, args.preset)
    if args.data:
        overrides.pop("vocab_size", None)  # the tokenizer of the shards decides (`--tokenizer`, see shards_tokenizer)
    overrides.update(args.model_overrides)
    options = dict(
        stage="pretrain", model=args.model, preset=base_preset, model_args=overrides, seq_len=args.seq,
        micro_batch_size=args.batch, global_batch_size=args.batch * args.accumulation,
        max_steps=args.warmup + args.steps, lr=1e-4, min_lr=1e-5, warmup_steps=1, precision=dtype,
        gradient_checkpointing=args.grad_checkpointing, output_dir=output_dir, overwrite=True, save_every=0,
        eval_every=0, log_every=args.log_every, data=args.data, tokenizer=args.tokenizer,
    )
    if args.compile:
        if "compile" not in TrainConfig.field_names():
            raise UserError("--compile: this trainer has no `compile` option")
        options["compile"] = True
        if args.compile_mode != "default":
            options["compile_mode"] = args.compile_mode
    return TrainConfig(**options)


def build_trainer_run(args: argparse.Namespace, config: TrainConfig):
    """The trainer's `Run`: real shards through the trainer's own setup with `--data`, else random tokens."""
    if args.data:
        return trainer_module.build_run(config.resolve())
    from minillm.training.setup import stack_collate

    torch.manual_seed(args.seed)
    model = build_model(args.model, config.preset, **config.model_args)
    if args.packed_docs:
        data = PackedChats(model.config.vocab_size, args.seq, args.packed_docs, seed=args.seed)
    else:
        data = RandomTokens(model.config.vocab_size, args.seq, seed=args.seed)
    return trainer_module.Run(model=model, tokenizer=None, train_data=data, sampler=Permutation(len(data), args.seed),
                              collate=stack_collate, model_name=args.model)


def run_trainer_round(config: TrainConfig, run, device: torch.device, warmup: int, sync: bool,
                      between_steps=None) -> StageTimer:
    # the previous round's run goes: `overwrite` would keep it beside the new one (`<dir>.previous-<time>`)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    with StageTimer(device, warmup, sync, between_steps) as timer:
        hooks = timer.watch_model(run.model)
        try:
            trainer_module.train(config, run=run)
        finally:
            for hook in hooks:
                hook.remove()
    return timer


def profile_round(config: TrainConfig, run, device: torch.device, warmup: int, steps: int = 5) -> str:
    """Where the time of `steps` trainer steps after the warm-up goes (torch.profiler): on CUDA the kernels by their
    own time and the operators by the time of the kernels they launched, on a CPU the operators by their own time.
    The profiler steps at each step boundary, from the hook the reference steps use: before each timed step, so
    `steps` profiled steps need `steps + 1` timed ones (the last profiled step ends where the next begins, not
    after the final model is saved)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    # kernels by their own time, then operators with the kernels they launched (which kernel belongs to what)
    sorts = ("self_device_time_total", "device_time_total") if cuda else ("self_cpu_time_total",)
    tables: list[str] = []

    def tabulate(prof) -> None:
        averages = prof.key_averages()
        tables.extend(averages.table(sort_by=key, row_limit=40, max_name_column_width=100) for key in sorts)

    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                 on_trace_ready=tabulate) as prof:
        def next_profiler_step() -> float:
            prof.step()
            return 0.0

        run_trainer_round(config, run, device, warmup, sync=False, between_steps=next_profiler_step)
    return "\n\n".join(tables) if tables else "(no steps were profiled)"


def reference_step(reference, optimizer, input_ids: torch.Tensor, dtype: str) -> float:
    """Seconds of one bare reference step (forward + backward + AdamW), synchronised."""
    perf.synchronize(input_ids.device)
    start = CLOCK()
    perf.bare_train_step(reference, optimizer, input_ids, dtype)
    perf.synchronize(input_ids.device)
    return CLOCK() - start


def resident_peak() -> float | None:
    """The peak resident set of this process in bytes (Linux's VmHWM, the one `/proc/self/clear_refs` resets), or
    None where /proc has no such line."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window, so each dtype's rounds report their own peak (not the first dtype's).
    CUDA: the allocator's peak statistics. CPU: the resident-set high-water mark, through /proc/self/clear_refs
    (Linux). False where it cannot be reset: `peak_memory` is then the peak of the process's whole life."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS only (proc(5))
    except OSError:
        return False
    return resident_peak() is not None


def peak_memory(device: torch.device) -> float:
    """Peak bytes since `reset_peak_memory`: CUDA max allocated, or the peak resident set of this process on the
    CPU (which includes freed memory the process keeps, see `keep_freed_memory`)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    peak = resident_peak()
    if peak is not None:
        return peak
    # getrusage's maximum cannot be reset (and keeps the peak of exited threads): the process's lifetime peak
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="mini_llama3", choices=MODEL_NAMES)
    parser.add_argument("--preset", default=perf.CPU_BENCH_PRESET, help="cpu256 (default), tiny, small or base")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: the GPU when there is one (as the trainer does)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp32,bf16"), metavar="fp32|bf16|fp32,bf16",
                        help="bf16 = autocast; fp32,bf16 = both, alternating rounds, with their ratio")
    parser.add_argument("--batch", type=perf.positive_int, default=4, help="rows per micro-batch")
    parser.add_argument("--accumulation", type=perf.positive_int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--seq", type=perf.positive_int, default=256)
    parser.add_argument("--steps", type=perf.positive_int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=perf.non_negative_int, default=2,
                        help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=perf.positive_int, default=1, help="trainer runs (each: warm-up + steps)")
    parser.add_argument("--log-every", type=perf.positive_int, default=10, help="the trainer's metrics interval")
    parser.add_argument("--against-reference", action="store_true",
                        help="also time the transformers reference's bare loop, interleaved")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (trainer option)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile mode with --compile (trainer option); reduce-overhead = CUDA graphs")
    parser.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--data", default=None, help="pretraining shards to read instead of random tokens")
    parser.add_argument("--packed-docs", type=perf.positive_int, default=None, metavar="N",
                        help="SFT-style rows instead: N documents packed per row, prompts without targets, every "
                             "fourth row padded (tokens/s and MFU count every token, padding included)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="with --data: the tokenizer the shards were built with (default: the one their "
                             "manifest names, else the shipped one)")
    parser.add_argument("--threads", type=perf.positive_int, default=None,
                        help="torch threads on the CPU (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=("wall", "process"),
                        help="process: CPU seconds of this process (steadier on a shared CPU with --threads 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override, as `minillm pretrain --model-arg` (repeatable), e.g. "
                             "loss_chunk_size=4096; the reference gets the fields it knows")
    parser.add_argument("--cpu-matmul", default="auto", choices=("auto", "onednn", "torch"),
                        help="fp32 CPU matmuls of the trainer's model: auto (the trainer's choice: oneDNN on "
                             "non-Intel x86 CPUs, else torch's), oneDNN or torch's (MKL); the reference always runs "
                             "torch's")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--finite-check-in-step", action="store_true",
                        help="measurement only: the trainer waits for each step's non-finite loss flag inside the "
                             "step, before its optimizer step (as with optimizers that cannot drop a step on the "
                             "device), instead of reading it a step later; to see what that wait costs on a GPU")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="after the timed rounds, profile up to 5 steps (at most --steps - 1) of one more trainer "
                             "round (torch.profiler) and "
                             "write the operators that take the most time (self time on the device) to FILE")
    args = parser.parse_args(argv)
    # Everything the user can get wrong is checked here, before the first round: a UserError (one line, exit 2
    # under `perf.run_main`) after minutes of training would waste them.
    args.model_overrides = parse_model_args(args.model_arg)  # parsed once, for every round's config
    args.tokenizer = shards_tokenizer(args.data, args.tokenizer)
    check_output_file(args.json, "--json")
    check_output_file(args.profile, "--profile")
    if args.device == "cuda":
        resolve_device("cuda")
    if args.clock == "process" and torch.cuda.is_available():
        raise UserError("--clock process measures CPU time; use it only for CPU runs")
    if args.profile and args.steps < 2:
        raise UserError("--profile needs --steps 2 or more (a profiled step ends where the next one starts)")
    if args.compile_mode != "default" and not args.compile:
        raise UserError(f"--compile-mode {args.compile_mode}: only with --compile")
    if args.against_reference and args.accumulation != 1:
        raise UserError("--against-reference compares single-batch steps; drop --accumulation")
    if args.packed_docs and (args.against_reference or args.data):
        raise UserError("--packed-docs makes its own rows, and the reference's bare step takes plain token rows: "
                        "drop --against-reference and --data")
    if args.packed_docs and args.packed_docs * 2 > args.seq:
        raise UserError(f"--packed-docs {args.packed_docs}: at most {args.seq // 2} documents fit a row of --seq "
                        f"{args.seq} (two tokens each at least)")
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # what the trainer does on a CPU, set before any round so the reference's get it too
        flush_denormals()  # the trainer's setting too (devices.py), before the peak's matmul starts torch's threads

    dtypes = args.dtype.split(",")
    original_choice = trainer_module.skips_on_device
    if args.finite_check_in_step:
        trainer_module.skips_on_device = lambda accelerator, optimizer: False
    try:
        with force_cpu_matmul(None if args.cpu_matmul == "auto" else args.cpu_matmul):
            results = measure(args, device, dtypes)
    finally:
        trainer_module.skips_on_device = original_choice
    for result in results.values():
        print_result(result)
    if len(dtypes) == 2:  # fp32,bf16: round r of each ran back to back
        rounds = zip(results["bf16"]["tokens_per_s_rounds"], results["fp32"]["tokens_per_s_rounds"], strict=True)
        ratios = [bf16 / fp32 for bf16, fp32 in rounds]
        results["dtype_ratio"] = {"ratio": statistics.median(ratios), "ratio_rounds": ratios}
        print(f"bf16 / fp32 tokens/s: {statistics.median(ratios):.2f}x  (per round: "
              + " ".join(f"{r:.2f}" for r in ratios) + ")")
    if args.json:
        payload = results[dtypes[0]] if len(dtypes) == 1 else results
        write_output_file(args.json, json.dumps(payload, indent=2), "--json")
    return results[dtypes[0]] if len(dtypes) == 1 else results


def measure(args: argparse.Namespace, device: torch.device, dtypes: list[str]) -> dict[str, dict]:
    """The results of each dtype in `dtypes`; with two, their rounds alternate on the same model and data."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        configs = {dtype: train_config(args, os.path.join(tmp, "run"), dtype) for dtype in dtypes}
        run = build_trainer_run(args, configs[dtypes[0]])
        stats = model_stats(run.model, args.seq)
        reference = ref_optimizer = input_ids = None
        if args.against_reference:
            reference = model_package(args.model).to_reference(run.model).to(device).train()
            ref_optimizer = perf.bare_optimizer(reference)
            generator = torch.Generator().manual_seed(args.seed + 1)
            input_ids = torch.randint(0, reference.config.vocab_size, (args.batch, args.seq),
                                      generator=generator).to(device)
        tokens_per_step = args.batch * args.accumulation * args.seq
        between = dict.fromkeys(dtypes)
        if reference is not None:
            for dtype in dtypes:
                for _ in range(args.warmup):
                    reference_step(reference, ref_optimizer, input_ids, dtype)
                between[dtype] = lambda dtype=dtype: reference_step(reference, ref_optimizer, input_ids, dtype)
        measured = {dtype: {"rates": [], "step_pairs": [], "peaks": [], "shares": [], "memory": []}
                    for dtype in dtypes}
        memory_scope = "rounds"  # "process" where the peak cannot be reset: the same lifetime peak for every dtype
        sync_timers = device.type == "cuda"
        for _ in range(args.rounds):
            for dtype in dtypes:
                m = measured[dtype]
                if device.type == "cpu":
                    m["peaks"].append(perf.measure_cpu_peak_flops(dtype, seconds=0.5, clock=CLOCK))
                if not reset_peak_memory(device):
                    memory_scope = "process"
                timer = run_trainer_round(configs[dtype], run, device, args.warmup, sync=False,
                                          between_steps=between[dtype])
                m["rates"].append(tokens_per_step / statistics.median(timer.step_times))
                m["step_pairs"] += list(zip(timer.step_times, timer.between_times, strict=False))
                if not sync_timers:
                    m["shares"].append(timer.shares())
                m["memory"].append(peak_memory(device))  # this dtype's round (and whatever memory is still held)
        for dtype in dtypes:
            m = measured[dtype]
            if sync_timers:  # CUDA: a separate round with synchronising timers for the breakdown
                m["shares"].append(run_trainer_round(configs[dtype], run, device, args.warmup, sync=True).shares())
            if device.type == "cpu":
                m["peaks"].append(perf.measure_cpu_peak_flops(dtype, seconds=0.5, clock=CLOCK))
                m["peak"] = max(m["peaks"])
            else:
                m["peak"] = perf.device_peak_flops(device, dtype)
        if args.profile:
            profiled = min(5, args.steps - 1)
            table = profile_round(configs[dtypes[0]], run, device, args.warmup, steps=profiled)
            write_output_file(args.profile, table + "\n", "--profile")
            print(f"profile of {profiled} steps ({dtypes[0]}) written to {args.profile}")

    results = {}
    for dtype in dtypes:
        m = measured[dtype]
        tokens_per_s = statistics.median(m["rates"])
        result = {
            "model": args.model, "preset": args.preset, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "clock": args.clock, "dtype": dtype, "batch": args.batch,
            "accumulation": args.accumulation, "seq": args.seq, "steps": args.steps, "rounds": args.rounds,
            "compile": args.compile, "grad_checkpointing": args.grad_checkpointing,
            "finite_check_in_step": args.finite_check_in_step, "packed_docs": args.packed_docs,
            "tokens_per_s": tokens_per_s, "tokens_per_s_rounds": m["rates"],
            "peak_memory_bytes": max(m["memory"]), "peak_memory_scope": memory_scope,
            "flops_per_token": stats.flops_per_token, "peak_flops": m["peak"],
            "mfu": perf.mfu(tokens_per_s, stats.flops_per_token, m["peak"]),
            "shares": {k: statistics.median(s[k] for s in m["shares"]) for k in STAGES} if m["shares"] else {},
        }
        if m["step_pairs"]:
            ref_times = [ref for _, ref in m["step_pairs"]]
            result["reference"] = type(reference).__name__
            result["reference_tokens_per_s"] = tokens_per_step / statistics.median(ref_times)
            result["reference_mfu"] = perf.mfu(result["reference_tokens_per_s"], stats.flops_per_token, m["peak"])
            # each trainer step against the reference step run just before it: robust to load that comes and goes
            result["ratio_steps"] = [ref / ours for ours, ref in m["step_pairs"]]
            result["ratio"] = statistics.median(result["ratio_steps"])
        results[dtype] = result
    return results


def print_result(res: dict) -> None:
    where = res["device_name"] if res["device"] != "cpu" else f"cpu, {res['threads']} threads, {res['clock']} clock"
    packed = f", {res['packed_docs']} packed documents per row" if res.get("packed_docs") else ""
    print(f"{res['model']} ({res['preset']}), {where}, {res['dtype']}, batch {res['batch']}"
          f"{' x ' + str(res['accumulation']) if res['accumulation'] > 1 else ''} x {res['seq']}, "
          f"{res['rounds']} rounds x {res['steps']} steps"
          f"{', compiled' if res['compile'] else ''}{', grad checkpointing' if res['grad_checkpointing'] else ''}"
          f"{', finite check in each step' if res['finite_check_in_step'] else ''}{packed}")
    rounds = " ".join(f"{r:,.0f}" for r in res["tokens_per_s_rounds"])
    print(f"  trainer     {res['tokens_per_s']:>10,.0f} tok/s   (rounds: {rounds})")
    if res["peak_memory_bytes"]:
        if res["peak_memory_scope"] == "process":
            scope = " (process RSS, lifetime peak: not resettable here, so not this dtype's own)"
        else:
            scope = " (process RSS)" if res["device"] == "cpu" else ""
        print(f"  peak memory {res['peak_memory_bytes'] / 2**20:>10,.0f} MiB{scope}")
    peak = res["peak_flops"]
    mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a (unknown peak)"
    print(f"  MFU         {mfu:>10}   ({res['flops_per_token'] / 1e6:,.1f} MFLOP/token, peak "
          f"{peak / 1e12 if peak else float('nan'):,.3f} TFLOP/s {'measured' if res['device'] == 'cpu' else 'table'})")
    if res["shares"]:
        print("  step time   " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in res["shares"].items()))
    if "ratio" in res:
        ref_mfu = f", MFU {100 * res['reference_mfu']:.1f}%" if res["reference_mfu"] is not None else ""
        print(f"  reference   {res['reference_tokens_per_s']:>10,.0f} tok/s   ({res['reference']}, bare "
              f"forward+backward+AdamW{ref_mfu})")
        print(f"  ratio       {res['ratio']:>10.2f}x  (median over step pairs: "
              + " ".join(f"{r:.2f}" for r in res["ratio_steps"]) + ")")


if __name__ == "__main__":
    perf.run_main(main)
