"""Collators: turn a list of dataset items into a training batch, padded (with a mask) or packed (with positions).

- `PaddedCollator(pad_id)`: right-pads each row to the longest in the batch; `attention_mask` is 1 on real tokens,
  labels are -100 on padding. For pretraining windows (all the same length) it just stacks.
- `PackedCollator()`: rows that already hold several conversations (from `SFTDataset` built with `--pack`). The
  model derives document boundaries from `position_ids` restarting at 0. Rows shorter than the longest are padded
  with one more "document" (positions 0.., labels -100), which nothing attends across, and which `attention_mask`
  (0 there) marks as padding: without it the MoE models counted the pad tokens as expert load (all of one id, so
  all routed alike: the bias update and the balance losses pushed against a load that was not there).
  `return_cu_seqlens=True` adds the flattened cumulative lengths (`cu_seqlens`, int32) and `max_seqlen`, the form
  varlen attention kernels take.

Both take `bucket_up_to`: None pads to the batch's longest row; a length N pads to that rounded up to the next
`row_bucket` size (multiples of 32, then 8 sizes per doubling), at most N. The trainer sets it to `--seq-len` on a CPU
in bf16/fp16, where oneDNN compiles a kernel for every new matrix shape: with the longest row changing every step,
mini_llama3's bf16 step took 1.5x as long and the process grew by about 15 MiB a step (README, "SFT batches in bf16
on a CPU").
"""

from __future__ import annotations

import torch

from minillm.models.layers.linear import row_bucket


def batch_length(items: list[dict], bucket_up_to: int | None = None) -> int:
    """The padded length of a batch: its longest row, or that rounded up to `row_bucket`, at most `bucket_up_to`."""
    longest = max(len(item["input_ids"]) for item in items)
    if bucket_up_to is None:
        return longest
    return max(longest, min(row_bucket(longest), bucket_up_to))


def _pad_stack(rows: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)  # (B, L)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


class PaddedCollator:
    """Right padding to the batch's longest row: input_ids (pad_id), labels (-100), attention_mask (1 = real)."""

    def __init__(self, pad_id: int, bucket_up_to: int | None = None) -> None:
        self.pad_id = pad_id
        self.bucket_up_to = bucket_up_to

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        length = batch_length(items, self.bucket_up_to)
        ids = [item["input_ids"] for item in items]
        labels = [item.get("labels", item["input_ids"]) for item in items]
        mask = [torch.ones(len(x), dtype=torch.long) for x in ids]
        return {
            "input_ids": _pad_stack(ids, length, self.pad_id),  # (B, L)
            "labels": _pad_stack(labels, length, -100),  # (B, L)
            "attention_mask": _pad_stack(mask, length, 0),  # (B, L)
        }


class PackedCollator:
    """Packed rows: input_ids, labels, position_ids (restarting per conversation), attention_mask (0 = padding)."""

    def __init__(self, pad_id: int = 0, return_cu_seqlens: bool = False, bucket_up_to: int | None = None) -> None:
        self.pad_id = pad_id
        self.return_cu_seqlens = return_cu_seqlens
        self.bucket_up_to = bucket_up_to

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        length = batch_length(items, self.bucket_up_to)
        positions = []
        for item in items:
            pos = item.get("position_ids")
            if pos is None:
                pos = torch.arange(len(item["input_ids"]))
            pad = length - len(pos)
            positions.append(torch.cat([pos, torch.arange(pad)]) if pad else pos)  # padding: its own document
        real = [torch.ones(len(item["input_ids"]), dtype=torch.long) for item in items]
        batch = {
            "input_ids": _pad_stack([item["input_ids"] for item in items], length, self.pad_id),  # (B, L)
            "labels": _pad_stack([item["labels"] for item in items], length, -100),  # (B, L)
            "position_ids": torch.stack(positions).long(),  # (B, L)
            "attention_mask": _pad_stack(real, length, 0),  # (B, L)
        }
        if self.return_cu_seqlens:
            flat = batch["position_ids"].reshape(-1)  # (B*L,)
            starts = torch.nonzero(flat == 0).flatten()
            cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
            batch["cu_seqlens"] = cu
            batch["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
        return batch
