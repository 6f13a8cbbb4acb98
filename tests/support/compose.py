"""Shared by tests/unit/test_compose.py and tests/integration/test_compose.py: fixtures and helpers of both halves."""

from __future__ import annotations

import subprocess
import sys

from pipeline.config import load_config
from tests.helpers import REPO

PROBE = REPO / "configs" / "compose" / "probe.yaml"


SMOKE = REPO / "configs" / "smoke.yaml"


def tiny(*overrides, configs=(PROBE,)):
    return load_config([*configs, SMOKE], ["model.input_size=32", *overrides])


def run(cmd, timeout=600):
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def train(*args):
    return [sys.executable, "-m", "pipeline.train", *args]
