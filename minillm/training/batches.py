"""Global batches: which samples each rank trains on at each step, and how many targets the step has.

One optimizer step consumes one *global batch* of `global_batch_size` sample indices, drawn from a seeded,
resumable permutation (an endless stream over epochs). Every rank draws the same indices, keeps its own contiguous
share (`global / world` rows) and splits it into `accumulation` micro-batches of `micro_batch_size` rows. So the
data of a step depends only on the seed and the step, never on the world size or the accumulation: that is what
makes 1 process x accumulation 4, 2 processes x accumulation 2 and 1 process x 1 big batch train on the same data.

The data position is the sampler's state after the last global batch; a checkpoint stores it and a resumed run
continues at the exact next sample.

On a GPU, `Prefetcher` builds the next steps' micro-batches in a background thread, in pinned host memory, while
the current step runs: the step never waits for collation, and the copy to the GPU can overlap with compute.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

IGNORE_INDEX = -100


class GlobalBatches:
    """Iterator of this rank's micro-batches, one list of `accumulation` collated batches per optimizer step."""

    def __init__(
        self,
        dataset,
        sampler,
        collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]],
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
    ):
        per_rank = global_batch_size // world_size
        assert per_rank * world_size == global_batch_size and per_rank % micro_batch_size == 0
        self.dataset, self.sampler, self.collate = dataset, sampler, collate
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.per_rank = rank, per_rank
        self._stream = self._indices()

    def _indices(self) -> Iterator[int]:
        while True:  # the sampler yields the rest of its current epoch, then moves to the next one
            yield from iter(self.sampler)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of this rank for the next optimizer step."""
        indices = [next(self._stream) for _ in range(self.global_batch_size)]
        mine = indices[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        return [
            self.collate([self.dataset[i] for i in mine[start:start + self.micro_batch_size]])
            for start in range(0, self.per_rank, self.micro_batch_size)
        ]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._stream = self._indices()


class Prefetcher:
    """`GlobalBatches` with the next `depth` steps built ahead in a background thread (the same batches, in order).

    The data position it reports (`state_dict`) is that of the last step handed out, not of the steps built ahead,
    so a checkpoint taken after step s resumes at step s + 1 exactly as without prefetching. Load a resumed
    position into the `GlobalBatches` before wrapping it. `pin_memory` (CUDA only) puts the batches in page-locked
    memory, so `tensor.to("cuda", non_blocking=True)` copies asynchronously.
    """

    def __init__(self, batches: GlobalBatches, depth: int = 2, pin_memory: bool = False) -> None:
        self.batches, self.pin_memory = batches, pin_memory
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._state = copy.deepcopy(batches.state_dict())  # the position before the first step
        self._thread = threading.Thread(target=self._produce, name="minillm-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                micro_batches = self.batches.next_step()
                if self.pin_memory:
                    micro_batches = [{k: v.pin_memory() for k, v in b.items()} for b in micro_batches]
                item = (micro_batches, copy.deepcopy(self.batches.state_dict()))
                while not self._stop.is_set():
                    try:
                        self._ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the training loop, which raises it where a step was expected
            self._ready.put((err, None))

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of this rank for the next optimizer step (waits only if the thread is behind)."""
        micro_batches, state = self._ready.get()
        if isinstance(micro_batches, BaseException):
            raise micro_batches
        self._state = state
        return micro_batches

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue: it polls the stop flag)."""
        self._stop.set()
        self._thread.join(timeout=5)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of `batch` that the LM loss predicts (labels are unshifted; the model shifts them).

    Position i predicts token i+1: a target counts when its label is not -100 and, in packed rows, when it does not
    start a new document (position id 0). This matches the models' own count, so `num_items_in_batch` is exact.
    """
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE_INDEX
    if "position_ids" in batch:
        valid &= batch["position_ids"][:, 1:] != 0
    return int(valid.sum())


class Permutation:
    """A seeded permutation per epoch with a resumable position (same contract as `minillm.data.ResumableSampler`).

    Used for data sets that bring no sampler of their own (tests, user-supplied datasets).
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        while self.index < self.num_samples:
            self.index += 1
            yield order[self.index - 1]
        self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
