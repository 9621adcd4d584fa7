#!/usr/bin/env bash
# One-GPU check and training benchmark, in one run that fits a short GPU lease:
#   0. the GPU tests of the newest changes (graphs per compiled layer, a trainer step's waits), under a minute;
#   1. mini_llama3's `base` preset compiled, bf16 autocast, sequence 512, through the real trainer
#      (scripts/bench_train.py), with a profile (the trainer now never waits for the GPU inside a step), then
#      waiting for the non-finite check in every step, as before (what one wait per step costs);
#   2. the MoE models' `base` presets compiled (mini_deepseekv3 with a profile): their compiled layers used to
#      break into several graphs on CUDA (grouped_mm's alignment check, the fla / causal-conv1d dispatch), no longer;
#   3. the `base` presets of the three models eager, each against its transformers reference (interleaved, same
#      process), with profiles;
#   4. tests/test_gpu.py: the CUDA code paths against their references (models vs transformers, grouped_mm kernel,
#      flex_attention for packed documents, the bf16 loss, one graph per compiled layer kind,
#      flash-linear-attention's Gated DeltaNet kernels when installed);
#   5. in the time left: mini_llama3 compiled at BIG_BATCH rows per step, mini_llama3 on SFT-shaped packed rows
#      (eager and compiled), mini_llama3 and mini_deepseekv3 with CUDA
#      graphs (`--compile-mode reduce-overhead`), mini_llama3 with the loss's eager softmax in chunks of 1,024
#      tokens (what the fused kernel and larger chunks gain), and the packed-attention kernels (bench_attention.py;
#      ATTENTION=0 skips them).
# Prints tokens/s, MFU (peak from the GPU table in minillm/training/perf.py), peak memory and the step-time shares,
# then one summary table. Goals (issue 7): MFU >= 40% for mini_llama3, >= 25% for the MoE models on one H100.
# Every stage is capped by `timeout`, the whole script by BUDGET seconds (default 470: under 8 minutes).
#
#   bash scripts/gpu_bench.sh                      # results in gpu_bench_results/ (JSON per run + summary.txt)
#   BATCH=16 STEPS=10 bash scripts/gpu_bench.sh    # smaller/faster
#   OUT=/tmp/results BUDGET=400 bash scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu_bench_results}
BATCH=${BATCH:-32}     # rows of 512 tokens per step (16k tokens): enough work per kernel for a 125-175M model
BIG_BATCH=${BIG_BATCH:-128}  # rows per step of the large-batch run (64k tokens, as nanochat's 32 x 2048)
STEPS=${STEPS:-20}     # timed steps per round
ROUNDS=${ROUNDS:-1}    # trainer runs per model (the reference alternates with the trainer step by step)
PER_RUN=${PER_RUN:-140}  # seconds allowed per model run
BUDGET=${BUDGET:-470}    # seconds for the whole script
PYTHON=${PYTHON:-$(command -v python || command -v python3)}  # images with only `python3` too
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # tests import minillm from this checkout
if ! nvidia-smi >/dev/null 2>&1; then echo "no NVIDIA GPU here (nvidia-smi fails): this benchmark needs one" >&2; exit 2; fi
mkdir -p "$OUT"
rm -f "$OUT"/*.json  # the summary reads every JSON here: none from an earlier invocation
deadline=$((SECONDS + BUDGET))

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
"$PYTHON" -c "import fla.ops.gated_delta_rule" 2>/dev/null && echo "flash-linear-attention: installed" \
    || echo "flash-linear-attention: not installed (torch DeltaNet path)"

run() {  # run NAME ARGS...: one bench_train run with its own time cap, skipped when the script's budget is spent
    local name=$1; shift
    local left=$((deadline - SECONDS))
    if (( left < 30 )); then echo "skip $name: time budget spent"; return; fi
    local cap=$(( left < PER_RUN ? left : PER_RUN ))
    echo "=== $name (cap ${cap}s)"
    timeout "$cap" "$PYTHON" scripts/bench_train.py --device cuda --preset base --dtype bf16 --seq 512 \
        --batch "$BATCH" --steps "$STEPS" --warmup 3 --rounds "$ROUNDS" --log-every 10 \
        --json "$OUT/$name.json" "$@" 2>&1 | grep -v -E "Writing model shards|^pretrain " \
        || echo "$name: failed or timed out"
}

# First, in under a minute, the GPU checks of the newest changes: one graph per compiled layer kind, and a trainer
# step's waits for the GPU (the whole tests/test_gpu.py runs later, in the time left)
if (( deadline - SECONDS > 60 )); then
    timeout 90 "$PYTHON" -m pytest -p no:cacheprovider tests/test_gpu.py -q -rs --tb=short -k "graph or waits" 2>&1 \
        | tee "$OUT/tests_first.txt" || echo "tests/test_gpu.py -k 'graph or waits': failures or timed out"
fi
# torch.compile of the decoder layers (the loss stays chunked, outside the compiled region), with a profile of 5
# steps: where the fastest configuration's step still goes (the goal closest at hand: 30% MFU of 40% last lease,
# when the host still waited for the GPU once per step and once per output head)
run mini_llama3_compiled --model mini_llama3 --compile --profile "$OUT/mini_llama3_compiled.profile.txt"
# What a wait per step costs where the host has the least slack: the same compiled run with the trainer waiting for
# each step's non-finite flag inside the step, as it did until the last lease (then also once per output head, for
# the loss's target rows; now it never waits: the flag is read a step later, the rows found on the host). No
# reference alongside: stepping one alternately would add a wait per step.
run mini_llama3_compiled_waits --model mini_llama3 --compile --finite-check-in-step
# torch.compile of the MoE models' decoder layers, now one graph per layer kind on CUDA (before: a break at every
# expert product, and around Gated DeltaNet's short conv and delta rule; mini_deepseekv3 compiled ran about as fast
# as eager, mini_qwen3_next slower)
run mini_deepseekv3_compiled --model mini_deepseekv3 --compile --profile "$OUT/mini_deepseekv3_compiled.profile.txt"
run mini_qwen3_next_compiled --model mini_qwen3_next --compile
# Each model eager against its transformers reference, stepped alternately in the same process
for model in mini_llama3 mini_deepseekv3 mini_qwen3_next; do
    run "$model" --model "$model" --against-reference --profile "$OUT/$model.profile.txt"
done
# The CUDA paths against their references (tests/test_gpu.py), each test capped at 60 s where pytest-timeout is
# installed, the whole set by the budget left.
per_test=$("$PYTHON" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 60")
if (( deadline - SECONDS > 20 )); then
    timeout $((deadline - SECONDS)) "$PYTHON" -m pytest -p no:cacheprovider tests/test_gpu.py -q -rs --tb=short \
        $per_test 2>&1 | tee "$OUT/tests.txt" || echo "tests/test_gpu.py: failures or timed out (see $OUT/tests.txt)"
fi
# 4x the rows per step: the per-step costs that do not grow with the batch (optimizer, launches, the host's wait)
# spread over more tokens. The goal fixes the sequence length, not the batch.
run mini_llama3_compiled_b$BIG_BATCH --model mini_llama3 --compile --batch "$BIG_BATCH"
# SFT-shaped rows (4 packed documents per row, prompts without targets, a quarter of the rows padded), eager and
# compiled: the packed-attention path (flash-attn varlen if installed, else flex), whose input the model now builds
# before its layers (compiled layers kept one graph per layer kind only without packing) and whose questions about
# the batch (padding, restarts, varlen index) are answered on the host copy instead of waiting for the GPU
run mini_llama3_packed --model mini_llama3 --packed-docs 4
run mini_llama3_packed_compiled --model mini_llama3 --packed-docs 4 --compile
# CUDA graphs: the host's launches replayed in one call (mini_deepseekv3's step has about 7k operators)
run mini_llama3_cudagraphs --model mini_llama3 --compile --compile-mode reduce-overhead
run deepseekv3_cudagraphs --model mini_deepseekv3 --compile --compile-mode reduce-overhead
# The loss's eager softmax in 1,024-token chunks: what the fused kernel and the larger chunks gain together (the
# head weight's gradient is summed in fp32 by cuBLAS in both, so this is not quite the loss before them)
MINILLM_LOSS_KERNEL=eager run mini_llama3_eager_loss --model mini_llama3 --model-arg loss_chunk_size=1024
# Packed-document attention paths (block-mask SDPA vs flex vs flash-attn varlen), in the time left; text, not JSON.
if [[ ${ATTENTION:-1} == 1 ]] && (( deadline - SECONDS > 30 )); then
    timeout $((deadline - SECONDS)) "$PYTHON" scripts/bench_attention.py --device cuda --dtype bf16 \
        --seq 1024 2048 4096 2>&1 | tee "$OUT/attention.txt" || echo "bench_attention: failed or timed out"
fi

"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = sorted(out.glob("*.json"))
if not runs:
    sys.exit("no results")
print(f"{'run':<24} {'tok/s':>10} {'MFU':>6} {'mem GiB':>8} {'ref tok/s':>10} {'ratio':>6}  step shares")
for path in runs:
    r = json.loads(path.read_text())
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    ref = f"{r['reference_tokens_per_s']:,.0f}" if "reference_tokens_per_s" in r else "-"
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
    shares = " ".join(f"{k} {100 * v:.0f}%" for k, v in r.get("shares", {}).items())
    print(f"{path.stem:<24} {r['tokens_per_s']:>10,.0f} {mfu:>6} {r['peak_memory_bytes'] / 2**30:>8.1f} "
          f"{ref:>10} {ratio:>6}  {shares}")
batches = sorted({r["batch"] for r in map(lambda p: json.loads(p.read_text()), runs)})
print(f"({r['device_name']}, bf16, batch {' or '.join(map(str, batches))} x {r['seq']}, {r['steps']} steps x "
      f"{r['rounds']} rounds)")
EOF
