"""Evaluation of any causal LM directory: perplexity / bits per byte on held-out text, chat evaluation, and
multiple-choice benchmarks (C-Eval, CMMLU, MMLU, ARC style) scored by log-likelihood.

    minillm eval ppl --model runs/pretrain_mini_llama3_*/final --data heldout.parquet --json ppl.json
    minillm eval chat --model runs/sft_mini_llama3_*/final --data heldout_chat.jsonl
    minillm eval mc --model runs/pretrain_mini_llama3_*/final --data ceval_val.jsonl

Modules:
- `loading`: find and load a model directory (ours or a native transformers architecture) and pick a device.
- `scoring`: the one batched loop that sums token negative log-likelihoods; everything else builds its inputs.
- `perplexity`: documents -> windows -> NLL; reports loss, perplexity and bits per byte.
- `chat`: teacher-forced loss on assistant tokens, and greedy exact match on short answers.
- `multiple_choice`: accuracy (acc, acc_norm, acc_bytes, as lm-evaluation-harness defines them) per subject.
- `report`: tables for the terminal and JSON files.
"""

from typing import Any

__all__ = ["evaluate_chat", "evaluate_multiple_choice", "evaluate_perplexity"]


def __getattr__(name: str) -> Any:
    """Import lazily: `loading` and `report` stay usable (and fast) without importing torch."""
    if name == "evaluate_perplexity":
        from minillm.evaluation.perplexity import evaluate_perplexity

        return evaluate_perplexity
    if name == "evaluate_chat":
        from minillm.evaluation.chat import evaluate_chat

        return evaluate_chat
    if name == "evaluate_multiple_choice":
        from minillm.evaluation.multiple_choice import evaluate_multiple_choice

        return evaluate_multiple_choice
    raise AttributeError(f"module 'minillm.evaluation' has no attribute {name!r}")
