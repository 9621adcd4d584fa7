"""Throughput of `minillm data pretrain` against the raw tokenizer on the same text, in the same run.

    python scripts/bench_data.py                                   # ../shared/data/pretrain_zh_classical.parquet
    python scripts/bench_data.py --input corpus.parquet --tokenizer my_tokenizer

Prints MB/s (UTF-8 bytes of text per second) for:
- raw: `tokenizers.Tokenizer.encode_batch` over the documents already in memory (batches of the same size the
  pipeline uses), i.e. tokenizing alone;
- pipeline: `build_pretrain_shards`, what the command runs (read the file, tokenize, write shards and manifest,
  with the progress bar), excluding Python start-up;
and their ratio (goal >= 85%). The two run alternately, `--repeat` times each, and each keeps its best time, since
the machine may be shared; the pipeline's token count includes one `<|endoftext|>` per document.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from minillm.data.pretrain import ENCODE_BATCH_CHARS, build_pretrain_shards
from minillm.data.sources import iter_text_batches, resolve_inputs
from minillm.tokenizer import load_tokenizer
from minillm.training import perf

DEFAULT_INPUT = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pretrain_zh_classical.parquet"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(DEFAULT_INPUT))
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--repeat", type=perf.positive_int, default=2, help="timed runs of each (the best counts)")
    args = parser.parse_args(argv)

    tok = load_tokenizer(args.tokenizer)
    backend = tok.backend_tokenizer
    texts = [t for s in resolve_inputs(args.input) for b in iter_text_batches(s, args.text_column) for t in b]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    batches, batch, chars = [], [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= ENCODE_BATCH_CHARS:
            batches.append(batch)
            batch, chars = [], 0
    if batch:
        batches.append(batch)

    def raw() -> int:
        n = 0
        for b in batches:
            n += sum(len(e.ids) for e in backend.encode_batch(b, add_special_tokens=False))
        return n

    def pipeline() -> int:
        out = Path(tempfile.mkdtemp(prefix="minillm-bench-")) / "shards"
        try:
            return build_pretrain_shards(args.input, out, args.tokenizer, args.text_column, progress=True)[
                "tokens"
            ]
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)

    # Alternate the two so both see the same machine load; keep each one's best wall time. CPU time (all threads of
    # this process) is printed too: on a shared machine it is the steadier measure of the work each one does.
    best = {"raw": (float("inf"), float("inf"), 0), "pipeline": (float("inf"), float("inf"), 0)}
    for _ in range(args.repeat):
        for name, fn in (("raw", raw), ("pipeline", pipeline)):
            wall, cpu = time.perf_counter(), time.process_time()
            tokens = fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu), tokens)

    print(
        f"text: {args.input}: {len(texts):,} documents, {n_bytes / 1e6:.1f} MB UTF-8, {os.cpu_count()} CPUs"
    )
    labels = {"raw": "raw Tokenizer.encode_batch:", "pipeline": "minillm data pretrain:"}
    for name, (wall, cpu, tokens) in best.items():
        print(
            f"{labels[name]:28s} {n_bytes / wall / 1e6:7.2f} MB/s wall ({wall:6.1f} s), "
            f"{n_bytes / cpu / 1e6:7.2f} MB/s per CPU-second ({cpu:6.1f} CPU s), {tokens:,} tokens"
        )
    ratio_wall = best["raw"][0] / best["pipeline"][0]
    ratio_cpu = best["raw"][1] / best["pipeline"][1]
    print(f"ratio pipeline / raw: {ratio_wall:.1%} by wall time, {ratio_cpu:.1%} by CPU time (goal >= 85%)")


if __name__ == "__main__":
    perf.run_main(main)
