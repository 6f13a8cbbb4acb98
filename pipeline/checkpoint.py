"""Checkpoints that are atomic and do not pin resume to one world size.

A checkpoint is one directory ``<output.dir>/checkpoints/step_0000100/`` holding

- ``config.yaml``   the resolved config it was trained with (evaluation rebuilds the recipe from it)
- ``model.pt``      state_dict of ``recipe.inference_backbone()`` (what eval/export load)
- ``recipe.pt``     state_dict of the whole recipe model (backbone + heads + recipe parameters)
- ``classifier.pt`` the FULL class-centre matrix and its optimizer state, gathered from all ranks,
                    so that any world size can re-shard it
- ``trainer.json``  step counters, world size, the data position
- ``deepspeed/``    DeepSpeed's own engine checkpoint (backbone optimizer states, per rank)

All ranks write into ``.tmp_step_0000100`` and rank 0 renames it to the final name after a
barrier, then rewrites ``latest`` (also via rename): a directory with a final name is complete.
Resuming with the same world size restores everything exactly; with another world size the
backbone optimizer moments (partitioned by ZeRO) are re-initialised and a warning says so.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data_prep.manifest import atomic_write_text

LATEST = "latest"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def tmp_name(step: int) -> str:
    return f".tmp_{step_name(step)}"


def finalize(root: Path, step: int, keep: int) -> Path:
    """Rank 0: rename the temporary directory, point ``latest`` at it, prune old ones."""
    tmp, final = root / tmp_name(step), root / step_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    if keep > 0:
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path_or_root: str | Path) -> Path:
    """A checkpoint directory, or a run's checkpoint root / output dir (→ its ``latest``)."""
    p = Path(path_or_root)
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            return root / (root / LATEST).read_text().strip()
    if (p / "trainer.json").is_file():
        return p
    raise FileNotFoundError(f"{p}: no checkpoint here (expected a step_* directory or a 'latest' file)")


def save_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
