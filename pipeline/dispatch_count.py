"""Counting what a step asks of the host: aten ops that launch device work, and ops that wait for the device.

A GPU step is host-bound when the Python + dispatcher work per kernel launch exceeds the kernel's time, so the
number of launching ops per step is a CPU-countable proxy for GPU speed (issue 21). Counted with a
``TorchDispatchMode`` below autograd, so forward, backward and optimizer ops all count, on any device — the meta
device included (no memory, no arithmetic: an r100 step is counted in seconds).

- **launching**: an op that is not a view (``OpOverload.is_view``) and not a pure allocation (``empty*``):
  on CUDA each is at least one kernel launch (a few launch more; none launch fewer).
- **syncing**: an op whose output size or value the host must read (``nonzero``, ``unique``, boolean-mask
  indexing, ``item``): on CUDA each stalls the host until the device catches up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

__all__ = ["OpCounts", "count_ops", "SYNCING_OPS"]

# aten ops whose result size or value the host must wait for on CUDA (a device→host sync in the hot loop)
SYNCING_OPS = ("nonzero", "_unique", "unique_", "masked_select", "_local_scalar_dense", "item", "unique_consecutive")
_ALLOCATING = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")


@dataclass
class OpCounts:
    """Per-op-name counts of one counted call."""

    launching: Counter = field(default_factory=Counter)
    views: Counter = field(default_factory=Counter)
    syncing: list[str] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return sum(self.launching.values())

    @property
    def view_count(self) -> int:
        return sum(self.views.values())

    def top(self, n: int = 10) -> str:
        return ", ".join(f"{name} {k}" for name, k in self.launching.most_common(n))


def _is_syncing(func, args) -> bool:
    name = func.__name__
    if func is torch.ops.aten.index.Tensor and any(t is not None and t.dtype == torch.bool for t in args[1]):
        return True
    return any(name.startswith(s) for s in SYNCING_OPS)


def count_ops(fn) -> OpCounts:
    """Run ``fn()`` and count the aten ops it dispatches (see the module docstring)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = OpCounts()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if _is_syncing(func, args):
                counts.syncing.append(name)
            if func.is_view:
                counts.views[name] += 1
            elif name not in _ALLOCATING:
                counts.launching[name] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return counts
