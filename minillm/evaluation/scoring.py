"""Sum of token negative log-likelihoods over many token sequences: the one loop perplexity and chat loss share.

A sequence is a pair (`input_ids`, `targets`) of equal length: position t's logits are scored against
`targets[t]` (already shifted by the caller; -100 means "not scored"). Callers decide what is context and what is
scored; this module only batches and sums.

Notable choices:
- Sequences are sorted by length before batching, so a batch pads only to the longest of similar lengths. The
  totals are sums, so order does not matter.
- Right padding with an attention mask, the layout every causal LM handles (ours and transformers' alike).
- Logits come back in the model's dtype; the log-softmax runs in float32 one row at a time, so peak extra memory
  is one row's `(L, V)` float32 block, not the batch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from minillm.progress import stderr_progress

if TYPE_CHECKING:  # torch is imported inside the functions, so reading options and files stays fast
    import torch

IGNORE_INDEX = -100


@dataclass
class NLLSum:
    """Totals over the scored tokens: NLL in nats and how many tokens it covers."""

    nll: float = 0.0
    tokens: int = 0


def progress_bar(enabled: bool = True) -> Progress:
    """The evaluation's progress bar (`minillm.progress.stderr_progress`): stdout stays clean for the result table."""
    return stderr_progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        enabled=enabled,
    )


def sum_nll(
    model: torch.nn.Module,
    sequences: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    description: str = "scoring",
    progress: bool = True,
) -> NLLSum:
    """Total NLL (nats) of every scored target in `sequences`, in batches of `batch_size`."""
    import torch

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]), reverse=True)
    total = NLLSum()
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(order), rate="")
        for start in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[start : start + batch_size]]
            with torch.inference_mode():
                nll, count = _batch_nll(model, batch, pad_id, device)
            total.nll += nll
            total.tokens += count
            bar.update(task, advance=len(batch), rate=f"{total.tokens:,} tokens")
    return total


def _batch_nll(
    model: torch.nn.Module, batch: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, L)
    targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, L)
    for row, (ids, tgt) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(tgt)] = torch.tensor(tgt)
        attention_mask[row, : len(ids)] = 1
    input_ids, targets, attention_mask = input_ids.to(device), targets.to(device), attention_mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, L, V)
    nll = 0.0
    for row in range(len(batch)):
        nll += F.cross_entropy(
            logits[row].float(), targets[row], ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()  # (L, V) fp32 for one row only
    return nll, int((targets != IGNORE_INDEX).sum().item())
