"""Shared by tests/unit/test_old_checkpoint.py and tests/integration/test_old_checkpoint.py: fixtures and helpers of both halves."""

from __future__ import annotations

from tests.helpers import REPO

FIXTURE = REPO / "tests" / "fixtures" / "ckpt_01e6669"


STEP = FIXTURE / "checkpoints" / "step_0000002"
