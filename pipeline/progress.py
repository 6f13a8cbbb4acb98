"""Progress of long work: a tqdm bar on a terminal; in a log file (Slurm, a redirect) one plain line every
``every_s`` seconds with the count, the share, the elapsed time and an ETA — never carriage returns."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def hms(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown): elapsed times and ETAs of the trainer, the runner and these lines."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress(
    items: Iterable[T], total: int, desc: str, unit: str = "batch", every_s: float = 30.0, enabled: bool = True
) -> Iterator[T]:
    """Yield ``items``, reporting progress on stderr (a bar on a terminal, else a line every ``every_s`` s)."""
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False)
        return
    started = last = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every_s and done < total:
            last = now
            eta = (now - started) / done * (total - done)
            print(
                f"{desc}: {done}/{total} {unit}es ({100 * done / total:.0f} %), elapsed {hms(now - started)}, "
                f"ETA {hms(eta)}",
                file=sys.stderr,
                flush=True,
            )
