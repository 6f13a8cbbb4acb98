"""Checkpoints: the format on disk (:mod:`.format`), the manager that writes and restores them from the run's
stateful parts (:mod:`.manager`), and loading a network's weights for evaluation, export and fine-tuning
(:mod:`.load`). ``from pipeline import checkpoint as ckpt`` gives the format and loading functions by name."""

from pipeline.checkpoint.format import (
    CHECKSUMS,
    LATEST,
    checkpoints,
    complete,
    finalize,
    holds_network,
    latest_or_none,
    load_json,
    resolve,
    resolve_verified,
    save_json,
    step_name,
    step_of,
    tmp_name,
    verify,
    write_checksums,
)
from pipeline.checkpoint.load import (
    describe,
    find_checkpoint,
    load_network,
    load_state_strict,
    load_weights,
    read_state_dict,
)

__all__ = [
    "CHECKSUMS",
    "LATEST",
    "checkpoints",
    "complete",
    "describe",
    "finalize",
    "find_checkpoint",
    "holds_network",
    "latest_or_none",
    "load_json",
    "load_network",
    "load_state_strict",
    "load_weights",
    "read_state_dict",
    "resolve",
    "resolve_verified",
    "save_json",
    "step_name",
    "step_of",
    "tmp_name",
    "verify",
    "write_checksums",
]
