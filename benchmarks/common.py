"""What the benchmarks share: the repository root and the one line naming the machine a figure was measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    """``<cpu>, <n> CPU cores, python <v>, torch <v>``: the machine line every benchmark prints with its figures."""
    import torch

    return f"{cpu_name()}, {os.cpu_count()} CPU cores, python {platform.python_version()}, torch {torch.__version__}"
