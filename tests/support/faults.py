"""Shared by tests/unit/test_faults.py and tests/integration/test_faults.py: fixtures and helpers of both halves."""

from __future__ import annotations

import os
import subprocess

from tests.helpers import REPO


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(cmd, timeout=600):
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
