"""A seeded, resumable sampler: a fresh permutation each epoch, and a position that checkpoints can save.

The order of epoch `e` is `torch.randperm(num_samples)` drawn from a generator seeded with `seed + e`, so it depends
only on (seed, epoch) and is the same on every rank and after a restart. `state_dict()` holds (epoch, index);
after `load_state_dict`, iteration continues at exactly the next unseen sample. The trainer advances the position
by consuming the iterator (each yielded index counts as seen); with several data-parallel ranks, shard the indices
after this sampler (e.g. Accelerate's dataloader preparation) so all ranks share one order.

Note: a `DataLoader` with worker processes draws indices ahead of training (prefetching), so `state_dict()` taken
mid-epoch may be ahead of what was trained on. A trainer that needs exactness saves the number of samples it
actually consumed: `{"epoch": sampler.epoch, "index": consumed}` is a valid state for `load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded per-epoch permutation of range(num_samples) with an exact resume position."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # samples of the current epoch already yielded

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[int]:
        """Yield the rest of the current epoch, then move to the next epoch (a new `iter()` starts it)."""
        order = self._order(self.epoch)
        while self.index < self.num_samples:
            i = int(order[self.index])
            self.index += 1
            yield i
        self.epoch += 1
        self.index = 0

    def __len__(self) -> int:
        return self.num_samples - self.index

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples, but the dataset has {self.num_samples}"
            )
        self.seed = state.get("seed", self.seed)
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
