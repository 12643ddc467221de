"""Counting the host waits of a training step: the operations that make the host wait for the device.

On a GPU, reading a device value on the host (``.item()``, ``bool(t)``, ``float(t)``), an operation whose output
shape depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
``repeat_interleave`` without its size) and a blocking copy between devices each stall the host until the device
has caught up; a step with none of them can be queued ahead, compiled whole and captured in a CUDA graph.
:class:`SyncCounter` counts them per kind at the aten level (a ``TorchDispatchMode``), on any device, so a CPU test
can hold a step to its budget. Host bookkeeping on tensors that live on the host on every machine (the sampler's
row indices, the teacher cache's table of known rows) runs inside :func:`on_host`, which the counter skips:
on a GPU those tensors never touch the device.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_local = threading.local()

_ALWAYS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
           "unique_consecutive", "unique_dim_consecutive", "equal", "allclose"}


@contextlib.contextmanager
def on_host():
    """Marks host-side bookkeeping on host tensors: not counted as host waits."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _devices(args) -> set[str]:
    return {a.device.type for a in args if isinstance(a, torch.Tensor)}


def sync_kind(func, args, kwargs) -> str | None:
    """The kind of host wait ``func(*args, **kwargs)`` is, or None."""
    name = func._schema.name.split("::")[-1]
    if name in _ALWAYS:
        return name
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and _has_bool_index(args[1]):
        return "mask_index"
    if name == "repeat_interleave" and kwargs.get("output_size") is None \
            and any(isinstance(a, torch.Tensor) and a.dtype != torch.bool and a.ndim for a in args[:2][-1:]):
        return "repeat_interleave"  # the repeats are a tensor: the output's size is read from the device
    if name == "_to_copy":
        src = args[0].device.type
        dst = kwargs.get("device")
        dst = torch.device(dst).type if dst is not None else src
        if dst != src and (dst == "cpu" or not kwargs.get("non_blocking", False)):
            return "blocking_copy"
    if name in ("copy_",) and len(_devices(args[:2])) > 1:
        dst, src = args[0].device.type, args[1].device.type
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if dst == "cpu" or not non_blocking:
            return "blocking_copy"
    return None


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: step()`` counts the step's host waits by kind in ``c.counts``."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(_local, "depth", 0):
            kind = sync_kind(func, args, kwargs)
            if kind is not None:
                self.counts[kind] += 1
        return func(*args, **kwargs)
