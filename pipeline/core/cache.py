"""The one on-disk cache of results: a record (JSON) or an array (``.npy``) that is valid for one **key** — a dict of
everything the result depends on (weights' sha256, data, settings). Written atomically (a reader never sees half a
file; a killed writer leaves only a temp file), read back only when its key matches; an unreadable or mismatching
entry reads as absent (the caller computes it again), never as an error. Used by ``pipeline.report`` (a run's
evaluation), ``pipeline.eval ijb`` (each rank's feature slices, resumable) and the ablation runner's hashes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.manifest import atomic_write_text


def digest(obj: Any, length: int | None = None) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; other types by ``str``), the first ``length`` hex digits."""
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return h[:length] if length else h


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_record(path: str | Path, key: Any, record: dict) -> None:
    """``record`` with its ``key`` (under ``"key"``), atomically; the folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**record, "key": key}, indent=1) + "\n")


def read_record(path: str | Path, key: Any) -> dict | None:
    """The record at ``path`` when it was written for ``key``; None when absent, unreadable or for another key."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None  # absent, unreadable or half-written by an older version: computed again
    return record if isinstance(record, dict) and record.get("key") == key else None


def save_array(path: str | Path, array: np.ndarray) -> None:
    """``array`` as ``.npy`` (no pickle), atomically."""
    path = Path(path)
    tmp = _temp(path)
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def load_array(path: str | Path, rows: int, dtype=np.float32) -> tuple[np.ndarray | None, str]:
    """(a cached 2-D ``dtype`` array of ``rows`` rows, "") or (None, why not) when absent, unreadable (never
    unpickled) or of another shape or type."""
    path = Path(path)
    if not path.is_file():
        return None, "absent"
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return None, f"unreadable cache ({type(exc).__name__})"
    if a.dtype != dtype or a.ndim != 2 or a.shape[0] != rows:
        return None, f"cache holds {a.dtype} {a.shape}, expected {rows} rows"
    return a, ""
