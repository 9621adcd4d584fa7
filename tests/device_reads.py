"""Counting, on a CPU, the waits a GPU step would make: reads of device memory by the host.

On a GPU the host waits for all queued work whenever it reads a value computed on the device (`item`, `bool`,
`tolist`) or runs an op whose output size depends on the data (`nonzero`, `unique`, boolean indexing). On the CPU
nothing waits, so `EmulatedDevice` tells the two memories apart itself: a tensor is "on the device" when it is
marked so (a batch moved by `tensor_memo.to_device` or by `.to(device)`, the model's parameters), when an op
computed it from a device tensor, or when a factory op (`zeros`, `arange`) made it, as the model code's `device=`
would on a GPU. It is host memory when the test made it, or when `tensor_memo` computed it from host copies. Each op that reads device memory
is recorded. tests/test_gpu.py counts the real waits on a GPU (CUDA's sync debug mode).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from minillm.models.layers import tensor_memo

aten = torch.ops.aten
# ops whose result the host must see: a value read into Python, or an output sized by the data
READS = {
    aten._local_scalar_dense.default: "read",  # item, bool, int, float
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.bincount.default: "bincount",
}


def _bool_index(args, kwargs) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


# ops that wait only in some calls: indexing with a boolean mask (a `nonzero` inside), `repeat_interleave` of
# tensor counts without `output_size`
SIZED_BY_DATA = {
    aten.index.Tensor: _bool_index,
    aten.index_put.default: _bool_index,
    aten.index_put_.default: _bool_index,
    aten._index_put_impl_.default: _bool_index,
    aten.repeat_interleave.Tensor: lambda args, kwargs: kwargs.get("output_size") is None,
}


class EmulatedDevice(TorchDispatchMode):
    """Inside `with EmulatedDevice(monkeypatch) as device:`, `device.reads` lists the ops that would wait on a GPU
    ("nonzero", "read", ...). `device.move(t)` is a trainer's copy of a host batch tensor to the device."""

    def __init__(self, monkeypatch, model: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.reads: list[str] = []
        self._device = WeakIdKeyDictionary()
        self._host_depth = 0
        self._in_kernel = 0
        for p in [] if model is None else model.parameters():
            self._device[p] = True
        monkeypatch.setattr(tensor_memo, "_is_host", lambda t: t not in self._device)
        monkeypatch.setattr(tensor_memo, "_copy_from_host", lambda host, device: self._mark(host.clone()))
        on_host = tensor_memo._on_host

        def host_side(compute, *tensors):
            self._host_depth += 1
            try:
                return on_host(compute, *tensors)
            finally:
                self._host_depth -= 1

        monkeypatch.setattr(tensor_memo, "_on_host", host_side)
        real_tolist = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: self._note("tolist", [t]) or real_tolist(t))
        real_to = torch.Tensor.to

        def to(t, *args, **kwargs):  # `.to(device)` of host memory: a copy to the device, without a host copy
            out = real_to(t, *args, **kwargs)
            names_device = "device" in kwargs or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args)
            if names_device and t not in self._device and not self._host_depth:
                out = self._mark(out.clone() if out is t else out)
            return out

        monkeypatch.setattr(torch.Tensor, "to", to)

    def _mark(self, t: torch.Tensor) -> torch.Tensor:
        self._device[t] = True
        return t

    def move(self, t: torch.Tensor) -> torch.Tensor:
        """`t` copied to the device, `t` kept as its host copy (what the trainer does with each batch tensor)."""
        return tensor_memo.to_device(t, "cpu")

    def as_kernel(self, fn):
        """`fn` run as a device kernel: what it reads of device memory is the kernel's business, not a wait of the
        host (for stand-ins of flash-attn or fla, which read their `cu_seqlens` in Python)."""
        def kernel(*args, **kwargs):
            self._in_kernel += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._in_kernel -= 1
        return kernel

    def _note(self, name: str, tensors: list) -> None:
        if not self._in_kernel and any(isinstance(t, torch.Tensor) and t in self._device for t in tensors):
            self.reads.append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in READS:
            self._note(READS[func], inputs)
        elif func in SIZED_BY_DATA and SIZED_BY_DATA[func](args, kwargs):
            self._note(func.__name__.split(".")[0], inputs)
        out = func(*args, **kwargs)
        on_device = any(t in self._device for t in inputs) or (not inputs and self._host_depth == 0)
        if on_device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._device[t] = True
        return out
