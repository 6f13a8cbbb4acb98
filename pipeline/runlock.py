"""One run per folder: an exclusive POSIX record lock (``lockf``) on ``<folder>/.lock``, held for the life of the
process.

The operating system releases the lock when the holder dies (kill -9, OOM, a node reboot), so a killed run never
blocks its own resume; a second process asking for a held folder gets a :class:`FolderLocked` whose one-line
message names the holder (host, pid, start time) read from the lock file. Used by the trainer (rank 0, on
``output.dir``) and by the ablation runner (each cell folder).

Why ``lockf`` and not ``flock``: a ``flock`` belongs to the open file, which forked DataLoader workers share — a
killed trainer's workers, still alive for a few seconds, kept its folder locked against its own resume. A POSIX
lock belongs to the process and is not inherited by children. Its one trap — closing *any* descriptor of the
file releases the process's lock — is why :func:`is_locked` never opens a folder this process holds. POSIX locks
are also what NFS (lockd) and Lustre support across nodes.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"
_HELD: set[str] = set()  # lock files this process holds (is_locked must not open them: see the module docstring)


class FolderLocked(RuntimeError):
    """Another live process holds the folder."""


class FolderLock:
    """``with FolderLock(dir, what):`` or ``lock = FolderLock(dir, what).acquire()`` … ``lock.release()``."""

    def __init__(self, folder: str | Path, what: str = "run"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        held_here = str(self.path.resolve()) in _HELD  # POSIX locks never conflict within one process
        fd = None if held_here else os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fd is None:
                raise OSError("held by this process")
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = holder_text(self.path)
            if fd is not None:
                os.close(fd)
            raise FolderLocked(
                f"{self.folder}: another {self.what} is using this folder ({holder}); wait for it to end, stop it, "
                "or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}).encode())
        os.fsync(fd)
        self._fd = fd
        _HELD.add(str(self.path.resolve()))
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
            _HELD.discard(str(self.path.resolve()))

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_text(path: Path) -> str:
    """'host H, pid P, started T' from a lock file, or what is known when it cannot be read."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown: it has only just started"
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {info.get('started', '?')}"


def is_locked(folder: str | Path) -> str | None:
    """The holder's description if a live process holds ``folder``'s lock, else None (takes and drops it)."""
    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return None
    if str(path.resolve()) in _HELD:  # ours: opening and closing it would release it
        return f"host {socket.gethostname()}, pid {os.getpid()} (this process)"
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return holder_text(path)
    finally:
        os.close(fd)  # (a lock taken by the test is released with it)
    return None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """``preexec_fn`` of a child that must not outlive its parent (an ablation cell, a cell's trainer): the kernel
    sends it SIGTERM when the parent dies, kill -9 included (it then checkpoints and stops, as on scancel)."""
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the lock a cell holds still keeps a rerun from starting it twice
        return
    if os.getppid() != parent:  # the parent died before the prctl: nobody would send the signal
        os.kill(os.getpid(), signal.SIGTERM)
