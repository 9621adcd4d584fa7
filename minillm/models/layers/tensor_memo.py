"""What a forward needs to know about its batch, answered without making the host wait for the device.

The questions a forward asks of its batch (is the mask padded, do the positions restart, where do the packed
documents start, which rows have a target) read the device: on a GPU each one waits for all queued work, and a
wait in the middle of a step lets the device run dry while the host queues what comes next. Two things avoid that:

- **Host copies.** The trainer moves each batch from host memory to the device and keeps the host tensor as the
  device tensor's host copy (`to_device`). A question asked of a tensor with a host copy is answered on the host
  copy, and the answer (if it is a tensor) goes to the device with a non-blocking copy. Tensors computed from the
  batch inside the forward (the shifted targets, document starts) get host copies too, when they are built with
  `with_host_copy`. Nothing else needs to change: a tensor without a host copy is read on the device, as before.
- **One answer per tensor** (`per_tensor`). Several places of one forward ask the same question of the same tensor
  (the attention mask's builders, the MoE routing, every Gated DeltaNet layer); it is answered once.

Answers and host copies are kept beside the tensor object, weakly (they go with it; a copy asks again), and keyed
by its in-place version (and the host copy's), so a tensor changed in place is asked again, on the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

T = TypeVar("T")

_ANSWERS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> {(question, version): answer}
_HOST_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # device tensor -> (its version, host copy, copy's version)


def _is_host(t: torch.Tensor) -> bool:
    """Whether reading `t` waits for nothing (a CPU tensor). Tests that run the GPU's paths on a CPU replace it."""
    return t.device.type == "cpu"


def _on_host(compute: Callable[..., T], *tensors: torch.Tensor | None) -> T:
    """`compute(*tensors)` where every tensor is host memory: the one place host-side answers are computed (tests
    that emulate a device on the CPU tell these computations apart from the device's by it)."""
    return compute(*tensors)


def _untracked(t: torch.Tensor) -> bool:
    """Tensors nothing is kept for: compiled code cannot keep a side table, and inference-mode tensors keep no
    version to tell an in-place change by."""
    return torch.compiler.is_compiling() or t.is_inference()


def keep_host_copy(t: torch.Tensor, host: torch.Tensor) -> None:
    """Record that `host` (host memory) holds the values of the device tensor `t`, e.g. the batch `t` was copied
    from. Until either changes in place, questions about `t` are answered from `host`."""
    if _is_host(t) or not _is_host(host) or _untracked(t) or _untracked(host):
        return
    _HOST_COPIES[t] = (t._version, host, host._version)


def host_copy(t: torch.Tensor) -> torch.Tensor | None:
    """`t`'s values in host memory, read without waiting for the device: `t` itself when it is host memory, its
    host copy when it has one and neither has changed since, else None."""
    if _is_host(t):
        return t
    if _untracked(t):
        return None
    entry = _HOST_COPIES.get(t)
    if entry is None:
        return None
    version, host, host_version = entry
    return host if t._version == version and host._version == host_version else None


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`, `t` kept as the result's host copy. From host memory to a CUDA GPU the host does not wait
    (pinned memory, a non-blocking copy). A tensor already on a device is moved as `.to` moves it."""
    if not _is_host(t):
        return t.to(device)
    moved = _copy_from_host(t, torch.device(device))
    if moved is not t:
        keep_host_copy(moved, t)
    return moved


def _copy_from_host(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The copy itself (`host` when `device` is the host; tests that emulate a device on the CPU replace it)."""
    if device.type != "cuda":  # other devices: a plain copy (non-blocking copies from pageable memory are unsafe)
        return host.to(device)
    if not host.is_pinned():  # a copy from pageable memory would wait for the device's queued work
        host = host.contiguous().pin_memory()  # (an expanded view cannot be pinned as it is)
    return host.to(device, non_blocking=True)


def _answer_to_device(answer, device: torch.device):
    """An answer computed on the host, its tensors (alone, in a tuple or in a dataclass) moved to `device`."""
    if isinstance(answer, torch.Tensor):
        return to_device(answer, device)
    if isinstance(answer, tuple):
        parts = [_answer_to_device(part, device) for part in answer]
        return type(answer)(*parts) if hasattr(answer, "_fields") else tuple(parts)  # a NamedTuple stays one
    if dataclasses.is_dataclass(answer):
        moved = {f.name: _answer_to_device(getattr(answer, f.name), device) for f in dataclasses.fields(answer)}
        return dataclasses.replace(answer, **moved)
    return answer


def per_tensor(t: torch.Tensor, question: str, answer: Callable[[torch.Tensor], T]) -> T:
    """`answer(t)`, computed once per tensor object, in-place version and `question`; on `t`'s host copy when it
    has one (tensors in the answer, alone or in a tuple or dataclass, are then moved to `t`'s device)."""
    def compute() -> T:
        host = host_copy(t)
        if host is None or host is t:
            return answer(t)
        return _answer_to_device(_on_host(answer, host), t.device)

    if _untracked(t):
        return compute()
    answers = _ANSWERS.setdefault(t, {})
    key = (question, t._version)
    if key not in answers:
        answers[key] = compute()
    return answers[key]


def with_host_copy(compute: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    """`compute(*tensors)` (None passes through); when the inputs that are tensors all have host copies, the
    result gets `compute` of those as its own, so questions about it need not wait either. `compute` must be
    device-agnostic and cheap: it runs twice."""
    out = compute(*tensors)
    if not _is_host(out) and not _untracked(out):
        hosts = [None if t is None else host_copy(t) for t in tensors]
        if all(h is not None for h, t in zip(hosts, tensors, strict=True) if t is not None):
            keep_host_copy(out, _on_host(compute, *hosts))
    return out
