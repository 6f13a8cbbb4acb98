"""Checkpoints that are atomic and do not pin resume to one world size.

A checkpoint is one directory ``<output.dir>/checkpoints/step_0000100/`` holding

- ``config.yaml``   the resolved config it was trained with (evaluation rebuilds the recipe from it)
- ``model.pt``      state_dict of the FaceNetwork (trunk + inserts + head; what eval/export load)
- ``recipe.pt``     state_dict of the whole training procedure (the network + any procedure parameters)
- ``classifier.pt`` the FULL class-centre matrix and its optimizer state, gathered from all ranks,
                    so that any world size can re-shard it
- ``optimizer_full.pt`` the backbone's optimizer state by parameter name (fp32 master weights, moments,
                    step), assembled from ZeRO's per-rank partitions, so that any world size can re-partition it
- ``trainer.json``  step counters, world size, the data position
- ``deepspeed/``    DeepSpeed's own engine checkpoint (backbone optimizer states, per rank)

All ranks write into ``.tmp_step_0000100`` and rank 0 renames it to the final name after a
barrier, then rewrites ``latest`` (also via rename): a directory with a final name is complete.
Resuming with the same world size restores everything from DeepSpeed's own files; with another world size the
backbone comes from ``recipe.pt`` + ``optimizer_full.pt`` and the classifier from ``classifier.pt``, exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from data_prep.manifest import atomic_write_text, sha256_file
from pipeline.config import ConfigError

LATEST = "latest"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def tmp_name(step: int) -> str:
    return f".tmp_{step_name(step)}"


def step_of(path: Path) -> int | None:
    """The step number of a ``step_0000100`` directory name, else None."""
    name = Path(path).name
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def holds_network(path: Path) -> bool:
    """The two files every network loader reads: ``config.yaml`` and ``model.pt``."""
    return all((Path(path) / f).is_file() for f in ("model.pt", "config.yaml"))


def complete(path: Path) -> bool:
    """A finished checkpoint directory: final name and the files every loader reads (resuming also verifies
    the rest against checksums.json)."""
    return step_of(path) is not None and holds_network(path)


def checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first by step number (not by name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and complete(p)), key=step_of)


def finalize(root: Path, step: int, keep: int) -> Path:
    """Rank 0: rename the temporary directory, point ``latest`` at it, prune old ones.

    Pruning keeps the ``keep`` newest checkpoints by step number among those at or before ``step`` (this
    run's lineage; a directory of a later step, left by an abandoned earlier run, is never touched) and never
    the one just written."""
    tmp, final = root / tmp_name(step), root / step_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    ours = [p for p in checkpoints(root) if step_of(p) <= step and p != final]
    for old in ours[: max(0, len(ours) - (max(1, keep) - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path_or_root: str | Path) -> Path:
    """A checkpoint directory, or a run's checkpoint root / output dir (→ its ``latest``).

    A ``latest`` that names a missing or incomplete directory falls back, with a warning, to the newest
    complete checkpoint by step number."""
    p = Path(path_or_root)
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            named = root / (root / LATEST).read_text().strip()
            if complete(named):
                return named
            found = checkpoints(root)
            if found:
                warnings.warn(
                    f"{root / LATEST} names {named.name}, which is missing or incomplete: using {found[-1].name}, "
                    "the newest complete checkpoint",
                    stacklevel=2,
                )
                return found[-1]
            raise FileNotFoundError(
                f"{root / LATEST} names {named.name}, which is missing, and {root} holds no complete checkpoint"
            )
    if (p / "trainer.json").is_file():
        return p
    found = checkpoints(p) or checkpoints(p / "checkpoints")
    if found:
        return found[-1]
    raise FileNotFoundError(f"{p}: no checkpoint here (expected a step_* directory or a 'latest' file)")


CHECKSUMS = "checksums.json"


def write_checksums(ckpt_dir: Path) -> None:
    """Record sha256 and size of every file of a checkpoint (rank 0, after every rank wrote its part)."""
    ckpt_dir = Path(ckpt_dir)
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    save_json(
        ckpt_dir / CHECKSUMS,
        {str(p.relative_to(ckpt_dir)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
    )


def verify(ckpt_dir: Path) -> str | None:
    """None when every recorded file is present with its recorded size and sha256, else what is wrong (one line).
    A checkpoint written before checksums were recorded (no checksums.json) is reported as such."""
    ckpt_dir = Path(ckpt_dir)
    sums = ckpt_dir / CHECKSUMS
    if not sums.is_file():
        return f"{sums} is missing (a checkpoint written before checksums were recorded, or an incomplete one)"
    try:
        table = json.loads(sums.read_text())
    except (OSError, ValueError) as exc:
        return f"{sums} is unreadable ({type(exc).__name__})"
    for rel, rec in table.items():
        p = ckpt_dir / rel
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != rec["bytes"]:
            return f"{p} has {p.stat().st_size} bytes, {rec['bytes']} were written (truncated?)"
        if sha256_file(p) != rec["sha256"]:
            return f"{p} does not match the sha256 recorded when it was written (corrupt)"
    return None


def resolve_verified(where: str | Path, fall_back: bool) -> Path:
    """The checkpoint to resume from, its files verified against their recorded checksums.

    ``fall_back`` (resuming a run's latest): a checkpoint that fails verification is skipped, with a warning,
    for the previous complete one; otherwise (an explicit directory) it is a one-line ConfigError naming the file.
    DeepSpeed's loader unpickles with full trust, so nothing unverified reaches it."""
    first = resolve(where)
    candidates = [first] + (
        [p for p in reversed(checkpoints(first.parent)) if step_of(p) < step_of(first)]
        if fall_back and step_of(first) is not None
        else []
    )
    problems = []
    for cand in candidates:
        problem = verify(cand)
        if problem is None:
            if problems:
                warnings.warn(f"resuming {cand.name}: skipped {'; '.join(problems)}", stacklevel=2)
            return cand
        problems.append(f"{cand.name}: {problem}")
    raise ConfigError(
        f"--resume: no verifiable checkpoint: {problems[0]}"
        + (f" (and {len(problems) - 1} older)" if len(problems) > 1 else "")
    )


def latest_or_none(root: str | Path) -> Path | None:
    """The run's latest complete checkpoint, or None (for messages)."""
    try:
        return resolve(root)
    except FileNotFoundError:
        return None


def save_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
