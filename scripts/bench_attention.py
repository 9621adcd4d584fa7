"""Attention speed: forward + backward of each path `sdpa_attention` can take, for packed or plainly causal rows.

Paths (minillm/models/layers/attention.py): "sdpa" (the dense block-diagonal mask, the reference), "math" (the same
mask through `math_attention`, the CPU kernel for bf16), "flex" (compiled flex_attention with a document BlockMask)
and "flash" (flash-attn's varlen kernel over the unpadded tokens). Each runs on the same random packed batch: rows of `--seq` tokens cut into documents of random
lengths (mean `--doc-len`), the heads of the `base` presets by default (12 query heads, 4 kv heads, head dim 64).
Paths that cannot run here are listed with the reason (flash-attn needs CUDA and fp16/bf16; flex_attention has no
CPU backward, so on CPU it is timed only with `--fwd-only`). For reference, "causal" is plain causal SDPA over the
whole row (flash kernel on CUDA): it ignores the documents, so it is not a correct path, only the speed of an
unmasked causal kernel doing more work. `--plain-causal` times rows of one document each instead (no mask: what
pretraining without packing runs), where "sdpa" and "math" are the paths; `--v-head-dim` sets MLA's value head dim.

Per path: milliseconds per step (median of `--steps`), the one-off preparation per forward (mask, cu_seqlens or
BlockMask; shared by all layers of a model), peak extra GPU memory, the max abs difference from "sdpa" at real
tokens, and the speed-up over "sdpa".

    python scripts/bench_attention.py                          # CPU: fp32, short rows, what runs here
    python scripts/bench_attention.py --fwd-only               # CPU: includes forward-only flex
    python scripts/bench_attention.py --device cuda --dtype bf16 --seq 1024 2048 4096 8192
    python scripts/bench_attention.py --device cuda --dtype fp32 --json attention.json   # flex vs sdpa
    python scripts/bench_attention.py --dtype bf16 --plain-causal --batch 4 --heads 4 --kv-heads 2 --backends sdpa math
    python scripts/bench_attention.py --dtype bf16 --plain-causal --batch 4 --heads 4 --kv-heads 4 --head-dim 96 \
        --v-head-dim 64 --backends sdpa math                 # MLA's head dims (mini_deepseekv3)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minillm.devices import resolve_device  # noqa: E402
from minillm.errors import UserError  # noqa: E402
from minillm.models.layers import attention  # noqa: E402
from minillm.models.layers.attention import force_attention_backend, prepare_attention, sdpa_attention  # noqa: E402
from minillm.paths import check_output_file, write_output_file  # noqa: E402
from minillm.training import perf  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("sdpa", "math", "flex", "flash", "causal")


def packed_positions(batch: int, seq: int, doc_len: int, seed: int) -> torch.Tensor:
    """(B, L) position ids restarting at 0 at each document; lengths uniform in [1, 2 * doc_len - 1], the first
    at most L / 2 so every row is packed."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        parts, filled = [], 0
        while filled < seq:
            n = min(int(torch.randint(1, 2 * doc_len, (1,), generator=gen)), seq - filled, max(seq // 2, 1))
            parts.append(torch.arange(n))
            filled += n
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def unavailable(backend: str, device: torch.device, dtype: torch.dtype, fwd_only: bool, packed: bool) -> str | None:
    """Why `backend` cannot run here, or None."""
    if not packed and backend in ("flash", "flex", "causal"):
        return "packed rows only"
    if backend == "flash":
        if device.type != "cuda":
            return "needs CUDA"
        if dtype == torch.float32:
            return "no fp32 kernels"
        if attention.flash_varlen_function() is None:
            return "flash-attn not installed (extra `gpu`)"
    if backend == "flex":
        if attention._compiled_flex_attention() is None:
            return "this torch has no flex_attention"
        if device.type == "cpu" and not fwd_only:
            return "no CPU backward (try --fwd-only)"
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(backend, q, k, v, pos, steps: int, warmup: int, fwd_only: bool):
    """(median ms per step, preparation ms, peak extra bytes or None, output at real tokens); `pos` None: plain
    causal rows."""
    device = q.device
    length = q.shape[2]

    def prepare():
        if backend == "causal" or pos is None:
            return None
        docs = prepare_attention(length, length, None, pos, device, q.shape[0])  # PackedDocs: rows are packed
        {"sdpa": docs.dense_mask, "math": docs.dense_mask, "flex": docs.block_mask, "flash": docs.varlen}[backend]()
        return docs

    mask = prepare()  # warm (flex: compiles create_block_mask)
    sync(device)
    start = time.perf_counter()
    mask = prepare()
    sync(device)
    prep_ms = 1e3 * (time.perf_counter() - start)

    leaves = [t.detach().clone().requires_grad_(not fwd_only) for t in (q, k, v)]
    grad_out = None

    def step():
        nonlocal grad_out
        with force_attention_backend("sdpa" if backend == "causal" else backend), torch.set_grad_enabled(not fwd_only):
            out = sdpa_attention(*leaves, mask)  # (B, L, H, D)
            if not fwd_only:
                if grad_out is None:
                    grad_out = torch.randn_like(out)
                out.backward(grad_out)
                for t in leaves:
                    t.grad = None
        return out

    for _ in range(warmup):
        out = step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        out = step()
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) - base_mem if device.type == "cuda" else None
    return statistics.median(times), prep_ms, peak, out.detach().float()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--seq", type=perf.positive_int, nargs="+", default=None,
                        help="row lengths (default by device)")
    parser.add_argument("--batch", type=perf.positive_int, default=None, help="rows (default 8 on CUDA, 1 on CPU)")
    parser.add_argument("--doc-len", type=perf.positive_int, default=256, help="mean document length")
    parser.add_argument("--heads", type=perf.positive_int, default=12)
    parser.add_argument("--kv-heads", type=perf.positive_int, default=4)
    parser.add_argument("--head-dim", type=perf.positive_int, default=64, help="query/key head dim")
    parser.add_argument("--v-head-dim", type=perf.positive_int, default=None,
                        help="value head dim (default: --head-dim)")
    parser.add_argument("--plain-causal", action="store_true", help="rows of one document each, no mask")
    parser.add_argument("--steps", type=perf.positive_int, default=None,
                        help="timed steps (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=perf.non_negative_int, default=2)
    parser.add_argument("--fwd-only", action="store_true", help="time the forward pass only (no_grad)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="default: sdpa flex flash causal, and math on a CPU (its kernel's home)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    check_output_file(args.json, "--json")  # before the run, not after it
    if args.heads % args.kv_heads:
        raise UserError(f"--heads {args.heads}: not a multiple of --kv-heads {args.kv_heads} (grouped queries)")
    on_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    # `is None`, not `or`: a value given is used as given (the parser has refused 0 already)
    lengths = args.seq if args.seq is not None else ([1024, 2048, 4096, 8192] if on_cuda else [256, 512, 1024])
    batch = args.batch if args.batch is not None else (8 if on_cuda else 1)
    if args.backends is None:
        args.backends = ["sdpa", *([] if on_cuda else ["math"]), "flex", "flash", "causal"]
    steps = args.steps if args.steps is not None else (20 if on_cuda else 3)
    name = torch.cuda.get_device_name(device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    mode = "forward" if args.fwd_only else "forward + backward"
    v_dim = args.v_head_dim or args.head_dim
    rows = "plain causal rows" if args.plain_causal else f"mean document {args.doc_len} tokens"
    print(f"{name}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}, {mode}, batch {batch}, "
          f"heads {args.heads}/{args.kv_heads} x {args.head_dim} (v {v_dim}), {rows}")
    packed = not args.plain_causal
    for backend in args.backends:
        why = unavailable(backend, device, dtype, args.fwd_only, packed)
        if why:
            print(f"  {backend}: skipped, {why}")

    results = []
    header = f"{'L':>6} {'path':>7} {'ms/step':>9} {'prep ms':>8} {'peak MiB':>9} {'max diff':>9} {'vs sdpa':>8}"
    print(header)
    for length in lengths:
        gen = torch.Generator().manual_seed(length)
        q = torch.randn(batch, args.heads, length, args.head_dim, generator=gen).to(device, dtype)
        k = torch.randn(batch, args.kv_heads, length, args.head_dim, generator=gen).to(device, dtype)
        v = torch.randn(batch, args.kv_heads, length, v_dim, generator=gen).to(device, dtype)
        pos = packed_positions(batch, length, args.doc_len, seed=length).to(device) if packed else None
        reference_ms, reference_out = None, None
        for backend in args.backends:
            if unavailable(backend, device, dtype, args.fwd_only, packed):
                continue
            try:
                ms, prep_ms, peak, out = bench_one(backend, q, k, v, pos, steps, args.warmup, args.fwd_only)
            except torch.OutOfMemoryError:
                print(f"{length:>6} {backend:>7}   out of memory")
                torch.cuda.empty_cache()
                continue
            if backend == "sdpa":
                reference_ms, reference_out = ms, out
            diff = (out - reference_out).abs().max().item() if reference_out is not None else float("nan")
            speedup = reference_ms / ms if reference_ms else float("nan")
            peak_mib = f"{peak / 2**20:.0f}" if peak is not None else "-"
            print(f"{length:>6} {backend:>7} {ms:>9.2f} {prep_ms:>8.2f} {peak_mib:>9} {diff:>9.2g} {speedup:>7.2f}x")
            results.append(
                dict(seq=length, backend=backend, ms=ms, prep_ms=prep_ms, peak_bytes=peak, max_diff=diff,
                     speedup_vs_sdpa=speedup)
            )
            del out
    if args.json:
        meta = dict(device=name, dtype=str(dtype), mode=mode, batch=batch, heads=args.heads, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, v_head_dim=v_dim, doc_len=None if args.plain_causal else args.doc_len,
                    torch=torch.__version__)
        write_output_file(args.json, json.dumps(dict(meta, results=results), indent=2), "--json")


if __name__ == "__main__":
    perf.run_main(main)
