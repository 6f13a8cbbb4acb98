"""Shared by tests/unit/test_runs_round2.py and tests/integration/test_runs_round2.py: fixtures and helpers of both halves."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO

SMOKE = ["--config", "configs/arcface_r50.yaml", "--config", "configs/smoke.yaml", "model.backbone=iresnet18"]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train(*args, timeout=600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.train", *SMOKE, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
