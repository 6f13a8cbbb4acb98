"""The one writer of checkpoint directories: a manager that composes the run's stateful parts.

Each part owns its state and its files (the engine: DeepSpeed's folder, the network and the backbone's optimizer
state by name; the classifier: its full class centres and their optimizer moments; the run: counters, config and
the data position). The manager gives them one temporary folder, records checksums, renames it into place and
points ``latest`` at it (:mod:`pipeline.checkpoint.format`); on resume it verifies the files, lets every part check
that the checkpoint fits this run (``check``), then restores them in order (``load``). A part never creates or
renames a checkpoint folder.

Every rank calls :meth:`CheckpointManager.save` and :meth:`CheckpointManager.load` (parts may gather or scatter
across ranks); the folder and the rank-0-only files are written by rank 0 (``main``).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from pipeline.checkpoint import format as fmt
from pipeline.config import ConfigError

TRAINER_META = "trainer.json"  # the run's counters; read first on resume (every part's check sees it)


class Stateful(Protocol):
    """A part of a run whose state a checkpoint keeps."""

    def save(self, folder: Path, main: bool) -> None:
        """Write this part's files into ``folder`` (every rank calls; rank-0-only files when ``main``)."""

    def check(self, folder: Path, meta: dict) -> None:
        """Raise a one-line :class:`ConfigError` if the checkpoint at ``folder`` cannot be resumed by this run."""

    def load(self, folder: Path, meta: dict) -> None:
        """Restore this part from ``folder`` (every rank calls)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the partial folder is gone, the previous checkpoint kept (exit 5)."""


_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device (ENOSPC)",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
    errno.EROFS: "the file system is read-only (EROFS)",
}
LOW_FREE_BYTES = 64 << 20  # under this, a write failure without an errno (torch.save's) is reported as a full disk


def write_failure(exc: BaseException, folder: Path) -> str:
    """Why a checkpoint write failed, in words: the errno's meaning (ENOSPC, EDQUOT, EROFS), or for torch.save's
    errno-less RuntimeError ("unexpected pos …") the free space left where it was writing."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return _WRITE_ERRNOS[e.errno]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        free = os.statvfs(folder if folder.exists() else folder.parent)
        free_bytes = free.f_bavail * free.f_frsize
    except OSError:
        free_bytes = None
    if free_bytes is not None and free_bytes < LOW_FREE_BYTES:
        return f"the disk is full ({free_bytes} bytes free; {type(exc).__name__}: {text})"
    return f"{type(exc).__name__}: {text}"


class CheckpointManager:
    """``root``: the run's ``checkpoints/`` folder; ``parts`` in save/restore order; ``keep``: checkpoints kept;
    ``main``: this rank writes the folder; ``barrier``: waits for every rank (a no-op on one).
    ``passthrough``: exception types a failed save re-raises as they are (the run's own stop reasons)."""

    def __init__(
        self,
        root: Path,
        parts: Sequence[Stateful],
        keep: int,
        main: bool,
        barrier: Callable[[], None],
        passthrough: tuple[type[BaseException], ...] = (),
    ):
        self.root, self.parts, self.keep, self.main, self.barrier = Path(root), list(parts), keep, main, barrier
        self.passthrough = (KeyboardInterrupt, *passthrough)

    def save(self, step: int) -> Path:
        """Write the checkpoint of ``step`` atomically. A failure (a full disk, a quota, a read-only file system,
        any error) removes the partial ``.tmp_*`` folder, keeps the previous checkpoint and raises
        :class:`CheckpointWriteError` naming the cause."""
        tmp = self.root / fmt.tmp_name(step)
        try:
            return self._write(step, tmp)
        except self.passthrough:
            raise
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(
                f"checkpoint at step {step}: writing {tmp} failed: {write_failure(exc, self.root)}; "
                f"removed the partial folder; the previous checkpoint is kept: {fmt.latest_or_none(self.root)}"
            ) from exc

    def _write(self, step: int, tmp: Path) -> Path:
        if self.main:
            self.root.mkdir(parents=True, exist_ok=True)
        self.barrier()
        if self.main:
            tmp.mkdir(parents=True, exist_ok=True)
        for part in self.parts:
            part.save(tmp, self.main)
        self.barrier()
        final = self.root / fmt.step_name(step)
        if self.main:
            fmt.write_checksums(tmp)  # after every rank's files are in place
            final = fmt.finalize(self.root, step, self.keep)
            print(f"[train] checkpoint {final}", flush=True)
        self.barrier()
        return final

    def find(self, where: str) -> Path | None:
        """The verified checkpoint ``--resume WHERE`` names ('latest': this run's newest that verifies, else None)."""
        try:
            return fmt.resolve_verified(self.root if where == "latest" else where, fall_back=where == "latest")
        except FileNotFoundError as exc:
            if where == "latest":
                return None
            raise ConfigError(f"--resume: {exc}") from None

    def load(self, folder: Path) -> dict:
        """Check every part against the checkpoint, then restore them; returns its counters (``trainer.json``)."""
        meta = fmt.load_json(folder / TRAINER_META)
        for part in self.parts:
            part.check(folder, meta)
        for part in self.parts:
            part.load(folder, meta)
        return meta
