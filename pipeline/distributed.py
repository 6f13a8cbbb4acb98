"""Process-group setup from torchrun or Slurm variables. Nothing happens at import time.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under ``srun`` those are
derived from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR/MASTER_PORT must be exported
by the job script (``jobs/*.sh`` does). A plain ``python -m pipeline.train`` is world size 1.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else an srun step, else a single process.

    torchrun marks its workers with TORCHELASTIC_RUN_ID; inside an srun step (SLURM_STEP_ID) the
    SLURM_* variables win over RANK/WORLD_SIZE, which sbatch may have exported from a stale shell.
    """
    if os.environ.get("SLURM_STEP_ID") and not os.environ.get("TORCHELASTIC_RUN_ID"):
        names = (("SLURM_PROCID", "RANK"), ("SLURM_NTASKS", "WORLD_SIZE"), ("SLURM_LOCALID", "LOCAL_RANK"))
    else:
        names = (("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS"), ("LOCAL_RANK", "SLURM_LOCALID"))
    rank = _env_int(*names[0], default=0)
    world = _env_int(*names[1], default=1)
    local = _env_int(*names[2], default=0)
    return rank, world, local


def init(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise the default process group (idempotent) and return who we are.

    The environment variables DeepSpeed and webdataset read (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) are filled in from Slurm's so that every library agrees.
    """
    rank, world, local = detect()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if world == 1:
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_PORT" not in os.environ:
        raise RuntimeError(
            "MASTER_PORT is not set: launch with torchrun, or export MASTER_ADDR/MASTER_PORT in the job script"
        )
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        # both devices served: device tensors over NCCL, host-side values (the preemption flag) over
        # gloo without a GPU sync; pipeline.collectives checks every tensor against this
        backend = "cpu:gloo,cuda:nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return DistInfo(rank, world, local, backend, dev)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    from pipeline import collectives

    collectives.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
