"""Every collective this package issues goes through here, so device correctness is checked in one place.

Process groups (:func:`pipeline.distributed.init`): ``gloo`` on a CPU run, ``cpu:gloo,cuda:nccl`` on a CUDA
run, so host-side values (the preemption flag) travel over gloo without touching the GPU stream and
device tensors (embeddings, logits statistics, metrics) over NCCL. A tensor on a device the group does
not serve — the classic crash at step 1 of a first GPU run, e.g. a CPU tensor all-reduced on an
NCCL-only group — is a one-line error naming the operation and the device, raised before
``torch.distributed`` sees it. ``tests/test_collectives.py`` checks that a 2-process training run of each
procedure issues no collective outside this module (DeepSpeed's own engine aside).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def served_device_types(backend: str | None = None) -> set[str]:
    """Device types the process group's backend serves: 'gloo' → {cpu}, 'nccl' → {cuda},
    'cpu:gloo,cuda:nccl' → {cpu, cuda}."""
    backend = backend if backend is not None else str(dist.get_backend())
    served: set[str] = set()
    for part in backend.split(","):
        if ":" in part:
            device, name = part.split(":", 1)
            served.add(device.strip())
        else:
            name = part.strip()
            served.add("cuda" if name == "nccl" else "cpu")
    return served


def check_device(op: str, *tensors: torch.Tensor, backend: str | None = None) -> None:
    """Raise if a tensor lives on a device the process group does not serve."""
    served = served_device_types(backend)
    for t in tensors:
        if t.device.type not in served:
            raise RuntimeError(
                f"{op}: a tensor on {t.device} was handed to a process group with backend "
                f"'{backend or dist.get_backend()}', which serves {', '.join(sorted(served))} tensors only"
            )


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` (op: sum | max | min); returns ``t``."""
    check_device("all_reduce", t)
    dist.all_reduce(t, op=_OPS[op])
    return t


def all_gather(bufs: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
    """All-gather ``t`` into ``bufs`` (one per rank, same shape and device); returns ``bufs``."""
    check_device("all_gather", t, *bufs)
    dist.all_gather(bufs, t)
    return bufs


def barrier() -> None:
    """A barrier over the default group (no-op without one, or on one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
