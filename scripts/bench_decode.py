"""Decode speed: our decode loop (`minillm.inference.engine.Engine`) against `model.generate()`.

For each model, greedy decoding of `--new-tokens` tokens after a `--prompt-len`-token prompt, at batch 1 and 8:
time to first token (prefill + first sample) and decode throughput (tokens/s after the first token, all rows).
`generate()` is timed bare (a streamer only records when tokens arrive); ours through its full front end
(detokenization and stop checks included), so the comparison does not flatter us. Ours runs twice: through the
models' decode fast path (`minillm`, what `minillm chat` / `serve` use) and through the plain `forward` with the
model's cache (`minillm forward()`), so one run also shows what the fast path buys. Each number is the median of
`--repeats` runs (the engines interleaved) after one warm-up run. Eos is ignored so every run produces exactly `--new-tokens` tokens.

    python scripts/bench_decode.py                                  # the three models, tiny preset, random weights
    python scripts/bench_decode.py --preset base --device cuda      # 100-200M models on a GPU
    python scripts/bench_decode.py --model runs/sft_mini_llama3_20250101-120000/final
    python scripts/bench_decode.py --json bench.json                # also write the numbers
    python scripts/bench_decode.py --threads 1 --clock process      # on a shared CPU: CPU seconds, not wall time
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minillm.devices import resolve_device  # noqa: E402
from minillm.inference.engine import Engine  # noqa: E402
from minillm.inference.loading import default_dtype  # noqa: E402
from minillm.inference.sampling import SamplingParams  # noqa: E402
from minillm.models.registry import MODEL_NAMES  # noqa: E402
from minillm.paths import check_output_file, write_output_file  # noqa: E402
from minillm.training import perf  # noqa: E402

CLOCK = time.perf_counter  # `--clock process` swaps in time.process_time


class _Clock:
    """A `generate()` streamer that only records when each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call hands over the prompt
            self.prompt_seen = True
            return
        self.times.append(CLOCK())

    def end(self) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_hf(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(time to first token s, decode tokens/s) for bare `model.generate()`."""
    clock = _Clock()
    _sync(ids.device)
    start = CLOCK()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            streamer=clock,
        )
    _sync(ids.device)
    end = CLOCK()
    assert out.shape[1] - ids.shape[1] == new_tokens
    return clock.times[0] - start, ids.shape[0] * (new_tokens - 1) / (end - clock.times[0])


def time_ours(engine: Engine, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(time to first token s, decode tokens/s) for our engine's `stream()`."""
    prompts = ids.tolist()
    params = SamplingParams(max_new_tokens=new_tokens)
    _sync(ids.device)
    start = CLOCK()
    first = None
    produced = 0
    for events in engine.stream(prompts, params):
        produced += sum(ev.token_id is not None for ev in events)
        if first is None:
            first = CLOCK()
    _sync(ids.device)
    end = CLOCK()
    assert produced == ids.shape[0] * new_tokens
    return first - start, ids.shape[0] * (new_tokens - 1) / (end - first)


def medians(fns: list, repeats: int) -> list[tuple[float, float]]:
    """Median (TTFT, tok/s) of each timing function; runs are interleaved so load changes hit all alike."""
    for fn in fns:
        fn()  # warm-up (allocator, kernels, lazy init)
    runs = [[fn() for fn in fns] for _ in range(repeats)]
    return [
        (statistics.median(r[i][0] for r in runs), statistics.median(r[i][1] for r in runs))
        for i in range(len(fns))
    ]


def load_models(args, device: torch.device):
    """(name, model, tokenizer) for each model to benchmark."""
    from minillm.tokenizer import load_tokenizer

    if args.model:
        from minillm.inference.loading import load_model_and_tokenizer, model_display_name

        model, tok, model_dir = load_model_and_tokenizer(args.model, str(device))
        yield model_display_name(model_dir), model, tok
        return
    from minillm.models.registry import build_model

    tok = load_tokenizer(None)
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, args.preset, vocab_size=len(tok))
        yield name, model.to(device=device, dtype=default_dtype(device)).eval(), tok


def bench_model(name: str, model, tok, args, device: torch.device, table) -> list[dict]:
    """Every engine at every batch size; adds rows to `table` and returns the numbers.

    Engines: `generate()`; ours through the model's decode fast path (`minillm`, the default); and, for a model
    that has a fast path, ours decoding through `forward` with the cache it returns (`minillm forward()`, the loop
    before the fast path existed), so one run shows the before/after under the same load.
    """
    engines = [("minillm", Engine(model, tok))]
    if engines[0][1].fast_path:
        engines.insert(0, ("minillm forward()", Engine(model, tok, fast_path=False)))
    for _, engine in engines:
        engine.stop_token_ids = set()  # always produce exactly --new-tokens tokens
    rows = []
    for batch in args.batch_sizes:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(5, len(tok), (batch, args.prompt_len), generator=gen).to(device)
        fns = [partial(time_hf, model, ids, args.new_tokens)]
        fns += [partial(time_ours, engine, ids, args.new_tokens) for _, engine in engines]
        results = medians(fns, args.repeats)
        hf_tps = results[0][1]
        for label, (ttft, tps) in zip(["generate()"] + [label for label, _ in engines], results, strict=True):
            speedup = tps / hf_tps
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "engine": label,
                    "ttft_ms": ttft * 1e3,
                    "decode_tok_s": tps,
                    "speedup_vs_generate": speedup,
                }
            )
            mark = f"{speedup:.2f}x" if label != "generate()" else ""
            table.add_row(name, str(batch), label, f"{ttft * 1e3:.1f}", f"{tps:.1f}", mark)
    return rows


def json_args(args: argparse.Namespace) -> dict:
    """The options as JSON values (numbers, lists, null), not their Python spellings ("None", "[1, 8]"); paths
    become strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", help="benchmark this model directory instead of freshly built ones")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch-sizes", type=perf.positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=perf.positive_int, default=64)
    parser.add_argument(
        "--new-tokens",
        type=perf.int_at_least(2),
        default=128,
        help="tokens per run, at least 2: decode speed is timed from the first token to the last",
    )
    parser.add_argument("--repeats", type=perf.positive_int, default=3, help="timed runs (the median counts)")
    parser.add_argument("--threads", type=perf.positive_int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="'process' times CPU seconds used by this process (use with --threads 1 on a shared, busy CPU)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    device = resolve_device(args.device)  # a UserError for a device this machine lacks
    check_output_file(args.json, "--json")  # before the run, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process":
        global CLOCK
        CLOCK = time.process_time
    console = Console()
    table = Table(
        title=f"greedy decode on {device}: {args.prompt_len}-token prompt, {args.new_tokens} new tokens"
    )
    for col in ("model", "batch", "engine", "TTFT ms", "decode tok/s", "speed-up"):
        table.add_column(col, justify="right" if col not in ("model", "engine") else "left")
    results = []
    for name, model, tok in load_models(args, device):
        results += bench_model(name, model, tok, args, device, table)
    console.print(table)
    if args.json:
        write_output_file(
            args.json,
            json.dumps({"device": str(device), "args": json_args(args), "results": results}, indent=2),
            "--json",
        )


if __name__ == "__main__":
    perf.run_main(main)
