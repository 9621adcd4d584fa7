"""Answers computed from a tensor, kept for that tensor as long as it is unchanged.

The questions a forward asks of its batch (is the mask padded, do the positions restart, where do the packed
documents start) read the device: on a GPU each one waits for all queued work. Several places of one forward ask
the same question of the same tensor (the attention mask's builders, the MoE routing, every Gated DeltaNet layer);
`per_tensor` answers it once. The answers are kept beside the tensor object, weakly (they go with it; a copy asks
again), and keyed by its in-place version, so a tensor changed in place is asked again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

T = TypeVar("T")

_ANSWERS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> {(question, version): answer}


def per_tensor(t: torch.Tensor, question: str, answer: Callable[[torch.Tensor], T]) -> T:
    """`answer(t)`, computed once per tensor object, in-place version and `question`. Inference-mode tensors keep no
    version to tell an in-place change by, and compiled code cannot keep a side table: both are asked each time."""
    if torch.compiler.is_compiling() or t.is_inference():
        return answer(t)
    answers = _ANSWERS.setdefault(t, {})
    key = (question, t._version)
    if key not in answers:
        answers[key] = answer(t)
    return answers[key]
