"""Preemption: a stop signal ends the run cleanly at a step boundary — every rank stops at the same step, the
trainer writes a checkpoint, and under Slurm the job is requeued (``scontrol requeue``; the requeued job resumes
from ``latest``, SLURM_RESTART_COUNT > 0)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

from pipeline import collectives, distributed

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
_received: dict[str, int | None] = {"signal": None}  # the first stop signal this process received


def install_signal_handlers() -> None:
    """SIGUSR1 (Slurm's --signal before the time limit), SIGTERM (scancel, torchrun's teardown, a process-group
    kill) or SIGINT (Ctrl-C): finish the step, checkpoint, requeue under Slurm. Installed first thing in main()
    so a signal during start-up is not fatal. DataLoader workers ignore these signals
    (pipeline.data.torch_loader), so a signal to the whole process group cannot kill them under the trainer."""

    def handler(signum, _frame):
        if signum == signal.SIGINT and _received["signal"] is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now, without the checkpoint
        _received["signal"] = signum
        if signum == signal.SIGINT:
            print("[train] SIGINT: finishing this step and writing a checkpoint (Ctrl-C again to abort)", flush=True)

    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. some launchers)
            pass


def stop_requested(world_size: int) -> bool:
    """Whether any rank received a stop signal (every rank gets the same answer, so all stop at this step)."""
    # A host-side value: a CPU tensor over gloo (served beside NCCL on CUDA runs), so this per-step check never
    # waits for the GPU stream.
    flag = torch.tensor([1.0 if _received["signal"] else 0.0])
    if world_size > 1:
        collectives.all_reduce(flag)
    return bool(flag.item() > 0)


def requeue(step: int) -> None:
    """After the stop checkpoint (rank 0): say so, and under Slurm requeue the job when the signal was SIGUSR1."""
    job = os.environ.get("SLURM_JOB_ID")
    if not distributed.is_main():
        return
    print(f"[train] stopped by signal at step {step}; checkpoint written", flush=True)
    if job and _received["signal"] == signal.SIGUSR1:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"[train] scontrol requeue {job} failed: {proc.stderr.strip()}", file=sys.stderr, flush=True)
