"""Shared by tests/unit/test_runs_round2.py and tests/integration/test_runs_round2.py: the smoke trainer run."""

from __future__ import annotations

import subprocess

from tests import helpers

R18 = "model.backbone=iresnet18"


def train(*args, timeout=600) -> subprocess.CompletedProcess:
    """The smoke ArcFace run on an iresnet18 with ``args``, to its end whatever its exit code."""
    return helpers.run(helpers.train_command(R18, *args), timeout, check=False)
