"""Every collective this package issues goes through here, so device correctness is checked in one place.

Process groups (:func:`pipeline.distributed.init`): ``gloo`` on a CPU run, ``cpu:gloo,cuda:nccl`` on a CUDA
run, so host-side values (the preemption flag) travel over gloo without touching the GPU stream and
device tensors (embeddings, logits statistics, metrics) over NCCL. A tensor on a device the group does
not serve — the classic crash at step 1 of a first GPU run, e.g. a CPU tensor all-reduced on an
NCCL-only group — is a one-line error naming the operation and the device, raised before
``torch.distributed`` sees it. ``tests/integration/test_collectives.py`` checks that a 2-process training run of each
procedure issues no collective outside this module (DeepSpeed's own engine aside).
"""

from __future__ import annotations

import os
import sys
import threading
import time

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
    with _waiting("all_reduce"):
        dist.all_reduce(t, op=_OPS[op])
    return t


def all_gather(bufs: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
    """All-gather ``t`` into ``bufs`` (one per rank, same shape and device); returns ``bufs``."""
    check_device("all_gather", t, *bufs)
    with _waiting("all_gather"):
        dist.all_gather(bufs, t)
    return bufs


def barrier() -> None:
    """A barrier over the default group (no-op without one, or on one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        with _waiting("barrier"):
            dist.barrier()


# --------------------------------------------------------------------------- the watchdog
# Every collective above takes a sequence number. A daemon thread per rank publishes (sequence, step) in the
# process group's key-value store every few seconds (a CPU round trip off the training thread: no per-step
# cost, no GPU sync). When this rank has waited inside one collective longer than `collective_warn_s`, it
# prints the ranks whose sequence is behind its own: a stopped or stalled rank is named within minutes
# instead of the whole job waiting silently for the collective timeout.

_state = {"op": None, "since": 0.0, "seq": 0, "step": 0, "warned": False}
_watchdog_started = False


class _waiting:
    def __init__(self, op: str):
        self.op = op

    def __enter__(self):
        _state.update(op=self.op, since=time.monotonic(), warned=False, seq=_state["seq"] + 1)

    def __exit__(self, *exc):
        _state["op"] = None


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store (e.g. one process without env init): no watchdog
        return None


def publish_step(step: int) -> None:
    """Record this rank's optimizer step (shown beside a rank that is behind)."""
    _state["step"] = step


def ranks_behind(store, me: int, world: int) -> dict[int, tuple[int, int]]:
    """{rank: (its published collective sequence, its step)} for every rank behind this one's sequence."""
    behind = {}
    for r in range(world):
        key = f"lowq/progress/{r}"
        if r == me:
            continue
        seq, step = (int(v) for v in store.get(key).decode().split()) if store.check([key]) else (0, 0)
        if seq < _state["seq"]:
            behind[r] = (seq, step)
    return behind


def start_watchdog(warn_after_s: float) -> None:
    """Start the daemon thread (once; only with more than one rank)."""
    global _watchdog_started
    store = _store()
    if _watchdog_started or not dist.is_initialized() or dist.get_world_size() == 1 or store is None:
        return
    _watchdog_started = True
    rank, world = dist.get_rank(), dist.get_world_size()
    period = max(0.5, min(10.0, warn_after_s / 4))

    def loop():
        while True:
            time.sleep(period)
            try:
                store.set(f"lowq/progress/{rank}", f"{_state['seq'] - (1 if _state['op'] else 0)} {_state['step']}")
            except Exception:  # noqa: BLE001 - the store went away (job ending)
                return
            op, since = _state["op"], _state["since"]
            if op is None or _state["warned"] or time.monotonic() - since < warn_after_s:
                continue
            _state["warned"] = True
            try:
                behind = ranks_behind(store, rank, world)
            except Exception as exc:  # noqa: BLE001 - the store itself is unreachable
                detail = f"unknown (the store did not answer: {type(exc).__name__})"
            else:
                detail = ", ".join(f"rank {r} at step {st}" for r, (_, st) in sorted(behind.items())) or (
                    "no rank by its collectives (one may be stuck inside a collective of its own)"
                )
            print(
                f"[dist] rank {rank} (pid {os.getpid()}) has waited {time.monotonic() - since:.0f} s in {op} "
                f"at step {_state['step']}; behind: {detail}",
                file=sys.stderr,
                flush=True,
            )

    threading.Thread(target=loop, name="lowq-collective-watchdog", daemon=True).start()
