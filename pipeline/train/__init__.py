"""Training: ``python -m pipeline.train`` (:mod:`.cli`), the loop (:mod:`.trainer`), the engine — the one module
that imports DeepSpeed (:mod:`.engine`) —, the step guard (:mod:`.guard`), metrics (:mod:`.metrics`), in-training
evaluation (:mod:`.validate`), preemption (:mod:`.preempt`) and the run's checkpoint parts (:mod:`.state`).

The names other code uses are importable from here (``from pipeline.train import Trainer``)."""

from pipeline.checkpoint.manager import CheckpointWriteError
from pipeline.train.build import (
    batch_to_device,
    configure_backends,
    input_memory_format,
    resolve_precision,
    scaled_lr,
)
from pipeline.train.cli import EXIT_CHECKPOINT, EXIT_DIVERGED, EXIT_STOPPED, exit_now, kill_workers, main
from pipeline.train.guard import TrainingDiverged
from pipeline.train.trainer import Trainer

__all__ = [
    "EXIT_CHECKPOINT",
    "EXIT_DIVERGED",
    "EXIT_STOPPED",
    "CheckpointWriteError",
    "Trainer",
    "TrainingDiverged",
    "batch_to_device",
    "configure_backends",
    "exit_now",
    "input_memory_format",
    "kill_workers",
    "main",
    "resolve_precision",
    "scaled_lr",
]
